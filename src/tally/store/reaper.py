"""The reaper: releases expired holds, shard by shard, in bounded batches.

Holds also expire lazily whenever their account is touched; the reaper makes
sure units come back to idle accounts too. In a fleet each process reaps only
the shards whose `reaper` lease it holds (store/leases.py). Correctness does not
rest on that: should two processes reap one shard (a lease lapsed during a
pause), expire_hold.lua is a no-op for a hold that is no longer due.
"""

from __future__ import annotations

import logging

from tally import metrics
from tally.store.client import store_errors
from tally.store.contract import ExpireHoldRequest
from tally.store.leases import ShardLeases
from tally.store.periodic import PeriodicPass
from tally.store.quota_store import QuotaStore

log = logging.getLogger("tally.reaper")


class Reaper(PeriodicPass):
    NAME = "reaper"
    DONE = "holds_expired"

    def __init__(
        self, store: QuotaStore, interval_s: float, batch: int, leases: ShardLeases
    ) -> None:
        super().__init__(interval_s, log)
        self.store = store
        self.batch = batch
        self.leases = leases

    async def pass_once(self) -> int:
        return await self.reap_once()

    async def reap_once(self) -> int:
        """One pass over the shards this process leases; returns how many holds it
        expired. Counts them in tally_holds_expired_total and refreshes
        tally_open_holds (every shard's)."""
        expired = 0
        for shard in self.leases.shards():
            for reservation_id in await self.store.due_holds(shard, self.batch):
                reply = await self.store.expire_hold(ExpireHoldRequest(reservation_id))
                done = reply.expired
                if done > 0:
                    metrics.HOLDS_EXPIRED.inc(done)
                expired += done
        metrics.OPEN_HOLDS.set(await self.open_holds())
        return expired

    async def open_holds(self) -> int:
        """Holds still open in every shard (due ones not yet reaped included):
        ZCARD of each shard's expiries, in one round trip."""
        keys = self.store.keys
        with store_errors():
            async with self.store.redis.pipeline(transaction=False) as pipe:
                for shard in range(keys.shards):
                    pipe.zcard(keys.expiries(shard))
                counts = await pipe.execute()
        return sum(int(count) for count in counts)
