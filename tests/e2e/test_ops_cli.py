"""The operator commands as a user runs them: ledger, status, migrate, verify."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

from tally.ledger.schema import LATEST_VERSION
from tally_client.v1 import account_pb2, quota_pb2
from tests.support import RedisProcess, start_running, stop_running, unique

TALLY = str(Path(sys.executable).with_name("tally"))


async def tally(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        TALLY, *args, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_ledger_status_migrate_and_verify_commands(
    own_redis: RedisProcess, tmp_path: Path
) -> None:
    """Proves `tally ledger` lists an account's entries with exact figures, `tally
    status` reports the flusher's lag and a shutdown snapshot, `tally migrate` the
    schema version and `tally verify` a clean comparison."""
    ledger_url = f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
    running = await start_running(own_redis.url, ledger_url=ledger_url, flush_interval="1h")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TALLY_")}
    env.update(TALLY_REDIS_URL=own_redis.url, TALLY_LEDGER_URL=ledger_url,
               TALLY_TARGET=running.authority.address, TALLY_METRICS_LISTEN="")
    account_id = unique()
    try:
        await running.accounts.CreateAccount(
            account_pb2.CreateAccountRequest(account_id=account_id, monthly_allotment=500)
        )
        await running.quota.Charge(
            quota_pb2.ChargeRequest(
                account_id=account_id, operation="image.upscale", quantity=4,
                idempotency_key="c1",
            )
        )
        code, out, err = await tally(env, "status", "--json")
        assert code == 0, err
        status = json.loads(out)
        assert status["events_waiting"] >= 1  # the charge is not flushed yet
        assert status["ledger"] == "sqlite"
        await running.authority.flusher.flush_all()
        code, out, err = await tally(env, "ledger", account_id, "--json")
        assert code == 0, err
        entries = json.loads(out)["entries"]
        assert [(e["type"], e["units"], e["available_after"]) for e in entries] == [
            ("plan_change", 0, 0), ("allotment", 500, 500), ("charge", 40, 460)
        ]
        code, out, _ = await tally(env, "ledger", account_id, "--type", "charge")
        assert code == 0 and "charge" in out and "allotment" not in out
    finally:
        await stop_running(running)
    code, out, err = await tally(env, "status", "--json")
    assert code == 0, err
    status = json.loads(out)
    assert status["events_waiting"] == 0
    assert status["latest_snapshot"]["accounts"] >= 1
    code, out, _ = await tally(env, "migrate")
    assert code == 0 and f"schema version {LATEST_VERSION}" in out
    code, out, err = await tally(env, "verify")
    assert code == 0, out + err
    assert "agree" in out
