"""Assembles a running authority from settings, and takes it apart again.

Everything that must be closed on shutdown is created here, in one place:
the embedded Redis (when no URL is set), the Redis pool, the ledger, the
gRPC server, the reaper and the flusher.

Any number of processes may start against one Redis and one ledger: the
once-only start-up work runs under the `startup` lease (store/leases.py), one
process at a time, and ledger migrations under the ledger's own lock; the
background work is shared out by leases (README, "Many servers").
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import grpc
from grpc_health.v1 import health

from tally import deployment, metrics, runtime
from tally.addresses import is_loopback
from tally.api.admission import Admission, AdmissionLimits
from tally.api.server import Serving, build_server
from tally.api.transport import server_transport
from tally.api.validation import HoldTtlLimits
from tally.api.watch import UsageWatch
from tally.auth.authenticator import Authenticator
from tally.auth.book import TokenBook
from tally.clock import Clock, SystemClock
from tally.config import Settings
from tally.ledger import recovery
from tally.ledger.backend import Retention, open_ledger
from tally.ledger.durability import MoneyInBarrier
from tally.ledger.flusher import Flusher, FlusherLeases, FlusherSettings
from tally.ledger.ledger import Ledger
from tally.store.client import ScriptRunner, connect
from tally.store.cluster import is_cluster_url, replicas_every_master_has
from tally.store.embedded import EmbeddedRedis
from tally.store.fence_watch import FenceWatch, raise_floors_from
from tally.store.keys import KeySpace
from tally.store.layout import ShardLayout
from tally.store.leases import (
    PRUNE,
    REAPER,
    SNAPSHOT,
    STARTUP,
    SWEEPER,
    GlobalLease,
    Lease,
    LeaseCalls,
    LeaseKeeper,
    LeaseSettings,
    ShardLeases,
    exclusive,
    owner_id,
)
from tally.store.quota_store import QuotaStore, StoreLimits
from tally.store.reaper import Reaper
from tally.store.script_pipeline import ReplicaWait
from tally.store.state_images import StateImages
from tally.store.streams import EventStreams
from tally.store.sweeper import PeriodSweeper
from tally.store.token_store import TokenStore
from tally.supervisor import HealthCallback, RestartPolicy, Supervisor

log = logging.getLogger("tally.app")


def auth_required(settings: Settings) -> bool:
    """--auth, else required beyond loopback; off beyond loopback is refused."""
    loopback = is_loopback(settings.listen)
    if settings.auth == "off" and not loopback:
        raise RuntimeError(
            f"refusing to listen on {settings.listen} with --auth off: beyond loopback "
            "every call must show a token. Drop --auth off, or listen on 127.0.0.1."
        )
    required = settings.auth == "required" or (not settings.auth and not loopback)
    if not required:
        log.warning(
            "authentication is off: every caller that reaches %s is an admin of every "
            "account (set --auth required to ask for tokens)", settings.listen,
        )
    return required


def ttl_limits(settings: Settings) -> HoldTtlLimits:
    return HoldTtlLimits(
        default_ms=round(settings.hold_ttl_default * 1000),
        min_ms=round(settings.hold_ttl_min * 1000),
        max_ms=round(settings.hold_ttl_max * 1000),
    )


def build_admission(settings: Settings) -> Admission:
    return Admission(
        AdmissionLimits(
            max_in_flight=settings.max_in_flight,
            queue_max=settings.admission_queue,
            wait_s=settings.admission_wait,
        )
    )


def redis_client(settings: Settings, redis_url: str) -> Any:
    """A single Redis's pool queues callers for its --redis-max-connections; redis-py's
    cluster client cannot queue (a node with every connection in use refuses at once),
    so each node's pool also has room for every call admission lets in at once."""
    max_connections = settings.redis_max_connections
    if is_cluster_url(redis_url):
        max_connections += settings.max_in_flight
    return connect(
        redis_url, socket_timeout_s=settings.redis_timeout, max_connections=max_connections
    )


def build_store(
    settings: Settings, redis_url: str, clock: Clock, layout: ShardLayout
) -> QuotaStore:
    return store_on(settings, redis_client(settings, redis_url), clock, layout)


async def open_store(
    settings: Settings, redis_url: str, clock: Clock, ledger: Ledger
) -> QuotaStore:
    """The store, in the layout Redis and the ledger record (tally/deployment.py), after
    the checks of check_deployment; the layout is recorded in both from here on."""
    redis = redis_client(settings, redis_url)
    try:
        layout = await deployment.settle(redis, ledger, settings.shards)
        store = store_on(settings, redis, clock, layout)
        await settle_replica_wait(settings, store)
        await store.check_deployment()
        await deployment.record_in_ledger(ledger, layout)
    except BaseException:
        await redis.aclose()
        raise
    return store


def store_on(settings: Settings, redis: Any, clock: Clock, layout: ShardLayout) -> QuotaStore:
    limits = StoreLimits(
        idempotency_window_ms=round(settings.idempotency_window * 1000),
        reservation_retention_ms=round(settings.reservation_retention * 1000),
        quote_validity_ms=round(settings.quote_validity * 1000),
        closed_reservation_window_ms=round(settings.closed_window_s * 1000),
    )
    runner = ScriptRunner(
        redis, pipelined=settings.redis_pipeline, window_s=settings.redis_pipeline_window
    )
    return QuotaStore(runner, KeySpace(layout), clock, limits)


async def settle_replica_wait(settings: Settings, store: QuotaStore) -> None:
    """How many replicas must have a write before it is acknowledged: the setting,
    or with `auto` one on a cluster whose every master has a replica (a failover
    then loses nothing acknowledged), none elsewhere."""
    replicas = settings.redis_wait_replicas
    if replicas is None:
        replicas = await replicas_every_master_has(store.redis)
        replicas = min(replicas, 1)
    if replicas:
        store.runner.wait_for_replicas(
            ReplicaWait(replicas, round(settings.redis_wait_timeout * 1000))
        )
    setting = "auto" if settings.redis_wait_replicas is None else settings.redis_wait_replicas
    log.info("replica wait", extra={"replicas": replicas, "setting": setting})


def lease_settings(settings: Settings) -> LeaseSettings:
    return LeaseSettings(ttl_s=settings.lease_ttl)


def flusher_leases(settings: Settings, calls: LeaseCalls) -> FlusherLeases:
    leases = lease_settings(settings)
    return FlusherLeases(
        snapshot=GlobalLease(calls, SNAPSHOT, leases), prune=GlobalLease(calls, PRUNE, leases)
    )


def build_flusher(
    settings: Settings, store: QuotaStore, ledger: Ledger, leases: FlusherLeases | None = None
) -> Flusher:
    return Flusher(
        EventStreams.of(store),
        ledger,
        FlusherSettings(
            interval_s=settings.flush_interval,
            batch=settings.flush_batch,
            claim_idle_ms=round(settings.flush_claim_idle * 1000),
            snapshot_interval_s=settings.snapshot_interval,
            stream_retention_ms=round(settings.stream_retention * 1000),
            retention=Retention(
                snapshots_kept=settings.snapshots_kept,
                reservation_retention_ms=round(settings.reservation_retention * 1000),
                batch_rows=settings.ledger_prune_batch,
            ),
        ),
        fences=store.fences,
        leases=leases,
    )


async def open_and_migrate(settings: Settings, clock: Clock) -> Ledger:
    ledger = Ledger(open_ledger(settings.ledger_location), clock)
    applied = await ledger.migrate()
    if applied:
        log.info("ledger migrated", extra={"versions": applied, "ledger": ledger.dialect})
    return ledger


async def ensure_current(
    store: QuotaStore, ledger: Ledger, recover_on_start: bool
) -> None:
    """Refuses to serve from a Redis that is empty or behind the ledger (accounts,
    catalog or shard fences); then takes the ledger's fences as the floors."""
    images = StateImages.of(store)
    stale = await recovery.stale_accounts(images, ledger)
    prices_in_ledger = await ledger.catalog_prices()
    catalog_lost = bool(prices_in_ledger) and not await images.has_catalog()
    fenced = await recovery.shards_behind(images, ledger)
    if stale or catalog_lost or fenced:
        await _recover_on_start(
            store, ledger, images, recover_on_start,
            f"{len(stale)} accounts, e.g. {', '.join(stale[:3]) or '-'}; "
            f"catalog lost: {catalog_lost}; shards behind: {len(fenced)}",
        )
    await raise_floors_from(ledger, store.fences)


async def _recover_on_start(
    store: QuotaStore, ledger: Ledger, images: StateImages, recover_on_start: bool, what: str
) -> None:
    if not recover_on_start:
        raise RuntimeError(
            f"Redis is empty or behind the ledger ({what}). Run `tally recover`, or start "
            "with --recover-on-start, rather than serve wrong balances."
        )
    result = await recovery.recover(
        images, ledger, store.clock.now_ms(),
        lambda line: log.warning("recovery", extra={"progress": line}),
        store.limits.reservation_retention_ms,
    )
    log.warning("recovered Redis from the ledger", extra={"accounts": result.accounts})


@dataclass
class Authority:
    """A started authority: what tests and `tally serve` hold on to."""

    settings: Settings
    store: QuotaStore
    ledger: Ledger
    flusher: Flusher
    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    reaper: Reaper
    sweeper: PeriodSweeper
    fence_watch: FenceWatch
    leases: LeaseKeeper
    watch: UsageWatch
    background: Supervisor
    admission: Admission
    serving: Serving
    embedded: EmbeddedRedis | None = None
    metrics_server: Any = None
    backends: dict[str, str] = dataclasses.field(default_factory=dict)  # tally.runtime

    @property
    def address(self) -> str:
        return f"{self.settings.listen.rpartition(':')[0]}:{self.port}"

    async def stop(self, grace_s: float | None = None) -> None:
        """Stops taking calls, drains the ones in flight, flushes the ledger,
        writes a snapshot, then closes the store."""
        grace = self.settings.shutdown_grace if grace_s is None else grace_s
        log.info("shutting down", extra={"grace_s": grace})
        await self.background.stop()  # first: no restart, no health change from now on
        await self.serving.close()
        # open watches end at once (clients resume elsewhere) rather than hold the grace
        self.watch.stop()
        await self.server.stop(grace)
        await self.background.wait()
        if self.settings.flusher:
            await final_flush(self.flusher)
        await self.leases.release()
        await self.store.close()
        self.ledger.close()
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
            self.metrics_server.server_close()
        if self.embedded is not None:
            self.embedded.stop()
        log.info("stopped")


async def final_flush(flusher: Flusher) -> None:
    """Everything in the streams to the ledger, and a snapshot when this process
    writes the fleet's snapshots; a failure leaves the events for the next flusher."""
    try:
        flushed = await flusher.flush_all(steal=True)
        if flusher.snapshots_here():
            await flusher.snapshot("shutdown")
        log.info("ledger flushed", extra={"events": flushed})
    except Exception:
        log.exception("final flush failed; the events stay in Redis for the next flusher")


@dataclass
class Core:
    """What every process of an authority holds: the store, the ledger and what reads
    and writes both (the flusher: the primary's runs; every process's settles money in)."""

    store: QuotaStore
    ledger: Ledger
    flusher: Flusher
    book: TokenBook
    redis_url: str
    lease_calls: LeaseCalls
    embedded: EmbeddedRedis | None = None

    async def close(self) -> None:
        await self.store.close()
        self.ledger.close()
        if self.embedded is not None:
            self.embedded.stop()


async def open_core(settings: Settings, clock: Clock) -> Core:
    """The start-up work of an authority (a single server, or the primary of several
    workers): the embedded Redis, migrations, scripts, then, one starting process of
    a fleet at a time (the `startup` lease): recovery, the bootstrap token and token
    restore, the flusher's groups, the catalog."""
    embedded = None
    redis_url = settings.redis_url
    if not redis_url:
        embedded = EmbeddedRedis(
            settings.data_path / "redis", settings.redis_appendfsync, settings.redis_server
        )
        redis_url = embedded.start()
    ledger: Ledger | None = None
    store: QuotaStore | None = None
    try:
        ledger = await open_and_migrate(settings, clock)
        store = await open_store(settings, redis_url, clock, ledger)
        await store.runner.load()
        calls = LeaseCalls(store.runner, owner_id())
        async with exclusive(calls, STARTUP, lease_settings(settings), settings.startup_wait):
            book, flusher = await start_up_once(settings, store, ledger, calls)
    except BaseException:
        if store is not None:
            await store.close()
        if ledger is not None:
            ledger.close()
        if embedded is not None:
            embedded.stop()
        raise
    return Core(store, ledger, flusher, book, redis_url, calls, embedded)


async def start_up_once(
    settings: Settings, store: QuotaStore, ledger: Ledger, calls: LeaseCalls
) -> tuple[TokenBook, Flusher]:
    """What two processes starting at once must not do at the same time (run under
    the startup lease); each step finds the work done when another process did it."""
    await ensure_current(store, ledger, settings.recover_on_start)
    book = TokenBook(ledger, TokenStore(store.redis), store.clock)
    if settings.bootstrap_token_file:
        bootstrap = await book.bootstrap(Path(settings.bootstrap_token_file))
        log.info("bootstrap token in place", extra={"token_id": bootstrap.token_id,
                                                   "revoked": bool(bootstrap.revoked_at)})
    restored = await book.restore()
    if restored:
        log.warning("restored token records from the ledger", extra={"tokens": restored})
    flusher = build_flusher(settings, store, ledger, flusher_leases(settings, calls))
    await flusher.ensure_groups()
    await store.sync_catalog(load_defaults=settings.default_catalog)
    await flusher.flush_through(0)  # the default catalog is money-in too
    return book, flusher


async def attach_core(settings: Settings, clock: Clock) -> Core:
    """A worker's core: the store and ledger the primary has prepared (open_core), with
    none of its once-only work. The ledger's fences are its floors from the start."""
    ledger = Ledger(open_ledger(settings.ledger_location), clock)
    try:
        store = await open_store(settings, settings.redis_url, clock, ledger)
    except BaseException:
        ledger.close()
        raise
    try:
        await store.runner.load()  # idempotent; spares the first calls a "function not found"
        await raise_floors_from(ledger, store.fences)
    except BaseException:
        await store.close()
        ledger.close()
        raise
    book = TokenBook(ledger, TokenStore(store.redis), clock)
    calls = LeaseCalls(store.runner, owner_id())
    return Core(store, ledger, build_flusher(settings, store, ledger), book, settings.redis_url,
                calls)


@dataclass
class RequestPath:
    """The gRPC server and what serves calls beside it, per serving process."""

    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    watch: UsageWatch
    admission: Admission


async def start_request_path(settings: Settings, core: Core, required: bool) -> RequestPath:
    """Builds and starts the server (a bound port: calls are taken from here on)."""
    store, ledger, flusher = core.store, core.ledger, core.flusher
    authenticator = (
        Authenticator(TokenStore(store.redis), store.clock, settings.token_cache_ttl)
        if required else None
    )
    watch = UsageWatch(
        flusher.streams, ledger, max_watchers=settings.max_watchers,
        max_watchers_per_principal=settings.max_watchers_per_principal,
    )
    admission = build_admission(settings)
    server, port, health_servicer = build_server(
        store, ttl_limits(settings), settings.listen, MoneyInBarrier(flusher), ledger, watch,
        admission, server_transport(settings), authenticator, core.book,
    )
    await server.start()
    return RequestPath(server, port, health_servicer, watch, admission)


def fence_watch_of(settings: Settings, core: Core) -> FenceWatch:
    return FenceWatch(
        core.store.fences, core.ledger, StateImages.of(core.store), settings.fence_check_interval
    )


def restart_policy(settings: Settings) -> RestartPolicy:
    """Background tasks' and worker processes' restarts alike."""
    return RestartPolicy(
        failures_max=settings.background_failures_max,
        stable_after_s=settings.background_stable_after,
    )


def background_supervisor(settings: Settings, set_serving: HealthCallback) -> Supervisor:
    return Supervisor(restart_policy(settings), set_serving)


@dataclass
class BackgroundWork:
    """A serving authority's background work, shared out over the fleet by leases."""

    leases: LeaseKeeper
    reaper: Reaper
    sweeper: PeriodSweeper
    fence_watch: FenceWatch

    def start(self, settings: Settings, core: Core, supervisor: Supervisor) -> None:
        supervisor.start("leases", self.leases)
        supervisor.start("reaper", self.reaper)
        supervisor.start("sweeper", self.sweeper)
        supervisor.start("fence_watch", self.fence_watch)
        if settings.flusher:
            supervisor.start("flusher", core.flusher)


async def background_work(settings: Settings, core: Core) -> BackgroundWork:
    """The reaper, sweeper and fence watch, and the leases they (and the flusher's
    snapshots and pruning, when this process flushes) work under, taken once before
    anything starts: a lone process holds every lease from its first pass."""
    store, leases = core.store, lease_settings(settings)
    reaping = ShardLeases(core.lease_calls, store.keys, REAPER, leases)
    sweeping = ShardLeases(core.lease_calls, store.keys, SWEEPER, leases)
    held: list[Lease] = [reaping, sweeping]
    if settings.flusher and core.flusher.leases is not None:
        held += [core.flusher.leases.snapshot, core.flusher.leases.prune]
    keeper = LeaseKeeper(held, leases)
    await keeper.refresh()
    return BackgroundWork(
        keeper,
        Reaper(store, settings.reaper_interval, settings.reaper_batch, reaping),
        PeriodSweeper(store, settings.period_sweep_interval, settings.period_sweep_batch,
                      sweeping),
        fence_watch_of(settings, core),
    )


async def start(settings: Settings, clock: Clock | None = None) -> Authority:
    required = auth_required(settings)
    core = await open_core(settings, clock or SystemClock())
    store, ledger, flusher = core.store, core.ledger, core.flusher
    try:
        work = await background_work(settings, core)
        path = await start_request_path(settings, core, required)
    except BaseException:
        await core.close()
        raise
    serving = Serving(path.health)
    await serving.fences(bool(store.fences.fenced))
    store.fences.on_fenced = serving.fences
    background = background_supervisor(settings, serving.tasks)
    authority = Authority(
        settings, store, ledger, flusher, path.server, path.port, path.health, work.reaper,
        work.sweeper, work.fence_watch, work.leases, path.watch, background, path.admission,
        serving, core.embedded,
    )
    if settings.metrics_listen:
        authority.metrics_server = metrics.serve(settings.metrics_listen)
    work.start(settings, core, background)
    authority.backends = runtime.backends()
    metrics.RUNTIME_INFO.labels(**authority.backends).set(1)
    log.info(
        "serving",
        extra={"address": authority.address, "shards": store.keys.shards,
               "redis": "embedded" if core.embedded else "external", "ledger": ledger.dialect,
               **authority.backends},
    )
    return authority


class Stoppable(Protocol):
    async def stop(self) -> None: ...


Started = TypeVar("Started", bound=Stoppable)


async def until_signalled(
    started: Started, on_ready: Callable[[Started], Awaitable[None]] | None = None
) -> None:
    """Runs what was started until SIGTERM or SIGINT, then stops it gracefully."""
    if on_ready is not None:
        await on_ready(started)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await started.stop()


async def serve_until_signalled(
    settings: Settings, on_ready: Callable[[Authority], Awaitable[None]] | None = None
) -> None:
    await until_signalled(await start(settings), on_ready)
