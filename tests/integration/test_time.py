"""Time-driven work: billing periods close on time (the period sweeper), time never
runs backwards for an account served by servers with different clocks, and a quoted
price_version is honoured for --quote-validity after it is superseded, not longer."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from google.protobuf.duration_pb2 import Duration

from tally.store.contract import PriceVersionRecord
from tally.store.state_images import StateImages, unpack_image
from tally_client.v1 import account_pb2, catalog_pb2, common_pb2, quota_pb2
from tests.support import (
    T0_MS,
    RedisProcess,
    Running,
    start_running,
    stop_running,
    unique,
)

SECOND_MS = 1000
DAY_MS = 86_400_000
# T0 is 2026-11-25 12:00 UTC: an account created then is anchored on the 25th
PERIOD_END_MS = 1_798_156_800_000  # 2026-12-25 00:00 UTC
PRICE = 10  # image.upscale in the default catalog
QUOTE_VALIDITY_DEFAULT_MS = 10 * 60 * SECOND_MS  # --quote-validity's documented default


@pytest_asyncio.fixture
async def sweeping(own_redis: RedisProcess) -> AsyncIterator[Running]:
    """An authority on a Redis of its own (the sweeper's counts are this test's
    alone), whose background sweeper is stopped: the test runs its passes."""
    running = await start_running(own_redis.url, period_sweep_batch=1)
    running.authority.sweeper.stop()
    yield running
    await stop_running(running)


async def create(running: Running, allotment: int, **fields: object) -> str:
    account_id = unique()
    await running.accounts.CreateAccount(account_pb2.CreateAccountRequest(
        account_id=account_id, monthly_allotment=allotment, **fields,  # type: ignore[arg-type]
    ))
    return account_id


async def charge(running: Running, account_id: str, quantity: int, key: str) -> None:
    await running.quota.Charge(quota_pb2.ChargeRequest(
        account_id=account_id, operation="image.upscale", quantity=quantity,
        idempotency_key=key,
    ))


async def read(running: Running, account_id: str) -> common_pb2.Balance:
    reply = await running.quota.GetBalance(quota_pb2.GetBalanceRequest(account_id=account_id))
    return reply.balance


async def entries(running: Running, account_id: str) -> list[account_pb2.LedgerEntry]:
    await running.authority.flusher.flush_all()
    listing = await running.accounts.ListLedgerEntries(
        account_pb2.ListLedgerEntriesRequest(account_id=account_id)
    )
    return list(listing.entries)


def kinds(listed: list[account_pb2.LedgerEntry]) -> list[tuple[str, int]]:
    return [(entry.type, entry.units) for entry in listed]


async def test_sweeper_closes_periods_of_accounts_that_are_only_read(
    sweeping: Running,
) -> None:
    """Proves an account that is only read after its writes gets its period closed by
    the sweeper, at the period end and not a millisecond before: the overage invoiced,
    the unused allotment expired, the next allotment granted, a purchase expiring
    mid-period expired on time; with a batch of 1, one pass closes every due account,
    and a second pass (another server's) writes nothing."""
    running = sweeping
    sweeper = running.authority.sweeper
    over = await create(running, 100, overage_policy=common_pb2.OVERAGE_POLICY_ALLOW,
                        overage_limit=1000)
    await charge(running, over, 15, "c1")  # 150 units: the allotment's 100, 50 overage
    under = await create(running, 100)
    await charge(running, under, 3, "c1")  # 30 of 100 used
    bought = await create(running, 0)
    expires_at_ms = T0_MS + 3 * DAY_MS
    await running.accounts.PurchaseUnits(account_pb2.PurchaseUnitsRequest(
        account_id=bought, units=40, idempotency_key="p1",
        expires_at={"seconds": expires_at_ms // 1000},
    ))
    assert (await read(running, over)).overage_used == 50

    running.clock.set(expires_at_ms - 1)
    assert await sweeper.sweep_once() == 0
    running.clock.set(expires_at_ms)
    assert await sweeper.sweep_once() == 1
    running.clock.set(PERIOD_END_MS - 1)
    assert await sweeper.sweep_once() == 0
    assert kinds(await entries(running, over)) == [
        ("plan_change", 0), ("allotment", 100), ("charge", 150)]
    running.clock.set(PERIOD_END_MS)
    assert await sweeper.sweep_once() == 2  # `bought` rolls too, but has nothing to write
    assert await sweeper.sweep_once() == 0

    closed_over = await entries(running, over)
    assert kinds(closed_over) == [
        ("plan_change", 0), ("allotment", 100), ("charge", 150),
        ("allotment_expire", 0), ("overage", 50), ("allotment", 100)]
    assert {e.occurred_at.ToMilliseconds() for e in closed_over[3:]} == {PERIOD_END_MS}
    assert closed_over[-1].available_after == 100
    closed_under = await entries(running, under)
    assert kinds(closed_under) == [
        ("plan_change", 0), ("allotment", 100), ("charge", 30),
        ("allotment_expire", 70), ("allotment", 100)]
    closed_bought = await entries(running, bought)
    assert kinds(closed_bought) == [("plan_change", 0), ("purchase", 40), ("grant_expire", 40)]
    assert closed_bought[-1].occurred_at.ToMilliseconds() == expires_at_ms
    balance = await read(running, over)
    assert (balance.overage_used, balance.units_granted_total) == (0, 250)


@pytest_asyncio.fixture
async def two_servers(
    own_redis: RedisProcess, tmp_path: Path
) -> AsyncIterator[tuple[Running, Running]]:
    """Two authorities on one Redis and one ledger: `fast`'s clock 5 s ahead of `slow`'s."""
    ledger_url = f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
    fast = await start_running(own_redis.url, now_ms=T0_MS + 5 * SECOND_MS, ledger_url=ledger_url)
    slow = await start_running(own_redis.url, now_ms=T0_MS, ledger_url=ledger_url)
    yield fast, slow
    await stop_running(slow)
    await stop_running(fast)


def advance(servers: tuple[Running, Running], by_ms: int) -> None:
    for running in servers:
        running.clock.advance(by_ms)


async def reserve(running: Running, account_id: str, key: str) -> quota_pb2.ReserveResponse:
    return await running.quota.Reserve(quota_pb2.ReserveRequest(
        account_id=account_id, operation="image.upscale", quantity=2, idempotency_key=key,
        ttl=Duration(seconds=10),
    ))


async def test_time_never_runs_backwards_for_an_account_across_servers(
    two_servers: tuple[Running, Running],
) -> None:
    """Proves that with two servers 5 s apart, the slow one works on the account's
    clock (the latest a script used on it): a hold it makes after the fast one wrote
    lives its whole ttl from that time (the fast one does not expire it early), a hold
    the fast one made is not expired early by the slow one and has expired for it (a
    Commit is late) once the account's time has reached its expiry, and the account's
    event times never decrease."""
    fast, slow = two_servers
    fast_start_ms = fast.clock.now_ms()
    account_id = await create(fast, 1000)
    held = await reserve(slow, account_id, "r1")
    assert held.expires_at.ToMilliseconds() == fast_start_ms + 10 * SECOND_MS
    advance(two_servers, 10 * SECOND_MS - 1)
    assert (await read(fast, account_id)).held == 2 * PRICE  # not expired early
    advance(two_servers, 1)
    assert (await read(fast, account_id)).held == 0

    by_fast = await reserve(fast, account_id, "r2")
    expiry_ms = by_fast.expires_at.ToMilliseconds()
    advance(two_servers, 10 * SECOND_MS - 1)
    assert (await read(slow, account_id)).held == 2 * PRICE
    await charge(fast, account_id, 1, "c1")  # the account's time: 1 ms before the expiry
    assert (await read(slow, account_id)).held == 2 * PRICE  # the slow one: not early
    advance(two_servers, 1)
    await charge(fast, account_id, 1, "c2")  # the account's time reaches the expiry
    committed = await slow.quota.Commit(
        quota_pb2.CommitRequest(reservation_id=by_fast.reservation_id)
    )
    assert committed.late  # charged as a hold that had expired
    assert slow.clock.now_ms() < expiry_ms  # the slow server's own clock had not got there

    await charge(slow, account_id, 1, "c3")
    await slow.authority.flusher.flush_all()
    times = [entry.occurred_at.ToMilliseconds() for entry in await entries(fast, account_id)]
    assert len(times) == 10 and times == sorted(times)
    assert times[0] == fast_start_ms


async def test_superseded_price_version_is_honoured_for_the_quote_validity(
    running: Running,
) -> None:
    """Proves a quoted price_version is honoured until --quote-validity (10 min by
    default) after a newer version superseded it, at its old price, and refused from
    that instant with FAILED_PRECONDITION naming price_version; the current version
    is not limited."""
    validity_ms = QUOTE_VALIDITY_DEFAULT_MS
    operation = f"test.op-{unique('q')}"
    first = (await running.catalog.SetPrice(
        catalog_pb2.SetPriceRequest(operation=operation, units_per_quantity=1)
    )).price
    account_id = await create(running, 1000)
    running.clock.advance(DAY_MS)  # a version's age does not count, only since superseded
    superseded_ms = running.clock.now_ms()
    second = (await running.catalog.SetPrice(
        catalog_pb2.SetPriceRequest(operation=operation, units_per_quantity=100)
    )).price

    async def quoted(version: int, key: str) -> quota_pb2.ReserveResponse:
        return await running.quota.Reserve(quota_pb2.ReserveRequest(
            account_id=account_id, operation=operation, quantity=2, idempotency_key=key,
            price_version=version,
        ))

    running.clock.set(superseded_ms + validity_ms - 1)
    assert (await quoted(first.version, "r1")).units == 2
    running.clock.set(superseded_ms + validity_ms)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await quoted(first.version, "r2")
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "price_version" in (refused.value.details() or "")
    running.clock.advance(30 * DAY_MS)
    assert (await quoted(second.version, "r3")).units == 200
    assert running.authority.settings.quote_validity * 1000 == validity_ms


async def history_record(
    running: Running, shard: int, operation: str, version: int
) -> PriceVersionRecord:
    store = running.authority.store
    raw = await store.redis.hget(
        store.keys.price_history(shard), store.keys.price_version_field(operation, version)
    )
    assert raw is not None, f"shard {shard} has no version {version} of {operation}"
    return PriceVersionRecord.decode(unpack_image(raw))


async def test_every_shard_and_a_repaired_one_record_when_a_version_was_superseded(
    running: Running,
) -> None:
    """Proves every shard's copy of the price history records the time SetPrice
    superseded a version (so a quote lapses at the same instant on every shard), and
    that a shard whose copy was lost gets the same record back from sync_catalog."""
    store = running.authority.store
    operation = f"test.op-{unique('h')}"
    first = (await running.catalog.SetPrice(
        catalog_pb2.SetPriceRequest(operation=operation, units_per_quantity=1)
    )).price
    running.clock.advance(SECOND_MS)
    superseded_ms = running.clock.now_ms()
    await running.catalog.SetPrice(
        catalog_pb2.SetPriceRequest(operation=operation, units_per_quantity=2)
    )
    superseded = PriceVersionRecord(price=1, superseded_at=superseded_ms)
    for shard in range(store.keys.shards):
        assert await history_record(running, shard, operation, first.version) == superseded
    lost = store.keys.shards - 1
    await store.redis.hdel(
        store.keys.price_history(lost), store.keys.price_version_field(operation, first.version)
    )
    await store.sync_catalog(load_defaults=False)
    assert await history_record(running, lost, operation, first.version) == superseded


async def test_recovery_restores_supersession_times_and_makes_accounts_due(
    own_redis: RedisProcess,
) -> None:
    """Proves recovery writes each price version superseded when the operation's next
    version took effect (the current one not superseded), and restores an account due
    at once in its shard's closings, so the sweeper closes it and indexes its next
    closing (its period end)."""
    running = await start_running(own_redis.url)
    try:
        running.authority.sweeper.stop()
        store = running.authority.store
        images = StateImages.of(store)
        await images.restore_catalog([("op.a", 1, 5, 100), ("op.b", 2, 7, 200),
                                      ("op.a", 3, 9, 300)])
        assert await history_record(running, 0, "op.a", 1) == PriceVersionRecord(5, 300)
        assert await history_record(running, 0, "op.a", 3) == PriceVersionRecord(9, 0)
        assert await history_record(running, 0, "op.b", 2) == PriceVersionRecord(7, 0)

        account_id = await create(running, 100)
        image = await images.account(account_id)
        assert image is not None
        closings = store.keys.closings(store.keys.shard_of(account_id))
        assert await store.redis.zscore(closings, account_id) == PERIOD_END_MS
        await images.restore_account(account_id, image)
        assert await store.redis.zscore(closings, account_id) == 0
        assert await running.authority.sweeper.sweep_once() == 0  # nothing was due
        assert await store.redis.zscore(closings, account_id) == PERIOD_END_MS
    finally:
        await stop_running(running)
