"""Soak (issue 9): mixed traffic from 256 concurrent callers on a private Redis with a
small maxmemory. No call is refused on the healthy Redis, Redis memory is flat once
the idempotency and closed-reservation windows have passed, and every account's books
match the exact tally the test keeps, by GetBalance and by the ledger.

The short form runs in `make test`; the long form runs with TALLY_SOAK_ROUNDS set
(e.g. `TALLY_SOAK_ROUNDS=40 .venv/bin/pytest -q tests/integration/test_soak.py`):
more rounds of the same traffic, whose records would fill maxmemory if they stayed."""

from __future__ import annotations

import asyncio
import os
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
from google.protobuf.duration_pb2 import Duration

from tally_client.v1 import account_pb2, account_pb2_grpc, quota_pb2, quota_pb2_grpc
from tests.guard_support import assert_books
from tests.support import RedisProcess, Running, start_running, stop_running

CALLERS = 256
ACCOUNTS = 16
ROUNDS = int(os.environ.get("TALLY_SOAK_ROUNDS", "3"))
# Room for the working set (accounts, one round's records and events); 40 rounds'
# records would not fit if they stayed.
MAXMEMORY = "24mb"
ALLOTMENT = 10**9
OPERATION = "image.upscale"
UNITS_PER_QUANTITY = 10  # its default price
PURCHASE_UNITS = 50
PARTIAL_REFUND_UNITS = 5
# Short windows: Redis expires records on its own clock, with the PX the scripts set.
# Redis drops a record when its PX runs out on Redis' real clock: the windows must be
# longer than a replay can take to follow its call under the load of a full test run.
WINDOWS = {"idempotency_window": "5s", "closed_reservation_window": "5s",
           "flush_interval": "200ms", "flush_claim_idle": "500ms", "stream_retention": "0s"}
WINDOW_MS = 5000
# What a round may leave in Redis once its windows have passed, as a part of what it
# brought: an account's grants and the stream's tail are a few percent. Beside it,
# Redis' own allocations move by tens of kilobytes from round to round (a stream
# node, a hash table's resize), whatever the traffic: far below a round's records
# (about 500 KB), which a leak would leave whole.
LEFT_BEHIND_PART = 10
ALLOCATION_SLACK_BYTES = 128 * 1024
POLL_BOUND_S = 60.0  # how long the test waits for Redis to expire keys (never a threshold)


class Tally:
    """The figures each account must show, kept by the test."""

    def __init__(self) -> None:
        self.granted: Counter[str] = Counter()
        self.charged: Counter[str] = Counter()
        self.refunded: Counter[str] = Counter()

    def available(self, account_id: str) -> int:
        return self.granted[account_id] - self.charged[account_id] + self.refunded[account_id]


async def story(quota: quota_pb2_grpc.QuotaServiceStub,
                accounts: account_pb2_grpc.AccountServiceStub,
                account_id: str, key: str, kind: int, tally: Tally) -> None:
    """One caller's calls: each kind of story, each with replays under its keys."""
    if kind == 0:  # Reserve, replayed; Commit, replayed
        reserve = quota_pb2.ReserveRequest(account_id=account_id, operation=OPERATION,
                                           quantity=1, idempotency_key=key)
        held = await quota.Reserve(reserve)
        again = await quota.Reserve(reserve)
        assert again.replayed and again.reservation_id == held.reservation_id
        commit = quota_pb2.CommitRequest(reservation_id=held.reservation_id)
        assert (await quota.Commit(commit)).units_charged == UNITS_PER_QUANTITY
        assert (await quota.Commit(commit)).replayed
        tally.charged[account_id] += UNITS_PER_QUANTITY
    elif kind == 1:  # Reserve 3, Extend, Commit 2 of them, Refund part, replayed
        held = await quota.Reserve(quota_pb2.ReserveRequest(
            account_id=account_id, operation=OPERATION, quantity=3, idempotency_key=key))
        await quota.Extend(quota_pb2.ExtendRequest(reservation_id=held.reservation_id,
                                                   ttl=Duration(seconds=120)))
        committed = await quota.Commit(quota_pb2.CommitRequest(
            reservation_id=held.reservation_id, quantity=2))
        assert (committed.units_charged, committed.units_released) == (
            2 * UNITS_PER_QUANTITY, UNITS_PER_QUANTITY)
        refund = quota_pb2.RefundRequest(reservation_id=held.reservation_id,
                                         units=PARTIAL_REFUND_UNITS,
                                         idempotency_key=f"{key}-refund")
        assert (await quota.Refund(refund)).units_refunded == PARTIAL_REFUND_UNITS
        assert (await quota.Refund(refund)).replayed
        tally.charged[account_id] += 2 * UNITS_PER_QUANTITY
        tally.refunded[account_id] += PARTIAL_REFUND_UNITS
    elif kind == 2:  # Charge, replayed; Refund in full
        charge = quota_pb2.ChargeRequest(account_id=account_id, operation=OPERATION,
                                         quantity=1, idempotency_key=key)
        charged = await quota.Charge(charge)
        assert (await quota.Charge(charge)).replayed
        refunded = await quota.Refund(quota_pb2.RefundRequest(
            reservation_id=charged.reservation_id, idempotency_key=f"{key}-refund"))
        assert refunded.units_refunded == UNITS_PER_QUANTITY
        tally.charged[account_id] += UNITS_PER_QUANTITY
        tally.refunded[account_id] += UNITS_PER_QUANTITY
    else:  # PurchaseUnits, replayed
        purchase = account_pb2.PurchaseUnitsRequest(account_id=account_id,
                                                    units=PURCHASE_UNITS, idempotency_key=key)
        bought = await accounts.PurchaseUnits(purchase)
        assert (await accounts.PurchaseUnits(purchase)).grant == bought.grant
        tally.granted[account_id] += PURCHASE_UNITS
    assert_books((await quota.GetBalance(
        quota_pb2.GetBalanceRequest(account_id=account_id))).balance)


async def traffic(address: str, ids: list[str], round_: int, tally: Tally) -> list[BaseException]:
    """One round: CALLERS callers at once, each one story; the calls' failures."""
    async with grpc.aio.insecure_channel(address) as channel:
        quota = quota_pb2_grpc.QuotaServiceStub(channel)
        accounts = account_pb2_grpc.AccountServiceStub(channel)
        results = await asyncio.gather(*(
            story(quota, accounts, ids[n % ACCOUNTS], f"soak-{round_}-{n}", n % 4, tally)
            for n in range(CALLERS)), return_exceptions=True)
    return [result for result in results if isinstance(result, BaseException)]


async def until(condition: Callable[[], Awaitable[bool]], what: str) -> None:
    """Waits for Redis to reach a state the test then asserts; fails if it never does."""
    loop = asyncio.get_running_loop()
    give_up = loop.time() + POLL_BOUND_S
    while not await condition():
        if loop.time() > give_up:
            raise AssertionError(f"never reached: {what}")
        await asyncio.sleep(0.05)


async def settled_memory(running: Running) -> tuple[int, int]:
    """(used_memory, keys) once this round's records have left Redis: events flushed
    and trimmed, the clock past both windows, Redis' PX run out."""
    redis = running.authority.store.redis
    await running.authority.flusher.flush_all(steal=True)
    running.clock.advance(2 * WINDOW_MS)

    async def records_gone() -> bool:
        # SCAN also expires what it meets whose PX has run out
        left = [key async for key in redis.scan_iter(match="tally:{*}:[ir]*:*", count=1000)]
        return not left

    await until(records_gone, "idempotency and closed reservation records expired")
    await running.authority.flusher.flush_all(steal=True)
    return await dataset_memory(running), int(await redis.dbsize())


async def dataset_memory(running: Running) -> int:
    """Redis' used_memory less its overheads: the server's pool keeps the connections
    a round of load opened, and their buffers are not data."""
    return int((await running.authority.store.redis.info("memory"))["used_memory_dataset"])


async def test_mixed_traffic_from_256_callers_is_never_refused_and_leaves_memory_flat(
    tmp_path: Path,
) -> None:
    """Proves, for ROUNDS rounds of 256 concurrent callers (Reserve, replayed Reserve,
    Commit, partial Commit, Extend, Refund, Charge, PurchaseUnits, GetBalance) on a Redis
    with a small maxmemory: no call fails (no UNAVAILABLE, RESOURCE_EXHAUSTED or
    INTERNAL); once the windows have passed Redis holds the same keys after every round
    and its memory does not grow with the rounds; every account's GetBalance and ledger
    rows show the test's own tally, and granted = available + held + charged - refunded
    + expired."""
    redis = RedisProcess(tmp_path / "redis", "--maxmemory", MAXMEMORY)
    redis.start()
    running = await start_running(redis.url, **WINDOWS)
    try:
        ids = [f"soak-{n:02d}" for n in range(ACCOUNTS)]
        tally = Tally()
        for account_id in ids:
            await running.accounts.CreateAccount(account_pb2.CreateAccountRequest(
                account_id=account_id, monthly_allotment=ALLOTMENT))
            tally.granted[account_id] += ALLOTMENT
        settled = [await settled_memory(running)]
        grown = []
        for round_ in range(ROUNDS):
            before = await dataset_memory(running)
            failures = await asyncio.to_thread(
                asyncio.run, traffic(running.authority.address, ids, round_, tally))
            assert failures == []
            grown.append(await dataset_memory(running) - before)
            settled.append(await settled_memory(running))
        # The same keys after every round, and what a round leaves in Redis is a small
        # part of what it brought (records left behind would be all of it): what stays
        # is the accounts' own growth (their purchases' grants, bounded by the live
        # grant limit) and the stream's trimmed tail.
        assert len({keys for _, keys in settled[1:]}) == 1
        for (then, _), (now, _), brought in zip(settled[1:-1], settled[2:], grown[1:],
                                                 strict=True):
            assert now - then < brought / LEFT_BEHIND_PART + ALLOCATION_SLACK_BYTES, (
                settled, grown)
        await check_books(running, ids, tally)
    finally:
        await stop_running(running)
        redis.stop()


async def check_books(running: Running, ids: list[str], tally: Tally) -> None:
    """GetBalance and the ledger show each account's tally (nothing held or expired)."""
    await running.authority.flusher.flush_all(steal=True)
    for account_id in ids:
        answer = await running.quota.GetBalance(
            quota_pb2.GetBalanceRequest(account_id=account_id))
        balance = answer.balance
        assert_books(balance)
        assert (balance.units_granted_total, balance.units_charged_total,
                balance.units_refunded_total, balance.units_expired_total, balance.held,
                balance.available) == (
            tally.granted[account_id], tally.charged[account_id], tally.refunded[account_id],
            0, 0, tally.available(account_id))
        units: dict[str, int] = defaultdict(int)
        rows = await running.authority.ledger.entries(account_id)
        last = rows[-1]
        while rows:
            for row in rows:
                units[row.type] += row.units
            last = rows[-1]
            rows = await running.authority.ledger.entries(account_id, after_seq=last.seq)
        assert (units["allotment"] + units["purchase"], units["commit"] + units["charge"],
                units["refund"]) == (tally.granted[account_id], tally.charged[account_id],
                                     tally.refunded[account_id]), dict(units)
        assert last.available_after == tally.available(account_id)
