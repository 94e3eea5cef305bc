"""Crash tests with real processes and SIGKILL: nothing acknowledged is lost.

Each test runs worker traffic that retries every call with its idempotency key
until it is acknowledged, counts what was acknowledged, and compares it with
the ledger to the unit, then runs `tally verify`.
"""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
import redis

from tally.ledger.backend import open_ledger
from tests.integration.crash_support import (
    TALLY,
    Acknowledged,
    create_accounts,
    ledger_matches,
    run_tally_async,
    serving,
    tally_env,
    wait_until,
    worker,
)
from tests.support import RedisProcess, free_port

pytestmark = pytest.mark.slow
TRAFFIC_DEADLINE_S = 90.0


async def run_traffic_around(address: str, accounts: list[str], crash, seconds: float):  # type: ignore[no-untyped-def]
    """Workers run; after `seconds` the crash happens; workers run on until they
    have made progress after it; then they stop and every call is acknowledged."""
    seen = Acknowledged()
    stop = asyncio.Event()
    deadline = time.monotonic() + TRAFFIC_DEADLINE_S
    tasks = [asyncio.create_task(worker(address, a, stop, seen, deadline)) for a in accounts]
    await asyncio.sleep(seconds)
    before_crash = seen.operations
    await crash()

    async def progressed() -> bool:
        return seen.operations >= before_crash + 3 * len(accounts)

    await wait_until(progressed, TRAFFIC_DEADLINE_S, "traffic after the crash")
    stop.set()
    await asyncio.gather(*tasks)
    assert seen.operations > before_crash, "no traffic got through after the crash"
    return seen


async def verify_clean(env: dict[str, str]) -> None:
    code, out, err = await run_tally_async(env, "verify")
    assert code == 0, out + err
    assert "agree" in out


async def test_sigkill_of_the_server_loses_nothing_acknowledged(
    own_redis: RedisProcess, tmp_path: Path
) -> None:
    """Proves that after `tally serve` is SIGKILLed under traffic and restarted, the
    ledger holds every acknowledged operation exactly once and verify is clean."""
    async with serving(own_redis.url, tmp_path, flush_interval="200ms") as served:
        serve, env, ledger_url = served
        accounts = await create_accounts(serve.address, 3, 1_000_000)

        async def crash() -> None:
            await serve.kill()
            await asyncio.sleep(0.3)
            await serve.start()

        seen = await run_traffic_around(serve.address, accounts, crash, 1.0)
        assert await serve.terminate() == 0, serve.log
        ledger_matches(ledger_url, seen, accounts)
        await verify_clean(env)


async def test_sigkill_of_redis_loses_nothing_acknowledged(
    own_redis: RedisProcess, tmp_path: Path
) -> None:
    """Proves that after redis-server (AOF appendfsync always) is SIGKILLed under
    traffic and restarted, the server reconnects by itself and every acknowledged
    operation is in Redis and in the ledger."""
    async with serving(own_redis.url, tmp_path, flush_interval="200ms") as served:
        serve, env, ledger_url = served
        accounts = await create_accounts(serve.address, 3, 1_000_000)

        async def crash() -> None:
            own_redis.kill()
            await asyncio.sleep(0.3)
            own_redis.start()

        seen = await run_traffic_around(serve.address, accounts, crash, 1.0)
        assert serve.process is not None and serve.process.returncode is None
        assert await serve.terminate() == 0, serve.log
        ledger_matches(ledger_url, seen, accounts)
        await verify_clean(env)


async def test_recover_rebuilds_a_wiped_redis_from_the_ledger(
    own_redis: RedisProcess, tmp_path: Path
) -> None:
    """Proves that after FLUSHALL, `tally recover` restores every balance exactly as
    the ledger has it, the server refuses to start before that, and verify is clean."""
    async with serving(own_redis.url, tmp_path, flush_interval="200ms") as served:
        serve, env, ledger_url = served
        accounts = await create_accounts(serve.address, 3, 1_000_000)

        async def nothing() -> None:
            return None

        seen = await run_traffic_around(serve.address, accounts, nothing, 0.5)
        assert await serve.terminate() == 0, serve.log
        client = redis.Redis.from_url(own_redis.url)
        before = {a: client.get(f"tally:{{{tag(a, env)}}}:acct:{a}") for a in accounts}
        client.flushall()
        code, _, err = await run_tally_async(
            env, "serve", "--listen", f"127.0.0.1:{free_port()}"
        )
        assert code == 1 and "tally recover" in err
        code, _, err = await run_tally_async(env, "recover")
        assert code == 0, err
        after = {a: client.get(f"tally:{{{tag(a, env)}}}:acct:{a}") for a in accounts}
        client.close()
        assert after == before
        ledger_matches(ledger_url, seen, accounts)
        await verify_clean(env)
        await serve.start()


def tag(account_id: str, env: dict[str, str]) -> str:
    from tally.store.keys import KeySpace
    from tally.store.layout import DEFAULT_SHARDS, ShardLayout, TagScheme

    shards = int(env.get("TALLY_SHARDS") or DEFAULT_SHARDS)  # a new deployment's layout
    keys = KeySpace(ShardLayout(shards, TagScheme.SLOT_RANGE))
    return keys.tag(keys.shard_of(account_id))


async def test_a_flusher_killed_mid_batch_is_finished_by_another(
    own_redis: RedisProcess, tmp_path: Path
) -> None:
    """Proves that events a flusher read and then died on (SIGKILL while its ledger
    write waited on a lock) are claimed and written by another flusher: no
    duplicates, no gaps."""
    ledger_path = tmp_path / "ledger.sqlite3"
    async with serving(own_redis.url, tmp_path, flush_interval="1h",
                       snapshot_interval="1h") as served:
        serve, env, ledger_url = served
        accounts = await create_accounts(serve.address, 2, 1_000_000)

        async def nothing() -> None:
            return None

        seen = await run_traffic_around(serve.address, accounts, nothing, 0.5)
        blocker = sqlite3.connect(ledger_path, isolation_level=None)
        blocker.execute("BEGIN EXCLUSIVE")
        flusher_env = tally_env(own_redis.url, ledger_url, flush_batch="5")
        doomed = await asyncio.create_subprocess_exec(
            TALLY, "flusher", env=flusher_env,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        client = redis.Redis.from_url(own_redis.url)
        streams = [k for k in client.scan_iter(match="tally:{*}:events")]

        def pending() -> int:
            return sum(int(client.xpending(s, "ledger")["pending"]) for s in streams)

        async def read_a_batch() -> bool:
            return pending() > 0

        await wait_until(read_a_batch, 30, "the doomed flusher to read a batch")
        doomed.kill()
        await doomed.wait()
        blocker.execute("ROLLBACK")
        blocker.close()
        assert pending() > 0
        rescuer = await asyncio.create_subprocess_exec(
            TALLY, "flusher",
            env=tally_env(own_redis.url, ledger_url, flush_claim_idle="100ms",
                          flush_interval="100ms"),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )

        async def finished() -> bool:
            return pending() == 0 and sum(client.xlen(s) for s in streams) <= len(streams)

        try:
            await wait_until(finished, 30, "the pending events to be finished")
        finally:
            rescuer.terminate()
            await asyncio.wait_for(rescuer.wait(), 30)
        client.close()
        ledger = open_ledger(ledger_url)
        total = ledger.count_entries()
        ledger.close()
        assert total > 0
        ledger_matches(ledger_url, seen, accounts)
        await verify_clean(env)
