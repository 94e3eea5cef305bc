"""The store's connection pool: a caller waits for a free connection, never
refused because all of them are in use.

redis-py's default pool raises MaxConnectionsError when exhausted, which reads
as "Redis unreachable"; under a burst of calls on a healthy Redis that turned
one call in five into UNAVAILABLE.
"""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError


class ConnectionWaitExpired(RedisConnectionError):
    """The pool's wait for a free connection ran out (not a failure of Redis)."""

    def __init__(self, wait_s: float) -> None:
        super().__init__(f"no connection came free within {wait_s:g}s")
        self.wait_s = wait_s


class WaitingConnectionPool(aioredis.BlockingConnectionPool):
    """Waits in turn for a free connection. An enclosing asyncio.timeout (the
    call's deadline) ends the wait sooner; the pool's own `timeout` bounds the
    wait of a caller without one."""

    def __init__(self, *, timeout: float, **kwargs: object) -> None:
        super().__init__(timeout=timeout, **kwargs)  # type: ignore[arg-type]
        self.wait_s = timeout

    async def get_connection(self) -> AbstractConnection:  # type: ignore[override]
        waiting = super().get_connection()  # type: ignore[no-untyped-call]
        try:
            connection: AbstractConnection = await waiting
        except RedisConnectionError as exc:
            # Only the pool's own wait chains from asyncio's timeout; a connection
            # that fails to open chains from an OSError or raises TimeoutError.
            if isinstance(exc.__cause__, asyncio.TimeoutError):
                raise ConnectionWaitExpired(self.wait_s) from exc
            raise
        return connection
