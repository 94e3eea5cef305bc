"""The async ledger facade against real ledgers: which driver failures it turns into
LedgerUnavailable (and which it leaves alone), and whose clock the ledger records."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import psycopg
import pytest

from tally.clock import ManualClock
from tally.domain.errors import Unavailable
from tally.ledger.backend import open_ledger
from tally.ledger.ledger import Ledger, LedgerUnavailable
from tally.ledger.schema import LATEST_VERSION
from tests.support import T0_MS, free_port


async def test_a_postgresql_ledger_on_a_closed_port_is_unavailable() -> None:
    """Proves a PostgreSQL ledger nothing listens for (connection refused) fails with
    LedgerUnavailable, an Unavailable with the one message, the driver's words kept."""
    ledger = Ledger(
        open_ledger(f"postgresql://postgres@127.0.0.1:{free_port()}/tally"), ManualClock(T0_MS)
    )
    with pytest.raises(LedgerUnavailable) as raised:
        await ledger.count_entries()
    assert isinstance(raised.value, Unavailable)
    assert raised.value.message == "the ledger is unavailable (OperationalError)"
    assert isinstance(raised.value.__cause__, psycopg.OperationalError)
    assert raised.value.reason
    ledger.close()


async def test_a_locked_sqlite_ledger_is_unavailable(tmp_path: Path) -> None:
    """Proves a write to a SQLite ledger another connection holds locked past the busy
    timeout fails with LedgerUnavailable (the file stays locked for the whole wait)."""
    path = tmp_path / "ledger.sqlite3"
    ledger = Ledger(open_ledger(f"sqlite:///{path}"), ManualClock(T0_MS))
    await ledger.migrate()
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(LedgerUnavailable) as raised:
            await ledger.write_batch([])
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert raised.value.message == "the ledger is unavailable (OperationalError)"
    assert "locked" in raised.value.reason
    assert await ledger.write_batch([]) == 0  # the same facade works once the lock is gone
    ledger.close()


async def test_a_bad_query_is_not_translated(ledger_url: str) -> None:
    """Proves a query the database rejects (a table that does not exist: the ledger was
    never migrated) reaches the caller as the driver's own error, a bug, not Unavailable."""
    ledger = Ledger(open_ledger(ledger_url), ManualClock(T0_MS))
    with pytest.raises((sqlite3.Error, psycopg.Error)) as raised:
        await ledger.count_entries()
    assert not isinstance(raised.value, Unavailable)
    assert "ledger_entries" in str(raised.value)
    ledger.close()


async def test_the_ledger_records_the_injected_clock(ledger_url: str) -> None:
    """Proves the times the ledger writes (a snapshot taken) are the injected clock's,
    not the wall clock's."""
    clock = ManualClock(T0_MS)
    ledger = Ledger(open_ledger(ledger_url), clock)
    assert await ledger.migrate() == list(range(1, LATEST_VERSION + 1))
    clock.advance(61_000)
    snapshot_id = await ledger.snapshot("test", [])
    assert await ledger.latest_snapshot() == (snapshot_id, T0_MS + 61_000, 0)
    ledger.close()
