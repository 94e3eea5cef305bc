"""Versioned migrations, the same schema on SQLite and PostgreSQL.

`{blob}` is the binary column type of the dialect. Each migration runs once,
in its own transaction, and is recorded in schema_migrations.
"""

from __future__ import annotations

MIGRATIONS: tuple[tuple[int, str, tuple[str, ...]], ...] = (
    (
        1,
        "events, state images, catalog and snapshots",
        (
            """CREATE TABLE ledger_entries (
                entry_id TEXT PRIMARY KEY,
                account_id TEXT NOT NULL,
                seq BIGINT NOT NULL,
                type TEXT NOT NULL,
                reservation_id TEXT NOT NULL,
                operation TEXT NOT NULL,
                quantity BIGINT NOT NULL,
                units BIGINT NOT NULL,
                available_after BIGINT NOT NULL,
                occurred_at BIGINT NOT NULL,
                labels TEXT NOT NULL,
                idempotency_key TEXT NOT NULL,
                shard INTEGER NOT NULL,
                detail TEXT NOT NULL,
                flushed_at BIGINT NOT NULL
            )""",
            "CREATE INDEX ledger_entries_by_account ON ledger_entries (account_id, seq)",
            "CREATE INDEX ledger_entries_by_time ON ledger_entries (account_id, occurred_at)",
            """CREATE TABLE account_states (
                account_id TEXT PRIMARY KEY,
                shard INTEGER NOT NULL,
                seq BIGINT NOT NULL,
                state {blob} NOT NULL,
                updated_at BIGINT NOT NULL
            )""",
            """CREATE TABLE reservation_states (
                reservation_id TEXT PRIMARY KEY,
                account_id TEXT NOT NULL,
                seq BIGINT NOT NULL,
                state {blob} NOT NULL
            )""",
            "CREATE INDEX reservation_states_by_account ON reservation_states (account_id)",
            """CREATE TABLE idempotency_states (
                record_key TEXT PRIMARY KEY,
                account_id TEXT NOT NULL,
                seq BIGINT NOT NULL,
                state {blob} NOT NULL,
                expires_at BIGINT NOT NULL
            )""",
            """CREATE TABLE catalog_prices (
                operation TEXT NOT NULL,
                version BIGINT NOT NULL,
                price BIGINT NOT NULL,
                effective_at BIGINT NOT NULL,
                PRIMARY KEY (operation, version)
            )""",
            """CREATE TABLE snapshots (
                snapshot_id BIGINT PRIMARY KEY,
                taken_at BIGINT NOT NULL,
                reason TEXT NOT NULL,
                accounts BIGINT NOT NULL,
                positions TEXT NOT NULL
            )""",
            """CREATE TABLE snapshot_balances (
                snapshot_id BIGINT NOT NULL,
                account_id TEXT NOT NULL,
                seq BIGINT NOT NULL,
                available BIGINT NOT NULL,
                held BIGINT NOT NULL,
                granted_total BIGINT NOT NULL,
                charged_total BIGINT NOT NULL,
                refunded_total BIGINT NOT NULL,
                expired_total BIGINT NOT NULL,
                state {blob} NOT NULL,
                PRIMARY KEY (snapshot_id, account_id)
            )""",
            """CREATE TABLE flush_positions (
                shard INTEGER PRIMARY KEY,
                stream_id TEXT NOT NULL,
                updated_at BIGINT NOT NULL
            )""",
        ),
    ),
    (
        2,
        "pruning: when a reservation image's hold closed; lapsed images found by index",
        (
            # 0 while held. Images written before this migration keep 0 (never pruned):
            # Tally was never released with version 1 alone.
            "ALTER TABLE reservation_states ADD COLUMN closed_at BIGINT NOT NULL DEFAULT 0",
            "CREATE INDEX reservation_states_by_closed ON reservation_states (closed_at)",
            "CREATE INDEX idempotency_states_by_expiry ON idempotency_states (expires_at)",
        ),
    ),
    (
        3,
        "shard fences: each entry's fence count, each shard's highest",
        (
            "ALTER TABLE ledger_entries ADD COLUMN fence BIGINT NOT NULL DEFAULT 0",
            # epoch: the one recovery last started; count: the highest count of
            # the shard's entries or set by that recovery (store/lua/lib/fence.lua)
            """CREATE TABLE shard_fences (
                shard INTEGER PRIMARY KEY,
                epoch BIGINT NOT NULL,
                count BIGINT NOT NULL,
                updated_at BIGINT NOT NULL
            )""",
        ),
    ),
    (
        4,
        "quarantined entries: stream entries recovery set aside as conflicting with the ledger",
        (
            # content: the entry's fields as the stream held them (ledger_entries.detail's form)
            """CREATE TABLE quarantined_entries (
                shard INTEGER NOT NULL,
                stream_id TEXT NOT NULL,
                entry_id TEXT NOT NULL,
                account_id TEXT NOT NULL,
                content TEXT NOT NULL,
                quarantined_at BIGINT NOT NULL,
                PRIMARY KEY (shard, stream_id)
            )""",
        ),
    ),
    (
        5,
        "bearer tokens: the durable copy of Redis's token records (secrets hashed)",
        (
            # accounts: a JSON list (empty: every account); times in ms, 0: never
            """CREATE TABLE tokens (
                token_id TEXT PRIMARY KEY,
                secret_sha256 TEXT NOT NULL,
                role TEXT NOT NULL,
                accounts TEXT NOT NULL,
                name TEXT NOT NULL,
                created_at BIGINT NOT NULL,
                expires_at BIGINT NOT NULL,
                revoked_at BIGINT NOT NULL
            )""",
        ),
    ),
    (
        6,
        "audit: the principal that did a money-in or admin action",
        (
            # '' for every other entry, and for those written before this migration
            "ALTER TABLE ledger_entries ADD COLUMN principal TEXT NOT NULL DEFAULT ''",
        ),
    ),
    (
        7,
        "audit: the principal that created and that revoked each token",
        (
            # '' for tokens made before this migration (and revoked_by while live)
            "ALTER TABLE tokens ADD COLUMN created_by TEXT NOT NULL DEFAULT ''",
            "ALTER TABLE tokens ADD COLUMN revoked_by TEXT NOT NULL DEFAULT ''",
        ),
    ),
    (
        8,
        "deployment facts: the shard layout the data is written in",
        (
            # name: `shards` or `tag_scheme` (tally/deployment.py); written once, never
            # updated. A ledger migrated here with entries already has no rows: the
            # layout is taken from Redis (or the pre-record default) at the next start.
            """CREATE TABLE deployment_facts (
                name TEXT PRIMARY KEY,
                value TEXT NOT NULL,
                recorded_at BIGINT NOT NULL
            )""",
        ),
    ),
)

LATEST_VERSION = MIGRATIONS[-1][0]
