"""The typed script contract: each Lua script's request and reply, one name per
concept across Python, Lua and the protos. Each script's header says the same.
"""

from __future__ import annotations

from typing import TypedDict

# --- usage counters and billing periods: read_usage, restore_usage, billing_period ---
# The counters' field format lives in lib/usage.lua alone; Python sees records.


class UsageRecord(TypedDict):
    """One (hour, operation, label set) of a billing period's usage counters."""

    bucket_ms: int
    operation: str
    labels: dict[str, str]
    units: int  # net of refunds: may be negative
    quantity: int
    count: int


class ReadUsageRequest(TypedDict):
    now: int


class ReadUsageReply(TypedDict):
    records: list[UsageRecord]


class RestoreUsageRequest(TypedDict):
    now: int
    replace: bool  # the first call of a period: delete its counters first
    period_end: int
    records: list[UsageRecord]  # at most USAGE_RECORDS_PER_CALL_MAX


class RestoreUsageReply(TypedDict):
    records: int


class BillingPeriodRequest(TypedDict):
    now: int
    year: int
    month: int
    anchor_day: int


class BillingPeriodReply(TypedDict):
    period_start: int
    period_end: int
