"""`tally report`, `tally budgets` and alert flags as a user runs them."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import sys
from pathlib import Path

from tally_client.v1 import quota_pb2
from tests.support import Running, unique

TALLY = str(Path(sys.executable).with_name("tally"))


async def tally(running: Running, *args: str) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TALLY_")}
    env["TALLY_TARGET"] = running.authority.address
    process = await asyncio.create_subprocess_exec(
        TALLY, *args, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_report_budgets_and_alerts_from_the_command_line(running: Running) -> None:
    """Proves `tally report` prints exact rows as CSV and JSON, `tally budgets` sets
    and lists a budget, and `tally accounts create --alert-*` stores the alerts."""
    account_id = unique()
    code, out, err = await tally(
        running, "accounts", "create", account_id, "--allotment", "1000",
        "--alert-percent", "80", "--alert-percent", "50", "--alert-overage", "--json",
    )
    assert code == 0, err
    alerts = json.loads(out)["alerts"]
    assert alerts["allotment_used_percent"] == [50, 80] and alerts["overage_started"] is True
    for key, operation, quantity, project in [
        ("a", "image.upscale", 3, "atlas"), ("b", "image.vectorize", 2, "zeus"),
        ("c", "image.upscale", 1, "zeus"),
    ]:
        await running.quota.Charge(quota_pb2.ChargeRequest(
            account_id=account_id, operation=operation, quantity=quantity,
            idempotency_key=key, labels={"project": project}))
    code, out, err = await tally(
        running, "report", account_id, "--by", "operation,label:project", "--format", "csv"
    )
    assert code == 0, err
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [(r["operation"], r["labels"], r["units"], r["quantity"], r["count"])
            for r in rows] == [
        ("image.upscale", "project=atlas", "30", "3", "1"),
        ("image.upscale", "project=zeus", "10", "1", "1"),
        ("image.vectorize", "project=zeus", "10", "2", "1"),
    ]
    code, out, err = await tally(running, "report", account_id, "--format", "json")
    assert code == 0, err
    report = json.loads(out)
    assert report["total_units"] == 50 and report["period"]["used"] == 50
    code, out, err = await tally(running, "report", account_id)
    assert code == 0 and "burn rate" in out and "remaining" in out, err
    code, out, err = await tally(running, "budgets", "set", account_id, "label:project=atlas",
                                 "100", "--json")
    assert code == 0, err
    assert json.loads(out)["used_units"] == 30
    code, out, err = await tally(running, "budgets", "list", account_id)
    assert code == 0 and "label:project=atlas" in out and "70" in out, err
    code, _, err = await tally(running, "budgets", "set", account_id, "nonsense", "1")
    assert code == 2 and "SCOPE" in err


async def test_report_period_follows_the_accounts_anchor_day(running: Running) -> None:
    """Proves `tally report --period 2026-11` covers the billing period that starts in
    November on the account's anchor day (the 25th here), to the unit."""
    account_id = unique()
    code, _, err = await tally(running, "accounts", "create", account_id, "--allotment", "100")
    assert code == 0, err
    await running.quota.Charge(quota_pb2.ChargeRequest(
        account_id=account_id, operation="image.upscale", quantity=2, idempotency_key="a"))
    code, out, err = await tally(running, "report", account_id, "--period", "2026-11",
                                 "--format", "json")
    assert code == 0, err
    report = json.loads(out)
    assert report["start"] == "2026-11-25T00:00:00Z" and report["end"] == "2026-12-25T00:00:00Z"
    assert report["total_units"] == 20


async def test_ledger_lists_alert_entries_by_type(running: Running) -> None:
    """Proves `tally ledger --type alert` lists the account's alert entries (the type is
    accepted like every other type the scripts write)."""
    account_id = unique()
    code, _, err = await tally(
        running, "accounts", "create", account_id, "--allotment", "1000",
        "--alert-percent", "50",
    )
    assert code == 0, err
    await running.quota.Charge(quota_pb2.ChargeRequest(
        account_id=account_id, operation="image.upscale", quantity=60, idempotency_key="c"))
    await running.authority.flusher.flush_all()
    code, out, err = await tally(running, "ledger", account_id, "--type", "alert", "--json")
    assert code == 0, err
    assert [e["type"] for e in json.loads(out)["entries"]] == ["alert"]
    code, out, err = await tally(running, "ledger", account_id, "--type", "alert")
    assert code == 0 and "alert" in out, err


async def test_report_period_is_resolved_by_the_server(running: Running) -> None:
    """Proves `tally report --period` sends the month for the server to resolve: every
    account's report covers the calendar month, a malformed month or one given with
    --from is refused naming `period` (exit 1)."""
    code, out, err = await tally(running, "report", "--period", "2026-11", "--format", "json")
    assert code == 0, err
    report = json.loads(out)
    assert report["start"] == "2026-11-01T00:00:00Z" and report["end"] == "2026-12-01T00:00:00Z"
    for extra in (["--period", "2026-13"], ["--period", "2026-11", "--from", "2026-11-25"]):
        code, _, err = await tally(running, "report", unique(), *extra)
        assert code == 1 and "INVALID_ARGUMENT" in err and "period" in err, err
