"""A worker: one serving process of `tally serve --workers N` (python -m tally.workers.worker).

It runs the request path only: the gRPC server on the shared port (SO_REUSEPORT),
its admission, token cache and connection pools, and its fence watch (the floors
and health of this process; it reads Redis and the ledger, writes nothing). The
once-only work (flusher, reaper, sweeper, recovery, migrations, tokens at start)
belongs to the primary. What the request path needs from the ledger works here as
in a single server: the money-in barrier and closed-reservation reads flush or read
the ledger from this process (several flushers are safe: the ledger ignores
duplicates).

It stops, draining calls in flight, on SIGTERM/SIGINT and when the primary is gone:
PR_SET_PDEATHSIG turns the primary's death into a SIGTERM, and the end of its stdin
(the primary's pipe) says the same should the signal be missed.
"""

from __future__ import annotations

import asyncio
import ctypes
import io
import logging
import os
import signal
import sys

from tally import logs, metrics, runtime
from tally.api.server import Serving
from tally.app import (
    attach_core,
    background_supervisor,
    fence_watch_of,
    start_request_path,
)
from tally.clock import SystemClock
from tally.redaction import redact
from tally.workers.handoff import HANDOFF_BYTES_MAX, READY, WorkerLaunch, parse_serving

log = logging.getLogger("tally.worker")

PR_SET_PDEATHSIG = 1


def die_with_primary(primary_pid: int) -> bool:
    """Asks the kernel for SIGTERM when the primary dies; False if it is gone already
    (it died before the request took effect)."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    return os.getppid() == primary_pid


async def follow_primary(serving: Serving, stop: asyncio.Event) -> None:
    """Applies the primary's health lines; its pipe's end stops this worker."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=HANDOFF_BYTES_MAX)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        up = parse_serving(line)
        if up is not None:
            await serving.primary(up)
    log.warning("the primary is gone; stopping")
    stop.set()


async def serve(launch: WorkerLaunch) -> None:
    settings = launch.settings
    core = await attach_core(settings, SystemClock())
    try:
        path = await start_request_path(settings, core, settings.auth == "required")
    except BaseException:
        await core.close()
        raise
    serving = Serving(path.health, primary_up=False)  # NOT_SERVING until the primary says
    await serving.fences(bool(core.store.fences.fenced))
    core.store.fences.on_fenced = serving.fences
    background = background_supervisor(settings, serving.tasks)
    background.start("fence_watch", fence_watch_of(settings, core))
    metrics_server = metrics.serve(settings.metrics_listen) if settings.metrics_listen else None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    primary = asyncio.create_task(follow_primary(serving, stop))
    backends = runtime.backends()
    metrics.RUNTIME_INFO.labels(**backends).set(1)
    log.info("worker serving", extra={"port": path.port, **backends})
    sys.stdout.buffer.write(READY)
    sys.stdout.buffer.flush()
    await stop.wait()
    log.info("worker stopping", extra={"grace_s": settings.shutdown_grace})
    await background.stop()
    await serving.close()
    path.watch.stop()
    await path.server.stop(settings.shutdown_grace)
    await background.wait()
    primary.cancel()
    await core.close()
    if metrics_server is not None:
        metrics_server.shutdown()
        metrics_server.server_close()
    log.info("worker stopped")


def main() -> int:
    # unbuffered: nothing past the handoff line is read here, the pipe reader gets it all
    launch = WorkerLaunch.decode(
        io.FileIO(sys.stdin.fileno(), closefd=False).readline(HANDOFF_BYTES_MAX)
    )
    settings = launch.settings
    logs.configure(settings.log_level, settings.log_format, {"worker": launch.index})
    if not die_with_primary(launch.primary_pid):
        log.error("the primary is gone before this worker started")
        return 1
    try:
        with asyncio.Runner(loop_factory=runtime.loop_factory(settings.event_loop)) as runner:
            runner.run(serve(launch))
    except RuntimeError as exc:
        print(f"tally worker {launch.index}: {redact(str(exc))}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
