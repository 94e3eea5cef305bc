"""The deployment's shard layout as Redis and the ledger record it, and the choice at start.

The layout (store/layout.py) is a fact of the data: Redis keeps it in `tally:meta`
(fields `shards`, `tag_scheme`) and the ledger in deployment_facts, so a wiped Redis
is recovered in the layout its ledger was written in. What a start uses:
- the recorded layout (the ledger's, else Redis's); the two differing is refused;
- nothing recorded, but the ledger has entries: a deployment from before layouts were
  recorded whose Redis is gone, written in SHARD_NUMBER tags over --shards (16 unset);
- nothing recorded at all: a new deployment, SLOT_RANGE tags over --shards
  (DEFAULT_SHARDS unset).
A Redis `tally:meta` with `shards` but no `tag_scheme` was written before schemes
were recorded: SHARD_NUMBER. A --shards that differs from the recorded count is
refused: the data cannot be read in another layout.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from tally.store.keys import META_KEY
from tally.store.layout import DEFAULT_SHARDS, UNRECORDED_SHARDS, ShardLayout, TagScheme

SHARDS_FIELD = "shards"
SCHEME_FIELD = "tag_scheme"


class LayoutRefused(RuntimeError):
    """The settings, Redis and the ledger disagree on the layout: nothing was served."""


class FactsLedger(Protocol):
    async def has_entries(self) -> bool: ...

    async def deployment_facts(self) -> dict[str, str]: ...

    async def record_deployment_facts(self, facts: dict[str, str]) -> dict[str, str]: ...


def layout_of(facts: Mapping[str, str]) -> ShardLayout | None:
    """The layout recorded in facts (None: none is). No scheme: SHARD_NUMBER, the
    only one there was before schemes were recorded."""
    if SHARDS_FIELD not in facts:
        return None
    scheme = facts.get(SCHEME_FIELD, TagScheme.SHARD_NUMBER.value)
    return ShardLayout(int(facts[SHARDS_FIELD]), TagScheme(scheme))


def facts_of(layout: ShardLayout) -> dict[str, str]:
    return {SHARDS_FIELD: str(layout.shards), SCHEME_FIELD: layout.scheme.value}


def choose(
    requested: int,
    in_redis: ShardLayout | None,
    in_ledger: ShardLayout | None,
    ledger_has_entries: bool,
) -> ShardLayout:
    """The layout to serve in (see the module's notes); requested 0: not given."""
    if in_redis is not None and in_ledger is not None and in_redis != in_ledger:
        raise LayoutRefused(
            f"Redis records {in_redis.describe()} but the ledger {in_ledger.describe()}: "
            "this Redis holds another deployment's data (or the ledger does); "
            "point both at the same deployment"
        )
    recorded = in_ledger or in_redis
    if recorded is None:
        if ledger_has_entries:
            return ShardLayout(requested or UNRECORDED_SHARDS, TagScheme.SHARD_NUMBER)
        return ShardLayout(requested or DEFAULT_SHARDS, TagScheme.SLOT_RANGE)
    if requested and requested != recorded.shards:
        raise LayoutRefused(
            f"this deployment's data is laid out in {recorded.describe()}; "
            f"--shards {requested} would lose it. Leave --shards unset (the recorded "
            "layout is used); changing the count of a live deployment is not supported "
            "(README, Shards)"
        )
    return recorded


async def layout_in_redis(redis: Any) -> ShardLayout | None:
    raw = await redis.hgetall(META_KEY)
    return layout_of({_text(name): _text(value) for name, value in raw.items()})


async def record_in_redis(redis: Any, layout: ShardLayout) -> None:
    """Records the layout's facts Redis lacks (a Redis written before schemes were
    recorded gets its scheme); refuses if Redis then records another layout."""
    for name, value in facts_of(layout).items():
        await redis.hsetnx(META_KEY, name, value)
    recorded = await layout_in_redis(redis)
    if recorded != layout:
        raise LayoutRefused(
            f"Redis records {_described(recorded)}, not {layout.describe()}: this Redis "
            "holds another deployment's data"
        )


async def layout_in_ledger(ledger: FactsLedger) -> ShardLayout | None:
    return layout_of(await ledger.deployment_facts())


async def record_in_ledger(ledger: FactsLedger, layout: ShardLayout) -> None:
    """Records the layout in the ledger unless it has one; refuses if it has another
    (two servers that started a new deployment at once with different --shards). A
    ledger that has it is only read: a start never waits on the ledger's write lock."""
    if await layout_in_ledger(ledger) == layout:
        return
    recorded = layout_of(await ledger.record_deployment_facts(facts_of(layout)))
    if recorded != layout:
        raise LayoutRefused(
            f"the ledger records {_described(recorded)}, not {layout.describe()}"
        )


async def settle(redis: Any, ledger: FactsLedger, requested: int) -> ShardLayout:
    """The layout to serve in, from what Redis and the ledger record (writes nothing)."""
    in_redis = await layout_in_redis(redis)
    in_ledger = await layout_in_ledger(ledger)
    has_entries = in_redis is None and in_ledger is None and await ledger.has_entries()
    return choose(requested, in_redis, in_ledger, has_entries)


def _described(layout: ShardLayout | None) -> str:
    return "no layout" if layout is None else layout.describe()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
