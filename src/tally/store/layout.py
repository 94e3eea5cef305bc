"""A deployment's shard layout: how many virtual shards, and how their hash tags are written.

Both are facts of the data, not settings: every key of a shard carries its tag, and
every reservation id starts with it (`<tag>.<seq>.<account>`), so a layout never
changes under existing data. Redis (`tally:meta`) and the ledger record it
(tally/deployment.py); this module only says what a layout's tags are.

Two tag schemes:
- SHARD_NUMBER, `s00`..`s15`: every deployment made before the scheme was recorded.
  Its tags land on whatever hash slots CRC16 gives them, so over a Redis Cluster's
  masters the split is uneven (16 tags over 3 masters: 3 to 8 shards each is common).
- SLOT_RANGE, the default of new deployments: shard i's tag hashes into slot range
  [i*16384/S, (i+1)*16384/S), so masters holding equal contiguous slot ranges (what
  `redis-cli --cluster create` makes) hold equal numbers of shards, within one. A tag
  is the first string over TAG_ALPHABET (shortest first, then in alphabet order) whose
  slot lands in the shard's range: 1 to 3 characters for every count up to 4096 (all
  checked), no longer than
  `s07`, so the most numerous key (an idempotency record) keeps its 32-byte allocation.
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
# Accounts spread over this many shards in a new deployment (README "Shards": 256
# spreads evenly over up to ~64 masters at a bounded idle cost per pass).
DEFAULT_SHARDS = 256
# The shard count of a deployment made before layouts were recorded, when neither
# Redis nor the ledger says otherwise (the old --shards default).
UNRECORDED_SHARDS = 16
# Lowercase letters and digits: no '{', '}' (hash tags), '.' (reservation ids), ':'
# (key names) or glob characters (SCAN patterns).
TAG_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz"
# Longest SLOT_RANGE tag tried; 4 characters leave 1.7 million candidates for at most
# 4096 ranges (SHARDS_MAX needs 12,462 candidates, all of 3 characters or fewer).
TAG_LENGTH_MAX = 4


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


def slot_range(shard: int, shards: int) -> range:
    """The hash slots shard `shard` of `shards` owns under SLOT_RANGE."""
    return range(shard * CLUSTER_SLOTS // shards, (shard + 1) * CLUSTER_SLOTS // shards)


def shard_number_tags(shards: int) -> tuple[str, ...]:
    width = max(2, len(str(shards - 1)))
    return tuple(f"s{shard:0{width}d}" for shard in range(shards))


@cache
def slot_range_tags(shards: int) -> tuple[str, ...]:
    tags: list[str | None] = [None] * shards
    missing = shards
    for candidate in _candidates():
        shard = tag_slot(candidate) * shards // CLUSTER_SLOTS
        if tags[shard] is None:
            tags[shard] = candidate
            missing -= 1
            if not missing:
                return tuple(tag for tag in tags if tag is not None)
    raise AssertionError(f"no tag of {TAG_LENGTH_MAX} characters for some of {shards} shards")


def _candidates() -> itertools.chain[str]:
    return itertools.chain.from_iterable(
        ("".join(chars) for chars in itertools.product(TAG_ALPHABET, repeat=length))
        for length in range(1, TAG_LENGTH_MAX + 1)
    )
