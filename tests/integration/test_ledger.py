"""The durable ledger on both backends: flushing, dedup, trimming, money-in,
ListLedgerEntries, verify and recover."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import msgpack
import pytest
import pytest_asyncio
import redis.asyncio as aioredis

from tally import app
from tally.domain.events import decode
from tally.ledger import recovery
from tally.ledger.backend import SqliteLedger, open_ledger
from tally.ledger.schema import LATEST_VERSION
from tally.store.state_images import StateImages
from tally.store.streams import GROUP, EventStreams
from tally_client.v1 import account_pb2, catalog_pb2, common_pb2, quota_pb2
from tests.support import T0_MS, RedisProcess, Running, start_running, stop_running, unique

# Trimming is checked exactly here, so flushed entries are not retained for watches.
SLOW_FLUSH = {"flush_interval": "1h", "snapshot_interval": "1h", "stream_retention": "0s"}


@pytest_asyncio.fixture
async def durable(own_redis: RedisProcess, ledger_url: str) -> AsyncIterator[Running]:
    """An authority on a private Redis and a fresh ledger whose background flusher
    is too slow to matter: tests flush by hand."""
    running = await start_running(own_redis.url, ledger_url=ledger_url, **SLOW_FLUSH)
    yield running
    await stop_running(running)


async def traffic(running: Running, account_id: str) -> str:
    await running.accounts.CreateAccount(
        account_pb2.CreateAccountRequest(account_id=account_id, monthly_allotment=1000)
    )
    held = await running.quota.Reserve(
        quota_pb2.ReserveRequest(
            account_id=account_id, operation="image.upscale", quantity=5, idempotency_key="r1",
            labels={"model": "x4"},
        )
    )
    await running.quota.Commit(
        quota_pb2.CommitRequest(reservation_id=held.reservation_id, quantity=3)
    )
    await running.quota.Refund(
        quota_pb2.RefundRequest(reservation_id=held.reservation_id, units=10, idempotency_key="f")
    )
    await running.quota.Charge(
        quota_pb2.ChargeRequest(
            account_id=account_id, operation="image.vectorize", quantity=2, idempotency_key="c"
        )
    )
    return held.reservation_id


async def test_money_in_is_in_the_ledger_before_it_is_acknowledged(durable: Running) -> None:
    """Proves CreateAccount, PurchaseUnits and SetPrice are durable in the ledger the
    moment they return, with the background flusher idle."""
    account_id = unique()
    await durable.accounts.CreateAccount(
        account_pb2.CreateAccountRequest(account_id=account_id, monthly_allotment=100)
    )
    await durable.accounts.PurchaseUnits(
        account_pb2.PurchaseUnitsRequest(
            account_id=account_id, units=250, idempotency_key="p1", reference="INV-9"
        )
    )
    operation = f"test.money-{unique('op')}"
    price = (await durable.catalog.SetPrice(
        catalog_pb2.SetPriceRequest(operation=operation, units_per_quantity=4)
    )).price
    ledger = durable.authority.ledger
    entries = await ledger.entries(account_id)
    assert [(e.type, e.units) for e in entries] == [
        ("plan_change", 0), ("allotment", 100), ("purchase", 250)
    ]
    assert entries[-1].detail["reference"] == "INV-9"
    prices = await ledger.catalog_prices()
    assert (operation, price.version, 4) in [(p[0], p[1], p[2]) for p in prices]


async def test_list_ledger_entries_pages_filters_and_matches_the_balance(
    durable: Running,
) -> None:
    """Proves ListLedgerEntries returns an account's flushed entries in order, pages
    with a token, filters by type, and its figures add up to the balance."""
    account_id = unique()
    reservation_id = await traffic(durable, account_id)
    await durable.authority.flusher.flush_all()
    listing = await durable.accounts.ListLedgerEntries(
        account_pb2.ListLedgerEntriesRequest(account_id=account_id)
    )
    kinds = [(e.type, e.units) for e in listing.entries]
    assert kinds == [
        ("plan_change", 0), ("allotment", 1000), ("reserve", 50), ("commit", 30),
        ("refund", 10), ("charge", 10),
    ]
    assert listing.entries[2].reservation_id == reservation_id
    assert dict(listing.entries[2].labels) == {"model": "x4"}
    assert listing.entries[2].idempotency_key == "r1"
    assert listing.entries[-1].available_after == 1000 - 30 + 10 - 10
    page = await durable.accounts.ListLedgerEntries(
        account_pb2.ListLedgerEntriesRequest(account_id=account_id, page_size=4)
    )
    assert len(page.entries) == 4 and page.next_page_token
    rest = await durable.accounts.ListLedgerEntries(
        account_pb2.ListLedgerEntriesRequest(
            account_id=account_id, page_size=4, page_token=page.next_page_token
        )
    )
    assert [e.entry_id for e in page.entries] + [e.entry_id for e in rest.entries] == [
        e.entry_id for e in listing.entries
    ]
    assert not rest.next_page_token
    refunds = await durable.accounts.ListLedgerEntries(
        account_pb2.ListLedgerEntriesRequest(account_id=account_id, types=["refund", "charge"])
    )
    assert [e.type for e in refunds.entries] == ["refund", "charge"]
    with pytest.raises(grpc.aio.AioRpcError) as bad:
        await durable.accounts.ListLedgerEntries(
            account_pb2.ListLedgerEntriesRequest(account_id=account_id, types=["nonsense"])
        )
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "types" in (bad.value.details() or "")


async def test_rows_are_deduplicated_on_the_event_id(durable: Running) -> None:
    """Proves writing the same events twice, even under other stream ids (a rebuilt
    stream), adds no row."""
    account_id = unique()
    await traffic(durable, account_id)
    store = durable.authority.store
    stream = store.keys.events(store.keys.shard_of(account_id))
    raw = await store.redis.xrange(stream)
    shard = store.keys.shard_of(account_id)
    events = [decode(shard, sid, fields) for sid, fields in raw]
    ledger = durable.authority.ledger
    await ledger.write_batch(events)
    count = await ledger.count_entries()
    again = await ledger.write_batch(events)
    renamed = [decode(shard, f"9999999999999-{i}", fields) for i, (_, fields) in enumerate(raw)]
    rebuilt = await ledger.write_batch(renamed)
    assert (again, rebuilt) == (0, 0)
    assert await ledger.count_entries() == count
    mine = await ledger.entries(account_id)
    assert [e.type for e in mine] == [
        "plan_change", "allotment", "reserve", "commit", "refund", "charge"
    ]


async def test_streams_are_trimmed_only_up_to_what_the_ledger_committed(
    durable: Running,
) -> None:
    """Proves an entry read by a flusher but not yet acknowledged survives a trim,
    and that acknowledged entries are trimmed away."""
    account_id = unique()
    await traffic(durable, account_id)
    store = durable.authority.store
    flusher = durable.authority.flusher
    shard = store.keys.shard_of(account_id)
    stream = store.keys.events(shard)
    await flusher.flush_shard(shard)
    await durable.quota.Charge(
        quota_pb2.ChargeRequest(
            account_id=account_id, operation="image.upscale", quantity=1, idempotency_key="c9"
        )
    )
    # A flusher that died after reading: the entry is pending, not in the ledger.
    pending = await store.redis.xreadgroup(GROUP, "dead-flusher", {stream: ">"}, count=10)
    pending_ids = [sid for _, messages in pending for sid, _ in messages]
    assert pending_ids
    await flusher._trim(shard)
    survivors = {sid for sid, _ in await store.redis.xrange(stream)}
    assert set(pending_ids) <= survivors
    await flusher.flush_shard(shard, steal=True)
    entries = await durable.authority.ledger.entries(account_id)
    assert entries[-1].type == "charge" and entries[-1].idempotency_key == "c9"
    assert await store.redis.xlen(stream) <= 1


def test_sqlite_ledger_runs_wal_with_synchronous_full(tmp_path: object) -> None:
    """Proves the SQLite ledger is in WAL mode with synchronous=FULL."""
    ledger = open_ledger(f"sqlite:///{tmp_path}/l.sqlite3")
    assert isinstance(ledger, SqliteLedger)
    ledger.migrate(applied_at_ms=T0_MS)
    assert ledger.pragma("journal_mode") == "wal"
    assert ledger.pragma("synchronous") == "2"  # FULL
    ledger.close()


def test_migrations_apply_once(ledger_url: str) -> None:
    """Proves migrations are versioned and a second run applies nothing."""
    ledger = open_ledger(ledger_url)
    first = ledger.migrate(applied_at_ms=T0_MS)
    second = ledger.migrate(applied_at_ms=T0_MS)
    assert first == list(range(1, LATEST_VERSION + 1)) and second == []
    assert ledger.schema_version() == LATEST_VERSION
    ledger.close()


async def test_verify_is_clean_and_recover_rebuilds_a_wiped_redis(
    own_redis: RedisProcess, ledger_url: str
) -> None:
    """Proves verify finds no difference after traffic, and that after FLUSHALL
    recovery restores every balance, open hold and idempotency record exactly."""
    running = await start_running(own_redis.url, ledger_url=ledger_url, **SLOW_FLUSH)
    account_id = unique()
    try:
        await traffic(running, account_id)
        open_hold = await running.quota.Reserve(
            quota_pb2.ReserveRequest(
                account_id=account_id, operation="image.upscale", quantity=2,
                idempotency_key="open",
            )
        )
        before = await running.quota.GetBalance(quota_pb2.GetBalanceRequest(account_id=account_id))
        authority = running.authority
        report = await recovery.verify(
            StateImages.of(authority.store), authority.ledger,
            authority.flusher, lambda _: None,
        )
        assert report.differences == []
    finally:
        await stop_running(running)
    wipe = aioredis.Redis.from_url(own_redis.url)
    await wipe.flushall()
    await wipe.aclose()
    with pytest.raises(RuntimeError, match="behind the ledger"):
        await start_running(own_redis.url, ledger_url=ledger_url, **SLOW_FLUSH)
    running = await start_running(
        own_redis.url, ledger_url=ledger_url, recover_on_start="true", **SLOW_FLUSH
    )
    try:
        after = await running.quota.GetBalance(quota_pb2.GetBalanceRequest(account_id=account_id))
        assert after.SerializeToString() == before.SerializeToString()
        replay = await running.quota.Reserve(
            quota_pb2.ReserveRequest(
                account_id=account_id, operation="image.upscale", quantity=2,
                idempotency_key="open",
            )
        )
        assert replay.replayed and replay.reservation_id == open_hold.reservation_id
        commit = await running.quota.Commit(
            quota_pb2.CommitRequest(reservation_id=open_hold.reservation_id)
        )
        assert commit.units_charged == 20
        authority = running.authority
        report = await recovery.verify(
            StateImages.of(authority.store), authority.ledger,
            authority.flusher, lambda _: None,
        )
        assert report.differences == []
    finally:
        await stop_running(running)


async def test_verify_reports_a_tampered_balance(durable: Running) -> None:
    """Proves verify catches a Redis balance that no longer matches the ledger."""
    account_id = unique()
    await traffic(durable, account_id)
    authority = durable.authority
    await authority.flusher.flush_all()
    store = authority.store
    key = store.keys.account_keys(account_id)[0]
    import msgpack

    acct = msgpack.unpackb(await store.redis.get(key), raw=False, strict_map_key=False)
    acct["total_charged"] += 1
    await store.redis.set(key, msgpack.packb(acct))
    report = await recovery.verify(
        StateImages.of(store), authority.ledger, authority.flusher, lambda _: None
    )
    assert any(d.account_id == account_id and d.what == "total_charged" for d in report.differences)


async def test_open_ledger_rejects_unknown_schemes() -> None:
    """Proves a ledger URL of an unknown kind is refused with a clear message."""
    with pytest.raises(ValueError, match="sqlite"):
        open_ledger("mysql://x")
    assert app.is_loopback("127.0.0.1:1")


async def test_flushed_entries_are_kept_for_the_stream_retention(
    own_redis: RedisProcess, ledger_url: str
) -> None:
    """Proves flushed entries younger than --stream-retention stay in the stream (for
    watches to resume from) while the ledger has them all."""
    running = await start_running(own_redis.url, ledger_url=ledger_url, flush_interval="1h",
                                  stream_retention="1h")
    try:
        account_id = unique()
        await traffic(running, account_id)
        store = running.authority.store
        stream = store.keys.events(store.keys.shard_of(account_id))
        await running.authority.flusher.flush_all()
        assert await store.redis.xlen(stream) >= 6
        entries = await running.authority.ledger.entries(account_id)
        assert len(entries) == 6
    finally:
        await stop_running(running)


async def test_money_in_is_durable_behind_a_backlog_longer_than_one_pass(
    own_redis: RedisProcess, ledger_url: str
) -> None:
    """Proves a purchase behind a backlog of more entries than one flush pass takes
    is still in the ledger when it is acknowledged."""
    running = await start_running(own_redis.url, ledger_url=ledger_url, flush_batch="1",
                                  **SLOW_FLUSH)
    try:
        account_id = unique()
        await running.accounts.CreateAccount(
            account_pb2.CreateAccountRequest(account_id=account_id, monthly_allotment=100_000)
        )
        for i in range(30):
            await running.quota.Charge(quota_pb2.ChargeRequest(
                account_id=account_id, operation="image.upscale", quantity=1,
                idempotency_key=f"c{i}"))
        await running.accounts.PurchaseUnits(account_pb2.PurchaseUnitsRequest(
            account_id=account_id, units=777, idempotency_key="p"))
        rows = await running.authority.ledger.entries(account_id, types=["purchase"])
        assert [r.units for r in rows] == [777]
    finally:
        await stop_running(running)


async def test_a_read_by_another_flusher_during_a_trim_is_never_trimmed(
    durable: Running,
) -> None:
    """Proves the trim cannot drop entries another flusher reads while the trim runs:
    they stay until written, and a third flusher finishes them after the reader dies."""
    from typing import Any

    from tally.ledger.flusher import Flusher, FlusherSettings

    account_id = unique()
    await traffic(durable, account_id)
    authority = durable.authority
    shard = authority.store.keys.shard_of(account_id)
    stream = authority.store.keys.events(shard)
    settings = FlusherSettings(stream_retention_ms=0, claim_idle_ms=0)
    reader = EventStreams(authority.store.redis, authority.store.keys)
    read: list[Any] = []

    class ReadsDuringTrim:
        """The trimming flusher's Redis: another flusher reads right after the trim's
        first look at the group (its pending entries or its position, whichever the
        trim asks first), i.e. between the two."""

        def __getattr__(self, name: str) -> Any:
            return getattr(authority.store.redis, name)

        async def _then_read(self, name: str, *args: Any, **kwargs: Any) -> Any:
            answer = await getattr(authority.store.redis, name)(*args, **kwargs)
            if not read:
                delivery = await reader.take(shard, "reader-that-dies", 100, 10**9)
                read.extend((event.stream_id.encode(), event) for event in delivery.entries)
            return answer

        async def xpending(self, *args: Any, **kwargs: Any) -> Any:
            return await self._then_read("xpending", *args, **kwargs)

        async def xinfo_groups(self, *args: Any, **kwargs: Any) -> Any:
            return await self._then_read("xinfo_groups", *args, **kwargs)

    trimmer = Flusher(EventStreams(ReadsDuringTrim(), authority.store.keys), authority.ledger,
                      settings, consumer="trimmer")
    await trimmer._trim(shard)
    assert read, "the other flusher read nothing"
    kept = {sid for sid, _ in await authority.store.redis.xrange(stream)}
    assert {sid for sid, _ in read} <= kept
    rescuer = Flusher(EventStreams(authority.store.redis, authority.store.keys),
                      authority.ledger, settings, consumer="rescuer")
    await rescuer.flush_shard(shard)
    entries = await authority.ledger.entries(account_id)
    assert [e.seq for e in entries] == list(range(1, 7))


async def test_recover_keeps_closed_reservations_only_for_their_retention(
    own_redis: RedisProcess, ledger_url: str
) -> None:
    """Proves recovery leaves a closed reservation past its closed window in the ledger
    (not in Redis), still refundable for what is left of its retention, and not one
    whose retention has passed."""
    settings = {**SLOW_FLUSH, "reservation_retention": "10d"}
    running = await start_running(own_redis.url, ledger_url=ledger_url, **settings)
    account_id = unique()
    try:
        await running.accounts.CreateAccount(
            account_pb2.CreateAccountRequest(account_id=account_id, monthly_allotment=1000)
        )
        old = await running.quota.Charge(quota_pb2.ChargeRequest(
            account_id=account_id, operation="image.upscale", quantity=1, idempotency_key="old"))
        running.clock.advance(9 * 86_400_000)
        recent = await running.quota.Charge(quota_pb2.ChargeRequest(
            account_id=account_id, operation="image.upscale", quantity=1,
            idempotency_key="recent"))
        now_ms = running.clock.now_ms()
    finally:
        await stop_running(running)
    wipe = aioredis.Redis.from_url(own_redis.url)
    await wipe.flushall()
    await wipe.aclose()
    running = await start_running(own_redis.url, now_ms=now_ms + 2 * 86_400_000,
                                  ledger_url=ledger_url, recover_on_start="true", **settings)
    try:
        key = running.authority.store.keys.reservation(recent.reservation_id)
        assert await running.authority.store.redis.pttl(key) == -2  # no such key
        refunded = await running.quota.Refund(quota_pb2.RefundRequest(
            reservation_id=recent.reservation_id, idempotency_key="f1"))
        assert refunded.units_refunded == 10
        with pytest.raises(grpc.aio.AioRpcError) as gone:
            await running.quota.Refund(quota_pb2.RefundRequest(
                reservation_id=old.reservation_id, idempotency_key="f2"))
        assert gone.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        await stop_running(running)


async def test_snapshot_figures_are_the_balance_the_scripts_report(durable: Running) -> None:
    """Proves a snapshot's figures (available from the scripts, the rest from the image)
    are the balance GetBalance reports and what the balance formula gives for the image,
    with overage used and held and grants left at once (the case the formula is for)."""
    account_id = unique()
    await durable.accounts.CreateAccount(account_pb2.CreateAccountRequest(
        account_id=account_id, monthly_allotment=10,
        overage_policy=common_pb2.OVERAGE_POLICY_ALLOW, overage_limit=1000,
    ))
    spend = {"account_id": account_id, "operation": "image.upscale"}
    await durable.quota.Charge(quota_pb2.ChargeRequest(**spend, quantity=5, idempotency_key="c"))
    held = await durable.quota.Reserve(
        quota_pb2.ReserveRequest(**spend, quantity=2, idempotency_key="r")
    )
    await durable.accounts.PurchaseUnits(account_pb2.PurchaseUnitsRequest(
        account_id=account_id, units=7, idempotency_key="p"
    ))
    balance = (await durable.quota.GetBalance(
        quota_pb2.GetBalanceRequest(account_id=account_id)
    )).balance
    assert balance.overage_used > 0 and balance.overage_held > 0 and balance.grants
    assert held.reservation_id
    await durable.authority.flusher.flush_all()
    snapshot_id = await durable.authority.flusher.snapshot("test")
    ledger = durable.authority.ledger.backend
    with ledger.reading() as cur:
        cur.execute(
            "SELECT available, held, granted_total, charged_total, refunded_total, "
            "expired_total, state FROM snapshot_balances WHERE snapshot_id = ? "
            "AND account_id = ?",
            (snapshot_id, account_id),
        )
        row = cur.fetchone()
    assert tuple(row[:6]) == (
        balance.available, balance.held, balance.units_granted_total,
        balance.units_charged_total, balance.units_refunded_total, balance.units_expired_total,
    )
    image = msgpack.unpackb(bytes(row[6]), raw=False, strict_map_key=False)
    remaining = sum(g["remaining"] for g in image["grants"])
    assert row[0] == remaining - image["overage_used"] - image["overage_held"]
