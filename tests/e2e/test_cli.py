"""The real `tally` console script against an in-process authority.

The authority runs on the test's event loop, so the script is started with
asyncio's subprocess support (a blocking subprocess.run would starve it).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support import Running, unique

TALLY = Path(sys.executable).with_name("tally")
T0_ISO = "2026-11-25T12:00:00Z"  # tests.support.T0_MS


@dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        assert self.code == 0, self.err
        return json.loads(self.out)


async def tally(*args: str, env: dict[str, str] | None = None) -> Result:
    process = await asyncio.create_subprocess_exec(
        str(TALLY),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=30)
    assert process.returncode is not None
    return Result(process.returncode, out.decode(), err.decode())


async def test_accounts_create_show_update_in_json(running: Running) -> None:
    """Proves `accounts create/show/update --json` print exact figures scripts can parse."""
    target = ("--target", running.authority.address)
    account_id = unique("cli")
    created = (
        await tally(
            "accounts", "create", account_id, "--allotment", "5000", "--policy", "allow",
            "--overage-limit", "250", "--anchor-day", "3", "--label", "team=imaging",
            "--label", "tier=pro", "--json", *target,
        )
    ).json()
    assert created["account_id"] == account_id
    assert created["monthly_allotment"] == 5000
    assert created["overage_policy"] == "OVERAGE_POLICY_ALLOW"
    assert created["overage_limit"] == 250
    assert created["billing_anchor_day"] == 3
    assert created["labels"] == {"team": "imaging", "tier": "pro"}
    assert created["created_at"] == T0_ISO
    assert created["replayed"] is False

    again = (
        await tally(
            "accounts", "create", account_id, "--allotment", "5000", "--policy", "allow",
            "--overage-limit", "250", "--anchor-day", "3", "--label", "team=imaging",
            "--label", "tier=pro", "--json", *target,
        )
    ).json()
    assert again["replayed"] is True

    shown = (await tally("accounts", "show", account_id, "--json", *target)).json()
    assert shown["account"]["monthly_allotment"] == 5000
    assert shown["balance"]["available"] == 5000
    assert shown["balance"]["held"] == 0
    assert shown["balance"]["overage_limit"] == 250
    assert [g["kind"] for g in shown["balance"]["grants"]] == ["GRANT_KIND_ALLOTMENT"]

    updated = (
        await tally(
            "accounts", "update", account_id, "--allotment", "8000", "--policy", "deny",
            "--overage-limit", "0", "--label", "tier=enterprise", "--replace-labels",
            "--json", *target,
        )
    ).json()
    assert updated["monthly_allotment"] == 8000
    assert updated["overage_policy"] == "OVERAGE_POLICY_DENY"
    assert updated["overage_limit"] == 0
    assert updated["labels"] == {"tier": "enterprise"}
    # A new allotment applies from the next period: this period keeps 5000.
    balance = (await tally("balance", account_id, "--json", *target)).json()
    assert balance["available"] == 5000


async def test_accounts_commands_in_table_mode(running: Running) -> None:
    """Proves `accounts create/show/update` print aligned, readable tables with ISO times."""
    target = ("--target", running.authority.address)
    account_id = unique("cli")
    created = await tally(
        "accounts", "create", account_id, "--allotment", "5000", "--label", "team=x", *target
    )
    assert created.code == 0, created.err
    lines = created.out.splitlines()
    assert lines[0].split() == ["account", account_id]
    assert "monthly allotment        5000" in created.out
    assert "overage policy           OVERAGE_POLICY_DENY" in created.out
    assert f"created at               {T0_ISO}" in created.out
    assert "labels                   team=x" in created.out
    # The value column starts at the same place on every line.
    starts = {len(line) - len(line.split("  ")[-1].lstrip()) for line in lines}
    assert len(starts) == 1

    shown = await tally("accounts", "show", account_id, *target)
    assert shown.code == 0, shown.err
    assert "available" in shown.out and " 5000" in shown.out
    header = next(line for line in shown.out.splitlines() if line.startswith("GRANT"))
    assert header.split() == ["GRANT", "KIND", "GRANTED", "REMAINING", "EXPIRES", "REFERENCE"]
    assert "GRANT_KIND_ALLOTMENT" in shown.out

    updated = await tally(
        "accounts", "update", account_id, "--overage-limit", "300", "--policy", "allow",
        *target,
    )
    assert updated.code == 0, updated.err
    assert "overage policy           OVERAGE_POLICY_ALLOW" in updated.out
    assert "overage limit            300" in updated.out


async def test_purchase_and_balance(running: Running) -> None:
    """Proves a purchase of 1000 on a 5000 allotment shows as 6000 available, in both modes."""
    target = ("--target", running.authority.address)
    account_id = unique("cli")
    assert (
        await tally("accounts", "create", account_id, "--allotment", "5000", *target)
    ).code == 0

    bought = (
        await tally(
            "purchase", account_id, "1000", "--reference", "inv-42",
            "--expires-at", "2027-06-30T00:00:00Z", "--json", *target,
        )
    ).json()
    assert bought["account_id"] == account_id
    key = bought["idempotency_key"]
    assert len(key) == 36  # a fresh uuid4
    assert bought["grant"]["kind"] == "GRANT_KIND_PURCHASE"
    assert bought["grant"]["units_granted"] == 1000
    assert bought["grant"]["reference"] == "inv-42"
    assert bought["grant"]["expires_at"] == "2027-06-30T00:00:00Z"

    # Retrying with the printed key applies the purchase once.
    retried = (
        await tally(
            "purchase", account_id, "1000", "--reference", "inv-42",
            "--expires-at", "2027-06-30T00:00:00Z", "--idempotency-key", key, "--json",
            *target,
        )
    ).json()
    assert retried["grant"]["grant_id"] == bought["grant"]["grant_id"]

    balance = (await tally("balance", account_id, "--json", *target)).json()
    assert balance["account_id"] == account_id
    assert balance["available"] == 6000
    assert balance["held"] == 0
    assert (balance["overage_used"], balance["overage_limit"]) == (0, 0)
    assert balance["period_consumed"] == 0
    assert [(g["kind"], g["units_remaining"]) for g in balance["grants"]] == [
        ("GRANT_KIND_ALLOTMENT", 5000),
        ("GRANT_KIND_PURCHASE", 1000),
    ]
    assert balance["period_start"] < T0_ISO < balance["period_end"]

    table = await tally(
        "purchase", account_id, "250", "--idempotency-key", "order-7", *target
    )
    assert table.code == 0, table.err
    assert "idempotency key  order-7" in table.out
    assert "expires at       never" in table.out

    text = await tally("balance", account_id, *target)
    assert text.code == 0, text.err
    rows = text.out.splitlines()
    assert rows[0].split() == ["account", account_id]
    assert "available             6250" in text.out
    assert "overage used / limit  0 / 0" in text.out
    grants = rows[rows.index(next(r for r in rows if r.startswith("GRANT"))) + 1 :]
    assert [row.split()[1:4] for row in grants] == [
        ["GRANT_KIND_ALLOTMENT", "5000", "5000"],
        ["GRANT_KIND_PURCHASE", "1000", "1000"],
        ["GRANT_KIND_PURCHASE", "250", "250"],
    ]
    assert "2027-06-30T00:00:00Z" in grants[1]
    assert grants[2].split()[4] == "never"
    after = (await tally("balance", account_id, "--json", *target)).json()
    assert [g["expires_at"] for g in after["grants"]] == [
        balance["period_end"],
        "2027-06-30T00:00:00Z",
        None,  # unset fields are present as null
    ]


async def test_prices_list_and_set(running: Running) -> None:
    """Proves `prices set` changes a price `prices list` then shows, in both modes."""
    target = ("--target", running.authority.address)
    operation = f"test.op-{unique('p')}"
    listed = (await tally("prices", "list", "--json", *target)).json()
    by_operation = {p["operation"]: p for p in listed["prices"]}
    assert by_operation["image.upscale"]["units_per_quantity"] == 10
    assert by_operation["image.generate.sdxl"]["units_per_quantity"] == 5
    assert isinstance(listed["catalog_version"], int)

    price = (await tally("prices", "set", operation, "7", "--json", *target)).json()
    assert price["operation"] == operation
    assert price["units_per_quantity"] == 7
    assert price["version"] > listed["catalog_version"]

    table = await tally("prices", "set", operation, "9", *target)
    assert table.code == 0, table.err
    assert table.out.splitlines()[0].split() == [
        "OPERATION", "UNITS/QTY", "VERSION", "EFFECTIVE", "AT"
    ]
    assert table.out.splitlines()[1].split()[:2] == [operation, "9"]

    # The target may come from TALLY_TARGET instead of --target.
    text = await tally("prices", "list", env={"TALLY_TARGET": running.authority.address})
    assert text.code == 0, text.err
    row = next(line for line in text.out.splitlines() if line.startswith(operation))
    assert row.split()[1] == "9"
    assert "catalog version" in text.out


async def test_errors_are_one_line_and_exit_nonzero(running: Running) -> None:
    """Proves a refused call exits 1 with one `tally: CODE: details` line, and bad usage exits 2."""
    target = ("--target", running.authority.address)
    missing = unique("ghost")
    for args in (
        ("balance", missing),
        ("accounts", "show", missing, "--json"),
        ("purchase", missing, "10", "--idempotency-key", "k-1"),
    ):
        result = await tally(*args, *target)
        assert result.code == 1, (args, result)
        assert result.out == ""
        lines = result.err.splitlines()
        assert len(lines) == 1, result.err
        assert lines[0].startswith("tally: NOT_FOUND: ")
        assert missing in lines[0]
        assert "Traceback" not in result.err

    invalid = await tally("prices", "set", "image.upscale", "0", *target)
    assert invalid.code == 1
    assert invalid.err.startswith("tally: INVALID_ARGUMENT: ")
    assert "units_per_quantity" in invalid.err

    usage = await tally("accounts", "create", unique(), "--allotment", "lots", *target)
    assert usage.code == 2
    assert "--allotment" in usage.err and "Traceback" not in usage.err

    down = await tally("balance", missing, "--target", "127.0.0.1:1", "--timeout", "3")
    assert down.code == 1
    assert down.err.startswith("tally: UNAVAILABLE: ")
    assert len(down.err.splitlines()) == 1



async def test_a_reader_that_goes_away_ends_the_command_quietly(running: Running) -> None:
    """Proves `tally ... | head` does not print a traceback when head stops reading: the
    command writes into a pipe whose reading end is already closed and exits 1, quietly."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        process = await asyncio.create_subprocess_exec(
            str(TALLY), "prices", "list", "--target", running.authority.address,
            stdout=write_end, stderr=asyncio.subprocess.PIPE,
        )
        _, err = await asyncio.wait_for(process.communicate(), timeout=30)
    finally:
        os.close(write_end)
    assert process.returncode == 1
    assert err.decode() == ""
