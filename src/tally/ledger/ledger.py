"""The ledger as the event loop sees it: one async facade over the SQL backend.

It owns three things no caller repeats:
- the hop to a worker thread (the backend's DB-API calls block);
- the translation of the driver's failures: a connection or lock failure becomes
  LedgerUnavailable (worth a retry), any other driver error is a bug and stays
  as it is (INTERNAL at the API);
- the clock: the times the ledger records (flushed, snapshot taken, migration
  applied) and prunes by come from the injected clock, the one the server uses.

Reads run on the backend's read connections, at most READ_CONNECTIONS_MAX at a
time: a read waits here, on the event loop, for a free connection, so it never
holds a worker thread while it waits (the writer needs one). Usage is read a
page of `page_rows` entries at a time.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import ParamSpec, TypeVar

from prometheus_client import Counter, Histogram

from tally import metrics
from tally.auth.tokens import TokenRecord
from tally.clock import Clock
from tally.domain.errors import Unavailable
from tally.domain.events import Entry, StreamEntry
from tally.ledger.backend import (
    READ_CONNECTIONS_MAX,
    Pruned,
    ReservationImage,
    Retention,
    SqlLedger,
    StateRow,
    UsageKey,
)

P = ParamSpec("P")
T = TypeVar("T")

# SQLite's primary result codes for a file it cannot lock (past the busy timeout)
# or cannot open, read or write: its equivalent of a lost connection.
_SQLITE_UNREACHABLE = frozenset(
    {sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED, sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_IOERR}
)
_SQLITE_PRIMARY_CODE_MASK = 0xFF  # extended result codes carry the primary one in the low byte

PAGE_ROWS = 1000  # entries a paged read holds at once

READ_PAGE_ROWS = Histogram(
    "tally_ledger_read_page_rows",
    "Entries per page of a paged ledger read (reports, usage recovery)",
    buckets=(10, 100, PAGE_ROWS),
    registry=metrics.REGISTRY,
)
ROWS_PRUNED = Counter(
    "tally_ledger_rows_pruned_total",
    "Rows pruned from the ledger's tables beside the entries, by table",
    ["table"],
    registry=metrics.REGISTRY,
)


class LedgerUnavailable(Unavailable):
    """The ledger's database could not be reached (connection refused or lost, the
    file locked past the busy timeout): worth a retry."""

    def __init__(self, cause: BaseException) -> None:
        self.kind = type(cause).__name__
        self.reason = str(cause)  # the driver's own words, for the logs
        super().__init__(f"the ledger is unavailable ({self.kind})")


def _unreachable(exc: Exception) -> bool:
    import psycopg  # the PostgreSQL driver is loaded only when it is needed

    if isinstance(exc, sqlite3.OperationalError):
        code = getattr(exc, "sqlite_errorcode", 0)  # absent when the module raised it
        return (code & _SQLITE_PRIMARY_CODE_MASK) in _SQLITE_UNREACHABLE
    return isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError)


class Ledger:
    """Every ledger read and write an async caller makes."""

    def __init__(self, backend: SqlLedger, clock: Clock, page_rows: int = PAGE_ROWS) -> None:
        self.backend = backend
        self.clock = clock
        self.page_rows = page_rows
        self._read_slots = asyncio.Semaphore(READ_CONNECTIONS_MAX)

    @property
    def dialect(self) -> str:
        return self.backend.dialect

    def close(self) -> None:
        self.backend.close()

    async def _call(self, work: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await asyncio.to_thread(work, *args, **kwargs)
        except Exception as exc:
            if _unreachable(exc):
                raise LedgerUnavailable(exc) from exc
            raise

    async def _read(self, work: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        async with self._read_slots:
            return await self._call(work, *args, **kwargs)

    # --- schema -----------------------------------------------------------

    async def migrate(self) -> list[int]:
        """Applies what is missing; returns the versions applied now."""
        return await self._call(self.backend.migrate, self.clock.now_ms())

    async def schema_version(self) -> int:
        return await self._read(self.backend.schema_version)

    # --- writes -----------------------------------------------------------

    async def write_batch(self, events: Sequence[StreamEntry]) -> int:
        """Writes the entries not there yet; returns how many were new."""
        return await self._call(self.backend.write_batch, events, self.clock.now_ms())

    async def snapshot(
        self, reason: str, balances: Iterable[tuple[str, int, dict[str, int], bytes]]
    ) -> int:
        return await self._call(self.backend.snapshot, reason, balances, self.clock.now_ms())

    async def prune(self, retention: Retention) -> Pruned:
        """One bounded pass of pruning, as of the clock's now."""
        pruned = await self._call(self.backend.prune, retention, self.clock.now_ms())
        for table, rows in (
            ("snapshots", pruned.snapshots), ("snapshot_balances", pruned.snapshot_balances),
            ("reservation_states", pruned.reservations),
            ("idempotency_states", pruned.idempotency_records),
        ):
            ROWS_PRUNED.labels(table).inc(rows)
        return pruned

    # --- reads ------------------------------------------------------------

    async def entries(
        self,
        account_id: str,
        *,
        start_ms: int = 0,
        end_ms: int = 0,
        types: Sequence[str] = (),
        after_seq: int = 0,
        limit: int = 1000,
    ) -> list[Entry]:
        return await self._read(
            self.backend.entries, account_id, start_ms=start_ms, end_ms=end_ms, types=types,
            after_seq=after_seq, limit=limit,
        )

    async def usage_pages(self, since_ms: int, account_id: str = "") -> AsyncIterator[list[Entry]]:
        """Charges and refunds that occurred at or after since_ms (all accounts when
        account_id is empty), a page of at most page_rows at a time."""
        after: UsageKey | None = None
        while True:
            page = await self._read(
                self.backend.usage_page, since_ms, account_id, after, self.page_rows
            )
            READ_PAGE_ROWS.observe(len(page))
            if page:
                yield page
            if len(page) < self.page_rows:
                return
            last = page[-1]
            after = (last.account_id, last.occurred_at_ms, last.seq)

    async def count_entries(self) -> int:
        return await self._read(self.backend.count_entries)

    async def has_entries(self) -> bool:
        return await self._read(self.backend.has_entries)

    async def deployment_facts(self) -> dict[str, str]:
        """The facts the data is written in (tally/deployment.py: the shard layout)."""
        return await self._read(self.backend.deployment_facts)

    async def record_deployment_facts(self, facts: dict[str, str]) -> dict[str, str]:
        """Records the facts not recorded yet; returns every fact recorded."""
        return await self._call(
            self.backend.record_deployment_facts, facts, self.clock.now_ms()
        )

    async def account_states(self) -> list[StateRow]:
        return await self._read(self.backend.account_states)

    async def reservation_states(self) -> list[StateRow]:
        return await self._read(self.backend.reservation_states)

    async def reservation_image(self, reservation_id: str, account_id: str) -> ReservationImage:
        """The reservation's latest image, and how far the account's events are flushed."""
        return await self._read(self.backend.reservation_image, reservation_id, account_id)

    async def idempotency_states(self, now_ms: int) -> list[StateRow]:
        """The records that have not expired at now_ms."""
        return await self._read(self.backend.idempotency_states, now_ms)

    async def catalog_prices(self) -> list[tuple[str, int, int, int]]:
        return await self._read(self.backend.catalog_prices)

    async def entry_sums(self) -> dict[str, dict[str, int]]:
        return await self._read(self.backend.entry_sums)

    async def shard_fences(self) -> dict[int, tuple[int, int]]:
        """Per shard, (epoch, count): the lowest fence its Redis may have."""
        return await self._call(self.backend.shard_fences)

    async def start_fence_epoch(
        self, shard: int, redis_mark: tuple[int, int]
    ) -> tuple[int, int]:
        """Records recovery's new (epoch, count) for the shard, above Redis' mark."""
        return await self._call(
            self.backend.start_fence_epoch, shard, redis_mark, self.clock.now_ms()
        )

    async def latest_snapshot(self) -> tuple[int, int, int] | None:
        return await self._read(self.backend.latest_snapshot)

    async def conflicting(self, events: Sequence[StreamEntry]) -> list[StreamEntry]:
        """The events whose ids the ledger holds with other content."""
        return await self._read(self.backend.conflicting, events)

    async def quarantine(self, events: Sequence[StreamEntry]) -> None:
        """Keeps stream entries recovery set aside (quarantined_entries)."""
        await self._call(self.backend.quarantine, events, self.clock.now_ms())

    async def put_token(self, record: TokenRecord) -> TokenRecord:
        """Keeps the record unless its token id is held; returns the one held."""
        return await self._call(self.backend.put_token, record)

    async def revoke_token(self, token_id: str, by: str) -> TokenRecord | None:
        return await self._call(self.backend.revoke_token, token_id, self.clock.now_ms(), by)

    async def tokens(self) -> list[TokenRecord]:
        return await self._read(self.backend.tokens)

    async def count_quarantined(self) -> int:
        return await self._read(self.backend.count_quarantined)
