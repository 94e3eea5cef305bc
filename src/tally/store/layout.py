"""A deployment's shard layout: how many virtual shards, and how their hash tags are written.

Both are facts of the data, not settings: every key of a shard carries its tag, and
every reservation id starts with it (`<tag>.<seq>.<account>`), so a layout never
changes under existing data. Redis (`tally:meta`) and the ledger record it
(tally/deployment.py); this module only says what a layout's tags are.

Two tag schemes:
- SHARD_NUMBER, `s00`..`s15`: every deployment made before the scheme was recorded.
  Its tags land on whatever hash slots CRC16 gives them, so over a Redis Cluster's
  masters the split is uneven (16 tags: 8/4/4 over 3 masters, 4/4/4/3/1 over 5).
- SLOT_RANGE, the default of new deployments: shard i's tag hashes to slot
  i*16384/S, the first of its range [i*16384/S, (i+1)*16384/S). A master holding a
  contiguous slot range holds exactly the shards whose first slot is in it, so masters
  of equal contiguous ranges (what `redis-cli --cluster create` makes) hold equal
  numbers of shards, within one, at any master count when S divides 16384 (a power of
  two, as DEFAULT_SHARDS is; other counts: within two). A tag is the first
  string over TAG_ALPHABET (shortest first, then in alphabet order) with that slot:
  every one of the 16384 slots has one of 1 to 3 characters, no longer than `s07`, so
  the most numerous key (an idempotency record) keeps its 32-byte allocation.
  The order is frozen: changing it would rename every key of a live deployment.
"""

from __future__ import annotations

import binascii
import itertools
from dataclasses import dataclass
from enum import StrEnum
from functools import cache

CLUSTER_SLOTS = 16384
SHARDS_MAX = 4096
# Accounts spread over this many shards in a new deployment (README "Shards": each of
# up to 20 masters at most 6 % above the mean, at about 1,000 idle commands/s).
DEFAULT_SHARDS = 256
# The shard count of a deployment made before layouts were recorded, when neither
# Redis nor the ledger says otherwise (the old --shards default).
UNRECORDED_SHARDS = 16
# Letters and digits: no '{', '}' (hash tags), '.' (reservation ids), ':' (key
# names) or glob characters (SCAN patterns). 62 of them give 242,234 strings of 1 to 3
# characters, which cover all 16384 slots (26 candidates a slot on average).
TAG_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
TAG_LENGTH_MAX = 3


class TagScheme(StrEnum):
    SHARD_NUMBER = "shard-number"
    SLOT_RANGE = "slot-range"


@dataclass(frozen=True)
class ShardLayout:
    shards: int
    scheme: TagScheme

    def __post_init__(self) -> None:
        if not 1 <= self.shards <= SHARDS_MAX:
            raise ValueError(f"shards must be between 1 and {SHARDS_MAX}, got {self.shards}")

    def tags(self) -> tuple[str, ...]:
        if self.scheme is TagScheme.SHARD_NUMBER:
            return shard_number_tags(self.shards)
        return slot_range_tags(self.shards)

    def describe(self) -> str:
        return f"{self.shards} shards, tag scheme {self.scheme.value}"


def tag_slot(tag: str) -> int:
    """The Redis Cluster hash slot of every key carrying `{tag}` (CRC16-XMODEM, as
    the cluster spec and redis.crc.key_slot compute it)."""
    return binascii.crc_hqx(tag.encode(), 0) % CLUSTER_SLOTS


def first_slot(shard: int, shards: int) -> int:
    """The first hash slot of the shard's range, where its SLOT_RANGE tag hashes."""
    return shard * CLUSTER_SLOTS // shards


def shard_number_tags(shards: int) -> tuple[str, ...]:
    width = max(2, len(str(shards - 1)))
    return tuple(f"s{shard:0{width}d}" for shard in range(shards))


def slot_range_tags(shards: int) -> tuple[str, ...]:
    tags = slot_tags()
    return tuple(tags[first_slot(shard, shards)] for shard in range(shards))


@cache
def slot_tags() -> tuple[str, ...]:
    """For every hash slot, the first candidate tag that hashes to it (about 0.2 s,
    once per process)."""
    tags: list[str | None] = [None] * CLUSTER_SLOTS
    missing = CLUSTER_SLOTS
    for candidate in _candidates():
        slot = tag_slot(candidate)
        if tags[slot] is None:
            tags[slot] = candidate
            missing -= 1
            if not missing:
                return tuple(tag for tag in tags if tag is not None)
    raise AssertionError(f"some slot has no tag of {TAG_LENGTH_MAX} characters or fewer")


def _candidates() -> itertools.chain[str]:
    return itertools.chain.from_iterable(
        ("".join(chars) for chars in itertools.product(TAG_ALPHABET, repeat=length))
        for length in range(1, TAG_LENGTH_MAX + 1)
    )
