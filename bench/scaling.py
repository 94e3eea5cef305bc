"""The scaling story's unit capacities, and the deployment they add up to.

    python -m bench.scaling [--quick] [--target 100000] [--out bench/results]

Measures, each as CPU per unit of work (process accounting: the machine is shared
and has 2 cores, so wall-clock rates say more about the neighbours) and as the
rate reached here:

- a server process: `tally serve` CPU per Reserve+Commit pair, its flusher
  deferred (so the request path alone: at scale the flushers run apart), under
  bench/loadgen.py's closed loop;
- a Redis master: Redis's CPU per pair (INFO cpu, all threads), with AOF
  `appendfsync always` and `everysec`, each on a Redis and server of its own;
- a Redis Cluster of 3 masters (no replica; then one replica each, the server's
  default replica wait): the server's and the masters' CPU per pair (and their
  ratio to the single Redis's), each master's, and the share of the script calls
  (INFO commandstats, FCALL) each master ran, i.e. how the shards spread;
- PostgreSQL: the pairs' real events, left in the streams by the `always` run,
  written by one and then two `tally flusher` processes into a scratch database:
  events/s, and the flushers', PostgreSQL backends' and Redis's CPU per event.

Every serving cell runs at once, idle but for its turn: their windows take
turns, so a neighbour's load that comes and goes weighs on each cell alike and
the ratios between cells hold better than the rates.

Then bench/sizing.py turns them into servers, masters, flushers and PostgreSQL
for the target. Prints a table; writes results/scaling.json.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psycopg
import redis

from bench import servers, sizing
from bench.loadgen import LoadSpec, Scenario, account_ids, run_load
from bench.run import RESULTS, machine, scratch
from bench.servers import RedisCluster, RedisServer, Served, Tally, TallyOptions
from tally.ledger.backend import PostgresLedger

OPERATION = "bench.op"
# The server's own flusher never runs during a run (a day), so its CPU is the
# request path's and the pairs' events stay in the streams for the flushers.
FLUSH_DEFERRED = "1d"
# The measured flushers pass often: a pass drains all it finds, so the interval
# only adds idle time between passes.
FLUSHER_INTERVAL = "100ms"
SAMPLE_S = 0.05
LOG_LINES = 20  # of a failed run's server log, in its error
FLUSH_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 30.0
FLUSHER_COUNTS = (1, 2)
# The ledger tables that grow with every pair (the others hold a row per account or shard)
LEDGER_TABLES_PER_PAIR = ("ledger_entries", "reservation_states", "idempotency_states")


@dataclass(frozen=True)
class Timing:
    accounts: int
    warmup_s: float
    duration_s: float
    # measured windows per Redis setting, and rounds of (1 flusher, 2 flushers): each
    # figure is the median of its repeats, the machine being shared
    windows: int
    flush_rounds: int


FULL = Timing(accounts=1_000, warmup_s=1.0, duration_s=4.0, windows=3, flush_rounds=2)
QUICK = Timing(accounts=50, warmup_s=0.5, duration_s=1.5, windows=1, flush_rounds=1)


@dataclass(frozen=True)
class Cell:
    """A serving cell: a `tally serve` of its own on a Redis of its own."""

    name: str
    appendfsync: str = "always"
    masters: int = 0  # 0: a single Redis; N: a Redis Cluster of N masters
    replicas: int = 0  # each master's; the server's replica wait is its default (auto)
    redis_max_connections: int = 0  # 0: the server's default


SINGLE = "always"  # the cell the sizing and the flushers' backlog come from
SINGLE_CELLS = (Cell(SINGLE), Cell("everysec", appendfsync="everysec"))
# A cluster node's connections, raised from the default 64: when the token cache
# expires (every 2 s) each call in flight (the load's 128) reads the token from the
# master of its slot at once, and a cluster node's connections, unlike a single
# Redis's pool, do not wait when all are in use: the excess calls failed
# UNAVAILABLE ("the token store is unreachable"). 256 covers the 128 and the
# pipelines' connections.
CLUSTER_MAX_CONNECTIONS = 256
CLUSTER_CELLS = (
    Cell("3-masters", masters=3, redis_max_connections=CLUSTER_MAX_CONNECTIONS),
    Cell("3-masters-1-replica", masters=3, replicas=1,
         redis_max_connections=CLUSTER_MAX_CONNECTIONS))

# What a script call is in INFO commandstats: Tally's scripts are Redis Functions
FCALL_STATS = ("cmdstat_fcall", "cmdstat_fcall_ro")
# A replica wait (--redis-wait-replicas): one WAIT after each pipelined write
WAIT_STATS = ("cmdstat_wait",)


# --- servers and Redis masters ---------------------------------------------------------


@dataclass(frozen=True)
class NodeSample:
    cpu_s: float  # all its threads
    main_thread_cpu_s: float  # runs the scripts; `everysec`'s fsync runs on another thread
    fcalls: int  # script calls it ran so far
    waits: int  # WAITs for its replicas so far


def node_sample(node: RedisServer) -> NodeSample:
    with node.client() as client:
        cpu, stats = client.info("cpu"), client.info("commandstats")
    return NodeSample(
        float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"]),
        float(cpu["used_cpu_sys_main_thread"]) + float(cpu["used_cpu_user_main_thread"]),
        calls(stats, FCALL_STATS), calls(stats, WAIT_STATS))


def calls(commandstats: dict[str, Any], names: Sequence[str]) -> int:
    return sum(int(commandstats.get(name, {}).get("calls", 0)) for name in names)


def redis_cpu(node: RedisServer) -> float:
    return node_sample(node).cpu_s


@dataclass
class Running:
    """A serving cell, up: its server, and the Redis nodes it runs on."""

    cell: Cell
    tally: Tally
    served: Served
    masters: list[RedisServer]
    replicas: list[RedisServer]


def measure_pairs(running: Running, timing: Timing) -> dict[str, Any]:
    """A closed-loop pairs run: throughput, and the server's and the masters' CPU
    per pair over the measured window (on a cluster, each master's too, with its
    share of the script calls, and the replicas' CPU)."""
    nodes = [*running.masters, *running.replicas]
    marks: list[tuple[float, list[NodeSample]]] = []

    def mark() -> None:
        marks.append((running.served.server_cpu_s(), [node_sample(n) for n in nodes]))

    served = running.served
    spec = LoadSpec(target=served.address, scenario=Scenario.PAIRS,
                    accounts=account_ids(timing.accounts), operation=OPERATION,
                    duration_s=timing.duration_s, warmup_s=timing.warmup_s, token=served.token)
    result = run_load(spec, mark, mark)
    if result.ops == 0 or result.errors or result.refusals:
        log = running.tally.log.read_text(errors="replace").splitlines()[-LOG_LINES:]
        raise RuntimeError(
            f"the pairs run of {running.cell.name} failed: {result.ops} pairs, errors "
            f"{result.errors}, {result.refusals} refused; the server counted "
            f"{servers.server_faults(served.metrics_ports)}; its log ends:\n" + "\n".join(log))
    (server0, before), (server1, after) = marks
    per_pair = 1e6 / result.ops
    spent = [NodeSample(b.cpu_s - a.cpu_s, b.main_thread_cpu_s - a.main_thread_cpu_s,
                        b.fcalls - a.fcalls, b.waits - a.waits)
             for a, b in zip(before, after, strict=True)]
    masters, replicas = spent[:len(running.masters)], spent[len(running.masters):]
    fcalls = sum(m.fcalls for m in masters)
    figures: dict[str, Any] = {
        "pairs": result.ops, "pairs_per_s": result.ops_per_s,
        "p50_ms": result.p50_ms, "p99_ms": result.p99_ms,
        "server_cpu_s": server1 - server0, "redis_cpu_s": sum(m.cpu_s for m in masters),
        "server_cpu_us_per_pair": per_pair * (server1 - server0),
        "redis_cpu_us_per_pair": per_pair * sum(m.cpu_s for m in masters),
        "redis_main_thread_us_per_pair": per_pair * sum(m.main_thread_cpu_s for m in masters),
        "client_cpu_us_per_pair": per_pair * result.client_cpu_s,
        # 2 (Reserve, Commit) and the background's few (leases, fence checks); the
        # calls of pairs in flight at the window's edges make it move a little
        "fcalls_per_pair": fcalls / result.ops,
        "backends": served.backends(),
    }
    if running.cell.masters:
        figures["masters"] = [
            {"port": node.port, "cpu_us_per_pair": per_pair * m.cpu_s,
             "main_thread_us_per_pair": per_pair * m.main_thread_cpu_s,
             "fcalls": m.fcalls, "fcall_share": m.fcalls / fcalls if fcalls else 0.0}
            for node, m in zip(running.masters, masters, strict=True)]
        # the server's default replica wait: none without replicas, one WAIT per
        # pipelined write (of one call or more) with them
        figures["replica_waits_per_pair"] = sum(m.waits for m in masters) / result.ops
    if running.cell.replicas:
        figures["replicas_cpu_us_per_pair"] = per_pair * sum(r.cpu_s for r in replicas)
    return figures


def stream_names(client: redis.Redis) -> list[str]:
    """The shards' event streams, found by type: whatever the shard layout names them."""
    return sorted(key.decode() for key in client.scan_iter(match="tally:*", _type="stream"))


def medians(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Each numeric figure's median over the runs, a nested one's too (a dict, or a
    list of dicts such as the masters); the others (and a figure all runs share,
    such as the flusher count or a master's port) as the first run has them."""
    figures: dict[str, Any] = {}
    for key, value in runs[0].items():
        values = [run[key] for run in runs]
        if isinstance(value, dict):
            figures[key] = medians(values)
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            figures[key] = [medians([run[i] for run in values]) for i in range(len(value))]
        elif (isinstance(value, int | float) and not isinstance(value, bool)
              and any(v != value for v in values)):
            figures[key] = statistics.median(values)
        else:
            figures[key] = value
    return figures


def start_cell(cell: Cell, folder: Path, accounts: Sequence[str], stack: ExitStack) -> Running:
    """The cell's Redis (or cluster) and server, up and idle; stopped by the stack."""
    print(f"scaling: starting {cell.name} ...", file=sys.stderr, flush=True)
    store: RedisServer | RedisCluster
    if cell.masters:
        store = RedisCluster(folder / cell.name / "redis", cell.masters, cell.replicas,
                             cell.appendfsync)
    else:
        store = RedisServer(folder / cell.name / "redis", cell.appendfsync)
    stack.callback(store.stop)
    tally = Tally(folder / cell.name, accounts, OPERATION, redis_store=store)
    served = stack.enter_context(tally.serving(TallyOptions(
        flush_interval=FLUSH_DEFERRED, redis_max_connections=cell.redis_max_connections)))
    if isinstance(store, RedisCluster):
        return Running(cell, tally, served, store.masters(), store.replicas())
    return Running(cell, tally, served, [store], [])


def serving_runs(cells: Sequence[Running], timing: Timing) -> dict[str, dict[str, Any]]:
    """Each cell's pairs windows, the cells taking turns (in a new order each round);
    per cell, the medians (each window under "windows") and every pair its server
    completed, the unmeasured ones included (they are in the streams too)."""
    windows: dict[str, list[dict[str, Any]]] = {running.cell.name: [] for running in cells}
    for round_ in range(timing.windows):
        turn = round_ % len(cells)
        for running in [*cells[turn:], *cells[:turn]]:
            print(f"scaling: pairs, {running.cell.name} ...", file=sys.stderr, flush=True)
            windows[running.cell.name].append(measure_pairs(running, timing))
    return {running.cell.name: medians(windows[running.cell.name])
            | {"windows": windows[running.cell.name],
               "pairs_served": servers.server_rpc_counts(running.served.metrics_ports)["Commit"]}
            for running in cells}


def backlog_of(single: RedisServer) -> dict[str, bytes]:
    """The event streams as the pairs left them (DUMP payloads: entries, group,
    pending)."""
    backlog = {}
    with single.client() as client:
        for name in stream_names(client):
            payload = client.dump(name)
            if payload is not None:
                backlog[name] = payload
    if not backlog:
        raise RuntimeError("the pairs left no event stream in Redis")
    return backlog


def discard(served: Served) -> None:
    """Killed, not stopped: a shutdown would flush the server's backlog into its
    SQLite ledger first, beside the measured flushers."""
    served.process.kill()
    served.process.wait()


def versus_single(cluster: dict[str, Any], single: dict[str, Any]) -> dict[str, float]:
    """A cluster cell's CPU per pair over the single Redis's, measured in the same run."""
    return {"server_cpu_vs_single":
            cluster["server_cpu_us_per_pair"] / single["server_cpu_us_per_pair"],
            "redis_cpu_vs_single":
            cluster["redis_cpu_us_per_pair"] / single["redis_cpu_us_per_pair"]}


# --- flushers and PostgreSQL -------------------------------------------------------------


@dataclass(frozen=True)
class FlushSample:
    at_s: float
    written: int  # ledger entries committed
    flusher_cpu_s: float
    postgres_cpu_s: float
    redis_cpu_s: float


class BackendCpu:
    """CPU of a database's backends, except the sampler's own: each backend's last
    figure is kept, so one that disconnects still counts what it spent."""

    def __init__(self, conn: psycopg.Connection[Any], database: str) -> None:
        self.conn = conn
        self.database = database
        self.last: dict[int, float] = {}

    def seconds(self) -> float:
        rows = self.conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
            (self.database,)).fetchall()
        for (pid,) in rows:
            cpu = servers.cpu_seconds([pid])
            if cpu:
                self.last[pid] = cpu
        return sum(self.last.values())


def restore(client: redis.Redis, backlog: dict[str, bytes]) -> int:
    """The streams back as the serving run left them; returns the entries no
    flusher has read yet."""
    waiting = 0
    for name, payload in backlog.items():
        client.restore(name, 0, payload, replace=True)
        waiting += sum(int(group["lag"]) for group in client.xinfo_groups(name))
    return waiting


@contextmanager
def flushers(count: int, redis_url: str, dsn: str, folder: Path) -> Iterator[list[int]]:
    """`count` standalone `tally flusher` processes; stopped (SIGTERM) after."""
    env = servers.python_env() | {
        "TALLY_REDIS_URL": redis_url, "TALLY_LEDGER_URL": dsn,
        "TALLY_DATA_DIR": str(folder / "flusher-var"),
        "TALLY_FLUSH_INTERVAL": FLUSHER_INTERVAL, "TALLY_LOG_LEVEL": "WARNING",
        # no metrics endpoint: the default port may be taken (another server, a test)
        "TALLY_METRICS_LISTEN": ""}
    processes = []
    for old in folder.glob("flusher-*.log"):
        old.unlink()
    try:
        for n in range(count):
            log = (folder / f"flusher-{n}.log").open("wb")
            processes.append(subprocess.Popen(
                [servers.python(), "-m", "tally.cli.main", "flusher"], env=env,
                stdout=log, stderr=log))
            log.close()
        yield [process.pid for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def sample_until_written(events: int, pids: Sequence[int], sampler: psycopg.Connection[Any],
                         pg: BackendCpu, single: RedisServer) -> list[FlushSample]:
    samples: list[FlushSample] = []
    deadline = time.monotonic() + FLUSH_TIMEOUT_S
    while time.monotonic() < deadline:
        row = sampler.execute("SELECT COUNT(*) FROM ledger_entries").fetchone()
        written = int(row[0]) if row else 0
        samples.append(FlushSample(time.monotonic(), written, servers.cpu_seconds(pids),
                                   pg.seconds(), redis_cpu(single)))
        if written >= events:
            return samples
        if not all(Path(f"/proc/{pid}").exists() for pid in pids):
            raise RuntimeError("a flusher exited before the backlog was written")
        time.sleep(SAMPLE_S)
    raise RuntimeError(f"the flushers wrote {samples[-1].written} of {events} events "
                       f"in {FLUSH_TIMEOUT_S}s")


def flush_figures(samples: Sequence[FlushSample]) -> dict[str, Any]:
    """From the first sample that saw a committed batch to the one that saw them all:
    the flushers' start-up (imports, connections) is outside the window."""
    first = next(s for s in samples if s.written > 0)
    last = samples[-1]
    events, wall = last.written - first.written, last.at_s - first.at_s
    if events <= 0 or wall <= 0:
        raise RuntimeError("the backlog was written between two samples: too small to time")
    return {
        "window_events": events, "window_s": wall, "events_per_s": events / wall,
        "flusher_cpu_us_per_event": 1e6 * (last.flusher_cpu_s - first.flusher_cpu_s) / events,
        "flusher_cores_busy": (last.flusher_cpu_s - first.flusher_cpu_s) / wall,
        "postgres_cpu_us_per_event":
            1e6 * (last.postgres_cpu_s - first.postgres_cpu_s) / events,
        "redis_cpu_us_per_event": 1e6 * (last.redis_cpu_s - first.redis_cpu_s) / events,
    }


def ledger_contents(conn: psycopg.Connection[Any]) -> dict[str, Any]:
    """Entries by type, each table's bytes (rows, indexes, TOAST), and the deadlocks
    PostgreSQL broke in the database (the stats of backends that have exited)."""
    types = dict(conn.execute(
        "SELECT type, COUNT(*) FROM ledger_entries GROUP BY type ORDER BY type").fetchall())
    tables = dict(conn.execute(
        "SELECT relname, pg_total_relation_size(relid) FROM pg_stat_user_tables").fetchall())
    row = conn.execute(
        "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()").fetchone()
    return {"entries_by_type": types, "table_bytes": tables, "deadlocks": int(row[0]) if row else 0}


def failed_passes(folder: Path) -> int:
    """The flush passes the flushers logged as failed (their batch rolled back and
    stays pending for the next pass): a deadlock between flushers shows here."""
    return sum(log.read_text(errors="replace").count("flush pass failed")
               for log in folder.glob("flusher-*.log"))


def flush_run(count: int, single: RedisServer, backlog: dict[str, bytes],
              folder: Path) -> dict[str, Any]:
    """`count` flushers write the backlog into a fresh scratch database."""
    with single.client() as client, servers.scratch_database() as dsn:
        events = restore(client, backlog)
        if events == 0:
            raise RuntimeError("the restored streams hold no unread event")
        ledger = PostgresLedger(dsn)
        ledger.migrate(int(time.time() * 1000))  # before the flushers: they would race
        ledger.close()
        with psycopg.connect(dsn, autocommit=True) as sampler:
            empty = ledger_contents(sampler)["table_bytes"]
            pg = BackendCpu(sampler, dsn.rsplit("/", 1)[1])
            with flushers(count, single.url, dsn, folder) as pids:
                samples = sample_until_written(events, pids, sampler, pg, single)
            contents = ledger_contents(sampler)
    grown = {table: size - empty.get(table, 0) for table, size in contents["table_bytes"].items()}
    return {"flushers": count, "backlog_events": events, **flush_figures(samples),
            "entries_by_type": contents["entries_by_type"],
            "table_bytes_grown": {t: b for t, b in sorted(grown.items()) if b > 0},
            "deadlocks": contents["deadlocks"], "failed_passes": failed_passes(folder)}


# --- the report --------------------------------------------------------------------------


def flush_medians(flushes: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per flusher count, the medians of its rounds."""
    return [medians([run for run in flushes if run["flushers"] == count])
            for count in FLUSHER_COUNTS]


def unit_costs(always: dict[str, Any], flushed: dict[str, Any]) -> sizing.UnitCosts:
    return sizing.UnitCosts(
        server_cpu_us_per_pair=always["server_cpu_us_per_pair"],
        redis_cpu_us_per_pair=always["redis_cpu_us_per_pair"],
        redis_cpu_us_per_event_flushed=flushed["redis_cpu_us_per_event"],
        events_per_pair=flushed["backlog_events"] / always["pairs_served"],
        flusher_cpu_us_per_event=flushed["flusher_cpu_us_per_event"],
        flusher_events_per_s=flushed["events_per_s"],
        postgres_cpu_us_per_event=flushed["postgres_cpu_us_per_event"],
    )


def table(serving: dict[str, dict[str, Any]], flushes: Sequence[dict[str, Any]]) -> list[str]:
    lines = [f"{'unit':34} {'rate here':>16} {'CPU µs/unit':>12} {'per core':>14}",
             "-" * 79]
    always = serving[SINGLE]
    lines.append(f"{'server process (pair)':34} {always['pairs_per_s']:>10,.0f} pr/s "
                 f"{always['server_cpu_us_per_pair']:>12,.0f} "
                 f"{1e6 / always['server_cpu_us_per_pair']:>9,.0f} pr/s")
    for mode, run in serving.items():
        lines.append(f"{'Redis master, ' + mode + ' (pair)':34} {run['pairs_per_s']:>10,.0f} pr/s "
                     f"{run['redis_cpu_us_per_pair']:>12,.0f} "
                     f"{1e6 / run['redis_cpu_us_per_pair']:>9,.0f} pr/s")
    for run in flushes:
        name = f"{run['flushers']} flusher{'s' if run['flushers'] > 1 else ''}"
        lines.append(f"{name + ' (event)':34} {run['events_per_s']:>10,.0f} ev/s "
                     f"{run['flusher_cpu_us_per_event']:>12,.0f} "
                     f"{1e6 / run['flusher_cpu_us_per_event']:>9,.0f} ev/s   "
                     f"{run['flusher_cores_busy']:.0%} busy, {run['deadlocks']:g} deadlocks, "
                     f"{run['failed_passes']:g} failed passes")
        lines.append(f"{'  PostgreSQL backends (event)':34} {'':>16} "
                     f"{run['postgres_cpu_us_per_event']:>12,.0f} "
                     f"{1e6 / run['postgres_cpu_us_per_event']:>9,.0f} ev/s")
        lines.append(f"{'  Redis, flusher reads (event)':34} {'':>16} "
                     f"{run['redis_cpu_us_per_event']:>12,.0f}")
    return lines


def cluster_table(cluster: dict[str, dict[str, Any]]) -> list[str]:
    """Each cluster cell against the single Redis `always` cell, then each master:
    its share of the script calls (how the shards spread) and its CPU per pair of
    the whole load."""
    lines = [f"Redis Cluster cells (the `{SINGLE}` cell's load; 'x': over that cell's, "
             "same run):"]
    for name, run in cluster.items():
        replicas = (f", replicas {run['replicas_cpu_us_per_pair']:,.0f} µs, "
                    f"{run['replica_waits_per_pair']:.2f} WAITs/pair"
                    if "replicas_cpu_us_per_pair" in run else "")
        lines.append(f"  {name:22} {run['pairs_per_s']:>7,.0f} pr/s   server "
                     f"{run['server_cpu_us_per_pair']:,.0f} µs/pair "
                     f"({run['server_cpu_vs_single']:.2f}x), masters "
                     f"{run['redis_cpu_us_per_pair']:,.0f} µs ({run['redis_cpu_vs_single']:.2f}x)"
                     f"{replicas}")
        for master in run["masters"]:
            lines.append(f"    master :{master['port']:<6} {master['fcall_share']:>6.1%} of "
                         f"the script calls, {master['cpu_us_per_pair']:,.0f} µs/pair "
                         f"(main thread {master['main_thread_us_per_pair']:,.0f})")
    return lines


def measure_all(timing: Timing) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]],
                                         list[dict[str, Any]]]:
    """The pairs runs of the single Redis cells and the cluster cells, then the
    flush rounds on the `always` cell's backlog (on its Redis, the servers gone)."""
    accounts = account_ids(timing.accounts)
    flushes: list[dict[str, Any]] = []
    with scratch(keep=False) as folder, ExitStack() as stack:
        cells = [start_cell(cell, folder, accounts, stack)
                 for cell in (*SINGLE_CELLS, *CLUSTER_CELLS)]
        measured = serving_runs(cells, timing)
        single = cells[0].masters[0]
        backlog = backlog_of(single)
        for running in cells:
            discard(running.served)
            if running.cell.name != SINGLE:
                running.tally.close()
        for _ in range(timing.flush_rounds):
            for count in FLUSHER_COUNTS:
                print(f"scaling: {count} flusher(s) ...", file=sys.stderr, flush=True)
                flushes.append(flush_run(count, single, backlog, folder))
    serving = {cell.name: measured[cell.name] for cell in SINGLE_CELLS}
    cluster = {cell.name: measured[cell.name] | versus_single(measured[cell.name],
                                                              serving[SINGLE])
               for cell in CLUSTER_CELLS}
    return serving, cluster, flushes


def summary(report: dict[str, Any], costs: sizing.UnitCosts,
            assumptions: sizing.Assumptions, deployment: sizing.Deployment) -> list[str]:
    serving, flushed = report["serving"], report["flush_medians"]
    timing, pairs = report["timing"], serving[SINGLE]["pairs_served"]
    on_cluster = report["deployment_cluster"]
    grown = flushed[0]["table_bytes_grown"]
    types = ", ".join(f"{kind} {n}" for kind, n in flushed[0]["entries_by_type"].items())
    return [
        f"medians of {timing['windows']} pairs windows and {timing['flush_rounds']} flush rounds",
        *table(serving, flushed), "",
        *cluster_table(report["cluster"]), "",
        f"events per pair: {costs.events_per_pair:.2f} ({types}; {pairs} pairs)",
        "ledger growth per pair (PostgreSQL, dead row versions not yet vacuumed included): "
        + ", ".join(f"{name} {grown.get(name, 0) / pairs:,.0f} B"
                    for name in LEDGER_TABLES_PER_PAIR), "",
        *sizing.describe(costs, assumptions, deployment),
        f"  (appendfsync everysec: {report['deployment_everysec']['redis_masters_for_cpu']:,} "
        "masters for CPU)",
        f"  (with the {CLUSTER_CELLS[0].name} cell's server and master CPU per pair: "
        f"{on_cluster['server_processes']:,} server processes, "
        f"{on_cluster['redis_masters_for_cpu']:,} masters for CPU)", "",
        f"load average {report['machine']['load_average_before'][0]:.1f} -> "
        f"{report['machine']['load_average_after'][0]:.1f} on {report['machine']['cores']} "
        f"cores ({report['elapsed_s']:.0f}s)",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Unit capacities and the deployment for a "
                                     "target rate (see bench/README.md)")
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK.accounts} accounts, one {QUICK.duration_s:g} s window")
    parser.add_argument("--target", type=float, default=sizing.Assumptions.target_pairs_per_s,
                        help="Reserve+Commit pairs/s to size for")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    try:  # a target it cannot size for is refused before anything runs
        assumptions = sizing.Assumptions(target_pairs_per_s=args.target)
    except ValueError as exc:
        parser.error(str(exc))
    timing = QUICK if args.quick else FULL
    started, load_before = time.monotonic(), os.getloadavg()
    serving, cluster, flushes = measure_all(timing)
    flushed = flush_medians(flushes)
    costs = unit_costs(serving[SINGLE], flushed[0])
    deployment = sizing.size(costs, assumptions)
    everysec = sizing.size(sizing.UnitCosts(**asdict(costs) | {
        "redis_cpu_us_per_pair": serving["everysec"]["redis_cpu_us_per_pair"]}), assumptions)
    clustered = cluster[CLUSTER_CELLS[0].name]
    on_cluster = sizing.size(sizing.UnitCosts(**asdict(costs) | {
        "server_cpu_us_per_pair": clustered["server_cpu_us_per_pair"],
        "redis_cpu_us_per_pair": clustered["redis_cpu_us_per_pair"]}), assumptions)
    report = {
        "taken_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine() | {"load_average_before": load_before,
                                "load_average_after": os.getloadavg()},
        "quick": args.quick,
        "timing": asdict(timing),
        "serving": serving,
        "cluster": cluster,
        "flushes": flushes,
        "flush_medians": flushed,
        **sizing.as_dict(costs, assumptions, deployment),
        "deployment_everysec": asdict(everysec),
        "deployment_cluster": asdict(on_cluster),
        "elapsed_s": time.monotonic() - started,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scaling.json").write_text(json.dumps(report, indent=2) + "\n")
    print("\n".join(summary(report, costs, assumptions, deployment)))
    print(args.out / "scaling.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
