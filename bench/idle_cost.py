"""What an idle server costs Redis, by shard count: commands/s by command and CPU.

Run it from the repository root (after `make setup`):

    .venv/bin/python -m bench.idle_cost [--shards 256] [--seconds 60]

It starts a private redis-server and an in-process server with default settings
(reaper every 1 s, flusher every 1 s with its lag every 5 s, fence watch every 5 s,
period sweeper every 60 s) over `--shards` shards and a scratch SQLite ledger,
lets start-up settle, resets Redis's statistics, waits `--seconds` with no calls,
then prints Redis's commands per second (INFO commandstats), Redis's CPU (INFO cpu)
and the server process's own CPU over the window, and what the started deployment
(streams, groups, fences, the catalog's copies) added to Redis's used_memory. The
same script measures an older checkout by putting its `src` first on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from tally import app, config

SETTLE_S = 3.0


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def start_redis(folder: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    process = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder),
         "--save", "", "--appendonly", "no", "--maxmemory-policy", "noeviction"],
        stdout=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True).stdout:
            return process, f"redis://127.0.0.1:{port}/0"
        time.sleep(0.05)
    process.kill()
    raise RuntimeError("redis-server did not start")


def cpu_s(info: dict[str, Any]) -> float:
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


async def measure(shards: int, seconds: float) -> dict[str, Any]:
    folder = Path(tempfile.mkdtemp(prefix="tally-idle-"))
    redis_process, url = start_redis(folder)
    environ = {
        "TALLY_REDIS_URL": url,
        "TALLY_LEDGER_URL": f"sqlite:///{folder / 'ledger.sqlite3'}",
        "TALLY_LISTEN": "127.0.0.1:0",
        "TALLY_SHARDS": str(shards),
        "TALLY_LOG_LEVEL": "WARNING",
        "TALLY_METRICS_LISTEN": "",
    }
    client = aioredis.Redis.from_url(url)
    try:
        empty = int((await client.info("memory"))["used_memory"])
        authority = await app.start(config.from_sources(argparse.Namespace(), environ))
        try:
            await asyncio.sleep(SETTLE_S)
            started_memory = int((await client.info("memory"))["used_memory"]) - empty
            await client.config_resetstat()
            redis_before = cpu_s(await client.info("cpu"))
            own_before = sum(os.times()[:2])
            started = time.monotonic()
            await asyncio.sleep(seconds)
            elapsed = time.monotonic() - started
            redis_cpu = cpu_s(await client.info("cpu")) - redis_before
            own_cpu = sum(os.times()[:2]) - own_before
            stats = await client.info("commandstats")
        finally:
            await authority.stop(0)
    finally:
        await client.aclose()
        redis_process.terminate()
        redis_process.wait(10)
        shutil.rmtree(folder, ignore_errors=True)
    per_s = {
        name.removeprefix("cmdstat_"): round(int(figures["calls"]) / elapsed, 1)
        for name, figures in stats.items()
        if name not in ("cmdstat_config|resetstat", "cmdstat_info")
    }
    return {
        "shards": shards,
        "seconds": round(elapsed, 1),
        "commands_per_s": round(sum(per_s.values()), 1),
        "redis_cpu_percent": round(100 * redis_cpu / elapsed, 2),
        "server_cpu_percent": round(100 * own_cpu / elapsed, 2),
        # with the server's connections' buffers: compare two shard counts for a shard's
        "redis_memory_after_start": started_memory,
        "by_command": dict(sorted(per_s.items(), key=lambda item: -item[1])),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=60.0)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(measure(args.shards, args.seconds)), indent=1))


if __name__ == "__main__":
    main()
