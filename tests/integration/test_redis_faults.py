"""Redis faults (issue 9): a Redis that cannot serve now (out of memory, a script running
too long, a read-only replica) answers UNAVAILABLE, which clients retry, never INTERNAL;
each kind is counted; nothing is half-applied, and the same call retried with its
idempotency key once Redis serves again moves its units once."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest_asyncio
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from tally import metrics
from tally_client.v1 import account_pb2, quota_pb2
from tests.guard_support import aio, balance, create_account, rpc_error, snapshot
from tests.support import RedisProcess, Running, free_port, start_running, stop_running, unique

OPERATION = "image.upscale"
UNITS_PER_CALL = 10  # its default price
POLL_BOUND_S = 30.0  # how long a test waits for a state it then asserts (never a threshold)


@dataclass
class Faulty:
    """An authority on a private Redis, and a connection of the test's own to that Redis."""

    running: Running
    redis: aioredis.Redis


@pytest_asyncio.fixture
async def faulty(own_redis: RedisProcess) -> AsyncIterator[Faulty]:
    running = await start_running(own_redis.url)
    redis = aioredis.Redis.from_url(own_redis.url)
    yield Faulty(running, redis)
    await redis.aclose()
    await stop_running(running)


def redis_errors(kind: str) -> float:
    return metrics.REGISTRY.get_sample_value("tally_redis_errors_total", {"kind": kind}) or 0.0


def reserve(account_id: str, key: str) -> quota_pb2.ReserveRequest:
    return quota_pb2.ReserveRequest(
        account_id=account_id, operation=OPERATION, quantity=1, idempotency_key=key
    )


def charge(account_id: str, key: str) -> quota_pb2.ChargeRequest:
    return quota_pb2.ChargeRequest(
        account_id=account_id, operation=OPERATION, quantity=1, idempotency_key=key
    )


async def assert_unavailable(call: Awaitable[Any], says: str) -> None:
    error = await rpc_error(call)
    assert error.code() == grpc.StatusCode.UNAVAILABLE, (error.code(), error.details())
    assert says in (error.details() or ""), error.details()
    assert "retry with the same idempotency key" in (error.details() or "")


async def test_redis_at_maxmemory_is_unavailable_and_moves_nothing(faulty: Faulty) -> None:
    """Proves that with Redis at maxmemory, Reserve, Charge and CreateAccount answer
    UNAVAILABLE naming out of memory (redis-py strips the OOM prefix; before, this was
    INTERNAL), counted as kind="oom"; the account's shard is exactly as before (Redis
    refuses a write script under OOM before it runs), reads are still served, and the
    same Reserve once memory is back holds its units once."""
    running = faulty.running
    stubs = aio(running)
    account_id, newcomer = unique(), unique()
    await create_account(running, account_id)
    before = await snapshot(running, account_id, newcomer)
    oom_before = redis_errors("oom")
    await faulty.redis.config_set("maxmemory", 1)
    try:
        await assert_unavailable(stubs.quota.Reserve(reserve(account_id, "r")), "out of memory")
        await assert_unavailable(stubs.quota.Charge(charge(account_id, "c")), "out of memory")
        await assert_unavailable(
            stubs.accounts.CreateAccount(
                account_pb2.CreateAccountRequest(account_id=newcomer, monthly_allotment=500)
            ),
            "out of memory",
        )
        during = await snapshot(running, account_id, newcomer)
    finally:
        await faulty.redis.config_set("maxmemory", 0)
    assert during == before
    assert redis_errors("oom") == oom_before + 3
    held = await stubs.quota.Reserve(reserve(account_id, "r"))
    assert (held.units, held.replayed) == (UNITS_PER_CALL, False)
    assert (await balance(running, account_id)).held == UNITS_PER_CALL


async def test_a_read_only_replica_is_unavailable_and_moves_nothing(faulty: Faulty) -> None:
    """Proves that when the Redis the server uses turns into a read-only replica, a Reserve
    answers UNAVAILABLE naming the replica, counted as kind="readonly", the shard is
    exactly as before, and once it is a primary again the same Reserve goes through.
    (Its primary is an address where nothing listens, so the replica keeps its own data
    and serves reads, as a demoted node does until it reaches its new primary.)"""
    running = faulty.running
    stubs = aio(running)
    account_id = unique()
    await create_account(running, account_id)
    before = await snapshot(running, account_id)
    readonly_before = redis_errors("readonly")
    await faulty.redis.execute_command("REPLICAOF", "127.0.0.1", str(free_port()))
    try:
        await assert_unavailable(
            stubs.quota.Reserve(reserve(account_id, "r")), "read-only replica"
        )
        during = await snapshot(running, account_id)
    finally:
        await faulty.redis.execute_command("REPLICAOF", "NO", "ONE")
    assert during == before
    assert redis_errors("readonly") == readonly_before + 1
    held = await stubs.quota.Reserve(reserve(account_id, "r"))
    assert (held.units, held.replayed) == (UNITS_PER_CALL, False)


async def test_a_redis_busy_running_a_script_is_unavailable(
    faulty: Faulty, own_redis: RedisProcess
) -> None:
    """Proves that while Redis is busy running a script past its busy-reply threshold, a
    Reserve answers UNAVAILABLE naming the busy script, counted as kind="busy", and once
    the script is killed the same Reserve holds its units once."""
    running = faulty.running
    stubs = aio(running)
    account_id = unique()
    await create_account(running, account_id)
    busy_before = redis_errors("busy")
    await faulty.redis.config_set("busy-reply-threshold", 10)
    runaway = aioredis.Redis.from_url(own_redis.url)
    looping = asyncio.create_task(runaway.eval("while true do end", 0))
    try:
        await _until_busy(faulty.redis)
        await assert_unavailable(
            stubs.quota.Reserve(reserve(account_id, "r")), "busy running a script"
        )
    finally:
        await faulty.redis.script_kill()
        with contextlib.suppress(ResponseError):
            await looping
        await runaway.aclose()
        await faulty.redis.config_set("busy-reply-threshold", 5000)
    assert redis_errors("busy") == busy_before + 1
    held = await stubs.quota.Reserve(reserve(account_id, "r"))
    assert (held.units, held.replayed) == (UNITS_PER_CALL, False)
    assert (await balance(running, account_id)).held == UNITS_PER_CALL


async def _until_busy(redis: aioredis.Redis) -> None:
    """Waits until Redis answers BUSY (the runaway script passed the threshold)."""
    loop = asyncio.get_running_loop()
    give_up = loop.time() + POLL_BOUND_S
    while loop.time() < give_up:
        try:
            await redis.get("tally-test:probe")
        except ResponseError as error:
            if str(error).startswith("BUSY"):
                return
            raise
        await asyncio.sleep(0.01)
    raise AssertionError("Redis never became busy")
