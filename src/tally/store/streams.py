"""The shards' event streams: the one place that reads, acknowledges and trims them.

The flusher reads each shard's stream through the consumer group `ledger`
(claiming what a dead consumer left pending), acknowledges what the ledger
has, and trims what every consumer has acknowledged: one stream (one hash slot) per
command, so a Redis Cluster serves them as a single Redis does. Watchers tail
the streams on connections of their own (`tail`, store/stream_tail.py). Every
failure comes out as a domain error (store/failures.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ResponseError

from tally.domain.events import StreamEntry, decode, stream_id_order
from tally.store.failures import redis_errors
from tally.store.keys import KeySpace
from tally.store.quota_store import QuotaStore
from tally.store.stream_tail import Node, StreamInfo, StreamTail, parse_stream_info

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
class StreamState:
    """A shard's stream figures and its ledger group's (XINFO STREAM, XINFO GROUPS)."""

    shard: int
    info: StreamInfo
    pending: int
    delivered: str | None  # the group's last delivered id; None: no stream or no group

    @classmethod
    def of(cls, shard: int, info_reply: Any, groups_reply: Any) -> StreamState:
        if isinstance(info_reply, ResponseError) or isinstance(groups_reply, ResponseError):
            return cls(shard, parse_stream_info(info_reply), 0, None)  # no stream yet
        ours = [g for g in groups_reply if _text(g["name"]) == GROUP]
        if not ours:
            return cls(shard, parse_stream_info(info_reply), 0, None)
        group = ours[0]
        return cls(
            shard, parse_stream_info(info_reply), int(group["pending"]),
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


class EventStreams:
    def __init__(self, redis: Any, keys: KeySpace) -> None:
        self.redis = redis  # the store's client (store/client.py RedisClient)
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
        """Redis's clock and every shard's stream and group figures: TIME, then one
        pipelined round trip (per master on a cluster, where a keyless TIME cannot
        share a pipeline) of XINFO STREAM and XINFO GROUPS per shard."""
        with redis_errors():
            now_ms = await self._now_ms()
            async with self.redis.pipeline(transaction=False) as pipe:
                for shard in range(self.keys.shards):
                    pipe.xinfo_stream(self.keys.events(shard))
                    pipe.xinfo_groups(self.keys.events(shard))
                replies = await pipe.execute(raise_on_error=False)
            states = [
                StreamState.of(shard, replies[2 * shard], replies[2 * shard + 1])
                for shard in range(self.keys.shards)
            ]
        return now_ms, states

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
        """Connections of the caller's own (store/stream_tail.py): a blocking XREAD
        holds its connection, and must never take one the hot path needs."""
        if isinstance(self.redis, RedisCluster):
            timeout = self.redis.connection_kwargs.get("socket_timeout")
            return StreamTail(
                self.keys, self._cluster_node, cross_slot=False, socket_timeout_s=timeout
            )
        pool = self.redis.connection_pool
        node = Node("redis", pool.connection_class, dict(pool.connection_kwargs))
        timeout = pool.connection_kwargs.get("socket_timeout")
        return StreamTail(
            self.keys, lambda _shard: node, cross_slot=True, socket_timeout_s=timeout
        )

    def _cluster_node(self, shard: int) -> Node:
        """The master that holds the shard's keys now (the cluster client's slot table)."""
        cluster: RedisCluster = self.redis
        master = cluster.nodes_manager.get_node_from_slot(
            cluster.keyslot(self.keys.events(shard))
        )
        return Node(master.name, master.connection_class, master.connection_kwargs)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
