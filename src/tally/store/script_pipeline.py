"""Script calls issued in the same event-loop pass go out together: one pipelined
write on one pooled connection, then their replies read in order.

Under load many calls reach the store in the same pass of the loop (grpc.aio
hands over the requests one socket read brought); sending each as its own
FCALL costs a pool round trip, a write and a read per call. Sent together,
they share them. Nothing else changes: each call is still one FCALL (or
FCALL_RO) that Redis runs alone, never retried; an error reply goes to its
own call only; a connection that breaks fails the calls it carried that have
no reply yet (their scripts may or may not have run, as with a single call),
and no other. A call whose caller gave up (its deadline passed) before the
batch had a connection is not sent at all.

With a replica wait (`--redis-wait-replicas`), a write that carries a FCALL
ends with `WAIT n timeout`: Redis answers it once n replicas have every write
this connection made, so no script call of the write is acknowledged before
its replicas hold it. Fewer replicas in time fail the write's FCALLs with
ReplicaWaitShortfall (UNAVAILABLE: they ran on the master; a retry with the same
idempotency key replays them).

A pipeline sends on one Redis: a single server's pool (PoolSource), or one
cluster master (store/cluster.py gives each master its own pipeline).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from redis.asyncio.connection import AbstractConnection, ConnectionPool
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError

# Commands in one pipelined write, at most; more wait for the next write.
PIPELINE_COMMANDS_MAX = 256
# Connections the pipeline keeps between its writes, at most (and never more than
# an eighth of the pool, so that the pool's other users are not starved): taken
# again without the pool's lock, condition and wait timer (every write needs one);
# the others go back to the pool.
CONNECTIONS_KEPT = 8

Command = tuple[Any, ...]


@dataclass(frozen=True)
class ReplicaWait:
    """Acknowledge a write only once `replicas` replicas have it, waiting at most
    timeout_ms for them."""

    replicas: int
    timeout_ms: int


class ReplicaWaitShortfall(RedisError):
    """Fewer replicas than asked confirmed a write in time: the scripts ran on
    the master, and a failover now could lose them."""

    def __init__(self, confirmed: int, wait: ReplicaWait) -> None:
        super().__init__(
            f"{confirmed} of {wait.replicas} replicas confirmed the write within "
            f"{wait.timeout_ms} ms"
        )
        self.confirmed = confirmed


class ConnectionSource(Protocol):
    """Where a pipeline takes its connections from, and gives them back."""

    max_connections: int

    async def acquire(self) -> AbstractConnection: ...

    async def release(self, connection: AbstractConnection) -> None: ...


class PoolSource:
    """A single Redis server's connection pool."""

    def __init__(self, pool: ConnectionPool) -> None:
        self.pool = pool
        self.max_connections = pool.max_connections

    async def acquire(self) -> AbstractConnection:
        connection: AbstractConnection = await self.pool.get_connection()  # type: ignore[no-untyped-call]
        return connection

    async def release(self, connection: AbstractConnection) -> None:
        await self.pool.release(connection)


class _Call:
    __slots__ = ("command", "reply")

    def __init__(self, command: Command, reply: asyncio.Future[Any]) -> None:
        self.command = command
        self.reply = reply


class ScriptPipeline:
    """Sends the commands submitted during one loop pass together (after the
    pass: call_soon), on one connection of the client's pool. With a window
    (seconds), the first command of a write waits that long for others."""

    def __init__(
        self, source: ConnectionSource, window_s: float = 0.0, wait: ReplicaWait | None = None
    ) -> None:
        self.source = source
        self.window_s = window_s
        self.wait = wait
        self._waiting: list[_Call] = []
        self._writers: set[asyncio.Task[None]] = set()
        self._kept: list[AbstractConnection] = []
        self._kept_max = min(CONNECTIONS_KEPT, source.max_connections // 8)

    @property
    def kept(self) -> int:
        """Connections kept between writes now."""
        return len(self._kept)

    async def execute(self, *command: Any) -> Any:
        """The reply to one command, sent with the others of this loop pass.
        Redis's error reply is raised as redis-py raises it."""
        loop = asyncio.get_running_loop()
        reply: asyncio.Future[Any] = loop.create_future()
        if not self._waiting:
            if self.window_s > 0:
                loop.call_later(self.window_s, self._write)
            else:
                loop.call_soon(self._write)
        self._waiting.append(_Call(command, reply))
        return await reply

    def _write(self) -> None:
        waiting, self._waiting = self._waiting, []
        for start in range(0, len(waiting), PIPELINE_COMMANDS_MAX):
            writer = asyncio.ensure_future(
                self._send(waiting[start:start + PIPELINE_COMMANDS_MAX])
            )
            self._writers.add(writer)
            writer.add_done_callback(self._writers.discard)

    async def _connection(self) -> AbstractConnection:
        """A kept connection still open with nothing unread, or one from the source
        (which checks it and reconnects it as it does for every command)."""
        while self._kept:
            connection = self._kept.pop()
            try:
                if connection.is_connected and not await connection.can_read():
                    return connection
            except RedisConnectionError:  # closed meanwhile (a Redis restart)
                pass
            await self.source.release(connection)
        return await self.source.acquire()

    async def close(self) -> None:
        """Gives the kept connections back (their Redis left the topology)."""
        kept, self._kept = self._kept, []
        for connection in kept:
            await connection.disconnect()
            await self.source.release(connection)

    async def _send(self, calls: Sequence[_Call]) -> None:
        try:
            connection = await self._connection()
        except BaseException as exc:
            _fail(calls, exc)
            if not isinstance(exc, Exception):
                raise
            return
        clean = False  # every reply read: the connection may be kept for the next write
        try:
            calls = [call for call in calls if not call.reply.done()]  # callers gone: unsent
            commands = [call.command for call in calls]
            waits = self.wait is not None and any(c[0] == "FCALL" for c in commands)
            if waits:
                assert self.wait is not None
                commands.append(("WAIT", self.wait.replicas, self.wait.timeout_ms))
            if commands:
                await connection.send_packed_command(
                    connection.pack_commands(commands), check_health=False
                )
            replies: list[tuple[bool, Any]] = []  # (is an error reply, value)
            for index in range(len(commands)):
                try:
                    replies.append((False, await connection.read_response()))
                except ResponseError as error:  # Redis answered this command with an error
                    replies.append((True, error))
                except BaseException as exc:
                    await connection.disconnect()
                    _fail(calls[index:], exc)
                    _answer(calls[:index], replies, None)
                    if not isinstance(exc, Exception):
                        raise
                    return
            shortfall = None
            if waits:
                assert self.wait is not None
                confirmed = replies.pop()[1]
                if isinstance(confirmed, Exception):
                    shortfall = confirmed
                elif int(confirmed) < self.wait.replicas:
                    shortfall = ReplicaWaitShortfall(int(confirmed), self.wait)
            _answer(calls, replies, shortfall)
            clean = True
        except BaseException as exc:  # the write failed: none of these calls has a reply
            await connection.disconnect()
            _fail(calls, exc)
            if not isinstance(exc, Exception):
                raise
        finally:
            if clean and len(self._kept) < self._kept_max:
                self._kept.append(connection)
            else:
                await self.source.release(connection)


def _answer(
    calls: Sequence[_Call], replies: Sequence[tuple[bool, Any]], shortfall: Exception | None
) -> None:
    """Each call its reply; a write call (FCALL) whose replicas fell short, the shortfall."""
    for call, (failed, value) in zip(calls, replies, strict=False):
        if call.reply.done():
            continue
        if failed:
            call.reply.set_exception(value)
        elif shortfall is not None and call.command[0] == "FCALL":
            call.reply.set_exception(shortfall)
        else:
            call.reply.set_result(value)


def _fail(calls: Sequence[_Call], error: BaseException) -> None:
    if not isinstance(error, Exception):  # cancelled: the callers are told so
        error = asyncio.CancelledError()
    for call in calls:
        if not call.reply.done():
            call.reply.set_exception(error)
