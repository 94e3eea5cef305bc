"""WatchUsage against a real Redis and an in-process server: exactly once, in order,
resumable across flushes and trims, all accounts, stalled readers, bad requests."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, cast

import grpc
import pytest_asyncio
import redis.asyncio as aioredis

from tally import metrics
from tally.api.watch import POSITION_METADATA
from tally.config import MAX_WATCHERS
from tally_client.v1 import account_pb2, catalog_pb2, quota_pb2, usage_pb2
from tally_client.v1.usage_pb2_grpc import UsageServiceStub
from tests.guard_support import assert_status
from tests.support import RedisProcess, Running, start_running, stop_running, unique

if TYPE_CHECKING:
    from tally_client.v1.usage_pb2_grpc import UsageServiceAsyncStub

# The background flusher never runs on its own: tests flush (and so trim, with no
# retention) by hand.
SLOW_FLUSH = {"flush_interval": "1h", "snapshot_interval": "1h", "stream_retention": "0s"}
READ_TIMEOUT_S = 10.0
Watch = grpc.aio.UnaryStreamCall[usage_pb2.WatchUsageRequest, usage_pb2.WatchUsageResponse]


@pytest_asyncio.fixture
async def watched(own_redis: RedisProcess) -> AsyncIterator[Running]:
    """An authority on a private Redis (so trims are the test's own) with a manual flusher."""
    running = await start_running(own_redis.url, **SLOW_FLUSH)
    yield running
    await stop_running(running)


def usage(running: Running) -> UsageServiceAsyncStub:
    return cast(Any, UsageServiceStub(running.stubs.channel))


async def watch(running: Running, account_id: str = "", after: str = "") -> tuple[Watch, str]:
    """Opens a watch and waits until the server has positioned it; returns the call
    and the position it starts after."""
    call = usage(running).WatchUsage(
        usage_pb2.WatchUsageRequest(account_id=account_id, after_position=after)
    )
    metadata = await asyncio.wait_for(call.initial_metadata(), READ_TIMEOUT_S)
    return call, str(dict(metadata or ())[POSITION_METADATA])


async def take(call: Watch, count: int) -> list[usage_pb2.UsageEvent]:
    events = []
    for _ in range(count):
        reply = await asyncio.wait_for(call.read(), READ_TIMEOUT_S)
        assert reply is not grpc.aio.EOF, "the watch ended"
        events.append(cast(usage_pb2.WatchUsageResponse, reply).event)
    return events


async def take_until(call: Watch, position: int) -> list[usage_pb2.UsageEvent]:
    """Reads a single-account watch up to (and including) the event numbered `position`."""
    events: list[usage_pb2.UsageEvent] = []
    while not events or int(events[-1].position) < position:
        events.extend(await take(call, 1))
    return events


async def error_of(call: Watch) -> grpc.aio.AioRpcError:
    try:
        await asyncio.wait_for(call.read(), READ_TIMEOUT_S)
    except grpc.aio.AioRpcError as error:
        return error
    raise AssertionError("the watch should have been refused")


async def create(running: Running, account_id: str, allotment: int = 1_000_000) -> None:
    await running.accounts.CreateAccount(
        account_pb2.CreateAccountRequest(account_id=account_id, monthly_allotment=allotment)
    )


async def charge(running: Running, account_id: str, key: str, **labels: str) -> None:
    await running.quota.Charge(
        quota_pb2.ChargeRequest(
            account_id=account_id, operation="image.upscale", quantity=1,
            idempotency_key=key, labels=labels,
        )
    )


async def ledger_types(running: Running, account_id: str) -> list[tuple[int, str]]:
    """(n, type) of every event of the account, from the ledger after a full flush."""
    await running.authority.flusher.flush_all(steal=True)
    rows = await running.authority.ledger.entries(account_id, limit=100_000)
    return [(row.seq, row.type) for row in rows]


def numbered(events: list[usage_pb2.UsageEvent]) -> list[tuple[int, str]]:
    return [(int(e.position), e.type) for e in events]


def sent_from(source: str) -> float:
    value = metrics.REGISTRY.get_sample_value(
        "tally_watch_events_sent_total", {"source": source}
    )
    return value or 0.0


async def stream_ids(running: Running, account_id: str) -> set[str]:
    """The event ids of the account that the shard's Redis stream still holds."""
    redis: aioredis.Redis = running.authority.store.redis
    stream = running.authority.store.keys.account_keys(account_id)[3]
    entries = await redis.xrange(stream)
    return {
        fields[b"event_id"].decode()
        for _, fields in entries
        if fields.get(b"account_id") == account_id.encode()
    }


async def varied_traffic(running: Running, account_id: str, rounds: int) -> None:
    """Reserves, commits (partial), refunds, releases, charges and purchases, flushing
    (and so trimming the stream) now and then."""
    quota = running.quota
    for i in range(rounds):
        held = await quota.Reserve(
            quota_pb2.ReserveRequest(
                account_id=account_id, operation="image.upscale", quantity=4,
                idempotency_key=f"r{i}", labels={"round": str(i)},
            )
        )
        await quota.Commit(quota_pb2.CommitRequest(reservation_id=held.reservation_id, quantity=3))
        await quota.Refund(
            quota_pb2.RefundRequest(
                reservation_id=held.reservation_id, units=5, idempotency_key=f"f{i}"
            )
        )
        released = await quota.Reserve(
            quota_pb2.ReserveRequest(
                account_id=account_id, operation="image.vectorize", quantity=1,
                idempotency_key=f"x{i}",
            )
        )
        await quota.Refund(
            quota_pb2.RefundRequest(
                reservation_id=released.reservation_id, idempotency_key=f"xr{i}"
            )
        )
        await charge(running, account_id, f"c{i}", round=str(i))
        if i % 3 == 0:
            await running.accounts.PurchaseUnits(
                account_pb2.PurchaseUnitsRequest(
                    account_id=account_id, units=100, idempotency_key=f"p{i}"
                )
            )
        if i % 4 == 1:
            await running.authority.flusher.flush_all()


async def test_a_watcher_sees_every_event_once_in_order_during_traffic(watched: Running) -> None:
    """Proves a live watch delivers each of the account's events exactly once, numbered
    contiguously and typed as in the ledger, while traffic and flushes run alongside."""
    account_id = unique("watch")
    await create(watched, account_id)
    call, start = await watch(watched, account_id)
    assert start == "2"  # plan_change and allotment happened before the watch
    rounds = 12
    last = 2 + rounds * 6 + len(range(0, rounds, 3))  # six events a round, a purchase every 3rd
    reading = asyncio.create_task(take_until(call, last))
    try:
        await varied_traffic(watched, account_id, rounds)
        received = await reading
    finally:
        reading.cancel()
        call.cancel()
    expected = [item for item in await ledger_types(watched, account_id) if item[0] > 2]
    assert numbered(received) == expected
    types = {event.type for event in received}
    assert {"reserve", "commit", "refund", "release", "charge", "purchase"} <= types
    charged = next(e for e in received if e.type == "charge")
    assert charged.account_id == account_id
    assert charged.operation == "image.upscale"
    assert charged.units == 10
    assert dict(charged.labels) == {"round": "0"}
    assert charged.reservation_id
    assert charged.occurred_at.ToMilliseconds() == watched.clock.now_ms()
    assert charged.available_after > 0


async def test_resume_gives_exactly_the_missed_events_flushed_or_not(watched: Running) -> None:
    """Proves a watch resumed from the last position seen replays exactly the events after
    it: those flushed and trimmed from Redis from the ledger, the rest from Redis."""
    account_id = unique("resume")
    await create(watched, account_id)
    call, _ = await watch(watched, account_id, after="0")
    first = await take(call, 2)
    assert numbered(first) == [(1, "plan_change"), (2, "allotment")]
    call.cancel()

    for i in range(5):
        await charge(watched, account_id, f"a{i}")
    await watched.authority.flusher.flush_all()  # events 3..7: in the ledger, trimmed
    flushed = await stream_ids(watched, account_id)
    for i in range(3):
        await charge(watched, account_id, f"b{i}")  # events 8..10: in Redis only
    assert not any(f"{account_id}/{n}" in flushed for n in range(3, 7)), flushed
    ledger_before, redis_before = sent_from("ledger"), sent_from("redis")

    resumed, start = await watch(watched, account_id, after="2")
    assert start == "2"
    events = await take_until(resumed, 10)
    await charge(watched, account_id, "live")
    events.extend(await take(resumed, 1))
    resumed.cancel()
    assert numbered(events) == [(n, "charge") for n in range(3, 12)]
    assert sent_from("ledger") - ledger_before >= 4
    assert sent_from("redis") - redis_before >= 4

    replay, _ = await watch(watched, account_id, after="0")
    everything = await take_until(replay, 11)
    replay.cancel()
    assert numbered(everything) == await ledger_types(watched, account_id)


async def test_a_stalled_watcher_blocks_nothing_and_then_gets_everything(
    watched: Running,
) -> None:
    """Proves charges complete while a watcher reads nothing, and once it reads again it
    gets every event in order, catching up from the ledger what was trimmed meanwhile."""
    account_id = unique("stall")
    await create(watched, account_id)
    # A reader with a small, fixed receive window (no BDP growth): ~8 events fill it.
    channel = grpc.aio.insecure_channel(
        watched.authority.address, options=[("grpc.http2.bdp_probe", 0)]
    )
    try:
        stub = cast("UsageServiceAsyncStub", UsageServiceStub(channel))
        call = stub.WatchUsage(usage_pb2.WatchUsageRequest(account_id=account_id))
        start = int(dict(await call.initial_metadata() or ())[POSITION_METADATA])
        ledger_before, redis_before = sent_from("ledger"), sent_from("redis")
        big = {f"label{k:02d}": "v" * 240 for k in range(32)}  # ~8 KB per event
        for i in range(200):
            await charge(watched, account_id, f"s{i}", **big)
            if i % 50 == 49:
                await watched.authority.flusher.flush_all()
        assert sent_from("redis") - redis_before < 100  # the watcher is stalled
        assert len(await stream_ids(watched, account_id)) < 200  # trimmed meanwhile
        events = await take_until(call, start + 200)
        call.cancel()
    finally:
        await channel.close()
    assert [int(e.position) for e in events] == list(range(start + 1, start + 201))
    assert all(e.type == "charge" and len(e.labels) == 32 for e in events)
    assert sent_from("ledger") > ledger_before  # it fell behind the trims and caught up


async def test_all_accounts_watch_sees_every_account_and_prices(watched: Running) -> None:
    """Proves an all-accounts watch delivers the events of several accounts, each
    account's in order, and price changes, without reporting anything missed, and
    resumes from one of its positions with exactly the events after it."""
    call, start = await watch(watched)
    assert start
    accounts = [unique(f"all{k}") for k in range(4)]
    for account_id in accounts:
        await create(watched, account_id, allotment=100)
        await charge(watched, account_id, "c1")
    operation = f"test.watch-{unique('op')}"
    await watched.catalog.SetPrice(
        catalog_pb2.SetPriceRequest(operation=operation, units_per_quantity=7)
    )
    events = await take(call, 4 * 3 + 1)
    assert "fell_behind" not in [e.type for e in events]
    for account_id in accounts:
        mine = [e.type for e in events if e.account_id == account_id]
        assert mine == ["plan_change", "allotment", "charge"]
    prices = [e for e in events if e.type == "price_change"]
    assert [(p.account_id, p.operation, p.units) for p in prices] == [("", operation, 7)]
    assert prices[0].occurred_at.ToMilliseconds() == watched.clock.now_ms()
    positions = [e.position for e in events]
    assert len(set(positions)) == len(positions)

    # Charges only (no money-in flushes and trims): a resume from the last position
    # gets exactly them, in each account's order.
    for round_ in range(2):
        for account_id in accounts:
            await charge(watched, account_id, f"more{round_}")
    live = await take(call, 8)
    call.cancel()
    resumed, _ = await watch(watched, after=events[-1].position)
    rest = await take(resumed, 8)
    resumed.cancel()
    assert "fell_behind" not in [e.type for e in rest]
    for account_id in accounts:
        assert [e.type for e in rest if e.account_id == account_id] == ["charge", "charge"]
    assert sorted(e.available_after for e in rest) == sorted(e.available_after for e in live)


async def test_all_accounts_resume_from_a_trimmed_position_says_fell_behind(
    watched: Running,
) -> None:
    """Proves an all-accounts watch resumed from a position whose next entries were
    flushed and trimmed first sends one fell_behind event, then the entries Redis holds."""
    account_id = unique("behind")
    await create(watched, account_id)
    call, position = await watch(watched)
    call.cancel()
    for i in range(3):
        await charge(watched, account_id, f"t{i}")
    await watched.authority.flusher.flush_all()  # trims all but the newest entry
    await charge(watched, account_id, "after-trim")

    resumed, _ = await watch(watched, after=position)
    notice, *events = await take(resumed, 3)
    resumed.cancel()
    assert notice.type == "fell_behind"
    assert "missed" in notice.alert and "ledger" in notice.alert
    # The newest flushed entry is kept by the trim; then what came after it.
    assert [(e.account_id, e.type) for e in events] == [
        (account_id, "charge"), (account_id, "charge")
    ]
    assert [e.units for e in events] == [10, 10]

    again, _ = await watch(watched, after=notice.position)  # no second notice from there
    assert (await take(again, 1))[0].type == "charge"
    again.cancel()


async def test_bad_requests_are_refused_with_the_field_named(watched: Running) -> None:
    """Proves a malformed account id or position is INVALID_ARGUMENT naming the field, an
    unknown account NOT_FOUND, and a position beyond the account's history refused."""
    account_id = unique("bad")
    await create(watched, account_id)
    stub = usage(watched)

    def start(account: str, after: str = "") -> Watch:
        request = usage_pb2.WatchUsageRequest(account_id=account, after_position=after)
        return stub.WatchUsage(request)

    assert_status(
        await error_of(start("bad:id")), grpc.StatusCode.INVALID_ARGUMENT, "account_id"
    )
    assert_status(
        await error_of(start("x" * 200)), grpc.StatusCode.INVALID_ARGUMENT, "account_id"
    )
    assert_status(
        await error_of(start(account_id, "-1")), grpc.StatusCode.INVALID_ARGUMENT,
        "after_position",
    )
    assert_status(
        await error_of(start(account_id, "99")), grpc.StatusCode.INVALID_ARGUMENT,
        "after_position",
    )
    assert_status(
        await error_of(start("", "not-a-token")), grpc.StatusCode.INVALID_ARGUMENT,
        "after_position",
    )
    assert_status(await error_of(start(unique("ghost"))), grpc.StatusCode.NOT_FOUND)


async def test_watchers_beyond_the_limit_are_refused(watched: Running) -> None:
    """Proves a server runs at most MAX_WATCHERS watches at once and refuses the next
    with RESOURCE_EXHAUSTED, while charges still go through."""
    account_id = unique("many")
    await create(watched, account_id)
    calls = [usage(watched).WatchUsage(usage_pb2.WatchUsageRequest(account_id=account_id))
             for _ in range(MAX_WATCHERS)]
    try:
        await asyncio.gather(*(c.initial_metadata() for c in calls))
        extra = usage(watched).WatchUsage(usage_pb2.WatchUsageRequest(account_id=account_id))
        assert_status(await error_of(extra), grpc.StatusCode.RESOURCE_EXHAUSTED)
        await charge(watched, account_id, "still-works")
        assert (await take(calls[0], 1))[0].type == "charge"
    finally:
        for c in calls:
            c.cancel()


async def test_a_watch_whose_redis_goes_away_ends_unavailable(
    own_redis: RedisProcess,
) -> None:
    """Proves a watch ends with UNAVAILABLE (resume from the last position) when its
    Redis dies, rather than hanging or answering UNKNOWN."""
    running = await start_running(own_redis.url, **SLOW_FLUSH)
    try:
        account_id = unique("down")
        await create(running, account_id)
        call, _ = await watch(running, account_id, after="0")
        assert len(await take(call, 2)) == 2
        own_redis.kill()
        error = await error_of(call)
        assert_status(error, grpc.StatusCode.UNAVAILABLE)
        assert "resume" in (error.details() or "")
    finally:
        own_redis.start()
        await stop_running(running)
