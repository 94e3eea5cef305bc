"""Usage records between the domain and the usage-counter scripts.

The counters' field format is lib/usage.lua's alone: read_usage.lua returns a
billing period's counters as records and restore_usage.lua writes records
back (recovery). Here records become domain Usage and back.
"""

from __future__ import annotations

from collections.abc import Iterable

from tally.domain.limits import USAGE_RECORDS_PER_CALL_MAX
from tally.domain.usage import Usage, net
from tally.store.contract import RestoreUsageRequest, UsageRecord


def usage_of(account_id: str, record: UsageRecord) -> Usage:
    """A record as read_usage.lua returns it, as the account's usage."""
    return Usage(
        bucket_ms=record.bucket_ms, account_id=account_id, operation=record.operation,
        labels=record.labels, units=record.units, quantity=record.quantity,
        count=record.count,
    )


def record_of(usage: Usage) -> UsageRecord:
    return UsageRecord(bucket_ms=usage.bucket_ms, operation=usage.operation,
                       labels=usage.labels, units=usage.units, quantity=usage.quantity,
                       count=usage.count)


def restore_requests(
    period_start_ms: int, period_end_ms: int, usages: Iterable[Usage]
) -> list[RestoreUsageRequest]:
    """The restore_usage.lua calls that replace a period's counters with these usage
    records (netted per counter first): at least one, the first replacing."""
    records = tuple(record_of(usage) for usage in net(usages))
    return [
        RestoreUsageRequest(period_start=period_start_ms, replace=start == 0,
                            period_end=period_end_ms,
                            records=records[start : start + USAGE_RECORDS_PER_CALL_MAX])
        for start in range(0, max(len(records), 1), USAGE_RECORDS_PER_CALL_MAX)
    ]
