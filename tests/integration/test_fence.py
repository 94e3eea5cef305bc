"""Shard fences (issue 9): a Redis that lost writes (wiped, or restarted from an older
snapshot) is detected before anything is acknowledged on it, and `tally recover`,
run while the server keeps running, heals it from the ledger."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tally import metrics
from tally.domain.events import decode
from tally.ledger.backend import EntryConflict, open_ledger
from tally.ledger.recovery import recover
from tally.store.contract import FenceMark
from tally.store.keys import KeySpace
from tally.store.layout import DEFAULT_SHARDS, ShardLayout, TagScheme
from tally.store.state_images import StateImages
from tally_client.v1 import account_pb2, account_pb2_grpc, catalog_pb2, quota_pb2, quota_pb2_grpc
from tests.integration.crash_support import run_tally_async, serving, wait_until
from tests.support import T0_MS, RedisProcess, start_running, stop_running, unique

ALLOTMENT = 1_000
# Bounds a wait for the fence watch's next pass (its interval is far shorter).
HEAL_WAIT_S = 30.0


async def _health(channel: grpc.aio.Channel) -> int:
    reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    return int(reply.status)


def _purchase(account_id: str, key: str, units: int) -> account_pb2.PurchaseUnitsRequest:
    return account_pb2.PurchaseUnitsRequest(account_id=account_id, units=units, idempotency_key=key)


def _create(account_id: str) -> account_pb2.CreateAccountRequest:
    return account_pb2.CreateAccountRequest(account_id=account_id, monthly_allotment=ALLOTMENT)


async def _refused(call: object) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await call  # type: ignore[misc]
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "behind the ledger" in (refused.value.details() or "")


async def test_a_wiped_redis_is_refused_until_recovered(
    own_redis: RedisProcess, tmp_path: Path
) -> None:
    """Proves that after FLUSHALL under a running server, CreateAccount and a 700-unit
    PurchaseUnits on the account's shard are refused UNAVAILABLE with nothing written,
    health turns NOT_SERVING, and `tally recover` (the server still running) brings the
    balance back to the unit, after which calls succeed and health is SERVING again."""
    async with serving(own_redis.url, tmp_path, flush_interval="100ms") as served:
        serve, env, ledger_url = served
        async with grpc.aio.insecure_channel(serve.address) as channel:
            accounts = account_pb2_grpc.AccountServiceStub(channel)
            quota = quota_pb2_grpc.QuotaServiceStub(channel)
            account_id = unique()
            await accounts.CreateAccount(_create(account_id))
            await accounts.PurchaseUnits(_purchase(account_id, "p-1", 300))
            client = redis.Redis.from_url(own_redis.url)
            client.flushall()
            await _refused(accounts.CreateAccount(_create(account_id)))
            await _refused(accounts.PurchaseUnits(_purchase(account_id, "p-2", 700)))
            # nothing acknowledged, nothing written (the flusher may have re-created
            # an empty stream for its consumer group)
            assert [k for k in client.scan_iter() if b":events" not in k] == []
            assert sum(client.xlen(k) for k in client.scan_iter(match="*:events")) == 0
            assert await _health(channel) == health_pb2.HealthCheckResponse.NOT_SERVING
            shards = int(env.get("TALLY_SHARDS") or DEFAULT_SHARDS)
            shard = KeySpace(ShardLayout(shards, TagScheme.SLOT_RANGE)).shard_of(account_id)
            code, out, _ = await run_tally_async(env, "status", "--json")
            # shard 0 too: the catalog's events are fenced there
            assert code == 1 and json.loads(out)["shards_behind"] == sorted({0, shard}), out

            code, _, err = await run_tally_async(env, "recover")
            assert code == 0, err
            code, out, _ = await run_tally_async(env, "status", "--json")
            assert code == 0 and json.loads(out)["shards_behind"] == []
            balance = await quota.GetBalance(quota_pb2.GetBalanceRequest(account_id=account_id))
            assert balance.balance.available == ALLOTMENT + 300
            await accounts.PurchaseUnits(_purchase(account_id, "p-2", 700))
            balance = await quota.GetBalance(quota_pb2.GetBalanceRequest(account_id=account_id))
            assert balance.balance.available == ALLOTMENT + 1_000

            # The account's shard is healed by the call above; shard 0 (the catalog's)
            # by the fence watch's next pass, when health turns SERVING again.
            async def serving_again() -> bool:
                return await _health(channel) == health_pb2.HealthCheckResponse.SERVING

            await wait_until(serving_again, HEAL_WAIT_S, "health SERVING after recover")
            client.close()
        assert await serve.terminate() == 0, serve.log
    ledger = open_ledger(ledger_url)
    purchases = [e.units for e in ledger.entries(account_id) if e.type == "purchase"]
    ledger.close()
    assert purchases == [300, 700]


async def test_a_redis_restarted_from_an_older_snapshot_is_refused(
    own_redis: RedisProcess, tmp_path: Path
) -> None:
    """Proves that a Redis restarted from an RDB snapshot older than writes the server
    made (SAVE, more writes, SIGKILL, the old dump copied back) refuses the next call on
    the shard UNAVAILABLE, and `tally recover` heals it to the ledger's balance."""
    async with serving(own_redis.url, tmp_path, flush_interval="100ms") as served:
        serve, env, _ = served
        async with grpc.aio.insecure_channel(serve.address) as channel:
            accounts = account_pb2_grpc.AccountServiceStub(channel)
            quota = quota_pb2_grpc.QuotaServiceStub(channel)
            account_id = unique()
            await accounts.CreateAccount(_create(account_id))
            client = redis.Redis.from_url(own_redis.url)
            client.save()
            client.close()
            snapshot = tmp_path / "old.rdb"
            shutil.copy(own_redis.folder / "dump.rdb", snapshot)
            await accounts.PurchaseUnits(_purchase(account_id, "p-1", 500))  # money in: flushed
            own_redis.kill()
            shutil.rmtree(own_redis.folder / "appendonlydir")
            shutil.copy(snapshot, own_redis.folder / "dump.rdb")
            own_redis.extra = ("--appendonly", "no")
            own_redis.start()
            await _refused(accounts.PurchaseUnits(_purchase(account_id, "p-2", 700)))
            assert await _health(channel) == health_pb2.HealthCheckResponse.NOT_SERVING
            code, _, err = await run_tally_async(env, "recover")
            assert code == 0, err
            await accounts.PurchaseUnits(_purchase(account_id, "p-2", 700))
            balance = await quota.GetBalance(quota_pb2.GetBalanceRequest(account_id=account_id))
            assert balance.balance.available == ALLOTMENT + 500 + 700
        assert await serve.terminate() == 0, serve.log


async def test_an_entry_conflicting_with_the_ledger_is_an_alarm(own_redis: RedisProcess) -> None:
    """Proves the flusher treats a stream entry whose event id the ledger holds with
    other content as an alarm, not a duplicate: nothing of its batch is written or
    acknowledged, the conflict is counted, the shard is fenced (health NOT_SERVING,
    its next call UNAVAILABLE); the same entry delivered again stays a quiet duplicate."""
    running = await start_running(own_redis.url, flush_interval="1h")
    try:
        store, flusher = running.authority.store, running.authority.flusher
        account_id = unique()
        await running.accounts.CreateAccount(_create(account_id))
        shard = store.keys.shard_of(account_id)
        stream = store.keys.events(shard)
        await flusher.flush_shard(shard, steal=True)
        first = (await store.redis.xrange(stream, count=1))[0][1]
        await store.redis.xadd(stream, first)  # the same content again: a duplicate
        assert await flusher.flush_shard(shard, steal=True) == 1
        assert store.fences.fenced == frozenset()
        conflicts_before = metrics.REGISTRY.get_sample_value("tally_ledger_conflicts_total") or 0
        await store.redis.xadd(stream, first | {b"at": b"1"})  # the same id, other content
        assert await flusher.flush_shard(shard, steal=True) == 0
        lag = (await flusher.lag())[shard]
        assert lag.pending == 1
        assert metrics.REGISTRY.get_sample_value("tally_ledger_conflicts_total") == (
            conflicts_before + 1
        )
        assert store.fences.fenced == frozenset({shard})
        assert await _health(running.stubs.channel) == health_pb2.HealthCheckResponse.NOT_SERVING
        await _refused(running.accounts.PurchaseUnits(_purchase(account_id, "p-1", 700)))
    finally:
        await stop_running(running)


def test_the_ledger_refuses_a_batch_with_a_conflicting_entry(ledger_url: str) -> None:
    """Proves write_batch writes nothing of a batch holding an entry whose id the
    ledger has with other content, and names that entry."""
    ledger = open_ledger(ledger_url)
    ledger.migrate(applied_at_ms=T0_MS)
    entry = {b"type": b"purchase", b"event_id": b"a/1", b"account_id": b"a", b"at": b"5",
             b"units": b"3", b"available_after": b"3", b"fence": b"1"}
    ledger.write_batch([decode(0, "1-0", entry)], T0_MS)
    batch = [
        decode(0, "2-0", entry | {b"event_id": b"a/2"}),
        decode(0, "3-0", entry | {b"at": b"6"}),
    ]
    with pytest.raises(EntryConflict) as conflict:
        ledger.write_batch(batch, T0_MS)
    assert [e.entry.entry_id for e in conflict.value.entries] == ["a/1"]
    assert [e.entry_id for e in ledger.entries("a")] == ["a/1"]
    ledger.close()


async def test_the_fence_watch_finds_a_wiped_redis_nobody_calls(own_redis: RedisProcess) -> None:
    """Proves a server learns the ledger's fence floors after start and, with no call at
    all, fences a shard whose Redis was wiped (health NOT_SERVING) at its next fence
    watch pass, and lifts the fence at the pass after `recover` healed the shard."""
    ledger_url = f"sqlite:///{own_redis.folder / 'ledger.sqlite3'}"
    writer = await start_running(own_redis.url, ledger_url=ledger_url, flush_interval="1h")
    watching = await start_running(own_redis.url, ledger_url=ledger_url, flush_interval="1h",
                                   fence_check_interval="1h")
    try:
        account_id = unique()
        shard = watching.authority.store.keys.shard_of(account_id)
        # another server writes the shard and flushes it: the watching one never saw it
        await writer.accounts.CreateAccount(_create(account_id))
        await writer.authority.flusher.flush_shard(shard, steal=True)
        await stop_running(writer)
        fences = watching.authority.store.fences
        redis.Redis.from_url(own_redis.url).flushall()
        behind = frozenset({0, shard})  # shard 0 holds the catalog's events
        assert await watching.authority.fence_watch.pass_once() == len(behind)
        assert fences.fenced == behind and fences.floor(shard) > FenceMark()
        stubs = watching.stubs.channel
        assert await _health(stubs) == health_pb2.HealthCheckResponse.NOT_SERVING
        authority = watching.authority
        await recover(StateImages.of(authority.store), authority.ledger, T0_MS, lambda _: None,
                      authority.store.limits.reservation_retention_ms)
        assert await authority.fence_watch.pass_once() == 0
        assert fences.fenced == frozenset()
        assert await _health(stubs) == health_pb2.HealthCheckResponse.SERVING
    finally:
        await stop_running(watching)


async def test_set_price_on_a_wiped_redis_is_refused_until_recovered(
    own_redis: RedisProcess,
) -> None:
    """Proves the catalog is fenced like accounts: after FLUSHALL, SetPrice is refused
    UNAVAILABLE with nothing written (no `catalog/<n>` event reusing an id the ledger
    holds) and health turns NOT_SERVING; after recovery it succeeds under a version above
    every earlier one, and the ledger records that price."""
    running = await start_running(own_redis.url, flush_interval="1h")
    try:
        authority = running.authority
        set_price = catalog_pb2.SetPriceRequest(operation="image.new", units_per_quantity=7)
        client = redis.Redis.from_url(own_redis.url)
        client.flushall()
        await _refused(running.catalog.SetPrice(set_price))
        assert [k for k in client.scan_iter() if b":events" not in k] == []
        assert sum(client.xlen(k) for k in client.scan_iter(match="*:events")) == 0
        assert await _health(running.stubs.channel) == health_pb2.HealthCheckResponse.NOT_SERVING
        client.close()

        versions = [version for _, version, _, _ in await authority.ledger.catalog_prices()]
        await recover(StateImages.of(authority.store), authority.ledger, T0_MS, lambda _: None,
                      authority.store.limits.reservation_retention_ms)
        reply = await running.catalog.SetPrice(set_price)
        assert reply.price.version > max(versions)
        assert await _health(running.stubs.channel) == health_pb2.HealthCheckResponse.SERVING
        await authority.flusher.flush_all(steal=True)
        assert ("image.new", reply.price.version, 7) in [
            (operation, version, units)
            for operation, version, units, _ in await authority.ledger.catalog_prices()
        ]
        assert authority.store.fences.fenced == frozenset()
    finally:
        await stop_running(running)


async def test_recovery_quarantines_an_entry_conflicting_with_the_ledger(
    own_redis: RedisProcess,
) -> None:
    """Proves recovery sets a stream entry that conflicts with the ledger aside: it is
    kept in the ledger's quarantined_entries with its content, acknowledged and gone
    from the stream, the shard heals, and the flusher goes on without an alarm."""
    running = await start_running(own_redis.url, flush_interval="1h")
    try:
        authority = running.authority
        store, flusher = authority.store, authority.flusher
        account_id = unique()
        await running.accounts.CreateAccount(_create(account_id))
        shard = store.keys.shard_of(account_id)
        stream = store.keys.events(shard)
        await flusher.flush_shard(shard, steal=True)
        first = (await store.redis.xrange(stream, count=1))[0][1]
        await store.redis.xadd(stream, first | {b"at": b"1"})  # the same id, other content
        await flusher.flush_shard(shard, steal=True)
        assert store.fences.fenced == frozenset({shard})

        result = await recover(StateImages.of(store), authority.ledger, T0_MS, lambda _: None,
                               store.limits.reservation_retention_ms)
        assert result.quarantined == 1
        assert await authority.ledger.count_quarantined() == 1
        assert (await flusher.lag())[shard].pending == 0
        assert all(f[b"at"] != b"1" for _, f in await store.redis.xrange(stream))
        # money in: the purchase reaches the ledger before it is acknowledged
        await running.accounts.PurchaseUnits(_purchase(account_id, "p-1", 700))
        assert (await flusher.lag())[shard].waiting == 0
        assert store.fences.fenced == frozenset()
    finally:
        await stop_running(running)
