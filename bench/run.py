"""`make bench`: Tally side by side with the floor and the PostgreSQL baseline.

    python -m bench.run [--quick] [--only CELL ...] [--workers N] [--out bench/results]

Runs every cell (see bench/README.md), prints one table with the ratios
Tally/floor and Tally/PostgreSQL and the issue's targets marked met or missed,
and writes results/latest.json (figures and the machine), results/latency.png
(Tally pairs: latency against offered load) and results/profile-pairs.txt (the
Tally server's hot path during a pairs run, py-spy's collapsed stacks) with
results/profile-top.txt (the functions with most samples on top).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from importlib import metadata
from pathlib import Path
from typing import Any

from bench import servers
from bench.loadgen import LoadSpec, Scenario, account_ids, run_load
from bench.servers import Served, Tally, TallyOptions

RESULTS = Path(__file__).resolve().parent / "results"
SPREAD_ACCOUNTS = 10_000
OPERATION = "bench.op"
# Offered load of the latency curve, as fractions of the measured saturation.
CURVE_FRACTIONS = (0.1, 0.25, 0.5, 0.75, 0.9, 1.1)
HALF_LOAD = 0.5
PROFILE_RATE_HZ = 200
IDLE_WINDOW_S = 3.0
# The batch cell: the largest batch the server takes (1,000 items), two in
# flight per client process: each carries 1,000 operations, so more in flight
# only queue (latency) without adding throughput.
BATCH_SIZE = 1_000
BATCH_CONCURRENCY = 2


@dataclass(frozen=True)
class Timing:
    duration_s: float
    warmup_s: float
    curve_duration_s: float
    accounts: int


FULL = Timing(duration_s=6.0, warmup_s=2.0, curve_duration_s=4.0, accounts=SPREAD_ACCOUNTS)
QUICK = Timing(duration_s=2.0, warmup_s=1.0, curve_duration_s=1.5, accounts=1_000)

# The targets on this machine.
PAIRS_VS_FLOOR_MIN = 0.6  # pair throughput, Tally / floor
CPU_VS_FLOOR_MAX = 1.6  # server CPU per pair, Tally / floor
HOT_VS_POSTGRES_MIN = 5.0  # hot-account throughput, Tally / PostgreSQL
P99_AT_HALF_LOAD_MAX_MS = 5.0
BATCH_HOLDS_PER_S_MIN = 100_000


def measure(served: Served, spec: LoadSpec) -> dict[str, Any]:
    """One load run; the server's and its store's CPU over the measured window."""
    marks: list[tuple[float, float]] = []

    def mark() -> None:
        marks.append((served.server_cpu_s(), served.store_cpu_s()))

    result = run_load(replace(spec, target=served.address, token=served.token), mark, mark)
    server_cpu = marks[1][0] - marks[0][0]
    store_cpu = marks[1][1] - marks[0][1]
    ops = max(result.ops, 1)
    figures = result.as_dict() | {
        "server": served.name,
        "server_cpu_s": server_cpu,
        "server_cpu_us_per_op": 1e6 * server_cpu / ops,
        "store_cpu_s": store_cpu,
        "store_cpu_us_per_op": 1e6 * store_cpu / ops,
        "client_cpu_us_per_op": 1e6 * result.client_cpu_s / ops,
        "backends": served.backends(),
    }
    if served.metrics_ports:
        figures["server_calls_ok"] = servers.server_rpc_counts(served.metrics_ports)
    return figures


class Bench:
    def __init__(self, timing: Timing, only: set[str], workers: int, out: Path) -> None:
        self.timing = timing
        self.only = only
        self.workers = workers
        self.out = out
        self.spread = account_ids(timing.accounts)
        self.hot = account_ids(1)
        self.cells: dict[str, dict[str, Any]] = {}
        self.notes: list[str] = []
        # the floor and the baseline run on the event loop Tally runs on by default
        self.loop = "auto"

    def wanted(self, name: str) -> bool:
        return not self.only or name in self.only

    def spec(self, scenario: Scenario, accounts: tuple[str, ...],
             rate: float | None = None) -> LoadSpec:
        return LoadSpec(target="", scenario=scenario, accounts=accounts, operation=OPERATION,
                        rate=rate, duration_s=self.timing.duration_s,
                        warmup_s=self.timing.warmup_s)

    def batch_spec(self) -> LoadSpec:
        return replace(self.spec(Scenario.BATCH, self.spread), batch_size=BATCH_SIZE,
                       concurrency=BATCH_CONCURRENCY)

    def run_cell(self, name: str, served: Served, spec: LoadSpec) -> None:
        if self.wanted(name):
            self.record(name, served, spec)

    def record(self, name: str, served: Served, spec: LoadSpec) -> None:
        print(f"bench: {name} ...", file=sys.stderr, flush=True)
        servers.wait_idle(served)  # the last run's background work (flusher) done
        self.cells[name] = measure(served, spec) | {"accounts": len(spec.accounts)}

    def floor(self) -> None:
        with servers.floor(self.loop) as served:
            self.run_cell("floor pairs", served, self.spec(Scenario.PAIRS, self.spread))
            self.run_cell("floor charge", served, self.spec(Scenario.CHARGE, self.spread))
            self.run_cell("floor batch", served, self.batch_spec())

    def postgres(self) -> None:
        names = [f"postgres {s} {a}" for s in ("pairs", "charge") for a in ("10k", "hot")]
        if not any(map(self.wanted, names)):
            return
        with servers.postgres(self.spread, self.loop) as served:
            self.spreads(served, "postgres")

    def spreads(self, served: Served, server: str) -> None:
        for scenario in (Scenario.PAIRS, Scenario.CHARGE):
            for label, accounts in (("10k", self.spread), ("hot", self.hot)):
                self.run_cell(f"{server} {scenario.value} {label}", served,
                              self.spec(scenario, accounts))

    def tally(self, folder: Path) -> None:
        tally = Tally(folder, self.spread, OPERATION)
        base = TallyOptions(workers=self.workers)
        try:
            with tally.serving(base) as served:
                self.idle(served)
                self.spreads(served, "tally")
                self.run_cell("tally batch 10k", served, self.batch_spec())
                self.curve(served)
            self.toggles(tally, base)
            self.profile(tally, base)
        finally:
            tally.close()

    def idle(self, served: Served) -> None:
        """What the server and Redis burn with no call at all (background tasks),
        which every op's CPU figure carries its share of."""
        if not self.wanted("tally idle"):
            return
        before = (served.server_cpu_s(), served.store_cpu_s())
        time.sleep(IDLE_WINDOW_S)
        after = (served.server_cpu_s(), served.store_cpu_s())
        self.cells["tally idle"] = {
            "window_s": IDLE_WINDOW_S,
            "server_cpu_pct": 100 * (after[0] - before[0]) / IDLE_WINDOW_S,
            "store_cpu_pct": 100 * (after[1] - before[1]) / IDLE_WINDOW_S}
        self.notes.append(
            f"idle tally serve: {self.cells['tally idle']['server_cpu_pct']:.1f}% of a core, "
            f"its Redis {self.cells['tally idle']['store_cpu_pct']:.1f}%")

    def toggles(self, tally: Tally, base: TallyOptions) -> None:
        toggles: list[tuple[str, TallyOptions]] = [
            ("tally pairs 10k, hiredis off", replace(base, hiredis=False)),
            ("tally pairs 10k, protobuf python", replace(base, upb=False)),
            ("tally pairs 10k, asyncio loop", replace(base, event_loop="asyncio")),
            ("tally pairs 10k, uvloop", replace(base, event_loop="uvloop")),
            ("tally pairs 10k, redis pipeline off", replace(base, redis_pipeline=False)),
            ("tally pairs 10k, 2 workers", replace(base, workers=2)),
        ]
        for name, options in toggles:
            if self.wanted(name):
                with tally.serving(options) as served:
                    self.run_cell(name, served, self.spec(Scenario.PAIRS, self.spread))

    def curve(self, served: Served) -> None:
        saturation = self.cells.get("tally pairs 10k", {}).get("ops_per_s")
        if not self.wanted("curve") or not saturation:
            return
        points = []
        for fraction in CURVE_FRACTIONS:
            rate = round(fraction * saturation)
            print(f"bench: curve, {rate} pairs/s offered ...", file=sys.stderr, flush=True)
            servers.wait_idle(served)
            spec = replace(self.spec(Scenario.PAIRS, self.spread, rate=rate),
                           duration_s=self.timing.curve_duration_s)
            points.append(measure(served, spec) | {"fraction_of_saturation": fraction})
        self.cells["curve"] = {"saturation_ops_per_s": saturation, "points": points}

    def profile(self, tally: Tally, base: TallyOptions) -> None:
        """py-spy attached to the server during a pairs run; when attaching is refused,
        the server is started again under py-spy."""
        if not self.wanted("profile"):
            return
        py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        raw = self.out / "profile-pairs.txt"
        options = ["--format", "raw", "--function", "--rate", str(PROFILE_RATE_HZ),
                   "--subprocesses", "--output", str(raw)]
        spec = self.spec(Scenario.PAIRS, self.spread)
        with tally.serving(base) as served:
            recorder = subprocess.Popen(
                [py_spy, "record", *options, "--nonblocking", "--pid", str(served.process.pid)],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            time.sleep(1.0)
            attached = recorder.poll() is None
            if attached:
                self.record("tally pairs 10k, profiled", served, spec)
                recorder.send_signal(signal.SIGINT)  # py-spy writes its output and stops
            _, errors = recorder.communicate(timeout=60)
        if not attached:
            self.notes.append(f"py-spy could not attach ({errors.decode()[-200:].strip()}); "
                              "profiled as the server's parent")
            with tally.serving(base, wrapper=[py_spy, "record", *options, "--"]) as served:
                self.record("tally pairs 10k, profiled", served, spec)
        if raw.exists():
            self.cells["profile"] = {"collapsed_stacks": raw.name,
                                     "top": write_top(raw, self.out / "profile-top.txt")}


def write_top(raw: Path, out: Path, rows: int = 40) -> list[dict[str, Any]]:
    """Functions by samples on top of the stack (self) and anywhere (total); then
    Tally's own functions by total (where its time goes, callees included)."""
    own: dict[str, int] = {}
    total: dict[str, int] = {}
    samples = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        samples += count
        frames = stack.split(";")
        own[frames[-1]] = own.get(frames[-1], 0) + count
        for frame in set(frames):
            total[frame] = total.get(frame, 0) + count

    def row(function: str) -> dict[str, Any]:
        return {"function": function, "self_pct": 100 * own.get(function, 0) / max(samples, 1),
                "total_pct": 100 * total[function] / max(samples, 1)}

    by_self = [row(f) for f, _ in sorted(own.items(), key=lambda item: -item[1])[:rows]]
    by_total = [row(f) for f, _ in sorted(total.items(), key=lambda item: -item[1])
                if "(tally/" in f][:rows]
    lines = [f"{samples} samples", "", "by self: self% total% function"]
    lines += [f"{r['self_pct']:6.1f} {r['total_pct']:6.1f}  {r['function']}" for r in by_self]
    lines += ["", "Tally's functions by total: self% total% function"]
    lines += [f"{r['self_pct']:6.1f} {r['total_pct']:6.1f}  {r['function']}" for r in by_total]
    out.write_text("\n".join(lines) + "\n")
    return by_self + by_total


def machine() -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    versions = {}
    for package in ("grpcio", "protobuf", "redis", "hiredis", "uvloop", "psycopg"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[package] = metadata.version(package)
    redis_server = subprocess.run(["redis-server", "--version"], capture_output=True,
                                  text=True, check=False).stdout.strip()
    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)),
            "python": platform.python_version(), "platform": platform.platform(),
            "packages": versions, "redis_server": redis_server}


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def verdicts(cells: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets, each with its measured figure and met / missed."""
    def figure(cell: str, key: str) -> float | None:
        value = cells.get(cell, {}).get(key)
        return float(value) if value is not None else None

    out: list[dict[str, Any]] = []

    def target(name: str, value: float | None, limit: float, at_least: bool) -> None:
        met = None if value is None else (value >= limit if at_least else value <= limit)
        out.append({"target": name, "value": value, "limit": limit,
                    "met": met})

    for spread in ("10k", "hot"):
        cell = f"tally pairs {spread}"
        target(f"pairs/s {spread} >= {PAIRS_VS_FLOOR_MIN}x floor",
               ratio(figure(cell, "ops_per_s"), figure("floor pairs", "ops_per_s")),
               PAIRS_VS_FLOOR_MIN, True)
        target(f"server CPU per pair {spread} <= {CPU_VS_FLOOR_MAX}x floor",
               ratio(figure(cell, "server_cpu_us_per_op"),
                     figure("floor pairs", "server_cpu_us_per_op")),
               CPU_VS_FLOOR_MAX, False)
    for scenario in ("pairs", "charge"):
        target(f"{scenario}/s hot >= {HOT_VS_POSTGRES_MIN}x PostgreSQL",
               ratio(figure(f"tally {scenario} hot", "ops_per_s"),
                     figure(f"postgres {scenario} hot", "ops_per_s")),
               HOT_VS_POSTGRES_MIN, True)
    half = next((p for p in cells.get("curve", {}).get("points", [])
                 if p["fraction_of_saturation"] == HALF_LOAD), None)
    target(f"p99 at half saturation <= {P99_AT_HALF_LOAD_MAX_MS} ms",
           half["p99_ms"] if half else None, P99_AT_HALF_LOAD_MAX_MS, False)
    target(f"batch holds/s 10k >= {BATCH_HOLDS_PER_S_MIN:,}",
           figure("tally batch 10k", "ops_per_s"), BATCH_HOLDS_PER_S_MIN, True)
    return out


def _floor_of(name: str) -> str:
    return "floor " + name.split()[1] if name.startswith(("tally", "postgres")) else ""


def table(cells: dict[str, dict[str, Any]]) -> str:
    header = (f"{'cell':34} {'ops/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'p99.9':>7} "
              f"{'srv us/op':>9} {'store':>7} {'client':>7} {'errors':>6} "
              f"{'x floor':>7} {'cpu x fl':>8} {'x PG':>6}")
    lines = [header, "-" * len(header)]
    for name, c in cells.items():
        if "ops_per_s" not in c:
            continue
        floor = cells.get(_floor_of(name), {})
        pg = cells.get(name.replace("tally", "postgres", 1).split(",")[0], {}) \
            if name.startswith("tally") else {}
        x_floor = ratio(c["ops_per_s"], floor.get("ops_per_s"))
        cpu_floor = ratio(c["server_cpu_us_per_op"], floor.get("server_cpu_us_per_op"))
        x_pg = ratio(c["ops_per_s"], pg.get("ops_per_s"))
        errors = c["refusals"] + sum(c["errors"].values())
        lines.append(
            f"{name:34} {c['ops_per_s']:8.0f} {c['p50_ms']:7.1f} {c['p99_ms']:7.1f} "
            f"{c['p999_ms']:7.1f} {c['server_cpu_us_per_op']:9.0f} "
            f"{c['store_cpu_us_per_op']:7.0f} {c['client_cpu_us_per_op']:7.0f} {errors:6d} "
            f"{_x(x_floor):>7} {_x(cpu_floor):>8} {_x(x_pg):>6}")
    return "\n".join(lines)


def _x(value: float | None) -> str:
    return f"{value:.2f}x" if value is not None else "-"


def curve_table(cells: dict[str, dict[str, Any]]) -> str:
    curve = cells.get("curve")
    if not curve:
        return ""
    lines = [f"Tally pairs, latency vs offered load (saturation "
             f"{curve['saturation_ops_per_s']:.0f} pairs/s):",
             f"{'offered':>8} {'done/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'p99.9':>7}"]
    lines += [f"{p['offered_rate']:8.0f} {p['ops_per_s']:8.0f} {p['p50_ms']:7.1f} "
              f"{p['p99_ms']:7.1f} {p['p999_ms']:7.1f}" for p in curve["points"]]
    return "\n".join(lines)


def plot(cells: dict[str, dict[str, Any]], path: Path) -> None:
    curve = cells.get("curve")
    if not curve:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = curve["points"]
    offered = [p["offered_rate"] for p in points]
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for key, label in (("p50_ms", "p50"), ("p99_ms", "p99"), ("p999_ms", "p99.9")):
        axes.plot(offered, [p[key] for p in points], marker="o", label=label)
    axes.axvline(curve["saturation_ops_per_s"], color="grey", linestyle="--",
                 label="closed-loop saturation")
    axes.axhline(P99_AT_HALF_LOAD_MAX_MS, color="red", linestyle=":", label="5 ms target")
    axes.set_yscale("log")
    axes.set_xlabel("offered Reserve+Commit pairs/s (open loop)")
    axes.set_ylabel("latency per pair, ms (from intended send)")
    axes.set_title("Tally pairs, 10,000 accounts")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


@contextlib.contextmanager
def scratch(keep: bool) -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(prefix="tally-bench-"))
    try:
        yield folder
    finally:
        if not keep:
            shutil.rmtree(folder, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Tally side by side with the floor and "
                                     "PostgreSQL (see bench/README.md)")
    parser.add_argument("--quick", action="store_true", help="short runs, 1,000 accounts")
    parser.add_argument("--only", action="append", default=[], metavar="CELL",
                        help="run this cell (a name of the table, or 'curve', 'profile'); "
                        "repeat for more; default: all")
    parser.add_argument("--workers", type=int, default=0, help="tally serve --workers")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--json-name", default="latest.json")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    only = set(args.only)
    bench = Bench(QUICK if args.quick else FULL, only, args.workers, args.out)
    started = time.monotonic()
    bench.floor()
    bench.postgres()
    with scratch(keep=False) as folder:
        bench.tally(folder)
    report = {
        "taken_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        "quick": args.quick,
        "timing": bench.timing.__dict__,
        "cells": bench.cells,
        "targets": verdicts(bench.cells),
        "notes": bench.notes,
        "elapsed_s": time.monotonic() - started,
    }
    (args.out / args.json_name).write_text(json.dumps(report, indent=2) + "\n")
    plot(bench.cells, args.out / "latency.png")
    print(table(bench.cells))
    print()
    print(curve_table(bench.cells))
    print()
    for verdict in report["targets"]:
        state = {True: "met", False: "MISSED", None: "not measured"}[verdict["met"]]
        value = "-" if verdict["value"] is None else f"{verdict['value']:.2f}"
        print(f"target: {verdict['target']:48} {value:>10}  {state}")
    for note in bench.notes:
        print(f"note: {note}")
    print(f"\n{args.out / args.json_name} ({report['elapsed_s']:.0f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
