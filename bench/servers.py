"""The servers a bench run compares, each started as its own process on a free
port and stopped after: the floor, the PostgreSQL baseline, Tally (with its
private redis-server or Redis Cluster), and how their CPU is read from process
accounting."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import psycopg
import redis

from bench import pg_server
from tally.auth.principal import Role
from tally.auth.tokens import new_token
from tally_client.v1 import account_pb2, account_pb2_grpc, catalog_pb2, catalog_pb2_grpc

REPO = Path(__file__).resolve().parent.parent
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
START_TIMEOUT_S = 30.0
# A bench's own Redis answers at once; longer is a stuck node
REDIS_TIMEOUT_S = 10.0
# Enough for any run: a pair takes 1 unit, a run is well under 10^8 pairs.
UNITS_EACH = 10**11
# Idle: under this share of a core over one sample (background tasks tick).
IDLE_CPU_FRACTION = 0.1
IDLE_SAMPLE_S = 0.5
IDLE_TIMEOUT_S = 120.0
POSTGRES_URL = os.environ.get("BENCH_POSTGRES_URL",
                              "postgresql://postgres@127.0.0.1:5432/postgres")
# Shared objects whose presence in a server's memory map says which native
# backend it really runs (a toggle that silently did nothing would show here).
# Not protobuf's: upb's library is loaded even when the python backend is chosen.
NATIVE_MARKERS = {"uvloop": "/uvloop/", "hiredis": "/hiredis/"}
PROTOBUF_PROBE = ("from google.protobuf.internal import api_implementation; "
                  "print(api_implementation.Type())")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for_port(port: int, process: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode} before listening")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on {port} within {START_TIMEOUT_S}s")


def descendants(pid: int) -> list[int]:
    """pid and every process below it (a server's workers)."""
    found, queue = [], [pid]
    while queue:
        current = queue.pop()
        found.append(current)
        for children in Path(f"/proc/{current}/task").glob("*/children"):
            try:
                queue.extend(int(c) for c in children.read_text().split())
            except OSError:
                continue
    return found


def cpu_seconds(pids: Sequence[int]) -> float:
    """utime + stime of the processes (all their threads), from /proc/<pid>/stat."""
    total = 0
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        # fields after the command name (which may hold spaces) in parentheses
        after = stat.rsplit(")", 1)[1].split()
        total += int(after[11]) + int(after[12])
    return total / CLOCK_TICKS


def wait_idle(served: Served) -> None:
    """Until the server (and its store) is idle: the flusher has written what the
    setup or the last run left, so no run pays for the one before."""
    deadline = time.monotonic() + IDLE_TIMEOUT_S
    before = served.server_cpu_s() + served.store_cpu_s()
    while time.monotonic() < deadline:
        time.sleep(IDLE_SAMPLE_S)
        now = served.server_cpu_s() + served.store_cpu_s()
        if now - before < IDLE_CPU_FRACTION * IDLE_SAMPLE_S:
            return
        before = now
    raise RuntimeError(f"{served.name} was still busy {IDLE_TIMEOUT_S}s after its setup")


def native_backends(pid: int) -> dict[str, bool]:
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return {}
    return {name: marker in maps for name, marker in NATIVE_MARKERS.items()}


def protobuf_backend(env: dict[str, str]) -> str:
    """The protobuf backend ("upb" or "python") a server started with env runs."""
    return subprocess.run([python(), "-c", PROTOBUF_PROBE], env=env, capture_output=True,
                          text=True, check=True).stdout.strip()


def python() -> str:
    return sys.executable


def python_env(*front: Path) -> dict[str, str]:
    """The environment of a bench server: this checkout's src and bench first."""
    paths = [*map(str, front), str(REPO / "src"), str(REPO)]
    if os.environ.get("PYTHONPATH"):
        paths.append(os.environ["PYTHONPATH"])
    return os.environ | {"PYTHONPATH": os.pathsep.join(paths)}


@dataclass
class Served:
    """A server process under test."""

    name: str
    address: str
    process: subprocess.Popen[bytes]
    token: str = ""
    # CPU seconds so far of what does the server's storage work beside it (Redis,
    # PostgreSQL's backends); none for the floor
    store_cpu_s: Callable[[], float] = lambda: 0.0
    # /metrics of the server: its own, then each worker's (`--workers`: port + i)
    metrics_ports: tuple[int, ...] = ()
    protobuf: str = ""  # the protobuf backend of its environment

    def server_cpu_s(self) -> float:
        return cpu_seconds(descendants(self.process.pid))

    def backends(self) -> dict[str, bool | str]:
        return {**native_backends(self.process.pid), "protobuf": self.protobuf}

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@contextmanager
def floor(event_loop: str = "auto") -> Iterator[Served]:
    port = free_port()
    process = subprocess.Popen(
        [python(), "-m", "bench.floor_server", "--port", str(port), "--event-loop", event_loop],
        env=python_env())
    served = Served("floor", f"127.0.0.1:{port}", process,
                    protobuf=protobuf_backend(python_env()))
    try:
        wait_for_port(port, process, "the floor server")
        yield served
    finally:
        served.stop()


@contextmanager
def scratch_database() -> Iterator[str]:
    """A new database on the PostgreSQL at POSTGRES_URL, dropped afterwards."""
    name = f"tally_bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield POSTGRES_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _backend_pids(dsn: str) -> list[int]:
    database = dsn.rsplit("/", 1)[1]
    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        rows = conn.execute("SELECT pid FROM pg_stat_activity WHERE datname = %s",
                            (database,)).fetchall()
    return [row[0] for row in rows]


@contextmanager
def postgres(accounts: Sequence[str], event_loop: str = "auto") -> Iterator[Served]:
    with scratch_database() as dsn:
        pg_server.setup(dsn, list(accounts), UNITS_EACH)
        port = free_port()
        process = subprocess.Popen(
            [python(), "-m", "bench.pg_server", "--port", str(port), "--dsn", dsn,
             "--event-loop", event_loop], env=python_env())
        served = Served("postgres", f"127.0.0.1:{port}", process,
                        protobuf=protobuf_backend(python_env()))
        try:
            wait_for_port(port, process, "the PostgreSQL server")
            # the pool's connections: their backends do the SQL work
            backends = _backend_pids(dsn)
            served.store_cpu_s = lambda: cpu_seconds(backends)
            yield served
        finally:
            served.stop()


class RedisServer:
    """A private redis-server on a free port, configured like `make run`'s embedded
    one (AOF, noeviction, fsync `always` unless told otherwise)."""

    def __init__(self, folder: Path, appendfsync: str = "always",
                 extra: Sequence[str] = ()) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (apt-get install -y redis-server)")
        self.port = free_port()
        folder.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [binary, "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(folder),
             "--save", "", "--appendonly", "yes", "--appendfsync", appendfsync,
             "--maxmemory-policy", "noeviction", "--logfile", str(folder / "redis.log"),
             *extra],
            stdout=subprocess.DEVNULL)
        try:
            wait_for_port(self.port, self.process, "redis-server")
        except BaseException:
            self.stop()
            raise

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def cpu_s(self) -> float:
        """Redis's own figure (INFO cpu), all its threads."""
        with redis.Redis(port=self.port) as client:
            info = client.info("cpu")
        return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=REDIS_TIMEOUT_S)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class RedisCluster:
    """A private Redis Cluster: `masters` masters with `replicas` replicas each,
    every node a RedisServer (AOF, noeviction) in cluster mode on free ports,
    joined by `redis-cli --cluster create` (equal, contiguous slot ranges). A
    node that fails to start or join stops every node; stop() stops them all."""

    def __init__(self, folder: Path, masters: int = 3, replicas: int = 0,
                 appendfsync: str = "always") -> None:
        if shutil.which("redis-cli") is None:
            raise RuntimeError("redis-cli is not installed (apt-get install -y redis-tools)")
        self.masters_wanted = masters
        self.replicas_each = replicas
        self.nodes: list[RedisServer] = []
        try:
            for n in range(masters * (1 + replicas)):
                self.nodes.append(RedisServer(folder / f"node{n}", appendfsync, (
                    "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                    # the bus port defaults to port + 10000: past 65535 for a high free port
                    "--cluster-port", str(free_port()),
                    # a replica's first sync starts at once, not after the default 5 s
                    "--repl-diskless-sync-delay", "0")))
            subprocess.run(
                ["redis-cli", "--cluster", "create",
                 *(f"127.0.0.1:{node.port}" for node in self.nodes),
                 "--cluster-replicas", str(replicas), "--cluster-yes"],
                check=True, capture_output=True, timeout=START_TIMEOUT_S)
            self._wait_ok()
        except BaseException:
            self.stop()
            raise

    @property
    def url(self) -> str:
        """The URL `tally serve` takes: every node a seed."""
        return "redis+cluster://" + ",".join(f"127.0.0.1:{node.port}" for node in self.nodes)

    def _wait_ok(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not all(self._node_ok(node) for node in self.nodes):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the Redis Cluster did not become ok in {START_TIMEOUT_S}s")
            time.sleep(0.1)

    def _node_ok(self, node: RedisServer) -> bool:
        """The node sees every master with its replicas, and a replica is in sync
        (a replica wait counts only replicas that are)."""
        try:
            with node.client() as client:
                state = client.cluster("info").get("cluster_state")
                slots = client.execute_command("CLUSTER SLOTS")  # [start, end, master, *replicas]
                replication = client.info("replication")
        except redis.RedisError:
            return False
        in_sync = replication.get("role") == "master" or (
            replication.get("master_link_status") == "up"
            and not replication.get("master_sync_in_progress"))
        return (state == "ok" and len(slots) == self.masters_wanted and in_sync
                and all(len(entry) - 3 >= self.replicas_each for entry in slots))

    def role_of(self, node: RedisServer) -> str:
        with node.client() as client:
            role: str = client.info("replication")["role"]
        return role

    def masters(self) -> list[RedisServer]:
        """The nodes serving slots now, in port order."""
        return sorted((n for n in self.nodes if self.role_of(n) == "master"),
                      key=lambda n: n.port)

    def replicas(self) -> list[RedisServer]:
        return sorted((n for n in self.nodes if self.role_of(n) != "master"),
                      key=lambda n: n.port)

    def cpu_s(self) -> float:
        """Every node's INFO cpu, all their threads."""
        return sum(node.cpu_s() for node in self.nodes)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


@dataclass(frozen=True)
class TallyOptions:
    event_loop: str = ""  # "" : the server's default (no flag passed)
    hiredis: bool = True
    upb: bool = True
    workers: int = 0  # 0: the server's default (no flag passed)
    redis_pipeline: bool = True  # False: --redis-pipeline off
    # "": the server's default; a long one keeps the pairs' events in the streams
    # (bench/scaling.py measures serving alone, then flushers on that backlog)
    flush_interval: str = ""
    redis_max_connections: int = 0  # 0: the server's default (per node on a cluster)


def hiredis_shadow(folder: Path) -> Path:
    """A folder whose hiredis.py fails to import: first on PYTHONPATH, redis-py
    finds no hiredis and falls back to its Python parser."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "hiredis.py").write_text(
        'raise ImportError("hiredis turned off by the bench (bench/servers.py)")\n')
    return folder


class Tally:
    """`tally serve` against a private Redis (or Redis Cluster) and SQLite
    ledger, auth required, its accounts created and funded through the admin
    API. The Redis and ledger outlive a server restart, so toggles restart the
    server, not the data."""

    def __init__(self, folder: Path, accounts: Sequence[str], operation: str,
                 appendfsync: str = "always",
                 redis_store: RedisServer | RedisCluster | None = None) -> None:
        """On `redis_store` (stopped by close()), or a RedisServer of its own."""
        self.folder = folder
        self.accounts = accounts
        self.operation = operation
        self.redis = redis_store or RedisServer(folder / "redis", appendfsync)
        folder.mkdir(parents=True, exist_ok=True)
        self.token = new_token(Role.ADMIN, (), "bench", int(time.time() * 1000), 0,
                               "bench").text
        self.token_file = folder / "bootstrap-token"
        self.token_file.write_text(self.token + "\n")
        self.log = folder / "server.log"
        self.funded = False

    @contextmanager
    def serving(self, options: TallyOptions = TallyOptions(),
                wrapper: Sequence[str] = ()) -> Iterator[Served]:
        """The server running; `wrapper` runs it under another program (a profiler)."""
        port, metrics_port = free_port(), free_port()
        front = [] if options.hiredis else [hiredis_shadow(self.folder / "no-hiredis")]
        env = python_env(*front) | {
            "TALLY_LISTEN": f"127.0.0.1:{port}",
            "TALLY_REDIS_URL": self.redis.url,
            "TALLY_LEDGER_URL": f"sqlite:///{self.folder / 'ledger.sqlite3'}",
            "TALLY_DATA_DIR": str(self.folder / "var"),
            "TALLY_AUTH": "required",
            "TALLY_BOOTSTRAP_TOKEN_FILE": str(self.token_file),
            "TALLY_METRICS_LISTEN": f"127.0.0.1:{metrics_port}",
            "TALLY_LOG_LEVEL": "WARNING",
        }
        if not options.upb:
            env["PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION"] = "python"
        if options.flush_interval:
            env["TALLY_FLUSH_INTERVAL"] = options.flush_interval
        if options.redis_max_connections:
            env["TALLY_REDIS_MAX_CONNECTIONS"] = str(options.redis_max_connections)
        flags = []
        if options.event_loop:
            flags += ["--event-loop", options.event_loop]
        if options.workers:
            flags += ["--workers", str(options.workers)]
        if not options.redis_pipeline:
            flags += ["--redis-pipeline", "off"]
        with self.log.open("ab") as log:  # warnings and errors only (TALLY_LOG_LEVEL)
            process = subprocess.Popen(
                [*wrapper, python(), "-m", "tally.cli.main", "serve", *flags], env=env,
                stderr=log)
        metrics_ports = tuple(metrics_port + i for i in range(options.workers + 1))
        served = Served("tally", f"127.0.0.1:{port}", process, self.token,
                        self.redis.cpu_s, metrics_ports, protobuf_backend(env))
        try:
            wait_for_port(port, process, "tally serve")
            if not self.funded:
                asyncio.run(self._fund(served.address))
                self.funded = True
            wait_idle(served)
            yield served
        finally:
            served.stop()

    async def _fund(self, address: str) -> None:
        metadata = (("authorization", f"Bearer {self.token}"),)
        async with grpc.aio.insecure_channel(address) as channel:
            catalog = catalog_pb2_grpc.CatalogServiceStub(channel)
            await catalog.SetPrice(catalog_pb2.SetPriceRequest(
                operation=self.operation, units_per_quantity=1), metadata=metadata)
            accounts = account_pb2_grpc.AccountServiceStub(channel)
            pending = list(self.accounts)

            async def create() -> None:
                while pending:
                    await accounts.CreateAccount(account_pb2.CreateAccountRequest(
                        account_id=pending.pop(), monthly_allotment=UNITS_EACH),
                        metadata=metadata)

            await asyncio.gather(*(create() for _ in range(32)))

    def close(self) -> None:
        self.redis.stop()


def metrics_lines(metrics_ports: Sequence[int]) -> Iterator[str]:
    """The lines of the server's /metrics endpoints."""
    import urllib.request

    for port in metrics_ports:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            yield from reply.read().decode().splitlines()


def server_faults(metrics_ports: Sequence[int]) -> dict[str, int]:
    """The calls the server failed (tally_rpc_requests_total, code not OK) and the
    Redis errors it counted (tally_redis_errors_total), by their labels: what a
    failed run reports."""
    faults: dict[str, int] = {}
    for line in metrics_lines(metrics_ports):
        failed_call = line.startswith("tally_rpc_requests_total{") and 'code="OK"' not in line
        if failed_call or line.startswith("tally_redis_errors_total{"):
            labels, _, value = line.rpartition(" ")
            faults[labels] = faults.get(labels, 0) + int(float(value))
    return {labels: n for labels, n in faults.items() if n}


def server_rpc_counts(metrics_ports: Sequence[int]) -> dict[str, int]:
    """tally_rpc_requests_total with code OK, by method name, summed over the
    server's /metrics endpoints."""
    counts: dict[str, int] = {}
    for line in metrics_lines(metrics_ports):
            if line.startswith("tally_rpc_requests_total{") and 'code="OK"' in line:
                method = line.split('method="', 1)[1].split('"', 1)[0].rsplit("/", 1)[-1]
                counts[method] = counts.get(method, 0) + int(float(line.rsplit(" ", 1)[1]))
    return counts
