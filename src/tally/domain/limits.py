"""Every limit Tally enforces, defined once.

The API's validation imports these, and the script composer (store/scripts.py)
generates a `local NAME = value` line for each into every Lua script, so Python
and Lua cannot disagree about a bound. Only integers live here: they are what
both languages read the same way (every value is below 2^53, so exact in Lua).
"""

from __future__ import annotations

# Amounts: Lua numbers are doubles, exact up to 2^53 - 1.
UNITS_MAX = 2**53 - 1
# Clock values: 9999-12-31T23:59:59.999Z, the last instant a Timestamp can show.
TIMESTAMP_MS_MAX = 253_402_300_799_999
# The years a billing period named by its month (`YYYY-MM`) may start in: every
# period of the last one ends before TIMESTAMP_MS_MAX.
PERIOD_YEAR_MIN = 1970
PERIOD_YEAR_MAX = 9998

# Text fields, in bytes.
ACCOUNT_ID_BYTES_MAX = 128
OPERATION_BYTES_MAX = 128
IDEMPOTENCY_KEY_BYTES_MAX = 128
# `<shard tag>.<sequence>.<account id>` (see store/keys.py) with room to spare.
RESERVATION_ID_BYTES_MAX = 300
REASON_BYTES_MAX = 512
REFERENCE_BYTES_MAX = 256
# Who did a money-in or admin action, as its events record it (auth/principal.py).
PRINCIPAL_ID_BYTES_MAX = 256
FINGERPRINT_BYTES_MAX = 64
# An idempotency record keeps this many hex characters (64 bits) of the request's
# fingerprint: one record per call is kept for the whole window, so every byte
# counts, and 64 bits tell a different request under the same key apart.
FINGERPRINT_STORED_CHARS = 16
LABEL_KEY_BYTES_MAX = 63
LABEL_VALUE_BYTES_MAX = 256
LABELS_MAX = 32
# `label:<key>=<value>` or `operation:<operation>`.
BUDGET_ID_BYTES_MAX = 400
# What the store passes to every script about the shard (store/keys.py's names fit easily).
KEY_PREFIX_BYTES_MAX = 64
SHARD_TAG_BYTES_MAX = 16

# Reads: rows per ListLedgerEntries page (and entry types it filters on, each once at
# most), and a GetUsageReport's span and grouping.
LEDGER_PAGE_SIZE_MAX = 1000
REPORT_SPAN_DAYS_MAX = 400
REPORT_GROUP_BY_MAX = 4

# Per account.
BILLING_ANCHOR_DAY_MAX = 31
BUDGETS_MAX = 64
GRANTS_MAX = 1000
ALERT_PERCENTAGES_MAX = 16
ALERT_PERCENT_MIN = 1
ALERT_PERCENT_MAX = 1000
# Packs one AUTO_PURCHASE top-up may buy at once.
AUTO_PURCHASE_PACKS_MAX = 1000

# Items of one ReserveBatch, CommitBatch or RefundBatch call.
BATCH_ITEMS_MAX = 1000

# Work per script call: due holds one touch of an account expires (the reaper does the rest).
LAZY_EXPIRIES_MAX = 100
# Usage records recovery writes back per call of restore_usage.lua.
USAGE_RECORDS_PER_CALL_MAX = 1000

# Usage counters outlive their billing period this long: nothing reads them
# after it (past periods are reported, and recovered, from the ledger); the
# grace covers servers whose clocks disagree a little about the period's end.
USAGE_RETENTION_MS = 86_400_000  # 1 day
# Label sets one account's usage counters track per billing period (the first
# ones charged); usage with any other label set is counted under the one
# "other" label set (domain/usage.py OTHER_LABELS).
USAGE_LABEL_SETS_MAX = 64
# A label set longer than this as text (its pairs sorted by key, as JSON) is
# counted under the other label set too.
USAGE_LABEL_SET_BYTES_MAX = 1024

# Leases of background work (store/leases.py): an owner id is `host-pid-random`
# (a host name is at most 253 bytes), a lease lasts at most an hour unrenewed, and
# a job's registry of live processes counts this many at most.
LEASE_OWNER_BYTES_MAX = 300
LEASE_TTL_MS_MAX = 3_600_000
LEASE_MEMBERS_MAX = 1024
