"""The primary's worker processes: started, watched, restarted, drained.

Each worker is `python -m tally.workers.worker` in its own session (Ctrl-C in a
terminal reaches the primary alone, which then drains the workers in order). A
worker that exits unasked is logged, counted in tally_worker_restarts_total and
started again after a backoff that doubles from the restart policy's minimum to its
maximum; a worker that ran `stable_after_s` starts the backoff over.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

from tally import metrics
from tally.config import Settings
from tally.supervisor import RestartPolicy
from tally.workers.handoff import READY, WorkerLaunch, serving_line

log = logging.getLogger("tally.workers")

# From spawn to `ready`: a Python start, imports, Redis and ledger connections.
READY_TIMEOUT_S = 60.0
# How long past the shutdown grace a worker may take to exit before it is killed.
STOP_MARGIN_S = 5.0


@dataclass
class Slot:
    index: int
    process: asyncio.subprocess.Process | None = None
    started_at: float = 0.0
    serving: bool = False
    watcher: asyncio.Task[None] | None = field(default=None, repr=False)


class WorkerPool:
    def __init__(
        self, count: int, settings_of: Callable[[int], Settings], policy: RestartPolicy
    ) -> None:
        self.policy = policy
        self._settings_of = settings_of
        self._slots = [Slot(index) for index in range(1, count + 1)]
        self._serving = False
        self._stopping = False
        self._stopped = asyncio.Event()

    @property
    def pids(self) -> list[int]:
        return [slot.process.pid for slot in self._slots if slot.process is not None]

    async def start(self) -> None:
        """Starts every worker and returns once each serves; raises RuntimeError (after
        stopping the others) if one does not."""
        started = await asyncio.gather(*(self._launch(slot) for slot in self._slots))
        if not all(started):
            await self.stop(grace_s=0)
            raise RuntimeError("a worker did not start serving (see its log lines above)")
        for slot in self._slots:
            slot.watcher = asyncio.create_task(self._watch(slot), name=f"worker-{slot.index}")

    async def publish(self, serving: bool) -> None:
        """Tells every worker the primary's health (and each one started later)."""
        self._serving = serving
        for slot in self._slots:
            await self._tell(slot, serving)

    async def stop(self, grace_s: float) -> None:
        """SIGTERM to every worker (each drains its calls within grace_s), then waits;
        one still running STOP_MARGIN_S after the grace is killed."""
        self._stopping = True
        self._stopped.set()
        for slot in self._slots:
            if slot.process is not None and slot.process.returncode is None:
                slot.process.send_signal(signal.SIGTERM)
        exits = [slot.process.wait() for slot in self._slots if slot.process is not None]
        try:
            await asyncio.wait_for(asyncio.gather(*exits), grace_s + STOP_MARGIN_S)
        except TimeoutError:
            for slot in self._slots:
                if slot.process is not None and slot.process.returncode is None:
                    log.error("worker did not stop in time; killing it",
                              extra={"worker": slot.index, "pid": slot.process.pid})
                    slot.process.kill()
                    await slot.process.wait()
        watchers = [slot.watcher for slot in self._slots if slot.watcher is not None]
        await asyncio.gather(*watchers)
        for slot in self._slots:
            self._set_serving(slot, False)

    async def _launch(self, slot: Slot) -> bool:
        """Starts the slot's worker; True once it serves. A worker that fails to is
        killed (its exit is then seen by the watcher)."""
        launch = WorkerLaunch(self._settings_of(slot.index), slot.index, os.getpid())
        slot.started_at = asyncio.get_running_loop().time()
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "tally.workers.worker",
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                start_new_session=True,
            )
        except OSError as exc:  # no process (fork failed): the watcher tries again later
            log.error("could not start a worker", extra={"worker": slot.index, "error": str(exc)})
            return False
        slot.process = process
        assert process.stdin is not None and process.stdout is not None
        try:
            process.stdin.write(launch.encode())
            await process.stdin.drain()
            line = await asyncio.wait_for(process.stdout.readline(), READY_TIMEOUT_S)
        except (TimeoutError, ConnectionError) as exc:
            line = b""
            log.error("worker did not report ready", extra={"worker": slot.index,
                                                            "error": repr(exc)})
        if line != READY:
            if process.returncode is None:
                process.kill()
            return False
        if self._stopping:  # stop() began while it started: it must not outlive the pool
            process.send_signal(signal.SIGTERM)
            return False
        self._set_serving(slot, True)
        log.info("worker started", extra={"worker": slot.index, "pid": process.pid})
        await self._tell(slot, self._serving)
        return True

    async def _tell(self, slot: Slot, serving: bool) -> None:
        process = slot.process
        if process is None or process.returncode is not None or process.stdin is None:
            return
        with contextlib.suppress(ConnectionError):  # it exited: its watcher restarts it
            process.stdin.write(serving_line(serving))
            await process.stdin.drain()

    async def _watch(self, slot: Slot) -> None:
        failures = 0  # in a row: none of the runs in between lasted stable_after_s
        loop = asyncio.get_running_loop()
        while slot.process is not None:
            code = await slot.process.wait()
            if self._stopping:
                return
            self._set_serving(slot, False)
            stayed_up = loop.time() - slot.started_at >= self.policy.stable_after_s
            failures = 1 if stayed_up else failures + 1
            delay_s = self.policy.backoff_s(failures)
            log.error("worker exited; restarting", extra={
                "worker": slot.index, "pid": slot.process.pid, "exit_code": code,
                "failures_in_a_row": failures, "restart_in_s": delay_s})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopped.wait(), delay_s)
            if self._stopping:
                return
            metrics.WORKER_RESTARTS.labels(worker=str(slot.index)).inc()
            await self._launch(slot)  # one that fails to serve is killed: the loop sees it

    def _set_serving(self, slot: Slot, serving: bool) -> None:
        slot.serving = serving
        metrics.WORKERS_SERVING.set(sum(s.serving for s in self._slots))
