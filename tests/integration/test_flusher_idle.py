"""The flusher skips idle shards: one pipelined check (XINFO STREAM and XINFO GROUPS per
shard) finds the shards with something to read, claim or trim, and only those get a
flush; a shard with new entries is flushed. Commands are counted with INFO commandstats."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import pytest_asyncio

from tally.store.streams import GROUP
from tally_client.v1 import quota_pb2
from tests.guard_support import aio, create_account
from tests.support import RedisProcess, Running, start_running, stop_running, unique

# what a flush of one shard sends (EventStreams.take and trim); the check sends none
FLUSH_COMMANDS = ("xreadgroup", "xautoclaim", "xack", "xtrim", "xpending")


@pytest_asyncio.fixture
async def quiet(own_redis: RedisProcess) -> AsyncIterator[Running]:
    """An authority whose own flusher never runs (the test runs passes) and whose
    flushed entries stay no time (stream_retention 0: every flush trims)."""
    running = await start_running(
        own_redis.url, flush_interval="1h", stream_retention="0s", snapshot_interval="1h"
    )
    await running.authority.flusher.flush_all(steal=True)
    yield running
    await stop_running(running)


async def calls(redis: Any) -> dict[str, int]:
    stats = await redis.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(row["calls"]) for name, row in stats.items()}


async def counted_pass(running: Running) -> tuple[int, dict[str, int]]:
    """One flush pass, and the commands Redis ran during it."""
    redis = running.authority.store.redis
    await redis.config_resetstat()
    flushed = await running.authority.flusher.flush_all()
    return flushed, await calls(redis)


async def reserve(running: Running, account_id: str, key: str) -> None:
    await aio(running).quota.Reserve(quota_pb2.ReserveRequest(
        account_id=account_id, operation="image.upscale", idempotency_key=key))


async def test_an_idle_pass_costs_one_check_and_no_flush(quiet: Running) -> None:
    """Proves a pass over shards with nothing new, pending or to trim runs XINFO STREAM
    and XINFO GROUPS once per shard (one pipeline) and none of a flush's commands."""
    shards = quiet.authority.store.keys.shards
    flushed, ran = await counted_pass(quiet)
    assert flushed == 0
    assert (ran.get("xinfo|stream"), ran.get("xinfo|groups"), ran.get("time")) == (
        shards, shards, 1
    )
    assert {name: ran[name] for name in FLUSH_COMMANDS if name in ran} == {}


async def test_a_shard_with_new_entries_is_flushed_and_the_others_skipped(
    quiet: Running,
) -> None:
    """Proves a hold made after the last pass reaches the ledger at the next one, and that
    the pass flushes that shard alone (one trim; two takes: the batch, then an empty
    one), then goes idle."""
    account_id = unique()
    await create_account(quiet, account_id)  # money in: flushed through at once
    await reserve(quiet, account_id, "r")
    flushed, ran = await counted_pass(quiet)
    assert flushed == 1
    assert (ran["xtrim"], ran["xautoclaim"], ran["xreadgroup"], ran["xack"]) == (1, 2, 4, 1)
    entries = await quiet.authority.ledger.entries(account_id, types=["reserve"])
    assert len(entries) == 1
    flushed, ran = await counted_pass(quiet)
    assert flushed == 0 and "xautoclaim" not in ran


async def test_pending_or_trimmable_entries_make_a_shard_busy(quiet: Running) -> None:
    """Proves the check finds a shard whose entry another consumer holds pending (not
    yet idle long enough to claim), and a shard whose acknowledged entries a trim
    would remove, while its stream retention keeps them it is idle."""
    streams = quiet.authority.flusher.streams
    account_id = unique()
    await create_account(quiet, account_id)
    shard = quiet.authority.store.keys.shard_of(account_id)
    stream = quiet.authority.store.keys.events(shard)
    redis = quiet.authority.store.redis
    assert shard not in await streams.shards_with_work(0)
    await reserve(quiet, account_id, "r1")
    await redis.xreadgroup(GROUP, "another-flusher", {stream: ">"}, count=10)
    assert shard in await streams.shards_with_work(0)  # pending at another consumer
    await quiet.authority.flusher.flush_all(steal=True)
    assert shard not in await streams.shards_with_work(0)
    await reserve(quiet, account_id, "r2")
    await reserve(quiet, account_id, "r3")
    flusher = quiet.authority.flusher
    flusher.settings = replace(flusher.settings, stream_retention_ms=3_600_000)
    await flusher.flush_all()  # delivered, acknowledged, kept an hour
    assert await redis.xlen(stream) >= 2
    assert shard not in await streams.shards_with_work(3_600_000)
    assert shard in await streams.shards_with_work(0)  # a trim would remove them

