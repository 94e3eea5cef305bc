"""Read limits at their bounds: ledger page sizes and entry-type filters, a usage
report's span and grouping; each refusal names its field and rule, and nothing moves."""

from __future__ import annotations

from typing import Any, cast

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from tally.config import MAX_RECEIVE_MESSAGE_BYTES as MESSAGE_BYTES_MAX
from tally.domain.events import EntryType
from tally.domain.limits import LEDGER_PAGE_SIZE_MAX, REPORT_GROUP_BY_MAX, REPORT_SPAN_DAYS_MAX
from tally_client.v1 import account_pb2, quota_pb2, usage_pb2
from tally_client.v1.usage_pb2_grpc import UsageServiceStub
from tests.guard_support import assert_status
from tests.support import T0_MS, Running, unique

HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS


def _at(ms: int) -> Timestamp:
    stamp = Timestamp()
    stamp.FromMilliseconds(ms)
    return stamp


async def _account(running: Running) -> str:
    account_id = unique("limits")
    await running.accounts.CreateAccount(
        account_pb2.CreateAccountRequest(account_id=account_id, monthly_allotment=500)
    )
    return account_id


async def _unmoved(running: Running, account_id: str) -> None:
    balance = (await running.quota.GetBalance(
        quota_pb2.GetBalanceRequest(account_id=account_id)
    )).balance
    assert (balance.available, balance.held, balance.units_charged_total) == (500, 0, 0)


async def _refused(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await call
    return refused.value


async def test_ledger_page_size_and_types_at_their_bounds(running: Running) -> None:
    """Proves ListLedgerEntries takes page_size up to LEDGER_PAGE_SIZE_MAX and one
    filter entry per entry type, and refuses one more of either with INVALID_ARGUMENT
    naming the field."""
    account_id = await _account(running)
    list_entries = running.accounts.ListLedgerEntries
    every_type = [t.value for t in EntryType]
    await list_entries(account_pb2.ListLedgerEntriesRequest(
        account_id=account_id, page_size=LEDGER_PAGE_SIZE_MAX, types=every_type))
    error = await _refused(list_entries(account_pb2.ListLedgerEntriesRequest(
        account_id=account_id, page_size=LEDGER_PAGE_SIZE_MAX + 1)))
    assert_status(error, grpc.StatusCode.INVALID_ARGUMENT, "page_size")
    assert str(LEDGER_PAGE_SIZE_MAX) in (error.details() or "")
    error = await _refused(list_entries(account_pb2.ListLedgerEntriesRequest(
        account_id=account_id, types=[*every_type, "charge"])))
    assert_status(error, grpc.StatusCode.INVALID_ARGUMENT, "types")
    await _unmoved(running, account_id)


async def test_usage_report_span_and_grouping_at_their_bounds(running: Running) -> None:
    """Proves GetUsageReport covers up to REPORT_SPAN_DAYS_MAX days and groups by up to
    REPORT_GROUP_BY_MAX entries, and refuses an hour more or one entry more with
    INVALID_ARGUMENT naming the field and the bound."""
    account_id = await _account(running)
    report = cast(Any, UsageServiceStub(running.stubs.channel)).GetUsageReport
    end_ms = T0_MS // HOUR_MS * HOUR_MS
    start_ms = end_ms - REPORT_SPAN_DAYS_MAX * DAY_MS
    grouping = ["OPERATION", "DAY", "HOUR", "LABEL:tier"]
    assert len(grouping) == REPORT_GROUP_BY_MAX
    await report(usage_pb2.GetUsageReportRequest(
        account_id=account_id, start=_at(start_ms), end=_at(end_ms), group_by=grouping))
    error = await _refused(report(usage_pb2.GetUsageReportRequest(
        account_id=account_id, start=_at(start_ms - HOUR_MS), end=_at(end_ms))))
    assert_status(error, grpc.StatusCode.INVALID_ARGUMENT, "end")
    assert f"{REPORT_SPAN_DAYS_MAX} days" in (error.details() or "")
    error = await _refused(report(usage_pb2.GetUsageReportRequest(
        account_id=account_id, group_by=[*grouping, "LABEL:model"])))
    assert_status(error, grpc.StatusCode.INVALID_ARGUMENT, "group_by")
    await _unmoved(running, account_id)


async def test_a_request_past_the_message_size_is_resource_exhausted(running: Running) -> None:
    """Proves a request of exactly MESSAGE_BYTES_MAX bytes is read (and refused for its
    field), and one byte more is RESOURCE_EXHAUSTED before any work."""
    def create(id_bytes: int) -> account_pb2.CreateAccountRequest:
        return account_pb2.CreateAccountRequest(account_id="a" * id_bytes)

    # the field's tag and a 3-byte length prefix come before the id
    at_bound = create(MESSAGE_BYTES_MAX - 4)
    assert at_bound.ByteSize() == MESSAGE_BYTES_MAX
    error = await _refused(running.accounts.CreateAccount(at_bound))
    assert_status(error, grpc.StatusCode.INVALID_ARGUMENT, "account_id")
    error = await _refused(running.accounts.CreateAccount(create(MESSAGE_BYTES_MAX - 3)))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
