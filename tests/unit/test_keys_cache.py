"""KeySpace keeps the shard and keys of the accounts it was last asked about,
up to ACCOUNTS_CACHED; past the bound it starts over, and answers never change."""

from __future__ import annotations

import zlib

import pytest

from tally.store import keys as keys_module
from tally.store.keys import KeySpace
from tally.store.layout import ShardLayout, TagScheme


def expected(space: KeySpace, account_id: str) -> tuple[int, list[str]]:
    shard = zlib.crc32(account_id.encode()) % space.shards
    prefix = f"tally:{{s{shard:02d}}}:"
    return shard, [f"{prefix}acct:{account_id}", f"{prefix}holds:{account_id}",
                   f"{prefix}expiries", f"{prefix}events", f"{prefix}closings", f"{prefix}fence",
                   f"{prefix}usage:{account_id}:0", f"{prefix}usage:{account_id}:1",
                   f"{prefix}held:{account_id}"]


def test_keys_are_the_same_from_the_cache_and_past_its_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(keys_module, "ACCOUNTS_CACHED", 3)
    space = KeySpace(ShardLayout(16, TagScheme.SHARD_NUMBER))
    accounts = [f"acct-{i}" for i in range(7)]
    for _ in range(2):  # first formatted, then (partly) from the cache
        for account_id in accounts:
            shard, names = expected(space, account_id)
            assert space.account_keys(account_id) == names
            assert space.shard_of(account_id) == shard
            assert space.prefix(shard) == names[2].removesuffix("expiries")
    assert len(space._accounts) <= 3


def test_a_caller_changing_its_list_does_not_change_the_cache() -> None:
    space = KeySpace(ShardLayout(4, TagScheme.SHARD_NUMBER))
    first = space.account_keys("a")
    first.append("extra")
    assert space.account_keys("a") == expected(space, "a")[1]
