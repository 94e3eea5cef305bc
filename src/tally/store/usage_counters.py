"""Usage records between the domain and the usage-counter scripts.

The counters' field format is lib/usage.lua's alone: read_usage.lua returns a
billing period's counters as records and restore_usage.lua writes records
back (recovery). Here records become domain Usage and back.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from tally.domain.limits import USAGE_RECORDS_PER_CALL_MAX
from tally.domain.usage import Usage, net
from tally.store.contract import RestoreUsageRequest, UsageRecord


def usage_of(account_id: str, record: Mapping[str, Any]) -> Usage:
    """A record as read_usage.lua returns it. Lua's msgpack cannot tell an empty
    map from an empty list, so no labels may arrive as either."""
    return Usage(
        bucket_ms=int(record["bucket_ms"]), account_id=account_id,
        operation=str(record["operation"]), labels=dict(record["labels"] or {}),
        units=int(record["units"]), quantity=int(record["quantity"]),
        count=int(record["count"]),
    )


def record_of(usage: Usage) -> UsageRecord:
    return UsageRecord(bucket_ms=usage.bucket_ms, operation=usage.operation,
                       labels=usage.labels, units=usage.units, quantity=usage.quantity,
                       count=usage.count)


def restore_requests(
    now_ms: int, period_end_ms: int, usages: Iterable[Usage]
) -> list[RestoreUsageRequest]:
    """The restore_usage.lua calls that replace a period's counters with these usage
    records (netted per counter first): at least one, the first replacing."""
    records = [record_of(usage) for usage in net(usages)]
    return [
        RestoreUsageRequest(now=now_ms, replace=start == 0, period_end=period_end_ms,
                            records=records[start : start + USAGE_RECORDS_PER_CALL_MAX])
        for start in range(0, max(len(records), 1), USAGE_RECORDS_PER_CALL_MAX)
    ]
