"""`tally flusher`: run a standalone flusher until SIGTERM or Ctrl-C."""

from __future__ import annotations

import argparse
import sys

from tally import config, standalone_flusher
from tally.cli.daemon import run_daemon

# The settings a flusher reads; the rest keep their TALLY_* values or defaults.
FLUSHER_SETTINGS = (
    "redis_url", "ledger_url", "shards", "flush_interval", "flush_batch", "flush_claim_idle",
    "snapshot_interval", "snapshots_kept", "ledger_prune_batch", "stream_retention",
    "reservation_retention", "lease_ttl", "redis_timeout", "redis_max_connections",
    "background_failures_max", "background_stable_after", "metrics_listen",
    "metrics_allow_remote", "event_loop", "log_level", "log_format",
)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "flusher",
        help="run a standalone flusher (streams -> ledger) for a fleet of servers",
        description="Move the fleet's events from Redis to the ledger, and write its "
        "snapshots and prune the ledger while this process holds their leases. Needs "
        "--redis-url and --ledger-url. Every flag also reads a TALLY_* variable.",
    )
    config.add_arguments(parser, FLUSHER_SETTINGS)
    parser.set_defaults(handler=run)


async def _announce(running: standalone_flusher.StandaloneFlusher) -> None:
    print(f"tally: flushing to the {running.ledger.dialect} ledger as "
          f"{running.flusher.consumer}. Stop with Ctrl-C (a last flush runs first).",
          file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    return run_daemon(
        "flusher", args,
        lambda settings: standalone_flusher.run_until_signalled(settings, on_ready=_announce),
    )
