"""`tally flusher`: a process that only flushes, for a fleet of servers.

It reads the shard streams through the consumer group `ledger` beside any number
of other flushers (servers' own, or more of these: the ledger ignores events it
already has), and writes the fleet's balance snapshots and prunes the ledger only
while it holds the `snapshot` and `prune` leases (store/leases.py). It migrates
the ledger (under the ledger's lock) and creates the consumer groups when they are
missing, so it may start before, after or beside the servers; it runs no scripts
but the lease scripts, and no recovery (a server's start-up does that).

SIGTERM or SIGINT: the pass in progress ends, one last flush takes everything the
streams hold (pending entries of other flushers too: safe, writes are idempotent),
a snapshot is written if this process holds that lease, and the leases are given
back for another flusher to take at once.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from tally import app, metrics
from tally.clock import Clock, SystemClock
from tally.config import Settings
from tally.ledger.flusher import Flusher
from tally.ledger.ledger import Ledger
from tally.store.leases import LeaseCalls, LeaseKeeper, owner_id
from tally.store.quota_store import QuotaStore
from tally.supervisor import Supervisor

log = logging.getLogger("tally.flusher")


@dataclass
class StandaloneFlusher:
    settings: Settings
    store: QuotaStore
    ledger: Ledger
    flusher: Flusher
    leases: LeaseKeeper
    background: Supervisor
    metrics_server: Any = None

    async def stop(self) -> None:
        log.info("shutting down")
        await self.background.stop()
        await self.background.wait()
        await app.final_flush(self.flusher)
        await self.leases.release()
        await self.store.close()
        self.ledger.close()
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
            self.metrics_server.server_close()
        log.info("stopped")


async def _report_health(up: bool) -> None:
    if not up:
        log.error("the flusher cannot stay up; it is retried with backoff")


async def start(settings: Settings, clock: Clock | None = None) -> StandaloneFlusher:
    if not settings.redis_url or not settings.ledger_url:
        raise RuntimeError(
            "tally flusher needs the fleet's Redis and ledger: set --redis-url "
            "(TALLY_REDIS_URL) and --ledger-url (TALLY_LEDGER_URL)"
        )
    ledger = await app.open_and_migrate(settings, clock or SystemClock())
    try:
        store = await app.open_store(settings, settings.redis_url, ledger.clock, ledger)
    except BaseException:
        ledger.close()
        raise
    try:
        await store.runner.load()
        leases = app.flusher_leases(settings, LeaseCalls(store.runner, owner_id()))
        flusher = app.build_flusher(settings, store, ledger, leases)
        await flusher.ensure_groups()
        keeper = LeaseKeeper([leases.snapshot, leases.prune], app.lease_settings(settings))
        await keeper.refresh()
    except BaseException:
        await store.close()
        ledger.close()
        raise
    background = Supervisor(app.restart_policy(settings), _report_health)
    running = StandaloneFlusher(settings, store, ledger, flusher, keeper, background)
    if settings.metrics_listen:
        running.metrics_server = metrics.serve(settings.metrics_listen)
    background.start("leases", keeper)
    background.start("flusher", flusher)
    log.info("flushing", extra={"consumer": flusher.consumer, "shards": store.keys.shards,
                                "ledger": ledger.dialect})
    return running


async def run_until_signalled(
    settings: Settings, on_ready: Callable[[StandaloneFlusher], Awaitable[None]] | None = None
) -> None:
    await app.until_signalled(await start(settings), on_ready)
