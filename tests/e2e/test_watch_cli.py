"""`tally watch` as a real subprocess against an in-process authority.

The authority runs on the test's event loop, so the command runs under asyncio's
subprocess support. It is `tally watch` once the command is registered in
`tally.cli.main`, else the same command through `python -m tally.cli.watch`.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from tally.cli.main import build_parser
from tally_client.v1 import account_pb2, quota_pb2
from tests.support import Running, unique

TALLY = Path(sys.executable).with_name("tally")
LINE_TIMEOUT_S = 10.0


def command() -> list[str]:
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            args = build_parser().parse_args(["watch", "x"])
    except SystemExit:  # not registered (yet)
        return [sys.executable, "-m", "tally.cli.watch"]
    assert args.command == "watch"
    return [str(TALLY), "watch"]


@asynccontextmanager
async def watching(*args: str) -> AsyncIterator[asyncio.subprocess.Process]:
    process = await asyncio.create_subprocess_exec(
        *command(), *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"},
    )
    try:
        yield process
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def line(process: asyncio.subprocess.Process) -> str:
    assert process.stdout is not None
    raw = await asyncio.wait_for(process.stdout.readline(), LINE_TIMEOUT_S)
    assert raw, "the command ended early"
    return raw.decode().rstrip("\n")


async def interrupt(process: asyncio.subprocess.Process) -> tuple[int, str]:
    """Ctrl-C: returns the exit code and what was printed on stderr."""
    process.send_signal(signal.SIGINT)
    assert process.stderr is not None
    err = await asyncio.wait_for(process.stderr.read(), LINE_TIMEOUT_S)
    code = await asyncio.wait_for(process.wait(), LINE_TIMEOUT_S)
    return code, err.decode()


async def charge(running: Running, account_id: str, key: str) -> None:
    await running.quota.Charge(
        quota_pb2.ChargeRequest(
            account_id=account_id, operation="image.upscale", quantity=2, idempotency_key=key,
            labels={"model": "x4"},
        )
    )


async def test_watch_prints_history_then_live_events_as_json(running: Running) -> None:
    """Proves `tally watch ACCOUNT --after 0 --json` prints the account's history then
    live events as one JSON object per line, and Ctrl-C exits 0 with the resume position."""
    account_id = unique("cliwatch")
    await running.accounts.CreateAccount(
        account_pb2.CreateAccountRequest(account_id=account_id, monthly_allotment=500)
    )
    target = ("--target", running.authority.address)
    async with watching(account_id, "--after", "0", "--json", *target) as process:
        history = [json.loads(await line(process)) for _ in range(2)]
        assert [(e["position"], e["type"]) for e in history] == [
            ("1", "plan_change"), ("2", "allotment")
        ]
        await charge(running, account_id, "c1")
        live = json.loads(await line(process))
        assert live["position"] == "3"
        assert live["type"] == "charge"
        assert live["account_id"] == account_id
        assert live["operation"] == "image.upscale"
        assert live["units"] == 20
        assert live["available_after"] == 480
        assert live["labels"] == {"model": "x4"}
        assert live["occurred_at"] == "2026-11-25T12:00:00Z"
        code, err = await interrupt(process)
    assert code == 0, err
    assert f"tally watch {account_id} --after 3" in err


async def test_watch_prints_one_readable_line_per_event(running: Running) -> None:
    """Proves the text view prints a header and one aligned line per event with the time,
    type, operation, units, available balance and reservation, resuming after --after."""
    account_id = unique("cliline")
    await running.accounts.CreateAccount(
        account_pb2.CreateAccountRequest(account_id=account_id, monthly_allotment=500)
    )
    await charge(running, account_id, "c1")
    target = ("--target", running.authority.address)
    async with watching(account_id, "--after", "2", *target) as process:
        header = await line(process)
        assert header.split() == [
            "AT", "POS", "TYPE", "OPERATION", "UNITS", "AVAILABLE", "RESERVATION", "ALERT"
        ]
        first = (await line(process)).split()
        assert first[:6] == ["2026-11-25T12:00:00Z", "3", "charge", "image.upscale", "20", "480"]
        assert first[6].endswith(f".{account_id}")  # the reservation id
        await charge(running, account_id, "c2")
        second = (await line(process)).split()
        assert second[1:6] == ["4", "charge", "image.upscale", "20", "460"]
        code, _ = await interrupt(process)
    assert code == 0


async def test_watch_of_an_unknown_account_fails_with_the_status(running: Running) -> None:
    """Proves a refused watch prints `tally: NOT_FOUND: ...` and exits 1."""
    process = await asyncio.create_subprocess_exec(
        *command(), unique("ghost"), "--target", running.authority.address,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), LINE_TIMEOUT_S * 3)
    assert process.returncode == 1
    assert err.decode().startswith("tally: NOT_FOUND: account ")
    assert out == b""
