"""The shard layout is a fact of the data: a new deployment records the default in Redis
and the ledger; a deployment from before the record keeps its `sNN` tags after upgrade;
a wiped Redis comes back in the ledger's layout; a --shards other than the recorded one,
and a Redis and a ledger that record different layouts, are refused."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import redis

from tally.clock import ManualClock
from tally.deployment import LayoutRefused
from tally.ledger.backend import open_ledger
from tally.ledger.ledger import Ledger
from tally.store.layout import DEFAULT_SHARDS, ShardLayout, TagScheme
from tally_client.v1 import quota_pb2
from tests.guard_support import aio, balance, create_account
from tests.support import T0_MS, RedisProcess, Running, start_running, stop_running, unique

NEW = ShardLayout(DEFAULT_SHARDS, TagScheme.SLOT_RANGE)
OLD = ShardLayout(16, TagScheme.SHARD_NUMBER)


def ledger_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'ledger.sqlite3'}"


def redis_meta(redis_url: str) -> dict[str, str]:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        return client.hgetall("tally:meta")
    finally:
        client.close()


async def ledger_facts(url: str) -> dict[str, str]:
    ledger = Ledger(open_ledger(url), ManualClock(T0_MS))
    try:
        return await ledger.deployment_facts()
    finally:
        ledger.close()


def wipe(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    client.flushall()
    client.close()


async def start(redis_url: str, tmp_path: Path, **overrides: object) -> Running:
    """A server as `tally serve` starts it: --shards unset unless given."""
    overrides.setdefault("shards", 0)
    return await start_running(redis_url, ledger_url=ledger_url(tmp_path), **overrides)


async def hold(running: Running, account_id: str) -> str:
    """A new account with a hold on it: the hold's reservation id."""
    await create_account(running, account_id)
    reply = await aio(running).quota.Reserve(quota_pb2.ReserveRequest(
        account_id=account_id, operation="image.upscale", idempotency_key="r"))
    return str(reply.reservation_id)


async def commit(running: Running, reservation_id: str) -> int:
    reply = await aio(running).quota.Commit(quota_pb2.CommitRequest(
        reservation_id=reservation_id))
    return int(reply.units_charged)


async def test_a_new_deployment_records_the_default_layout_in_redis_and_the_ledger(
    own_redis: RedisProcess, tmp_path: Path
) -> None:
    """Proves a start on an empty Redis and ledger, --shards unset, serves in 256 shards
    with slot-range tags (a reservation id starts with one), recorded in both."""
    running = await start(own_redis.url, tmp_path)
    try:
        keys = running.authority.store.keys
        assert keys.layout == NEW
        account_id = unique()
        reservation_id = await hold(running, account_id)
        assert reservation_id.split(".")[0] == keys.tag(keys.shard_of(account_id))
        assert reservation_id.split(".")[0] in NEW.tags()
    finally:
        await stop_running(running)
    facts = {"shards": "256", "tag_scheme": "slot-range"}
    assert redis_meta(own_redis.url) == facts
    assert await ledger_facts(ledger_url(tmp_path)) == facts


async def test_a_deployment_from_before_the_record_keeps_its_tags_after_upgrade(
    own_redis: RedisProcess, tmp_path: Path
) -> None:
    """Proves a Redis whose tally:meta says 16 shards and no scheme (what every earlier
    version wrote) is served with the `sNN` tags, without flags; the scheme is then
    recorded in Redis and the ledger, and a hold made before a restart commits after it."""
    client = redis.Redis.from_url(own_redis.url)
    client.hset("tally:meta", "shards", 16)
    client.close()
    running = await start(own_redis.url, tmp_path)
    account_id = unique()
    try:
        assert running.authority.store.keys.layout == OLD
        reservation_id = await hold(running, account_id)
        assert reservation_id.split(".")[0] in OLD.tags()
    finally:
        await stop_running(running)
    facts = {"shards": "16", "tag_scheme": "shard-number"}
    assert redis_meta(own_redis.url) == facts
    assert await ledger_facts(ledger_url(tmp_path)) == facts
    running = await start(own_redis.url, tmp_path)
    try:
        assert await commit(running, reservation_id) == 10
    finally:
        await stop_running(running)


@pytest.mark.parametrize("shards", [8, DEFAULT_SHARDS])
async def test_a_shard_count_other_than_the_recorded_one_is_refused(
    own_redis: RedisProcess, tmp_path: Path, shards: int
) -> None:
    """Proves a start with --shards other than the recorded count (16 here, with the old
    tags) is refused naming both counts, and leaves the record as it was."""
    running = await start(own_redis.url, tmp_path, shards=16)
    await stop_running(running)
    assert redis_meta(own_redis.url) == {"shards": "16", "tag_scheme": "slot-range"}
    with pytest.raises(LayoutRefused, match=f"laid out in 16 shards.*--shards {shards} would"):
        await start(own_redis.url, tmp_path, shards=shards)
    assert redis_meta(own_redis.url) == {"shards": "16", "tag_scheme": "slot-range"}
    running = await start(own_redis.url, tmp_path, shards=16)  # the recorded count is fine
    await stop_running(running)


async def test_a_wiped_redis_is_recovered_in_the_ledgers_layout(
    own_redis: RedisProcess, tmp_path: Path
) -> None:
    """Proves that after Redis is wiped a start without --shards takes the layout the
    ledger records (32 slot-range shards, not the default), recovers into it, and a hold
    made before the wipe commits."""
    running = await start(own_redis.url, tmp_path, shards=32)
    account_id = unique()
    try:
        reservation_id = await hold(running, account_id)
    finally:
        await stop_running(running)
    wipe(own_redis.url)
    running = await start(own_redis.url, tmp_path, recover_on_start="true")
    try:
        assert running.authority.store.keys.layout == ShardLayout(32, TagScheme.SLOT_RANGE)
        assert await commit(running, reservation_id) == 10
        assert (await balance(running, account_id)).available == 990
    finally:
        await stop_running(running)
    assert redis_meta(own_redis.url) == {"shards": "32", "tag_scheme": "slot-range"}


async def test_an_upgraded_ledger_without_a_record_and_a_wiped_redis_take_the_old_tags(
    own_redis: RedisProcess, tmp_path: Path
) -> None:
    """Proves a ledger with entries but no layout (one written before migration 8) under a
    wiped Redis is recovered in the layout every earlier version used: 16 shards, `sNN`
    tags, and its holds commit."""
    client = redis.Redis.from_url(own_redis.url)
    client.hset("tally:meta", "shards", 16)
    client.close()
    running = await start(own_redis.url, tmp_path)
    account_id = unique()
    try:
        reservation_id = await hold(running, account_id)
    finally:
        await stop_running(running)
    with sqlite3.connect(tmp_path / "ledger.sqlite3") as ledger:
        ledger.execute("DELETE FROM deployment_facts")
    wipe(own_redis.url)
    running = await start(own_redis.url, tmp_path, recover_on_start="true")
    try:
        assert running.authority.store.keys.layout == OLD
        assert await commit(running, reservation_id) == 10
    finally:
        await stop_running(running)


async def test_a_redis_and_a_ledger_of_different_deployments_are_refused(
    own_redis: RedisProcess, tmp_path: Path
) -> None:
    """Proves a ledger that records one layout under a Redis that records another (two
    deployments mixed up) is refused, whatever --shards says, and neither is changed."""
    running = await start(own_redis.url, tmp_path, shards=32)
    await stop_running(running)
    wipe(own_redis.url)
    client = redis.Redis.from_url(own_redis.url)
    client.hset("tally:meta", "shards", 16)
    client.close()
    with pytest.raises(LayoutRefused, match="another deployment"):
        await start(own_redis.url, tmp_path)
    assert redis_meta(own_redis.url) == {"shards": "16"}
    assert await ledger_facts(ledger_url(tmp_path)) == {"shards": "32", "tag_scheme": "slot-range"}
