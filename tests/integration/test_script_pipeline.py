"""Script calls issued together share one pipelined write (store/script_pipeline.py):
each is answered with its own reply exactly once, an error reply stays with its
call, and a connection killed with calls in flight fails those calls only
(UNAVAILABLE), after which a retry with the same idempotency key moves units once."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import redis.asyncio as aioredis

from tally.domain.errors import NotFound
from tally.store import script_pipeline
from tally.store.contract import HoldReply, ReserveRequest
from tally.store.failures import StoreUnreachable
from tally.store.quota_store import QuotaStore
from tests.guard_support import balance, create_account
from tests.integration.crash_support import wait_until
from tests.support import RedisProcess, Running, start_running, stop_running, unique

OPERATION = "image.upscale"
UNITS_PER_CALL = 10  # its default price
POLL_BOUND_S = 30.0  # how long a test waits for a state it then asserts (never a threshold)


@dataclass
class Piped:
    running: Running
    redis: aioredis.Redis  # the test's own connection to the authority's Redis

    @property
    def store(self) -> QuotaStore:
        return self.running.authority.store


@pytest_asyncio.fixture
async def piped(own_redis: RedisProcess) -> AsyncIterator[Piped]:
    running = await start_running(own_redis.url)
    redis = aioredis.Redis.from_url(own_redis.url, decode_responses=True)
    yield Piped(running, redis)
    await redis.execute_command("CLIENT", "UNPAUSE")
    await redis.aclose()
    await stop_running(running)


def reserve(account_id: str, key: str) -> ReserveRequest:
    return ReserveRequest(
        account_id=account_id, operation=OPERATION, quantity=1, idempotency_key=key,
        labels={}, price_version=0, ttl_ms=60_000,
    )


async def held(piped: Piped, account_id: str) -> int:
    return int((await balance(piped.running, account_id)).held)


@pytest.fixture
def writes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The number of calls each pipelined write carried."""
    sizes: list[int] = []
    send = script_pipeline.ScriptPipeline._send

    async def counted(self: script_pipeline.ScriptPipeline, calls: Sequence[Any]) -> None:
        sizes.append(len(calls))
        await send(self, calls)

    monkeypatch.setattr(script_pipeline.ScriptPipeline, "_send", counted)
    return sizes


async def test_calls_issued_together_share_one_write_and_each_gets_its_own_answer(
    piped: Piped, writes: list[int]
) -> None:
    """Proves 60 reserves and 5 for an account that does not exist, issued in one loop
    pass, go out in one write; each reserve holds once under its own reservation,
    each unknown account is NOT_FOUND alone, and the same calls again replay."""
    account = unique()
    await create_account(piped.running, account)
    requests = [reserve(account, f"k{i}") for i in range(60)]
    missing = [reserve(unique("ghost"), f"g{i}") for i in range(5)]
    writes.clear()
    answers = await asyncio.gather(
        *(piped.store.reserve(r, None) for r in [*requests[:30], *missing, *requests[30:]]),
        return_exceptions=True,
    )
    assert writes == [65]
    holds = [a for a in answers if isinstance(a, HoldReply)]
    refused = [a for a in answers if isinstance(a, BaseException)]
    assert len(holds) == 60 and all(isinstance(e, NotFound) for e in refused), refused
    assert len({h.reservation_id for h in holds}) == 60
    assert not any(h.replayed for h in holds)
    assert await held(piped, account) == 60 * UNITS_PER_CALL
    again = await asyncio.gather(*(piped.store.reserve(r, None) for r in requests))
    assert [a.reservation_id for a in again] == [h.reservation_id for h in holds]
    assert all(a.replayed for a in again)
    assert await held(piped, account) == 60 * UNITS_PER_CALL


async def test_more_calls_than_one_write_carries_go_out_in_several(
    piped: Piped, writes: list[int]
) -> None:
    account = unique()
    await create_account(piped.running, account, monthly_allotment=10_000)
    count = script_pipeline.PIPELINE_COMMANDS_MAX + 1
    writes.clear()
    answers = await asyncio.gather(
        *(piped.store.reserve(reserve(account, f"k{i}"), None) for i in range(count))
    )
    assert writes == [script_pipeline.PIPELINE_COMMANDS_MAX, 1]
    assert len({a.reservation_id for a in answers}) == count


async def _blocked_script_clients(redis: aioredis.Redis, count: int) -> list[str]:
    """The ids of Redis clients held by CLIENT PAUSE with a script call, once there
    are `count` of them."""
    async with asyncio.timeout(POLL_BOUND_S):
        while True:
            clients = await redis.client_list()
            blocked = [
                str(c["id"]) for c in clients if "b" in c["flags"] and c["cmd"] == "fcall"
            ]
            if len(blocked) >= count:
                return blocked
            await asyncio.sleep(0.01)


async def test_a_connection_killed_with_calls_in_flight_fails_those_calls_only(
    piped: Piped,
) -> None:
    """Proves that with writes paused, two writes of 10 reserves each wait on two
    connections; killing the first fails its 10 calls with UNAVAILABLE and moves
    nothing for them, the other 10 hold; retried with their keys the first 10 hold
    once, and retried again they replay."""
    account = unique()
    await create_account(piped.running, account)
    first = [reserve(account, f"a{i}") for i in range(10)]
    second = [reserve(account, f"b{i}") for i in range(10)]
    await piped.redis.execute_command("CLIENT", "PAUSE", 20_000, "WRITE")
    calls_a = [asyncio.ensure_future(piped.store.reserve(r, None)) for r in first]
    [carrier] = await _blocked_script_clients(piped.redis, 1)
    calls_b = [asyncio.ensure_future(piped.store.reserve(r, None)) for r in second]
    await _blocked_script_clients(piped.redis, 2)
    await piped.redis.execute_command("CLIENT", "KILL", "ID", carrier)
    await piped.redis.execute_command("CLIENT", "UNPAUSE")
    failed = await asyncio.gather(*calls_a, return_exceptions=True)
    assert all(isinstance(e, StoreUnreachable) for e in failed), failed
    assert all(isinstance(a, HoldReply) for a in await asyncio.gather(*calls_b))
    assert await held(piped, account) == 10 * UNITS_PER_CALL
    retried = await asyncio.gather(*(piped.store.reserve(r, None) for r in first))
    assert not any(a.replayed for a in retried)
    assert await held(piped, account) == 20 * UNITS_PER_CALL
    replayed = await asyncio.gather(*(piped.store.reserve(r, None) for r in first))
    assert [a.reservation_id for a in replayed] == [a.reservation_id for a in retried]
    assert all(a.replayed for a in replayed)
    assert await held(piped, account) == 20 * UNITS_PER_CALL


async def test_pipelining_off_answers_the_same(own_redis: RedisProcess) -> None:
    """--redis-pipeline off: each call its own round trip, same answers."""
    running = await start_running(own_redis.url, redis_pipeline="off")
    try:
        account = unique()
        await create_account(running, account)
        store = running.authority.store
        answers = await asyncio.gather(
            *(store.reserve(reserve(account, f"k{i}"), None) for i in range(20))
        )
        assert len({a.reservation_id for a in answers}) == 20
        assert (await balance(running, account)).held == 20 * UNITS_PER_CALL
    finally:
        await stop_running(running)


@pytest.mark.parametrize(("pool", "kept"), [(16, 2), (64, 8), (200, 8)])
async def test_the_connections_kept_between_writes_are_bounded(
    own_redis: RedisProcess, pool: int, kept: int
) -> None:
    """Proves at most CONNECTIONS_KEPT (8), and never more than an eighth of the pool,
    stay with the pipeline after 12 writes were in flight at once."""
    assert script_pipeline.CONNECTIONS_KEPT == 8
    running = await start_running(own_redis.url, redis_max_connections=pool)
    redis = aioredis.Redis.from_url(own_redis.url, decode_responses=True)
    try:
        account = unique()
        await create_account(running, account)
        store = running.authority.store
        await redis.execute_command("CLIENT", "PAUSE", 20_000, "WRITE")
        calls = []
        for write in range(12):
            calls.append(asyncio.ensure_future(store.reserve(reserve(account, f"w{write}"), None)))
            await _blocked_script_clients(redis, write + 1)
        await redis.execute_command("CLIENT", "UNPAUSE")
        assert all(isinstance(a, HoldReply) for a in await asyncio.gather(*calls))
        assert store.runner.pipeline is not None
        assert store.runner.pipeline.kept == kept
    finally:
        await redis.execute_command("CLIENT", "UNPAUSE")
        await redis.aclose()
        await stop_running(running)


async def test_calls_within_the_window_share_one_write(
    own_redis: RedisProcess, writes: list[int]
) -> None:
    """Proves with a window, commands issued in different loop passes within it go
    out in one write, each answered with its own reply."""
    redis = aioredis.Redis.from_url(own_redis.url)
    try:
        pipeline = script_pipeline.ScriptPipeline(
            script_pipeline.PoolSource(redis.connection_pool), window_s=0.5
        )
        writes.clear()
        calls = []
        for i in range(5):  # five loop passes apart, all within the window
            calls.append(asyncio.ensure_future(pipeline.execute("ECHO", f"m{i}")))
            await asyncio.sleep(0)
        assert await asyncio.gather(*calls) == [f"m{i}".encode() for i in range(5)]
        assert writes == [5]
    finally:
        await redis.aclose()


async def test_the_window_is_a_setting(own_redis: RedisProcess) -> None:
    running = await start_running(own_redis.url, redis_pipeline_window="2ms")
    try:
        assert running.authority.store.runner.pipeline is not None
        assert running.authority.store.runner.pipeline.window_s == 0.002
    finally:
        await stop_running(running)


async def test_a_single_redis_waits_for_its_replica_when_asked(
    own_redis: RedisProcess, tmp_path: Path
) -> None:
    """Proves --redis-wait-replicas 1 on a single Redis with a replica acknowledges
    writes the replica has, and refuses (UNAVAILABLE, nothing acknowledged) one the
    stopped replica could not confirm; a retry with its key then replays it once."""
    replica = RedisProcess(tmp_path / "replica", "--replicaof", "127.0.0.1", str(own_redis.port))
    replica.start()
    try:
        await replicated_reserve_is_refused_then_replayed(own_redis, replica)
    finally:
        replica.stop()


async def replicated_reserve_is_refused_then_replayed(
    own_redis: RedisProcess, replica: RedisProcess
) -> None:
    client = aioredis.Redis.from_url(own_redis.url)

    async def in_sync() -> bool:
        info = await client.info("replication")
        return "online" in str(info.get("slave0", {}))

    try:
        await wait_until(in_sync, POLL_BOUND_S, "the replica to be in sync")
    finally:
        await client.aclose()
    running = await start_running(
        own_redis.url, redis_wait_replicas="1", redis_wait_timeout="200ms"
    )
    try:
        store = running.authority.store
        assert store.runner.pipeline is not None
        assert store.runner.pipeline.wait == script_pipeline.ReplicaWait(1, 200)
        account_id = unique()
        await create_account(running, account_id, monthly_allotment=1000)
        request = reserve(account_id, "w1")
        assert replica.process is not None
        os.kill(replica.process.pid, signal.SIGSTOP)
        try:
            with pytest.raises(StoreUnreachable, match="replicas did not confirm"):
                await store.reserve(request, None)
        finally:
            os.kill(replica.process.pid, signal.SIGCONT)
        replayed = await store.reserve(request, None)
        assert replayed.replayed
        assert (await balance(running, account_id)).available == 1000 - UNITS_PER_CALL
    finally:
        await stop_running(running)
