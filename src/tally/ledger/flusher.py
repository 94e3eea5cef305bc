"""The flusher: shard streams -> ledger, at least once, deduplicated by event id.

For each shard it reads through the consumer group `ledger` (claiming what a
dead flusher left pending), writes the batch to the ledger in one
transaction, acknowledges, then trims the stream up to the oldest entry not
yet acknowledged — never by length. Several flushers (servers or `tally
flusher` processes) may run at once: the ledger ignores events it already has.
Each pass also prunes the ledger's tables beside the entries (a bounded batch
per table; see Retention), so they stay as large as the retained state, never
as the traffic.

An event whose id the ledger holds with other content is not a duplicate but an
alarm (Redis lost writes and reused the id): its batch is not written nor
acknowledged, the shard is fenced (store/fence.py), and the conflict is logged
and counted. After each batch it commits, the flusher raises the shard's fence
floor to the batch's highest fence count.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from dataclasses import dataclass

import msgpack

from tally import metrics
from tally.domain.errors import Unavailable
from tally.ledger.backend import EntryConflict, Retention, StateRow
from tally.ledger.ledger import Ledger, LedgerUnavailable
from tally.store.failures import StoreBusy
from tally.store.fence import ShardFences
from tally.store.leases import GlobalLease
from tally.store.streams import EventStreams, ShardLag

log = logging.getLogger("tally.flusher")

BATCHES_PER_PASS_MAX = 20
THROUGH_PASSES_MAX = 1000
LAG_INTERVAL_S = 5.0


@dataclass(frozen=True)
class FlusherSettings:
    interval_s: float = 1.0
    batch: int = 500
    claim_idle_ms: int = 30_000
    snapshot_interval_s: float = 300.0
    stream_retention_ms: int = 0  # flushed events kept this long (watches resume from them)
    retention: Retention | None = None  # what pruning keeps; None: this flusher never prunes


@dataclass(frozen=True)
class FlusherLeases:
    """The global leases a flusher's scheduled work runs under."""

    snapshot: GlobalLease
    prune: GlobalLease


def consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class Flusher:
    def __init__(
        self,
        streams: EventStreams,
        ledger: Ledger,
        settings: FlusherSettings,
        consumer: str | None = None,
        fences: ShardFences | None = None,
        leases: FlusherLeases | None = None,
    ) -> None:
        """leases: None for a flusher that snapshots and prunes alone."""
        self.streams = streams
        self.keys = streams.keys
        self.ledger = ledger
        self.settings = settings
        self.fences = fences or ShardFences(streams.keys.shards)
        self.consumer = consumer or consumer_name()
        self.leases = leases
        self._stopping = asyncio.Event()
        self._locks = [asyncio.Lock() for _ in range(self.keys.shards)]

    async def ensure_groups(self) -> None:
        await self.streams.ensure_groups()

    async def flush_shard(self, shard: int, *, steal: bool = False) -> int:
        """Flushes what the shard's stream holds now; returns the entries written.
        With steal, entries pending at other consumers are taken over at once
        (safe: writes are idempotent) so that everything so far is durable."""
        async with self._locks[shard]:
            total = 0
            min_idle_ms = 0 if steal else self.settings.claim_idle_ms
            for _ in range(BATCHES_PER_PASS_MAX):
                delivery = await self.streams.take(
                    shard, self.consumer, self.settings.batch, min_idle_ms
                )
                if not delivery.ids:
                    break
                if delivery.entries:
                    try:
                        await self.ledger.write_batch(delivery.entries)
                    except EntryConflict as conflict:
                        await self._alarm(shard, conflict)
                        break  # left pending: never acknowledged nor trimmed
                    highest = max(event.entry.fence for event in delivery.entries)
                    self.fences.raise_count(shard, highest)
                await self.streams.acknowledge(shard, delivery.ids)
                total += len(delivery.entries)
            await self._trim(shard)
            return total

    async def _alarm(self, shard: int, conflict: EntryConflict) -> None:
        metrics.LEDGER_CONFLICTS.inc(len(conflict.entries))
        log.error(
            "stream entries conflict with the ledger: Redis lost writes; run tally recover",
            extra={"shard": shard, "entries": [e.entry.entry_id for e in conflict.entries[:10]]},
        )
        await self.fences.conflicted(shard)

    async def _trim(self, shard: int) -> None:
        await self.streams.trim(shard, self.settings.stream_retention_ms)

    async def flush_through(self, shard: int) -> None:
        """Returns once every entry the shard's stream holds now is in the ledger
        (the money-in barrier). Raises Unavailable if that takes more than
        THROUGH_PASSES_MAX passes (a backlog the ledger cannot keep up with)."""
        target = await self.streams.last_id(shard)
        for _ in range(THROUGH_PASSES_MAX):
            await self.flush_shard(shard, steal=True)
            if await self.streams.acknowledged_through(shard, target):
                return
        raise Unavailable(
            f"shard {shard}'s backlog did not reach the ledger in {THROUGH_PASSES_MAX} passes"
        )

    async def flush_all(self, *, steal: bool = False) -> int:
        """Flushes every shard with something to flush (one pipelined check finds
        them: an idle shard costs two commands per pass, not seven round trips)."""
        total = 0
        for shard in await self.streams.shards_with_work(self.settings.stream_retention_ms):
            total += await self.flush_shard(shard, steal=steal)
        return total

    async def lag(self) -> list[ShardLag]:
        return await self.streams.lag()

    async def snapshot(self, reason: str) -> int:
        """Freezes every account's flushed balance in the ledger."""
        states = await self.ledger.account_states()
        balances = [(row.account_id, row.seq, figures_of(row), row.state) for row in states]
        snapshot_id = await self.ledger.snapshot(reason, balances)
        log.info("snapshot written", extra={"snapshot_id": snapshot_id, "accounts": len(states)})
        return snapshot_id

    def snapshots_here(self) -> bool:
        """Whether this flusher writes the fleet's snapshots (holds their lease)."""
        return self.leases is None or self.leases.snapshot.held()

    def prunes_here(self) -> bool:
        """Whether this flusher prunes the ledger (holds the prune lease)."""
        return self.leases is None or self.leases.prune.held()

    async def snapshot_due(self) -> bool:
        """Whether the ledger's newest snapshot (by anyone) is snapshot_interval old."""
        latest = await self.ledger.latest_snapshot()
        interval_ms = round(self.settings.snapshot_interval_s * 1000)
        return latest is None or self.ledger.clock.now_ms() - latest[1] >= interval_ms

    async def run(self) -> None:
        """Flushes every interval (the first pass after one interval: start-up has
        flushed already); prunes and snapshots on schedule under their leases, the
        first snapshot no sooner than one snapshot_interval after start."""
        loop = asyncio.get_running_loop()
        snapshots_from = loop.time() + self.settings.snapshot_interval_s
        next_lag = loop.time()
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.settings.interval_s)
            if self._stopping.is_set():
                break
            try:
                metrics.FLUSHER_EVENTS_FLUSHED.inc(await self.flush_all())
                if self.settings.retention is not None and self.prunes_here():
                    await self.ledger.prune(self.settings.retention)
                if loop.time() >= next_lag:
                    self._record_lag(await self.lag())
                    next_lag = loop.time() + LAG_INTERVAL_S
                if (loop.time() >= snapshots_from and self.snapshots_here()
                        and await self.snapshot_due()):
                    await self.snapshot("scheduled")
            except LedgerUnavailable as exc:  # the driver's words say more than ours
                self._pass_failed(exc.reason)
            except (Unavailable, StoreBusy, OSError, ConnectionError) as exc:
                self._pass_failed(str(exc))

    def stop(self) -> None:
        self._stopping.set()

    @staticmethod
    def _pass_failed(error: str) -> None:
        metrics.FLUSHER_FAILURES.inc()
        log.warning("flush pass failed", extra={"error": error})

    @staticmethod
    def _record_lag(lags: list[ShardLag]) -> None:
        metrics.FLUSHER_EVENTS_WAITING.set(sum(lag.waiting for lag in lags))
        oldest_ms = max((lag.oldest_unflushed_ms for lag in lags), default=0)
        metrics.FLUSHER_OLDEST_UNFLUSHED_SECONDS.set(oldest_ms / 1000)


def figures_of(row: StateRow) -> dict[str, int]:
    """An account image's figures. Available is what the script computed (the
    balance formula lives in Lua alone); the rest are the image's own counts."""
    acct = msgpack.unpackb(row.state, raw=False, strict_map_key=False)
    return {
        "available": row.available,
        "held": int(acct["held"]),
        "granted": int(acct["total_granted"]),
        "charged": int(acct["total_charged"]),
        "refunded": int(acct["total_refunded"]),
        "expired": int(acct["total_expired"]),
    }
