"""Watchers' reads of the shard streams (no consumer group), on connections of their own.

A blocking XREAD holds its connection, so a watcher never takes one from the
store's pool (the hot path's): it opens one connection per Redis node its
shards live on (a single Redis: one; a cluster: one per master it reads from),
with the store's settings (address, credentials, timeouts, no retries).

Each read is, per shard, one MULTI of XINFO STREAM and XREAD: the figures say
exactly what was trimmed before the entries (api/watch/reader.py). A cluster
refuses a MULTI or a multi-key command across hash slots (CROSSSLOT), so the
per-shard MULTIs of one node go out in one write, and nodes are read side by
side. Waiting for new entries is one XREAD BLOCK over every stream on a single
Redis, and on a cluster too when the streams share one slot (one shard: a
single-account watch); other cluster watches poll every WAIT_POLL_S, a
pipelined non-blocking XREAD per node, until one has entries or the wait is over.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ResponseError
from redis.maint_notifications import MaintNotificationsConfig

from tally.domain.errors import FailedPrecondition
from tally.domain.events import StreamEntry, decode
from tally.store.failures import redis_errors
from tally.store.keys import KeySpace

# How often a cluster watch over several slots asks for new entries while it waits.
WAIT_POLL_S = 0.1
# Connection settings of the store's that a connection of the watcher's own must not share.
_NOT_SHARED = ("himport_registry", "maint_notifications_config", "retry", "event_dispatcher")


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

# (shard, stream id): read the shard's entries after that id
Position = tuple[int, str]


@dataclass(frozen=True)
class Node:
    """Where a watcher reads some of its shards: a Redis node, by name, and how to
    connect to it."""

    name: str
    connection_class: type[Any]
    connection_kwargs: dict[str, Any]

    def connect(self) -> aioredis.Redis:
        """One connection of its own (a pool of one), never retried."""
        kwargs = {k: v for k, v in self.connection_kwargs.items() if k not in _NOT_SHARED}
        pool = aioredis.ConnectionPool(
            connection_class=self.connection_class,
            max_connections=1,
            retry=Retry(NoBackoff(), retries=0),
            maint_notifications_config=MaintNotificationsConfig(enabled=False),
            **kwargs,
        )
        return aioredis.Redis.from_pool(pool)


class StreamTail:
    """Reads shard streams on connections of its own (opened on first use, one per
    node); close it after.

    node_of: the node holding a shard's keys now (asked at each read: a watch
    follows a slot to a promoted replica). cross_slot: whether one command may name
    streams of several shards (a single Redis; not a cluster). socket_timeout_s:
    the connections' (a blocking read stays well within it)."""

    def __init__(
        self,
        keys: KeySpace,
        node_of: Callable[[int], Node],
        *,
        cross_slot: bool,
        socket_timeout_s: float | None,
    ) -> None:
        self.keys = keys
        self._node_of = node_of
        self.cross_slot = cross_slot
        self.socket_timeout_s = socket_timeout_s
        self._conns: dict[str, aioredis.Redis] = {}

    async def close(self) -> None:
        for conn in self._conns.values():
            with contextlib.suppress(Exception):
                await conn.aclose()
        self._conns.clear()

    def block_ms(self, wanted_ms: int) -> int:
        """An XREAD BLOCK time of at most wanted_ms, and well within the socket timeout."""
        if self.socket_timeout_s:
            return max(1, min(wanted_ms, int(self.socket_timeout_s * 1000 / 2)))
        return wanted_ms

    def _conn(self, shard: int) -> aioredis.Redis:
        node = self._node_of(shard)
        conn = self._conns.get(node.name)
        if conn is None:
            conn = self._conns[node.name] = node.connect()
        return conn

    def _by_node(self, shards: Sequence[int]) -> list[tuple[aioredis.Redis, list[int]]]:
        """The indexes into `shards`, grouped by the connection that reads them."""
        groups: dict[int, tuple[aioredis.Redis, list[int]]] = {}
        for index, shard in enumerate(shards):
            conn = self._conn(shard)
            groups.setdefault(id(conn), (conn, []))[1].append(index)
        return list(groups.values())

    async def account_head(self, account_id: str) -> tuple[int | None, StreamInfo]:
        """The account's last event number (None: no such account) and its shard's
        stream figures, read at one instant (the keys share the shard's slot)."""
        shard = self.keys.shard_of(account_id)
        with redis_errors():
            async with self._conn(shard).pipeline(transaction=True) as pipe:
                pipe.get(self.keys.account_keys(account_id)[0])
                pipe.xinfo_stream(self.keys.events(shard))
                blob, info_reply = await pipe.execute(raise_on_error=False)
            if isinstance(blob, Exception):
                raise blob
            info = parse_stream_info(info_reply)
        if blob is None:
            return None, info
        account = msgpack.unpackb(blob, raw=False, strict_map_key=False)
        return int(account.get("event_seq", 0) or 0), info

    async def infos(self, shards: Sequence[int]) -> list[StreamInfo]:
        """Each stream's figures (each read at an instant of its own)."""

        async def on_node(conn: aioredis.Redis, indexes: list[int]) -> list[Any]:
            async with conn.pipeline(transaction=False) as pipe:
                for index in indexes:
                    pipe.xinfo_stream(self.keys.events(shards[index]))
                return list(await pipe.execute(raise_on_error=False))

        replies = await self._per_node(shards, on_node)
        with redis_errors():
            return [parse_stream_info(reply) for reply in replies]

    async def read(
        self, positions: Sequence[Position], count: int
    ) -> tuple[list[StreamInfo], list[list[StreamEntry]]]:
        """Each stream's figures and its next entries (at most count), per stream in
        one MULTI: the figures say exactly what was trimmed before the entries."""
        shards = [shard for shard, _ in positions]

        async def on_node(conn: aioredis.Redis, indexes: list[int]) -> list[Any]:
            blocks = [
                [
                    ("XINFO", "STREAM", self.keys.events(positions[index][0])),
                    ("XREAD", "COUNT", count, "STREAMS",
                     self.keys.events(positions[index][0]), positions[index][1]),
                ]
                for index in indexes
            ]
            return [
                [_parsed(conn, "XINFO STREAM", info), _parsed(conn, "XREAD", entries)]
                for info, entries in await _transactions(conn, blocks)
            ]

        replies = await self._per_node(shards, on_node)
        infos: list[StreamInfo] = []
        entries: list[list[StreamEntry]] = []
        with redis_errors():
            for (shard, _), (info, xread) in zip(positions, replies, strict=True):
                infos.append(parse_stream_info(info))
                if isinstance(xread, Exception):
                    raise xread
                entries.append(self._entries(xread, [shard])[0])
        return infos, entries

    async def wait(
        self, positions: Sequence[Position], count: int, block_ms: int
    ) -> list[list[StreamEntry]] | None:
        """The next entries after the positions, waiting up to block_ms for one
        (None: nothing came)."""
        shards = [shard for shard, _ in positions]
        if self.cross_slot or len(set(shards)) == 1:
            with redis_errors():
                reply = await self._conn(shards[0]).xread(
                    self._streams(positions), count=count, block=block_ms
                )
            return self._entries(reply, shards) if reply else None
        loop = asyncio.get_running_loop()
        until = loop.time() + block_ms / 1000
        while True:
            found = await self._poll(positions, count)
            if any(found):
                return found
            left = until - loop.time()
            if left <= 0:
                return None
            await asyncio.sleep(min(WAIT_POLL_S, left))

    async def _poll(self, positions: Sequence[Position], count: int) -> list[list[StreamEntry]]:
        """Each stream's next entries after its position (no wait), one XREAD per stream."""
        shards = [shard for shard, _ in positions]

        async def on_node(conn: aioredis.Redis, indexes: list[int]) -> list[Any]:
            async with conn.pipeline(transaction=False) as pipe:
                for index in indexes:
                    pipe.xread(self._streams([positions[index]]), count=count)
                return list(await pipe.execute())

        replies = await self._per_node(shards, on_node)
        return [
            self._entries(reply, [shard])[0] for shard, reply in zip(shards, replies, strict=True)
        ]

    async def _per_node(
        self,
        shards: Sequence[int],
        work: Callable[[aioredis.Redis, list[int]], Any],
    ) -> list[Any]:
        """work(connection, indexes) on every node at once; its replies, in shard order."""
        with redis_errors():
            groups = self._by_node(shards)
            results = await asyncio.gather(*(work(conn, indexes) for conn, indexes in groups))
        replies: list[Any] = [None] * len(shards)
        for (_, indexes), result in zip(groups, results, strict=True):
            for index, reply in zip(indexes, result, strict=True):
                replies[index] = reply
        return replies

    def _streams(self, positions: Sequence[Position]) -> dict[Any, Any]:
        return {self.keys.events(shard): stream_id for shard, stream_id in positions}

    def _entries(self, reply: Any, shards: Sequence[int]) -> list[list[StreamEntry]]:
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
            for shard in shards
        ]


async def _transactions(
    conn: aioredis.Redis, blocks: Sequence[Sequence[tuple[Any, ...]]]
) -> list[Any]:
    """Each block of commands in a MULTI of its own, every block in one write; per
    block, what its EXEC answered (raw: no reply callbacks). A block's keys share a
    slot; the blocks' may not (a cluster refuses one MULTI across slots)."""
    pool = conn.connection_pool
    connection = await pool.get_connection()  # type: ignore[no-untyped-call]
    try:
        commands: list[tuple[Any, ...]] = []
        for block in blocks:
            commands.extend([("MULTI",), *block, ("EXEC",)])
        await connection.send_packed_command(connection.pack_commands(commands))
        replies = []
        for block in blocks:
            for _ in range(len(block) + 1):  # OK for MULTI, QUEUED for each command
                await connection.read_response()
            replies.append(await connection.read_response())
    except BaseException:
        # an answer may be left unread on the connection: it cannot serve another read
        await connection.disconnect()
        raise
    finally:
        await pool.release(connection)
    return replies


def _parsed(conn: aioredis.Redis, command: str, raw: Any) -> Any:
    """A reply from inside an EXEC, as redis-py returns it for the command alone."""
    if isinstance(raw, Exception):
        return raw
    return conn.response_callbacks[command](raw)


def parse_stream_info(reply: Any) -> StreamInfo:
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
