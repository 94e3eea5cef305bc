"""The server's limits against the real server: oversized requests, reflection off,
the metrics endpoint kept on loopback, and the HTTP/2 settings it runs with."""

from __future__ import annotations

import argparse

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tally import config
from tally.api.transport import server_options
from tally_client.v1 import account_pb2, quota_pb2
from tests.support import RedisProcess, Running, settings, start_running, stop_running, unique


async def test_a_request_over_the_size_limit_is_refused_and_moves_nothing(
    redis_server: RedisProcess,
) -> None:
    """A Reserve larger than max_receive_message_bytes gets RESOURCE_EXHAUSTED; the
    balance and the ledger are untouched."""
    running = await start_running(redis_server.url, max_receive_message_bytes=4096)
    try:
        account_id = unique("big")
        await running.accounts.CreateAccount(
            account_pb2.CreateAccountRequest(account_id=account_id, monthly_allotment=100)
        )
        before = await running.quota.GetBalance(quota_pb2.GetBalanceRequest(account_id=account_id))
        await running.authority.flusher.flush_all()
        rows = len(await running.authority.ledger.entries(account_id))

        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await running.quota.Reserve(
                quota_pb2.ReserveRequest(
                    account_id=account_id, operation="image.upscale", quantity=1,
                    idempotency_key=unique("key"), labels={"padding": "x" * 8192},
                )
            )

        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        after = await running.quota.GetBalance(quota_pb2.GetBalanceRequest(account_id=account_id))
        assert after.balance == before.balance
        await running.authority.flusher.flush_all()
        assert len(await running.authority.ledger.entries(account_id)) == rows
    finally:
        await stop_running(running)


async def reflection_code(running: Running) -> grpc.StatusCode:
    stub = reflection_pb2_grpc.ServerReflectionStub(running.stubs.channel)
    call = stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    )
    try:
        async for _ in call:
            pass
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


@pytest.mark.parametrize(("switch", "code"), [
    ("on", grpc.StatusCode.OK), ("off", grpc.StatusCode.UNIMPLEMENTED),
])
async def test_reflection_can_be_turned_off(
    redis_server: RedisProcess, switch: str, code: grpc.StatusCode
) -> None:
    """--reflection off: the reflection service is not there at all."""
    running = await start_running(redis_server.url, reflection=switch)
    try:
        assert await reflection_code(running) == code
    finally:
        await stop_running(running)


def test_the_metrics_endpoint_stays_on_loopback_unless_asked() -> None:
    """A non-loopback metrics address is refused at start, unless metrics_allow_remote."""
    with pytest.raises(ValueError, match="metrics_allow_remote"):
        config.from_sources(argparse.Namespace(), {"TALLY_METRICS_LISTEN": "0.0.0.0:9464"})
    allowed = config.from_sources(
        argparse.Namespace(),
        {"TALLY_METRICS_LISTEN": "0.0.0.0:9464", "TALLY_METRICS_ALLOW_REMOTE": "true"},
    )
    assert allowed.metrics_allow_remote


def test_the_http2_limits_are_the_named_settings() -> None:
    """Each HTTP/2 limit the server runs with comes from its setting; age 0 means none."""
    configured = settings(
        "redis://unused", max_concurrent_streams=7, keepalive_min_interval="20s",
        max_connection_age="30m", max_connection_age_grace="1m",
    )
    options = dict(server_options(configured))
    assert options["grpc.max_concurrent_streams"] == 7
    assert options["grpc.http2.min_ping_interval_without_data_ms"] == 20_000
    assert options["grpc.max_connection_age_ms"] == 1_800_000
    assert options["grpc.max_connection_age_grace_ms"] == 60_000
    ageless = dict(server_options(settings("redis://unused", max_connection_age="0")))
    assert "grpc.max_connection_age_ms" not in ageless


@pytest.mark.parametrize("half", [{"tls_cert": "c.pem"}, {"tls_key": "k.pem"},
                                  {"tls_principals": "p.json"}])
def test_incomplete_tls_settings_are_refused(half: dict[str, str]) -> None:
    """A certificate without its key (or the reverse), or principals without mutual TLS,
    stop the start."""
    with pytest.raises(ValueError, match="tls_"):
        settings("redis://unused", **half)
