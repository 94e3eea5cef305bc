"""Money in is durable before it is acknowledged.

Purchases, account creations and plan and price changes flush their shard's
stream into the ledger (taking over entries other flushers hold: the ledger
ignores duplicates) before the RPC answers. A replay does the same, so a
retry after a failed ledger write still ends durable.
"""

from __future__ import annotations

from tally.domain.errors import Unavailable
from tally.ledger.flusher import Flusher
from tally.ledger.ledger import LedgerUnavailable
from tally.store.failures import StoreRefused, StoreUnreachable


class MoneyInBarrier:
    def __init__(self, flusher: Flusher) -> None:
        self.flusher = flusher

    async def settle_account(self, account_id: str) -> None:
        await self.settle_shard(self.flusher.keys.shard_of(account_id))

    async def settle_shard(self, shard: int) -> None:
        try:
            await self.flusher.flush_through(shard)
        except (StoreUnreachable, StoreRefused) as exc:
            raise _not_durable(exc.reason) from exc
        except OSError as exc:
            raise _not_durable(str(exc)) from exc
        except LedgerUnavailable as exc:
            raise Unavailable(f"{exc.message}; retry with the same idempotency key") from exc


def _not_durable(reason: str) -> Unavailable:
    return Unavailable(
        f"the change is recorded but not yet durable in the ledger ({reason}); "
        "retry with the same idempotency key"
    )
