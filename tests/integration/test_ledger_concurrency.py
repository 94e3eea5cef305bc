"""Processes sharing one ledger at once. Several flushers write one PostgreSQL
ledger (a fleet of servers and `tally flusher` processes): their batches touch
the same accounts' rows in whatever order the streams gave them, and must never
deadlock. Servers starting together on one fresh SQLite file must not fail on
each other's locks."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tally.domain.events import EntryImages, StreamEntry
from tally.ledger.backend import SqliteLedger, SqlLedger, open_ledger
from tests.integration.test_ledger_reads import stream_entry
from tests.support import T0_MS, PostgresServer, unique

ACCOUNTS = 40
ROUNDS = 15


@pytest.fixture
def postgres_ledger(postgres: PostgresServer) -> Iterator[str]:
    url = postgres.create_database()
    ledger = open_ledger(url)
    ledger.migrate(T0_MS)
    ledger.close()
    yield url
    postgres.drop_database(url)


def batch(accounts: list[str], seq: int) -> list[StreamEntry]:
    return [
        stream_entry(account_id, seq, images=EntryImages(account=f"{account_id}@{seq}".encode()))
        for account_id in accounts
    ]


def test_two_writers_of_the_same_accounts_in_opposite_orders_never_deadlock(
    postgres_ledger: str,
) -> None:
    """Proves two ledger writers whose batches update the same accounts' state rows
    in opposite orders (as two flushers of one shard may) both commit every batch:
    rows are written in one order whatever the batch's."""
    accounts = [unique() for _ in range(ACCOUNTS)]
    failures: list[BaseException] = []
    start = threading.Barrier(2)

    def write(order: list[str], first_seq: int) -> None:
        ledger: SqlLedger = open_ledger(postgres_ledger)  # type: ignore[assignment]
        try:
            start.wait()
            for round_ in range(ROUNDS):
                ledger.write_batch(batch(order, first_seq + 2 * round_), T0_MS)
        except BaseException as exc:
            failures.append(exc)
        finally:
            ledger.close()

    threads = [
        threading.Thread(target=write, args=(accounts, 1)),
        threading.Thread(target=write, args=(accounts[::-1], 2)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures, failures
    ledger = open_ledger(postgres_ledger)
    try:
        for account_id in accounts:
            assert len(ledger.entries(account_id, limit=10 * ROUNDS)) == 2 * ROUNDS
    finally:
        ledger.close()


def test_a_fresh_sqlite_ledger_opens_while_another_process_writes_to_it(
    tmp_path: Path,
) -> None:
    """Proves opening a new SQLite ledger (its switch to WAL) waits for another
    connection's write transaction instead of failing at once with 'database is
    locked', as two servers starting together on one fresh ledger would."""
    path = tmp_path / "ledger.sqlite3"
    writer = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    writer.execute("BEGIN IMMEDIATE")
    writer.execute("CREATE TABLE other_process (x INTEGER)")
    release = threading.Timer(0.3, lambda: writer.execute("COMMIT"))
    release.start()
    try:
        ledger = SqliteLedger(path)
        with ledger.transaction() as cursor:  # the writer's connection: it switches to WAL
            cursor.execute("SELECT 1")
        assert ledger.pragma("journal_mode") == "wal"
        ledger.close()
    finally:
        release.join()
        writer.close()
