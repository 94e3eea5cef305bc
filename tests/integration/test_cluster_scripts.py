"""The script path on a real Redis Cluster (3 masters): every call reaches its
shard's master, batches spanning masters are answered item by item, and with
replicas a write is acknowledged only once a replica has it; a failover to a
replica that missed acknowledged writes is detected, never served."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tally.store.script_pipeline import ReplicaWait
from tally_client.v1 import quota_pb2
from tests.cluster_support import RedisClusterProcesses, started_cluster
from tests.guard_support import aio, balance, create_account, rpc_error
from tests.support import RedisProcess, Running, start_running, stop_running, unique

ALLOTMENT = 1000
OPERATION = "image.upscale"
UNITS = 10  # its default price
RETRIES_AFTER_FAILOVER = 25
WAIT_BOUND_S = 30.0  # bounds a wait for the cluster to notice a node (never a threshold)


def accounts_on_every_master(
    running: Running, cluster: RedisClusterProcesses, per_master: int = 2
) -> dict[int, list[str]]:
    """Fresh account ids, per_master of them on each master (by master port)."""
    keys = running.authority.store.keys
    found: dict[int, list[str]] = {}
    while len(found) < cluster.masters or min(map(len, found.values())) < per_master:
        account_id = unique()
        master = cluster.master_of_key(keys.account_keys(account_id)[0])
        if len(found.setdefault(master.port, [])) < per_master:
            found[master.port].append(account_id)
    return found


def fcalls(node: RedisProcess) -> int:
    with redis.Redis(port=node.port) as client:
        stats = client.info("commandstats")
    return sum(int(stats.get(f"cmdstat_{name}", {}).get("calls", 0))
               for name in ("fcall", "fcall_ro"))


async def reserve(running: Running, account_id: str, key: str) -> quota_pb2.ReserveResponse:
    reply: quota_pb2.ReserveResponse = await aio(running).quota.Reserve(
        quota_pb2.ReserveRequest(account_id=account_id, operation=OPERATION,
                                 idempotency_key=key),
        timeout=5,
    )
    return reply


@pytest_asyncio.fixture
async def on_cluster(redis_cluster: RedisClusterProcesses) -> AsyncIterator[Running]:
    running = await start_running(redis_cluster.url)
    yield running
    await stop_running(running)


async def test_every_call_reaches_its_shards_master(
    on_cluster: Running, redis_cluster: RedisClusterProcesses
) -> None:
    """Proves reserve, commit, refund and charge on accounts of all three masters move
    exactly their units, and each master ran script calls of its own."""
    before = {node.port: fcalls(node) for node in redis_cluster.nodes}
    by_master = accounts_on_every_master(on_cluster, redis_cluster)
    quota = aio(on_cluster).quota
    for accounts in by_master.values():
        for account_id in accounts:
            await create_account(on_cluster, account_id, monthly_allotment=ALLOTMENT)
            held = await reserve(on_cluster, account_id, "r1")
            await quota.Commit(quota_pb2.CommitRequest(reservation_id=held.reservation_id))
            await quota.Refund(quota_pb2.RefundRequest(
                reservation_id=held.reservation_id, units=4, idempotency_key="f1"))
            await quota.Charge(quota_pb2.ChargeRequest(
                account_id=account_id, operation=OPERATION, idempotency_key="c1"))
            assert (await balance(on_cluster, account_id)).available == ALLOTMENT - 2 * UNITS + 4
    for node in redis_cluster.nodes:
        assert fcalls(node) > before[node.port], f"no script ran on the master {node.port}"


async def test_a_batch_spanning_masters_answers_every_item(
    on_cluster: Running, redis_cluster: RedisClusterProcesses
) -> None:
    """Proves a ReserveBatch and a CommitBatch whose items live on three masters
    answer every item, one short item refused alone, and balances move to the unit."""
    by_master = accounts_on_every_master(on_cluster, redis_cluster, per_master=1)
    accounts = [ids[0] for ids in by_master.values()]
    poor = accounts[0]
    for account_id in accounts:
        allotment = UNITS // 2 if account_id == poor else ALLOTMENT
        await create_account(on_cluster, account_id, monthly_allotment=allotment)
    quota = aio(on_cluster).quota
    reserved = await quota.ReserveBatch(quota_pb2.ReserveBatchRequest(items=[
        quota_pb2.ReserveRequest(account_id=a, operation=OPERATION, idempotency_key="b1")
        for a in accounts
    ]))
    codes = [item.status.code for item in reserved.results]
    assert codes[0] == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert codes[1:] == [grpc.StatusCode.OK.value[0]] * (len(accounts) - 1)
    held = [item.response.reservation_id for item in reserved.results[1:]]
    committed = await quota.CommitBatch(quota_pb2.CommitBatchRequest(items=[
        quota_pb2.CommitRequest(reservation_id=rid) for rid in held
    ]))
    assert [item.response.units_charged for item in committed.results] == [UNITS] * len(held)
    for account_id in accounts[1:]:
        assert (await balance(on_cluster, account_id)).available == ALLOTMENT - UNITS
    assert (await balance(on_cluster, poor)).available == UNITS // 2


@pytest.fixture
def replicated_cluster(tmp_path: Path) -> Iterator[RedisClusterProcesses]:
    """3 masters with a replica each, for this test alone (it kills and stops nodes)."""
    with started_cluster(tmp_path / "cluster", 3, 1) as cluster:
        yield cluster


async def test_auto_waits_for_one_replica_when_every_master_has_one(
    replicated_cluster: RedisClusterProcesses,
) -> None:
    """Proves `--redis-wait-replicas auto` (the default) waits for one replica on a
    cluster whose masters all have a replica, and a write no replica confirms is
    UNAVAILABLE, then replayed once by a retry with its key: units held once."""
    running = await start_running(replicated_cluster.url, redis_wait_timeout="200ms")
    try:
        assert running.authority.store.runner.cluster is not None
        assert running.authority.store.runner.cluster.wait == ReplicaWait(1, 200)
        account_id = unique()
        await create_account(running, account_id, monthly_allotment=ALLOTMENT)
        master = replicated_cluster.master_of_key(
            running.authority.store.keys.account_keys(account_id)[0])
        replica = replicated_cluster.replica_of(master)
        assert replica.process is not None
        os.kill(replica.process.pid, signal.SIGSTOP)
        try:
            error = await rpc_error(reserve(running, account_id, "w1"))
        finally:
            os.kill(replica.process.pid, signal.SIGCONT)
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert "replicas" in (error.details() or "")
        replayed = await reserve(running, account_id, "w1")
        assert replayed.replayed
        assert (await balance(running, account_id)).available == ALLOTMENT - UNITS
    finally:
        await stop_running(running)


async def test_a_master_whose_replica_died_serves_on_and_waits_again_once_it_is_back(
    replicated_cluster: RedisClusterProcesses,
) -> None:
    """Proves a master whose only replica died refuses writes (UNAVAILABLE) only until
    the cluster marks the replica failed, then acknowledges them on its own (nothing
    could fail over to); the refused write, retried with its key, moves units once;
    and once the replica is back every write waits for it again."""
    running = await start_running(replicated_cluster.url, redis_wait_timeout="200ms")
    try:
        account_id = unique()
        await create_account(running, account_id, monthly_allotment=ALLOTMENT)
        scripts = running.authority.store.runner.cluster
        assert scripts is not None
        master = replicated_cluster.master_of_key(
            running.authority.store.keys.account_keys(account_id)[0])
        replica = replicated_cluster.replica_of(master)
        master_name = f"127.0.0.1:{master.port}"
        replica.kill()
        deadline = time.monotonic() + WAIT_BOUND_S
        while True:  # one logical call, retried with its key as a worker would
            try:
                await reserve(running, account_id, "alone")
                break
            except grpc.aio.AioRpcError as error:
                assert error.code() == grpc.StatusCode.UNAVAILABLE
                assert "replicas" in (error.details() or "")
                assert time.monotonic() < deadline, "the master never served alone"
                await asyncio.sleep(0.2)
        assert scripts.pipeline_wait(master_name) is None
        assert (await balance(running, account_id)).available == ALLOTMENT - UNITS

        await asyncio.to_thread(replicated_cluster.rejoin, replica)
        deadline = time.monotonic() + WAIT_BOUND_S
        while scripts.pipeline_wait(master_name) != ReplicaWait(1, 200):
            assert time.monotonic() < deadline, "the master never waited for its replica again"
            await balance(running, account_id)  # calls let the slot table age and refresh
            await asyncio.sleep(0.5)
    finally:
        await stop_running(running)


async def test_a_failover_to_a_replica_that_missed_writes_is_fenced(
    replicated_cluster: RedisClusterProcesses,
) -> None:
    """Proves that without a replica wait, a failover to a replica that missed an
    acknowledged write is detected: the shard is fenced (UNAVAILABLE, health
    NOT_SERVING) instead of serving a balance that forgot the write."""
    running = await start_running(replicated_cluster.url, redis_wait_replicas="0")
    try:
        account_id = unique()
        await create_account(running, account_id, monthly_allotment=ALLOTMENT)
        store = running.authority.store
        master = replicated_cluster.master_of_key(store.keys.account_keys(account_id)[0])
        replica = replicated_cluster.replica_of(master)
        slot = replicated_cluster.first_slot(master)
        assert replica.process is not None
        # The replica stops, and its link is cut: what the master writes from now on
        # reaches no replica (nothing sits in the link's socket buffers either).
        os.kill(replica.process.pid, signal.SIGSTOP)
        try:
            with redis.Redis(port=master.port) as client:
                client.client_kill_filter(_type="replica")
            acknowledged = await reserve(running, account_id, "lost")
            assert acknowledged.units == UNITS
            master.kill()
        finally:
            os.kill(replica.process.pid, signal.SIGCONT)
        replicated_cluster.wait_promoted(master, slot)
        # The first calls may still meet the dead master's connections (UNAVAILABLE,
        # retried by callers with the same key), until the slot table is fresh.
        for _ in range(RETRIES_AFTER_FAILOVER):
            error = await rpc_error(reserve(running, account_id, "after"))
            assert error.code() == grpc.StatusCode.UNAVAILABLE
            if "unreachable" not in (error.details() or ""):
                break
            await asyncio.sleep(0.2)
        assert "lost writes" in (error.details() or "")
        assert store.keys.shard_of(account_id) in store.fences.fenced
        health = await health_pb2_grpc.HealthStub(running.stubs.channel).Check(
            health_pb2.HealthCheckRequest()
        )
        assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        await stop_running(running)
