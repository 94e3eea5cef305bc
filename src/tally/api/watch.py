"""WatchUsage: a live, resumable server stream of an account's (or every account's) events.

Every writing Lua script appends the events it caused to its shard's Redis Stream
(`tally:{sNN}:events`); the flusher copies them to the ledger, then trims what the
ledger has from the stream (never anything else). A watch only reads: the streams,
and the ledger for what was already trimmed. The hot path never waits for a watcher.

One account (`account_id` set)
    `position` is the account's event number n (event ids are `<account>/<n>`,
    numbered 1, 2, 3... per account), as decimal text.
    `after_position` empty: from now (only events that happen after the call).
    `"N"`: first every event with n > N (`"0"`: the whole history), then live.
    Events arrive exactly once, in order, without a gap (n grows by 1): those already
    flushed and trimmed from Redis come from the ledger, the rest from the stream. A
    reader slower than the flusher (its next events were trimmed before it read them)
    catches up from the ledger the same way, transparently. A position beyond the
    account's last event is INVALID_ARGUMENT; an unknown account NOT_FOUND.
    Every event type of the account is sent (reserve, commit, late_commit, release,
    expire, refund, charge, purchase, allotment, allotment_expire, grant_expire,
    overage, plan_change, extend, alert...); entries without an account
    (price_change) are not.

Every account (`account_id` empty; meant for admins)
    `position` is an opaque token: per shard, the id of the last stream entry
    delivered and its number in the stream's history (XINFO `entries-added`).
    `after_position` empty: from now; a token: resume right after it.
    Limitation: this watch reads Redis only, so it can resume only while Redis still
    holds the entries after its position. When some of them were already flushed to
    the ledger and trimmed (an old position, a reader slower than the flush interval,
    a Redis wiped or restored from the ledger) it first sends one event of type
    `fell_behind`, whose `alert` says which shards and how many events were missed,
    then continues from the oldest entry Redis still holds. The missed events are in
    the ledger (ListLedgerEntries, or a single-account watch resumed from the last
    position seen for that account). Missed entries are counted exactly: numbers up to
    `entries-added - length` are gone (the flusher only trims a prefix), read in the
    same MULTI as the entries. Events of one shard (so of one account) arrive in
    order; across shards roughly in time order. price_change events (shard 0) come
    with an empty account_id. In a Redis Cluster the one XREAD over every shard
    stream would have to become one per node.

Bounds and flow control
    Reading is pull-based: the next read from Redis (at most `batch` entries per
    stream) or from the ledger (at most `batch` rows) happens only once gRPC has
    taken every event of the previous one, so HTTP/2 flow control holds a slow
    reader back through `yield`; a watcher holds at most one batch (and one ledger
    page), nothing is queued for it anywhere else, and falling behind costs it a
    ledger read (or a `fell_behind`), never the hot path anything.
    Each watch has its own Redis connection, opened with the store's settings but
    outside the store's pool (a blocking XREAD holds its connection for up to
    `block_ms`; watchers must never take connections the hot path needs), and closed
    when the stream ends. At most `max_watchers` watches run at once per server;
    beyond that WatchUsage answers RESOURCE_EXHAUSTED. An idle watch blocks in XREAD
    for at most `block_ms` (1 s, and below the Redis socket timeout) at a time. At
    most LEDGER_READS_MAX watches read the ledger at once (a page each).
    `stop()` (at shutdown) ends every watch within `block_ms` with UNAVAILABLE.
    Needs Redis 7.0+ (`entries-added`), as do the scripts' `#!lua` flags.

Initial metadata
    Once the watch is positioned (after validation, before the first event) the
    server sends initial metadata `tally-position`: the position it starts after.
    Every event that happens after a client has received it is in the stream, and a
    client that gets no event can still resume from it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import re
import zlib
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import msgpack
import redis.asyncio as aioredis
from prometheus_client import Counter, Gauge
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.maint_notifications import MaintNotificationsConfig

from tally import metrics
from tally.api import validation
from tally.api.errors import rich_status
from tally.domain.errors import InvalidArgument, NotFound, TallyError
from tally.ledger.backend import EntryRow, SqlLedger
from tally.store.keys import KeySpace
from tally.v1 import usage_pb2

log = logging.getLogger("tally.watch")

MAX_WATCHERS = 256  # concurrent watches per server, each with its own Redis connection
BATCH = 100  # stream entries per stream (or ledger rows) per read
BLOCK_MS = 1000  # longest XREAD BLOCK; a cancelled watch is noticed within it
LEDGER_READS_MAX = 4  # watches reading the ledger at once (they share it with the flusher)
MAX_SEQ = 2**53 - 1
TOKEN_PREFIX = "v1."
TOKEN_CHARS_MAX = 256 * 1024

POSITION_METADATA = "tally-position"  # initial metadata: where the watch starts

Ready = Callable[[str], Awaitable[None]]

WATCHERS = Gauge(
    "tally_watchers",
    "WatchUsage streams running on this server",
    registry=metrics.REGISTRY,
)
WATCHES_REFUSED = Counter(
    "tally_watches_refused_total",
    "WatchUsage calls refused with RESOURCE_EXHAUSTED (max_watchers reached)",
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

_SEQ_TEXT = re.compile(r"[0-9]{1,16}")


class _Refused(Exception):
    """Ends a watch with a status (raised where no context is at hand)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


# --- stream ids and cursors ----------------------------------------------------


def _id_key(stream_id: str) -> tuple[int, int]:
    ms, _, seq = stream_id.partition("-")
    return int(ms), int(seq or 0)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass(frozen=True)
class _Cursor:
    """The last stream entry consumed, and its number in its stream's history
    (1 for the first entry ever added; 0 with id "0-0": nothing yet)."""

    id: str = "0-0"
    number: int = 0


@dataclass(frozen=True)
class _Info:
    """XINFO STREAM figures, read in the same MULTI as the entries."""

    added: int  # entries ever added (entries-added)
    length: int
    first_id: str | None
    last_id: str  # last-generated-id

    @property
    def gone(self) -> int:
        """Entries numbered up to this were trimmed (the flusher trims a prefix only)."""
        return self.added - self.length


Fields = Mapping[bytes, bytes]


@dataclass
class _ShardRead:
    """What one read found on one stream."""

    shard: int
    missed: int = 0  # entries trimmed before they could be read (a lower bound if not exact)
    exact: bool = True
    reset: bool = False  # the stream was recreated (Redis wiped, or restored from the ledger)
    skip_to: _Cursor | None = None  # the position after the missed entries
    entries: list[tuple[_Cursor, Fields]] = field(default_factory=list)

    @property
    def behind(self) -> bool:
        return self.reset or self.missed > 0 or not self.exact


def _parse_info(reply: Any) -> _Info:
    if isinstance(reply, ResponseError):
        if "no such key" in str(reply).lower():
            return _Info(0, 0, None, "0-0")
        raise reply
    if isinstance(reply, Exception):
        raise reply
    if "entries-added" not in reply:
        raise _Refused(
            grpc.StatusCode.FAILED_PRECONDITION,
            "WatchUsage needs Redis 7.0 or newer (XINFO STREAM entries-added)",
        )
    first = reply.get("first-entry")
    first_id = _text(first[0]) if first and first[0] is not None else None
    return _Info(
        added=int(reply["entries-added"]),
        length=int(reply["length"]),
        first_id=first_id,
        last_id=_text(reply["last-generated-id"]),
    )


def _parse_xread(reply: Any, streams: Sequence[str]) -> list[list[tuple[str, Fields]]]:
    by_name: dict[str, list[tuple[str, Fields]]] = {}
    if isinstance(reply, dict):  # RESP3
        items: list[Any] = [[name, entries] for name, entries in reply.items()]
    else:
        items = list(reply or [])
    for name, entries in items:
        by_name[_text(name)] = [
            (_text(entry_id), fields) for entry_id, fields in entries if fields
        ]
    return [by_name.get(stream, []) for stream in streams]


class _StreamReader:
    """Reads shard streams from cursors, telling exactly what was trimmed unread.

    Every read is one MULTI of XINFO STREAM (per stream) and XREAD (non-blocking
    inside MULTI): numbers up to `entries-added - length` are gone, so the entries
    after a cursor are complete iff the cursor's number is at least that. When
    nothing is new, an XREAD BLOCK waits for the next entry; its reply is kept to
    rescue entries trimmed between it and the MULTI that follows."""

    def __init__(
        self,
        conn: aioredis.Redis,
        streams: Sequence[str],
        cursors: Sequence[_Cursor],
        count: int,
        block_ms: int,
        stopping: asyncio.Event,
    ) -> None:
        self.conn = conn
        self.streams = list(streams)
        self.cursors = list(cursors)
        self.count = count
        self.block_ms = block_ms
        self.stopping = stopping

    async def pull(self) -> list[_ShardRead]:
        """The next reads with something to send (entries or a gap); waits for them."""
        held: list[list[tuple[str, Fields]]] | None = None
        while True:
            if self.stopping.is_set():
                raise _Refused(
                    grpc.StatusCode.UNAVAILABLE,
                    "the server is shutting down; resume after the last position received",
                )
            infos, replies = await self._read()
            reads = []
            for shard in range(len(self.streams)):
                read = self._advance(
                    shard, infos[shard], replies[shard], held[shard] if held else []
                )
                if read.entries or read.behind:
                    reads.append(read)
            if reads:
                return reads
            held = await self._block()

    def _positions(self) -> dict[Any, Any]:
        return {
            stream: cursor.id
            for stream, cursor in zip(self.streams, self.cursors, strict=True)
        }

    async def _read(self) -> tuple[list[_Info], list[list[tuple[str, Fields]]]]:
        async with self.conn.pipeline(transaction=True) as pipe:
            for stream in self.streams:
                pipe.xinfo_stream(stream)
            pipe.xread(self._positions(), count=self.count)
            results = await pipe.execute(raise_on_error=False)
        *info_replies, xread_reply = results
        if isinstance(xread_reply, Exception):
            raise xread_reply
        infos = [_parse_info(reply) for reply in info_replies]
        return infos, _parse_xread(xread_reply, self.streams)

    async def _block(self) -> list[list[tuple[str, Fields]]] | None:
        reply = await self.conn.xread(self._positions(), count=self.count, block=self.block_ms)
        if not reply:
            return None
        return _parse_xread(reply, self.streams)

    def _advance(
        self,
        shard: int,
        info: _Info,
        entries: list[tuple[str, Fields]],
        held: list[tuple[str, Fields]],
    ) -> _ShardRead:
        cursor = self.cursors[shard]
        if info.added < cursor.number or _id_key(cursor.id) > _id_key(info.last_id):
            # The stream is not the one the cursor was taken from: read it from its start.
            self.cursors[shard] = _Cursor()
            return _ShardRead(shard, reset=True, skip_to=_Cursor())
        read = _ShardRead(shard)
        number = cursor.number
        if info.gone > cursor.number:
            # Entries numbered cursor.number+1 .. gone were trimmed. The reply of the
            # XREAD BLOCK before this read may still hold some of them: it began with
            # the oldest entry after the cursor at that time.
            ids = [entry_id for entry_id, _ in held]
            if info.first_id is not None and info.first_id in ids:
                rescued = held[: ids.index(info.first_id)]
                first = info.gone + 1 - len(rescued)
                read.missed = max(0, first - cursor.number - 1)
            else:
                rescued = held
                first = info.gone + 1 - len(rescued)
                read.missed = max(0, first - cursor.number - 1)
                read.exact = not rescued
            number = first - 1
            if read.behind:
                read.skip_to = _Cursor(cursor.id, number)
            for entry_id, fields in rescued:
                number += 1
                read.entries.append((_Cursor(entry_id, number), fields))
            number = info.gone
        for entry_id, fields in entries:
            number += 1
            read.entries.append((_Cursor(entry_id, number), fields))
        if read.entries:
            self.cursors[shard] = read.entries[-1][0]
        elif read.skip_to is not None:
            self.cursors[shard] = _Cursor(cursor.id, info.gone)
        return read


async def _infos(conn: aioredis.Redis, streams: Sequence[str]) -> list[_Info]:
    async with conn.pipeline(transaction=True) as pipe:
        for stream in streams:
            pipe.xinfo_stream(stream)
        replies = await pipe.execute(raise_on_error=False)
    return [_parse_info(reply) for reply in replies]


# --- positions -------------------------------------------------------------------


def _account_position(text: str) -> int | None:
    if not text:
        return None
    if not _SEQ_TEXT.fullmatch(text) or int(text) > MAX_SEQ:
        raise InvalidArgument(
            "after_position must be an event number of the account (decimal, as sent in "
            "UsageEvent.position), or empty for from now",
            field_name="after_position",
        )
    return int(text)


def encode_token(cursors: Sequence[_Cursor]) -> str:
    """An all-accounts position: zlib-compressed JSON of [ms, seq, number] per shard."""
    packed = [[*_id_key(c.id), c.number] for c in cursors]
    raw = zlib.compress(json.dumps(packed, separators=(",", ":")).encode(), 6)
    return TOKEN_PREFIX + base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_token(text: str, shards: int) -> list[_Cursor]:
    bad = InvalidArgument(
        "after_position is not a position of the all-accounts watch of this deployment "
        "(pass a UsageEvent.position it sent, or empty for from now)",
        field_name="after_position",
    )
    if not text.startswith(TOKEN_PREFIX) or len(text) > TOKEN_CHARS_MAX:
        raise bad
    body = text[len(TOKEN_PREFIX):]
    try:
        raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        inflater = zlib.decompressobj()
        data = inflater.decompress(raw, 80 * shards + 64)
        if inflater.unconsumed_tail:
            raise bad
        packed = json.loads(data)
    except (binascii.Error, zlib.error, ValueError):
        raise bad from None
    if not isinstance(packed, list) or len(packed) != shards:
        raise bad
    cursors = []
    for item in packed:
        if (
            not isinstance(item, list)
            or len(item) != 3
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in item)
            or not all(0 <= v < 2**64 for v in item)
        ):
            raise bad
        ms, seq, number = item
        cursors.append(_Cursor(f"{ms}-{seq}", number))
    return cursors


# --- events ----------------------------------------------------------------------


def _int(text: str) -> int:
    if not text:
        return 0
    try:
        return int(text)
    except ValueError:
        return int(float(text))


def _labels(raw: bytes | str | None) -> dict[str, str]:
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except ValueError:
        return {}
    if not isinstance(value, dict):
        return {}
    return {str(k): str(v) for k, v in value.items()}


def stream_event(fields: Fields, position: str) -> usage_pb2.UsageEvent:
    """A stream entry as a UsageEvent (the entry's binary images are ignored)."""

    def text(name: bytes) -> str:
        value = fields.get(name)
        return value.decode() if value else ""

    event = usage_pb2.UsageEvent(
        position=position,
        type=text(b"type"),
        account_id=text(b"account_id"),
        reservation_id=text(b"reservation_id"),
        operation=text(b"operation"),
        units=_int(text(b"units")),
        labels=_labels(fields.get(b"labels")),
        available_after=_int(text(b"available_after")),
        alert=text(b"alert"),
    )
    at = _int(text(b"at"))
    if at:
        event.occurred_at.FromMilliseconds(at)
    return event


def ledger_event(row: EntryRow) -> usage_pb2.UsageEvent:
    event = usage_pb2.UsageEvent(
        position=str(row.seq),
        type=row.type,
        account_id=row.account_id,
        reservation_id=row.reservation_id,
        operation=row.operation,
        units=row.units,
        labels={str(k): str(v) for k, v in row.labels.items()},
        available_after=row.available_after,
        alert=str(row.detail.get("alert", "")),
    )
    if row.occurred_at_ms:
        event.occurred_at.FromMilliseconds(row.occurred_at_ms)
    return event


def _entry_seq(fields: Fields) -> int:
    return int(fields[b"event_id"].decode().rpartition("/")[2])


def _event_seq(blob: bytes) -> int:
    account = msgpack.unpackb(blob, raw=False, strict_map_key=False)
    return int(account.get("event_seq", 0) or 0)


# --- the service -------------------------------------------------------------------


@dataclass
class _Progress:
    account_id: str
    last: int  # the last event number sent


class UsageWatch:
    """Serves WatchUsage (see the module docstring for the semantics)."""

    def __init__(
        self,
        redis: Any,
        keys: KeySpace,
        ledger: SqlLedger,
        *,
        max_watchers: int = MAX_WATCHERS,
        batch: int = BATCH,
        block_ms: int = BLOCK_MS,
    ) -> None:
        if max_watchers < 1 or batch < 1 or block_ms < 1:
            raise ValueError("max_watchers, batch and block_ms must be positive")
        self.redis = redis
        self.keys = keys
        self.ledger = ledger
        self.max_watchers = max_watchers
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
        self.active += 1
        WATCHERS.inc()
        conn: aioredis.Redis | None = None
        try:

            async def ready(position: str) -> None:
                await context.send_initial_metadata(((POSITION_METADATA, position),))

            if request.account_id:
                account_id = validation.account_id(request.account_id)
                after = _account_position(request.after_position)
                conn = self._connect()
                events = self._watch_account(conn, account_id, after, ready)
            else:
                cursors = (
                    decode_token(request.after_position, self.keys.shards)
                    if request.after_position
                    else None
                )
                conn = self._connect()
                events = self._watch_all(conn, cursors, ready)
            async with contextlib.aclosing(events):
                async for event in events:
                    yield event
        except TallyError as error:
            await context.abort_with_status(rich_status(error))
        except _Refused as refused:
            await context.abort(refused.code, refused.details)
        except (RedisConnectionError, RedisTimeoutError) as exc:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                f"the store is unreachable ({type(exc).__name__}); resume from the last position",
            )
        except RedisError as exc:
            log.exception("watch failed")
            await context.abort(grpc.StatusCode.INTERNAL, f"the store refused a read: {exc}")
        finally:
            self.active -= 1
            WATCHERS.dec()
            if conn is not None:
                with contextlib.suppress(Exception):
                    await conn.aclose()

    # --- plumbing -----------------------------------------------------------------

    def _connect(self) -> aioredis.Redis:
        """A connection of the watch's own, with the store's settings (address,
        credentials, timeouts, no retries) but outside the store's pool."""
        pool = self.redis.connection_pool
        kwargs = {
            k: v
            for k, v in pool.connection_kwargs.items()
            if k not in ("himport_registry", "maint_notifications_config")
        }
        own = aioredis.ConnectionPool(
            connection_class=pool.connection_class,
            max_connections=1,
            maint_notifications_config=MaintNotificationsConfig(enabled=False),
            **kwargs,
        )
        return aioredis.Redis.from_pool(own)

    def _block_ms(self, conn: aioredis.Redis) -> int:
        """The XREAD BLOCK time: block_ms, and well within the socket timeout."""
        timeout = conn.connection_pool.connection_kwargs.get("socket_timeout")
        if timeout:
            return max(1, min(self.block_ms, int(float(timeout) * 1000 / 2)))
        return self.block_ms

    async def _ledger_rows(self, account_id: str, after_seq: int, limit: int) -> list[EntryRow]:
        try:
            async with self._ledger_reads:
                return await asyncio.to_thread(
                    self.ledger.entries, account_id, after_seq=after_seq, limit=limit
                )
        except Exception as exc:  # the drivers' errors vary by backend
            log.warning("watch: ledger read failed", extra={"error": str(exc)})
            raise _Refused(
                grpc.StatusCode.UNAVAILABLE,
                f"the ledger is unreachable ({type(exc).__name__}); resume from the last position",
            ) from exc

    # --- one account ----------------------------------------------------------------

    async def _watch_account(
        self, conn: aioredis.Redis, account_id: str, after: int | None, ready: Ready
    ) -> AsyncGenerator[usage_pb2.UsageEvent, None]:
        account_key, _, _, stream = self.keys.account_keys(account_id)
        async with conn.pipeline(transaction=True) as pipe:
            pipe.get(account_key)
            pipe.xinfo_stream(stream)
            blob, info_reply = await pipe.execute(raise_on_error=False)
        if isinstance(blob, Exception):
            raise blob
        if blob is None:
            raise NotFound(f"account {account_id} not found", field_name="account_id")
        latest = _event_seq(blob)
        info = _parse_info(info_reply)
        now = _Cursor(info.last_id, info.added)  # every event <= latest is at or before it
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
                start = _Cursor()  # the rest is still in Redis: read the stream from its start
        reader = _StreamReader(
            conn, [stream], [start], self.batch, self._block_ms(conn), self._stopping
        )
        mine = account_id.encode()
        while True:
            for read in await reader.pull():
                if read.behind:
                    # Some entries were trimmed before they were read: the ledger has them.
                    async for event in self._from_ledger(progress):
                        yield event
                for _cursor, fields in read.entries:
                    if fields.get(b"account_id") != mine:
                        continue
                    n = _entry_seq(fields)
                    if n <= progress.last:
                        continue
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
                    yield stream_event(fields, str(n))

    async def _from_ledger(
        self, progress: _Progress, upto: int | None = None
    ) -> AsyncIterator[usage_pb2.UsageEvent]:
        """The account's events after progress.last that the ledger has without a gap
        (up to `upto`), a page at a time."""
        while upto is None or progress.last < upto:
            limit = self.batch if upto is None else min(self.batch, upto - progress.last)
            rows = await self._ledger_rows(progress.account_id, progress.last, limit)
            for row in rows:
                if row.seq != progress.last + 1:
                    return  # the ledger has a gap here: the missing event is still in Redis
                progress.last = row.seq
                _FROM_LEDGER.inc()
                yield ledger_event(row)
            if len(rows) < limit:
                return

    # --- every account ----------------------------------------------------------------

    async def _watch_all(
        self, conn: aioredis.Redis, cursors: list[_Cursor] | None, ready: Ready
    ) -> AsyncGenerator[usage_pb2.UsageEvent, None]:
        shards = self.keys.shards
        streams = [self.keys.events(shard) for shard in range(shards)]
        if cursors is None:
            cursors = [_Cursor(info.last_id, info.added) for info in await _infos(conn, streams)]
        sent = list(cursors)  # what the positions of the events sent so far say
        await ready(encode_token(sent))
        count = max(16, self.batch // shards)
        reader = _StreamReader(
            conn, streams, cursors, count, self._block_ms(conn), self._stopping
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
                    type="fell_behind",
                    alert=self._behind_text(behind),
                )
            merged = sorted(
                (
                    (_id_key(cursor.id), read.shard, cursor, fields)
                    for read in reads
                    for cursor, fields in read.entries
                ),
                key=lambda item: (item[0], item[1]),
            )
            for _key, shard, cursor, fields in merged:
                sent[shard] = cursor
                _FROM_REDIS.inc()
                yield stream_event(fields, encode_token(sent))

    def _behind_text(self, behind: Sequence[_ShardRead]) -> str:
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
