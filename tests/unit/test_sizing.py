"""The sizing model (bench/sizing.py): counts from unit costs, rounded up after the
headroom, and what it refuses."""

from __future__ import annotations

import math
from dataclasses import asdict, replace

import pytest

from bench import scaling, sizing

# Round figures, so each count below can be checked by hand.
COSTS = sizing.UnitCosts(
    server_cpu_us_per_pair=1_000.0,
    redis_cpu_us_per_pair=400.0,
    redis_cpu_us_per_event_flushed=50.0,
    events_per_pair=2.0,
    flusher_cpu_us_per_event=200.0,  # CPU bound: 5,000 events/s
    flusher_events_per_s=2_000.0,  # measured: the lesser
    postgres_cpu_us_per_event=100.0,
)
EXACT = sizing.Assumptions(target_pairs_per_s=10_000, server_busy=0.5, redis_master_busy=0.5,
                           flusher_busy=1.0, postgres_busy=0.5, accounts=0,
                           redis_master_memory_gib=1_000.0, postgres_primary_cores=4)


def test_each_count_from_the_unit_costs() -> None:
    d = sizing.size(COSTS, EXACT)
    assert d.server_processes == 20  # 10,000 x 1,000 µs = 10 cores, at half busy
    assert d.redis_cpu_us_per_pair == 500.0  # scripts + 2 events x 50 µs of flusher reads
    assert d.redis_masters_for_cpu == 10  # 5 cores at half busy
    assert d.ledger_events_per_s == 20_000.0
    assert d.flusher_events_per_s_each == 2_000.0
    assert d.flusher_processes == 10
    assert d.postgres_cores == 4  # 2 cores at half busy
    assert d.postgres_primaries == 1


def test_an_exact_fit_is_not_rounded_up_and_any_excess_is() -> None:
    # 100,000 x 420 µs at 70 % busy is 60.00000000000001 in floating point: still 60
    costs = replace(COSTS, server_cpu_us_per_pair=420.0)
    at_70 = replace(EXACT, target_pairs_per_s=100_000, server_busy=0.7)
    assert sizing.size(costs, at_70).server_processes == 60
    more = sizing.size(replace(COSTS, server_cpu_us_per_pair=1_000.5), EXACT)
    assert more.server_processes == 21
    tiny = sizing.size(COSTS, replace(EXACT, target_pairs_per_s=1))
    assert (tiny.server_processes, tiny.redis_masters, tiny.flusher_processes,
            tiny.postgres_cores, tiny.postgres_primaries) == (1, 1, 1, 1, 1)


def test_headroom_divides_each_unit() -> None:
    full = replace(EXACT, server_busy=1.0, redis_master_busy=1.0, postgres_busy=1.0)
    at_full, at_half = sizing.size(COSTS, full), sizing.size(COSTS, EXACT)
    assert 2 * at_full.server_processes == at_half.server_processes
    assert 2 * at_full.redis_masters_for_cpu == at_half.redis_masters_for_cpu
    assert 2 * at_full.postgres_cores == at_half.postgres_cores
    quarter = sizing.size(COSTS, replace(EXACT, flusher_busy=0.25))
    assert quarter.flusher_processes == 4 * at_half.flusher_processes


def test_a_flusher_writes_the_lesser_of_its_cpu_bound_and_its_measured_rate() -> None:
    cpu_bound = sizing.size(replace(COSTS, flusher_events_per_s=50_000.0), EXACT)
    assert cpu_bound.flusher_events_per_s_each == 5_000.0  # 1e6 / 200 µs
    assert cpu_bound.flusher_processes == 4


def test_masters_are_the_larger_of_cpu_and_memory() -> None:
    d = sizing.size(COSTS, replace(EXACT, redis_master_memory_gib=1.0))
    assert d.redis_masters_for_memory == math.ceil(d.redis_memory_gib) > d.redis_masters_for_cpu
    assert d.redis_masters == d.shards_at_least == d.redis_masters_for_memory
    assert sizing.size(COSTS, EXACT).redis_masters == 10


def test_redis_memory_is_the_readme_formula() -> None:
    # README "Sizing Redis": 15.85 GiB at 1,000 pairs/s (strict), plus A per account
    assert sizing.redis_memory_bytes(1_000, 0) / sizing.GIB == pytest.approx(15.85, abs=0.005)
    assert sizing.redis_memory_bytes(0, 1_000) == 1_000 * sizing.README_ACCOUNT_BYTES


@pytest.mark.parametrize("target", [0.0, -1.0, math.nan, math.inf])
def test_a_target_that_is_not_a_positive_rate_is_refused(target: float) -> None:
    with pytest.raises(ValueError, match="target pairs/s must be positive"):
        sizing.Assumptions(target_pairs_per_s=target)


@pytest.mark.parametrize("busy", [0.0, -0.5, 1.01])
def test_a_headroom_outside_0_to_1_is_refused(busy: float) -> None:
    with pytest.raises(ValueError, match="redis_master_busy must be in"):
        sizing.Assumptions(redis_master_busy=busy)
    assert sizing.Assumptions(redis_master_busy=1.0).redis_master_busy == 1.0


@pytest.mark.parametrize("field", list(asdict(COSTS)))
@pytest.mark.parametrize("value", [0.0, -3.0, math.nan])
def test_a_unit_cost_that_is_not_positive_is_refused(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=f"unit cost {field} must be positive"):
        sizing.UnitCosts(**asdict(COSTS) | {field: value})


def test_the_bench_refuses_a_bad_target_before_starting_anything(
        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        scaling.main(["--target", "0"])
    assert exited.value.code == 2
    assert "target pairs/s must be positive" in capsys.readouterr().err


def test_the_description_names_every_count_and_assumption() -> None:
    d = sizing.size(COSTS, EXACT)
    text = "\n".join(sizing.describe(COSTS, EXACT, d))
    for figure in (d.server_processes, d.redis_masters, d.flusher_processes, d.postgres_cores):
        assert f" {figure:,} " in text
    assert "Assumes:" in text and "not measured" in text
