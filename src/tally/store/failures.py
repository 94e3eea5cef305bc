"""Redis failures as domain errors: nothing outside store/ sees a Redis exception.

Three outcomes. Redis cannot serve now (connection lost, timeout, out of
memory, a script running too long, loading, a read-only replica): UNAVAILABLE,
worth a retry, and nothing was applied (every script is a function that
declares its flags, so Redis refuses a write script under OOM or on a replica
before it runs, and a BUSY server runs nothing else). No pooled connection came free in
time: the server is overloaded, not Redis, so RESOURCE_EXHAUSTED. Anything else
Redis refused is a bug or a misconfiguration (INTERNAL).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from redis.exceptions import (
    AskError,
    BusyLoadingError,
    ClusterDownError,
    MaxConnectionsError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisClusterException,
    RedisError,
    ResponseError,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from tally.domain.errors import TallyError, Unavailable
from tally.store.pool import ConnectionWaitExpired
from tally.store.script_pipeline import ReplicaWaitShortfall

# Why Redis cannot serve now, by fault kind (the tally_redis_errors_total label).
CANNOT_SERVE: dict[str, str] = {
    "unavailable": "the store is unreachable",
    "oom": "the store is out of memory",
    "busy": "the store is busy running a script",
    "loading": "the store is loading its data",
    "readonly": "the store is a read-only replica",
    "replicas": "the store's replicas did not confirm the write in time",
    "cluster": "the store's cluster is failing over or moving slots",
}
NO_CONNECTION = "no_connection"

# redis-py strips the code of the errors it knows (OOM, LOADING, READONLY) and
# keeps the rest: BUSY arrives as "BUSY Redis is busy running a script...".
# BUSYGROUP (a consumer group that exists) is another word, not this one.
_BUSY_WORD = "BUSY"


class StoreUnreachable(Unavailable):
    """Redis could not be reached or cannot serve now: worth a retry. `fault`
    is one of CANNOT_SERVE's kinds; `kind` the redis-py exception's name."""

    def __init__(self, cause: BaseException, fault: str) -> None:
        self.fault = fault
        self.kind = type(cause).__name__
        self.reason = str(cause)
        super().__init__(
            f"{CANNOT_SERVE[fault]} ({self.kind}); retry with the same idempotency key"
        )


class StoreBusy(TallyError):
    """No pooled Redis connection came free within the pool's wait: this server
    has more calls than connections, Redis itself is fine (RESOURCE_EXHAUSTED)."""

    code = "RESOURCE_EXHAUSTED"
    fault = NO_CONNECTION

    def __init__(self, wait_s: float) -> None:
        super().__init__(
            f"server busy: no Redis connection came free within {wait_s:g}s; "
            "retry with the same idempotency key"
        )


class StoreRefused(TallyError):
    """Redis refused a command: a bug or a misconfiguration, not worth a retry (INTERNAL).
    Its message names the kind only: Redis's own words (`reason`) go to the logs."""

    def __init__(self, cause: BaseException) -> None:
        self.kind = type(cause).__name__
        self.reason = str(cause)
        super().__init__(f"the store refused a command ({self.kind}); see the server log")


# What redis-py raises: its cluster client's own failures are not RedisErrors.
REDIS_FAILURES = (RedisError, RedisClusterException)


def _fault(exc: Exception) -> str | None:
    """The CANNOT_SERVE kind of a Redis error; None when Redis refused the command."""
    if isinstance(exc, BusyLoadingError):
        return "loading"
    if isinstance(exc, ReplicaWaitShortfall):
        return "replicas"
    # A cluster that lost a master and has not promoted its replica yet, or a slot
    # that kept moving: nothing ran.
    if isinstance(exc, (ClusterDownError, TryAgainError, AskError, SlotNotCoveredError)):
        return "cluster"
    if isinstance(exc, (RedisConnectionError, RedisTimeoutError)):
        return "unavailable"
    if isinstance(exc, OutOfMemoryError):
        return "oom"
    if isinstance(exc, ReadOnlyError):
        return "readonly"
    if isinstance(exc, ResponseError) and str(exc).split(" ", 1)[0] == _BUSY_WORD:
        return "busy"
    return None


class HoldNotInStore(Unavailable):
    """A reservation the account issued is no longer in Redis (closed, past the
    closed window): its record comes back from the ledger (restore_hold). Left
    unhandled it is UNAVAILABLE. event_seq: the account's event sequence in Redis."""

    def __init__(self, message: str, *, field_name: str = "", event_seq: int) -> None:
        super().__init__(message, field_name=field_name)
        self.event_seq = event_seq


def store_error(exc: Exception) -> TallyError | None:
    """What store_errors() turns a Redis error into; None: it stays as it is."""
    if isinstance(exc, ConnectionWaitExpired):
        return StoreBusy(exc.wait_s)
    if isinstance(exc, MaxConnectionsError):  # a cluster node's connections, all in use
        return StoreBusy(0)
    fault = _fault(exc)
    return None if fault is None else StoreUnreachable(exc, fault)


@contextlib.contextmanager
def store_errors() -> Iterator[None]:
    """Redis failures that a retry can cure become StoreUnreachable (UNAVAILABLE),
    a connection wait that ran out StoreBusy (RESOURCE_EXHAUSTED)."""
    try:
        yield
    except REDIS_FAILURES as exc:
        translated = store_error(exc)
        if translated is None:
            raise
        raise translated from exc


@contextlib.contextmanager
def redis_errors() -> Iterator[None]:
    """Every Redis failure becomes a domain error: store_errors' ones, and
    StoreRefused for a command Redis refused."""
    try:
        with store_errors():
            yield
    except REDIS_FAILURES as exc:
        raise StoreRefused(exc) from exc
