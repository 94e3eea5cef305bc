"""Reservation ids, made by the store before the script runs: the new record's
key must be one the script declares (Redis Cluster and the proxies in front of
managed Redis route and check a script by its declared keys).

An id is `<shard tag>.<sequence>.<account id>` (keys.RESERVATION_ID). The
sequence is below 2^53, so that a Lua number holds it exactly (the scripts
rebuild ids from it) and domain/ids.SEQUENCE's 16 digits take it: the
milliseconds since EPOCH_MS times 2^RANDOM_BITS, plus RANDOM_BITS random bits,
and above the last one this process made, so one process never makes one twice
(a batch makes many in one millisecond). Two processes make the same one only
in the same millisecond, with one chance in 2^RANDOM_BITS, or when their clocks
stand still (a test's manual clock) and both count up from close starts; the
script refuses an id already taken, and the store tries a new one after a
random leap (leap()), which puts this process out of step with the other.
"""

from __future__ import annotations

import secrets

from tally.store.keys import RESERVATION_ID

# 2024-01-01T00:00:00Z: 2^41 ms from it last until 2093.
EPOCH_MS = 1_704_067_200_000
RANDOM_BITS = 12
SEQUENCE_LIMIT = 2**53


class ReservationIds:
    def __init__(self) -> None:
        self._last = 0

    def next_sequence(self, now_ms: int) -> int:
        """A sequence above the last one made, from now_ms and random bits."""
        elapsed_ms = now_ms - EPOCH_MS
        if not 0 <= elapsed_ms < SEQUENCE_LIMIT >> RANDOM_BITS:
            raise ValueError(f"clock {now_ms} ms is outside the reservation ids' range")
        drawn = (elapsed_ms << RANDOM_BITS) | secrets.randbits(RANDOM_BITS)
        sequence = max(drawn, self._last + 1)
        if sequence >= SEQUENCE_LIMIT:
            raise ValueError("reservation ids ran past their range")
        self._last = sequence
        return sequence

    def leap(self) -> None:
        """Moves the next sequence a random distance ahead (below one millisecond's
        worth), away from another process's."""
        self._last += 1 + secrets.randbelow(1 << RANDOM_BITS)

    @staticmethod
    def reservation_id(tag: str, sequence: int, account_id: str) -> str:
        return RESERVATION_ID.format(tag=tag, sequence=sequence, account_id=account_id)
