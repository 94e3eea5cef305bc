"""The batch path's cost per hold: ReserveBatch + CommitBatch of 1,000 items over
10,000 accounts, with the CPU each process spent per hold.

    PYTHONPATH=src .venv/bin/python bench/batch_cost.py [--accounts 10000] [--batch 1000]
        [--rounds 30] [--in-flight 2] [--out bench/results/batch_cost.json]

Starts a private redis-server and `tally serve` (auth off, SQLite ledger, the
flusher running as in production), creates the accounts, then runs `rounds` of
(ReserveBatch of `batch` items on random accounts, then CommitBatch of their
holds), `in-flight` rounds at once. A hold is one item reserved and committed.

Figures come from process accounting, not from wall time (the machine is shared):
Redis CPU from INFO (used_cpu_user + used_cpu_sys, and INFO commandstats' FCALL
µs, which is the scripts' own time), the server's from /proc/<pid>/stat (utime +
stime), the client's from getrusage. Holds/s is printed too, with the warning
that it depends on what else the machine runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import redis

from tally_client.v1 import account_pb2, account_pb2_grpc, quota_pb2, quota_pb2_grpc

CLOCK_TICKS_S = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def process_cpu_s(pid: int) -> float:
    """utime + stime of a process and its waited-for children, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    utime, stime, cutime, cstime = (int(f) for f in fields[11:15])
    return (utime + stime + cutime + cstime) / CLOCK_TICKS_S


def redis_cpu(client: redis.Redis) -> dict[str, float]:
    info = client.info("cpu")
    stats = client.info("commandstats")
    fcall = stats.get("cmdstat_fcall", {})
    return {
        "cpu_s": float(info["used_cpu_user"]) + float(info["used_cpu_sys"]),
        "fcall_calls": float(fcall.get("calls", 0)),
        "fcall_usec": float(fcall.get("usec", 0)),
    }


def client_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def wait_ready(address: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        channel = grpc.aio.insecure_channel(address)
        try:
            await asyncio.wait_for(channel.channel_ready(), 1)
            return
        except TimeoutError:
            pass
        finally:
            await channel.close()
    raise RuntimeError(f"tally serve did not answer on {address}")


async def create_accounts(address: str, count: int) -> list[str]:
    channel = grpc.aio.insecure_channel(address)
    stub = account_pb2_grpc.AccountServiceStub(channel)
    ids = [f"bench-{i:05d}" for i in range(count)]
    limit = asyncio.Semaphore(64)

    async def create(account_id: str) -> None:
        async with limit:
            await stub.CreateAccount(account_pb2.CreateAccountRequest(
                account_id=account_id, monthly_allotment=10_000_000))

    await asyncio.gather(*(create(a) for a in ids))
    await channel.close()
    return ids


async def one_round(stub: Any, accounts: list[str], batch: int,
                    round_no: int) -> int:
    """One ReserveBatch and its CommitBatch; returns the holds both served."""
    items = [quota_pb2.ReserveRequest(
        account_id=random.choice(accounts), operation="image.generate.sdxl", quantity=1,
        idempotency_key=f"r{round_no}-{i}", labels={"model": "sdxl"}) for i in range(batch)]
    reserved = await stub.ReserveBatch(quota_pb2.ReserveBatchRequest(items=items))
    rids = [r.response.reservation_id for r in reserved.results if r.status.code == 0]
    committed = await stub.CommitBatch(quota_pb2.CommitBatchRequest(
        items=[quota_pb2.CommitRequest(reservation_id=rid) for rid in rids]))
    return sum(1 for r in committed.results if r.status.code == 0)


async def run_rounds(address: str, accounts: list[str], batch: int, rounds: int,
                     in_flight: int, first_round: int) -> int:
    channel = grpc.aio.insecure_channel(address, options=[
        ("grpc.max_receive_message_length", 64 * 1024 * 1024)])
    stub = quota_pb2_grpc.QuotaServiceStub(channel)
    queue = list(range(first_round, first_round + rounds))
    holds = 0

    async def worker() -> None:
        nonlocal holds
        while queue:
            served = await one_round(stub, accounts, batch, queue.pop())
            holds += served

    await asyncio.gather(*(worker() for _ in range(in_flight)))
    await channel.close()
    return holds


def per_hold_us(delta_s: float, holds: int) -> float:
    return round(delta_s * 1e6 / holds, 2)


def start(
    args: argparse.Namespace, scratch: Path
) -> tuple[subprocess.Popen[bytes], subprocess.Popen[bytes]]:
    """A private redis-server and `tally serve` on it (their ports go on args)."""
    redis_port, grpc_port = free_port(), free_port()
    redis_proc = subprocess.Popen(
        ["redis-server", "--port", str(redis_port), "--save", "", "--appendonly", "no",
         "--maxmemory-policy", "noeviction", "--dir", str(scratch)],
        stdout=subprocess.DEVNULL)
    env = dict(os.environ, TALLY_REDIS_URL=f"redis://127.0.0.1:{redis_port}/0",
               TALLY_LEDGER_URL=f"sqlite:///{scratch / 'ledger.sqlite3'}",
               TALLY_LISTEN=f"127.0.0.1:{grpc_port}", TALLY_METRICS_LISTEN="",
               TALLY_LOG_LEVEL="WARNING", TALLY_FLUSH_INTERVAL=args.flush_interval)
    time.sleep(0.3)
    server = subprocess.Popen([sys.executable, "-m", "tally.cli.main", "serve"], env=env)
    args.redis_port, args.address = redis_port, f"127.0.0.1:{grpc_port}"
    return redis_proc, server


async def measure(args: argparse.Namespace, server_pid: int) -> dict[str, Any]:
    address = args.address
    await wait_ready(address, 30)
    accounts = await create_accounts(address, args.accounts)
    r = redis.Redis(port=args.redis_port)
    await run_rounds(address, accounts, args.batch, 2, 1, 0)  # warm-up
    redis_before, server_before = redis_cpu(r), process_cpu_s(server_pid)
    client_before, wall_before = client_cpu_s(), time.perf_counter()
    holds = await run_rounds(address, accounts, args.batch, args.rounds, args.in_flight, 2)
    wall_s = time.perf_counter() - wall_before
    redis_after, server_after = redis_cpu(r), process_cpu_s(server_pid)
    client_s = client_cpu_s() - client_before
    r.close()
    fcall_calls = redis_after["fcall_calls"] - redis_before["fcall_calls"]
    return {
        "accounts": args.accounts, "batch": args.batch, "rounds": args.rounds,
        "in_flight": args.in_flight, "flush_interval": args.flush_interval, "holds": holds,
        "wall_s": round(wall_s, 3), "holds_per_s_wall": round(holds / wall_s),
        "redis_cpu_us_per_hold": per_hold_us(redis_after["cpu_s"] - redis_before["cpu_s"], holds),
        "redis_fcall_us_per_hold": round(
            (redis_after["fcall_usec"] - redis_before["fcall_usec"]) / holds, 2),
        "fcall_calls_per_round": round(fcall_calls / args.rounds, 1),
        "server_cpu_us_per_hold": per_hold_us(server_after - server_before, holds),
        "client_cpu_us_per_hold": per_hold_us(client_s, holds),
        "cpus": os.cpu_count(),
        "load_average_1m": os.getloadavg()[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--accounts", type=int, default=10_000)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--in-flight", type=int, default=2)
    parser.add_argument("--flush-interval", default="1s")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tally-batch-cost-") as scratch:
        redis_proc, server = start(args, Path(scratch))
        try:
            result = asyncio.run(measure(args, server.pid))
        finally:
            for process in (server, redis_proc):
                process.terminate()
                process.wait(30)
    print(json.dumps(result, indent=2))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
