"""Load (issue 9): on a healthy Redis no call is refused because of the server's own
connection handling. Callers wait in turn for a pooled connection (within their deadline);
admission bounds the calls in flight and sheds the rest with RESOURCE_EXHAUSTED and a
clear message, never UNAVAILABLE; health checks and reflection are never shed."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator, Callable

import grpc
import pytest_asyncio
import redis.asyncio as aioredis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tally import metrics
from tally_client.v1 import quota_pb2, quota_pb2_grpc
from tests.guard_support import aio, assert_books, balance, create_account, rpc_error
from tests.support import RedisProcess, Running, start_running, stop_running, unique

BURST_CALLS = 1024
BURST_CONCURRENCY = 256
BURST_ACCOUNTS = 16
ALLOTMENT = 100_000
OPERATION = "image.upscale"
UNITS_PER_CALL = 10  # its default price
# Shorter than the default 5 s Redis timeout: a stall, not an outage.
STALL_MS = 1500
POLL_BOUND_S = 30.0  # how long a test waits for a state it then asserts (never a threshold)


async def until(condition: Callable[[], bool], what: str) -> None:
    """Waits for a condition the test depends on; fails if it never comes."""
    loop = asyncio.get_running_loop()
    give_up = loop.time() + POLL_BOUND_S
    while not condition():
        if loop.time() > give_up:
            raise AssertionError(f"never reached: {what}")
        await asyncio.sleep(0.01)


def reserve(account_id: str, key: str) -> quota_pb2.ReserveRequest:
    return quota_pb2.ReserveRequest(
        account_id=account_id, operation=OPERATION, quantity=1, idempotency_key=key
    )


def sample(name: str, **labels: str) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


async def burst(address: str, accounts: list[str]) -> list[object]:
    """BURST_CALLS Reserves, BURST_CONCURRENCY at a time, from a client on an event loop
    of its own (another thread), so that the server sees them arrive together."""
    gate = asyncio.Semaphore(BURST_CONCURRENCY)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = quota_pb2_grpc.QuotaServiceStub(channel)

        async def one(n: int) -> quota_pb2.ReserveResponse:
            async with gate:
                answer: quota_pb2.ReserveResponse = await stub.Reserve(
                    reserve(accounts[n % BURST_ACCOUNTS], f"burst-{n}")
                )
                return answer

        return list(
            await asyncio.gather(*(one(n) for n in range(BURST_CALLS)), return_exceptions=True)
        )


@pytest_asyncio.fixture
async def default_server(own_redis: RedisProcess) -> AsyncIterator[Running]:
    """An authority with the default pool, admission and timeouts."""
    running = await start_running(own_redis.url)
    yield running
    await stop_running(running)


async def test_a_burst_on_a_healthy_redis_is_never_refused(
    default_server: Running, own_redis: RedisProcess
) -> None:
    """Proves 1,024 Reserve calls, 256 at a time, through the real server with the default
    settings (a pool of 64 Redis connections) all succeed although the first 256 arrive
    while Redis stalls its writes for a moment (as during a slow fsync), so that far more
    calls than connections want Redis at once: no UNAVAILABLE nor any other refusal,
    1,024 distinct holds, and every account holds exactly what was reserved."""
    running = default_server
    accounts = [unique() for _ in range(BURST_ACCOUNTS)]
    for account_id in accounts:
        await create_account(running, account_id, monthly_allotment=ALLOTMENT)
    admission = running.authority.admission
    probe = aioredis.Redis.from_url(own_redis.url)
    try:
        await probe.execute_command("CLIENT", "PAUSE", str(STALL_MS), "WRITE")
        calls = asyncio.create_task(
            asyncio.to_thread(asyncio.run, burst(running.authority.address, accounts))
        )
        # Resume once a whole wave waits on Redis, or let the stall lapse by itself.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(STALL_MS / 1000):
                await until(lambda: admission.in_flight >= BURST_CONCURRENCY, "a whole wave")
        await probe.execute_command("CLIENT", "UNPAUSE")
        outcomes = await calls
    finally:
        await probe.aclose()
    codes = Counter(
        o.code().name if isinstance(o, grpc.aio.AioRpcError) else type(o).__name__
        for o in outcomes
    )
    assert codes == Counter({"ReserveResponse": BURST_CALLS}), codes
    answers = [o for o in outcomes if isinstance(o, quota_pb2.ReserveResponse)]
    assert len({a.reservation_id for a in answers}) == BURST_CALLS
    assert {(a.units, a.replayed) for a in answers} == {(UNITS_PER_CALL, False)}
    held_each = BURST_CALLS // BURST_ACCOUNTS * UNITS_PER_CALL
    for account_id in accounts:
        figures = await balance(running, account_id)
        assert (figures.held, figures.available) == (held_each, ALLOTMENT - held_each)
        assert_books(figures)


async def test_a_call_waits_for_a_pooled_connection_and_is_never_unavailable(
    own_redis: RedisProcess,
) -> None:
    """Proves that while the only pooled connection is taken, a call without a deadline
    waits the pool's bound and is shed RESOURCE_EXHAUSTED ("server busy"), a call with a
    shorter deadline ends DEADLINE_EXCEEDED, neither is UNAVAILABLE, and once the
    connection is free again the same call is served."""
    running = await start_running(own_redis.url, redis_max_connections=1, redis_timeout="300ms")
    try:
        account_id = unique()
        await create_account(running, account_id)
        stubs = aio(running)
        request = quota_pb2.GetBalanceRequest(account_id=account_id)
        method = "QuotaService/GetBalance"
        unavailable = sample("tally_rpc_requests_total", method=method, code="UNAVAILABLE")
        expired = sample("tally_rpc_requests_total", method=method, code="DEADLINE_EXCEEDED")
        pool = running.authority.store.redis.connection_pool
        taken = await pool.get_connection()
        try:
            shed = await rpc_error(stubs.quota.GetBalance(request))
            assert shed.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert shed.details() == (
                "server busy: no Redis connection came free within 0.3s; "
                "retry with the same idempotency key"
            )
            late = await rpc_error(stubs.quota.GetBalance(request, timeout=0.1))
            assert late.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            await until(
                lambda: sample(
                    "tally_rpc_requests_total", method=method, code="DEADLINE_EXCEEDED"
                ) == expired + 1,
                "the server counted the late call DEADLINE_EXCEEDED",
            )
        finally:
            await pool.release(taken)
        assert (await stubs.quota.GetBalance(request)).balance.available == 1000
        assert sample("tally_rpc_requests_total", method=method, code="UNAVAILABLE") == (
            unavailable
        )
    finally:
        await stop_running(running)


async def test_admission_at_its_bound_sheds_with_resource_exhausted(
    own_redis: RedisProcess,
) -> None:
    """Proves that with 2 calls in flight (held by a Redis that pauses writes) and 1
    waiting, the next Reserve is shed at once: RESOURCE_EXHAUSTED with "server busy: 2
    calls in flight; retry with the same idempotency key", counted in tally_rpc_shed_total;
    health checks and reflection still answer; once Redis resumes the 3 admitted calls
    succeed, and the shed call retried with its idempotency key moves its units once."""
    running = await start_running(
        own_redis.url, max_in_flight=2, admission_queue=1, admission_wait="60s",
        redis_timeout="60s",
    )
    probe = aioredis.Redis.from_url(own_redis.url)
    try:
        account_id = unique()
        await create_account(running, account_id)
        stubs = aio(running)
        admission = running.authority.admission
        shed_before = sample(
            "tally_rpc_shed_total", method="QuotaService/Reserve", reason="queue_full"
        )

        async def reserved(key: str) -> quota_pb2.ReserveResponse:
            return await stubs.quota.Reserve(reserve(account_id, key))

        await probe.execute_command("CLIENT", "PAUSE", "60000", "WRITE")
        try:
            admitted = [asyncio.create_task(reserved(f"held-{n}")) for n in range(2)]
            await until(lambda: admission.in_flight == 2, "two calls in flight")
            admitted.append(asyncio.create_task(reserved("queued")))
            await until(lambda: admission.waiting == 1, "one call waiting")
            shed = await rpc_error(stubs.quota.Reserve(reserve(account_id, "shed")))
            health = health_pb2_grpc.HealthStub(running.stubs.channel)
            checked = await health.Check(health_pb2.HealthCheckRequest(service=""))
            reflection = reflection_pb2_grpc.ServerReflectionStub(running.stubs.channel)
            listed = [
                answer async for answer in reflection.ServerReflectionInfo(
                    iter([reflection_pb2.ServerReflectionRequest(list_services="")])
                )
            ]
        finally:
            await probe.execute_command("CLIENT", "UNPAUSE")
        assert shed.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert shed.details() == (
            "server busy: 2 calls in flight; retry with the same idempotency key"
        )
        assert checked.status == health_pb2.HealthCheckResponse.SERVING
        assert "tally.v1.QuotaService" in {
            s.name for s in listed[0].list_services_response.service
        }
        assert sample(
            "tally_rpc_shed_total", method="QuotaService/Reserve", reason="queue_full"
        ) == shed_before + 1
        answers = await asyncio.gather(*admitted)
        assert [a.units for a in answers] == [UNITS_PER_CALL] * 3
        retried = await stubs.quota.Reserve(reserve(account_id, "shed"))
        assert (retried.units, retried.replayed) == (UNITS_PER_CALL, False)
        figures = await balance(running, account_id)
        assert figures.held == 4 * UNITS_PER_CALL
        assert_books(figures)
        assert (admission.in_flight, admission.waiting) == (0, 0)
    finally:
        await probe.aclose()
        await stop_running(running)
