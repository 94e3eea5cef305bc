"""Closed reservations past the closed window, served from the ledger.

A closed reservation leaves Redis `closed_reservation_window` after its last
change. A later Commit (a replay), Refund or Extend of it gets HoldNotInStore
from its script; `call` then brings the ledger's image back into Redis
(restore_hold.lua: atomically, only if it is still not there, only within
reservation_retention) and runs the call again, which answers as it would
have with the record in Redis all along.

The ledger's image is the reservation's newest only if the ledger has every
event that could have changed it. A record leaves Redis a closed window after
its last change, so that change occurred before now - window. The ledger has
it when it has every event of the account (its newest is the account's
event_seq in Redis), or when its newest event of the account occurred after
now - window (an account's events reach the ledger in order; the window is
never shorter than the flusher's interval plus its take-over delay).
Otherwise the account's shard is flushed first (the money-in barrier); if the
ledger still lacks the change the call is UNAVAILABLE (retry): a reservation
the ledger does not know yet is never answered NOT_FOUND; one it cannot know
(every event flushed, no image) is.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

from tally.domain.errors import NotFound, Unavailable
from tally.ledger.backend import ReservationImage
from tally.ledger.durability import MoneyInBarrier
from tally.ledger.ledger import Ledger
from tally.store.contract import RestoreHoldRequest
from tally.store.failures import HoldNotInStore
from tally.store.quota_store import QuotaStore
from tally.store.state_images import unpack_image

R = TypeVar("R")


class ClosedReservations:
    def __init__(self, store: QuotaStore, ledger: Ledger, barrier: MoneyInBarrier) -> None:
        self.store = store
        self.ledger = ledger
        self.barrier = barrier

    async def call(
        self,
        reservation_id: str,
        run: Callable[[], Awaitable[R]],
        remaining_s: Callable[[], float | None],
    ) -> R:
        """run() (a script call naming the reservation), again after bringing the
        reservation back from the ledger if it is no longer in Redis. remaining_s:
        the caller's deadline left, the Redis timeout of the restore."""
        try:
            return await run()
        except HoldNotInStore as miss:
            await self._restore(reservation_id, miss.event_seq, remaining_s())
        try:
            return await run()
        except HoldNotInStore as miss:
            # it left again at once: a closed window shorter than this round trip
            raise Unavailable(f"reservation {reservation_id} left Redis again; retry") from miss

    async def _restore(self, reservation_id: str, event_seq: int, timeout_s: float | None) -> None:
        account_id = self.store.keys.parse_reservation_id(reservation_id).account_id
        known = await self.ledger.reservation_image(reservation_id, account_id)
        if not self._has_every_change(known, event_seq):
            await self.barrier.settle_account(account_id)
            known = await self.ledger.reservation_image(reservation_id, account_id)
        if not self._has_every_change(known, event_seq):
            raise Unavailable(
                f"reservation {reservation_id} is not in Redis and the ledger does not have "
                "its latest change yet; retry"
            )
        if known.state is None:
            raise NotFound(f"reservation {reservation_id} not found", field_name="reservation_id")
        image = unpack_image(known.state)
        await self.store.restore_hold(
            RestoreHoldRequest(reservation_id=reservation_id, image=image), timeout_s
        )

    def _has_every_change(self, known: ReservationImage, event_seq: int) -> bool:
        if known.account_seq >= event_seq:
            return True
        left_before_ms = self.store.clock.now_ms() - self.store.limits.closed_reservation_window_ms
        return known.account_seq_at_ms > left_before_ms
