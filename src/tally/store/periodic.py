"""A background pass run every interval until stopped (the reaper, the sweeper).

A pass that fails on the store (a TallyError: Redis unreachable...) is logged
and tried again at the next interval; anything else ends `run()` for the
supervisor to restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from abc import ABC, abstractmethod
from typing import ClassVar

from tally.domain.errors import TallyError


class PeriodicPass(ABC):
    NAME: ClassVar[str]  # "reaper": its failures are logged as "reaper pass failed"
    DONE: ClassVar[str]  # what a pass did, as a log message and field ("holds_expired")

    def __init__(self, interval_s: float, log: logging.Logger) -> None:
        self.interval_s = interval_s
        self.log = log
        self._stopping = asyncio.Event()

    @abstractmethod
    async def pass_once(self) -> int:
        """One pass; returns how many things it did (logged when not 0)."""

    async def run(self) -> None:
        while not self._stopping.is_set():
            try:
                done = await self.pass_once()
                if done:
                    self.log.info(self.DONE.replace("_", " "), extra={self.DONE: done})
            except TallyError as error:
                self.log.warning(f"{self.NAME} pass failed", extra={"error": error.message})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.interval_s)

    def stop(self) -> None:
        self._stopping.set()
