"""The retry rule both clients follow.

One logical call sends the same request (so the same idempotency key) on every
attempt. Only UNAVAILABLE is retried, with capped exponential backoff and "equal
jitter"; DEADLINE_EXCEEDED and every other status surface at once. The call's
deadline bounds everything: attempts, backoff, and the last attempt's own
timeout, so a retry never runs past it.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import grpc

from tally_client.errors import FailedCall, TallyRpcError

# Below this, an attempt cannot reach the server and answer: give up instead,
# raising what the last attempt got.
MIN_ATTEMPT_S = 0.02


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 5
    backoff_initial_s: float = 0.05
    backoff_max_s: float = 2.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if not 0 < self.backoff_initial_s <= self.backoff_max_s:
            raise ValueError("backoff needs 0 < backoff_initial_s <= backoff_max_s")

    def backoff_s(self, retry: int) -> float:
        """The pause before retry number `retry` (0 first): half fixed, half random."""
        ceiling = min(self.backoff_max_s, self.backoff_initial_s * (1 << retry))
        return ceiling / 2 + random.uniform(0, ceiling / 2)

    def pause_before_retry(
        self, code: grpc.StatusCode, attempt: int, now: float, deadline: float
    ) -> float | None:
        """How long to wait before the next attempt after attempt `attempt` (1 first)
        failed with `code`; None: give up and raise."""
        if code != grpc.StatusCode.UNAVAILABLE or attempt >= self.max_attempts:
            return None
        pause = self.backoff_s(attempt - 1)
        if now + pause + MIN_ATTEMPT_S >= deadline:
            return None
        return pause


class CallAttempts:
    """The attempts of one logical call under the policy and the call's deadline:
    what each attempt may take, and what follows a failed one. Both clients' loops
    are this and their own way to wait."""

    def __init__(self, policy: RetryPolicy, timeout_s: float) -> None:
        self.policy = policy
        self.deadline = time.monotonic() + check_timeout(timeout_s)
        self.attempts = 0
        self._failed: FailedCall | None = None

    def next_timeout_s(self) -> float:
        """The next attempt's timeout: what is left of the deadline. When a pause
        left too little for an attempt, the last failure is raised instead."""
        remaining = self.deadline - time.monotonic()
        if self._failed is not None and remaining < MIN_ATTEMPT_S:
            raise TallyRpcError.from_call(self._failed) from None
        self.attempts += 1
        return remaining

    def pause_after(self, failed: FailedCall) -> float:
        """The pause before retrying after `failed`; raises it (as a TallyRpcError)
        when it is not to be retried."""
        pause = self.policy.pause_before_retry(
            failed.code(), self.attempts, time.monotonic(), self.deadline
        )
        if pause is None:
            raise TallyRpcError.from_call(failed) from None
        self._failed = failed
        return pause


def check_timeout(timeout_s: float) -> float:
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be more than 0, got {timeout_s}")
    return timeout_s
