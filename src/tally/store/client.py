"""The Redis connection and script calls: one EVALSHA per call, never retried.

redis-py retries a command after a connection error by default; a retried
EVALSHA that had already run would move units twice. Retries are off; the
only repeat is after NOSCRIPT, which means the script did not run. Callers
retry with their idempotency key instead.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import msgpack
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError
from redis.maint_notifications import MaintNotificationsConfig

from tally import metrics
from tally.domain.errors import (
    ERRORS_BY_CODE,
    DeadlineExceeded,
    ResourceExhausted,
    Shortfall,
    TallyError,
)
from tally.store.contract import FenceMark
from tally.store.failures import (
    HoldNotInStore,
    StoreBusy,
    StoreUnreachable,
    store_error,
    store_errors,
)
from tally.store.fence import ShardBehind
from tally.store.pool import WaitingConnectionPool
from tally.store.script_pipeline import ScriptPipeline
from tally.store.scripts import LuaScript, load_all

# A call with less time left than this is refused before it reaches Redis: it
# could not get its answer back in time anyway, and refusing moves nothing.
DEADLINE_SLACK_S = 0.005


def connect(url: str, *, socket_timeout_s: float, max_connections: int) -> aioredis.Redis:
    """A client whose callers wait in turn for one of max_connections connections,
    up to their deadline and at most socket_timeout_s (then StoreBusy)."""
    pool = WaitingConnectionPool.from_url(
        url,
        timeout=socket_timeout_s,
        socket_timeout=socket_timeout_s,
        socket_connect_timeout=socket_timeout_s,
        retry=Retry(NoBackoff(), retries=0),
        retry_on_timeout=False,
        retry_on_error=[],
        max_connections=max_connections,
        health_check_interval=0,
        # With maintenance notifications on ("auto"), redis-py skips its check for
        # sockets that died with a restarted Redis; without retries that would
        # turn every pooled connection into one UNAVAILABLE after each restart.
        maint_notifications_config=MaintNotificationsConfig(enabled=False),
    )
    return aioredis.Redis.from_pool(pool)


def _decode(value: Any) -> Any:
    """msgpack maps from Lua turn empty tables into empty arrays; keep both usable."""
    return msgpack.unpackb(value, raw=False, strict_map_key=False)


def _raise_script_error(reply: dict[str, Any]) -> None:
    code = reply.get("code", "INTERNAL")
    message = reply.get("message", "")
    field_name = reply.get("field", "")
    if code == "RESOURCE_EXHAUSTED":
        extra = reply.get("extra") or {}
        raise ResourceExhausted(
            message,
            field_name=field_name,
            shortfall=Shortfall(
                account_id=str(extra.get("account_id", "")),
                operation=str(extra.get("operation", "")),
                available=int(extra.get("available", 0)),
                required=int(extra.get("required", 0)),
                budget_id=str(extra.get("budget_id", "")),
            ),
        )
    if code == "NOT_IN_STORE":
        extra = reply.get("extra") or {}
        raise HoldNotInStore(message, field_name=field_name, event_seq=int(extra["event_seq"]))
    if code == ShardBehind.script_code:
        raise ShardBehind(message, field_name=field_name)
    error_cls = ERRORS_BY_CODE.get(code)
    if error_cls is None:
        raise RuntimeError(f"script returned unknown error code {code!r}: {message}")
    raise error_cls(message, field_name=field_name)


@dataclass(frozen=True)
class ScriptResult:
    """A script's result map, and its shard's fence as the run left it (None: the
    script checks no fence)."""

    result: dict[str, Any]
    fence: FenceMark | None


class ScriptRunner:
    """Runs the composed Lua scripts against one Redis connection pool."""

    def __init__(
        self, redis: aioredis.Redis, *, pipelined: bool = True, window_s: float = 0.0
    ) -> None:
        """pipelined: script calls of one event-loop pass (or of window_s) share one
        write (store/script_pipeline.py); off: each call is its own round trip."""
        self.redis = redis
        self.scripts: dict[str, LuaScript] = load_all()
        self.pipeline = ScriptPipeline(redis, window_s) if pipelined else None
        self._execute = redis.execute_command if self.pipeline is None else self.pipeline.execute
        self._durations: dict[str, Any] = {}  # script name -> histogram child

    async def load(self) -> None:
        for script in self.scripts.values():
            sha = await self.redis.script_load(script.source)
            if sha != script.sha:
                raise RuntimeError(
                    f"Redis hashed {script.name}.lua as {sha}, expected {script.sha}"
                )

    async def run(
        self, name: str, keys: list[str], request: dict[str, Any], timeout_s: float | None
    ) -> dict[str, Any]:
        """One EVALSHA (or EVALSHA_RO); its result map, or the script's typed error."""
        return (await self.call(name, keys, request, timeout_s)).result

    async def call(
        self, name: str, keys: list[str], request: dict[str, Any], timeout_s: float | None
    ) -> ScriptResult:
        """One EVALSHA (or EVALSHA_RO); raises the script's typed error, if any."""
        if timeout_s is not None and timeout_s < DEADLINE_SLACK_S:
            raise DeadlineExceeded(
                "the call's deadline passed (or is too close) before the store was asked"
            )
        script = self.scripts[name]
        payload = msgpack.packb(request, use_bin_type=True)
        started = time.perf_counter()
        try:
            try:
                if timeout_s is None:  # no deadline: no timer either (the socket's applies)
                    raw = await self._evalsha(script, keys, payload)
                else:
                    async with asyncio.timeout(timeout_s):
                        raw = await self._evalsha(script, keys, payload)
            except RedisError as exc:  # store_errors(), without a generator per call
                translated = store_error(exc)
                if translated is None:
                    raise
                raise translated from exc
        except TimeoutError as exc:
            metrics.redis_error("deadline")
            raise DeadlineExceeded(
                "the store did not answer before the call's deadline; "
                "retry with the same idempotency key"
            ) from exc
        except (StoreUnreachable, StoreBusy) as exc:
            metrics.redis_error(exc.fault)
            raise
        except Exception:
            metrics.redis_error("other")
            raise
        finally:
            duration = self._durations.get(name)
            if duration is None:
                duration = self._durations[name] = metrics.REDIS_SCRIPT_DURATION.labels(
                    script=name
                )
            duration.observe(time.perf_counter() - started)
        reply = _decode(raw)
        if not isinstance(reply, dict):
            raise RuntimeError(f"{name}.lua returned {reply!r}")
        if not reply.get("ok"):
            _raise_script_error(reply)
        result = reply.get("r")
        fence = reply.get("fence")
        return ScriptResult(
            result if isinstance(result, dict) else {},
            FenceMark.decode(fence) if isinstance(fence, dict) else None,
        )

    async def _evalsha(self, script: LuaScript, keys: list[str], payload: bytes) -> Any:
        command = "EVALSHA_RO" if script.read_only else "EVALSHA"
        try:
            return await self._execute(command, script.sha, len(keys), *keys, payload)
        except NoScriptError:
            # NOSCRIPT means the script did not run: loading and calling again is safe.
            await self.redis.script_load(script.source)
            return await self._execute(command, script.sha, len(keys), *keys, payload)


__all__ = ["ScriptRunner", "TallyError", "connect", "store_errors"]
