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
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

# Commands in one pipelined write, at most; more wait for the next write.
PIPELINE_COMMANDS_MAX = 256
# Connections the pipeline keeps between its writes, at most (and never more than
# an eighth of the pool, so that the pool's other users are not starved): taken
# again without the pool's lock, condition and wait timer (every write needs one);
# the others go back to the pool.
CONNECTIONS_KEPT = 8

Command = tuple[Any, ...]


class _Call:
    __slots__ = ("command", "reply")

    def __init__(self, command: Command, reply: asyncio.Future[Any]) -> None:
        self.command = command
        self.reply = reply


class ScriptPipeline:
    """Sends the commands submitted during one loop pass together (after the
    pass: call_soon), on one connection of the client's pool. With a window
    (seconds), the first command of a write waits that long for others."""

    def __init__(self, redis: aioredis.Redis, window_s: float = 0.0) -> None:
        self.redis = redis
        self.window_s = window_s
        self._waiting: list[_Call] = []
        self._writers: set[asyncio.Task[None]] = set()
        self._kept: list[AbstractConnection] = []
        self._kept_max = min(CONNECTIONS_KEPT, redis.connection_pool.max_connections // 8)

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
        """A kept connection still open with nothing unread, or one from the pool
        (which checks it and reconnects it as it does for every command)."""
        pool = self.redis.connection_pool
        while self._kept:
            connection = self._kept.pop()
            try:
                if connection.is_connected and not await connection.can_read():
                    return connection
            except RedisConnectionError:  # closed meanwhile (a Redis restart)
                pass
            await pool.release(connection)
        fresh: AbstractConnection = await pool.get_connection()  # type: ignore[no-untyped-call]
        return fresh

    async def _send(self, calls: Sequence[_Call]) -> None:
        pool = self.redis.connection_pool
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
            if calls:
                await connection.send_packed_command(
                    connection.pack_commands([call.command for call in calls]),
                    check_health=False,
                )
            for index, call in enumerate(calls):
                try:
                    value = await connection.read_response()
                except ResponseError as error:  # Redis answered this command with an error
                    if not call.reply.done():
                        call.reply.set_exception(error)
                    continue
                except BaseException as exc:
                    await connection.disconnect()
                    _fail(calls[index:], exc)
                    if not isinstance(exc, Exception):
                        raise
                    return
                if not call.reply.done():
                    call.reply.set_result(value)
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
                await pool.release(connection)


def _fail(calls: Sequence[_Call], error: BaseException) -> None:
    if not isinstance(error, Exception):  # cancelled: the callers are told so
        error = asyncio.CancelledError()
    for call in calls:
        if not call.reply.done():
            call.reply.set_exception(error)
