"""Prometheus metrics. Labels are low-cardinality only: never an account id,
a reservation id, an idempotency key or a request label value.

The label values in use are bounded sets: gRPC method names (the registered
services), status code names, Lua script names, Redis error kinds, shed reasons,
background task names, and operation names from the price catalog (capped at
OPERATION_LABELS_MAX distinct values; the rest are counted as "other").
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

log = logging.getLogger("tally.metrics")

REGISTRY = CollectorRegistry(auto_describe=True)

# --- flusher ----------------------------------------------------------------

FLUSHER_EVENTS_WAITING = Gauge(
    "tally_flusher_events_waiting",
    "Events in the shard streams not yet written to the ledger",
    registry=REGISTRY,
)
FLUSHER_OLDEST_UNFLUSHED_SECONDS = Gauge(
    "tally_flusher_oldest_unflushed_seconds",
    "Age of the oldest event not yet written to the ledger (0: none waits)",
    registry=REGISTRY,
)
FLUSHER_EVENTS_FLUSHED = Counter(
    "tally_flusher_events_flushed",
    "Events written to the ledger by this process (duplicates included)",
    registry=REGISTRY,
)
FLUSHER_FAILURES = Counter(
    "tally_flusher_failures",
    "Flush passes that failed (Redis or ledger unreachable)",
    registry=REGISTRY,
)

LEDGER_CONFLICTS = Counter(
    "tally_ledger_conflicts_total",
    "Stream entries whose event id the ledger holds with other content (Redis lost "
    "writes): left unacknowledged, the shard fenced",
    registry=REGISTRY,
)

# --- shard fences (Redis that lost writes) -----------------------------------

SHARD_FENCE_REFUSALS = Counter(
    "tally_shard_fence_refusals_total",
    "Script calls refused because their shard's Redis is behind the ledger",
    registry=REGISTRY,
)
SHARDS_FENCED = Gauge(
    "tally_shards_fenced",
    "Shards this server refuses to write to until they are recovered",
    registry=REGISTRY,
)

# --- background tasks (the supervisor) -------------------------------------

BACKGROUND_RESTARTS = Counter(
    "tally_background_restarts_total",
    "Restarts of a background task (reaper, flusher) after it failed",
    ["task"],
    registry=REGISTRY,
)
BACKGROUND_TASK_UP = Gauge(
    "tally_background_task_up",
    "1 while a background task runs; 0 while it waits to restart or after it stopped",
    ["task"],
    registry=REGISTRY,
)

# --- worker processes (--workers above 1; the primary's endpoint) -----------

WORKER_RESTARTS = Counter(
    "tally_worker_restarts_total",
    "Worker processes started again after one exited unasked, by worker index",
    ["worker"],
    registry=REGISTRY,
)
WORKERS_SERVING = Gauge(
    "tally_workers_serving",
    "Worker processes that reported serving and have not exited",
    registry=REGISTRY,
)

# --- gRPC -------------------------------------------------------------------

# From half a millisecond (a cached hot-path call) to the longest sensible deadline.
RPC_DURATION_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
)

RPC_REQUESTS = Counter(
    "tally_rpc_requests_total",
    "gRPC calls handled, by method (Service/Method) and final status code",
    ["method", "code"],
    registry=REGISTRY,
)
RPC_DURATION = Histogram(
    "tally_rpc_duration_seconds",
    "Time the server spent on a unary gRPC call, by method (Service/Method)",
    ["method"],
    buckets=RPC_DURATION_BUCKETS,
    registry=REGISTRY,
)

RPC_IN_FLIGHT = Gauge(
    "tally_rpc_in_flight",
    "Calls holding an admission slot (max_in_flight at most)",
    registry=REGISTRY,
)
RPC_WAITING = Gauge(
    "tally_rpc_waiting",
    "Calls waiting for an admission slot (admission_queue at most)",
    registry=REGISTRY,
)
RPC_SHED = Counter(
    "tally_rpc_shed_total",
    "Calls refused at admission, by method and reason: queue_full and wait_expired "
    "(RESOURCE_EXHAUSTED), deadline (DEADLINE_EXCEEDED while waiting for a slot)",
    ["method", "reason"],
    registry=REGISTRY,
)

# --- units ------------------------------------------------------------------

UNITS_RESERVED = Counter(
    "tally_units_reserved_total",
    "Units held by Reserve (replays not counted), by operation",
    ["operation"],
    registry=REGISTRY,
)
UNITS_CHARGED = Counter(
    "tally_units_charged_total",
    "Units charged by Commit and Charge (replays not counted), by operation",
    ["operation"],
    registry=REGISTRY,
)
UNITS_REFUNDED = Counter(
    "tally_units_refunded_total",
    "Units given back by Refund, released holds included (replays not counted), by operation",
    ["operation"],
    registry=REGISTRY,
)
OVERAGE_UNITS = Counter(
    "tally_overage_units_total",
    "Part of the units charged by Commit and Charge taken as overage, by operation",
    ["operation"],
    registry=REGISTRY,
)

# --- holds ------------------------------------------------------------------

OPEN_HOLDS = Gauge(
    "tally_open_holds",
    "Open holds in the store, all shards (refreshed by each reaper pass)",
    registry=REGISTRY,
)
HOLDS_EXPIRED = Counter(
    "tally_holds_expired_total",
    "Expired holds released by this process's reaper",
    registry=REGISTRY,
)

# --- billing periods -------------------------------------------------------

# --- leases of background work (store/leases.py) -----------------------------

LEASES_HELD = Gauge(
    "tally_leases_held",
    "Leases of background work this process holds, by job (reaper and sweeper: "
    "shards; snapshot and prune: 0 or 1)",
    ["job"],
    registry=REGISTRY,
)
LEASE_TAKEOVERS = Counter(
    "tally_lease_takeovers_total",
    "Leases this process took over from an owner that let them lapse (died, paused or "
    "lost Redis), by job",
    ["job"],
    registry=REGISTRY,
)

ACCOUNTS_CLOSED = Counter(
    "tally_accounts_closed_total",
    "Accounts this process's period sweeper closed (period ended or grant expired)",
    registry=REGISTRY,
)

# --- Redis ------------------------------------------------------------------

REDIS_SCRIPT_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0,
)
# unavailable .. readonly: Redis cannot serve now (UNAVAILABLE); no_connection: no
# pooled connection came free in time (RESOURCE_EXHAUSTED); deadline: the caller's
# deadline passed (DEADLINE_EXCEEDED); other: Redis refused the call (INTERNAL).
REDIS_ERROR_KINDS = (
    "unavailable", "oom", "busy", "loading", "readonly", "no_connection", "deadline", "other",
)

REDIS_SCRIPT_DURATION = Histogram(
    "tally_redis_script_duration_seconds",
    "Round trip of one Lua script call (FCALL), by script",
    ["script"],
    buckets=REDIS_SCRIPT_BUCKETS,
    registry=REGISTRY,
)
REDIS_ERRORS = Counter(
    "tally_redis_errors_total",
    "Lua script calls that failed, by kind: unavailable (connection lost, timeout), oom, "
    "busy (a script ran too long), loading, readonly (a replica), no_connection (none came "
    "free in time), deadline (the caller's deadline passed), other",
    ["kind"],
    registry=REGISTRY,
)
for _kind in REDIS_ERROR_KINDS:
    REDIS_ERRORS.labels(kind=_kind)

RUNTIME_INFO = Gauge(
    "tally_runtime_info",
    "What this server runs on (always 1): event loop, Redis reply parser, protobuf backend",
    ["event_loop", "redis_parser", "protobuf"],
    registry=REGISTRY,
)

# --- bounded operation labels -------------------------------------------------

OPERATION_LABELS_MAX = 200
OTHER_OPERATION = "other"
UNKNOWN_OPERATION = "unknown"

_operations_seen: set[str] = set()
_operations_lock = threading.Lock()


def operation_label(operation: str) -> str:
    """The label value for an operation: itself while fewer than
    OPERATION_LABELS_MAX distinct operations have been seen, else "other"."""
    if not operation:
        return UNKNOWN_OPERATION
    if operation in _operations_seen:
        return operation
    with _operations_lock:
        if len(_operations_seen) >= OPERATION_LABELS_MAX:
            return OTHER_OPERATION
        _operations_seen.add(operation)
    return operation


def redis_error(kind: str) -> None:
    """Counts one failed script call; kind is one of REDIS_ERROR_KINDS."""
    REDIS_ERRORS.labels(kind=kind if kind in REDIS_ERROR_KINDS else "other").inc()


def serve(listen: str) -> Any:
    """Starts the /metrics HTTP endpoint in a daemon thread; returns its server
    (call .shutdown() to stop it)."""
    host, _, port = listen.rpartition(":")
    server, _thread = start_http_server(int(port), addr=host, registry=REGISTRY)
    log.info("metrics endpoint listening", extra={"address": listen})
    return server
