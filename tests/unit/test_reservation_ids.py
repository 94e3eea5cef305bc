"""Reservation ids made by the store before a spend script runs."""

from __future__ import annotations

import pytest

from tally.domain.ids import SEQUENCE
from tally.store.keys import KeySpace
from tally.store.layout import ShardLayout, TagScheme
from tally.store.reservation_ids import EPOCH_MS, RANDOM_BITS, SEQUENCE_LIMIT, ReservationIds


def test_sequences_rise_within_a_millisecond_and_carry_its_time() -> None:
    """Proves one process never makes a sequence twice, even many in one millisecond
    (a batch), and that each carries the milliseconds it was made at."""
    ids = ReservationIds()
    now_ms = EPOCH_MS + 1_000
    made = [ids.next_sequence(now_ms) for _ in range(5000)]
    assert made == sorted(set(made))
    assert made[0] >> RANDOM_BITS == 1_000
    later = ids.next_sequence(now_ms + 10_000)
    assert later >> RANDOM_BITS == 11_000


def test_ids_parse_as_the_key_space_writes_them_up_to_the_last_millisecond() -> None:
    """Proves an id made at the last millisecond of the range still has a sequence of
    at most 16 digits below 2^53 (a Lua number holds it exactly), its account found
    from it; a clock past the range is refused rather than wrapped."""
    space = KeySpace(ShardLayout(16, TagScheme.SLOT_RANGE))
    ids = ReservationIds()
    last_ms = EPOCH_MS + (SEQUENCE_LIMIT >> RANDOM_BITS) - 1
    sequence = ids.next_sequence(last_ms)
    assert sequence < SEQUENCE_LIMIT and SEQUENCE.fullmatch(str(sequence))
    shard = space.shard_of("acct-1")
    rid = ids.reservation_id(space.tag(shard), sequence, "acct-1")
    assert space.parse_reservation_id(rid).account_id == "acct-1"
    with pytest.raises(ValueError):
        ReservationIds().next_sequence(last_ms + 1)
    with pytest.raises(ValueError):
        ReservationIds().next_sequence(EPOCH_MS - 1)
