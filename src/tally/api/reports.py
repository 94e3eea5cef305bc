"""GetUsageReport: usage grouped by operation, label, day or hour, the current
period's summary and a forecast.

Usage is net: each charge (commit, late commit, charge) adds its units,
quantity and a count of one in the hour it was charged; a refund takes its
units back in the hour of the charge it refunds. The account's current billing
period comes from the counters the Lua scripts keep (exact in real time);
earlier time comes from the ledger, read a page at a time and folded into the
report's rows as it comes (memory grows with the report, not with the entries
behind it). Time bounds are whole UTC hours, or the billing period `period`
names (its bounds come from the scripts' calendar).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from tally.api import convert
from tally.api import validation as v
from tally.auth.scope import require_account, visible
from tally.domain.errors import InvalidArgument
from tally.domain.limits import (
    PERIOD_YEAR_MAX,
    PERIOD_YEAR_MIN,
    REPORT_GROUP_BY_MAX,
    REPORT_SPAN_DAYS_MAX,
)
from tally.domain.usage import HOUR_MS, OTHER_LABEL, OTHER_LABELS, Usage, from_entries
from tally.ledger.ledger import Ledger
from tally.store.contract import BalanceRequest, BalanceView
from tally.store.quota_store import QuotaStore
from tally_client.v1 import usage_pb2

DAY_MS = 24 * HOUR_MS
REPORT_SPAN_MS_MAX = REPORT_SPAN_DAYS_MAX * DAY_MS
FORECAST_WINDOW_DAYS = 7
PERIOD = re.compile(r"([0-9]{4})-([0-9]{2})")
# (year, month) of a requested `period`
Month = tuple[int, int]
# An all-accounts report's `period` is the calendar month.
CALENDAR_ANCHOR_DAY = 1


@dataclass(frozen=True)
class Grouping:
    operation: bool
    label_keys: tuple[str, ...]
    day: bool
    hour: bool
    by_account: bool

    def key(self, usage: Usage) -> tuple[Any, ...]:
        bucket = usage.bucket_ms if self.hour else (
            usage.bucket_ms // DAY_MS * DAY_MS if self.day else 0
        )
        # rows come out in this order: by account, then in time, then by name
        return (
            usage.account_id if self.by_account else "",
            bucket,
            usage.operation if self.operation else "",
            tuple(label_value(usage, k) for k in self.label_keys),
        )


def label_value(usage: Usage, key: str) -> str:
    """What a row grouped by `key` shows for the usage: usage the current period's
    counters hold under the other label set (not tracked by label set) shows "*"."""
    if usage.labels == OTHER_LABELS:
        return OTHER_LABEL
    return usage.labels.get(key, "")


def parse_grouping(group_by: Iterable[str], by_account: bool) -> Grouping:
    items = list(group_by)
    if len(items) > REPORT_GROUP_BY_MAX:
        raise InvalidArgument(f"group_by takes at most {REPORT_GROUP_BY_MAX} entries",
                              field_name="group_by")
    keys: list[str] = []
    flags = {"OPERATION": False, "DAY": False, "HOUR": False}
    for item in items:
        upper = item.upper()
        if upper in flags:
            flags[upper] = True
        elif upper.startswith("LABEL:") and v.LABEL_KEY.fullmatch(item[6:]):
            keys.append(item[6:])
        else:
            raise InvalidArgument(
                f"group_by entry {item[:80]!r} is not OPERATION, LABEL:<key>, DAY or HOUR",
                field_name="group_by",
            )
    return Grouping(flags["OPERATION"], tuple(keys), flags["DAY"], flags["HOUR"], by_account)


def whole_hour(ms: int, field: str) -> int:
    if ms % HOUR_MS:
        raise InvalidArgument(f"{field} must be a whole UTC hour", field_name=field)
    return ms


class Totals:
    """A report's rows and totals, summed as usage is read."""

    def __init__(self, grouping: Grouping, start_ms: int, end_ms: int) -> None:
        self.grouping = grouping
        self.start_ms = start_ms
        self.end_ms = end_ms
        self.sums: dict[tuple[Any, ...], list[int]] = {}
        self.units = self.quantity = self.count = 0

    def add(self, usages: Iterable[Usage]) -> None:
        """Adds the usages within [start_ms, end_ms)."""
        for usage in usages:
            if not self.start_ms <= usage.bucket_ms < self.end_ms:
                continue
            sums = self.sums.setdefault(self.grouping.key(usage), [0, 0, 0])
            sums[0] += usage.units
            sums[1] += usage.quantity
            sums[2] += usage.count
            self.units += usage.units
            self.quantity += usage.quantity
            self.count += usage.count

    def report(self) -> usage_pb2.UsageReport:
        return usage_pb2.UsageReport(
            rows=self.rows(),
            total_units=self.units,
            total_quantity=self.quantity,
            total_count=self.count,
            start=convert.timestamp(self.start_ms),
            end=convert.timestamp(self.end_ms),
        )

    def rows(self) -> list[usage_pb2.UsageRow]:
        result = []
        for (account_id, bucket, operation, label_values), (units, quantity, count) in sorted(
            self.sums.items()
        ):
            row = usage_pb2.UsageRow(
                account_id=account_id, operation=operation, units=units, quantity=quantity,
                count=count, labels=dict(zip(self.grouping.label_keys, label_values, strict=True)),
            )
            if self.grouping.day or self.grouping.hour:
                row.bucket_start.CopyFrom(convert.timestamp(bucket))
            result.append(row)
        return result


async def add_account_usage(
    store: QuotaStore, ledger: Ledger, account_id: str, period_start_ms: int, totals: Totals
) -> None:
    """Counters for the current period, the ledger before it."""
    if totals.end_ms > period_start_ms:
        counted = await store.usage(account_id, period_start_ms, None)
        totals.add(u for u in counted if u.bucket_ms >= period_start_ms)
    if totals.start_ms < period_start_ms:
        async for page in ledger.usage_pages(totals.start_ms, account_id):
            totals.add(u for u in from_entries(page) if u.bucket_ms < period_start_ms)


def period_summary(balance: BalanceView) -> usage_pb2.PeriodSummary:
    allotment = sum(
        g.units_granted for g in balance.grants
        if g.kind == "ALLOTMENT" and g.expires_at == balance.period_end
    )
    return usage_pb2.PeriodSummary(
        period_start=convert.timestamp(balance.period_start),
        period_end=convert.timestamp(balance.period_end),
        allotment=allotment,
        used=balance.period_consumed,
        remaining=balance.available,
        purchased=balance.period_purchased,
        overage=balance.overage_used,
        expired=balance.period_expired,
        held=balance.held,
    )


def forecast(
    balance: BalanceView, window: tuple[int, int], window_units: int, now_ms: int,
) -> usage_pb2.Forecast:
    """The rate is the net usage of the window's hours over the window's length
    (shorter for a younger account)."""
    days = max(window[1] - window[0], HOUR_MS) / DAY_MS
    per_day = window_units / days
    period_end = balance.period_end
    days_left = max(0, period_end - now_ms) / DAY_MS
    result = usage_pb2.Forecast(
        window_days=FORECAST_WINDOW_DAYS,
        units_per_day=round(per_day),
        projected_period_consumption=balance.period_consumed + round(per_day * days_left),
        projected_overage=max(0, round(per_day * days_left) - max(0, balance.available)),
    )
    if per_day > 0:
        runs_out_ms = now_ms + int(balance.spendable / per_day * DAY_MS)
        if runs_out_ms < period_end:
            result.runs_out_at.CopyFrom(convert.timestamp(runs_out_ms))
    return result


async def usage_report(
    store: QuotaStore, ledger: Ledger, request: usage_pb2.GetUsageReportRequest
) -> usage_pb2.UsageReport:
    by_account = not request.account_id
    grouping = parse_grouping(request.group_by, by_account)
    month = requested_month(request)
    now_ms = store.clock.now_ms()
    next_hour = now_ms // HOUR_MS * HOUR_MS + HOUR_MS  # the end of the current hour
    if by_account:
        return await all_accounts_report(store, ledger, request, month, grouping, next_hour)
    account_id = v.account_id(request.account_id)
    require_account(account_id)
    reply = await store.balance(BalanceRequest(account_id), None)
    balance, account = reply.balance, reply.account
    period_start = balance.period_start
    start_ms, end_ms = await requested_range(
        store, request, month, account.billing_anchor_day, period_start, next_hour
    )
    totals = Totals(grouping, start_ms, end_ms)
    await add_account_usage(store, ledger, account_id, period_start, totals)
    created_hour = account.created_at // HOUR_MS * HOUR_MS
    window = (max(next_hour - FORECAST_WINDOW_DAYS * DAY_MS, created_hour), next_hour)
    window_totals = Totals(parse_grouping((), by_account=False), *window)
    await add_account_usage(store, ledger, account_id, period_start, window_totals)
    report = totals.report()
    report.period.CopyFrom(period_summary(balance))
    report.forecast.CopyFrom(forecast(balance, window, window_totals.units, now_ms))
    return report


def requested_month(request: usage_pb2.GetUsageReportRequest) -> Month | None:
    """The (year, month) `period` names; None when it is unset. It excludes start and end."""
    if not request.period:
        return None
    if request.HasField("start") or request.HasField("end"):
        raise InvalidArgument("period cannot be combined with start or end",
                              field_name="period")
    match = PERIOD.fullmatch(request.period)
    year, month = (int(match[1]), int(match[2])) if match else (0, 0)
    if not (PERIOD_YEAR_MIN <= year <= PERIOD_YEAR_MAX and 1 <= month <= 12):
        raise InvalidArgument(
            f"period must be a month YYYY-MM from {PERIOD_YEAR_MIN}-01 to "
            f"{PERIOD_YEAR_MAX}-12, got {request.period[:80]!r}",
            field_name="period",
        )
    return year, month


async def requested_range(
    store: QuotaStore, request: usage_pb2.GetUsageReportRequest, month: Month | None,
    anchor_day: int, default_start_ms: int, default_end_ms: int,
) -> tuple[int, int]:
    """The [start, end) to report: the billing period starting in the requested month
    on anchor_day, else what start and end say."""
    if month is None:
        return report_range(request, default_start_ms, default_end_ms)
    return await store.billing_period(*month, anchor_day, None)


def report_range(
    request: usage_pb2.GetUsageReportRequest, default_start_ms: int, default_end_ms: int
) -> tuple[int, int]:
    """The requested [start, end): whole hours, at most REPORT_SPAN_DAYS_MAX days long."""
    start_ms = (
        whole_hour(v.timestamp_ms(request.start, "start"), "start")
        if request.HasField("start") else default_start_ms
    )
    end_ms = (
        whole_hour(v.timestamp_ms(request.end, "end"), "end")
        if request.HasField("end") else default_end_ms
    )
    if end_ms <= start_ms:
        raise InvalidArgument("end must be after start", field_name="end")
    if end_ms - start_ms > REPORT_SPAN_MS_MAX:
        raise InvalidArgument(
            f"end must be at most {REPORT_SPAN_DAYS_MAX} days after start "
            "(a report covers at most that span)",
            field_name="end",
        )
    return start_ms, end_ms


async def all_accounts_report(
    store: QuotaStore, ledger: Ledger, request: usage_pb2.GetUsageReportRequest,
    month: Month | None, grouping: Grouping, next_hour: int,
) -> usage_pb2.UsageReport:
    """Every account, from the ledger (behind Redis by at most the flush interval)."""
    if not request.HasField("start") and month is None:
        raise InvalidArgument("start or period is required for an all-accounts report",
                              field_name="start")
    start_ms, end_ms = await requested_range(
        store, request, month, CALENDAR_ANCHOR_DAY, 0, next_hour
    )
    totals = Totals(grouping, start_ms, end_ms)
    async for page in ledger.usage_pages(start_ms):
        # a scoped caller's report holds its own accounts' rows alone
        totals.add(u for u in from_entries(page) if visible(u.account_id))
    return totals.report()
