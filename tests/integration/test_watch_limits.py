"""WatchUsage limits: one client cannot take every slot; a refusal names no Redis words."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterable
from typing import Any

import grpc
import pytest
import pytest_asyncio
import redis.asyncio as aioredis

from tally import config
from tally.auth.principal import Principal, Role, running_as
from tally_client.v1 import account_pb2, quota_pb2, usage_pb2
from tests.guard_support import assert_status
from tests.integration.test_watch import error_of, usage
from tests.support import RedisProcess, Running, settings, start_running, stop_running, unique

PER_PRINCIPAL = 2
TOTAL = 3


@pytest_asyncio.fixture
async def capped(own_redis: RedisProcess) -> AsyncIterator[Running]:
    """An authority running at most TOTAL watches, PER_PRINCIPAL per principal."""
    running = await start_running(
        own_redis.url, max_watchers=TOTAL, max_watchers_per_principal=PER_PRINCIPAL
    )
    yield running
    await stop_running(running)


class _Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code


class _WatchContext:
    """The servicer's side of a watch served in-process (as the auth interceptor will
    run it, under the caller's principal): records when the watch is positioned."""

    def __init__(self) -> None:
        self.positioned = asyncio.Event()

    async def send_initial_metadata(self, metadata: Any) -> None:
        self.positioned.set()

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise _Aborted(code, details)

    async def abort_with_status(self, status: Any) -> None:
        raise _Aborted(status.code, status.details)


async def _drain(stream: AsyncIterator[usage_pb2.UsageEvent]) -> None:
    async for _ in stream:
        pass


async def _open(running: Running, principal: Principal, account_id: str) -> asyncio.Task[None]:
    """A watch of `account_id` served as `principal`, once the server has positioned it."""
    context = _WatchContext()
    with running_as(principal):  # the task copies the context, principal included
        task = asyncio.create_task(_drain(running.authority.watch.stream(
            usage_pb2.WatchUsageRequest(account_id=account_id), context  # type: ignore[arg-type]
        )))
    waiter = asyncio.ensure_future(context.positioned.wait())
    await asyncio.wait({task, waiter}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    if task.done():
        task.result()  # raises the refusal
    assert context.positioned.is_set(), "the watch was never positioned"
    return task


async def close_watches(tasks: Iterable[asyncio.Task[Any]]) -> None:
    """Cancels each watch as a client's cancel would. A cancel that lands while the
    reader's Redis connection is mid-read can be swallowed there, so it is repeated."""
    for task in tasks:
        while not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=0.5)
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_a_principal_runs_at_most_its_share_of_watches(capped: Running) -> None:
    """Proves a principal's watch beyond max_watchers_per_principal is RESOURCE_EXHAUSTED
    naming the limit, another principal still gets a slot up to max_watchers, a closed
    watch gives its slot back, and the account's balance did not move."""
    account_id = unique("slots")
    await capped.accounts.CreateAccount(
        account_pb2.CreateAccountRequest(account_id=account_id, monthly_allotment=100)
    )
    greedy = Principal("tok_greedy", Role.READER)
    other = Principal("tok_other", Role.READER)
    tasks = [await _open(capped, greedy, account_id) for _ in range(PER_PRINCIPAL)]
    try:
        with pytest.raises(_Aborted) as refused:
            await _open(capped, greedy, account_id)
        assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_watchers_per_principal" in str(refused.value)
        tasks.append(await _open(capped, other, account_id))
        # every slot is taken now: the server's own limit refuses anyone else
        extra = usage(capped).WatchUsage(usage_pb2.WatchUsageRequest(account_id=account_id))
        assert_status(await error_of(extra), grpc.StatusCode.RESOURCE_EXHAUSTED)
        await close_watches(tasks[:1])
        tasks[:1] = [await _open(capped, greedy, account_id)]
    finally:
        await close_watches(tasks)
    balance = await capped.quota.GetBalance(
        quota_pb2.GetBalanceRequest(account_id=account_id)
    )
    assert balance.balance.available == 100


def test_the_per_principal_cap_stays_below_the_server_limit() -> None:
    """Proves a per-principal cap that would let one principal take every slot is refused
    at start, naming both settings."""
    with pytest.raises(ValueError, match=r"max_watchers_per_principal .* below max_watchers"):
        settings("redis://127.0.0.1:1", max_watchers=4, max_watchers_per_principal=4)
    assert config.MAX_WATCHERS_PER_PRINCIPAL < config.MAX_WATCHERS


async def test_a_watch_redis_refuses_names_no_redis_words(own_redis: RedisProcess) -> None:
    """Proves a watch whose stream Redis refuses to read (the key holds another type)
    ends INTERNAL with a message naming the kind of failure, never Redis's own text."""
    running = await start_running(own_redis.url, flush_interval="1h")
    try:
        account_id = unique("refused")
        await running.accounts.CreateAccount(
            account_pb2.CreateAccountRequest(account_id=account_id, monthly_allotment=100)
        )
        keys = running.authority.store.keys
        stream = keys.events(keys.shard_of(account_id))
        redis = aioredis.from_url(own_redis.url)
        try:
            await redis.delete(stream)
            await redis.set(stream, "not a stream")
            call = usage(running).WatchUsage(usage_pb2.WatchUsageRequest(account_id=account_id))
            error = await error_of(call)
        finally:
            await redis.delete(stream)
            await redis.aclose()
        assert error.code() == grpc.StatusCode.INTERNAL
        assert error.details() == "the store refused a command (ResponseError); see the server log"
    finally:
        await stop_running(running)
