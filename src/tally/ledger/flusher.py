"""The flusher: shard streams -> ledger, at least once, deduplicated by event id.

For each shard it reads through the consumer group `ledger` (claiming what a
dead flusher left pending), writes the batch to the ledger in one
transaction, acknowledges, then trims the stream up to the oldest entry not
yet acknowledged — never by length. Several flushers (servers or `tally
flusher` processes) may run at once: the ledger ignores events it already has.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from dataclasses import dataclass
from typing import Any

import msgpack
from redis.exceptions import ResponseError

from tally import metrics
from tally.domain.errors import Unavailable
from tally.ledger.backend import SqlLedger, ledger_unavailable
from tally.ledger.events import decode
from tally.store.keys import KeySpace

log = logging.getLogger("tally.flusher")

GROUP = "ledger"
BATCHES_PER_PASS_MAX = 20
THROUGH_PASSES_MAX = 1000
LAG_INTERVAL_S = 5.0
LAG_COUNT_MAX = 10_000  # "waiting" is a lower bound beyond this


@dataclass(frozen=True)
class FlusherSettings:
    interval_s: float = 1.0
    batch: int = 500
    claim_idle_ms: int = 30_000
    snapshot_interval_s: float = 300.0
    stream_retention_ms: int = 0  # flushed events kept this long (watches resume from them)


@dataclass(frozen=True)
class ShardLag:
    shard: int
    length: int
    pending: int
    waiting: int
    oldest_unflushed_ms: int  # 0 when nothing waits


def consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class Flusher:
    def __init__(
        self,
        redis: Any,
        keys: KeySpace,
        ledger: SqlLedger,
        settings: FlusherSettings,
        consumer: str | None = None,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.ledger = ledger
        self.settings = settings
        self.consumer = consumer or consumer_name()
        self._stopping = asyncio.Event()
        self._locks = [asyncio.Lock() for _ in range(keys.shards)]

    async def ensure_groups(self) -> None:
        for shard in range(self.keys.shards):
            await self._ensure_group(shard)

    async def _ensure_group(self, shard: int) -> None:
        try:
            await self.redis.xgroup_create(self.keys.events(shard), GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def flush_shard(self, shard: int, *, steal: bool = False) -> int:
        """Flushes what the shard's stream holds now; returns the entries written.
        With steal, entries pending at other consumers are taken over at once
        (safe: writes are idempotent) so that everything so far is durable."""
        async with self._locks[shard]:
            try:
                return await self._flush_shard(shard, steal)
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                await self._ensure_group(shard)
                return await self._flush_shard(shard, steal)

    async def _flush_shard(self, shard: int, steal: bool) -> int:
        stream = self.keys.events(shard)
        total = 0
        min_idle_ms = 0 if steal else self.settings.claim_idle_ms
        for _ in range(BATCHES_PER_PASS_MAX):
            # Our own pending entries first (a write that failed is retried at
            # once), then ones a dead flusher left idle, then new ones.
            entries = await self._read(stream, "0")
            claimed = await self.redis.xautoclaim(
                stream, GROUP, self.consumer, min_idle_time=min_idle_ms,
                start_id="0-0", count=self.settings.batch,
            )
            entries.extend(claimed[1])
            entries.extend(await self._read(stream, ">"))
            live = [(sid, fields) for sid, fields in entries if fields]
            if not entries:
                break
            events = [decode(shard, sid, fields) for sid, fields in live]
            if events:
                await asyncio.to_thread(self.ledger.write_batch, events)
            await self.redis.xack(stream, GROUP, *[sid for sid, _ in entries])
            total += len(events)
        await self._trim(shard)
        return total

    async def _read(self, stream: str, position: str) -> list[Any]:
        reply = await self.redis.xreadgroup(
            GROUP, self.consumer, {stream: position}, count=self.settings.batch
        )
        return [entry for _, messages in reply for entry in messages]

    async def _trim(self, shard: int) -> None:
        """Removes entries before the oldest one not yet acknowledged, keeping
        flushed ones younger than the stream retention."""
        stream = self.keys.events(shard)
        # The group's position first, the pending entries second: whatever another
        # flusher reads in between comes after that position, so it stays.
        groups = await self.redis.xinfo_groups(stream)
        ours = [g for g in groups if _text(g["name"]) == GROUP]
        if not ours:
            return
        floor = _text(ours[0]["last-delivered-id"])
        summary = await self.redis.xpending(stream, GROUP)
        if summary["pending"]:
            floor = min(floor, _text(summary["min"]), key=_id_key)
        if self.settings.stream_retention_ms:
            kept_from = f"{await self._redis_now_ms() - self.settings.stream_retention_ms}-0"
            floor = min(floor, kept_from, key=_id_key)
        await self.redis.xtrim(stream, minid=floor, approximate=False)

    async def flush_through(self, shard: int) -> None:
        """Returns once every entry the shard's stream holds now is in the ledger
        (the money-in barrier). Raises Unavailable if that takes more than
        THROUGH_PASSES_MAX passes (a backlog the ledger cannot keep up with)."""
        stream = self.keys.events(shard)
        info = await self.redis.xinfo_stream(stream)
        target = _text(info["last-generated-id"])
        for _ in range(THROUGH_PASSES_MAX):
            await self.flush_shard(shard, steal=True)
            if await self._flushed_through(stream, target):
                return
        raise Unavailable(
            f"shard {shard}'s backlog did not reach the ledger in {THROUGH_PASSES_MAX} passes"
        )

    async def _flushed_through(self, stream: str, target: str) -> bool:
        groups = await self.redis.xinfo_groups(stream)
        ours = [g for g in groups if _text(g["name"]) == GROUP]
        if not ours or _id_key(_text(ours[0]["last-delivered-id"])) < _id_key(target):
            return False
        pending = await self.redis.xpending_range(stream, GROUP, min="-", max=target, count=1)
        return not pending

    async def flush_all(self, *, steal: bool = False) -> int:
        total = 0
        for shard in range(self.keys.shards):
            total += await self.flush_shard(shard, steal=steal)
        return total

    async def lag(self) -> list[ShardLag]:
        now_ms = await self._redis_now_ms()
        lags = []
        for shard in range(self.keys.shards):
            stream = self.keys.events(shard)
            length = await self.redis.xlen(stream)
            pending = 0
            waiting = length
            oldest = 0
            with contextlib.suppress(ResponseError):
                summary = await self.redis.xpending(stream, GROUP)
                pending = int(summary["pending"])
                groups = await self.redis.xinfo_groups(stream)
                ours = [g for g in groups if _text(g["name"]) == GROUP]
                last = _text(ours[0]["last-delivered-id"]) if ours else "0-0"
                # XINFO's own `lag` is unknown after a trim, so count what follows
                # the last delivered entry (bounded).
                undelivered = await self.redis.xrange(
                    stream, min=f"({last}", count=LAG_COUNT_MAX
                )
                waiting = pending + len(undelivered)
                candidates = []
                if pending:
                    candidates.append(_text(summary["min"]))
                if undelivered:
                    candidates.append(_text(undelivered[0][0]))
                if candidates:
                    oldest_id = min(candidates, key=_id_key)
                    oldest = max(0, now_ms - _id_key(oldest_id)[0])
            lags.append(ShardLag(shard, int(length), pending, waiting, oldest))
        return lags

    async def _redis_now_ms(self) -> int:
        seconds, micros = await self.redis.time()
        return int(seconds) * 1000 + int(micros) // 1000

    async def snapshot(self, reason: str) -> int:
        """Freezes every account's flushed balance in the ledger."""
        states = await asyncio.to_thread(self.ledger.account_states)
        balances = [
            (row.account_id, row.seq, figures_of(row.state), row.state) for row in states
        ]
        snapshot_id = await asyncio.to_thread(self.ledger.snapshot, reason, balances)
        log.info("snapshot written", extra={"snapshot_id": snapshot_id, "accounts": len(states)})
        return snapshot_id

    async def run(self) -> None:
        """Flushes every interval (the first pass after one interval: start-up has
        flushed already) and snapshots on schedule until stopped."""
        loop = asyncio.get_running_loop()
        next_snapshot = loop.time() + self.settings.snapshot_interval_s
        next_lag = loop.time()
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.settings.interval_s)
            if self._stopping.is_set():
                break
            try:
                metrics.FLUSHER_EVENTS_FLUSHED.inc(await self.flush_all())
                if loop.time() >= next_lag:
                    self._record_lag(await self.lag())
                    next_lag = loop.time() + LAG_INTERVAL_S
                if loop.time() >= next_snapshot:
                    await self.snapshot("scheduled")
                    next_snapshot = loop.time() + self.settings.snapshot_interval_s
            except (Unavailable, OSError, ConnectionError) as exc:
                metrics.FLUSHER_FAILURES.inc()
                log.warning("flush pass failed", extra={"error": str(exc)})
            except Exception as exc:  # the ledger's driver errors vary by backend
                if not _is_transient(exc):
                    raise
                metrics.FLUSHER_FAILURES.inc()
                log.warning("flush pass failed", extra={"error": str(exc)})

    def stop(self) -> None:
        self._stopping.set()

    @staticmethod
    def _record_lag(lags: list[ShardLag]) -> None:
        metrics.FLUSHER_EVENTS_WAITING.set(sum(lag.waiting for lag in lags))
        oldest_ms = max((lag.oldest_unflushed_ms for lag in lags), default=0)
        metrics.FLUSHER_OLDEST_UNFLUSHED_SECONDS.set(oldest_ms / 1000)


def figures_of(state: bytes) -> dict[str, int]:
    acct = msgpack.unpackb(state, raw=False, strict_map_key=False)
    grants = acct.get("grants") or []
    remaining = sum(int(g["remaining"]) for g in grants)
    return {
        "available": remaining - int(acct["overage_used"]) - int(acct["overage_held"]),
        "held": int(acct["held"]),
        "granted": int(acct["total_granted"]),
        "charged": int(acct["total_charged"]),
        "refunded": int(acct["total_refunded"]),
        "expired": int(acct["total_expired"]),
    }


def _is_transient(exc: Exception) -> bool:
    """Connection-level failures of Redis or the ledger, worth another pass."""
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    return isinstance(exc, RedisConnectionError | RedisTimeoutError) or ledger_unavailable(exc)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _id_key(stream_id: str) -> tuple[int, int]:
    ms, _, seq = stream_id.partition("-")
    return int(ms), int(seq or 0)
