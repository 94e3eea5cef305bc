"""Shard fences: what this server knows about each shard's Redis (lib/fence.lua).

Per shard, the floor: the highest fence this server has seen, in its own
scripts' replies and in the ledger (at start, after each batch the flusher
commits, and on the fence watch's schedule: store/fence_watch.py). Every
script that writes is told it and refuses, before any write, on a shard whose
fence is below it: that Redis lost writes (a wipe, a restart from an older
snapshot, a failover to a lagging replica). The fence watch also finds such a
shard with no call at all. The shard is then fenced in this server (health
NOT_SERVING) until a script or the watch finds it at its floor again, which
happens once `tally recover` has healed the shard: recovery starts a new
epoch, above every floor of the old one.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable

from tally import metrics
from tally.domain.errors import Unavailable
from tally.domain.limits import UNITS_MAX
from tally.store.contract import FenceMark

log = logging.getLogger("tally.fence")

# A floor count no count of the same epoch reaches (the scripts bound counts by it).
COUNT_MAX = UNITS_MAX

FencedCallback = Callable[[bool], Awaitable[None]]


class ShardBehind(Unavailable):
    """A shard's fence is below this server's floor: Redis lost writes (UNAVAILABLE;
    retrying helps once the shard is recovered)."""

    script_code = "SHARD_BEHIND"


async def _nothing(fenced: bool) -> None:
    del fenced


class ShardFences:
    """Each shard's floor and whether it is fenced. `on_fenced(any_fenced)` is awaited
    when the first shard is fenced and when the last one is healed."""

    def __init__(self, shards: int, on_fenced: FencedCallback = _nothing) -> None:
        self._floors = [FenceMark()] * shards
        self._fenced: set[int] = set()
        self.on_fenced = on_fenced

    @property
    def shards(self) -> int:
        return len(self._floors)

    def floor(self, shard: int) -> FenceMark:
        return self._floors[shard]

    def raise_floors(self, marks: Iterable[tuple[int, FenceMark]]) -> None:
        """Takes the higher of each shard's floor and the mark seen (a reply, the ledger)."""
        for shard, mark in marks:
            if mark > self._floors[shard]:
                self._floors[shard] = mark

    @property
    def fenced(self) -> frozenset[int]:
        return frozenset(self._fenced)

    def raise_count(self, shard: int, count: int) -> None:
        """The ledger holds the shard's entries up to this fence count (of the current
        epoch or an older one: either way Redis may not be below it now)."""
        floor = self._floors[shard]
        self.raise_floors([(shard, FenceMark(floor.epoch, count))])

    async def refused(self, shard: int) -> None:
        """A script found the shard behind its floor."""
        metrics.SHARD_FENCE_REFUSALS.inc()
        await self._fence(shard, "Redis is behind the ledger")

    async def found_behind(self, shard: int) -> None:
        """The shard's fence in Redis, read outside any script, is below its floor."""
        await self._fence(shard, "Redis is behind the ledger")

    async def conflicted(self, shard: int) -> None:
        """The ledger holds an entry id of the shard's stream with other content:
        nothing of this epoch is trusted any more, only a recovery's new one."""
        floor = self._floors[shard]
        self.raise_floors([(shard, FenceMark(floor.epoch, COUNT_MAX))])
        await self._fence(shard, "an entry conflicts with the ledger")

    async def _fence(self, shard: int, reason: str) -> None:
        if shard in self._fenced:
            return
        self._fenced.add(shard)
        metrics.SHARDS_FENCED.set(len(self._fenced))
        log.error("shard fenced: Redis lost writes; run tally recover",
                  extra={"shard": shard, "reason": reason, "floor": str(self._floors[shard])})
        if len(self._fenced) == 1:
            await self.on_fenced(True)

    async def passed(self, shard: int, mark: FenceMark) -> None:
        """A script found the shard at or above its floor, at `mark`."""
        self.raise_floors([(shard, mark)])
        if shard not in self._fenced:
            return
        self._fenced.discard(shard)
        metrics.SHARDS_FENCED.set(len(self._fenced))
        log.warning("shard healed", extra={"shard": shard, "fence": str(mark)})
        if not self._fenced:
            await self.on_fenced(False)
