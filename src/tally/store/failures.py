"""Redis failures as domain errors: nothing outside store/ sees a Redis exception."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from redis.exceptions import (
    BusyLoadingError,
    ReadOnlyError,
    RedisError,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from tally.domain.errors import TallyError, Unavailable


class StoreUnreachable(Unavailable):
    """Redis could not be reached or cannot serve now (connection lost, timeout,
    loading, a read-only replica): worth a retry."""

    def __init__(self, cause: BaseException) -> None:
        self.kind = type(cause).__name__
        self.reason = str(cause)
        super().__init__(
            f"the store is unreachable ({self.kind}); retry with the same idempotency key"
        )


class StoreRefused(TallyError):
    """Redis refused a command: a bug or a misconfiguration, not worth a retry (INTERNAL)."""

    def __init__(self, cause: BaseException) -> None:
        self.reason = str(cause)
        super().__init__(self.reason)


class HoldNotInStore(Unavailable):
    """A reservation the account issued is no longer in Redis (closed, past the
    closed window): its record comes back from the ledger (restore_hold). Left
    unhandled it is UNAVAILABLE. event_seq: the account's event sequence in Redis."""

    def __init__(self, message: str, *, field_name: str = "", event_seq: int) -> None:
        super().__init__(message, field_name=field_name)
        self.event_seq = event_seq


@contextlib.contextmanager
def store_errors() -> Iterator[None]:
    """Connection-level Redis failures become Unavailable (safe to retry)."""
    try:
        yield
    except (RedisConnectionError, RedisTimeoutError, BusyLoadingError, ReadOnlyError) as exc:
        raise StoreUnreachable(exc) from exc
    except ResponseError as exc:
        if str(exc).startswith("OOM"):
            raise Unavailable("the store is out of memory") from exc
        raise


@contextlib.contextmanager
def redis_errors() -> Iterator[None]:
    """Every Redis failure becomes a domain error: store_errors' ones, and
    StoreRefused for a command Redis refused."""
    try:
        with store_errors():
            yield
    except RedisError as exc:
        raise StoreRefused(exc) from exc
