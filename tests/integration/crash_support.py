"""Real processes for the crash tests: `tally serve` / `tally flusher` as
subprocesses, and worker traffic that counts what was acknowledged."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tally.ledger.backend import open_ledger
from tally_client.v1 import account_pb2, account_pb2_grpc, quota_pb2, quota_pb2_grpc

TALLY = str(Path(sys.executable).with_name("tally"))
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
CALL_TIMEOUT_S = 2.0
START_TIMEOUT_S = 30.0
POLL_S = 0.05


async def wait_until(
    condition: Callable[[], Awaitable[bool]], timeout_s: float, what: str
) -> None:
    """Polls an outside condition (a process, Redis, the ledger) until it holds."""
    deadline = time.monotonic() + timeout_s
    for _ in range(int(timeout_s / POLL_S) + 1):
        if await condition():
            return
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(POLL_S)
    raise AssertionError(f"timed out waiting for {what}")


async def run_tally_async(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        TALLY, *args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, err = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def tally_env(redis_url: str, ledger_url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TALLY_")}
    env.update({"TALLY_REDIS_URL": redis_url, "TALLY_LEDGER_URL": ledger_url,
                "TALLY_LOG_LEVEL": "WARNING", "TALLY_METRICS_LISTEN": "",
                "TALLY_STREAM_RETENTION": "0s"})
    env.update({f"TALLY_{k.upper()}": v for k, v in extra.items()})
    return env


class Serve:
    """`tally serve` in its own process on a fixed address, restartable."""

    def __init__(self, address: str, env: dict[str, str], log_path: Path) -> None:
        self.address = address
        self.env = env
        self.log_path = log_path
        self.process: asyncio.subprocess.Process | None = None

    @property
    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    async def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                TALLY, "serve", "--listen", self.address, env=self.env,
                stdout=subprocess.DEVNULL, stderr=log,
            )
        process = self.process
        async with grpc.aio.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)

            async def serving() -> bool:
                if process.returncode is not None:
                    raise AssertionError(f"tally serve exited with {process.returncode}")
                try:
                    reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=0.5)
                except grpc.aio.AioRpcError:
                    return False
                return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

            await wait_until(serving, START_TIMEOUT_S, "tally serve to become SERVING")

    async def kill(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            await self.process.wait()

    async def terminate(self) -> int:
        """SIGTERM; returns the exit code."""
        assert self.process is not None
        self.process.terminate()
        return await asyncio.wait_for(self.process.wait(), 60)


@dataclass
class Acknowledged:
    """What clients saw acknowledged, per account."""

    charged: Counter[str] = field(default_factory=Counter)
    refunded: Counter[str] = field(default_factory=Counter)
    commits: set[str] = field(default_factory=set)
    refunds: set[str] = field(default_factory=set)
    operations: int = 0


async def call_until_acknowledged(make_call, deadline: float):  # type: ignore[no-untyped-def]
    """Retries one logical call (same idempotency key) until it is acknowledged."""
    while True:
        try:
            return await make_call()
        except grpc.aio.AioRpcError as error:
            if error.code() not in RETRYABLE or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


async def create_accounts(address: str, count: int, allotment: int) -> list[str]:
    ids = [f"crash-{uuid.uuid4().hex[:10]}" for _ in range(count)]
    async with grpc.aio.insecure_channel(address) as channel:
        accounts = account_pb2_grpc.AccountServiceStub(channel)
        for account_id in ids:
            await accounts.CreateAccount(
                account_pb2.CreateAccountRequest(account_id=account_id, monthly_allotment=allotment)
            )
    return ids


async def worker(
    address: str,
    account_id: str,
    stop: asyncio.Event,
    seen: Acknowledged,
    deadline: float,
    options: Sequence[tuple[str, Any]] = (),
) -> None:
    """Reserve 3, commit 2, refund 5 units of it, over and over, each step retried
    with its key until acknowledged. `address` may name several servers (with a
    round_robin policy in `options`)."""
    async with grpc.aio.insecure_channel(address, options=options) as channel:
        quota = quota_pb2_grpc.QuotaServiceStub(channel)
        while not stop.is_set():
            key = uuid.uuid4().hex
            held = await call_until_acknowledged(
                lambda key=key: quota.Reserve(  # type: ignore[misc]
                    quota_pb2.ReserveRequest(
                        account_id=account_id, operation="image.vectorize", quantity=3,
                        idempotency_key=f"r-{key}",
                    ),
                    timeout=CALL_TIMEOUT_S,
                ),
                deadline,
            )
            committed = await call_until_acknowledged(
                lambda held=held: quota.Commit(  # type: ignore[misc]
                    quota_pb2.CommitRequest(reservation_id=held.reservation_id, quantity=2),
                    timeout=CALL_TIMEOUT_S,
                ),
                deadline,
            )
            seen.charged[account_id] += committed.units_charged
            seen.commits.add(held.reservation_id)
            refund = await call_until_acknowledged(
                lambda held=held, key=key: quota.Refund(  # type: ignore[misc]
                    quota_pb2.RefundRequest(
                        reservation_id=held.reservation_id, units=5, idempotency_key=f"f-{key}"
                    ),
                    timeout=CALL_TIMEOUT_S,
                ),
                deadline,
            )
            seen.refunded[account_id] += refund.units_refunded
            seen.refunds.add(held.reservation_id)
            seen.operations += 3


def ledger_matches(ledger_url: str, seen: Acknowledged, account_ids: list[str]) -> None:
    """Every acknowledged commit and refund is in the ledger exactly once, per-account
    sequences have no gap, and charges minus refunds equal what clients saw."""
    ledger = open_ledger(ledger_url)
    try:
        for account_id in account_ids:
            entries = ledger.entries(account_id, limit=1_000_000)
            seqs = [e.seq for e in entries]
            assert seqs == list(range(1, len(seqs) + 1)), f"gap or duplicate in {account_id}"
            kinds = Counter((e.type, e.reservation_id) for e in entries)
            for rid in seen.commits:
                if rid.endswith(account_id):
                    assert kinds[("commit", rid)] + kinds[("late_commit", rid)] == 1, rid
            for rid in seen.refunds:
                if rid.endswith(account_id):
                    assert kinds[("refund", rid)] == 1, rid
            charged = sum(e.units for e in entries if e.type in {"commit", "late_commit", "charge"})
            refunded = sum(e.units for e in entries if e.type == "refund")
            assert (charged, refunded) == (seen.charged[account_id], seen.refunded[account_id])
    finally:
        ledger.close()


@asynccontextmanager
async def serving(
    redis_url: str, folder: Path, **settings: str
) -> AsyncIterator[tuple[Serve, dict[str, str], str]]:
    """A started `tally serve` on a SQLite ledger in `folder`; killed on the way out.
    Yields the server, its environment (for `tally` commands) and the ledger URL."""
    from tests.support import free_port

    ledger_url = f"sqlite:///{folder / 'ledger.sqlite3'}"
    env = tally_env(redis_url, ledger_url, **settings)
    serve = Serve(f"127.0.0.1:{free_port()}", env, folder / "serve.log")
    await serve.start()
    try:
        yield serve, env, ledger_url
    finally:
        await serve.kill()
