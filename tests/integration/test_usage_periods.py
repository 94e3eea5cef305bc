"""GetUsageReport's `period`: a billing period named by its month, resolved by the
server from the scripts' calendar (lib/calendar.lua)."""

from __future__ import annotations

from datetime import UTC, datetime

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from tally_client.v1 import account_pb2, quota_pb2, usage_pb2, usage_pb2_grpc
from tests.support import Running, unique


def ms(year: int, month: int, day: int) -> int:
    return int(datetime(year, month, day, tzinfo=UTC).timestamp() * 1000)


def ts(value_ms: int) -> Timestamp:
    stamp = Timestamp()
    stamp.FromMilliseconds(value_ms)
    return stamp


def usage(running: Running) -> usage_pb2_grpc.UsageServiceStub:
    return usage_pb2_grpc.UsageServiceStub(running.stubs.channel)


async def create(running: Running, anchor_day: int = 0) -> str:
    account_id = unique()
    await running.accounts.CreateAccount(account_pb2.CreateAccountRequest(
        account_id=account_id, monthly_allotment=1000, billing_anchor_day=anchor_day))
    return account_id


async def report(running: Running, **fields: object) -> usage_pb2.UsageReport:
    request = usage_pb2.GetUsageReportRequest(**fields)  # type: ignore[arg-type]
    return (await usage(running).GetUsageReport(request)).report


def bounds(rep: usage_pb2.UsageReport) -> tuple[int, int]:
    return rep.start.ToMilliseconds(), rep.end.ToMilliseconds()


async def test_period_is_the_accounts_billing_period_starting_that_month(
    running: Running,
) -> None:
    """Proves `period` covers the billing period that starts in the month on the account's
    anchor day (the creation day, 25th, here), to the unit, and reports exactly what
    start and end set to the same bounds report."""
    account_id = await create(running)
    await running.quota.Charge(quota_pb2.ChargeRequest(
        account_id=account_id, operation="image.upscale", quantity=2, idempotency_key="a",
        labels={"project": "atlas"}))
    by_period = await report(running, account_id=account_id, period="2026-11",
                             group_by=["OPERATION", "LABEL:project"])
    assert bounds(by_period) == (ms(2026, 11, 25), ms(2026, 12, 25))
    assert by_period.total_units == 20 and by_period.total_count == 1
    by_range = await report(running, account_id=account_id, start=ts(ms(2026, 11, 25)),
                            end=ts(ms(2026, 12, 25)), group_by=["OPERATION", "LABEL:project"])
    assert by_period.rows == by_range.rows
    before = await report(running, account_id=account_id, period="2026-10")
    assert bounds(before) == (ms(2026, 10, 25), ms(2026, 11, 25))
    assert before.total_units == 0


async def test_period_clamps_the_anchor_day_to_short_months(running: Running) -> None:
    """Proves an anchor day past a month's end starts that month's period on its last
    day (February 28th and, in a leap year, 29th) and ends it on the next anchor day."""
    account_id = await create(running, anchor_day=31)
    for period, start, end in [
        ("2027-02", ms(2027, 2, 28), ms(2027, 3, 31)),
        ("2028-02", ms(2028, 2, 29), ms(2028, 3, 31)),
        ("2027-04", ms(2027, 4, 30), ms(2027, 5, 31)),
        ("2026-12", ms(2026, 12, 31), ms(2027, 1, 31)),
    ]:
        rep = await report(running, account_id=account_id, period=period)
        assert bounds(rep) == (start, end), period


async def test_all_accounts_period_is_the_calendar_month(running: Running) -> None:
    """Proves an all-accounts report takes `period` instead of start: the calendar month
    in UTC, whatever the accounts' anchor days, read from the ledger."""
    account_id = await create(running)
    await running.quota.Charge(quota_pb2.ChargeRequest(
        account_id=account_id, operation="image.vectorize", quantity=3, idempotency_key="a"))
    await running.authority.flusher.flush_all()
    rep = await report(running, period="2026-11", group_by=["OPERATION"])
    assert bounds(rep) == (ms(2026, 11, 1), ms(2026, 12, 1))
    assert [(r.operation, r.units) for r in rep.rows if r.account_id == account_id] == [
        ("image.vectorize", 15)
    ]


@pytest.mark.parametrize("period", [
    "2026-13", "2026-00", "2026-1", "26-11", "2026/11", "2026-11-01", " 2026-11", "1969-12",
    "9999-01", "२०२६-११", "november",
])
async def test_a_malformed_period_is_refused_naming_it(running: Running, period: str) -> None:
    """Proves a period that is not a month YYYY-MM within the supported years is
    INVALID_ARGUMENT naming `period`, for an account's report and every account's."""
    account_id = await create(running)
    for request in (usage_pb2.GetUsageReportRequest(account_id=account_id, period=period),
                    usage_pb2.GetUsageReportRequest(period=period)):
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await usage(running).GetUsageReport(request)
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "period" in (bad.value.details() or "")


async def test_period_with_start_or_end_is_refused(running: Running) -> None:
    """Proves `period` together with `start` or `end` is INVALID_ARGUMENT naming
    `period`: a report has one range."""
    account_id = await create(running)
    for bound in ({"start": ts(ms(2026, 11, 25))}, {"end": ts(ms(2026, 12, 25))}):
        for owner in ({"account_id": account_id}, {}):
            with pytest.raises(grpc.aio.AioRpcError) as bad:
                await report(running, period="2026-11", **owner, **bound)
            assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "period" in (bad.value.details() or "")
