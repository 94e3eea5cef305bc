"""Recovery and verification: Redis against the ledger.

`recover` writes back into Redis every account, reservation, idempotency
record and price whose Redis copy is missing or older than the ledger's
(by the per-account event sequence), as of the last flushed event.
Last, it starts a new fence epoch on every shard (store/lua/lib/fence.lua),
recorded in the ledger first: a server fenced off a shard whose Redis lost
writes passes again on its next call, and a Redis that later comes back older
than this recovery is refused.
`verify` compares the two after a flush, and audits the ledger against
itself: each account's totals must equal the sums of its entries.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tally.domain.events import EntryType, StreamEntry
from tally.domain.usage import Usage, from_entries, net
from tally.ledger.backend import StateRow, hold_closed_at
from tally.ledger.flusher import Flusher
from tally.ledger.ledger import Ledger
from tally.store.contract import FenceMark
from tally.store.state_images import StateImages, unpack_image
from tally.store.streams import EventStreams

Progress = Callable[[str], None]
VERIFY_ROUNDS_MAX = 5


@dataclass
class Difference:
    account_id: str
    what: str
    redis: str
    ledger: str


@dataclass
class Report:
    accounts: int = 0
    differences: list[Difference] = field(default_factory=list)


@dataclass
class RecoveryResult:
    accounts: int = 0
    reservations: int = 0
    idempotency_records: int = 0
    prices: int = 0
    quarantined: int = 0  # stream entries set aside as conflicting with the ledger


async def stale_accounts(images: StateImages, ledger: Ledger) -> list[str]:
    """Accounts whose Redis copy is missing or older than the ledger's."""
    states = await ledger.account_states()
    seqs = await images.account_seqs([s.account_id for s in states])
    return [s.account_id for s in states if seqs[s.account_id] < s.seq]


async def recover(
    images: StateImages, ledger: Ledger, now_ms: int, progress: Progress,
    retention_ms: int,
) -> RecoveryResult:
    """retention_ms: how long closed reservations stay (--reservation-retention)."""
    result = RecoveryResult()
    # accounts with an entry set aside hold the lost history in Redis: restored too
    diverged = await _quarantine_conflicts(EventStreams(images.redis, images.keys), ledger)
    result.quarantined = sum(len(entries) for entries in diverged.values())
    if result.quarantined:
        progress(f"{result.quarantined} stream entries conflict with the ledger: quarantined")
    states = await ledger.account_states()
    seqs = await images.account_seqs([s.account_id for s in states])
    stale = {s.account_id for s in states if seqs[s.account_id] < s.seq or s.account_id in diverged}
    progress(f"{len(states)} accounts in the ledger, {len(stale)} missing or behind in Redis")
    for index, state in enumerate(s for s in states if s.account_id in stale):
        await images.restore_account(state.account_id, state.state)
        await _rebuild_usage(images, ledger, state.account_id, unpack_image(state.state), now_ms)
        result.accounts += 1
        if (index + 1) % 1000 == 0:
            progress(f"  {index + 1} accounts restored")
    for row in await ledger.reservation_states():
        if row.account_id not in stale:
            continue
        if await _restore_reservation(images, row, now_ms, retention_ms):
            result.reservations += 1
    for row in await ledger.idempotency_states(now_ms):
        if row.account_id not in stale:
            continue
        await images.restore_idempotency(row.key, row.state, max(1, row.expires_at_ms - now_ms))
        result.idempotency_records += 1
    prices = await ledger.catalog_prices()
    await images.restore_catalog(prices)
    result.prices = len(prices)
    await images.restore_deployment()
    await _start_fence_epochs(images, ledger)
    progress(
        f"restored {result.accounts} accounts, {result.reservations} reservations, "
        f"{result.idempotency_records} idempotency records, {result.prices} prices"
    )
    return result


async def _quarantine_conflicts(
    streams: EventStreams, ledger: Ledger
) -> dict[str, list[StreamEntry]]:
    """Sets aside, per shard, every stream entry whose id the ledger holds with other
    content (Redis lost writes and reused the id) and every entry of the same account
    after it in the stream (they follow from it): kept in the ledger's quarantined_entries, then
    acknowledged and deleted from the stream. Returns them by account."""
    diverged: dict[str, list[StreamEntry]] = {}
    for shard in range(streams.keys.shards):
        entries = await streams.entries(shard)  # in stream order
        conflicting = {event.stream_id for event in await ledger.conflicting(entries)}
        from_here: set[str] = set()  # accounts past their first conflicting entry
        aside = []
        for event in entries:
            if event.stream_id in conflicting:
                from_here.add(event.entry.account_id)
            if event.entry.account_id in from_here:
                aside.append(event)
        if not aside:
            continue
        await ledger.quarantine(aside)
        await streams.set_aside(shard, [event.stream_id for event in aside])
        for event in aside:
            diverged.setdefault(event.entry.account_id, []).append(event)
    return diverged


async def shards_behind(images: StateImages, ledger: Ledger) -> list[int]:
    """Shards whose Redis fence is below the ledger's (Redis lost writes)."""
    in_redis = await images.fences()
    in_ledger = await ledger.shard_fences()
    return [
        shard for shard, (epoch, count) in sorted(in_ledger.items())
        if in_redis[shard] < FenceMark(epoch, count)
    ]


async def _start_fence_epochs(images: StateImages, ledger: Ledger) -> None:
    for shard, mark in enumerate(await images.fences()):
        epoch, count = await ledger.start_fence_epoch(shard, (mark.epoch, mark.count))
        await images.set_fence(shard, FenceMark(epoch, count))


async def _rebuild_usage(
    images: StateImages, ledger: Ledger, account_id: str, acct: dict[str, Any], now_ms: int
) -> None:
    """The current period's usage counters, recomputed from the ledger's entries."""
    period_start, period_end = int(acct["period_start"]), int(acct["period_end"])
    usages: list[Usage] = []
    async for page in ledger.usage_pages(period_start, account_id):
        # a refund of an earlier period's charge counts there
        usages = net([*usages, *(u for u in from_entries(page) if u.bucket_ms >= period_start)])
    await images.restore_usage(account_id, period_start, period_end, usages, now_ms)


async def _restore_reservation(
    images: StateImages, row: StateRow, now_ms: int, retention_ms: int
) -> bool:
    """An open hold comes back with its expiry indexes; a closed one only for what is
    left of its closed window (as the scripts keep it; later ones come back from
    the ledger when a call needs them). Returns whether it came back."""
    closed_at = hold_closed_at(row.state)
    if not closed_at:
        hold = unpack_image(row.state)
        await images.restore_open_hold(row.key, row.account_id, row.state, int(hold["expires_at"]))
        return True
    kept_until = int(unpack_image(row.state)["kept_until"])
    left_ms = min(closed_at + retention_ms, kept_until) - now_ms
    if left_ms <= 0:
        return False
    await images.restore_closed_hold(row.key, row.state, left_ms)
    return True


async def verify(
    images: StateImages, ledger: Ledger, flusher: Flusher, progress: Progress
) -> Report:
    """Flushes everything, then compares every account in Redis and the ledger.
    An account that moved again while it was compared (live traffic, the reaper)
    is flushed and compared again, up to VERIFY_ROUNDS_MAX times, before its
    difference is reported."""
    settled: dict[str, list[Difference]] = {}  # per account, its last comparison
    suspects: set[str] | None = None  # None: every account
    for _ in range(VERIFY_ROUNDS_MAX):
        written = await flusher.flush_all(steal=True)
        progress(f"flushed {written} events")
        states = {s.account_id: s for s in await ledger.account_states()}
        redis_ids = set(await images.account_ids())
        moved: set[str] = set()
        for account_id in sorted(set(states) | redis_ids):
            if suspects is not None and account_id not in suspects:
                continue
            differences, ahead = await _compare_account(
                images, account_id, states.get(account_id), account_id in redis_ids
            )
            settled[account_id] = differences
            if ahead:
                moved.add(account_id)
        if not moved:
            break
        suspects = moved
        progress(f"{len(moved)} accounts moved while compared; comparing them again")
    report = Report(accounts=len(settled))
    for account_id in sorted(settled):
        report.differences.extend(settled[account_id])
    sums = await ledger.entry_sums()
    for account_id, state in states.items():
        audit = _audit(account_id, unpack_image(state.state), sums.get(account_id, {}))
        report.differences.extend(audit)
    return report


async def _compare_account(
    images: StateImages, account_id: str, state: StateRow | None, in_redis_ids: bool
) -> tuple[list[Difference], bool]:
    """The account's differences, and whether Redis is ahead of the ledger (it moved)."""
    raw = await images.account(account_id) if in_redis_ids else None
    if state is None:
        return [Difference(account_id, "account", "present", "missing")], False
    if raw is None:
        return [Difference(account_id, "account", "missing", "present")], False
    in_redis, in_ledger = unpack_image(raw), unpack_image(state.state)
    if in_redis == in_ledger:
        return [], False
    ahead = in_redis.get("event_seq", 0) > in_ledger.get("event_seq", 0)
    return _compare(account_id, in_redis, in_ledger), ahead


def _compare(
    account_id: str, in_redis: dict[str, Any], in_ledger: dict[str, Any]
) -> list[Difference]:
    differences = []
    for name in sorted(set(in_redis) | set(in_ledger)):
        if in_redis.get(name) != in_ledger.get(name):
            differences.append(
                Difference(account_id, name, repr(in_redis.get(name))[:80],
                           repr(in_ledger.get(name))[:80])
            )
    return differences


def _audit(account_id: str, acct: dict[str, Any], sums: dict[str, int]) -> list[Difference]:
    """The account's totals against the sums of its ledger entries."""
    def total(*types: EntryType) -> int:
        return sum(sums.get(t, 0) for t in types)

    expected = {
        "total_granted": total(EntryType.ALLOTMENT, EntryType.PURCHASE, EntryType.OVERAGE),
        "total_charged": total(EntryType.COMMIT, EntryType.LATE_COMMIT, EntryType.CHARGE),
        "total_refunded": total(EntryType.REFUND),
        "total_expired": total(EntryType.ALLOTMENT_EXPIRE, EntryType.GRANT_EXPIRE)
        + sums.get("lost", 0),
    }
    return [
        Difference(account_id, f"{name} vs entries", str(acct[name]), str(total))
        for name, total in expected.items()
        if int(acct[name]) != total
    ]
