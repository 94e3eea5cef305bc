"""The WatchUsage service: admission, the two algorithms (one account, every
account) and their metrics. See the package docstring for the semantics."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from prometheus_client import Counter, Gauge

from tally import metrics
from tally.api import validation
from tally.api.errors import rich_status
from tally.api.watch.positions import account_position, decode_token, encode_token
from tally.api.watch.reader import Cursor, ShardRead, Stopped, StreamReader
from tally.auth.principal import ANONYMOUS, current
from tally.auth.scope import require_account, visible
from tally.domain.errors import InvalidArgument, NotFound, TallyError
from tally.domain.events import Entry, stream_id_order
from tally.ledger.ledger import Ledger, LedgerUnavailable
from tally.store.failures import StoreRefused, StoreUnreachable
from tally.store.stream_tail import StreamTail
from tally.store.streams import EventStreams
from tally_client.v1 import usage_pb2

log = logging.getLogger("tally.watch")

BATCH = 100  # stream entries per stream (or ledger rows) per read
BLOCK_MS = 1000  # longest XREAD BLOCK; a cancelled watch is noticed within it
LEDGER_READS_MAX = 4  # watches reading the ledger at once (they share it with the flusher)
FELL_BEHIND = "fell_behind"  # the all-accounts watch's own event type (never in the ledger)

POSITION_METADATA = "tally-position"  # initial metadata: where the watch starts

Ready = Callable[[str], Awaitable[None]]

WATCHERS = Gauge(
    "tally_watchers",
    "WatchUsage streams running on this server",
    registry=metrics.REGISTRY,
)
WATCHES_REFUSED = Counter(
    "tally_watches_refused_total",
    "WatchUsage calls refused with RESOURCE_EXHAUSTED (max_watchers or "
    "max_watchers_per_principal reached)",
    registry=metrics.REGISTRY,
)
WATCH_EVENTS = Counter(
    "tally_watch_events_sent_total",
    "Events sent by WatchUsage streams, by where they were read (redis, ledger)",
    ["source"],
    registry=metrics.REGISTRY,
)
WATCH_FELL_BEHIND = Counter(
    "tally_watch_fell_behind_total",
    "fell_behind events sent by all-accounts watches (entries trimmed before they were read)",
    registry=metrics.REGISTRY,
)
for _source in ("redis", "ledger"):
    WATCH_EVENTS.labels(source=_source)
_FROM_REDIS = WATCH_EVENTS.labels(source="redis")
_FROM_LEDGER = WATCH_EVENTS.labels(source="ledger")


class _Refused(Exception):
    """Ends a watch with a status (raised where no context is at hand)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


def usage_event(entry: Entry, position: str) -> usage_pb2.UsageEvent:
    """An entry (from a stream or the ledger) as a UsageEvent."""
    event = usage_pb2.UsageEvent(
        position=position,
        type=entry.type.value,
        account_id=entry.account_id,
        reservation_id=entry.reservation_id,
        operation=entry.operation,
        units=entry.units,
        labels=entry.labels,
        available_after=entry.available_after,
        alert=entry.alert,
    )
    if entry.occurred_at_ms:
        event.occurred_at.FromMilliseconds(entry.occurred_at_ms)
    return event


@dataclass
class _Progress:
    account_id: str
    last: int  # the last event number sent


class UsageWatch:
    """Serves WatchUsage (see the package docstring for the semantics)."""

    def __init__(
        self,
        streams: EventStreams,
        ledger: Ledger,
        *,
        max_watchers: int,
        max_watchers_per_principal: int,
        batch: int = BATCH,
        block_ms: int = BLOCK_MS,
    ) -> None:
        if min(max_watchers, max_watchers_per_principal, batch, block_ms) < 1:
            raise ValueError(
                "max_watchers, max_watchers_per_principal, batch and block_ms must be positive"
            )
        self.streams = streams
        self.keys = streams.keys
        self.ledger = ledger
        self.max_watchers = max_watchers
        self.max_watchers_per_principal = max_watchers_per_principal
        self._watching: collections.Counter[str] = collections.Counter()  # by principal_id
        self.batch = batch
        self.block_ms = block_ms
        self.active = 0
        self._stopping = asyncio.Event()
        self._ledger_reads = asyncio.Semaphore(LEDGER_READS_MAX)

    def stop(self) -> None:
        """Ends every watch within block_ms (UNAVAILABLE: resume elsewhere or later),
        rather than holding a graceful shutdown for its whole grace period."""
        self._stopping.set()

    async def stream(
        self, request: usage_pb2.WatchUsageRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[usage_pb2.UsageEvent]:
        if self._stopping.is_set():
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
        if self.active >= self.max_watchers:
            WATCHES_REFUSED.inc()
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"this server already runs {self.max_watchers} watches (its limit); "
                "retry later or on another server",
            )
        principal = current()
        # With auth off every caller is ANONYMOUS: one shared principal, bounded by
        # max_watchers alone; an authenticated one may not take every slot.
        capped = principal != ANONYMOUS
        if capped and self._watching[principal.principal_id] >= self.max_watchers_per_principal:
            WATCHES_REFUSED.inc()
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"this principal already runs {self.max_watchers_per_principal} watches "
                "(max_watchers_per_principal); end one or retry later",
            )
        if capped:
            self._watching[principal.principal_id] += 1
        self.active += 1
        WATCHERS.inc()
        tail: StreamTail | None = None
        try:

            async def ready(position: str) -> None:
                await context.send_initial_metadata(((POSITION_METADATA, position),))

            if request.account_id:
                account_id = validation.account_id(request.account_id)
                require_account(account_id)
                after = account_position(request.after_position)
                tail = self.streams.tail()
                events = self._watch_account(tail, account_id, after, ready)
            else:
                cursors = (
                    decode_token(request.after_position, self.keys.shards)
                    if request.after_position
                    else None
                )
                tail = self.streams.tail()
                events = self._watch_all(tail, cursors, ready)
            async with contextlib.aclosing(events):
                async for event in events:
                    # a scoped caller's all-accounts watch shows its own accounts alone
                    if not event.account_id or visible(event.account_id):
                        yield event
        except StoreUnreachable as exc:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                f"the store is unreachable ({exc.kind}); resume from the last position",
            )
        except StoreRefused as exc:
            log.exception("watch failed", extra={"error": exc.reason})
            await context.abort(grpc.StatusCode.INTERNAL, exc.message)
        except TallyError as error:
            await context.abort_with_status(rich_status(error))
        except Stopped:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                "the server is shutting down; resume after the last position received",
            )
        except _Refused as refused:
            await context.abort(refused.code, refused.details)
        finally:
            self.active -= 1
            WATCHERS.dec()
            if capped:
                self._watching[principal.principal_id] -= 1
                if not self._watching[principal.principal_id]:
                    del self._watching[principal.principal_id]
            if tail is not None:
                await tail.close()

    async def _ledger_rows(self, account_id: str, after_seq: int, limit: int) -> list[Entry]:
        try:
            async with self._ledger_reads:
                return await self.ledger.entries(account_id, after_seq=after_seq, limit=limit)
        except LedgerUnavailable as exc:
            log.warning("watch: ledger read failed", extra={"error": exc.reason})
            raise _Refused(
                grpc.StatusCode.UNAVAILABLE, f"{exc.message}; resume from the last position"
            ) from exc

    # --- one account ----------------------------------------------------------------

    async def _watch_account(
        self, tail: StreamTail, account_id: str, after: int | None, ready: Ready
    ) -> AsyncGenerator[usage_pb2.UsageEvent, None]:
        latest, info = await tail.account_head(account_id)
        if latest is None:
            raise NotFound(f"account {account_id} not found", field_name="account_id")
        now = Cursor(info.last_id, info.added)  # every event <= latest is at or before it
        progress = _Progress(account_id, latest if after is None else after)
        if progress.last > latest:
            raise InvalidArgument(
                f"after_position {progress.last} is beyond the account's last event ({latest})",
                field_name="after_position",
            )
        await ready(str(progress.last))
        start = now
        if progress.last < latest:
            async for event in self._from_ledger(progress, upto=latest):
                yield event
            if progress.last < latest:
                start = Cursor()  # the rest is still in Redis: read the stream from its start
        reader = StreamReader(
            tail, [self.keys.shard_of(account_id)], [start], self.batch,
            tail.block_ms(self.block_ms), self._stopping,
        )
        while True:
            for read in await reader.pull():
                if read.behind:
                    # Some entries were trimmed before they were read: the ledger has them.
                    async for event in self._from_ledger(progress):
                        yield event
                for _cursor, stream_entry in read.entries:
                    entry = stream_entry.entry
                    if entry.account_id != account_id or entry.seq <= progress.last:
                        continue
                    n = entry.seq
                    if n > progress.last + 1:
                        async for event in self._from_ledger(progress, upto=n - 1):
                            yield event
                        if progress.last != n - 1:
                            raise _Refused(
                                grpc.StatusCode.DATA_LOSS,
                                f"events {account_id}/{progress.last + 1}..{n - 1} are neither "
                                "in Redis nor in the ledger",
                            )
                    progress.last = n
                    _FROM_REDIS.inc()
                    yield usage_event(entry, str(n))

    async def _from_ledger(
        self, progress: _Progress, upto: int | None = None
    ) -> AsyncIterator[usage_pb2.UsageEvent]:
        """The account's events after progress.last that the ledger has without a gap
        (up to `upto`), a page at a time. The ledger serves only the run without a
        gap: an event it lacks (committed late) is still in Redis."""
        while upto is None or progress.last < upto:
            limit = self.batch if upto is None else min(self.batch, upto - progress.last)
            rows = await self._ledger_rows(progress.account_id, progress.last, limit)
            for row in rows:
                progress.last = row.seq
                _FROM_LEDGER.inc()
                yield usage_event(row, str(row.seq))
            if len(rows) < limit:
                return

    # --- every account ----------------------------------------------------------------

    async def _watch_all(
        self, tail: StreamTail, cursors: list[Cursor] | None, ready: Ready
    ) -> AsyncGenerator[usage_pb2.UsageEvent, None]:
        shards = list(range(self.keys.shards))
        if cursors is None:
            cursors = [Cursor(info.last_id, info.added) for info in await tail.infos(shards)]
        sent = list(cursors)  # what the positions of the events sent so far say
        await ready(encode_token(sent))
        count = max(16, self.batch // len(shards))
        reader = StreamReader(
            tail, shards, cursors, count, tail.block_ms(self.block_ms), self._stopping
        )
        while True:
            reads = await reader.pull()
            behind = [read for read in reads if read.behind]
            for read in behind:
                if read.skip_to is not None:
                    sent[read.shard] = read.skip_to
            if behind:
                WATCH_FELL_BEHIND.inc()
                yield usage_pb2.UsageEvent(
                    position=encode_token(sent),
                    type=FELL_BEHIND,
                    alert=self._behind_text(behind),
                )
            merged = sorted(
                (
                    (stream_id_order(cursor.id), read.shard, cursor, entry)
                    for read in reads
                    for cursor, entry in read.entries
                ),
                key=lambda item: (item[0], item[1]),
            )
            for _key, shard, cursor, stream_entry in merged:
                sent[shard] = cursor
                _FROM_REDIS.inc()
                yield usage_event(stream_entry.entry, encode_token(sent))

    def _behind_text(self, behind: Sequence[ShardRead]) -> str:
        parts = []
        for read in behind:
            tag = self.keys.tag(read.shard)
            if read.reset:
                parts.append(f"{tag}: its stream was reset (Redis wiped or restored)")
            elif read.exact:
                parts.append(f"{tag}: {read.missed} events")
            else:
                parts.append(f"{tag}: perhaps some events")
        return (
            "missed events that were flushed to the ledger and trimmed from Redis before this "
            "watch read them (" + "; ".join(parts) + "); continuing from the oldest event Redis "
            "holds. The ledger has them (ListLedgerEntries, or a single-account watch resumed "
            "from its last position)."
        )
