"""Recovery and verification: Redis against the ledger.

`recover` writes back into Redis every account, reservation, idempotency
record and price whose Redis copy is missing or older than the ledger's
(by the per-account event sequence), as of the last flushed event.
`verify` compares the two after a flush, and audits the ledger against
itself: each account's totals must equal the sums of its entries.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack

from tally.domain.limits import USAGE_RETENTION_MS
from tally.domain.usage import from_entries
from tally.ledger.backend import SqlLedger, StateRow
from tally.ledger.flusher import Flusher
from tally.store.keys import META_KEY, KeySpace

Progress = Callable[[str], None]
PIPELINE_BATCH = 500
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


def _unpack(raw: bytes) -> dict[str, Any]:
    value = msgpack.unpackb(raw, raw=False, strict_map_key=False)
    if not isinstance(value, dict):
        raise ValueError("state image is not a map")
    return value


async def redis_seqs(redis: Any, keys: KeySpace, account_ids: list[str]) -> dict[str, int]:
    """Each account's event sequence in Redis (-1: missing)."""
    seqs: dict[str, int] = {}
    for start in range(0, len(account_ids), PIPELINE_BATCH):
        chunk = account_ids[start : start + PIPELINE_BATCH]
        pipe = redis.pipeline(transaction=False)
        for account_id in chunk:
            pipe.get(keys.account_keys(account_id)[0])
        for account_id, raw in zip(chunk, await pipe.execute(), strict=True):
            seqs[account_id] = -1 if raw is None else int(_unpack(raw).get("event_seq", 0))
    return seqs


async def stale_accounts(redis: Any, keys: KeySpace, ledger: SqlLedger) -> list[str]:
    """Accounts whose Redis copy is missing or older than the ledger's."""
    states = await asyncio.to_thread(ledger.account_states)
    seqs = await redis_seqs(redis, keys, [s.account_id for s in states])
    return [s.account_id for s in states if seqs[s.account_id] < s.seq]


async def recover(
    redis: Any, keys: KeySpace, ledger: SqlLedger, now_ms: int, progress: Progress,
    retention_ms: int,
) -> RecoveryResult:
    """retention_ms: how long closed reservations stay (--reservation-retention)."""
    result = RecoveryResult()
    states = await asyncio.to_thread(ledger.account_states)
    seqs = await redis_seqs(redis, keys, [s.account_id for s in states])
    stale = {s.account_id for s in states if seqs[s.account_id] < s.seq}
    progress(f"{len(states)} accounts in the ledger, {len(stale)} missing or behind in Redis")
    for index, state in enumerate(s for s in states if s.account_id in stale):
        await redis.set(keys.account_keys(state.account_id)[0], state.state)
        await _rebuild_usage(redis, keys, ledger, state.account_id, _unpack(state.state))
        result.accounts += 1
        if (index + 1) % 1000 == 0:
            progress(f"  {index + 1} accounts restored")
    for row in await asyncio.to_thread(ledger.reservation_states):
        if row.account_id not in stale:
            continue
        if await _restore_reservation(
            redis, keys, row.key, row.account_id, row.state, now_ms, retention_ms
        ):
            result.reservations += 1
    for row in await asyncio.to_thread(ledger.idempotency_states, now_ms):
        if row.account_id not in stale:
            continue
        await redis.set(row.key, row.state, px=max(1, row.expires_at_ms - now_ms))
        result.idempotency_records += 1
    result.prices = await _restore_catalog(redis, keys, ledger)
    await redis.hsetnx(META_KEY, "shards", keys.shards)
    progress(
        f"restored {result.accounts} accounts, {result.reservations} reservations, "
        f"{result.idempotency_records} idempotency records, {result.prices} prices"
    )
    return result


async def _rebuild_usage(
    redis: Any, keys: KeySpace, ledger: SqlLedger, account_id: str, acct: dict[str, Any]
) -> None:
    """The current period's usage counters, recomputed from the ledger's entries."""
    period_start, period_end = int(acct["period_start"]), int(acct["period_end"])
    entries = await asyncio.to_thread(ledger.usage_entries, period_start, account_id)
    key = keys.usage(account_id, period_start)
    await redis.delete(key)
    for usage in from_entries(entries):
        if usage.bucket_ms < period_start:
            continue  # a refund of an earlier period's charge counts there
        pairs = sorted(usage.labels.items())
        suffix = (
            f"{usage.bucket_ms}|{usage.operation}|"
            f"{json.dumps([list(p) for p in pairs], separators=(',', ':')) if pairs else ''}"
        )
        await redis.hincrby(key, f"u|{suffix}", usage.units)
        if usage.quantity:
            await redis.hincrby(key, f"q|{suffix}", usage.quantity)
        if usage.count:
            await redis.hincrby(key, f"c|{suffix}", usage.count)
    if await redis.exists(key):
        await redis.pexpireat(key, period_end + USAGE_RETENTION_MS)


async def _restore_reservation(
    redis: Any, keys: KeySpace, reservation_id: str, account_id: str, state: bytes,
    now_ms: int, retention_ms: int,
) -> bool:
    """An open hold comes back with its expiry indexes; a closed one only for what is
    left of its retention (as the scripts keep it). Returns whether it came back."""
    hold = _unpack(state)
    _, holds_key, expiries_key, _ = keys.account_keys(account_id)
    if hold["state"] == "HELD":
        await redis.set(keys.reservation(reservation_id), state)
        await redis.zadd(holds_key, {reservation_id: int(hold["expires_at"])})
        await redis.zadd(expiries_key, {reservation_id: int(hold["expires_at"])})
        return True
    left_ms = int(hold.get("closed_at", 0)) + retention_ms - now_ms
    if left_ms <= 0:
        return False
    await redis.set(keys.reservation(reservation_id), state, px=left_ms)
    return True


async def _restore_catalog(redis: Any, keys: KeySpace, ledger: SqlLedger) -> int:
    prices = await asyncio.to_thread(ledger.catalog_prices)
    newest: dict[str, tuple[int, int, int]] = {}
    for operation, version, price, at_ms in prices:
        await redis.hset(keys.price_history(0), f"{operation}@{version}", price)
        if operation not in newest or version > newest[operation][0]:
            newest[operation] = (version, price, at_ms)
    for operation, (version, price, at_ms) in newest.items():
        current = await redis.hget(keys.prices(0), operation)
        if current is None or _unpack(current)["version"] < version:
            record = msgpack.packb({"price": price, "version": version, "at": at_ms})
            await redis.hset(keys.prices(0), operation, record)
    if prices:
        top = max(version for _, version, _, _ in prices)
        stored = await redis.hget(keys.catalog_meta(), "version")
        if stored is None or int(stored) < top:
            await redis.hset(keys.catalog_meta(), "version", top)
    return len(prices)


async def verify(
    redis: Any, keys: KeySpace, ledger: SqlLedger, flusher: Flusher, progress: Progress
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
        states = {s.account_id: s for s in await asyncio.to_thread(ledger.account_states)}
        redis_ids = set(await _redis_account_ids(redis, keys))
        moved: set[str] = set()
        for account_id in sorted(set(states) | redis_ids):
            if suspects is not None and account_id not in suspects:
                continue
            differences, ahead = await _compare_account(
                redis, keys, account_id, states.get(account_id), account_id in redis_ids
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
    sums = await asyncio.to_thread(ledger.entry_sums)
    for account_id, state in states.items():
        audit = _audit(account_id, _unpack(state.state), sums.get(account_id, {}))
        report.differences.extend(audit)
    return report


async def _compare_account(
    redis: Any, keys: KeySpace, account_id: str, state: StateRow | None, in_redis_ids: bool
) -> tuple[list[Difference], bool]:
    """The account's differences, and whether Redis is ahead of the ledger (it moved)."""
    raw = await redis.get(keys.account_keys(account_id)[0]) if in_redis_ids else None
    if state is None:
        return [Difference(account_id, "account", "present", "missing")], False
    if raw is None:
        return [Difference(account_id, "account", "missing", "present")], False
    in_redis, in_ledger = _unpack(raw), _unpack(state.state)
    if in_redis == in_ledger:
        return [], False
    ahead = in_redis.get("event_seq", 0) > in_ledger.get("event_seq", 0)
    return _compare(account_id, in_redis, in_ledger), ahead


async def _redis_account_ids(redis: Any, keys: KeySpace) -> list[str]:
    ids = []
    async for key in redis.scan_iter(match="tally:{*}:acct:*", count=1000):
        ids.append(key.decode().split(":acct:", 1)[1])
    return ids


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
    expected = {
        "total_granted": sums.get("allotment", 0) + sums.get("purchase", 0)
        + sums.get("overage", 0),
        "total_charged": sums.get("commit", 0) + sums.get("late_commit", 0)
        + sums.get("charge", 0),
        "total_refunded": sums.get("refund", 0),
        "total_expired": sums.get("allotment_expire", 0) + sums.get("grant_expire", 0)
        + sums.get("lost", 0),
    }
    return [
        Difference(account_id, f"{name} vs entries", str(acct[name]), str(total))
        for name, total in expected.items()
        if int(acct[name]) != total
    ]
