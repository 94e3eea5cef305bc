"""Operator commands that work on Redis and the ledger directly:
`tally migrate | status | verify | recover` (`tally flusher`: cli/flusher.py).

They take the same settings as `tally serve` (flags and TALLY_* variables).
Without a Redis URL they use the embedded Redis of the data folder: the one a
running `tally serve` started, or one they start for themselves.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

from tally import app, config, logs
from tally.cli.output import table
from tally.clock import SystemClock
from tally.ledger import recovery
from tally.ledger.flusher import Flusher
from tally.ledger.ledger import Ledger
from tally.redaction import redact
from tally.store.embedded import EmbeddedRedis, running_url
from tally.store.quota_store import QuotaStore
from tally.store.state_images import StateImages


@dataclass
class Ops:
    settings: config.Settings
    store: QuotaStore
    ledger: Ledger
    flusher: Flusher
    images: StateImages


def say(line: str) -> None:
    print(redact(line), file=sys.stderr, flush=True)


@asynccontextmanager
async def opened(settings: config.Settings) -> AsyncIterator[Ops]:
    embedded = None
    redis_url = settings.redis_url or running_url(settings.data_path / "redis")
    if not redis_url:
        say(f"starting the embedded Redis under {settings.data_path / 'redis'}")
        embedded = EmbeddedRedis(
            settings.data_path / "redis", settings.redis_appendfsync, settings.redis_server
        )
        redis_url = embedded.start()
    try:
        clock = SystemClock()
        ledger = await app.open_and_migrate(settings, clock)
        store = await app.open_store(settings, redis_url, clock, ledger)
        await store.runner.load()
        flusher = app.build_flusher(settings, store, ledger)
        await flusher.ensure_groups()
        try:
            yield Ops(settings, store, ledger, flusher, StateImages.of(store))
        finally:
            await store.close()
            ledger.close()
    finally:
        if embedded is not None:
            embedded.stop()


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    commands: list[tuple[str, str, Callable[[argparse.Namespace], int]]] = [
        ("migrate", "apply the ledger's schema migrations", run_migrate),
        ("status", "flusher lag per shard, the ledger's state, shards behind the ledger (exit 1)",
         run_status),
        ("verify", "flush, then compare every account in Redis with the ledger", run_verify),
        ("recover", "rebuild Redis from the ledger (accounts missing or behind)", run_recover),
    ]
    for name, help_text, handler in commands:
        parser = subparsers.add_parser(name, help=help_text, description=help_text)
        config.add_arguments(parser)
        parser.add_argument("--json", action="store_true", help="print JSON")
        parser.set_defaults(handler=handler)


def run_ops(args: argparse.Namespace, work: Callable[[Ops], Awaitable[int]]) -> int:
    try:
        settings = config.from_sources(args)
    except ValueError as exc:
        say(f"tally: {exc}")
        return 2
    logs.configure("WARNING", "text")

    async def main() -> int:
        async with opened(settings) as ops:
            return await work(ops)

    try:
        return asyncio.run(main())
    except RuntimeError as exc:
        say(f"tally: {exc}")
        return 1


def run_migrate(args: argparse.Namespace) -> int:
    async def work(ops: Ops) -> int:
        version = await ops.ledger.schema_version()
        print(json.dumps({"schema_version": version}) if args.json
              else f"ledger ({ops.ledger.dialect}) at schema version {version}")
        return 0

    return run_ops(args, work)


def run_status(args: argparse.Namespace) -> int:
    async def work(ops: Ops) -> int:
        lags = await ops.flusher.lag()
        entries = await ops.ledger.count_entries()
        snapshot = await ops.ledger.latest_snapshot()
        waiting = sum(lag.waiting for lag in lags)
        oldest_ms = max((lag.oldest_unflushed_ms for lag in lags), default=0)
        behind = await recovery.shards_behind(ops.images, ops.ledger)
        quarantined = await ops.ledger.count_quarantined()
        if args.json:
            print(json.dumps({
                "ledger": ops.ledger.dialect, "ledger_entries": entries,
                "shards_behind": behind, "quarantined_entries": quarantined,
                "events_waiting": waiting, "oldest_unflushed_ms": oldest_ms,
                "latest_snapshot": None if snapshot is None else {
                    "snapshot_id": snapshot[0], "taken_at_ms": snapshot[1],
                    "accounts": snapshot[2]},
                "shards": [asdict(lag) for lag in lags],
            }))
            return 1 if behind else 0
        print(f"ledger: {ops.ledger.dialect}, {entries} entries")
        print(f"events waiting to be flushed: {waiting} (oldest {oldest_ms / 1000:.1f}s old)")
        if behind:
            listed = ", ".join(ops.store.keys.tag(shard) for shard in behind)
            print(f"shards behind the ledger (Redis lost writes; run tally recover): {listed}")
        if quarantined:
            print(f"stream entries quarantined by recovery (see quarantined_entries): "
                  f"{quarantined}")
        if snapshot is not None:
            taken = datetime.fromtimestamp(snapshot[1] / 1000, UTC).isoformat()
            print(f"latest snapshot: #{snapshot[0]} at {taken}, {snapshot[2]} accounts")
        rows = [[str(lag.shard), str(lag.length), str(lag.pending), str(lag.waiting),
                 f"{lag.oldest_unflushed_ms / 1000:.1f}s"] for lag in lags]
        print(table(["shard", "stream", "pending", "waiting", "oldest"], rows))
        return 1 if behind else 0

    return run_ops(args, work)


def run_verify(args: argparse.Namespace) -> int:
    async def work(ops: Ops) -> int:
        report = await recovery.verify(ops.images, ops.ledger, ops.flusher, say)
        if args.json:
            print(json.dumps({"accounts": report.accounts,
                              "differences": [asdict(d) for d in report.differences]}))
        elif report.differences:
            rows = [[d.account_id, d.what, d.redis, d.ledger] for d in report.differences]
            print(table(["account", "what", "redis", "ledger"], rows))
            print(f"{len(report.differences)} differences in {report.accounts} accounts")
        else:
            print(f"verified {report.accounts} accounts: Redis and the ledger agree")
        return 1 if report.differences else 0

    return run_ops(args, work)


def run_recover(args: argparse.Namespace) -> int:
    async def work(ops: Ops) -> int:
        result = await recovery.recover(
            ops.images, ops.ledger, ops.store.clock.now_ms(), say,
            ops.store.limits.reservation_retention_ms,
        )
        await ops.store.sync_catalog(load_defaults=False)
        if args.json:
            print(json.dumps(asdict(result)))
        return 0

    return run_ops(args, work)


