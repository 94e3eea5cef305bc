"""The deployment a target rate of Reserve+Commit pairs needs, from unit costs.

Pure arithmetic: bench/scaling.py measures the unit costs (CPU per pair or per
ledger event, what one flusher wrote per second) and calls `size`; the tests
call it with costs of their own. Every count is rounded up, after dividing by
how busy a unit may run (the headroom, `Assumptions`).

The Redis memory of the target comes from the README's "Sizing Redis" figures
(bench/memory.py, strict measure, default settings), not from this run: the
bytes each record a pair leaves takes, and how long it stays.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

GIB = 1024**3
# Digits kept before rounding up: 100,000 pairs x 420 µs at 70 % busy is 60 cores, not
# the 61 that floating point's 60.00000000000001 would round up to.
ROUNDING_DIGITS = 9


@dataclass(frozen=True)
class RedisRecord:
    """What one pair leaves in Redis for a while (README "Sizing Redis")."""

    name: str
    bytes_per_pair: float  # strict: used_memory growth, expiry entries and hash slots in
    kept_s: float  # its window at the default settings


# README "Sizing Redis", strict column (bench/memory.py, Redis 7.0, 2,049 pairs).
README_RECORDS = (
    RedisRecord("idempotency record", 192, 86_400.0),  # --idempotency-window 24 h
    RedisRecord("closed reservation", 578, 600.0),  # --closed-reservation-window 10 min
    RedisRecord("flushed stream events", 2_777, 30.0),  # --stream-retention 30 s
)
README_ACCOUNT_BYTES = 1_170  # an account with its period's usage counters (~, README)


@dataclass(frozen=True)
class UnitCosts:
    """The measured costs (bench/scaling.py): CPU per unit of work, from /proc and
    Redis's INFO, and what one flusher process wrote per second."""

    server_cpu_us_per_pair: float  # tally serve, request path only (no flusher in it)
    redis_cpu_us_per_pair: float  # a pair's scripts, on the master of its shard
    redis_cpu_us_per_event_flushed: float  # the flusher's reads, acks and trims
    events_per_pair: float  # ledger entries one pair really emits
    flusher_cpu_us_per_event: float  # a `tally flusher` process
    flusher_events_per_s: float  # what one flusher wrote per second (wall clock)
    postgres_cpu_us_per_event: float  # PostgreSQL's backends serving the flusher

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"unit cost {name} must be positive, got {value}")


@dataclass(frozen=True)
class Assumptions:
    """The target and the headroom: the share of a core (or of a flusher's
    throughput) a unit may be busy at the target rate."""

    target_pairs_per_s: float = 100_000.0
    # Python's request path: bursts, garbage collection, a neighbour's failure
    server_busy: float = 0.7
    # A master is one core (Redis runs scripts on its main thread). Half of it: the
    # shards are never spread exactly evenly (and hot accounts stay on their shard),
    # the AOF rewrite forks, replicas and the cluster bus take their share, and a
    # failover's catch-up must fit.
    redis_master_busy: float = 0.5
    # Flushers must catch up after an outage: a backlog drains at 1 - busy of their rate
    flusher_busy: float = 0.7
    postgres_busy: float = 0.7
    # Data per master (its maxmemory): well under the host's RAM, since the AOF
    # rewrite's fork can copy as many pages again under write load
    redis_master_memory_gib: float = 25.0
    accounts: int = 1_000_000
    # The most cores one PostgreSQL primary gives the ledger
    postgres_primary_cores: int = 32

    def __post_init__(self) -> None:
        if not math.isfinite(self.target_pairs_per_s) or self.target_pairs_per_s <= 0:
            raise ValueError(f"target pairs/s must be positive, got {self.target_pairs_per_s}")
        for name in ("server_busy", "redis_master_busy", "flusher_busy", "postgres_busy"):
            busy = getattr(self, name)
            if not 0 < busy <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {busy}")
        if self.redis_master_memory_gib <= 0 or self.postgres_primary_cores < 1:
            raise ValueError("redis_master_memory_gib and postgres_primary_cores must be positive")
        if self.accounts < 0:
            raise ValueError(f"accounts must not be negative, got {self.accounts}")


@dataclass(frozen=True)
class Deployment:
    target_pairs_per_s: float
    server_processes: int  # one core each (tally serve --workers N: N processes)
    redis_cpu_us_per_pair: float  # scripts + the flusher's share
    redis_masters_for_cpu: int
    redis_memory_gib: float
    redis_masters_for_memory: int
    redis_masters: int  # the larger of the two
    shards_at_least: int  # one virtual shard is one hash slot: on one master only
    ledger_events_per_s: float
    flusher_events_per_s_each: float  # the lesser of its CPU bound and its measure
    flusher_processes: int
    postgres_cores: int
    postgres_primaries: int


def round_up(value: float) -> int:
    return math.ceil(round(value, ROUNDING_DIGITS))


def redis_memory_bytes(pairs_per_s: float, accounts: int) -> float:
    """README "Sizing Redis": accounts x A + pairs/s x sum(bytes x window);
    open holds are left out (a pair holds for milliseconds)."""
    per_rate = sum(record.bytes_per_pair * record.kept_s for record in README_RECORDS)
    return accounts * README_ACCOUNT_BYTES + pairs_per_s * per_rate


def size(costs: UnitCosts, assumptions: Assumptions = Assumptions()) -> Deployment:
    """Servers, Redis masters, flushers and PostgreSQL for the target rate (the
    costs and assumptions were checked when they were made)."""
    target = assumptions.target_pairs_per_s
    servers = round_up(target * costs.server_cpu_us_per_pair / 1e6 / assumptions.server_busy)
    redis_us = (costs.redis_cpu_us_per_pair
                + costs.events_per_pair * costs.redis_cpu_us_per_event_flushed)
    masters_cpu = round_up(target * redis_us / 1e6 / assumptions.redis_master_busy)
    memory = redis_memory_bytes(target, assumptions.accounts)
    masters_memory = round_up(memory / GIB / assumptions.redis_master_memory_gib)
    masters = max(masters_cpu, masters_memory)
    events = target * costs.events_per_pair
    # a flusher is one Python process: one core at most, and it also waits on
    # PostgreSQL's round trips and commits, which the measured rate includes
    per_flusher = min(1e6 / costs.flusher_cpu_us_per_event, costs.flusher_events_per_s)
    flushers = round_up(events / per_flusher / assumptions.flusher_busy)
    pg_cores = round_up(events * costs.postgres_cpu_us_per_event / 1e6
                        / assumptions.postgres_busy)
    return Deployment(
        target_pairs_per_s=target,
        server_processes=servers,
        redis_cpu_us_per_pair=redis_us,
        redis_masters_for_cpu=masters_cpu,
        redis_memory_gib=memory / GIB,
        redis_masters_for_memory=masters_memory,
        redis_masters=masters,
        shards_at_least=masters,
        ledger_events_per_s=events,
        flusher_events_per_s_each=per_flusher,
        flusher_processes=flushers,
        postgres_cores=pg_cores,
        postgres_primaries=round_up(pg_cores / assumptions.postgres_primary_cores),
    )


def describe(costs: UnitCosts, assumptions: Assumptions, deployment: Deployment) -> list[str]:
    """The deployment, then what it assumes, as printed lines."""
    a, d = assumptions, deployment
    lines = [
        f"For {d.target_pairs_per_s:,.0f} Reserve+Commit pairs/s:",
        f"  tally serve processes (cores)  {d.server_processes:>8,}   "
        f"{costs.server_cpu_us_per_pair:,.0f} µs/pair at {a.server_busy:.0%} busy",
        f"  Redis masters                  {d.redis_masters:>8,}   CPU: {d.redis_masters_for_cpu:,}"
        f" ({d.redis_cpu_us_per_pair:,.0f} µs/pair at {a.redis_master_busy:.0%} of a core);"
        f" memory: {d.redis_masters_for_memory:,} ({d.redis_memory_gib:,.0f} GiB at "
        f"{a.redis_master_memory_gib:g} GiB each)",
        f"  virtual shards (--shards)  >= {d.shards_at_least:>8,}   spread evenly over the "
        "masters (see Shards)",
        f"  ledger events/s                {d.ledger_events_per_s:>8,.0f}   "
        f"{costs.events_per_pair:.2f} events per pair",
        f"  flusher processes              {d.flusher_processes:>8,}   "
        f"{d.flusher_events_per_s_each:,.0f} events/s each at {a.flusher_busy:.0%} (CPU bound: "
        f"{1e6 / costs.flusher_cpu_us_per_event:,.0f})",
        f"  PostgreSQL cores               {d.postgres_cores:>8,}   "
        f"{costs.postgres_cpu_us_per_event:,.0f} µs/event at {a.postgres_busy:.0%} busy; "
        f"{d.postgres_primaries:,} primar{'y' if d.postgres_primaries == 1 else 'ies'} of "
        f"{a.postgres_primary_cores} cores",
        "Assumes:",
        "  - CPU per unit is linear in the rate; a Redis master is one core (its main thread),",
        "    the shards spread evenly over the masters, a server or flusher process one core;",
        "  - Redis memory: README 'Sizing Redis' records per pair x their windows",
        f"    (the 24 h idempotency window dominates), {a.accounts:,} accounts x "
        f"{README_ACCOUNT_BYTES:,} B;",
        "  - a flusher writes the lesser of its CPU bound and the rate one was measured at;",
        "  - PostgreSQL: its backends' CPU only (not WAL writer, checkpointer, autovacuum,",
        "    replication), and one ledger URL today: above one primary needs a ledger",
        "    partitioned by shard (not built);",
        "  - Redis Cluster measured on one host, 3 masters; not measured: a network",
        "    between hosts, many masters, redirections and failovers under load, TLS,",
        "    the load balancer, the clients.",
    ]
    return lines


def as_dict(costs: UnitCosts, assumptions: Assumptions, deployment: Deployment) -> dict[str, Any]:
    return {"unit_costs": asdict(costs), "assumptions": asdict(assumptions),
            "deployment": asdict(deployment),
            "redis_records": [asdict(record) for record in README_RECORDS],
            "redis_account_bytes": README_ACCOUNT_BYTES}
