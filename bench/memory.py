"""Redis memory per Reserve+Commit pair, by record kind, projected to a pair rate.

Run it from the repository root (after `make setup`):

    .venv/bin/python bench/memory.py [--pairs 2049] [--rate 1000]

It starts a private redis-server and an in-process server (manual clock,
default settings), runs the pairs, flushes them to a scratch SQLite ledger,
and measures every key they left, by kind, two ways:

- MEMORY USAGE: a key's name, value and dictionary entry;
- strict: the growth of used_memory (what an operator sees) when the kind's
  keys are copied, with their TTLs, into an empty database: also each key's
  expiry-table entry and its slots in both hash tables. The slots depend on
  how full the tables are; with 2^k + 1 keys (the default pair count) they
  have just doubled, the fullness a steady state is least efficient at.

Each kind stays in Redis for its own window (settings), so at a steady rate
the Redis it needs is

    rate x sum over kinds (bytes per pair x window of the kind)

printed for both measures, beside the figures of the record format this one
replaced (BASELINE below, measured with this script on that format).
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
import redis.asyncio as aioredis

from tally import app, config
from tally.clock import ManualClock
from tally_client.v1 import account_pb2, account_pb2_grpc, quota_pb2, quota_pb2_grpc

T0_MS = 1_795_608_000_000  # 2026-11-25 12:00 UTC, like the tests
GIB = 1024**3
# What 16 GiB of Redis must carry at 1,000 pairs/s (the sizing target).
TARGET_BYTES = 16 * GIB
# The empty database the strict measure copies a kind's keys into.
SCRATCH_DB = 1
# Commands per round trip while copying: small enough that the connection's
# buffers never grow (they would count in used_memory).
COPY_BATCH = 64

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
    strict_bytes_by_kind: dict[str, int]  # used_memory growth of the pairs' keys
    windows_s: dict[str, float]  # how long each kind stays in Redis

    def per_pair(self, kind: str, strict: bool = False) -> float:
        sizes = self.strict_bytes_by_kind if strict else self.bytes_by_kind
        return sizes.get(kind, 0) / self.pairs

    def steady_state_bytes(self, rate_per_s: float, strict: bool = False) -> float:
        """Redis bytes a steady rate of pairs keeps (each kind for its window)."""
        return rate_per_s * sum(
            self.per_pair(kind, strict) * window for kind, window in self.windows_s.items()
        )


def windows_of(settings: config.Settings) -> dict[str, float]:
    """How long each kind a pair leaves stays in Redis, in seconds."""
    return {
        "idempotency": settings.idempotency_window,
        "closed reservation": settings.closed_window_s,
        "stream (flushed)": settings.stream_retention,
    }


def kind_of(key: str) -> str:
    """The kind of record a key holds, by its name (a reservation has its own key
    once closed; held ones are in their account's held hash)."""
    if ":i:" in key:
        return "idempotency"
    if ":res:" in key:
        return "closed reservation"
    if key.endswith(":events"):
        return "stream (flushed)"
    return "account and other"


async def keys_by_kind(redis: Any) -> dict[str, list[bytes]]:
    """Every key of the deployment, by kind."""
    keys: dict[str, list[bytes]] = defaultdict(list)
    async for raw_key in redis.scan_iter(match="tally:{*}*", count=1000):
        keys[kind_of(raw_key.decode())].append(raw_key)
    return dict(keys)


async def key_sizes(redis: Any, keys: dict[str, list[bytes]]) -> dict[str, int]:
    """MEMORY USAGE summed by kind."""
    return {
        kind: sum([int(await redis.memory_usage(key, samples=0) or 0) for key in names])
        for kind, names in keys.items()
    }


async def used_memory(redis: Any) -> int:
    return int((await redis.info("memory"))["used_memory"])


async def strict_sizes(redis: Any, keys: dict[str, list[bytes]]) -> dict[str, int]:
    """used_memory growth by kind: each kind's keys copied (TTLs too) into the
    empty SCRATCH_DB, then read once more so that the copy's hash tables finish
    their incremental rehash (the old tables would count twice)."""
    sizes: dict[str, int] = {}
    # Two connections of their own, opened before measuring (a new connection's
    # buffers would count): one on the deployment's database, one on SCRATCH_DB.
    pool = redis.connection_pool
    source, copier = (aioredis.Redis(connection_pool=aioredis.ConnectionPool(
        connection_class=pool.connection_class, max_connections=1,
        **{**pool.connection_kwargs, **db})) for db in ({}, {"db": SCRATCH_DB}))
    try:
        await source.ping()
        if await copier.dbsize():
            raise RuntimeError(f"database {SCRATCH_DB} must be empty to measure in it")
        for kind, names in [("warm-up", [next(iter(keys.values()))[0]]), *keys.items()]:
            before = await used_memory(copier)
            for start in range(0, len(names), COPY_BATCH):
                async with source.pipeline(transaction=False) as pipe:
                    for key in names[start:start + COPY_BATCH]:
                        pipe.copy(key.decode(), key.decode(), destination_db=str(SCRATCH_DB))
                    await pipe.execute()
            for start in range(0, len(names), COPY_BATCH):
                async with copier.pipeline(transaction=False) as pipe:
                    for key in names[start:start + COPY_BATCH]:
                        pipe.exists(key)
                    await pipe.execute()
            sizes[kind] = await used_memory(copier) - before
            await copier.flushdb()
    finally:
        await source.aclose(close_connection_pool=True)
        await copier.aclose(close_connection_pool=True)
    del sizes["warm-up"]  # the first copy's one-time allocations
    return sizes


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
        keys = await keys_by_kind(redis)
        before = await key_sizes(redis, keys), await strict_sizes(redis, keys)
        await run_pairs(authority, pairs)
        await authority.flusher.flush_all(steal=True)
        keys = await keys_by_kind(redis)
        after = await key_sizes(redis, keys), await strict_sizes(redis, keys)
    finally:
        await authority.stop(grace_s=1)
    grown = [{kind: now[kind] - then.get(kind, 0) for kind in now}
             for then, now in zip(before, after, strict=True)]
    return Figures(pairs, grown[0], grown[1], windows_of(settings))


def report(figures: Figures, rate: float) -> str:
    """Both measures per kind and their projections to `rate`, beside the
    MEMORY USAGE of the format before compact records."""
    lines = [f"{figures.pairs} Reserve+Commit pairs; projection at {rate:g} pairs/s",
             f"{'':<32}{'MEMORY USAGE':>18}{'strict':>18}{'before compact records':>33}",
             f"{'kind':<22}{'window s':>10}{'B/pair':>9}{'GiB':>9}{'B/pair':>9}{'GiB':>9}"
             f"   {'B/pair':>9}{'window s':>11}{'GiB':>10}"]
    for kind, window in figures.windows_s.items():
        usage, strict = figures.per_pair(kind), figures.per_pair(kind, strict=True)
        base, base_window = BASELINE[kind], BASELINE_WINDOWS_S[kind]
        lines.append(
            f"{kind:<22}{window:>10.0f}{usage:>9.0f}{rate * usage * window / GIB:>9.2f}"
            f"{strict:>9.0f}{rate * strict * window / GIB:>9.2f}"
            f"   {base:>9}{base_window:>11.0f}{rate * base * base_window / GIB:>10.1f}"
        )
    usage_total = figures.steady_state_bytes(rate)
    strict_total = figures.steady_state_bytes(rate, strict=True)
    base_total = rate * sum(BASELINE[k] * BASELINE_WINDOWS_S[k] for k in BASELINE)
    lines.append(f"{'total':<41}{usage_total / GIB:>9.2f}{'':>9}{strict_total / GIB:>9.2f}"
                 f"   {'':>20}{base_total / GIB:>10.1f}")
    for kind, size in sorted(figures.bytes_by_kind.items()):
        if kind not in figures.windows_s:
            lines.append(f"  not per pair: {kind} grew {size} B (MEMORY USAGE), "
                         f"{figures.strict_bytes_by_kind.get(kind, 0)} B (strict) over the run")
    verdict = "within" if strict_total <= TARGET_BYTES else "OVER"
    lines.append(f"target (strict): {TARGET_BYTES / GIB:.0f} GiB at {rate:g} pairs/s: {verdict}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=2049)
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
