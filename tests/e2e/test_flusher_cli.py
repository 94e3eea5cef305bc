"""`tally flusher` as an operator runs it beside servers started with --flusher off."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from tally.store.keys import KeySpace
from tally_client.v1 import account_pb2, quota_pb2
from tests.support import (
    RedisProcess,
    Running,
    free_port,
    kill_all,
    start_running,
    stop_running,
    unique,
)

TALLY = str(Path(sys.executable).with_name("tally"))
WAIT_S = 30.0


@pytest.fixture
def ledger_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'ledger.sqlite3'}"


@pytest_asyncio.fixture
async def server(own_redis: RedisProcess, ledger_url: str) -> AsyncIterator[Running]:
    """A server that flushes nothing itself (--flusher off)."""
    running = await start_running(own_redis.url, ledger_url=ledger_url, flusher="off")
    yield running
    await stop_running(running)


@pytest.fixture
def flushers() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    kill_all(started)


def start_flusher(
    started: list[subprocess.Popen[bytes]], *flags: str, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TALLY_")}
    process = subprocess.Popen(
        [TALLY, "flusher", "--log-format", "text", *flags], env={**clean, **(env or {})},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    started.append(process)
    return process


async def charge(server: Running) -> tuple[str, str]:
    account_id = unique()
    await server.accounts.CreateAccount(account_pb2.CreateAccountRequest(
        account_id=account_id, monthly_allotment=100))
    reply = await server.quota.Charge(quota_pb2.ChargeRequest(
        account_id=account_id, operation="image.upscale", quantity=1, idempotency_key="k"))
    return account_id, reply.reservation_id


async def charges_in_ledger(server: Running, account_id: str) -> list[str]:
    listing = await server.accounts.ListLedgerEntries(account_pb2.ListLedgerEntriesRequest(
        account_id=account_id, types=["charge"]))
    return [entry.reservation_id for entry in listing.entries]


async def wait_for(server: Running, account_id: str, process: subprocess.Popen[bytes]) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_S
    while not await charges_in_ledger(server, account_id):
        assert process.poll() is None, "tally flusher exited"
        assert loop.time() < deadline, "the charge never reached the ledger"
        await asyncio.sleep(0.1)


async def started(server: Running, process: subprocess.Popen[bytes]) -> None:
    """Once the flusher holds the snapshot lease (the server, without a flusher, never
    takes it), it is a moment from waiting for signals."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_S
    while not await server.authority.store.redis.hget(KeySpace.lease("snapshot"), "owner"):
        assert process.poll() is None, "tally flusher exited"
        assert loop.time() < deadline, "tally flusher did not start"
        await asyncio.sleep(0.1)
    await asyncio.sleep(0.3)


def metrics_text(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text: str = reply.read().decode()
    return text


async def test_tally_flusher_moves_events_to_the_ledger_and_reports_its_leases(
    server: Running, own_redis: RedisProcess, ledger_url: str,
    flushers: list[subprocess.Popen[bytes]],
) -> None:
    """Proves a `tally flusher` beside a server without a flusher writes the server's
    hot-path events to the ledger, serves metrics saying it flushed and holds the
    snapshot and prune leases, and stops on SIGTERM with status 0."""
    metrics_port = free_port()
    process = start_flusher(
        flushers, "--flush-interval", "100ms", "--metrics-listen", f"127.0.0.1:{metrics_port}",
        env={"TALLY_REDIS_URL": own_redis.url, "TALLY_LEDGER_URL": ledger_url},
    )
    account_id, reservation_id = await charge(server)
    await wait_for(server, account_id, process)
    assert await charges_in_ledger(server, account_id) == [reservation_id]
    text = metrics_text(metrics_port)
    assert 'tally_leases_held{job="snapshot"} 1.0' in text
    assert 'tally_leases_held{job="prune"} 1.0' in text
    assert "tally_flusher_events_flushed_total" in text
    process.send_signal(signal.SIGTERM)
    assert process.wait(WAIT_S) == 0
    assert process.stderr is not None and b"Traceback" not in process.stderr.read()


async def test_sigterm_makes_a_last_flush_of_what_the_streams_hold(
    server: Running, own_redis: RedisProcess, ledger_url: str,
    flushers: list[subprocess.Popen[bytes]],
) -> None:
    """Proves a flusher whose next pass is an hour away still writes, at SIGTERM, the
    events written after it started (its last flush), then exits 0."""
    process = start_flusher(
        flushers, "--redis-url", own_redis.url, "--ledger-url", ledger_url,
        "--flush-interval", "1h", "--metrics-listen", "",
    )
    await started(server, process)
    account_id, reservation_id = await charge(server)
    await asyncio.sleep(0.3)
    assert await charges_in_ledger(server, account_id) == []  # no pass yet
    process.send_signal(signal.SIGTERM)
    assert process.wait(WAIT_S) == 0
    assert await charges_in_ledger(server, account_id) == [reservation_id]


def test_a_flusher_without_the_fleets_redis_and_ledger_is_refused(
    flushers: list[subprocess.Popen[bytes]],
) -> None:
    """Proves `tally flusher` with no Redis or ledger URL exits 1 naming both flags (it
    never starts an embedded Redis of its own)."""
    process = start_flusher(flushers, "--metrics-listen", "")
    assert process.wait(WAIT_S) == 1
    assert process.stderr is not None
    message = process.stderr.read().decode()
    assert "--redis-url" in message and "--ledger-url" in message
