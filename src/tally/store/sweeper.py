"""The period sweeper: closes accounts whose billing period ended (or whose
grant expired), touched or not, shard by shard, in bounded batches.

Closing is the touch every write does first (close_period.lua): the overage
of the ended period invoiced, its unused allotment and other due grants
expired, the next allotment granted. Without the sweeper an account that is
only read would never get those entries. The scripts keep each shard's index
of accounts by their next closing (keys.CLOSINGS_KEY); a pass closes every
account due by now, a batch of `batch` at a time per shard, so a closing is
written at most one interval (plus the pass itself) after it is due.

In a fleet each process sweeps only the shards whose `sweeper` lease it holds
(store/leases.py). Correctness does not rest on that: should two processes sweep
one shard (a lease lapsed during a pause), the scripts are atomic, and closing an
account that is no longer due writes nothing.
"""

from __future__ import annotations

import logging

from tally import metrics
from tally.store.contract import ClosePeriodRequest
from tally.store.leases import ShardLeases
from tally.store.periodic import PeriodicPass
from tally.store.quota_store import QuotaStore

log = logging.getLogger("tally.sweeper")


class PeriodSweeper(PeriodicPass):
    NAME = "period sweeper"
    DONE = "accounts_closed"

    def __init__(
        self, store: QuotaStore, interval_s: float, batch: int, leases: ShardLeases
    ) -> None:
        super().__init__(interval_s, log)
        self.store = store
        self.batch = batch
        self.leases = leases

    async def pass_once(self) -> int:
        return await self.sweep_once()

    async def sweep_once(self) -> int:
        """Closes every account due by now in the shards this process leases; returns
        how many closes wrote events. A closed account's index entry moves past now,
        so each batch makes progress."""
        closed = 0
        for shard in self.leases.shards():
            while True:
                due = await self.store.due_closings(shard, self.batch)
                for account_id in due:
                    reply = await self.store.close_period(ClosePeriodRequest(account_id))
                    if reply.events > 0:
                        metrics.ACCOUNTS_CLOSED.inc()
                        closed += 1
                if len(due) < self.batch:
                    break
        return closed
