"""Many servers and standalone flushers on one Redis (or a real Redis Cluster) and
one ledger (issue 12):
concurrent starts, clients balancing over servers, and the background work of a
fleet done once (each acknowledged operation in the ledger once, each hold expired
once, one snapshot per schedule)."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from google.protobuf.duration_pb2 import Duration

from tally import app, standalone_flusher
from tally.clock import ManualClock
from tally.ledger.schema import MIGRATIONS
from tally_client import TallyClient
from tally_client.v1 import account_pb2, quota_pb2
from tests.support import (
    T0_MS,
    RedisProcess,
    Running,
    settings,
    start_running,
    stop_running,
    unique,
)

PRICE = 10  # image.upscale, units per quantity
WAIT_S = 20.0


async def eventually(check: Callable[[], Awaitable[bool]], what: str) -> None:
    deadline = asyncio.get_running_loop().time() + WAIT_S
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def create(running: Running, allotment: int = 1000) -> str:
    account_id = unique()
    await running.accounts.CreateAccount(account_pb2.CreateAccountRequest(
        account_id=account_id, monthly_allotment=allotment))
    return account_id


async def test_two_authorities_starting_at_once_do_the_start_up_work_one_at_a_time(
    own_redis: RedisProcess, ledger_url: str, caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Proves two servers started at the same moment on one Redis and one fresh ledger
    (SQLite and PostgreSQL) both start and serve, the ledger is migrated once (one
    process applies every version, the other finds them applied), and their once-only
    start-up work (recovery check, tokens, groups, catalog) never runs at the same time."""
    caplog.set_level(logging.INFO, logger="tally.app")
    active = most = 0
    start_up_once = app.start_up_once

    async def tracked(*args: Any) -> Any:
        nonlocal active, most
        active += 1
        most = max(most, active)
        try:
            await asyncio.sleep(0.05)  # long enough for the other start to reach it
            return await start_up_once(*args)
        finally:
            active -= 1

    monkeypatch.setattr(app, "start_up_once", tracked)
    first, second = await asyncio.gather(
        start_running(own_redis.url, ledger_url=ledger_url),
        start_running(own_redis.url, ledger_url=ledger_url),
    )
    try:
        account_id = await create(first)
        balance = await second.quota.GetBalance(quota_pb2.GetBalanceRequest(
            account_id=account_id))
        assert balance.balance.available == 1000
        await create(second)
    finally:
        await stop_running(second)
        await stop_running(first)
    assert most == 1
    migrated = [r for r in caplog.records if r.getMessage() == "ledger migrated"]
    assert len(migrated) == 1
    assert migrated[0].versions == [version for version, _, _ in MIGRATIONS]  # type: ignore[attr-defined]


@pytest_asyncio.fixture
async def two_servers(
    own_redis: RedisProcess, tmp_path: Path
) -> AsyncIterator[tuple[Running, Running]]:
    ledger_url = f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
    first = await start_running(own_redis.url, ledger_url=ledger_url)
    try:
        second = await start_running(own_redis.url, ledger_url=ledger_url)
    except BaseException:
        await stop_running(first)
        raise
    yield first, second
    await stop_running(second)
    await stop_running(first)


async def test_a_client_given_two_servers_spreads_its_calls_over_both(
    two_servers: tuple[Running, Running],
) -> None:
    """Proves the Python client given two addresses balances round robin: of 40 calls
    each server takes a fair part (admission counts every call a server takes)."""
    taken: Counter[int] = Counter()
    for index, running in enumerate(two_servers):
        enter = running.authority.admission.enter

        async def counted(remaining_s: float | None, index: int = index,
                          enter: Any = enter) -> None:
            taken[index] += 1
            await enter(remaining_s)

        running.authority.admission.enter = counted  # type: ignore[method-assign]
    account_id = await create(two_servers[0])
    taken.clear()
    async with TallyClient([running.authority.address for running in two_servers]) as client:
        for _ in range(40):
            assert (await client.balance(account_id)).available == 1000
    assert sum(taken.values()) == 40
    assert min(taken[0], taken[1]) >= 10, taken


# Leases renewed every 200 ms, so the second server gets its share of the shards soon.
FLEET = {"flusher": "off", "reaper_interval": "50ms", "lease_ttl": "600ms"}
FLUSHERS = {"flush_interval": "50ms", "snapshot_interval": "200ms", "lease_ttl": "600ms"}


@pytest.fixture(params=["redis", "cluster"])
def fleet_redis_url(request: pytest.FixtureRequest) -> str:
    """A private redis-server, or a real 3-master Redis Cluster."""
    if request.param == "cluster":
        return str(request.getfixturevalue("redis_cluster").url)
    return str(request.getfixturevalue("own_redis").url)


@pytest_asyncio.fixture
async def fleet(
    fleet_redis_url: str, tmp_path: Path
) -> AsyncIterator[tuple[list[Running], list[standalone_flusher.StandaloneFlusher]]]:
    """Two servers without flushers of their own and two `tally flusher`s (in process,
    each with its manual clock) on one Redis (or Redis Cluster) and one SQLite ledger."""
    redis_url = fleet_redis_url
    ledger_url = f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
    servers: list[Running] = []
    flushers: list[standalone_flusher.StandaloneFlusher] = []
    try:
        for _ in range(2):
            servers.append(await start_running(redis_url, ledger_url=ledger_url, **FLEET))
        for _ in range(2):
            flushers.append(await standalone_flusher.start(
                settings(redis_url, ledger_url, **FLUSHERS), clock=ManualClock(T0_MS)))
        yield servers, flushers
    finally:
        for server in servers:
            await stop_running(server)
        for flusher in flushers:
            await flusher.stop()


def ledger_of(flushers: list[standalone_flusher.StandaloneFlusher]) -> Any:
    return flushers[0].ledger


async def scheduled_snapshots(flushers: list[standalone_flusher.StandaloneFlusher]) -> list[int]:
    with ledger_of(flushers).backend.reading() as cur:
        cur.execute("SELECT taken_at FROM snapshots WHERE reason = 'scheduled' ORDER BY taken_at")
        return [int(row[0]) for row in cur.fetchall()]


async def test_a_fleet_of_two_servers_and_two_flushers_does_each_piece_of_work_once(
    fleet: tuple[list[Running], list[standalone_flusher.StandaloneFlusher]],
) -> None:
    """Proves, with traffic to both servers (charges, a charge retried on the other
    server, reserves committed in part, refunds, holds left to expire): every
    acknowledged operation is in the ledger exactly once and to the unit; every hold
    left to expire has one `expire` entry (the two reapers split the shards, so no hold
    is expired twice); Redis's balances equal the ledger's; and the two flushers write
    one scheduled snapshot per snapshot_interval of their clock, not two."""
    servers, flushers = fleet

    async def split() -> bool:
        held = [set(server.authority.reaper.leases.shards()) for server in servers]
        return len(held[0]) == len(held[1]) == 8 and not held[0] & held[1]

    await eventually(split, "the two servers to split the reaper's shards")
    # (account, type, reservation_id) -> units, for every acknowledged operation
    acked: dict[tuple[str, str, str], int] = {}
    accounts: list[str] = []
    for i in range(12):
        here, there = servers[i % 2], servers[(i + 1) % 2]
        account_id = await create(here)
        accounts.append(account_id)
        charged = await here.quota.Charge(quota_pb2.ChargeRequest(
            account_id=account_id, operation="image.upscale", quantity=2,
            idempotency_key="c1"))
        acked[(account_id, "charge", charged.reservation_id)] = 2 * PRICE
        again = await there.quota.Charge(quota_pb2.ChargeRequest(
            account_id=account_id, operation="image.upscale", quantity=2,
            idempotency_key="c1"))
        assert again.replayed and again.reservation_id == charged.reservation_id
        held = await there.quota.Reserve(quota_pb2.ReserveRequest(
            account_id=account_id, operation="image.upscale", quantity=3,
            idempotency_key="r1"))
        acked[(account_id, "reserve", held.reservation_id)] = 3 * PRICE
        committed = await here.quota.Commit(quota_pb2.CommitRequest(
            reservation_id=held.reservation_id, quantity=2))
        acked[(account_id, "commit", held.reservation_id)] = committed.units_charged
        refunded = await there.quota.Refund(quota_pb2.RefundRequest(
            reservation_id=charged.reservation_id, units=5, idempotency_key="f1"))
        acked[(account_id, "refund", charged.reservation_id)] = refunded.units_refunded
        left = await here.quota.Reserve(quota_pb2.ReserveRequest(
            account_id=account_id, operation="image.upscale", quantity=1,
            idempotency_key="r2", ttl=Duration(seconds=1)))
        acked[(account_id, "reserve", left.reservation_id)] = PRICE
        acked[(account_id, "expire", left.reservation_id)] = PRICE
    for server in servers:
        server.clock.advance(2000)  # every hold left is past its expiry

    reaper = servers[0].authority.reaper
    await eventually(lambda: _none_open(reaper), "the reapers to expire every hold")

    async def flushed() -> bool:
        return sum(lag.waiting for lag in await flushers[0].flusher.lag()) == 0

    await eventually(flushed, "the flushers to drain the streams")
    found: Counter[tuple[str, str, str]] = Counter()
    units: dict[tuple[str, str, str], int] = {}
    for account_id in accounts:
        listing = await servers[0].accounts.ListLedgerEntries(
            account_pb2.ListLedgerEntriesRequest(account_id=account_id, page_size=1000))
        for entry in listing.entries:
            key = (account_id, entry.type, entry.reservation_id)
            if key in acked:
                found[key] += 1
                units[key] = entry.units
        balance = await servers[1].quota.GetBalance(quota_pb2.GetBalanceRequest(
            account_id=account_id))
        assert balance.balance.available == listing.entries[-1].available_after
    assert found == Counter(dict.fromkeys(acked, 1))
    assert units == acked

    async def snapshots_written(count: int) -> None:
        async def written() -> bool:
            return len(await scheduled_snapshots(flushers)) >= count

        await eventually(written, f"{count} scheduled snapshots")

    await snapshots_written(1)
    for step in range(1, 4):
        for running in flushers:
            assert isinstance(running.ledger.clock, ManualClock)
            running.ledger.clock.advance(1000)
        await snapshots_written(step + 1)
        await asyncio.sleep(0.3)  # six more flush passes of each flusher: none is due
        assert await scheduled_snapshots(flushers) == [T0_MS + 1000 * k for k in range(step + 1)]


async def _none_open(reaper: Any) -> bool:
    return int(await reaper.open_holds()) == 0
