"""Ledger reads and pruning on both backends: reads never wait for the writer's lock
nor hold it, usage is read in bounded pages, ListLedgerEntries and the watch never
skip an entry committed late, and the tables beside the entries are pruned at their
bounds without making recovery inexact."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator

import grpc
import msgpack
import pytest
import pytest_asyncio
import redis.asyncio as aioredis

from tally.api import reports
from tally.clock import ManualClock
from tally.domain.events import Entry, EntryImages, EntryType, IdempotencyImage, StreamEntry
from tally.ledger import recovery
from tally.ledger.backend import Retention, SqlLedger, open_ledger
from tally.ledger.ledger import Ledger
from tally.metrics import REGISTRY
from tally.store.state_images import StateImages
from tally_client.v1 import account_pb2, quota_pb2, usage_pb2, usage_pb2_grpc
from tests.support import T0_MS, RedisProcess, Running, start_running, stop_running, unique

SLOW_FLUSH = {"flush_interval": "1h", "snapshot_interval": "1h", "stream_retention": "0s"}
DAY_MS = 86_400_000
WAIT_S = 30  # only ever reached by a read or write that waits for the other (the bug)


def stream_entry(
    account_id: str, seq: int, *, kind: EntryType = EntryType.CHARGE, units: int = 1,
    images: EntryImages | None = None,
) -> StreamEntry:
    entry = Entry(
        entry_id=f"{account_id}/{seq}", account_id=account_id, seq=seq, type=kind,
        occurred_at_ms=T0_MS + seq, reservation_id="", operation="image.upscale", quantity=1,
        units=units, available_after=0, labels={}, idempotency_key="", detail={}, shard=0,
        fence=0,
    )
    return StreamEntry(f"{T0_MS}-{seq}", entry, images or EntryImages())


@pytest_asyncio.fixture
async def durable(own_redis: RedisProcess, ledger_url: str) -> AsyncIterator[Running]:
    running = await start_running(own_redis.url, ledger_url=ledger_url, **SLOW_FLUSH)
    yield running
    await stop_running(running)


@pytest_asyncio.fixture
async def bare(ledger_url: str) -> AsyncIterator[tuple[Ledger, ManualClock]]:
    """A migrated ledger with no server in front of it."""
    clock = ManualClock(T0_MS)
    ledger = Ledger(open_ledger(ledger_url), clock)
    await ledger.migrate()
    yield ledger, clock
    ledger.close()


# --- reads and the writer's lock ---------------------------------------------------


class HeldWrite:
    """A write transaction of the ledger's own writer, held open in another thread."""

    def __init__(self, backend: SqlLedger) -> None:
        self.backend = backend
        self.opened = threading.Event()
        self.release = threading.Event()
        self.thread = threading.Thread(target=self._hold)

    def _hold(self) -> None:
        with self.backend.transaction() as cur:
            cur.execute("DELETE FROM flush_positions WHERE shard < 0")  # takes the write lock
            self.opened.set()
            self.release.wait()

    def __enter__(self) -> HeldWrite:
        self.thread.start()
        self.opened.wait()
        return self

    def __exit__(self, *_: object) -> None:
        self.release.set()
        self.thread.join()


async def test_a_report_runs_while_a_write_transaction_is_open(durable: Running) -> None:
    """Proves an all-accounts usage report and a ledger page are answered while the
    ledger's writer holds a write transaction open (they do not wait for its lock)."""
    account_id = unique()
    await durable.accounts.CreateAccount(
        account_pb2.CreateAccountRequest(account_id=account_id, monthly_allotment=1000)
    )
    await durable.quota.Charge(quota_pb2.ChargeRequest(
        account_id=account_id, operation="image.upscale", quantity=2, idempotency_key="c"))
    await durable.authority.flusher.flush_all(steal=True)
    stub = usage_pb2_grpc.UsageServiceStub(durable.stubs.channel)
    start = usage_pb2.GetUsageReportRequest()
    start.start.FromMilliseconds(T0_MS // 3_600_000 * 3_600_000)
    with HeldWrite(durable.authority.ledger.backend):
        report = await stub.GetUsageReport(start, timeout=WAIT_S)
        page = await durable.accounts.ListLedgerEntries(
            account_pb2.ListLedgerEntriesRequest(account_id=account_id), timeout=WAIT_S
        )
    assert report.report.total_units == 20
    assert [e.type for e in page.entries][-1] == "charge"


async def test_a_write_commits_while_a_read_transaction_is_open(
    bare: tuple[Ledger, ManualClock],
) -> None:
    """Proves the flusher's write commits while a read transaction is open (and the
    reader keeps reading its own snapshot): a write never waits for a report."""
    ledger, _ = bare
    await ledger.write_batch([stream_entry("a", 1)])
    with ledger.backend.reading() as cur:
        cur.execute("SELECT COUNT(*) FROM ledger_entries")
        assert cur.fetchone()[0] == 1
        assert await asyncio.wait_for(ledger.write_batch([stream_entry("a", 2)]), WAIT_S) == 1
        cur.execute("SELECT COUNT(*) FROM ledger_entries")
        assert cur.fetchone()[0] == 1
    assert await ledger.count_entries() == 2


def page_samples() -> tuple[float, float]:
    count = REGISTRY.get_sample_value("tally_ledger_read_page_rows_count") or 0.0
    total = REGISTRY.get_sample_value("tally_ledger_read_page_rows_sum") or 0.0
    return count, total


@pytest.mark.parametrize(("charges", "pages"), [(6, 3), (7, 3)])
async def test_an_all_accounts_report_holds_one_page_of_entries_at_a_time(
    durable: Running, charges: int, pages: int
) -> None:
    """Proves an all-accounts report reads the ledger in pages of at most page_rows
    entries (at the bound: 6 entries are two full pages and an empty one) and still
    sums every entry."""
    authority = durable.authority
    paged = Ledger(authority.ledger.backend, durable.clock, page_rows=3)
    await paged.write_batch(
        [stream_entry(f"acct-{n % 2}", n + 1, units=10) for n in range(charges)]
    )
    request = usage_pb2.GetUsageReportRequest(group_by=["OPERATION"])
    request.start.FromMilliseconds(T0_MS // 3_600_000 * 3_600_000)
    count_before, rows_before = page_samples()
    report = await reports.usage_report(authority.store, paged, request)
    count_after, rows_after = page_samples()
    assert (count_after - count_before, rows_after - rows_before) == (pages, charges)
    assert report.total_units == 10 * charges and report.total_count == charges
    assert {row.account_id for row in report.rows} == {"acct-0", "acct-1"}


# --- entries committed late --------------------------------------------------------


async def list_page(
    running: Running, account_id: str, size: int, token: str = ""
) -> tuple[list[int], str]:
    reply = await running.accounts.ListLedgerEntries(account_pb2.ListLedgerEntriesRequest(
        account_id=account_id, page_size=size, page_token=token))
    return [int(e.entry_id.rsplit("/", 1)[1]) for e in reply.entries], reply.next_page_token


async def test_list_ledger_entries_never_skips_an_entry_committed_late(
    durable: Running,
) -> None:
    """Proves ListLedgerEntries serves an account's entries only up to the first one
    the ledger lacks (n + 1 committed before n), and that the token it gave serves n
    and n + 1 once n is committed."""
    ledger, account_id = durable.authority.ledger, unique()
    await ledger.write_batch([stream_entry(account_id, n) for n in (1, 2, 3, 5)])
    first, token = await list_page(durable, account_id, 2)
    assert first == [1, 2] and token
    assert await list_page(durable, account_id, 2, token) == ([3], "")
    await ledger.write_batch([stream_entry(account_id, 4)])
    late, following = await list_page(durable, account_id, 2, token)
    assert late == [3, 4] and following
    assert await list_page(durable, account_id, 2, following) == ([5], "")


async def test_a_missing_first_entry_serves_nothing(bare: tuple[Ledger, ManualClock]) -> None:
    """Proves an account whose entry 1 is not committed yet has no entry to serve,
    even when a type filter would skip entry 1."""
    ledger, _ = bare
    await ledger.write_batch([stream_entry("a", 2), stream_entry("a", 3)])
    assert await ledger.entries("a", types=[EntryType.CHARGE]) == []
    await ledger.write_batch([stream_entry("a", 1, kind=EntryType.PURCHASE)])
    charges = await ledger.entries("a", types=[EntryType.CHARGE])
    assert [e.seq for e in charges] == [2, 3]


# --- pruning -----------------------------------------------------------------------


def hold_image(state: str, closed_at_ms: int) -> bytes:
    return bytes(msgpack.packb({"state": state, "closed_at": closed_at_ms, "expires_at": 0}))


async def table_keys(ledger: Ledger, sql: str) -> list[object]:
    with ledger.backend.reading() as cur:
        cur.execute(sql)
        return [row[0] for row in cur.fetchall()]


async def test_snapshots_beyond_the_newest_kept_are_pruned(
    bare: tuple[Ledger, ManualClock],
) -> None:
    """Proves pruning keeps exactly the newest snapshots_kept snapshots with their
    balances: at the bound nothing goes, one more and the oldest goes."""
    ledger, _ = bare
    keep = Retention(snapshots_kept=2, reservation_retention_ms=DAY_MS, batch_rows=100)
    figures = {k: 0 for k in ("available", "held", "granted", "charged", "refunded", "expired")}
    balances = [("a", 1, figures, b"x"), ("b", 1, figures, b"y")]
    for _ in range(2):
        await ledger.snapshot("test", balances)
    assert (await ledger.prune(keep)).snapshots == 0
    await ledger.snapshot("test", balances)
    pruned = await ledger.prune(keep)
    assert (pruned.snapshots, pruned.snapshot_balances) == (1, 2)
    assert await table_keys(ledger, "SELECT snapshot_id FROM snapshots ORDER BY 1") == [2, 3]
    assert await table_keys(
        ledger, "SELECT DISTINCT snapshot_id FROM snapshot_balances ORDER BY 1") == [2, 3]


async def test_closed_reservations_are_pruned_once_their_retention_passed(
    bare: tuple[Ledger, ManualClock],
) -> None:
    """Proves a closed reservation's image stays while it can be refunded (until
    closed_at + reservation_retention) and goes at that instant; a held one stays."""
    ledger, clock = bare
    closed_at = T0_MS
    await ledger.write_batch([stream_entry("a", 1, images=EntryImages(holds={
        "closed": hold_image("COMMITTED", closed_at), "open": hold_image("HELD", 0)}))])
    keep = Retention(snapshots_kept=1, reservation_retention_ms=DAY_MS, batch_rows=100)
    clock.set(closed_at + DAY_MS - 1)
    assert (await ledger.prune(keep)).reservations == 0
    clock.set(closed_at + DAY_MS)
    assert (await ledger.prune(keep)).reservations == 1
    assert [row.key for row in await ledger.reservation_states()] == ["open"]


async def test_lapsed_idempotency_images_are_pruned_in_bounded_batches(
    bare: tuple[Ledger, ManualClock],
) -> None:
    """Proves an idempotency image stays until its expiry and goes at it, at most
    batch_rows per pass."""
    ledger, clock = bare
    await ledger.write_batch([
        stream_entry("a", n, images=EntryImages(idempotency=IdempotencyImage(
            f"k{n}", b"r", T0_MS + DAY_MS))) for n in (1, 2, 3)
    ])
    keep = Retention(snapshots_kept=1, reservation_retention_ms=DAY_MS, batch_rows=2)
    clock.set(T0_MS + DAY_MS - 1)
    assert (await ledger.prune(keep)).idempotency_records == 0
    clock.set(T0_MS + DAY_MS)
    assert (await ledger.prune(keep)).idempotency_records == 2
    assert (await ledger.prune(keep)).idempotency_records == 1
    assert await table_keys(ledger, "SELECT record_key FROM idempotency_states") == []


async def test_recovery_after_a_prune_is_exact(own_redis: RedisProcess, ledger_url: str) -> None:
    """Proves a ledger pruned past one reservation's retention still rebuilds a wiped
    Redis exactly: the same balance, the recent reservation refundable, the pruned one
    NOT_FOUND, and verify clean."""
    settings = {**SLOW_FLUSH, "reservation_retention": "10d"}
    running = await start_running(own_redis.url, ledger_url=ledger_url, **settings)
    account_id = unique()
    try:
        await running.accounts.CreateAccount(
            account_pb2.CreateAccountRequest(account_id=account_id, monthly_allotment=1000)
        )
        old = await running.quota.Charge(quota_pb2.ChargeRequest(
            account_id=account_id, operation="image.upscale", quantity=1, idempotency_key="old"))
        running.clock.advance(9 * DAY_MS)
        recent = await running.quota.Charge(quota_pb2.ChargeRequest(
            account_id=account_id, operation="image.upscale", quantity=1,
            idempotency_key="recent"))
        before = await running.quota.GetBalance(quota_pb2.GetBalanceRequest(account_id=account_id))
        now_ms = running.clock.now_ms() + 2 * DAY_MS
        authority = running.authority
        await authority.flusher.flush_all(steal=True)
        retention = authority.flusher.settings.retention
        assert retention is not None
        pruned = await Ledger(authority.ledger.backend, ManualClock(now_ms)).prune(retention)
        assert (pruned.reservations, pruned.idempotency_records) == (1, 2)
    finally:
        await stop_running(running)
    wipe = aioredis.Redis.from_url(own_redis.url)
    await wipe.flushall()
    await wipe.aclose()
    running = await start_running(own_redis.url, now_ms=now_ms, ledger_url=ledger_url,
                                  recover_on_start="true", **settings)
    try:
        after = await running.quota.GetBalance(quota_pb2.GetBalanceRequest(account_id=account_id))
        assert after.balance.available == before.balance.available
        assert after.balance.held == before.balance.held
        refunded = await running.quota.Refund(quota_pb2.RefundRequest(
            reservation_id=recent.reservation_id, idempotency_key="f1"))
        assert refunded.units_refunded == 10
        with pytest.raises(grpc.aio.AioRpcError) as gone:
            await running.quota.Refund(quota_pb2.RefundRequest(
                reservation_id=old.reservation_id, idempotency_key="f2"))
        assert gone.value.code() == grpc.StatusCode.NOT_FOUND
        authority = running.authority
        report = await recovery.verify(
            StateImages.of(authority.store), authority.ledger,
            authority.flusher, lambda _: None,
        )
        assert report.differences == []
    finally:
        await stop_running(running)
