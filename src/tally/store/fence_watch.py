"""The fence watch: every shard's floor refreshed from the ledger, and every
shard's fence in Redis compared with it, on a schedule (--fence-check-interval).

Without it a server learns the ledger's floors only at start and from its own
flusher, and finds a Redis that lost writes only when a call reaches the
shard. With it, a wipe or an older Redis (its fence below the floor; a missing
fence reads as {0, 0}) fences the shard within one interval even when nobody
calls, and a shard healed by `tally recover` is no longer fenced within one
interval even when nobody calls.
"""

from __future__ import annotations

import logging
from typing import Protocol

from tally.store.contract import FenceMark
from tally.store.fence import ShardFences
from tally.store.periodic import PeriodicPass

log = logging.getLogger("tally.fence")


class FenceLedger(Protocol):
    async def shard_fences(self) -> dict[int, tuple[int, int]]:
        """Per shard, (epoch, count): the lowest fence its Redis may have."""
        ...


class FenceReader(Protocol):
    async def fences(self) -> list[FenceMark]:
        """Every shard's fence as Redis holds it ({0, 0} when missing)."""
        ...


async def raise_floors_from(ledger: FenceLedger, fences: ShardFences) -> None:
    """Takes the ledger's fences as floors (where higher than the ones known)."""
    floors = await ledger.shard_fences()
    fences.raise_floors(
        (shard, FenceMark(epoch, count)) for shard, (epoch, count) in floors.items()
    )


class FenceWatch(PeriodicPass):
    NAME = "fence watch"
    DONE = "shards_fenced"

    def __init__(
        self, fences: ShardFences, ledger: FenceLedger, images: FenceReader, interval_s: float
    ) -> None:
        super().__init__(interval_s, log)
        self.fences = fences
        self.ledger = ledger
        self.images = images

    async def pass_once(self) -> int:
        """Returns how many shards this pass fenced. The ledger is read before Redis:
        a fence the ledger records is in Redis already (recovery aside, whose new
        epoch the ledger records first: a shard found behind in between heals at the
        next pass or call)."""
        await raise_floors_from(self.ledger, self.fences)
        # Compared with the floors known before Redis is read: a floor raised while
        # the read is under way (a reply, a flusher batch) may be above what the
        # read saw without Redis having lost anything.
        floors = [self.fences.floor(shard) for shard in range(self.fences.shards)]
        newly_fenced = 0
        for shard, mark in enumerate(await self.images.fences()):
            if mark < floors[shard]:
                newly_fenced += shard not in self.fences.fenced
                await self.fences.found_behind(shard)
            elif shard in self.fences.fenced:
                await self.fences.passed(shard, mark)
        return newly_fenced
