"""`python -m bench.scaling --quick`: the unit costs it writes hold together, each
Redis Cluster cell measured every master, every event of the pairs reaches the
ledger once with each flusher count, and the deployment is the sizing model's
for those costs. No timing threshold."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest

from bench import sizing
from bench.servers import python_env
from tests.support import PostgresServer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory, postgres: PostgresServer) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("scaling")
    env = python_env() | {"BENCH_POSTGRES_URL": postgres.base_url}
    subprocess.run([sys.executable, "-m", "bench.scaling", "--quick", "--target", "50000",
                    "--out", str(out)], env=env, check=True, timeout=400,
                   cwd=Path(__file__).resolve().parents[2])
    written: dict[str, Any] = json.loads((out / "scaling.json").read_text())
    return written


@pytest.mark.timeout(420)
def test_each_serving_run_measured_pairs_and_cpu(report: dict[str, Any]) -> None:
    assert set(report["serving"]) == {"always", "everysec"}
    for mode, served in report["serving"].items():
        assert len(served["windows"]) == report["timing"]["windows"] == 1, mode
        run = served["windows"][0]
        assert 0 < run["pairs"] <= served["pairs_served"], mode
        assert run["server_cpu_s"] > 0 and run["redis_cpu_s"] > 0, mode
        assert run["server_cpu_us_per_pair"] == pytest.approx(
            1e6 * run["server_cpu_s"] / run["pairs"]), mode
        # a part of the whole (Redis reads the two a moment apart: 1 % of slack)
        assert 0 < run["redis_main_thread_us_per_pair"] <= 1.01 * run["redis_cpu_us_per_pair"]
        assert run["backends"]["hiredis"] is True, mode
        # one window: its figures are the medians
        assert {k: v for k, v in served.items() if k not in ("windows", "pairs_served")} == run


@pytest.mark.timeout(420)
def test_each_cluster_cell_measured_every_master(report: dict[str, Any]) -> None:
    single = report["serving"]["always"]
    assert set(report["cluster"]) == {"3-masters", "3-masters-1-replica"}
    for name, cell in report["cluster"].items():
        assert len(cell["windows"]) == 1, name
        run = cell["windows"][0]
        assert 0 < run["pairs"] <= cell["pairs_served"], name
        assert run["server_cpu_s"] > 0 and run["backends"]["hiredis"] is True, name
        masters = run["masters"]
        assert len({master["port"] for master in masters}) == 3, name
        # 50 accounts over 256 shards spread over the slots: every master runs calls
        assert all(master["fcalls"] > 0 and master["cpu_us_per_pair"] > 0
                   for master in masters), name
        assert sum(master["fcall_share"] for master in masters) == pytest.approx(1.0)
        assert run["fcalls_per_pair"] == pytest.approx(
            sum(master["fcalls"] for master in masters) / run["pairs"])
        # the cell's Redis figures are its masters' sums
        assert run["redis_cpu_us_per_pair"] == pytest.approx(
            sum(master["cpu_us_per_pair"] for master in masters))
        assert run["redis_main_thread_us_per_pair"] == pytest.approx(
            sum(master["main_thread_us_per_pair"] for master in masters))
        # one window: its figures are the medians, beside the ratios to the single Redis
        assert {k: v for k, v in cell.items() if k not in (
            "windows", "pairs_served", "server_cpu_vs_single", "redis_cpu_vs_single")} == run
        assert cell["server_cpu_vs_single"] == pytest.approx(
            run["server_cpu_us_per_pair"] / single["server_cpu_us_per_pair"])
        assert cell["redis_cpu_vs_single"] == pytest.approx(
            run["redis_cpu_us_per_pair"] / single["redis_cpu_us_per_pair"])
    # the server's default replica wait: WAITs only where masters have a replica
    alone, replicated = report["cluster"]["3-masters"], report["cluster"]["3-masters-1-replica"]
    assert alone["replica_waits_per_pair"] == 0 and "replicas_cpu_us_per_pair" not in alone
    assert replicated["replica_waits_per_pair"] > 0
    assert replicated["replicas_cpu_us_per_pair"] > 0


@pytest.mark.timeout(420)
def test_every_event_of_the_pairs_reaches_the_ledger_once(report: dict[str, Any]) -> None:
    pairs = report["serving"]["always"]["pairs_served"]
    assert [run["flushers"] for run in report["flushes"]] == [1, 2]
    for run in report["flushes"]:
        # the backlog is the always run's pairs: one reserve and one commit each
        assert run["entries_by_type"] == {"reserve": pairs, "commit": pairs}, run["flushers"]
        assert run["backlog_events"] == 2 * pairs
        assert 0 < run["window_events"] <= run["backlog_events"]
        assert run["events_per_s"] == pytest.approx(run["window_events"] / run["window_s"])
        for key in ("flusher_cpu_us_per_event", "postgres_cpu_us_per_event",
                    "redis_cpu_us_per_event"):
            assert run[key] > 0, (run["flushers"], key)
        assert run["table_bytes_grown"]["ledger_entries"] > 0
    # one flusher has nobody to wait for: no deadlock, no failed pass
    alone = report["flushes"][0]
    assert alone["deadlocks"] == alone["failed_passes"] == 0


@pytest.mark.timeout(420)
def test_the_unit_costs_are_the_measured_figures(report: dict[str, Any]) -> None:
    costs, always = report["unit_costs"], report["serving"]["always"]
    one = report["flush_medians"][0]
    assert one == report["flushes"][0]  # one round: the medians are its figures
    assert costs == {
        "server_cpu_us_per_pair": always["server_cpu_us_per_pair"],
        "redis_cpu_us_per_pair": always["redis_cpu_us_per_pair"],
        "redis_cpu_us_per_event_flushed": one["redis_cpu_us_per_event"],
        "events_per_pair": 2.0,
        "flusher_cpu_us_per_event": one["flusher_cpu_us_per_event"],
        "flusher_events_per_s": one["events_per_s"],
        "postgres_cpu_us_per_event": one["postgres_cpu_us_per_event"],
    }


@pytest.mark.timeout(420)
def test_the_deployment_recomputes_from_the_costs(report: dict[str, Any]) -> None:
    costs = sizing.UnitCosts(**report["unit_costs"])
    assumptions = sizing.Assumptions(**report["assumptions"])
    assert assumptions.target_pairs_per_s == 50_000
    assert report["deployment"] == asdict(sizing.size(costs, assumptions))
    everysec = sizing.UnitCosts(**asdict(costs) | {
        "redis_cpu_us_per_pair": report["serving"]["everysec"]["redis_cpu_us_per_pair"]})
    assert report["deployment_everysec"] == asdict(sizing.size(everysec, assumptions))
    clustered = report["cluster"]["3-masters"]
    on_cluster = sizing.UnitCosts(**asdict(costs) | {
        "server_cpu_us_per_pair": clustered["server_cpu_us_per_pair"],
        "redis_cpu_us_per_pair": clustered["redis_cpu_us_per_pair"]})
    assert report["deployment_cluster"] == asdict(sizing.size(on_cluster, assumptions))
    assert {"cpu", "cores", "load_average_before", "load_average_after"} <= set(report["machine"])
