"""The Redis connection and script calls: one FCALL per call, never retried.

Each script is a Functions library (store/scripts.py), loaded at start and
again whenever Redis answers that its function is not found (a restart without
persistence, FUNCTION FLUSH): that answer means the script did not run.
redis-py retries a command after a connection error by default; a retried
FCALL that had already run would move units twice. Retries are off; the
only repeat is after "function not found". Callers retry with their
idempotency key instead.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.maint_notifications import MaintNotificationsConfig

from tally import metrics
from tally.domain.errors import (
    ERRORS_BY_CODE,
    DeadlineExceeded,
    ResourceExhausted,
    Shortfall,
    TallyError,
)
from tally.store.cluster import ClusterScripts, connect_cluster, is_cluster_url
from tally.store.contract import FenceMark
from tally.store.failures import (
    REDIS_FAILURES,
    HoldNotInStore,
    StoreBusy,
    StoreUnreachable,
    redis_errors,
    store_error,
    store_errors,
)
from tally.store.fence import ShardBehind
from tally.store.pool import WaitingConnectionPool
from tally.store.script_pipeline import PoolSource, ReplicaWait, ScriptPipeline
from tally.store.scripts import LuaScript, load_all

# A call with less time left than this is refused before it reaches Redis: it
# could not get its answer back in time anyway, and refusing moves nothing.
DEADLINE_SLACK_S = 0.005
# What Redis answers (its "ERR " code stripped by redis-py) to a FCALL of a
# function it does not have.
FUNCTION_NOT_FOUND = "Function not found"


# A single Redis, or a Redis Cluster (store/cluster.py): most of the store uses
# commands both serve alike.
RedisClient = aioredis.Redis | RedisCluster


def connect(url: str, *, socket_timeout_s: float, max_connections: int) -> RedisClient:
    """A client for a single Redis (`redis://`, `rediss://`, `unix://`) whose
    callers wait in turn for one of max_connections connections, up to their
    deadline and at most socket_timeout_s (then StoreBusy); or for a Redis
    Cluster (`redis+cluster://`), max_connections per node."""
    if is_cluster_url(url):
        return connect_cluster(
            url, socket_timeout_s=socket_timeout_s, max_connections=max_connections
        )
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


def script_error(reply: Mapping[str, Any]) -> Exception:
    """The typed error a script's failure reply ({code, field, message, extra}) stands
    for; an unknown code (a bug in a script) is a RuntimeError."""
    code = reply.get("code", "INTERNAL")
    message = reply.get("message", "")
    field_name = reply.get("field", "")
    if code == "RESOURCE_EXHAUSTED":
        extra = reply.get("extra") or {}
        return ResourceExhausted(
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
        return HoldNotInStore(message, field_name=field_name, event_seq=int(extra["event_seq"]))
    if code == ShardBehind.script_code:
        return ShardBehind(message, field_name=field_name)
    error_cls = ERRORS_BY_CODE.get(code)
    if error_cls is None:
        return RuntimeError(f"script returned unknown error code {code!r}: {message}")
    return error_cls(message, field_name=field_name)


@dataclass(frozen=True)
class ScriptResult:
    """A script's result map, and its shard's fence as the run left it (None: the
    script checks no fence)."""

    result: dict[str, Any]
    fence: FenceMark | None


@dataclass(frozen=True)
class ScriptCall:
    """One script call of a pipelined round trip (ScriptRunner.run_many)."""

    name: str
    keys: list[str]
    request: dict[str, Any]


class ScriptRunner:
    """Runs the composed Lua scripts against one Redis connection pool."""

    def __init__(
        self, redis: RedisClient, *, pipelined: bool = True, window_s: float = 0.0
    ) -> None:
        """pipelined: script calls of one event-loop pass (or of window_s) share one
        write (store/script_pipeline.py), per master on a cluster; off: each call
        is its own round trip."""
        self.redis = redis
        self.scripts: dict[str, LuaScript] = load_all()
        self.pipeline: ScriptPipeline | None = None
        self.cluster: ClusterScripts | None = None
        if not pipelined:
            self._execute = redis.execute_command
        elif isinstance(redis, RedisCluster):
            self.cluster = ClusterScripts(redis, window_s)
            self._execute = self.cluster.execute
        else:
            self.pipeline = ScriptPipeline(PoolSource(redis.connection_pool), window_s)
            self._execute = self.pipeline.execute
        self._durations: dict[str, Any] = {}  # script name -> histogram child

    def wait_for_replicas(self, wait: ReplicaWait) -> None:
        """From now on every write is acknowledged only once wait.replicas replicas
        have it (set before the first call)."""
        if self.cluster is not None:
            self.cluster.wait = wait
        elif self.pipeline is not None:
            self.pipeline.wait = wait
        else:
            raise ValueError("waiting for replicas needs the pipelined script path")

    async def load(self) -> None:
        for script in self.scripts.values():
            await self._load(script)

    async def _load(self, script: LuaScript) -> None:
        # REPLACE: a library of this name is this very code (the name carries its
        # version), so replacing it, e.g. after another server loaded it, is a no-op.
        # A cluster loads it on every master (replicas copy it) and answers per node.
        loaded = await self.redis.function_load(script.source, replace=True)
        names = loaded.values() if isinstance(loaded, dict) else [loaded]
        if any(_text(name) != script.function for name in names):
            raise RuntimeError(f"Redis loaded {script.name}.lua as {loaded!r}")

    async def run(
        self, name: str, keys: list[str], request: dict[str, Any], timeout_s: float | None
    ) -> dict[str, Any]:
        """One FCALL (or FCALL_RO); its result map, or the script's typed error."""
        return (await self.call(name, keys, request, timeout_s)).result

    async def call(
        self, name: str, keys: list[str], request: dict[str, Any], timeout_s: float | None
    ) -> ScriptResult:
        """One FCALL (or FCALL_RO); raises the script's typed error, if any."""
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
                    raw = await self._fcall(script, keys, payload)
                else:
                    async with asyncio.timeout(timeout_s):
                        raw = await self._fcall(script, keys, payload)
            except REDIS_FAILURES as exc:  # store_errors(), without a generator per call
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
        outcome = _script_result(name, raw)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    async def run_many(
        self, calls: Sequence[ScriptCall], timeout_s: float | None
    ) -> list[ScriptResult | Exception]:
        """The calls' FCALLs in one pipelined round trip (no transaction: each
        script is atomic alone), never retried. Per call, in order: its result or
        the script's typed error. A connection failure or the deadline raises
        for the whole round trip: some calls may have run, so the caller retries
        with the same idempotency keys."""
        if timeout_s is not None and timeout_s < DEADLINE_SLACK_S:
            raise DeadlineExceeded(
                "the call's deadline passed (or is too close) before the store was asked"
            )
        scripts = [self.scripts[call.name] for call in calls]
        payloads = [msgpack.packb(call.request, use_bin_type=True) for call in calls]
        started = time.perf_counter()
        try:
            with store_errors():
                async with asyncio.timeout(timeout_s):
                    raws = await asyncio.gather(
                        *(
                            self._fcall(script, call.keys, payload)
                            for script, call, payload in zip(scripts, calls, payloads, strict=True)
                        ),
                        return_exceptions=True,
                    )
                lost = next((raw for raw in raws if _connection_lost(raw)), None)
                if lost is not None:
                    raise lost
        except TimeoutError as exc:
            metrics.redis_error("deadline")
            raise DeadlineExceeded(
                "the store did not answer before the call's deadline; "
                "retry with the same idempotency keys"
            ) from exc
        except (StoreUnreachable, StoreBusy) as exc:
            metrics.redis_error(exc.fault)
            raise
        except Exception:
            metrics.redis_error("other")
            raise
        finally:
            elapsed_s = time.perf_counter() - started
            for name in {script.name for script in scripts}:
                metrics.REDIS_SCRIPT_DURATION.labels(script=name).observe(elapsed_s)
        return [_script_result(script.name, raw) for script, raw in zip(scripts, raws, strict=True)]

    async def _fcall(self, script: LuaScript, keys: list[str], payload: bytes) -> Any:
        command = "FCALL_RO" if script.read_only else "FCALL"
        try:
            return await self._execute(command, script.function, len(keys), *keys, payload)
        except ResponseError as exc:
            if not function_not_found(exc):
                raise
            # the script did not run: loading it and calling again is safe
            await self._load(script)
            return await self._execute(command, script.function, len(keys), *keys, payload)


def _connection_lost(raw: Any) -> bool:
    """A failure that leaves it open whether the call ran (the connection broke, the
    deadline passed, the call was cancelled): the whole round trip fails with it."""
    if not isinstance(raw, BaseException):
        return False
    if not isinstance(raw, Exception):
        return True
    return isinstance(raw, (RedisConnectionError, RedisTimeoutError, TimeoutError))


def function_not_found(raw: Any) -> bool:
    """Whether Redis answered a FCALL that it has no such function (nothing ran)."""
    return isinstance(raw, ResponseError) and str(raw).startswith(FUNCTION_NOT_FOUND)


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _script_result(name: str, raw: Any) -> ScriptResult | Exception:
    """One pipelined call's result, or its typed error: the script's own, or what
    Redis answered instead (out of memory, read-only, busy...: UNAVAILABLE, as
    for a single call; a refused command: StoreRefused)."""
    if function_not_found(raw):
        raise RuntimeError(f"{name}.lua was not loaded even after FUNCTION LOAD")
    if isinstance(raw, RedisError):
        return _redis_failure(raw)
    if isinstance(raw, Exception):
        return raw
    reply = _decode(raw)
    if not isinstance(reply, dict):
        raise RuntimeError(f"{name}.lua returned {reply!r}")
    if not reply.get("ok"):
        return script_error(reply)
    result = reply.get("r")
    fence = reply.get("fence")
    return ScriptResult(
        result if isinstance(result, dict) else {},
        FenceMark.decode(fence) if isinstance(fence, dict) else None,
    )


def _redis_failure(error: RedisError) -> TallyError:
    """A Redis error one pipelined call got, as store/failures.py types it (counted)."""
    try:
        with redis_errors():
            raise error
    except StoreUnreachable as failure:
        metrics.redis_error(failure.fault)
        return failure
    except TallyError as failure:
        metrics.redis_error("other")
        return failure
    raise AssertionError("redis_errors() let a Redis error through")  # pragma: no cover


__all__ = ["ScriptRunner", "TallyError", "connect", "store_errors"]
