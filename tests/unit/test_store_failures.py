"""Redis failures as domain errors: what redis-py really raises for out of memory, BUSY,
LOADING and a read-only replica is UNAVAILABLE (each with its own metric kind), a pool
wait that ran out is RESOURCE_EXHAUSTED, and any other refusal stays a Redis error."""

from __future__ import annotations

import pytest
from redis._parsers.base import BaseParser
from redis.exceptions import RedisError

from tally import metrics
from tally.store.failures import (
    CANNOT_SERVE,
    StoreBusy,
    StoreRefused,
    StoreUnreachable,
    redis_errors,
    store_errors,
)
from tally.store.pool import ConnectionWaitExpired


def parsed(reply: str) -> RedisError:
    """The exception redis-py's parsers make of an error reply from Redis."""
    error = BaseParser.parse_error(reply)
    assert isinstance(error, RedisError)
    return error


@pytest.mark.parametrize(
    ("reply", "fault"),
    [
        ("OOM command not allowed when used memory > 'maxmemory'.", "oom"),
        ("BUSY Redis is busy running a script. You can only call SCRIPT KILL or "
         "SHUTDOWN NOSCRIPT.", "busy"),
        ("LOADING Redis is loading the dataset in memory", "loading"),
        ("READONLY You can't write against a read only replica.", "readonly"),
        ("ERR max number of clients reached", "unavailable"),
    ],
)
def test_redis_that_cannot_serve_now_is_unavailable(reply: str, fault: str) -> None:
    """Proves each error reply Redis sends when it cannot serve now, parsed as redis-py
    parses it (OOM's prefix stripped), becomes StoreUnreachable (UNAVAILABLE) with its
    fault kind, one the metrics know, and a message that says to retry."""
    with pytest.raises(StoreUnreachable) as raised, store_errors():
        raise parsed(reply)
    assert raised.value.code == "UNAVAILABLE"
    assert raised.value.fault == fault
    assert raised.value.message.startswith(CANNOT_SERVE[fault])
    assert "retry with the same idempotency key" in raised.value.message
    assert fault in metrics.REDIS_ERROR_KINDS


@pytest.mark.parametrize(
    "reply",
    [
        "BUSYGROUP Consumer Group name already exists",
        "ERR Error running script: attempt to compare nil with number",
        "WRONGTYPE Operation against a key holding the wrong kind of value",
    ],
)
def test_other_refusals_are_not_unavailable(reply: str) -> None:
    """Proves a refusal that a retry cannot cure (BUSYGROUP is not BUSY) passes
    store_errors unchanged and becomes StoreRefused (INTERNAL) under redis_errors."""
    with pytest.raises(RedisError) as raised, store_errors():
        raise parsed(reply)
    assert not isinstance(raised.value, StoreUnreachable)
    with pytest.raises(StoreRefused), redis_errors():
        raise parsed(reply)


def test_a_pool_wait_that_ran_out_is_resource_exhausted() -> None:
    """Proves no free connection within the pool's wait is StoreBusy: RESOURCE_EXHAUSTED
    with a "server busy" message, counted under its own metric kind, never UNAVAILABLE."""
    with pytest.raises(StoreBusy) as raised, store_errors():
        raise ConnectionWaitExpired(5.0)
    assert raised.value.code == "RESOURCE_EXHAUSTED"
    assert raised.value.message == (
        "server busy: no Redis connection came free within 5s; "
        "retry with the same idempotency key"
    )
    assert raised.value.fault in metrics.REDIS_ERROR_KINDS


def test_a_refusal_tells_the_caller_its_kind_not_redis_words() -> None:
    """Proves a StoreRefused's message (what a caller is told) names the kind of
    failure and never carries Redis's own text, which stays in `reason` for the logs."""
    with pytest.raises(StoreRefused) as raised, redis_errors():
        raise parsed("WRONGTYPE Operation against a key holding the wrong kind of value")
    assert raised.value.message == "the store refused a command (ResponseError); see the server log"
    assert "WRONGTYPE" in raised.value.reason
