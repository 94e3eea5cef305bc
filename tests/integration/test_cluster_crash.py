"""The crash test on a real Redis Cluster: two `tally serve` processes on a
3-master cluster (a replica each) and a PostgreSQL ledger, clients spreading
their calls over both servers; one server and one master are SIGKILLed under
traffic (the master's replica takes over, and serves on alone: its replica is
the node that died). Every acknowledged operation is in
the ledger exactly once, to the unit, and `tally verify` is clean."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from tests.cluster_support import started_cluster
from tests.integration.crash_support import (
    Acknowledged,
    Serve,
    create_accounts,
    ledger_matches,
    run_tally_async,
    tally_env,
    wait_until,
    worker,
)
from tests.support import PostgresServer, free_port

pytestmark = pytest.mark.slow
TRAFFIC_DEADLINE_S = 60.0
ACCOUNTS = 6
ROUND_ROBIN = [("grpc.lb_policy_name", "round_robin")]


@pytest.mark.timeout(240)
async def test_a_server_and_a_master_killed_under_traffic_lose_nothing(
    postgres: PostgresServer, tmp_path: Path
) -> None:
    """Proves SIGKILL of one of two servers and of a cluster master (failing over to
    its replica, the default replica wait on) loses no acknowledged operation: the
    PostgreSQL ledger holds each exactly once, to the unit, and verify is clean."""
    ledger_url = postgres.create_database()
    try:
        with started_cluster(tmp_path / "cluster", 3, 1) as cluster:
            env = tally_env(cluster.url, ledger_url, flush_interval="200ms",
                            flush_claim_idle="1s")
            first = Serve(f"127.0.0.1:{free_port()}", env, tmp_path / "first.log")
            second = Serve(f"127.0.0.1:{free_port()}", env, tmp_path / "second.log")
            await first.start()
            await second.start()
            try:
                accounts = await create_accounts(first.address, ACCOUNTS, 1_000_000)
                both = f"ipv4:{first.address},{second.address}"
                seen = Acknowledged()
                stop = asyncio.Event()
                deadline = time.monotonic() + TRAFFIC_DEADLINE_S
                tasks = [
                    asyncio.create_task(worker(both, a, stop, seen, deadline, ROUND_ROBIN))
                    for a in accounts
                ]
                await asyncio.sleep(1.5)
                before_crash = seen.operations
                await first.kill()
                master = cluster.master_holding(f"*:acct:{accounts[0]}")
                await asyncio.to_thread(cluster.kill_and_fail_over, master)

                async def progressed() -> bool:
                    for task in tasks:  # a worker that gave up says why at once
                        if task.done():
                            task.result()
                    return seen.operations >= before_crash + 6 * len(accounts)

                await wait_until(progressed, TRAFFIC_DEADLINE_S, "traffic after the crash")
                stop.set()
                await asyncio.gather(*tasks)
                assert await second.terminate() == 0, second.log
            finally:
                await first.kill()
                await second.kill()
            ledger_matches(ledger_url, seen, accounts)
            code, out, err = await run_tally_async(env, "verify")
            assert code == 0, out + err
            assert "agree" in out
    finally:
        postgres.drop_database(ledger_url)
