"""Everything besides the hot path on a real 3-master Redis Cluster: WatchUsage across
masters, the operator commands (status, verify, recover), tokens with auth required,
and the deployment check on every node."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import redis
from redis.crc import key_slot

from tally.store.keys import KeySpace
from tally.store.streams import EventStreams
from tally_client.v1 import account_pb2, quota_pb2
from tests.cluster_support import RedisClusterProcesses
from tests.e2e.test_auth import bearer
from tests.e2e.test_ops_cli import tally
from tests.integration.test_watch import SLOW_FLUSH, charge, create, take, watch
from tests.support import Running, start_running, stop_running, unique


def master_port(cluster: RedisClusterProcesses, keys: KeySpace, account_id: str) -> int:
    """The port of the master that holds the account's shard."""
    slot = key_slot(keys.events(keys.shard_of(account_id)).encode())
    return cluster.master_of_slot(slot).port


def accounts_on_masters(
    cluster: RedisClusterProcesses, keys: KeySpace, masters: int
) -> list[str]:
    """One new account on each of `masters` different masters."""
    found: dict[int, str] = {}
    while len(found) < masters:
        account_id = unique()
        found.setdefault(master_port(cluster, keys, account_id), account_id)
    return list(found.values())


def wipe(cluster: RedisClusterProcesses) -> None:
    """FLUSHALL on every master."""
    for node in cluster.live():
        with redis.Redis(port=node.port) as client:
            if client.info("replication")["role"] == "master":
                client.flushall()


def tally_env(cluster: RedisClusterProcesses, ledger_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TALLY_")}
    env.update(TALLY_REDIS_URL=cluster.url, TALLY_LEDGER_URL=ledger_url,
               TALLY_METRICS_LISTEN="")
    return env


@pytest.fixture
def ledger_url(tmp_path: Path) -> Iterator[str]:
    yield f"sqlite:///{tmp_path / 'ledger.sqlite3'}"


async def balances(running: Running, account_ids: list[str]) -> list[bytes]:
    """Each account's whole balance (every figure, grants, period), serialized."""
    result = []
    for account_id in account_ids:
        reply = await running.quota.GetBalance(quota_pb2.GetBalanceRequest(account_id=account_id))
        result.append(reply.SerializeToString())
    return result


async def test_watches_follow_accounts_on_every_master_and_resume(
    redis_cluster: RedisClusterProcesses,
) -> None:
    """Proves an all-accounts watch sees the events of accounts on three masters in
    order per account, a single-account watch its account's, and that resuming either
    (from Redis, and from the ledger after a flush trimmed the streams) gives exactly
    the events after the position; an all-accounts watch resumed from before a trim
    says which shards on which masters it missed events of, and how many."""
    running = await start_running(redis_cluster.url, **SLOW_FLUSH)
    try:
        keys = running.authority.store.keys
        accounts = accounts_on_masters(redis_cluster, keys, 3)
        for account_id in accounts:
            await create(running, account_id)
        everything, start_all = await watch(running)
        one, one_start = await watch(running, accounts[0])
        for round_ in range(2):
            for account_id in accounts:
                await charge(running, account_id, f"c{round_}")
        events = await take(everything, 6)
        seen = [(e.account_id, e.type) for e in events]
        assert sorted(seen) == sorted((a, "charge") for a in accounts for _ in range(2))
        mine = await take(one, 2)
        assert [int(e.position) for e in mine] == [int(one_start) + 1, int(one_start) + 2]
        assert {e.account_id for e in mine} == {accounts[0]}
        everything.cancel()
        one.cancel()

        resumed, _ = await watch(running, after=events[1].position)
        rest = await take(resumed, 4)
        assert [(e.account_id, e.position) for e in rest] == [
            (e.account_id, e.position) for e in events[2:]
        ]
        resumed.cancel()

        await running.authority.flusher.flush_all()  # trims every shard's stream
        from_ledger, _ = await watch(running, accounts[0], after="0")
        replayed = await take(from_ledger, int(one_start) + 2)
        assert [int(e.position) for e in replayed] == list(range(1, int(one_start) + 3))
        from_ledger.cancel()

        # every shard kept its newest entry alone: from the start, each missed one
        for account_id in accounts:
            await charge(running, account_id, "after-trim")
        behind, _ = await watch(running, after=start_all)
        notice, *kept = await take(behind, 7)
        behind.cancel()
        assert notice.type == "fell_behind"
        assert all(f"{keys.tag(keys.shard_of(a))}: 1 events" in notice.alert for a in accounts)
        assert sorted(e.account_id for e in kept) == sorted(accounts * 2)
    finally:
        await stop_running(running)


async def test_watches_hold_no_connection_of_the_calls(
    redis_cluster: RedisClusterProcesses,
) -> None:
    """Proves idle watches of accounts on one master, more than the store has
    connections to it, each blocked in an XREAD, take none of the calls' connections:
    charges on that master go through, and every watch sees its account's charge."""
    pool = 4
    running = await start_running(redis_cluster.url, redis_max_connections=pool, **SLOW_FLUSH)
    try:
        keys = running.authority.store.keys
        first = accounts_on_masters(redis_cluster, keys, 1)[0]
        port = master_port(redis_cluster, keys, first)
        accounts = [first]
        while len(accounts) < pool + 2:
            account_id = unique()
            if master_port(redis_cluster, keys, account_id) == port:
                accounts.append(account_id)
        for account_id in accounts:
            await create(running, account_id)
        watches = [await watch(running, account_id) for account_id in accounts]
        for account_id in accounts:
            await charge(running, account_id, "c1")
        for account_id, (call, start) in zip(accounts, watches, strict=True):
            (event,) = await take(call, 1)
            assert (event.account_id, event.position) == (account_id, str(int(start) + 1))
            call.cancel()
    finally:
        await stop_running(running)


async def test_status_verify_and_recover_after_every_master_was_wiped(
    redis_cluster: RedisClusterProcesses, ledger_url: str
) -> None:
    """Proves `tally status` reports the flusher's lag over every shard, `tally verify`
    finds Redis and the ledger equal after traffic, and `tally recover` rebuilds a
    cluster emptied on every master to the same balances (to the unit) and a clean
    verify."""
    wipe(redis_cluster)  # no account of another test's ledger
    running = await start_running(redis_cluster.url, ledger_url=ledger_url, **SLOW_FLUSH)
    env = tally_env(redis_cluster, ledger_url)
    keys = running.authority.store.keys
    accounts = accounts_on_masters(redis_cluster, keys, 3)
    try:
        for account_id in accounts:
            await create(running, account_id)
            await charge(running, account_id, "c1")
            await running.quota.Reserve(quota_pb2.ReserveRequest(
                account_id=account_id, operation="image.upscale", quantity=2,
                idempotency_key="open",
            ))
        code, out, err = await tally(env, "status", "--json")
        assert code == 0, err
        status = json.loads(out)
        assert len(status["shards"]) == keys.shards
        waiting = {lag["shard"]: lag["waiting"] for lag in status["shards"]}
        # the charge and the hold wait on each account's shard, on three masters
        assert all(waiting[keys.shard_of(a)] >= 2 for a in accounts)
        before = await balances(running, accounts)
    finally:
        await stop_running(running)  # flushes the ledger on the way out

    code, out, err = await tally(env, "verify")
    assert code == 0, out + err
    assert "agree" in out
    code, out, err = await tally(env, "status", "--json")
    assert code == 0, err
    assert json.loads(out)["events_waiting"] == 0

    wipe(redis_cluster)
    with pytest.raises(RuntimeError, match="behind the ledger"):
        await start_running(redis_cluster.url, ledger_url=ledger_url, **SLOW_FLUSH)
    code, out, err = await tally(env, "recover")
    assert code == 0, out + err
    code, out, err = await tally(env, "verify")
    assert code == 0, out + err
    running = await start_running(redis_cluster.url, ledger_url=ledger_url, **SLOW_FLUSH)
    try:
        assert await balances(running, accounts) == before
    finally:
        await stop_running(running)


async def test_tokens_made_on_a_cluster_let_their_holder_in(
    redis_cluster: RedisClusterProcesses, ledger_url: str
) -> None:
    """Proves `tally tokens create` writes a token every server on the cluster reads:
    with auth required, a call without it is UNAUTHENTICATED and with it succeeds."""
    running = await start_running(redis_cluster.url, ledger_url=ledger_url, auth="required")
    try:
        code, out, err = await tally(
            tally_env(redis_cluster, ledger_url), "tokens", "create", "--json",
            "--role", "admin", "--name", "cluster",
        )
        assert code == 0, err
        token = json.loads(out)["token"]
        request = account_pb2.CreateAccountRequest(account_id=unique(), monthly_allotment=10)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await running.accounts.CreateAccount(request)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        await running.accounts.CreateAccount(request, metadata=bearer(token))
        reply = await running.quota.GetBalance(
            quota_pb2.GetBalanceRequest(account_id=request.account_id), metadata=bearer(token)
        )
        assert reply.balance.available == 10
    finally:
        await stop_running(running)


async def test_a_cluster_with_one_evicting_master_is_refused(
    redis_cluster: RedisClusterProcesses,
) -> None:
    """Proves the server refuses to start when any one master may evict keys, naming
    that master, and starts once it may not."""
    evicting = redis_cluster.master_of_slot(16383)
    with redis.Redis(port=evicting.port) as node:
        node.config_set("maxmemory-policy", "allkeys-lru")
    try:
        with pytest.raises(RuntimeError, match=f"'allkeys-lru' on 127.0.0.1:{evicting.port}"):
            await start_running(redis_cluster.url)
    finally:
        with redis.Redis(port=evicting.port) as node:
            node.config_set("maxmemory-policy", "noeviction")
    running = await start_running(redis_cluster.url)
    await stop_running(running)


async def test_flusher_lag_and_fence_watch_cover_every_master(
    redis_cluster: RedisClusterProcesses,
) -> None:
    """Proves the flusher's lag counts each account's unflushed charge on its own
    shard, on three masters, and nothing once a flush went through every shard; and
    that the fence watch reads every master's fences: wiping one master fences its
    shards alone."""
    running = await start_running(redis_cluster.url, **SLOW_FLUSH)
    try:
        streams = EventStreams.of(running.authority.store)
        accounts = accounts_on_masters(redis_cluster, streams.keys, 3)
        for account_id in accounts:
            await create(running, account_id)
            await charge(running, account_id, "c1")
        lags = {lag.shard: lag for lag in await streams.lag()}
        assert len(lags) == streams.keys.shards
        assert all(lags[streams.keys.shard_of(a)].waiting >= 1 for a in accounts)
        await running.authority.flusher.flush_all()
        assert all(lag.waiting == 0 for lag in await streams.lag())

        fence_watch = running.authority.fence_watch
        assert await fence_watch.pass_once() == 0
        wiped = master_port(redis_cluster, streams.keys, accounts[0])
        with redis.Redis(port=wiped) as node:
            node.flushall()
        assert await fence_watch.pass_once() >= 1
        fenced = fence_watch.fences.fenced
        assert streams.keys.shard_of(accounts[0]) in fenced
        assert all(streams.keys.shard_of(a) not in fenced for a in accounts[1:])
    finally:
        await stop_running(running)
