"""ReserveBatch, CommitBatch and RefundBatch against the real server: each item is
exactly its single RPC (balances, ledger rows, usage and answers), with its own
status; a bad item changes nothing and the others proceed; the bounds hold."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
import pytest_asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tally import metrics
from tally.domain.limits import BATCH_ITEMS_MAX
from tally.ledger import recovery
from tally.store.state_images import StateImages
from tally_client.v1 import account_pb2, common_pb2, quota_pb2
from tests.support import RedisProcess, Running, start_running, stop_running, unique

OK = 0
INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT.value[0]
NOT_FOUND = grpc.StatusCode.NOT_FOUND.value[0]
RESOURCE_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION.value[0]


@pytest_asyncio.fixture
async def durable(own_redis: RedisProcess, tmp_path: Any) -> AsyncIterator[Running]:
    """An authority on a private Redis (16 shards) and a fresh SQLite ledger."""
    running = await start_running(
        own_redis.url, ledger_url=f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
    )
    yield running
    await stop_running(running)


async def create(running: Running, allotment: int = 1000, prefix: str = "acct") -> str:
    account_id = unique(prefix)
    await running.accounts.CreateAccount(
        account_pb2.CreateAccountRequest(account_id=account_id, monthly_allotment=allotment)
    )
    return account_id


def reserve_item(account_id: str, key: str, quantity: int = 1,
                 operation: str = "image.upscale") -> quota_pb2.ReserveRequest:
    return quota_pb2.ReserveRequest(
        account_id=account_id, operation=operation, quantity=quantity, idempotency_key=key,
        labels={"model": "m1"},
    )


async def balance(running: Running, account_id: str) -> common_pb2.Balance:
    return (await running.quota.GetBalance(
        quota_pb2.GetBalanceRequest(account_id=account_id))).balance


def balance_figures(b: common_pb2.Balance) -> tuple[Any, ...]:
    """What a balance says, without ids or times."""
    return (b.available, b.held, b.period_consumed, b.overage_used,
            [(g.kind, g.units_granted, g.units_remaining) for g in b.grants])


async def ledger_rows(running: Running, account_id: str) -> list[tuple[Any, ...]]:
    """The account's ledger entries (flushed first), without ids or times."""
    await running.authority.flusher.flush_all()
    entries = (await running.accounts.ListLedgerEntries(
        account_pb2.ListLedgerEntriesRequest(account_id=account_id))).entries
    return [(e.type, e.operation, e.quantity, e.units, e.available_after, dict(e.labels),
             e.idempotency_key) for e in entries]


async def usage(running: Running, account_id: str) -> list[tuple[Any, ...]]:
    counters = await running.authority.store.usage(
        account_id, (await balance(running, account_id)).period_start.ToMilliseconds(), None
    )
    return sorted((u.operation, u.units, u.quantity, u.count) for u in counters)


# An item of a generated workload: (account index, quantity, commit quantity or None
# to refund the hold instead, whether to replay the reserve under the same key).
Step = tuple[int, int, int | None, bool]
STEPS = st.lists(
    st.tuples(st.integers(0, 2), st.integers(1, 40), st.one_of(st.none(), st.integers(0, 40)),
              st.booleans()),
    min_size=1, max_size=12,
)


async def reserve_all(running: Running, items: list[quota_pb2.ReserveRequest],
                      batched: bool) -> list[quota_pb2.ReserveBatchResult]:
    """The reserves as one ReserveBatch, or one Reserve each, as batch results."""
    if batched:
        return list((await running.quota.ReserveBatch(
            quota_pb2.ReserveBatchRequest(items=items))).results)
    results = []
    for item in items:
        try:
            response = await running.quota.Reserve(item)
            results.append(quota_pb2.ReserveBatchResult(
                status=common_pb2.BatchItemStatus(code=OK), response=response))
        except grpc.aio.AioRpcError as error:
            results.append(quota_pb2.ReserveBatchResult(
                status=common_pb2.BatchItemStatus(code=error.code().value[0])))
    return results


async def finish_all(running: Running, commits: list[quota_pb2.CommitRequest],
                     refunds: list[quota_pb2.RefundRequest], batched: bool) -> None:
    """The commits, then the refunds: as batches, or one call each."""
    quota = running.quota
    if batched:
        if commits:
            await quota.CommitBatch(quota_pb2.CommitBatchRequest(items=commits))
        if refunds:
            await quota.RefundBatch(quota_pb2.RefundBatchRequest(items=refunds))
        return
    for commit in commits:
        await quota.Commit(commit)
    for refund in refunds:
        await quota.Refund(refund)


async def play(
    running: Running, accounts: list[str], steps: list[Step], batched: bool
) -> list[int]:
    """Every reserve (and the replays), then every commit, then every refund; as three
    batches or as the same calls one by one, in the same order."""
    items = [reserve_item(accounts[who], f"k{i}", q) for i, (who, q, _, _) in enumerate(steps)]
    replays = [reserve_item(accounts[w], f"k{i}", q)
               for i, (w, q, _, again) in enumerate(steps) if again]
    reserved = await reserve_all(running, items + replays, batched)
    codes = [result.status.code for result in reserved]
    commits, refunds = [], []
    for i, ((_, quantity, commit, _), result) in enumerate(zip(steps, reserved, strict=False)):
        if result.status.code != OK:
            continue
        rid = result.response.reservation_id
        if commit is None:
            refunds.append(quota_pb2.RefundRequest(reservation_id=rid, idempotency_key=f"r{i}"))
        else:
            commits.append(quota_pb2.CommitRequest(reservation_id=rid,
                                                   quantity=min(commit, quantity)))
    await finish_all(running, commits, refunds, batched)
    return codes


async def state(running: Running, account_id: str) -> tuple[Any, ...]:
    return (balance_figures(await balance(running, account_id)),
            await ledger_rows(running, account_id), await usage(running, account_id))


async def compare(running: Running, steps: list[Step]) -> None:
    singles = [await create(running, allotment=100, prefix="one") for _ in range(3)]
    batched = [await create(running, allotment=100, prefix="many") for _ in range(3)]
    assert await play(running, singles, steps, False) == await play(running, batched, steps, True)
    for one, many in zip(singles, batched, strict=True):
        assert await state(running, one) == await state(running, many)


@pytest.mark.timeout(300)
def test_a_batch_moves_what_the_same_items_one_by_one_move(redis_server: RedisProcess) -> None:
    """Proves, for generated workloads (reserves, partial commits, refunds, replays under
    the same key, units running out) on three accounts, that the batch RPCs leave the
    same balances, ledger rows and usage counters as the same calls made one by one.
    One authority on an event loop of its own serves every example."""
    loop = asyncio.new_event_loop()
    running = loop.run_until_complete(start_running(redis_server.url))
    try:

        @settings(max_examples=6, deadline=None,
                  suppress_health_check=[HealthCheck.too_slow])
        @given(steps=STEPS)
        def check(steps: list[Step]) -> None:
            loop.run_until_complete(compare(running, steps))

        check()
    finally:
        loop.run_until_complete(stop_running(running))
        loop.close()


async def test_retrying_a_whole_batch_replays_every_item(durable: Running) -> None:
    """Proves a ReserveBatch, CommitBatch and RefundBatch sent twice with the same keys
    answer the same reservations the second time, replayed, and move nothing more."""
    accounts = [await create(durable) for _ in range(4)]
    items = [reserve_item(a, f"k-{i}", 2) for i, a in enumerate(accounts * 2)]
    first = (await durable.quota.ReserveBatch(quota_pb2.ReserveBatchRequest(items=items))).results
    again = (await durable.quota.ReserveBatch(quota_pb2.ReserveBatchRequest(items=items))).results
    assert [r.status.code for r in [*first, *again]] == [OK] * 16
    assert [r.response.replayed for r in first] == [False] * 8
    assert [r.response.replayed for r in again] == [True] * 8
    assert [r.response.reservation_id for r in again] == [r.response.reservation_id for r in first]
    rids = [r.response.reservation_id for r in first]
    commits = quota_pb2.CommitBatchRequest(
        items=[quota_pb2.CommitRequest(reservation_id=rid) for rid in rids[:4]])
    refunds = quota_pb2.RefundBatchRequest(
        items=[quota_pb2.RefundRequest(reservation_id=rid, idempotency_key=f"r{i}")
               for i, rid in enumerate(rids)])
    for _ in range(2):
        committed = (await durable.quota.CommitBatch(commits)).results
        refunded = (await durable.quota.RefundBatch(refunds)).results
    assert [(r.status.code, r.response.replayed, r.response.units_charged)
            for r in committed] == [(OK, True, 20)] * 4
    assert [(r.status.code, r.response.replayed) for r in refunded] == [(OK, True)] * 8
    for account_id in accounts:
        b = await balance(durable, account_id)
        assert (b.available, b.held, b.period_consumed) == (1000, 0, 0)


async def test_partial_failures_leave_the_other_items_applied(durable: Running) -> None:
    """Proves one batch across shards and accounts where one item lacks units, one names
    an unknown account, one has a bad field and one a bad reservation id: those items
    carry their own status (naming items[i].<field>, with the shortfall) and change
    nothing, and every other item is applied."""
    rich, poor = await create(durable, 1000), await create(durable, 5)
    others = [await create(durable, 1000) for _ in range(6)]
    items = [
        reserve_item(rich, "a", 3),
        reserve_item(poor, "b", 1),  # 10 units: more than 5
        reserve_item(unique("ghost"), "c", 1),
        reserve_item(rich, "d", 1, operation="Not An Operation"),
        *[reserve_item(a, f"o{i}", 2) for i, a in enumerate(others)],
    ]
    results = (await durable.quota.ReserveBatch(quota_pb2.ReserveBatchRequest(items=items))).results
    codes = [r.status.code for r in results]
    assert codes == [OK, RESOURCE_EXHAUSTED, NOT_FOUND, INVALID_ARGUMENT] + [OK] * 6
    short = results[1].status
    assert short.field == "items[1].account_id" or short.field.startswith("items[1]")
    assert (short.insufficient_units.available, short.insufficient_units.required) == (5, 10)
    assert results[2].status.field == "items[2].account_id"
    assert results[3].status.field == "items[3].operation"
    assert results[3].status.message.startswith("items[3].operation")
    assert (await balance(durable, rich)).held == 30
    assert (await balance(durable, poor)).held == 0
    for account_id in others:
        assert (await balance(durable, account_id)).held == 20
    commits = [quota_pb2.CommitRequest(reservation_id=results[0].response.reservation_id,
                                       quantity=5),  # more than the 3 reserved
               quota_pb2.CommitRequest(reservation_id="not-a-reservation"),
               *[quota_pb2.CommitRequest(reservation_id=r.response.reservation_id)
                 for r in results[4:]]]
    committed = (await durable.quota.CommitBatch(
        quota_pb2.CommitBatchRequest(items=commits))).results
    assert [r.status.code for r in committed] == [INVALID_ARGUMENT, INVALID_ARGUMENT] + [OK] * 6
    assert committed[0].status.field == "items[0].quantity"
    assert committed[1].status.field == "items[1].reservation_id"
    assert (await balance(durable, rich)).held == 30
    for account_id in others:
        assert (await balance(durable, account_id)).period_consumed == 20


async def _batch_refused(call: Any, request: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(request)
    return caught.value


async def test_batch_size_bounds(durable: Running) -> None:
    """Proves a batch of BATCH_ITEMS_MAX items is served, one more is INVALID_ARGUMENT
    naming `items` (nothing moves), and an empty batch is INVALID_ARGUMENT."""
    assert BATCH_ITEMS_MAX == 1000
    accounts = [await create(durable, 100_000) for _ in range(10)]
    items = [reserve_item(accounts[i % 10], f"k{i}") for i in range(BATCH_ITEMS_MAX + 1)]
    error = await _batch_refused(durable.quota.ReserveBatch,
                                 quota_pb2.ReserveBatchRequest(items=items))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "items" in (error.details() or "")
    assert (await balance(durable, accounts[0])).held == 0
    results = (await durable.quota.ReserveBatch(
        quota_pb2.ReserveBatchRequest(items=items[:BATCH_ITEMS_MAX]))).results
    assert [r.status.code for r in results] == [OK] * BATCH_ITEMS_MAX
    assert (await balance(durable, accounts[0])).held == 1000
    for call, request in ((durable.quota.ReserveBatch, quota_pb2.ReserveBatchRequest()),
                          (durable.quota.CommitBatch, quota_pb2.CommitBatchRequest()),
                          (durable.quota.RefundBatch, quota_pb2.RefundBatchRequest())):
        error = await _batch_refused(call, request)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "items" in (error.details() or "")
    commits = quota_pb2.CommitBatchRequest(items=[
        quota_pb2.CommitRequest(reservation_id=r.response.reservation_id) for r in results])
    committed = (await durable.quota.CommitBatch(commits)).results
    assert [r.status.code for r in committed] == [OK] * BATCH_ITEMS_MAX


async def test_the_flusher_writes_batch_events_and_verify_is_clean(durable: Running) -> None:
    """Proves the events of batch calls reach the ledger (one reserve, commit and
    refund row per item) and `verify` finds Redis and the ledger in agreement."""
    accounts = [await create(durable) for _ in range(5)]
    reserved = (await durable.quota.ReserveBatch(quota_pb2.ReserveBatchRequest(
        items=[reserve_item(a, f"k{i}", 2) for i, a in enumerate(accounts * 2)]))).results
    rids = [r.response.reservation_id for r in reserved]
    await durable.quota.CommitBatch(quota_pb2.CommitBatchRequest(
        items=[quota_pb2.CommitRequest(reservation_id=rid, quantity=1) for rid in rids]))
    await durable.quota.RefundBatch(quota_pb2.RefundBatchRequest(
        items=[quota_pb2.RefundRequest(reservation_id=rid, idempotency_key=f"r{i}", units=3)
               for i, rid in enumerate(rids[:5])]))
    rows = await ledger_rows(durable, accounts[0])
    assert [row[0] for row in rows] == [
        "plan_change", "allotment", "reserve", "reserve", "commit", "commit", "refund"]
    authority = durable.authority
    report = await recovery.verify(
        StateImages.of(authority.store), authority.ledger, authority.flusher, lambda _: None
    )
    assert report.differences == []


def units_counted(name: str, operation: str) -> float:
    value = metrics.REGISTRY.get_sample_value(name, {"operation": operation})
    return value or 0.0


async def test_units_are_counted_per_item_as_for_single_calls(durable: Running) -> None:
    """Proves the batch RPCs count units reserved, charged and refunded per item that
    succeeded and was not a replay, as the single RPCs do: failed items and a whole
    batch sent again add nothing."""
    operation = "image.upscale"  # 10 units per quantity
    names = ("tally_units_reserved_total", "tally_units_charged_total",
             "tally_units_refunded_total")
    before = [units_counted(name, operation) for name in names]
    account_id, poor = await create(durable, 1000), await create(durable, 5)
    items = [reserve_item(account_id, "a", 2), reserve_item(poor, "b", 1),
             reserve_item(account_id, "c", 3)]
    for _ in range(2):
        reserved = (await durable.quota.ReserveBatch(
            quota_pb2.ReserveBatchRequest(items=items))).results
    rids = [reserved[0].response.reservation_id, reserved[2].response.reservation_id]
    for _ in range(2):
        await durable.quota.CommitBatch(quota_pb2.CommitBatchRequest(
            items=[quota_pb2.CommitRequest(reservation_id=rid, quantity=1) for rid in rids]))
        await durable.quota.RefundBatch(quota_pb2.RefundBatchRequest(
            items=[quota_pb2.RefundRequest(reservation_id=rids[0], idempotency_key="r")]))
    after = [units_counted(name, operation) for name in names]
    assert [a - b for a, b in zip(after, before, strict=True)] == [50, 20, 10]


async def test_redis_at_maxmemory_makes_every_item_unavailable(durable: Running) -> None:
    """Proves that with Redis at maxmemory (write scripts refused before they run) a
    batch is answered item by item UNAVAILABLE, as each single call would be, and
    nothing moves; the same batch succeeds once Redis has room again."""
    accounts = [await create(durable) for _ in range(5)]
    items = [reserve_item(a, f"k{i}", 2) for i, a in enumerate(accounts)]
    redis = durable.authority.store.redis
    await redis.config_set("maxmemory", 1)
    try:
        refused = (await durable.quota.ReserveBatch(
            quota_pb2.ReserveBatchRequest(items=items))).results
    finally:
        await redis.config_set("maxmemory", 0)
    unavailable = grpc.StatusCode.UNAVAILABLE.value[0]
    assert [r.status.code for r in refused] == [unavailable] * 5
    for account_id in accounts:
        assert (await balance(durable, account_id)).held == 0
    served = (await durable.quota.ReserveBatch(quota_pb2.ReserveBatchRequest(items=items))).results
    assert [(r.status.code, r.response.replayed) for r in served] == [(OK, False)] * 5


async def test_a_batch_after_function_flush_loads_its_script_and_runs_once(
    durable: Running,
) -> None:
    """Proves a batch whose scripts Redis no longer has (FUNCTION FLUSH: every group
    meets "function not found", so none ran) loads them and runs each item exactly once."""
    accounts = [await create(durable) for _ in range(8)]
    await durable.authority.store.redis.function_flush()
    results = (await durable.quota.ReserveBatch(quota_pb2.ReserveBatchRequest(
        items=[reserve_item(a, f"k{i}", 1) for i, a in enumerate(accounts)]))).results
    assert [(r.status.code, r.response.replayed) for r in results] == [(OK, False)] * 8
    for account_id in accounts:
        assert (await balance(durable, account_id)).held == 10
