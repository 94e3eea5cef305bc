"""The fence watch against floors that move while it reads Redis."""

from __future__ import annotations

from tally.store.contract import FenceMark
from tally.store.fence import ShardFences
from tally.store.fence_watch import FenceWatch

SHARDS = 2


class NoLedgerFloors:
    async def shard_fences(self) -> dict[int, tuple[int, int]]:
        return {}


class RedisRead:
    """Redis's fences as read; `during` runs while the read is under way (what a
    script reply or a flusher batch does to the floors meanwhile)."""

    def __init__(self, marks: list[FenceMark], fences: ShardFences, during: FenceMark) -> None:
        self.marks = marks
        self.known = fences
        self.during = during

    async def fences(self) -> list[FenceMark]:
        self.known.raise_floors([(0, self.during)])
        return self.marks


async def test_a_floor_raised_during_the_read_does_not_fence() -> None:
    """Proves a shard whose Redis was at its floor when read is not fenced because a
    reply raised the floor while the read was under way (a false 'Redis lost writes'
    seen under load before the watch compared with the floors known before reading)."""
    fences = ShardFences(SHARDS)
    fences.raise_floors([(0, FenceMark(1, 4))])
    read = RedisRead([FenceMark(1, 4), FenceMark()], fences, during=FenceMark(1, 5))
    watch = FenceWatch(fences, NoLedgerFloors(), read, interval_s=60)
    assert await watch.pass_once() == 0
    assert fences.fenced == frozenset()
    assert fences.floor(0) == FenceMark(1, 5)


async def test_redis_below_a_floor_known_before_the_read_is_fenced() -> None:
    """Proves the watch still fences a shard whose Redis is below a floor it knew
    before reading (Redis lost writes)."""
    fences = ShardFences(SHARDS)
    fences.raise_floors([(0, FenceMark(1, 4))])
    read = RedisRead([FenceMark(1, 3), FenceMark()], fences, during=FenceMark(1, 4))
    watch = FenceWatch(fences, NoLedgerFloors(), read, interval_s=60)
    assert await watch.pass_once() == 1
    assert fences.fenced == frozenset({0})
