"""Supervised background tasks: the server's reaper and flusher.

A task that ends with an unexpected exception is logged with its traceback,
counted in `tally_background_restarts_total{task}` and started again after a
backoff that doubles from BACKOFF_MIN_S to BACKOFF_MAX_S. A run that lasts
`stable_after_s` counts as up: the backoff starts over and the failures in a
row are forgotten.

A task cannot stay up when it has failed `failures_max` times in a row
(no run in between lasting `stable_after_s`). While any task cannot stay up
the server answers NOT_SERVING to health checks; once the task has run for
`stable_after_s` again, SERVING.

A task that returns is done (its `stop()` was called): it is never restarted,
and neither is one that fails after `Supervisor.stop`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from tally import metrics

log = logging.getLogger("tally.supervisor")

BACKOFF_MIN_S = 0.5
BACKOFF_MAX_S = 30.0


class BackgroundTask(Protocol):
    """What the supervisor runs: `run()` until `stop()`; `run()` may be called again
    after it raised."""

    async def run(self) -> None: ...

    def stop(self) -> None: ...


@dataclass(frozen=True)
class RestartPolicy:
    failures_max: int
    stable_after_s: float
    backoff_min_s: float = BACKOFF_MIN_S
    backoff_max_s: float = BACKOFF_MAX_S

    def __post_init__(self) -> None:
        bounded = self.failures_max >= 1 and self.stable_after_s > 0
        if not bounded or not 0 < self.backoff_min_s <= self.backoff_max_s:
            raise ValueError(f"invalid restart policy {self}")  # a programmer error

    def backoff_s(self, failures: int) -> float:
        """The wait before restarting a task that has failed `failures` times in a row."""
        doublings = min(failures - 1, 64)  # bounded: no float overflow however long it fails
        return min(self.backoff_max_s, self.backoff_min_s * 2.0**doublings)


HealthCallback = Callable[[bool], Awaitable[None]]


class Supervisor:
    """Runs named background tasks, restarts failed ones, reports health through
    `set_serving(serving)`. Uptime is measured on the event loop's monotonic
    clock: it schedules work, it is not the business clock tests move."""

    def __init__(self, policy: RestartPolicy, set_serving: HealthCallback) -> None:
        self.policy = policy
        self._set_serving = set_serving
        self._tasks: dict[str, BackgroundTask] = {}
        self._supervisors: list[asyncio.Task[None]] = []
        self._down: set[str] = set()
        self._health_lock = asyncio.Lock()
        self._stopping = asyncio.Event()

    def start(self, name: str, task: BackgroundTask) -> None:
        if name in self._tasks:
            raise ValueError(f"background task {name!r} is already supervised")
        self._tasks[name] = task
        metrics.BACKGROUND_RESTARTS.labels(task=name)
        self._supervisors.append(asyncio.create_task(self._supervise(name, task)))

    def cannot_stay_up(self) -> frozenset[str]:
        """The tasks that failed failures_max times in a row and have not recovered."""
        return frozenset(self._down)

    async def stop(self) -> None:
        """Asks every task to stop; from now on nothing is restarted and health is
        left to the caller (a health change already under way completes first)."""
        self._stopping.set()
        for task in self._tasks.values():
            task.stop()
        async with self._health_lock:
            pass

    async def wait(self) -> None:
        """Until every task has ended (after `stop`)."""
        await asyncio.gather(*self._supervisors)

    async def _supervise(self, name: str, task: BackgroundTask) -> None:
        failures = 0  # in a row: none of the runs in between stayed up stable_after_s
        while True:
            stayed_up, error = await self._run_once(name, task)
            if stayed_up:
                failures = 0
            if error is None:
                log.info("background task ended", extra={"task": name})
                return
            failures += 1
            if self._stopping.is_set():
                log.error("background task failed while stopping; not restarted",
                          exc_info=error, extra={"task": name})
                return
            delay_s = self.policy.backoff_s(failures)
            log.error(
                "background task failed; restarting",
                exc_info=error,
                extra={"task": name, "failures_in_a_row": failures, "restart_in_s": delay_s},
            )
            if failures >= self.policy.failures_max:
                await self._mark(name, down=True)
            if await self._stopped_within(delay_s):
                return
            metrics.BACKGROUND_RESTARTS.labels(task=name).inc()

    async def _run_once(
        self, name: str, task: BackgroundTask
    ) -> tuple[bool, BaseException | None]:
        """Runs the task until it ends. Returns whether it stayed up stable_after_s
        and what it raised (None: it returned)."""
        up = metrics.BACKGROUND_TASK_UP.labels(task=name)
        runner = asyncio.create_task(task.run(), name=f"tally-{name}")
        up.set(1)
        try:
            done, _ = await asyncio.wait({runner}, timeout=self.policy.stable_after_s)
            stayed_up = not done
            if stayed_up:
                await self._mark(name, down=False)
                await asyncio.wait({runner})
        finally:
            up.set(0)
            if not runner.done():  # the supervisor itself is being cancelled
                runner.cancel()
        return stayed_up, runner.exception()

    async def _stopped_within(self, delay_s: float) -> bool:
        try:
            await asyncio.wait_for(self._stopping.wait(), delay_s)
        except TimeoutError:
            return False
        return True

    async def _mark(self, name: str, *, down: bool) -> None:
        """Records whether a task can stay up; health follows when every task's
        state together changes it (never after stop: shutdown owns health then)."""
        async with self._health_lock:
            if down == (name in self._down):
                return
            serving_before = not self._down
            if down:
                self._down.add(name)
                log.error("background task cannot stay up",
                          extra={"task": name, "failures_max": self.policy.failures_max})
            else:
                self._down.discard(name)
                log.warning("background task up again", extra={"task": name})
            serving = not self._down
            if serving != serving_before and not self._stopping.is_set():
                log.warning("health changed by background tasks",
                            extra={"serving": serving, "down": sorted(self._down)})
                await self._set_serving(serving)
