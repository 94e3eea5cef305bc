"""What both hold context managers share: the Reserve they send, the quantity to
commit, and the rhythm of the heartbeat that keeps a long job's hold alive."""

from __future__ import annotations

import logging

from tally_client.v1 import quota_pb2

log = logging.getLogger("tally_client")

# Extend every third of the hold's lifetime: two beats may fail (a retry, a
# restarting server) before the hold expires.
BEATS_PER_LIFETIME = 3


class HoldState:
    """One reservation for the length of a `with` block: reserved on enter,
    committed on normal exit (the whole quantity, or what `deliver()` set),
    released on an exception, which is then re-raised."""

    def __init__(
        self, request: quota_pb2.ReserveRequest, heartbeat: bool, timeout_s: float | None
    ) -> None:
        # Sent on enter (and on each retry); its key also names the release on failure.
        self.request = request
        self.heartbeat = heartbeat
        # The deadline of each of the hold's calls (None: the client's).
        self.timeout_s = timeout_s
        self._delivered: int | None = None
        self.reservation: quota_pb2.ReserveResponse | None = None
        self.committed: quota_pb2.CommitResponse | None = None
        self.released: quota_pb2.RefundResponse | None = None
        # Why the heartbeat stopped early: the hold may be gone (Commit will say).
        self.heartbeat_error: Exception | None = None

    def entering(self) -> None:
        """A hold is one reservation: entered once (again would replay the first
        Reserve, already committed, and charge the second job nothing)."""
        if self.reservation is not None:
            raise RuntimeError("a hold is entered once: call hold() for each job")

    def _reserved(self) -> quota_pb2.ReserveResponse:
        if self.reservation is None:
            raise RuntimeError("the hold is not reserved yet (use it with `with`)")
        return self.reservation

    @property
    def reservation_id(self) -> str:
        return self._reserved().reservation_id

    @property
    def units(self) -> int:
        """Units held."""
        return self._reserved().units

    def deliver(self, quantity: int) -> None:
        """Commits `quantity` (at most what was reserved) instead of the whole."""
        reserved = self.request.quantity or 1  # 0 asks for the default, 1
        if not 0 <= quantity <= reserved:
            raise ValueError(f"deliver() takes 0..{reserved}, got {quantity}")
        self._delivered = quantity

    def lifetime_s(self) -> float:
        """The hold's lifetime: the Reserve's ttl, or the server's default (its
        expiry minus the server clock of the reply)."""
        if self.request.HasField("ttl"):
            return self.request.ttl.ToMilliseconds() / 1000
        reservation = self._reserved()
        granted_ms = (
            reservation.expires_at.ToMilliseconds() - reservation.balance.as_of.ToMilliseconds()
        )
        return max(granted_ms / 1000, 1.0)

    def beat_interval_s(self) -> float:
        return self.lifetime_s() / BEATS_PER_LIFETIME

    def beat_timeout_s(self) -> float:
        """A beat's Extend may take no longer than the hold has left: past that,
        extending is moot."""
        return self.lifetime_s() - self.beat_interval_s()

    def extended(self, reply: quota_pb2.ExtendResponse) -> None:
        reservation = self._reserved()
        reservation.expires_at.CopyFrom(reply.expires_at)
        reservation.balance.CopyFrom(reply.balance)

    def beat_failed(self, error: Exception) -> None:
        self.heartbeat_error = error
        log.warning(
            "tally: the heartbeat of hold %s stopped: %s", self.reservation_id, error
        )

    def release_reason(self, exc_type: type[BaseException] | None) -> str:
        return f"released: the work failed ({exc_type.__name__ if exc_type else '?'})"
