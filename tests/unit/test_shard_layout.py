"""The shard layout: SLOT_RANGE tags (each in its shard's slot range, so contiguous equal
slot ranges hold equal shard counts), the old SHARD_NUMBER tags unchanged, and the choice
of a layout from what Redis and the ledger record (tally/deployment.py)."""

from __future__ import annotations

import hashlib

import pytest
from redis.crc import key_slot

from tally.deployment import LayoutRefused, choose, facts_of, layout_of
from tally.store.keys import IDEMPOTENCY_KEY, SHARD_PREFIX, KeySpace
from tally.store.layout import (
    CLUSTER_SLOTS,
    DEFAULT_SHARDS,
    SHARDS_MAX,
    TAG_ALPHABET,
    ShardLayout,
    TagScheme,
    first_slot,
    slot_tags,
    tag_slot,
)
from tests.integration.test_keyslots import keyslot

COUNTS = (1, 2, 3, 16, 100, 256, 1000, 1024, SHARDS_MAX)
MASTERS = (3, 4, 5, 7)


def cluster_create_ranges(masters: int) -> list[range]:
    """The slot ranges `redis-cli --cluster create` gives `masters` masters (redis-cli.c,
    clusterManagerCommandCreate: equal float shares, each end rounded)."""
    per_master = CLUSTER_SLOTS / masters
    ranges, first, cursor = [], 0, 0.0
    for index in range(masters):
        last = int(cursor + per_master - 1 + 0.5)  # lround
        if last > CLUSTER_SLOTS or index == masters - 1:
            last = CLUSTER_SLOTS - 1
        ranges.append(range(first, last + 1))
        first, cursor = last + 1, cursor + per_master
    return ranges


def shards_per_master(tags: tuple[str, ...], masters: int) -> list[int]:
    ranges = cluster_create_ranges(masters)
    return [sum(tag_slot(tag) in slots for tag in tags) for slots in ranges]


@pytest.mark.parametrize("shards", COUNTS)
def test_every_slot_range_tag_hashes_into_its_shards_slot_range(shards: int) -> None:
    """Proves shard i's tag hashes to i*16384/S, the first slot of its range
    [i*16384/S, (i+1)*16384/S), as Redis computes slots (redis-py's key_slot and the
    cluster spec's CRC16 of tests/integration/test_keyslots), and that tags are
    distinct, 1 to 3 characters of the alphabet."""
    tags = ShardLayout(shards, TagScheme.SLOT_RANGE).tags()
    assert len(tags) == shards and len(set(tags)) == shards
    for shard, tag in enumerate(tags):
        slot = key_slot(SHARD_PREFIX.format(tag=tag).encode() + b"events")
        assert slot == keyslot(f"tally:{{{tag}}}:acct:x".encode()) == tag_slot(tag)
        assert slot == first_slot(shard, shards)
        assert slot in range(first_slot(shard, shards), (shard + 1) * CLUSTER_SLOTS // shards)
        assert 1 <= len(tag) <= 3 and set(tag) <= set(TAG_ALPHABET)


@pytest.mark.parametrize("masters", MASTERS)
@pytest.mark.parametrize("shards", [16, DEFAULT_SHARDS, 1024, SHARDS_MAX])
def test_slot_range_tags_spread_evenly_over_masters_of_equal_contiguous_ranges(
    shards: int, masters: int
) -> None:
    """Proves every master of a cluster of 3, 4, 5 or 7 masters made by redis-cli --cluster
    create holds S/masters shards, rounded down or up: the counts differ by one at most."""
    counts = shards_per_master(ShardLayout(shards, TagScheme.SLOT_RANGE).tags(), masters)
    assert sum(counts) == shards
    assert max(counts) - min(counts) <= 1
    assert min(counts) == shards // masters


def test_the_old_tags_spread_unevenly_which_is_what_slot_range_tags_fix() -> None:
    """Proves the point of the scheme on the figures the README quotes: the 16 `sNN` tags
    over 3 masters split 8/4/4 (one master carries half the shards) and over 5 masters
    4/4/4/3/1; the slot-range tags split 6/5/5 and 4/3/3/3/3."""
    old = ShardLayout(16, TagScheme.SHARD_NUMBER).tags()
    new = ShardLayout(16, TagScheme.SLOT_RANGE).tags()
    assert shards_per_master(old, 3) == [8, 4, 4]
    assert shards_per_master(old, 5) == [4, 4, 4, 3, 1]
    assert shards_per_master(new, 3) == [6, 5, 5]
    assert shards_per_master(new, 5) == [4, 3, 3, 3, 3]


def test_every_hash_slot_has_a_tag_of_3_characters_at_most() -> None:
    """Proves the alphabet covers all 16384 slots with tags of 1 to 3 characters, each the
    first candidate (shortest, then alphabet order) with its slot: any count has tags."""
    tags = slot_tags()
    assert [tag_slot(tag) for tag in tags] == list(range(CLUSTER_SLOTS))
    assert max(len(tag) for tag in tags) == 3
    assert tags[tag_slot("0")] == "0"


def test_slot_range_tags_are_frozen() -> None:
    """Proves the tags of the default layout (and of the largest) are the ones every
    deployment made so far holds: a change to the alphabet or the order would rename
    every key and reservation id of a live deployment."""
    default = ShardLayout(DEFAULT_SHARDS, TagScheme.SLOT_RANGE).tags()
    assert default[:8] == ("06S", "5n3", "53t", "2KV", "0QO", "69L", "4DI", "2hB")
    digest = hashlib.sha256(",".join(default).encode()).hexdigest()[:16]
    largest = ShardLayout(SHARDS_MAX, TagScheme.SLOT_RANGE).tags()
    assert (digest, largest[:4]) == ("62f503dbae508ad8", ("06S", "4gY", "0QG", "4DE"))


def test_shard_number_tags_are_the_old_ones() -> None:
    """Proves the layout of deployments made before schemes were recorded is unchanged:
    `s00`..`s15` at 16 shards, wider past 100 shards."""
    assert ShardLayout(16, TagScheme.SHARD_NUMBER).tags() == tuple(f"s{i:02d}" for i in range(16))
    assert ShardLayout(101, TagScheme.SHARD_NUMBER).tags()[100] == "s100"


def test_an_idempotency_record_name_keeps_its_32_byte_allocation() -> None:
    """Proves every idempotency record name of a SLOT_RANGE layout is at most 28 bytes
    (keys.py: the most Redis keeps in a 32-byte allocation), as long as the old `s07` ones."""
    space = KeySpace(ShardLayout(SHARDS_MAX, TagScheme.SLOT_RANGE))
    longest = max(len(space.prefix(shard)) for shard in range(SHARDS_MAX))
    assert len(IDEMPOTENCY_KEY.format(prefix="x" * longest, digest="d" * 14)) <= 28


def test_reservation_ids_name_their_slot_range_shard() -> None:
    """Proves a reservation id made with a SLOT_RANGE tag is parsed back to its shard, and
    one with another deployment's tag is refused."""
    space = KeySpace(ShardLayout(DEFAULT_SHARDS, TagScheme.SLOT_RANGE))
    shard = space.shard_of("acct-1")
    ref = space.parse_reservation_id(f"{space.tag(shard)}.12.acct-1")
    assert (ref.shard, ref.account_id) == (shard, "acct-1")
    with pytest.raises(Exception, match="does not belong"):
        space.parse_reservation_id(f"s{shard % 16:02d}.12.acct-1")


@pytest.mark.parametrize("shards", [0, SHARDS_MAX + 1])
def test_a_layout_outside_1_to_4096_shards_is_refused(shards: int) -> None:
    with pytest.raises(ValueError, match="shards must be between 1 and 4096"):
        ShardLayout(shards, TagScheme.SLOT_RANGE)


# --- what the facts say, and which layout a start takes ------------------------------

OLD_16 = ShardLayout(16, TagScheme.SHARD_NUMBER)
NEW = ShardLayout(DEFAULT_SHARDS, TagScheme.SLOT_RANGE)


def test_facts_without_a_scheme_are_the_old_tags() -> None:
    """Proves a `tally:meta` written before schemes were recorded (`shards` alone) reads as
    SHARD_NUMBER, no facts as no layout, and facts round-trip."""
    assert layout_of({"shards": "16"}) == OLD_16
    assert layout_of({}) is None
    assert layout_of(facts_of(NEW)) == NEW


@pytest.mark.parametrize(
    ("requested", "in_redis", "in_ledger", "has_entries", "chosen"),
    [
        (0, None, None, False, NEW),  # a new deployment
        (32, None, None, False, ShardLayout(32, TagScheme.SLOT_RANGE)),
        (0, OLD_16, None, True, OLD_16),  # an upgraded deployment: Redis says
        (16, OLD_16, None, True, OLD_16),
        (0, None, None, True, OLD_16),  # upgraded, its Redis wiped: the old default
        (24, None, None, True, ShardLayout(24, TagScheme.SHARD_NUMBER)),
        (0, None, NEW, True, NEW),  # a wiped Redis: the ledger says
        (0, NEW, NEW, True, NEW),
        (0, NEW, None, False, NEW),  # a new ledger under a recorded Redis
    ],
)
def test_a_start_takes_the_recorded_layout_else_the_old_or_the_new_default(
    requested: int, in_redis: ShardLayout | None, in_ledger: ShardLayout | None,
    has_entries: bool, chosen: ShardLayout,
) -> None:
    assert choose(requested, in_redis, in_ledger, has_entries) == chosen


def test_a_shard_count_other_than_the_recorded_one_is_refused() -> None:
    """Proves --shards different from the recorded count is refused naming both, from
    Redis's record and from the ledger's."""
    for in_redis, in_ledger in ((OLD_16, None), (None, NEW), (NEW, NEW)):
        recorded = in_ledger or in_redis
        assert recorded is not None
        with pytest.raises(LayoutRefused, match=f"laid out in {recorded.shards} shards") as no:
            choose(8, in_redis, in_ledger, True)
        assert "--shards 8 would lose it" in str(no.value)


def test_redis_and_the_ledger_recording_different_layouts_is_refused() -> None:
    with pytest.raises(LayoutRefused, match="another deployment"):
        choose(0, OLD_16, NEW, True)
