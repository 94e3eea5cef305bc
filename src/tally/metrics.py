"""Prometheus metrics. Labels are low-cardinality only: never an account id."""

from __future__ import annotations

import logging
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

log = logging.getLogger("tally.metrics")

REGISTRY = CollectorRegistry(auto_describe=True)

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


def serve(listen: str) -> Any:
    """Starts the /metrics HTTP endpoint in a daemon thread; returns its server
    (call .shutdown() to stop it)."""
    host, _, port = listen.rpartition(":")
    server, _thread = start_http_server(int(port), addr=host, registry=REGISTRY)
    log.info("metrics endpoint listening", extra={"address": listen})
    return server
