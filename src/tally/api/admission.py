"""Admission: a bounded number of calls in flight per server, a bounded wait for a slot.

At most `max_in_flight` calls run at once; a call beyond them waits in turn for
a slot, at most `wait_s` and never past its deadline, and at most `queue_max`
calls wait. A call that cannot be admitted is shed before it touched anything
(RESOURCE_EXHAUSTED, or DEADLINE_EXCEEDED when its deadline passed while it
waited), so a retry with the same idempotency key is always safe. UNAVAILABLE
stays reserved for Redis or the ledger being unreachable.

Only the unary calls of the Tally services are admitted. Health checks and
reflection never wait (a probe must see a busy server as alive), and a
WatchUsage stream is bounded by max_watchers instead (its lifetime is not a
call in flight).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import grpc

from tally import metrics


@dataclass(frozen=True)
class AdmissionLimits:
    max_in_flight: int
    queue_max: int
    wait_s: float


class Shed(Exception):
    """A call refused at admission: its status code, message and metric reason."""

    def __init__(self, code: grpc.StatusCode, message: str, reason: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason


class Admission:
    """The slots of one server. Waiting callers are served first come, first served."""

    def __init__(self, limits: AdmissionLimits) -> None:
        self.limits = limits
        self._slots = asyncio.Semaphore(limits.max_in_flight)
        self.in_flight = 0
        self.waiting = 0

    def _busy(self) -> str:
        return (
            f"server busy: {self.limits.max_in_flight} calls in flight; "
            "retry with the same idempotency key"
        )

    async def enter(self, time_remaining_s: float | None) -> None:
        """Takes a slot, waiting for one if all are taken; raises Shed otherwise.
        Every successful enter is paired with one leave."""
        if not self._slots.locked():
            await self._slots.acquire()  # a free slot: taken without yielding
            self._entered()
            return
        if self.waiting >= self.limits.queue_max:
            raise Shed(grpc.StatusCode.RESOURCE_EXHAUSTED, self._busy(), "queue_full")
        wait_s, deadline_binds = self.limits.wait_s, False
        if time_remaining_s is not None and time_remaining_s < wait_s:
            wait_s, deadline_binds = max(0.0, time_remaining_s), True
        self.waiting += 1
        metrics.RPC_WAITING.inc()
        try:
            async with asyncio.timeout(wait_s):
                await self._slots.acquire()
            self._entered()
        except TimeoutError:
            if deadline_binds:
                raise Shed(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"the call's deadline passed while it waited for a slot ({self._busy()})",
                    "deadline",
                ) from None
            raise Shed(grpc.StatusCode.RESOURCE_EXHAUSTED, self._busy(), "wait_expired") from None
        finally:
            self.waiting -= 1
            metrics.RPC_WAITING.dec()

    def _entered(self) -> None:
        self.in_flight += 1
        metrics.RPC_IN_FLIGHT.inc()

    def leave(self) -> None:
        self.in_flight -= 1
        metrics.RPC_IN_FLIGHT.dec()
        self._slots.release()
