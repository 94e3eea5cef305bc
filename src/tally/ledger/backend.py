"""Ledger backends: SQLite (embedded default) and PostgreSQL, one SQL dialect.

The backends are synchronous DB-API code, called from the event loop only
through the async facade in `ledger.py`, which also gives them every time they
record (they never read a clock). Statements are written with `?`
placeholders; PostgreSQL gets `%s`.

Writes go through one connection behind one lock (the flusher, the money-in
barrier, snapshots, pruning). Reads never take that lock: each runs in its own
snapshot transaction on one of at most READ_CONNECTIONS_MAX read-only
connections (SQLite WAL readers, PostgreSQL REPEATABLE READ), so a report never
waits for a write and a write never waits for a report. No read returns an
unbounded result: lists come a page at a time.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

import msgpack

from tally.auth.principal import Role
from tally.auth.tokens import TokenRecord
from tally.domain.events import (
    USAGE_TYPES,
    Entry,
    EntryType,
    StreamEntry,
    labels_of,
    stream_id_order,
)
from tally.ledger.schema import MIGRATIONS
from tally.redaction import redact

BUSY_TIMEOUT_MS = 10_000
WAL_RETRY_S = 0.01
READ_CONNECTIONS_MAX = 4  # read connections per ledger, beside its one writer
ENTRY_COLUMNS = (
    "entry_id, account_id, seq, type, reservation_id, operation, quantity, units, "
    "available_after, occurred_at, labels, idempotency_key, shard, detail, flushed_at, fence, "
    "principal"
)


class Cursor(Protocol):
    @property
    def rowcount(self) -> int: ...

    def execute(self, sql: str, params: Sequence[Any] = ...) -> Any: ...
    def fetchall(self) -> list[Any]: ...
    def fetchone(self) -> Any: ...


@dataclass(frozen=True)
class StateRow:
    key: str
    account_id: str
    seq: int
    state: bytes
    expires_at_ms: int = 0
    # account rows: the available units the script's write phase checked the
    # books with (available_after of the entry that carried the image)
    available: int = 0


# Where a paged usage read stopped: (account_id, occurred_at_ms, seq) of its last row.
UsageKey = tuple[str, int, int]


@dataclass(frozen=True)
class Retention:
    """What pruning keeps of the tables beside the entries."""

    snapshots_kept: int  # the newest snapshots kept (with their balances)
    reservation_retention_ms: int  # a closed reservation's image is kept this long
    batch_rows: int  # rows deleted per table per pass, at most


@dataclass(frozen=True)
class Pruned:
    snapshots: int = 0
    snapshot_balances: int = 0
    reservations: int = 0
    idempotency_records: int = 0


def hold_closed_at(image: bytes) -> int:
    """When a reservation image's hold closed (committed, released, expired); 0 while
    it is held."""
    hold = msgpack.unpackb(image, raw=False, strict_map_key=False)
    return 0 if hold["state"] == "HELD" else int(hold["closed_at"])


@dataclass(frozen=True)
class ReservationImage:
    """What the ledger knows of one reservation and of its account's flushed events."""

    state: bytes | None  # the reservation's latest image (None: the ledger has none)
    account_seq: int  # the newest event of the account the ledger has (0: none)
    account_seq_at_ms: int  # when that event occurred


class SqlLedger:
    """The schema and every query; subclasses only connect."""

    dialect = "sql"
    blob_type = "BLOB"

    def __init__(self) -> None:
        self._lock = threading.Lock()  # the writer's
        self._conn: Any = None  # the writer's connection
        self._readers_lock = threading.Lock()  # guards the idle list only
        self._idle_readers: list[Any] = []
        self._reader_slots = threading.BoundedSemaphore(READ_CONNECTIONS_MAX)

    # --- connection -------------------------------------------------------

    def _connect(self) -> Any:
        raise NotImplementedError

    def _connect_reader(self) -> Any:
        raise NotImplementedError

    def _sql(self, sql: str) -> str:
        return sql

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
        with self._readers_lock:
            idle, self._idle_readers = self._idle_readers, []
        for conn in idle:
            conn.close()

    @contextmanager
    def transaction(self) -> Iterator[Cursor]:
        """One write transaction; a failure rolls back and drops the connection."""
        with self._lock:
            if self._conn is None:
                self._conn = self._connect()
            cursor = _Translating(self._conn.cursor(), self._sql)
            try:
                self._begin(cursor, write=True)
                yield cursor
                self._conn.commit()
            except BaseException:
                try:
                    self._conn.rollback()
                except Exception:  # the connection is gone; it is replaced next time
                    self._conn = None
                raise

    @contextmanager
    def reading(self) -> Iterator[Cursor]:
        """One read-only snapshot transaction on a read connection (never the
        writer's): it neither waits for the writer's lock nor holds it."""
        with self._reader_slots:
            with self._readers_lock:
                conn = self._idle_readers.pop() if self._idle_readers else None
            if conn is None:
                conn = self._connect_reader()
            try:
                cursor = _Translating(conn.cursor(), self._sql)
                self._begin(cursor, write=False)
                yield cursor
                conn.rollback()  # nothing to keep: it only read
            except BaseException:
                conn.close()  # a failed reader is not reused (PostgreSQL keeps it aborted)
                raise
            with self._readers_lock:
                self._idle_readers.append(conn)

    def _begin(self, cursor: Cursor, write: bool) -> None:
        del cursor, write

    # --- schema -----------------------------------------------------------

    def migrate(self, applied_at_ms: int) -> list[int]:
        """Applies what is missing, in one transaction under the ledger's migration
        lock, so that processes starting at once migrate one after the other (the
        later ones find every version applied). Returns the versions applied now."""
        if self._applied_version() >= MIGRATIONS[-1][0]:
            return []
        applied: list[int] = []
        with self.transaction() as cur:
            self._lock_migrations(cur)
            cur.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                "version INTEGER PRIMARY KEY, description TEXT NOT NULL, "
                "applied_at BIGINT NOT NULL)"
            )
            for version, description, statements in MIGRATIONS:
                cur.execute("SELECT 1 FROM schema_migrations WHERE version = ?", (version,))
                if cur.fetchone() is not None:
                    continue
                for statement in statements:
                    cur.execute(statement.format(blob=self.blob_type))
                cur.execute(
                    "INSERT INTO schema_migrations (version, description, applied_at) "
                    "VALUES (?, ?, ?)",
                    (version, description, applied_at_ms),
                )
                applied.append(version)
        return applied

    def _lock_migrations(self, cur: Cursor) -> None:
        """Held until the migration's transaction ends. SQLite: nothing more, its
        BEGIN IMMEDIATE holds the database's write lock already."""
        del cur

    def _applied_version(self) -> int:
        """0 when the ledger has no schema yet; a read, so it never waits on a writer."""
        try:
            return self.schema_version()
        except Exception as exc:
            if "schema_migrations" in str(exc):
                return 0
            raise

    def schema_version(self) -> int:
        with self.reading() as cur:
            cur.execute("SELECT MAX(version) FROM schema_migrations")
            row = cur.fetchone()
        return int(row[0] or 0)

    # --- writes -----------------------------------------------------------

    def write_batch(self, events: Sequence[StreamEntry], flushed_at_ms: int) -> int:
        """Inserts entries (ignoring ones already there with the same content) and
        upserts the state images they carry, in one transaction. Returns the new
        entries' count. An entry whose id the ledger holds with other content means
        Redis lost writes and reused the id: nothing of the batch is written
        (EntryConflict)."""
        inserted = 0
        conflicts: list[StreamEntry] = []
        with self.transaction() as cur:
            # Rows are written in one order whatever the batch's: two flushers whose
            # batches share accounts then lock them in the same order and never
            # deadlock. Every image upsert keeps the highest seq, so order is free.
            for event in sorted(events, key=_row_order):
                entry = event.entry
                detail = detail_text(entry)
                cur.execute(
                    f"INSERT INTO ledger_entries ({ENTRY_COLUMNS}) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT (entry_id) DO NOTHING",
                    (
                        entry.entry_id, entry.account_id, entry.seq, entry.type.value,
                        entry.reservation_id, entry.operation, entry.quantity, entry.units,
                        entry.available_after, entry.occurred_at_ms,
                        json.dumps(entry.labels, sort_keys=True), entry.idempotency_key,
                        entry.shard, detail, flushed_at_ms, entry.fence, entry.principal,
                    ),
                )
                if cur.rowcount > 0:
                    inserted += cur.rowcount
                elif self._stored_detail(cur, entry.entry_id) != detail:
                    conflicts.append(event)
                    continue
                self._write_images(cur, event, flushed_at_ms)
            if conflicts:
                raise EntryConflict(conflicts)  # rolls the whole batch back
            self._advance_positions(cur, events, flushed_at_ms)
            self._raise_fence_counts(cur, events, flushed_at_ms)
        return inserted

    @staticmethod
    def _stored_detail(cur: Cursor, entry_id: str) -> str | None:
        cur.execute("SELECT detail FROM ledger_entries WHERE entry_id = ?", (entry_id,))
        row = cur.fetchone()
        return None if row is None else str(row[0])

    def conflicting(self, events: Sequence[StreamEntry]) -> list[StreamEntry]:
        """The events whose ids the ledger holds with other content."""
        with self.reading() as cur:
            return [
                event for event in events
                if self._stored_detail(cur, event.entry.entry_id) not in (
                    None, detail_text(event.entry))
            ]

    def quarantine(self, events: Sequence[StreamEntry], now_ms: int) -> None:
        """Keeps stream entries set aside by recovery, with their content."""
        with self.transaction() as cur:
            for event in events:
                entry = event.entry
                cur.execute(
                    "INSERT INTO quarantined_entries (shard, stream_id, entry_id, account_id, "
                    "content, quarantined_at) VALUES (?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT (shard, stream_id) DO NOTHING",
                    (entry.shard, event.stream_id, entry.entry_id, entry.account_id,
                     detail_text(entry), now_ms),
                )

    def count_quarantined(self) -> int:
        with self.reading() as cur:
            cur.execute("SELECT COUNT(*) FROM quarantined_entries")
            return int(cur.fetchone()[0])

    def _raise_fence_counts(
        self, cur: Cursor, events: Sequence[StreamEntry], now_ms: int
    ) -> None:
        """Each shard's highest fence count: what its Redis may never be below."""
        highest: dict[int, int] = {}
        for event in events:
            shard = event.entry.shard
            highest[shard] = max(highest.get(shard, 0), event.entry.fence)
        for shard, count in highest.items():
            cur.execute(
                "INSERT INTO shard_fences (shard, epoch, count, updated_at) VALUES (?, 0, ?, ?) "
                "ON CONFLICT (shard) DO UPDATE SET count = excluded.count, "
                "updated_at = excluded.updated_at WHERE excluded.count > shard_fences.count",
                (shard, count, now_ms),
            )

    def start_fence_epoch(
        self, shard: int, redis_mark: tuple[int, int], now_ms: int
    ) -> tuple[int, int]:
        """Recovery's new fence for a shard: an epoch above the ledger's and Redis',
        a count at least both of theirs. Recorded before Redis is told it."""
        with self.transaction() as cur:
            cur.execute("SELECT epoch, count FROM shard_fences WHERE shard = ?", (shard,))
            row = cur.fetchone()
            epoch, count = (0, 0) if row is None else (int(row[0]), int(row[1]))
            mark = (max(epoch, redis_mark[0]) + 1, max(count, redis_mark[1]))
            cur.execute(
                "INSERT INTO shard_fences (shard, epoch, count, updated_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (shard) DO UPDATE SET epoch = excluded.epoch, "
                "count = excluded.count, updated_at = excluded.updated_at",
                (shard, mark[0], mark[1], now_ms),
            )
        return mark

    def _write_images(self, cur: Cursor, event: StreamEntry, now_ms: int) -> None:
        entry, images = event.entry, event.images
        if entry.type == EntryType.PRICE_CHANGE:
            cur.execute(
                "INSERT INTO catalog_prices (operation, version, price, effective_at) "
                "VALUES (?, ?, ?, ?) ON CONFLICT (operation, version) DO NOTHING",
                (entry.operation, entry.price_version, entry.units, entry.occurred_at_ms),
            )
        if images.account is not None:
            cur.execute(
                "INSERT INTO account_states (account_id, shard, seq, state, updated_at) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (account_id) DO UPDATE SET "
                "seq = excluded.seq, state = excluded.state, updated_at = excluded.updated_at "
                "WHERE excluded.seq > account_states.seq",
                (entry.account_id, entry.shard, entry.seq, images.account, now_ms),
            )
        for rid, image in images.holds.items():
            cur.execute(
                "INSERT INTO reservation_states (reservation_id, account_id, seq, state, "
                "closed_at) VALUES (?, ?, ?, ?, ?) ON CONFLICT (reservation_id) DO UPDATE SET "
                "seq = excluded.seq, state = excluded.state, closed_at = excluded.closed_at "
                "WHERE excluded.seq > reservation_states.seq",
                (rid, entry.account_id, entry.seq, image, hold_closed_at(image)),
            )
        idem = images.idempotency
        if idem is not None:
            cur.execute(
                "INSERT INTO idempotency_states (record_key, account_id, seq, state, expires_at) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (record_key) DO UPDATE SET "
                "seq = excluded.seq, state = excluded.state, expires_at = excluded.expires_at "
                "WHERE excluded.seq > idempotency_states.seq",
                (idem.key, entry.account_id, entry.seq, idem.record, idem.expires_at_ms),
            )

    def _advance_positions(
        self, cur: Cursor, events: Sequence[StreamEntry], now_ms: int
    ) -> None:
        newest: dict[int, str] = {}
        for event in events:
            shard = event.entry.shard
            if shard not in newest or (
                stream_id_order(event.stream_id) > stream_id_order(newest[shard])
            ):
                newest[shard] = event.stream_id
        for shard, stream_id in newest.items():
            cur.execute("SELECT stream_id FROM flush_positions WHERE shard = ?", (shard,))
            row = cur.fetchone()
            if row is None:
                cur.execute(
                    "INSERT INTO flush_positions (shard, stream_id, updated_at) VALUES (?, ?, ?)",
                    (shard, stream_id, now_ms),
                )
            elif stream_id_order(stream_id) > stream_id_order(row[0]):
                cur.execute(
                    "UPDATE flush_positions SET stream_id = ?, updated_at = ? WHERE shard = ?",
                    (stream_id, now_ms, shard),
                )

    def snapshot(
        self,
        reason: str,
        balances: Iterable[tuple[str, int, dict[str, int], bytes]],
        taken_at_ms: int,
    ) -> int:
        """Freezes every account's balance as of the flushed positions."""
        with self.transaction() as cur:
            cur.execute("SELECT COALESCE(MAX(snapshot_id), 0) + 1 FROM snapshots")
            snapshot_id = int(cur.fetchone()[0])
            cur.execute("SELECT shard, stream_id FROM flush_positions ORDER BY shard")
            positions = {str(shard): stream_id for shard, stream_id in cur.fetchall()}
            count = 0
            for account_id, seq, figures, state in balances:
                cur.execute(
                    "INSERT INTO snapshot_balances (snapshot_id, account_id, seq, available, held, "
                    "granted_total, charged_total, refunded_total, expired_total, state) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        snapshot_id, account_id, seq, figures["available"], figures["held"],
                        figures["granted"], figures["charged"], figures["refunded"],
                        figures["expired"], state,
                    ),
                )
                count += 1
            cur.execute(
                "INSERT INTO snapshots (snapshot_id, taken_at, reason, accounts, positions) "
                "VALUES (?, ?, ?, ?, ?)",
                (snapshot_id, taken_at_ms, reason, count, json.dumps(positions)),
            )
        return snapshot_id

    def prune(self, retention: Retention, now_ms: int) -> Pruned:
        """Deletes, at most retention.batch_rows per table, what nothing needs any
        more: snapshots beyond the newest snapshots_kept, reservation images whose
        hold closed reservation_retention ago (no longer refundable, and recovery
        would not restore them), idempotency images that lapsed."""
        batch = retention.batch_rows
        with self.transaction() as cur:
            cur.execute(
                "SELECT snapshot_id FROM snapshots ORDER BY snapshot_id DESC LIMIT 1 OFFSET ?",
                (retention.snapshots_kept - 1,),
            )
            oldest_kept = cur.fetchone()
            snapshots = balances = 0
            if oldest_kept is not None:
                cur.execute(
                    "DELETE FROM snapshots WHERE snapshot_id IN (SELECT snapshot_id "
                    "FROM snapshots WHERE snapshot_id < ? LIMIT ?)",
                    (oldest_kept[0], batch),
                )
                snapshots = cur.rowcount
                cur.execute(
                    "DELETE FROM snapshot_balances WHERE (snapshot_id, account_id) IN ("
                    "SELECT snapshot_id, account_id FROM snapshot_balances "
                    "WHERE snapshot_id < ? LIMIT ?)",
                    (oldest_kept[0], batch),
                )
                balances = cur.rowcount
            cur.execute(
                "DELETE FROM reservation_states WHERE reservation_id IN (SELECT reservation_id "
                "FROM reservation_states WHERE closed_at > 0 AND closed_at <= ? LIMIT ?)",
                (now_ms - retention.reservation_retention_ms, batch),
            )
            reservations = cur.rowcount
            cur.execute(
                "DELETE FROM idempotency_states WHERE record_key IN (SELECT record_key "
                "FROM idempotency_states WHERE expires_at <= ? LIMIT ?)",
                (now_ms, batch),
            )
            return Pruned(snapshots, balances, reservations, cur.rowcount)

    # --- reads ------------------------------------------------------------

    def entries(
        self,
        account_id: str,
        *,
        start_ms: int = 0,
        end_ms: int = 0,
        types: Sequence[str] = (),
        after_seq: int = 0,
        limit: int = 1000,
    ) -> list[Entry]:
        """The account's entries after after_seq, in order, only as far as the ledger
        holds every entry from after_seq + 1 on: an entry committed late (a slow
        flusher writing n after n + 1) is served once it is there, never skipped."""
        sql = [f"SELECT {ENTRY_COLUMNS} FROM ledger_entries WHERE account_id = ? AND seq > ?"]
        params: list[Any] = [account_id, after_seq]
        if start_ms:
            sql.append("AND occurred_at >= ?")
            params.append(start_ms)
        if end_ms:
            sql.append("AND occurred_at < ?")
            params.append(end_ms)
        if types:
            sql.append("AND type IN (" + ", ".join("?" for _ in types) + ")")
            params.extend(str(t) for t in types)
        sql.append("ORDER BY seq LIMIT ?")
        params.append(limit)
        with self.reading() as cur:  # one snapshot: the gap is looked for in what was read
            cur.execute(" ".join(sql), params)
            rows = [_entry_row(r) for r in cur.fetchall()]
            if not rows:
                return rows
            contiguous_through = _contiguous_through(cur, account_id, after_seq, rows[-1].seq)
        return [row for row in rows if row.seq <= contiguous_through]

    def usage_page(
        self, since_ms: int, account_id: str, after: UsageKey | None, limit: int
    ) -> list[Entry]:
        """One page of the charges and refunds that occurred at or after since_ms (all
        accounts when account_id is empty), after `after`, in (account, time, seq) order."""
        usage_types = sorted(USAGE_TYPES)
        sql = [
            f"SELECT {ENTRY_COLUMNS} FROM ledger_entries WHERE occurred_at >= ? "
            f"AND type IN ({', '.join('?' for _ in usage_types)})"
        ]
        params: list[Any] = [since_ms, *usage_types]
        if account_id:
            sql.append("AND account_id = ?")
            params.append(account_id)
        if after is not None:
            sql.append("AND (account_id, occurred_at, seq) > (?, ?, ?)")
            params.extend(after)
        sql.append("ORDER BY account_id, occurred_at, seq LIMIT ?")
        params.append(limit)
        with self.reading() as cur:
            cur.execute(" ".join(sql), params)
            return [_entry_row(r) for r in cur.fetchall()]

    def count_entries(self) -> int:
        with self.reading() as cur:
            cur.execute("SELECT COUNT(*) FROM ledger_entries")
            return int(cur.fetchone()[0])

    def has_entries(self) -> bool:
        with self.reading() as cur:
            cur.execute("SELECT 1 FROM ledger_entries LIMIT 1")
            return cur.fetchone() is not None

    def deployment_facts(self) -> dict[str, str]:
        with self.reading() as cur:
            cur.execute("SELECT name, value FROM deployment_facts")
            return {str(name): str(value) for name, value in cur.fetchall()}

    def record_deployment_facts(self, facts: dict[str, str], now_ms: int) -> dict[str, str]:
        """Records the facts not recorded yet (a recorded fact is never changed);
        returns every fact recorded, these or earlier ones."""
        with self.transaction() as cur:
            for name, value in facts.items():
                cur.execute(
                    "INSERT INTO deployment_facts (name, value, recorded_at) VALUES (?, ?, ?) "
                    "ON CONFLICT (name) DO NOTHING",
                    (name, value, now_ms),
                )
            cur.execute("SELECT name, value FROM deployment_facts")
            return {str(name): str(value) for name, value in cur.fetchall()}

    def account_states(self) -> list[StateRow]:
        with self.reading() as cur:
            cur.execute(
                "SELECT s.account_id, s.seq, s.state, e.available_after FROM account_states s "
                "JOIN ledger_entries e ON e.account_id = s.account_id AND e.seq = s.seq "
                "ORDER BY s.account_id"
            )
            return [
                StateRow(r[0], r[0], int(r[1]), bytes(r[2]), available=int(r[3]))
                for r in cur.fetchall()
            ]

    def reservation_states(self) -> list[StateRow]:
        with self.reading() as cur:
            cur.execute(
                "SELECT reservation_id, account_id, seq, state FROM reservation_states"
            )
            return [StateRow(r[0], r[1], int(r[2]), bytes(r[3])) for r in cur.fetchall()]

    def reservation_image(self, reservation_id: str, account_id: str) -> ReservationImage:
        with self.reading() as cur:
            cur.execute(
                "SELECT state FROM reservation_states WHERE reservation_id = ?", (reservation_id,)
            )
            row = cur.fetchone()
            cur.execute(
                "SELECT s.seq, e.occurred_at FROM account_states s JOIN ledger_entries e "
                "ON e.account_id = s.account_id AND e.seq = s.seq WHERE s.account_id = ?",
                (account_id,),
            )
            account = cur.fetchone()
        return ReservationImage(
            state=None if row is None else bytes(row[0]),
            account_seq=0 if account is None else int(account[0]),
            account_seq_at_ms=0 if account is None else int(account[1]),
        )

    def idempotency_states(self, now_ms: int) -> list[StateRow]:
        with self.reading() as cur:
            cur.execute(
                "SELECT record_key, account_id, seq, state, expires_at FROM idempotency_states "
                "WHERE expires_at > ?",
                (now_ms,),
            )
            return [
                StateRow(r[0], r[1], int(r[2]), bytes(r[3]), int(r[4])) for r in cur.fetchall()
            ]

    def catalog_prices(self) -> list[tuple[str, int, int, int]]:
        with self.reading() as cur:
            cur.execute(
                "SELECT operation, version, price, effective_at FROM catalog_prices "
                "ORDER BY version"
            )
            return [(r[0], int(r[1]), int(r[2]), int(r[3])) for r in cur.fetchall()]

    def put_token(self, record: TokenRecord) -> TokenRecord:
        """Keeps a token unless its id is already held (a bootstrap token at a
        restart); returns the record held."""
        with self.transaction() as cur:
            cur.execute(
                f"INSERT INTO tokens ({_TOKEN_COLUMNS}) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (token_id) DO NOTHING",
                (record.token_id, record.secret_sha256, record.role.value,
                 json.dumps(list(record.accounts)), record.name, record.created_at,
                 record.expires_at, record.revoked_at, record.created_by, record.revoked_by),
            )
            held = _token(cur, record.token_id)
        assert held is not None  # inserted or already there, in this transaction
        return held

    def revoke_token(self, token_id: str, revoked_at_ms: int, by: str) -> TokenRecord | None:
        """Revokes a live token (a revoked one keeps its first revocation time and
        revoker); returns its record, None when there is no such token."""
        with self.transaction() as cur:
            cur.execute(
                "UPDATE tokens SET revoked_at = ?, revoked_by = ? "
                "WHERE token_id = ? AND revoked_at = 0",
                (revoked_at_ms, by, token_id),
            )
            return _token(cur, token_id)

    def tokens(self) -> list[TokenRecord]:
        with self.reading() as cur:
            cur.execute(f"SELECT {_TOKEN_COLUMNS} FROM tokens ORDER BY created_at, token_id")
            return [_token_record(row) for row in cur.fetchall()]

    def entry_sums(self) -> dict[str, dict[str, int]]:
        """Per account and event type: units moved, and units lost to expiry."""
        sums: dict[str, dict[str, int]] = {}
        with self.reading() as cur:
            cur.execute(
                "SELECT account_id, type, SUM(units), COUNT(*) FROM ledger_entries "
                "WHERE account_id <> '' GROUP BY account_id, type"
            )
            for account_id, etype, units, _count in cur.fetchall():
                sums.setdefault(account_id, {})[etype] = int(units or 0)
            # units that expired in a grant while a hold had them out
            losing = (EntryType.RELEASE, EntryType.EXPIRE, EntryType.COMMIT, EntryType.REFUND)
            cur.execute(
                "SELECT account_id, detail FROM ledger_entries "
                f"WHERE type IN ({', '.join('?' for _ in losing)})",
                [str(t) for t in losing],
            )
            for account_id, detail in cur.fetchall():
                lost = int(json.loads(detail).get("expired", "0") or 0)
                if lost:
                    per = sums.setdefault(account_id, {})
                    per["lost"] = per.get("lost", 0) + lost
        return sums

    def shard_fences(self) -> dict[int, tuple[int, int]]:
        """Per shard, (epoch, count): the lowest fence its Redis may have."""
        with self.reading() as cur:
            cur.execute("SELECT shard, epoch, count FROM shard_fences")
            return {int(r[0]): (int(r[1]), int(r[2])) for r in cur.fetchall()}

    def latest_snapshot(self) -> tuple[int, int, int] | None:
        """(snapshot_id, taken_at_ms, accounts) of the newest snapshot."""
        with self.reading() as cur:
            cur.execute(
                "SELECT snapshot_id, taken_at, accounts FROM snapshots "
                "ORDER BY snapshot_id DESC LIMIT 1"
            )
            row = cur.fetchone()
        return None if row is None else (int(row[0]), int(row[1]), int(row[2]))


def _contiguous_through(cur: Cursor, account_id: str, after_seq: int, last_seq: int) -> int:
    """The largest k <= last_seq with every entry after_seq + 1 .. k in the ledger
    (after_seq when after_seq + 1 is missing)."""
    cur.execute(
        "SELECT MIN(c.seq) FROM (SELECT CAST(? AS BIGINT) AS seq UNION ALL "
        "SELECT seq FROM ledger_entries WHERE account_id = ? AND seq > ? AND seq < ?) c "
        "WHERE NOT EXISTS (SELECT 1 FROM ledger_entries n "
        "WHERE n.account_id = ? AND n.seq = c.seq + 1)",
        (after_seq, account_id, after_seq, last_seq, account_id),
    )
    first_before_gap = cur.fetchone()[0]
    return last_seq if first_before_gap is None else int(first_before_gap)


_TOKEN_COLUMNS = (
    "token_id, secret_sha256, role, accounts, name, created_at, expires_at, revoked_at, "
    "created_by, revoked_by"
)


def _token(cur: Cursor, token_id: str) -> TokenRecord | None:
    cur.execute(f"SELECT {_TOKEN_COLUMNS} FROM tokens WHERE token_id = ?", (token_id,))
    row = cur.fetchone()
    return None if row is None else _token_record(row)


def _token_record(row: Sequence[Any]) -> TokenRecord:
    return TokenRecord(
        token_id=row[0], secret_sha256=row[1], role=Role(row[2]),
        accounts=tuple(json.loads(row[3])), name=row[4], created_at=int(row[5]),
        expires_at=int(row[6]), revoked_at=int(row[7]), created_by=row[8], revoked_by=row[9],
    )


def detail_text(entry: Entry) -> str:
    """An entry's fields as ledger_entries.detail holds them (compared on conflict)."""
    return json.dumps(entry.detail, sort_keys=True)


class EntryConflict(Exception):
    """Entries whose ids the ledger holds with other content (a batch with them is
    not written)."""

    def __init__(self, entries: Sequence[StreamEntry]) -> None:
        self.entries = list(entries)
        ids = ", ".join(e.entry.entry_id for e in self.entries[:5])
        super().__init__(f"{len(self.entries)} entries conflict with the ledger: {ids}")


class _Translating:
    """A cursor that rewrites `?` placeholders for the dialect."""

    def __init__(self, cursor: Any, translate: Any) -> None:
        self._cursor = cursor
        self._translate = translate

    @property
    def rowcount(self) -> int:
        return int(self._cursor.rowcount)

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        return self._cursor.execute(self._translate(sql), params)

    def fetchall(self) -> list[Any]:
        return list(self._cursor.fetchall())

    def fetchone(self) -> Any:
        return self._cursor.fetchone()


class SqliteLedger(SqlLedger):
    """One file, WAL with synchronous=FULL: a committed batch survives a crash."""

    dialect = "sqlite"
    blob_type = "BLOB"

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path

    def _connect(self) -> Any:
        conn = self._open()
        self._enter_wal(conn)
        conn.execute("PRAGMA synchronous=FULL")
        return conn

    @staticmethod
    def _enter_wal(conn: sqlite3.Connection) -> None:
        """Switching a new file to WAL fails at once, without the busy handler, while
        another process writes to it (two servers starting together on one fresh
        ledger): it is tried again for as long as a busy write would wait."""
        deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
        while True:
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as error:
                if "locked" not in str(error) or time.monotonic() >= deadline:
                    raise
                time.sleep(WAL_RETRY_S)

    def _connect_reader(self) -> Any:
        conn = self._open()
        conn.execute("PRAGMA query_only=ON")
        return conn

    def _open(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT_MS / 1000
        )
        conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        return conn

    def _begin(self, cursor: Cursor, write: bool) -> None:
        # A writer takes the write lock up front, so it waits (busy_timeout)
        # rather than failing half-way; readers never wait in WAL mode (a read
        # transaction reads one snapshot).
        cursor.execute("BEGIN IMMEDIATE" if write else "BEGIN")

    def pragma(self, name: str) -> str:
        with self.reading() as cur:
            cur.execute(f"PRAGMA {name}")
            return str(cur.fetchone()[0])


# The PostgreSQL advisory lock migrations hold: "tally" in ASCII, an id no other
# application of a shared database is likely to take.
MIGRATION_LOCK_KEY = 0x74616C6C79


class PostgresLedger(SqlLedger):
    dialect = "postgresql"
    blob_type = "BYTEA"

    def __init__(self, url: str) -> None:
        super().__init__()
        self.url = url

    def _connect(self) -> Any:
        import psycopg

        return psycopg.connect(self.url, connect_timeout=10)

    def _connect_reader(self) -> Any:
        import psycopg

        conn = psycopg.connect(self.url, connect_timeout=10)
        # every statement of a read transaction sees the same snapshot (a page and
        # the gap looked for in it); read-only snapshots never fail to serialize
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        conn.read_only = True
        return conn

    def _sql(self, sql: str) -> str:
        return sql.replace("?", "%s")

    def _lock_migrations(self, cur: Cursor) -> None:
        # A transaction-level advisory lock: released at commit or rollback, and
        # with the session should the process die.
        cur.execute("SELECT pg_advisory_xact_lock(?)", (MIGRATION_LOCK_KEY,))


def _row_order(event: StreamEntry) -> tuple[str, int, str]:
    return event.entry.account_id, event.entry.seq, event.entry.entry_id


def open_ledger(url: str) -> SqlLedger:
    """sqlite:///relative/or/absolute.db, sqlite:////abs.db, or postgresql://..."""
    parsed = urlparse(url)
    if parsed.scheme == "sqlite":
        path = url[len("sqlite:///"):] if url.startswith("sqlite:///") else parsed.path
        if not path:
            raise ValueError(f"ledger url {redact(url)!r} names no file")
        return SqliteLedger(Path(path))
    if parsed.scheme in {"postgresql", "postgres"}:
        return PostgresLedger(url)
    raise ValueError(f"ledger url {redact(url)!r}: use sqlite:///path or postgresql://...")


def _entry_row(r: Sequence[Any]) -> Entry:
    return Entry(
        entry_id=r[0], account_id=r[1], seq=int(r[2]), type=EntryType(r[3]), reservation_id=r[4],
        operation=r[5], quantity=int(r[6]), units=int(r[7]), available_after=int(r[8]),
        occurred_at_ms=int(r[9]), labels=labels_of(r[10]), idempotency_key=r[11],
        shard=int(r[12]), detail=json.loads(r[13]), fence=int(r[15]),
        principal=r[16],
    )

