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
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tally.ledger.backend import open_ledger
from tally.v1 import account_pb2, account_pb2_grpc, quota_pb2, quota_pb2_grpc

TALLY = str(Path(sys.executable).with_name("tally"))
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
CALL_TIMEOUT_S = 2.0
START_TIMEOUT_S = 30.0


def tally_env(redis_url: str, ledger_url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TALLY_")}
    env.update({"TALLY_REDIS_URL": redis_url, "TALLY_LEDGER_URL": ledger_url,
                "TALLY_LOG_LEVEL": "WARNING", "TALLY_METRICS_LISTEN": ""})
    env.update({f"TALLY_{k.upper()}": v for k, v in extra.items()})
    return env


def run_tally(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([TALLY, *args], env=env, capture_output=True, text=True, timeout=120)


class Serve:
    """`tally serve` in its own process on a fixed address, restartable."""

    def __init__(self, address: str, env: dict[str, str], log_path: Path) -> None:
        self.address = address
        self.env = env
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    async def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [TALLY, "serve", "--listen", self.address], env=self.env,
                stdout=subprocess.DEVNULL, stderr=log,
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        async with grpc.aio.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise AssertionError(f"tally serve exited with {self.process.returncode}")
                try:
                    reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=0.5)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.aio.AioRpcError:
                    pass
                await asyncio.sleep(0.1)
        raise AssertionError("tally serve did not become SERVING")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def terminate(self) -> int:
        """SIGTERM; returns the exit code (the log is in the assertion message on failure)."""
        assert self.process is not None
        self.process.terminate()
        return self.process.wait(60)


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
    address: str, account_id: str, stop: asyncio.Event, seen: Acknowledged, deadline: float
) -> None:
    """Reserve 3, commit 2, refund 5 units of it, over and over, each step retried
    with its key until acknowledged."""
    async with grpc.aio.insecure_channel(address) as channel:
        quota = quota_pb2_grpc.QuotaServiceStub(channel)
        while not stop.is_set():
            key = uuid.uuid4().hex
            held = await call_until_acknowledged(
                lambda: quota.Reserve(
                    quota_pb2.ReserveRequest(
                        account_id=account_id, operation="image.vectorize", quantity=3,
                        idempotency_key=f"r-{key}",
                    ),
                    timeout=CALL_TIMEOUT_S,
                ),
                deadline,
            )
            committed = await call_until_acknowledged(
                lambda: quota.Commit(
                    quota_pb2.CommitRequest(reservation_id=held.reservation_id, quantity=2),
                    timeout=CALL_TIMEOUT_S,
                ),
                deadline,
            )
            seen.charged[account_id] += committed.units_charged
            seen.commits.add(held.reservation_id)
            refund = await call_until_acknowledged(
                lambda: quota.Refund(
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
