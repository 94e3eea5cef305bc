"""The primary of `tally serve --workers N` (N > 1).

It does what must happen once per authority: the embedded Redis (when no URL is
set), migrations, scripts, recovery at start, the bootstrap token and token
restore (app.open_core), then runs the background work once: flusher, reaper,
period sweeper and its own fence watch. It takes no calls itself: N workers do
(workers/worker.py), all bound to the listen port with SO_REUSEPORT, the kernel
spreading connections over them. Keeping the primary off the request path keeps
the flusher's ledger writes from slowing the calls of one worker in N, and lets a
worker crash without taking the background work down.

Order: workers start once the primary is ready; the primary logs "serving" and
tells the workers SERVING (health) once every worker serves. SIGTERM/SIGINT: every
worker drains its calls, then the background work stops, the ledger is flushed and
a snapshot written, then Redis stops.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from tally import metrics
from tally.app import (
    BackgroundWork,
    Core,
    auth_required,
    background_supervisor,
    background_work,
    final_flush,
    open_core,
    restart_policy,
)
from tally.clock import SystemClock
from tally.config import Settings
from tally.supervisor import Supervisor
from tally.workers.pool import WorkerPool

log = logging.getLogger("tally.primary")


def reserve_port(listen: str) -> tuple[str, socket.socket]:
    """Binds (never listens on) the listen address with SO_REUSEPORT, for the primary's
    life: port 0 becomes one port every worker shares, and no process outside the
    group takes the port while workers restart. The kernel hands connections to
    listening sockets only."""
    host, _, port = listen.rpartition(":")
    bare = host.strip("[]")
    family = socket.AF_INET6 if ":" in bare else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((bare, int(port)))
    except OSError as exc:
        sock.close()
        raise RuntimeError(f"could not listen on {listen}: {exc.strerror}") from exc
    return f"{host}:{sock.getsockname()[1]}", sock


def worker_metrics_listen(metrics_listen: str, index: int) -> str:
    """Worker i's /metrics endpoint: the primary's port + i (port 0: any free port)."""
    if not metrics_listen:
        return ""
    host, _, port = metrics_listen.rpartition(":")
    return f"{host}:{int(port) + index if int(port) else 0}"


def worker_settings(settings: Settings, core: Core, listen: str, required: bool) -> Callable[
    [int], Settings
]:
    def of(index: int) -> Settings:
        return dataclasses.replace(
            settings,
            listen=listen,
            redis_url=core.redis_url,
            metrics_listen=worker_metrics_listen(settings.metrics_listen, index),
            auth="required" if required else "off",  # decided (and warned about) once, here
            bootstrap_token_file="",
            recover_on_start=False,
        )

    return of


class PrimaryHealth:
    """The primary's health, told to every worker: its background tasks can stay up,
    no shard is fenced, and every worker has started (`ready`)."""

    def __init__(self, pool: WorkerPool) -> None:
        self.pool = pool
        self._tasks_up = True
        self._fenced = False
        self._ready = False

    async def tasks(self, up: bool) -> None:
        self._tasks_up = up
        await self._publish()

    async def fences(self, fenced: bool) -> None:
        self._fenced = fenced
        await self._publish()

    async def ready(self) -> None:
        self._ready = True
        await self._publish()

    async def _publish(self) -> None:
        await self.pool.publish(self._ready and self._tasks_up and not self._fenced)


async def serve_until_signalled(
    settings: Settings, on_ready: Callable[[str, Core], Awaitable[None]] | None = None
) -> None:
    required = auth_required(settings)
    listen, reservation = reserve_port(settings.listen)
    try:
        core = await open_core(settings, SystemClock())
    except BaseException:
        reservation.close()
        raise
    pool = WorkerPool(
        settings.workers, worker_settings(settings, core, listen, required),
        restart_policy(settings),
    )
    health = PrimaryHealth(pool)
    core.store.fences.on_fenced = health.fences
    background = background_supervisor(settings, health.tasks)
    metrics_server: Any = None
    work: BackgroundWork | None = None
    try:
        if settings.metrics_listen:
            metrics_server = metrics.serve(settings.metrics_listen)
        work = await background_work(settings, core)
        work.start(settings, core, background)
        await pool.start()
        await health.ready()
        log.info("serving", extra={
            "address": listen, "workers": settings.workers, "worker_pids": pool.pids,
            "shards": core.store.keys.shards, "redis": "embedded" if core.embedded else "external",
            "ledger": core.ledger.dialect})
        if on_ready is not None:
            await on_ready(listen, core)
        await until_signalled()
    finally:
        await stop(settings, core, pool, background, work)
        if metrics_server is not None:
            metrics_server.shutdown()
            metrics_server.server_close()
        reservation.close()


async def until_signalled() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def stop(
    settings: Settings, core: Core, pool: WorkerPool, background: Supervisor,
    work: BackgroundWork | None,
) -> None:
    """Workers first (their calls drain, their events are in Redis), then the
    background work, then one last flush of everything and a snapshot (when this
    process flushes), then its leases are given back."""
    log.info("shutting down", extra={"grace_s": settings.shutdown_grace})
    await pool.stop(settings.shutdown_grace)
    await background.stop()
    await background.wait()
    if settings.flusher:
        await final_flush(core.flusher)
    if work is not None:
        await work.leases.release()
    await core.close()
    log.info("stopped")
