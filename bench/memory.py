"""Redis memory per Reserve+Commit pair, by record kind, projected to a pair rate.

Run it from the repository root (after `make setup`):

    .venv/bin/python bench/memory.py [--pairs 2000] [--rate 1000]

It starts a private redis-server and an in-process server (manual clock,
default settings), runs the pairs, flushes them to a scratch SQLite ledger,
and reads MEMORY USAGE of every key they left, by kind. Each kind stays in
Redis for its own window (settings), so at a steady rate the Redis it needs is

    rate x sum over kinds (bytes per pair x window of the kind)

which is printed beside the figures of the record format this one replaced
(BASELINE below, measured with this script on that format). MEMORY USAGE
counts a key's name, value and dictionary entry, not its entry in the expiry
table nor the hash tables' slots: about EXPIRY_OVERHEAD_BYTES more per key
with a TTL (measured on Redis 7.0 from used_memory over 100,000 such keys),
so the projection is printed with that added too.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import tempfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import msgpack

from tally import app, config
from tally.clock import ManualClock
from tally.v1 import account_pb2, account_pb2_grpc, quota_pb2, quota_pb2_grpc

T0_MS = 1_795_608_000_000  # 2026-11-25 12:00 UTC, like the tests
GIB = 1024**3
# What 16 GiB of Redis must carry at 1,000 pairs/s (the sizing target).
TARGET_BYTES = 16 * GIB
# used_memory per key with a TTL beyond its MEMORY USAGE (Redis 7.0, jemalloc).
EXPIRY_OVERHEAD_BYTES = 60
# The kinds kept with a TTL (one key per pair each); the stream is one key.
KEYS_WITH_TTL = ("idempotency", "closed reservation")

# Bytes per pair by kind, MEMORY USAGE, measured with this script (1,000 pairs)
# on the format before compact records (commit 7b1968c): the idempotency record
# and the closed reservation record each embedded the whole balance, and the
# reservation stayed the whole reservation_retention (35 days).
BASELINE = {"idempotency": 872, "closed reservation": 1368, "stream (flushed)": 4652}
BASELINE_WINDOWS_S = {"idempotency": 86400.0, "closed reservation": 35 * 86400.0,
                      "stream (flushed)": 30.0}


@dataclass(frozen=True)
class Figures:
    pairs: int
    bytes_by_kind: dict[str, int]  # MEMORY USAGE summed over the pairs' keys
    windows_s: dict[str, float]  # how long each kind stays in Redis

    def per_pair(self, kind: str) -> float:
        return self.bytes_by_kind.get(kind, 0) / self.pairs

    def steady_state_bytes(self, rate_per_s: float, per_key_extra: int = 0) -> float:
        """Redis bytes a steady rate of pairs keeps (each kind for its window), with
        per_key_extra bytes more for each key kept with a TTL."""
        return rate_per_s * sum(
            (self.per_pair(kind) + (per_key_extra if kind in KEYS_WITH_TTL else 0)) * window
            for kind, window in self.windows_s.items()
        )


def windows_of(settings: config.Settings) -> dict[str, float]:
    """How long each kind a pair leaves stays in Redis, in seconds."""
    return {
        "idempotency": settings.idempotency_window,
        "closed reservation": settings.closed_window_s,
        "stream (flushed)": settings.stream_retention,
    }


def kind_of(key: str, value: Any) -> str:
    """The kind of record a key holds (by its name, and a reservation's state)."""
    if ":idem:" in key:
        return "idempotency"
    if ":res:" in key:
        return "open reservation" if value.get("state") == "HELD" else "closed reservation"
    if key.endswith(":events"):
        return "stream (flushed)"
    return "account and other"


async def key_sizes(redis: Any) -> dict[str, int]:
    """MEMORY USAGE summed by kind, over every key of the deployment."""
    sizes: dict[str, int] = defaultdict(int)
    async for raw_key in redis.scan_iter(match="tally:{*}*", count=1000):
        key = raw_key.decode()
        value: Any = {}
        if ":res:" in key:
            value = msgpack.unpackb(await redis.get(key), raw=False, strict_map_key=False)
        sizes[kind_of(key, value)] += int(await redis.memory_usage(key, samples=0) or 0)
    return dict(sizes)


async def run_pairs(authority: app.Authority, pairs: int, accounts: int = 8) -> None:
    channel = grpc.aio.insecure_channel(authority.address)
    quota = quota_pb2_grpc.QuotaServiceStub(channel)
    admin = account_pb2_grpc.AccountServiceStub(channel)
    ids = [f"bench-{n:04d}" for n in range(accounts)]
    for account_id in ids:
        await admin.CreateAccount(account_pb2.CreateAccountRequest(
            account_id=account_id, monthly_allotment=10**12))

    async def pair(n: int) -> None:
        reserve = await quota.Reserve(quota_pb2.ReserveRequest(
            account_id=ids[n % accounts], operation="image.generate.sdxl", quantity=1,
            idempotency_key=f"job-{n:08d}-7f3c9a2e"))
        await quota.Commit(quota_pb2.CommitRequest(reservation_id=reserve.reservation_id))

    for start in range(0, pairs, 32):
        await asyncio.gather(*(pair(n) for n in range(start, min(pairs, start + 32))))
    await channel.close()


async def measure(pairs: int, folder: Path, redis_url: str = "") -> Figures:
    """Runs `pairs` Reserve+Commit pairs on a fresh deployment (a private
    redis-server under folder, unless redis_url names an empty one) and measures them."""
    settings = config.from_sources(argparse.Namespace(), {
        "TALLY_DATA_DIR": str(folder), "TALLY_LISTEN": "127.0.0.1:0", "TALLY_REDIS_URL": redis_url,
        "TALLY_METRICS_LISTEN": "", "TALLY_LOG_LEVEL": "WARNING", "TALLY_LOG_FORMAT": "text",
        "TALLY_REDIS_APPENDFSYNC": "no",
    })
    authority = await app.start(settings, clock=ManualClock(T0_MS))
    try:
        redis = authority.store.redis
        before = await key_sizes(redis)
        await run_pairs(authority, pairs)
        await authority.flusher.flush_all(steal=True)
        after = await key_sizes(redis)
    finally:
        await authority.stop(grace_s=1)
    grown = {kind: after[kind] - before.get(kind, 0) for kind in after}
    return Figures(pairs, grown, windows_of(settings))


def report(figures: Figures, rate: float) -> str:
    lines = [f"{figures.pairs} Reserve+Commit pairs; projection at {rate:g} pairs/s",
             f"{'kind':<22}{'window s':>10}{'B/pair':>9}{'GiB':>9}   {'before: B/pair':>14}"
             f"{'window s':>11}{'GiB':>10}"]
    for kind, window in figures.windows_s.items():
        per_pair = figures.per_pair(kind)
        base, base_window = BASELINE[kind], BASELINE_WINDOWS_S[kind]
        lines.append(
            f"{kind:<22}{window:>10.0f}{per_pair:>9.0f}{rate * per_pair * window / GIB:>9.2f}"
            f"   {base:>14}{base_window:>11.0f}{rate * base * base_window / GIB:>10.1f}"
        )
    total = figures.steady_state_bytes(rate)
    base_total = rate * sum(BASELINE[k] * BASELINE_WINDOWS_S[k] for k in BASELINE)
    lines.append(f"{'total':<22}{'':>10}{'':>9}{total / GIB:>9.2f}   {'':>14}{'':>11}"
                 f"{base_total / GIB:>10.1f}")
    others = {k: v for k, v in figures.bytes_by_kind.items() if k not in figures.windows_s}
    for kind, size in sorted(others.items()):
        lines.append(f"  not per pair: {kind} grew {size} B over the run")
    with_expiry = figures.steady_state_bytes(rate, EXPIRY_OVERHEAD_BYTES)
    lines.append(f"with the expiry table's ~{EXPIRY_OVERHEAD_BYTES} B per key with a TTL "
                 f"(not in MEMORY USAGE): {with_expiry / GIB:.2f} GiB")
    verdict = "within" if total <= TARGET_BYTES else "OVER"
    lines.append(f"target (MEMORY USAGE): {TARGET_BYTES / GIB:.0f} GiB at {rate:g} pairs/s: "
                 f"{verdict}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=2000)
    parser.add_argument("--rate", type=float, default=1000.0, help="pairs per second")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="tally-bench-memory-"))
    try:
        figures = asyncio.run(measure(args.pairs, folder))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(report(figures, args.rate))


if __name__ == "__main__":
    main()
