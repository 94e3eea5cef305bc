"""Test support: real redis-server processes and in-process authorities."""

from __future__ import annotations

import argparse
import os
import random
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc

from tally import app, config
from tally.clock import ManualClock
from tally.store.embedded import server_binary
from tally_client.v1 import account_pb2_grpc, catalog_pb2_grpc, quota_pb2_grpc

REDIS_START_TIMEOUT_S = 10.0
REDIS_START_ATTEMPTS = 3
# A fixed, known instant: the 25th of November 2026, noon UTC.
T0_MS = int(datetime(2026, 11, 25, 12, 0, tzinfo=UTC).timestamp() * 1000)


# Test servers listen below the kernel's ephemeral range: the source ports of
# outgoing connections come from that range, and under a parallel run they would
# take a port a test frees to restart a server on it (a killed worker, a restarted
# Redis). Each test process (pytest-xdist worker) draws from a slice of its own.
PORTS_FROM = 10_000
EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")


def _port_slice() -> range:
    below = int(EPHEMERAL_RANGE.read_text().split()[0]) if EPHEMERAL_RANGE.exists() else 32768
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw"))
    width = (below - PORTS_FROM) // workers
    return range(PORTS_FROM + worker * width, PORTS_FROM + (worker + 1) * width)


def free_port() -> int:
    """A port free now, from this test process's slice below the ephemeral range."""
    ports = _port_slice()
    while True:
        port = random.choice(ports)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


def unique(prefix: str = "acct") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


class RedisProcess:
    """A private redis-server on a free port; tests may kill and restart it."""

    def __init__(self, folder: Path, *extra: str) -> None:
        # The binary the embedded default would run (TALLY_REDIS_SERVER picks one):
        # the suite runs on Redis and, in part, again on Valkey (Makefile).
        self.binary = server_binary(os.environ.get("TALLY_REDIS_SERVER", ""))
        self.folder = folder
        self.port = free_port()
        self.extra = extra
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Starts the server and waits until it accepts connections. Another test
        process may take the port between free_port() and the bind: then a fresh
        port is tried, so an answer on the port is never someone else's server. A
        restart keeps its port: the clients under test reconnect to the same URL."""
        self.folder.mkdir(parents=True, exist_ok=True)
        log = self.folder / "redis.log"
        first_start = self.process is None
        for _ in range(REDIS_START_ATTEMPTS if first_start else 1):
            logged_before = log.stat().st_size if log.exists() else 0
            self.process = subprocess.Popen(
                [
                    self.binary, "--bind", "127.0.0.1", "--port", str(self.port),
                    "--dir", str(self.folder), "--save", "", "--appendonly", "yes",
                    "--appendfsync", "always", "--maxmemory-policy", "noeviction",
                    "--logfile", str(log), *self.extra,
                ],
                stdout=subprocess.DEVNULL,
            )
            if wait_ready(self.process, log, logged_before):
                return
            self.port = free_port()
        raise RuntimeError(f"redis-server did not start (see {log})")

    def kill(self) -> None:
        """SIGKILL: a crash, not a shutdown."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)


def wait_ready(process: subprocess.Popen[bytes], log: Path, logged_before: int) -> bool:
    """True once the server logged that it accepts connections (after loading its
    AOF); False if it exited (its port was taken)."""
    deadline = time.monotonic() + REDIS_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        if log.exists():
            with log.open("rb") as text:
                text.seek(logged_before)
                if b"Ready to accept connections" in text.read():
                    return True
        time.sleep(0.05)
    process.kill()
    process.wait()
    raise RuntimeError(f"redis-server did not start within {REDIS_START_TIMEOUT_S}s (see {log})")


def kill_all(started: list[subprocess.Popen[bytes]]) -> None:
    """Kills what a test started (and has not stopped itself), and closes its stderr."""
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait()
        if process.stderr is not None:
            process.stderr.close()


def settings(redis_url: str, ledger_url: str = "", **overrides: Any) -> config.Settings:
    environ = {
        "TALLY_REDIS_URL": redis_url,
        "TALLY_LEDGER_URL": ledger_url,
        "TALLY_LISTEN": "127.0.0.1:0",
        "TALLY_REAPER_INTERVAL": "50ms",
        "TALLY_SHUTDOWN_GRACE": "1s",
        "TALLY_LOG_FORMAT": "text",
        "TALLY_LOG_LEVEL": "WARNING",
        "TALLY_METRICS_LISTEN": "",
        # A start and each reaper pass cost a round trip per shard: hundreds of servers
        # at the default 256 shards take the suite twice as long. The default layout is
        # tested in tests/integration/test_shard_layout.py (shards=0: unset).
        "TALLY_SHARDS": "16",
    }
    environ.update({f"TALLY_{k.upper()}": str(v) for k, v in overrides.items()})
    return config.from_sources(argparse.Namespace(), environ)


@dataclass
class Stubs:
    channel: grpc.aio.Channel
    quota: quota_pb2_grpc.QuotaServiceStub
    accounts: account_pb2_grpc.AccountServiceStub
    catalog: catalog_pb2_grpc.CatalogServiceStub

    @classmethod
    def connect(cls, address: str) -> Stubs:
        channel = grpc.aio.insecure_channel(address)
        return cls(
            channel=channel,
            quota=quota_pb2_grpc.QuotaServiceStub(channel),
            accounts=account_pb2_grpc.AccountServiceStub(channel),
            catalog=catalog_pb2_grpc.CatalogServiceStub(channel),
        )


@dataclass
class Running:
    """An in-process authority with a manual clock, and stubs to call it."""

    authority: app.Authority
    clock: ManualClock
    stubs: Stubs
    scratch: Path | None = None

    @property
    def quota(self) -> quota_pb2_grpc.QuotaServiceStub:
        return self.stubs.quota

    @property
    def accounts(self) -> account_pb2_grpc.AccountServiceStub:
        return self.stubs.accounts

    @property
    def catalog(self) -> catalog_pb2_grpc.CatalogServiceStub:
        return self.stubs.catalog


async def start_running(
    redis_url: str, now_ms: int = T0_MS, ledger_url: str | None = None, **overrides: Any
) -> Running:
    """An in-process authority; without a ledger URL it gets a fresh SQLite ledger."""
    scratch = None
    if ledger_url is None:
        scratch = Path(tempfile.mkdtemp(prefix="tally-ledger-"))
        ledger_url = f"sqlite:///{scratch / 'ledger.sqlite3'}"
    clock = ManualClock(now_ms)
    authority = await app.start(settings(redis_url, ledger_url, **overrides), clock=clock)
    return Running(authority, clock, Stubs.connect(authority.address), scratch)


async def stop_running(running: Running) -> None:
    await running.stubs.channel.close()
    await running.authority.stop(grace_s=1)
    if running.scratch is not None:
        shutil.rmtree(running.scratch, ignore_errors=True)


class PostgresServer:
    """The machine's PostgreSQL on 127.0.0.1:5432 (trust auth) when it answers;
    otherwise a private cluster started with initdb on a free port."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.process: subprocess.Popen[bytes] | None = None
        self.base_url = "postgresql://postgres@127.0.0.1:5432/postgres"

    def start(self) -> None:
        import psycopg

        try:
            psycopg.connect(self.base_url, connect_timeout=3).close()
            return
        except psycopg.OperationalError:
            self.start_private()

    def start_private(self) -> None:
        import psycopg

        bin_dir = _postgres_bin()
        data = self.folder / "pgdata"
        # PostgreSQL refuses to run as root: run it as the postgres user then.
        as_user: list[str] = []
        if os.geteuid() == 0:
            as_user = ["runuser", "-u", "postgres", "--"]
            shutil.chown(self.folder, "postgres")
        subprocess.run(
            [*as_user, str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres",
             "--auth=trust"],
            check=True, capture_output=True,
        )
        port = free_port()
        self.process = subprocess.Popen(
            [*as_user, str(bin_dir / "postgres"), "-D", str(data), "-p", str(port),
             "-k", str(self.folder), "-c", "listen_addresses=127.0.0.1"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        self.base_url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                psycopg.connect(self.base_url, connect_timeout=1).close()
                return
            except psycopg.OperationalError:
                time.sleep(0.2)
        raise RuntimeError("the private PostgreSQL did not start")

    def create_database(self) -> str:
        import psycopg

        name = f"tally_test_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.base_url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.base_url.rsplit("/", 1)[0] + f"/{name}"

    def drop_database(self, url: str) -> None:
        import psycopg

        name = url.rsplit("/", 1)[1]
        with psycopg.connect(self.base_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(30)


def _postgres_bin() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not found:
        raise RuntimeError(
            "PostgreSQL is not reachable on 127.0.0.1:5432 and initdb is not installed "
            "(apt-get install -y postgresql)"
        )
    return found[-1].parent


async def usage_slot(store: Any, account_id: str, period_start_ms: int) -> str | None:
    """The account's usage counter slot holding that billing period (field `p`,
    store/lua/lib/usage.lua), or None."""
    for key in store.keys.usage_slots(account_id):
        if await store.redis.hget(key, "p") == str(period_start_ms).encode():
            return str(key)
    return None
