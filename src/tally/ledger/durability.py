"""Money in is durable before it is acknowledged.

Purchases, account creations and plan and price changes flush their shard's
stream into the ledger (taking over entries other flushers hold: the ledger
ignores duplicates) before the RPC answers. A replay does the same, so a
retry after a failed ledger write still ends durable.
"""

from __future__ import annotations

import logging

from tally.domain.errors import Unavailable
from tally.ledger.flusher import Flusher
from tally.ledger.ledger import LedgerUnavailable
from tally.store.failures import StoreRefused, StoreUnreachable

log = logging.getLogger("tally.ledger")


class MoneyInBarrier:
    def __init__(self, flusher: Flusher) -> None:
        self.flusher = flusher

    async def settle_account(self, account_id: str) -> None:
        await self.settle_shard(self.flusher.keys.shard_of(account_id))

    async def settle_shard(self, shard: int) -> None:
        try:
            await self.flusher.flush_through(shard)
        except (StoreUnreachable, StoreRefused) as exc:
            raise _not_durable(exc.kind, exc.reason) from exc
        except OSError as exc:
            raise _not_durable(type(exc).__name__, str(exc)) from exc
        except LedgerUnavailable as exc:
            raise Unavailable(f"{exc.message}; retry with the same idempotency key") from exc


def _not_durable(kind: str, reason: str) -> Unavailable:
    """The caller is told the kind of failure; the driver's own words go to the log."""
    log.warning("money in not yet durable", extra={"error": reason})
    return Unavailable(
        f"the change is recorded but not yet durable in the ledger ({kind}); "
        "retry with the same idempotency key"
    )
