"""The shards' event streams: the one place that reads, acknowledges and trims them.

The flusher reads each shard's stream through the consumer group `ledger`
(claiming what a dead consumer left pending), acknowledges what the ledger
has, and trims what every consumer has acknowledged. Watchers tail the
streams on connections of their own (`tail`). Every failure comes out as a
domain error (store/failures.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import redis.asyncio as aioredis
from redis.exceptions import ResponseError
from redis.maint_notifications import MaintNotificationsConfig

from tally.domain.errors import FailedPrecondition
from tally.domain.events import StreamEntry, decode, stream_id_order
from tally.store.failures import redis_errors
from tally.store.keys import KeySpace
from tally.store.quota_store import QuotaStore

GROUP = "ledger"
LAG_COUNT_MAX = 10_000  # "waiting" is a lower bound beyond this


@dataclass(frozen=True)
class ShardLag:
    shard: int
    length: int
    pending: int
    waiting: int
    oldest_unflushed_ms: int  # 0 when nothing waits


@dataclass(frozen=True)
class Delivery:
    """What one read through the group handed a consumer."""

    ids: list[str]  # every id delivered: acknowledge them all
    entries: list[StreamEntry]  # the ones still in the stream (deleted ones have no fields)


@dataclass(frozen=True)
class StreamInfo:
    """XINFO STREAM figures."""

    added: int  # entries ever added (entries-added)
    length: int
    first_id: str | None
    last_id: str  # last-generated-id

    @property
    def gone(self) -> int:
        """Entries numbered up to this were trimmed (the flusher trims a prefix only)."""
        return self.added - self.length


NO_STREAM = StreamInfo(0, 0, None, "0-0")


@dataclass(frozen=True)
class StreamState:
    """A shard's stream figures and its ledger group's (XINFO STREAM, XINFO GROUPS)."""

    shard: int
    info: StreamInfo
    pending: int
    delivered: str | None  # the group's last delivered id; None: no stream or no group

    @classmethod
    def of(cls, shard: int, info_reply: Any, groups_reply: Any) -> StreamState:
        if isinstance(info_reply, ResponseError) or isinstance(groups_reply, ResponseError):
            return cls(shard, _parse_info(info_reply), 0, None)  # no stream yet
        ours = [g for g in groups_reply if _text(g["name"]) == GROUP]
        if not ours:
            return cls(shard, _parse_info(info_reply), 0, None)
        group = ours[0]
        return cls(
            shard, _parse_info(info_reply), int(group["pending"]),
            _text(group["last-delivered-id"]),
        )

    @property
    def idle(self) -> bool:
        """A group that has delivered every entry, none of them pending."""
        return (
            self.delivered is not None
            and not self.pending
            and stream_id_order(self.delivered) >= stream_id_order(self.info.last_id)
        )

    def has_work(self, retention_ms: int, now_ms: int) -> bool:
        """Whether a flush would read, claim or trim anything: entries the group has not
        delivered, entries pending (at any consumer), acknowledged ones a trim would
        remove (EventStreams.trim's floor); or no stream or group yet (made then)."""
        if not self.idle or self.delivered is None:
            return True
        floor = self.delivered
        if retention_ms:
            floor = min(floor, f"{now_ms - retention_ms}-0", key=stream_id_order)
        first = self.info.first_id
        return first is not None and stream_id_order(first) < stream_id_order(floor)

# (shard, stream id): read the shard's entries after that id
Position = tuple[int, str]


class EventStreams:
    def __init__(self, redis: Any, keys: KeySpace) -> None:
        self.redis = redis  # the store's pool (an aioredis.Redis)
        self.keys = keys

    @classmethod
    def of(cls, store: QuotaStore) -> EventStreams:
        """On the store's connection pool and key space."""
        return cls(store.redis, store.keys)

    # --- the ledger's consumer group --------------------------------------------

    async def ensure_groups(self) -> None:
        for shard in range(self.keys.shards):
            await self.ensure_group(shard)

    async def ensure_group(self, shard: int) -> None:
        with redis_errors():
            await self._create_group(self.keys.events(shard))

    async def _create_group(self, stream: str) -> None:
        try:
            await self.redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def shards_with_work(self, retention_ms: int) -> list[int]:
        """The shards whose stream holds something for the flusher (StreamState.has_work),
        found in one pipelined round trip in place of the 7 round trips a flush pass
        spends on an idle shard."""
        now_ms, states = await self.states()
        return [state.shard for state in states if state.has_work(retention_ms, now_ms)]

    async def states(self) -> tuple[int, list[StreamState]]:
        """Redis's clock and every shard's stream and group figures, in one round trip
        (TIME, then XINFO STREAM and XINFO GROUPS per shard)."""
        with redis_errors():
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.time()
                for shard in range(self.keys.shards):
                    pipe.xinfo_stream(self.keys.events(shard))
                    pipe.xinfo_groups(self.keys.events(shard))
                (seconds, micros), *replies = await pipe.execute(raise_on_error=False)
            states = [
                StreamState.of(shard, replies[2 * shard], replies[2 * shard + 1])
                for shard in range(self.keys.shards)
            ]
        return int(seconds) * 1000 + int(micros) // 1000, states

    async def take(self, shard: int, consumer: str, count: int, min_idle_ms: int) -> Delivery:
        """The consumer's own pending entries first (a write that failed is retried at
        once), then ones other consumers left idle for min_idle_ms, then new ones:
        at most `count` of each."""
        stream = self.keys.events(shard)
        with redis_errors():
            try:
                return await self._take(stream, shard, consumer, count, min_idle_ms)
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
            await self._create_group(stream)
            return await self._take(stream, shard, consumer, count, min_idle_ms)

    async def _take(
        self, stream: str, shard: int, consumer: str, count: int, min_idle_ms: int
    ) -> Delivery:
        delivered = await self._read_group(stream, consumer, "0", count)
        claimed = await self.redis.xautoclaim(
            stream, GROUP, consumer, min_idle_time=min_idle_ms, start_id="0-0", count=count,
        )
        delivered.extend(claimed[1])
        delivered.extend(await self._read_group(stream, consumer, ">", count))
        return Delivery(
            ids=[_text(sid) for sid, _ in delivered],
            entries=[decode(shard, sid, fields) for sid, fields in delivered if fields],
        )

    async def _read_group(
        self, stream: str, consumer: str, position: str, count: int
    ) -> list[Any]:
        reply = await self.redis.xreadgroup(GROUP, consumer, {stream: position}, count=count)
        return [entry for _, messages in reply for entry in messages]

    async def acknowledge(self, shard: int, ids: Sequence[str]) -> None:
        with redis_errors():
            await self.redis.xack(self.keys.events(shard), GROUP, *ids)

    async def entries(self, shard: int) -> list[StreamEntry]:
        """Every entry the shard's stream holds (recovery: bounded by what the
        flusher has not trimmed yet)."""
        with redis_errors():
            raw = await self.redis.xrange(self.keys.events(shard))
        return [decode(shard, sid, fields) for sid, fields in raw if fields]

    async def set_aside(self, shard: int, ids: Sequence[str]) -> None:
        """Acknowledges and deletes entries, so no flusher reads them again."""
        with redis_errors():
            await self.redis.xack(self.keys.events(shard), GROUP, *ids)
            await self.redis.xdel(self.keys.events(shard), *ids)

    async def trim(self, shard: int, retention_ms: int) -> None:
        """Removes entries before the oldest one not yet acknowledged (MINID, never by
        length), keeping acknowledged ones younger than retention_ms."""
        stream = self.keys.events(shard)
        with redis_errors():
            # The group's position first, the pending entries second: whatever another
            # consumer reads in between comes after that position, so it stays.
            floor = await self._delivered_through(stream)
            if floor is None:
                return
            summary = await self.redis.xpending(stream, GROUP)
            if summary["pending"]:
                floor = min(floor, _text(summary["min"]), key=stream_id_order)
            if retention_ms:
                kept_from = f"{await self._now_ms() - retention_ms}-0"
                floor = min(floor, kept_from, key=stream_id_order)
            await self.redis.xtrim(stream, minid=floor, approximate=False)

    async def last_id(self, shard: int) -> str:
        """The id of the newest entry ever added to the shard's stream."""
        with redis_errors():
            info = await self.redis.xinfo_stream(self.keys.events(shard))
        return _text(info["last-generated-id"])

    async def acknowledged_through(self, shard: int, target: str) -> bool:
        """Whether the group has delivered and acknowledged every entry up to target."""
        stream = self.keys.events(shard)
        with redis_errors():
            delivered = await self._delivered_through(stream)
            if delivered is None or stream_id_order(delivered) < stream_id_order(target):
                return False
            pending = await self.redis.xpending_range(stream, GROUP, min="-", max=target, count=1)
        return not pending

    async def _delivered_through(self, stream: str) -> str | None:
        """The group's last delivered id (None: no group)."""
        groups = await self.redis.xinfo_groups(stream)
        ours = [g for g in groups if _text(g["name"]) == GROUP]
        return _text(ours[0]["last-delivered-id"]) if ours else None

    async def lag(self) -> list[ShardLag]:
        """Every shard's lag; an idle shard's (nothing undelivered or pending) from the
        one pipelined read of states(), the others' with four more round trips each."""
        now_ms, states = await self.states()
        with redis_errors():
            return [
                ShardLag(state.shard, state.info.length, 0, 0, 0) if state.idle
                else await self._shard_lag(state.shard, now_ms)
                for state in states
            ]

    async def _shard_lag(self, shard: int, now_ms: int) -> ShardLag:
        stream = self.keys.events(shard)
        length = await self.redis.xlen(stream)
        pending = 0
        waiting = length
        oldest = 0
        with contextlib.suppress(ResponseError):
            summary = await self.redis.xpending(stream, GROUP)
            pending = int(summary["pending"])
            last = await self._delivered_through(stream) or "0-0"
            # XINFO's own `lag` is unknown after a trim, so count what follows
            # the last delivered entry (bounded).
            undelivered = await self.redis.xrange(stream, min=f"({last}", count=LAG_COUNT_MAX)
            waiting = pending + len(undelivered)
            candidates = []
            if pending:
                candidates.append(_text(summary["min"]))
            if undelivered:
                candidates.append(_text(undelivered[0][0]))
            if candidates:
                oldest_id = min(candidates, key=stream_id_order)
                oldest = max(0, now_ms - stream_id_order(oldest_id)[0])
        return ShardLag(shard, int(length), pending, waiting, oldest)

    async def _now_ms(self) -> int:
        """Redis's clock, the one stream ids are made from."""
        seconds, micros = await self.redis.time()
        return int(seconds) * 1000 + int(micros) // 1000

    # --- watchers ---------------------------------------------------------------

    def tail(self) -> StreamTail:
        """A connection of the caller's own, with the store's settings (address,
        credentials, timeouts, no retries) but outside the store's pool: a blocking
        XREAD holds its connection, and must never take one the hot path needs."""
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
        return StreamTail(aioredis.Redis.from_pool(own), self.keys)


class StreamTail:
    """Reads shard streams (no group) on one connection of its own; close it after."""

    def __init__(self, conn: aioredis.Redis, keys: KeySpace) -> None:
        self.conn = conn
        self.keys = keys

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.conn.aclose()

    def block_ms(self, wanted_ms: int) -> int:
        """An XREAD BLOCK time of at most wanted_ms, and well within the socket timeout."""
        timeout = self.conn.connection_pool.connection_kwargs.get("socket_timeout")
        if timeout:
            return max(1, min(wanted_ms, int(float(timeout) * 1000 / 2)))
        return wanted_ms

    async def account_head(self, account_id: str) -> tuple[int | None, StreamInfo]:
        """The account's last event number (None: no such account) and its shard's
        stream figures, read at one instant."""
        shard = self.keys.shard_of(account_id)
        with redis_errors():
            async with self.conn.pipeline(transaction=True) as pipe:
                pipe.get(self.keys.account_keys(account_id)[0])
                pipe.xinfo_stream(self.keys.events(shard))
                blob, info_reply = await pipe.execute(raise_on_error=False)
            if isinstance(blob, Exception):
                raise blob
            info = _parse_info(info_reply)
        if blob is None:
            return None, info
        account = msgpack.unpackb(blob, raw=False, strict_map_key=False)
        return int(account.get("event_seq", 0) or 0), info

    async def infos(self, shards: Sequence[int]) -> list[StreamInfo]:
        with redis_errors():
            async with self.conn.pipeline(transaction=True) as pipe:
                for shard in shards:
                    pipe.xinfo_stream(self.keys.events(shard))
                replies = await pipe.execute(raise_on_error=False)
            return [_parse_info(reply) for reply in replies]

    async def read(
        self, positions: Sequence[Position], count: int
    ) -> tuple[list[StreamInfo], list[list[StreamEntry]]]:
        """Each stream's figures and its next entries (at most count), in one MULTI:
        the figures say exactly what was trimmed before the entries."""
        with redis_errors():
            async with self.conn.pipeline(transaction=True) as pipe:
                for shard, _ in positions:
                    pipe.xinfo_stream(self.keys.events(shard))
                pipe.xread(self._streams(positions), count=count)
                results = await pipe.execute(raise_on_error=False)
            *info_replies, xread_reply = results
            if isinstance(xread_reply, Exception):
                raise xread_reply
            infos = [_parse_info(reply) for reply in info_replies]
        return infos, self._entries(xread_reply, positions)

    async def wait(
        self, positions: Sequence[Position], count: int, block_ms: int
    ) -> list[list[StreamEntry]] | None:
        """The next entries after the positions, waiting up to block_ms for one
        (None: nothing came)."""
        with redis_errors():
            reply = await self.conn.xread(self._streams(positions), count=count, block=block_ms)
        if not reply:
            return None
        return self._entries(reply, positions)

    def _streams(self, positions: Sequence[Position]) -> dict[Any, Any]:
        return {self.keys.events(shard): stream_id for shard, stream_id in positions}

    def _entries(self, reply: Any, positions: Sequence[Position]) -> list[list[StreamEntry]]:
        by_name: dict[str, list[tuple[str, Any]]] = {}
        if isinstance(reply, dict):  # RESP3
            items: list[Any] = [[name, entries] for name, entries in reply.items()]
        else:
            items = list(reply or [])
        for name, entries in items:
            by_name[_text(name)] = [
                (_text(entry_id), fields) for entry_id, fields in entries if fields
            ]
        return [
            [decode(shard, sid, fields) for sid, fields in by_name.get(self.keys.events(shard), [])]
            for shard, _ in positions
        ]


def _parse_info(reply: Any) -> StreamInfo:
    if isinstance(reply, ResponseError):
        if "no such key" in str(reply).lower():
            return NO_STREAM
        raise reply
    if isinstance(reply, Exception):
        raise reply
    if "entries-added" not in reply:
        raise FailedPrecondition(
            "WatchUsage needs Redis 7.0 or newer (XINFO STREAM entries-added)"
        )
    first = reply.get("first-entry")
    first_id = _text(first[0]) if first and first[0] is not None else None
    return StreamInfo(
        added=int(reply["entries-added"]),
        length=int(reply["length"]),
        first_id=first_id,
        last_id=_text(reply["last-generated-id"]),
    )


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
