"""`make bench` in its quick form on a few cells: the figures it writes hold
together. The client's count of calls equals the server's own RPC counter, CPU
figures come from real processes, every field is there, and the hiredis toggle
really turns hiredis off in the server. No timing threshold."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from bench.servers import python_env

CELLS = ("floor pairs", "postgres charge 10k", "tally pairs 10k", "tally charge hot",
         "tally pairs 10k, hiredis off")
LOAD_FIELDS = {"scenario", "mode", "offered_rate", "duration_s", "ops", "ops_per_s", "p50_ms",
               "p99_ms", "p999_ms", "refusals", "errors", "client_cpu_s", "client_processes",
               "concurrency", "rpcs", "calls_ok", "server", "server_cpu_s",
               "server_cpu_us_per_op", "store_cpu_s", "store_cpu_us_per_op",
               "client_cpu_us_per_op", "backends", "accounts"}
# the method that ends each op: an op counted in the window is one of its calls
LAST_CALL = {"pairs": "Commit", "charge": "Charge"}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("bench")
    only = [argument for cell in CELLS for argument in ("--only", cell)]
    subprocess.run([sys.executable, "-m", "bench.run", "--quick", *only, "--out", str(out)],
                   env=python_env(), check=True, timeout=400,
                   cwd=Path(__file__).resolve().parents[2])
    written: dict[str, Any] = json.loads((out / "latest.json").read_text())
    return written


@pytest.mark.timeout(420)
def test_every_cell_asked_for_has_every_field(report: dict[str, Any]) -> None:
    assert set(report["cells"]) == set(CELLS)
    for name, cell in report["cells"].items():
        assert set(cell) >= LOAD_FIELDS, name
    assert {"cpu", "cores", "python", "packages", "redis_server"} <= set(report["machine"])
    assert {"grpcio", "protobuf", "redis"} <= set(report["machine"]["packages"])
    # a target is judged exactly when its figure was measured
    assert len(report["targets"]) == 8
    for target in report["targets"]:
        assert (target["value"] is None) == (target["met"] is None), target


@pytest.mark.timeout(420)
def test_client_counts_equal_the_servers_own_counter(report: dict[str, Any]) -> None:
    cells = report["cells"]
    # one server ran the default Tally cells in turn; its counter is cumulative
    seen: Counter[str] = Counter()
    for name in ("tally pairs 10k", "tally charge hot"):
        seen.update(cells[name]["calls_ok"])
        server = cells[name]["server_calls_ok"]
        assert {m: server.get(m, 0) for m in seen} == dict(seen), name
    # the toggle ran on a server of its own (same Redis and ledger)
    toggled = cells["tally pairs 10k, hiredis off"]
    assert toggled["server_calls_ok"]["Reserve"] == toggled["calls_ok"]["Reserve"]
    assert toggled["server_calls_ok"]["Commit"] == toggled["calls_ok"]["Commit"]


@pytest.mark.timeout(420)
def test_the_figures_of_each_cell_hold_together(report: dict[str, Any]) -> None:
    for name, cell in report["cells"].items():
        assert cell["errors"] == {} and cell["refusals"] == 0, name
        assert 0 < cell["ops"] <= cell["calls_ok"][LAST_CALL[cell["scenario"]]], name
        assert cell["ops_per_s"] == cell["ops"] / cell["duration_s"], name
        assert 0 < cell["p50_ms"] <= cell["p99_ms"] <= cell["p999_ms"], name
        assert cell["server_cpu_s"] > 0 and cell["client_cpu_s"] > 0, name
        assert cell["server_cpu_us_per_op"] == pytest.approx(
            1e6 * cell["server_cpu_s"] / cell["ops"]), name
        # the floor has no store; Redis and PostgreSQL's backends did work
        assert (cell["store_cpu_s"] > 0) == (cell["server"] != "floor"), name


@pytest.mark.timeout(420)
def test_the_hiredis_toggle_takes_hiredis_out_of_the_server(report: dict[str, Any]) -> None:
    cells = report["cells"]
    assert cells["tally pairs 10k"]["backends"]["hiredis"] is True
    assert cells["tally pairs 10k, hiredis off"]["backends"]["hiredis"] is False
    assert cells["tally pairs 10k"]["backends"]["protobuf"] == "upb"
