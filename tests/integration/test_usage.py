"""Cost control and visibility: usage reports, budgets, alerts and forecasts."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime

import grpc
import pytest
import pytest_asyncio
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_status import rpc_status

from tally_client.v1 import account_pb2, common_pb2, quota_pb2, usage_pb2, usage_pb2_grpc
from tests.support import T0_MS, RedisProcess, Running, start_running, stop_running, unique

HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS


def ms(year: int, month: int, day: int, hour: int = 0) -> int:
    return int(datetime(year, month, day, hour, tzinfo=UTC).timestamp() * 1000)


def ts(value_ms: int) -> Timestamp:
    stamp = Timestamp()
    stamp.FromMilliseconds(value_ms)
    return stamp


@pytest_asyncio.fixture
async def live(own_redis: RedisProcess, tmp_path: object) -> AsyncIterator[Running]:
    """An authority whose ledger is flushed by hand (background flusher idle)."""
    running = await start_running(
        own_redis.url, ledger_url=f"sqlite:///{tmp_path}/ledger.sqlite3",
        flush_interval="1h", snapshot_interval="1h",
    )
    yield running
    await stop_running(running)


def usage(running: Running) -> usage_pb2_grpc.UsageServiceStub:
    return usage_pb2_grpc.UsageServiceStub(running.stubs.channel)


async def create(running: Running, allotment: int, **fields: object) -> str:
    account_id = unique()
    await running.accounts.CreateAccount(
        account_pb2.CreateAccountRequest(
            account_id=account_id, monthly_allotment=allotment, **fields  # type: ignore[arg-type]
        )
    )
    return account_id


async def charge(running: Running, account_id: str, operation: str, quantity: int, key: str,
                 **labels: str) -> quota_pb2.ChargeResponse:
    return await running.quota.Charge(
        quota_pb2.ChargeRequest(account_id=account_id, operation=operation, quantity=quantity,
                                idempotency_key=key, labels=labels)
    )


async def report(running: Running, account_id: str, *group_by: str, start_ms: int = 0,
                 end_ms: int = 0) -> usage_pb2.UsageReport:
    request = usage_pb2.GetUsageReportRequest(account_id=account_id, group_by=list(group_by))
    if start_ms:
        request.start.CopyFrom(ts(start_ms))
    if end_ms:
        request.end.CopyFrom(ts(end_ms))
    return (await usage(running).GetUsageReport(request)).report


def table(rep: usage_pb2.UsageReport) -> list[tuple[object, ...]]:
    return [
        (r.operation, dict(r.labels), r.bucket_start.ToMilliseconds() if r.HasField(
            "bucket_start") else None, r.units, r.quantity, r.count)
        for r in rep.rows
    ]


async def known_mix(running: Running, account_id: str) -> None:
    """Two days of usage with labels: day 1 (25th) and day 2 (26th)."""
    await charge(running, account_id, "image.upscale", 3, "a", project="atlas")      # 30
    await charge(running, account_id, "image.generate.sdxl", 10, "b", project="atlas")  # 50
    running.clock.advance(DAY_MS)
    await charge(running, account_id, "image.generate.sdxl", 4, "c", project="zeus")   # 20
    held = await running.quota.Reserve(
        quota_pb2.ReserveRequest(account_id=account_id, operation="image.vectorize",
                                 quantity=6, idempotency_key="d", labels={"project": "zeus"})
    )
    await running.quota.Commit(
        quota_pb2.CommitRequest(reservation_id=held.reservation_id, quantity=5)
    )  # 25
    charged = await charge(running, account_id, "image.upscale", 2, "e", project="atlas")  # 20
    await running.quota.Refund(
        quota_pb2.RefundRequest(reservation_id=charged.reservation_id, units=5,
                                idempotency_key="f")
    )  # nets to 15


async def test_report_by_operation_label_and_day_is_exact_before_and_after_flush(
    live: Running,
) -> None:
    """Proves the current period's report is exact in real time (before a flush),
    identical after the flush, agrees with GetBalance, and nets refunds out."""
    account_id = await create(live, 5000)
    await known_mix(live, account_id)
    by_op = await report(live, account_id, "OPERATION")
    expected_ops = [
        ("image.generate.sdxl", {}, None, 70, 14, 2),
        ("image.upscale", {}, None, 45, 5, 2),
        ("image.vectorize", {}, None, 25, 5, 1),
    ]
    assert table(by_op) == expected_ops
    assert (by_op.total_units, by_op.total_quantity, by_op.total_count) == (140, 24, 5)
    reply = await live.quota.GetBalance(quota_pb2.GetBalanceRequest(account_id=account_id))
    balance = reply.balance
    assert by_op.period.used == balance.period_consumed == 140
    assert by_op.period.remaining == balance.available == 4860
    assert by_op.period.allotment == 5000
    by_label_day = await report(live, account_id, "LABEL:project", "DAY")
    assert table(by_label_day) == [
        ("", {"project": "atlas"}, ms(2026, 11, 25), 80, 13, 2),
        ("", {"project": "atlas"}, ms(2026, 11, 26), 15, 2, 1),
        ("", {"project": "zeus"}, ms(2026, 11, 26), 45, 9, 2),
    ]
    await live.authority.flusher.flush_all()
    assert table(await report(live, account_id, "OPERATION")) == expected_ops


async def test_past_periods_come_from_the_ledger_with_the_same_figures(live: Running) -> None:
    """Proves a closed period reported from the ledger matches what the counters said,
    including a refund made after the period closed, netted in the charge's hour."""
    account_id = await create(live, 5000)
    await known_mix(live, account_id)
    during = table(await report(live, account_id, "OPERATION", "HOUR"))
    live.clock.set(ms(2026, 12, 26, 1))
    await charge(live, account_id, "image.upscale", 1, "next-period")
    await live.authority.flusher.flush_all()
    closed = await report(live, account_id, "OPERATION", "HOUR",
                          start_ms=ms(2026, 11, 25), end_ms=ms(2026, 12, 25))
    assert table(closed) == during
    now = await report(live, account_id, "OPERATION")
    assert table(now) == [("image.upscale", {}, None, 10, 1, 1)]
    assert now.period.used == 10


async def test_label_budget_refuses_naming_the_budget_and_holds_count(live: Running) -> None:
    """Proves a label budget caps spend per period atomically with the balance: holds
    count, a refusal is RESOURCE_EXHAUSTED naming the budget and moves nothing, a
    release gives the budget back."""
    account_id = await create(live, 100_000)
    budget = (await live.accounts.SetBudget(account_pb2.SetBudgetRequest(
        account_id=account_id,
        budget=common_pb2.Budget(label_key="project", label_value="atlas", limit_units=2000),
    ))).budget
    assert budget.budget_id == "label:project=atlas"
    held = await live.quota.Reserve(quota_pb2.ReserveRequest(
        account_id=account_id, operation="image.upscale", quantity=150, idempotency_key="h",
        labels={"project": "atlas"}))  # 1500 held
    before = await live.quota.GetBalance(quota_pb2.GetBalanceRequest(account_id=account_id))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await charge(live, account_id, "image.upscale", 51, "x", project="atlas")  # 510 > 500
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "label:project=atlas" in (refused.value.details() or "")
    status = rpc_status.from_call(refused.value)
    assert status is not None
    detail = common_pb2.InsufficientUnits()
    assert any(d.Unpack(detail) for d in status.details if d.Is(detail.DESCRIPTOR))
    assert (detail.budget_id, detail.available, detail.required) == (
        "label:project=atlas", 500, 510)
    after = await live.quota.GetBalance(quota_pb2.GetBalanceRequest(account_id=account_id))
    assert after.balance.available == before.balance.available
    await charge(live, account_id, "image.upscale", 50, "ok", project="zeus")  # other label: free
    await live.quota.Refund(quota_pb2.RefundRequest(reservation_id=held.reservation_id,
                                                    idempotency_key="rel"))
    await charge(live, account_id, "image.upscale", 200, "fits", project="atlas")  # 2000 exactly
    listed = await live.accounts.ListBudgets(account_pb2.ListBudgetsRequest(account_id=account_id))
    assert [(b.budget_id, b.used_units, b.limit_units) for b in listed.budgets] == [
        ("label:project=atlas", 2000, 2000)]
    live.clock.set(ms(2026, 12, 25, 1))
    await charge(live, account_id, "image.upscale", 1, "new-period", project="atlas")
    listed = await live.accounts.ListBudgets(account_pb2.ListBudgetsRequest(account_id=account_id))
    assert listed.budgets[0].used_units == 10


async def test_operation_budget_counts_usage_so_far_and_partial_commits(live: Running) -> None:
    """Proves a budget created mid-period starts from the period's usage, that a
    partial commit gives back what was not charged, and that it can be deleted."""
    account_id = await create(live, 100_000)
    await charge(live, account_id, "image.vectorize", 10, "before")  # 50
    budget = (await live.accounts.SetBudget(account_pb2.SetBudgetRequest(
        account_id=account_id,
        budget=common_pb2.Budget(operation="image.vectorize", limit_units=100)))).budget
    assert (budget.budget_id, budget.used_units) == ("operation:image.vectorize", 50)
    held = await live.quota.Reserve(quota_pb2.ReserveRequest(
        account_id=account_id, operation="image.vectorize", quantity=10, idempotency_key="r"))
    await live.quota.Commit(quota_pb2.CommitRequest(reservation_id=held.reservation_id,
                                                    quantity=4))  # 20 charged, 30 back
    listed = await live.accounts.ListBudgets(account_pb2.ListBudgetsRequest(account_id=account_id))
    assert listed.budgets[0].used_units == 70
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await charge(live, account_id, "image.vectorize", 7, "over")  # 35 > 30
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    await live.accounts.DeleteBudget(account_pb2.DeleteBudgetRequest(
        account_id=account_id, budget_id="operation:image.vectorize"))
    await charge(live, account_id, "image.vectorize", 7, "over-again")
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await live.accounts.DeleteBudget(account_pb2.DeleteBudgetRequest(
            account_id=account_id, budget_id="operation:image.vectorize"))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND


async def alerts_of(running: Running, account_id: str) -> list[str]:
    await running.authority.flusher.flush_all()
    entries = await running.authority.ledger.entries(account_id)
    return [e.detail["alert"] for e in entries if e.type == "alert"]


async def test_thresholds_fire_once_per_period(live: Running) -> None:
    """Proves percent-of-allotment, balance-below and overage alerts each fire once per
    period (holds count), and again in the next period."""
    account_id = await create(
        live, 1000, overage_policy=common_pb2.OVERAGE_POLICY_ALLOW, overage_limit=500,
        alerts=common_pb2.AlertSettings(allotment_used_percent=[50, 80, 100],
                                        balance_below=300, overage_started=True),
    )
    held = await live.quota.Reserve(quota_pb2.ReserveRequest(
        account_id=account_id, operation="image.upscale", quantity=55, idempotency_key="h"))
    assert await alerts_of(live, account_id) == ["allotment_used_50"]
    await live.quota.Refund(quota_pb2.RefundRequest(reservation_id=held.reservation_id,
                                                    idempotency_key="rel"))
    await charge(live, account_id, "image.upscale", 60, "c1")   # 600 used
    await charge(live, account_id, "image.upscale", 25, "c2")   # 850 used, 150 left
    assert await alerts_of(live, account_id) == [
        "allotment_used_50", "allotment_used_80", "balance_below_300"]
    await charge(live, account_id, "image.upscale", 20, "c3")   # 1050: overage 50
    await charge(live, account_id, "image.upscale", 1, "c4")
    assert await alerts_of(live, account_id) == [
        "allotment_used_50", "allotment_used_80", "balance_below_300",
        "allotment_used_100", "overage_started"]
    live.clock.set(ms(2026, 12, 25, 1))
    await charge(live, account_id, "image.upscale", 50, "c5")
    assert (await alerts_of(live, account_id))[-1] == "allotment_used_50"


async def test_forecast_projects_run_out_and_overage(live: Running) -> None:
    """Proves the forecast's burn rate over the trailing week and when units run out."""
    live.clock.set(ms(2026, 11, 1, 12))
    account_id = await create(live, 7000)
    for day in range(7):
        live.clock.set(ms(2026, 11, 1 + day, 12))
        await charge(live, account_id, "image.upscale", 50, f"d{day}")  # 500 a day
    # The trailing week is the hours [Nov 1 12:00, Nov 8 12:00): all seven charges.
    live.clock.set(ms(2026, 11, 8, 11) + 30 * 60_000)
    rep = await report(live, account_id)
    assert rep.forecast.units_per_day == 500
    assert rep.period.remaining == 3500
    assert rep.forecast.runs_out_at.ToMilliseconds() == live.clock.now_ms() + 7 * DAY_MS
    days_left = (ms(2026, 12, 1) - live.clock.now_ms()) / DAY_MS
    assert rep.forecast.projected_period_consumption == 3500 + round(500 * days_left)
    assert rep.forecast.projected_overage == round(500 * days_left) - 3500


async def test_report_input_is_validated(live: Running) -> None:
    """Proves bad report requests are INVALID_ARGUMENT naming the field."""
    account_id = await create(live, 10)
    for request, field in [
        (usage_pb2.GetUsageReportRequest(account_id=account_id, group_by=["WEEK"]), "group_by"),
        (usage_pb2.GetUsageReportRequest(account_id=account_id, start=ts(T0_MS + 1)), "start"),
        (usage_pb2.GetUsageReportRequest(account_id=account_id, start=ts(ms(2026, 11, 26)),
                                         end=ts(ms(2026, 11, 25))), "end"),
        (usage_pb2.GetUsageReportRequest(), "start"),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await usage(live).GetUsageReport(request)
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in (bad.value.details() or "")


async def test_recovery_rebuilds_the_current_periods_usage_counters(
    own_redis: RedisProcess, tmp_path: object
) -> None:
    """Proves that after Redis is wiped and recovered from the ledger, the current
    period's report (counters) is exactly what it was."""
    import redis.asyncio as aioredis

    ledger_url = f"sqlite:///{tmp_path}/ledger.sqlite3"
    running = await start_running(own_redis.url, ledger_url=ledger_url)
    account_id = await create(running, 5000)
    try:
        await known_mix(running, account_id)
        before = table(await report(running, account_id, "OPERATION", "LABEL:project", "HOUR"))
    finally:
        await stop_running(running)
    wipe = aioredis.Redis.from_url(own_redis.url)
    await wipe.flushall()
    await wipe.aclose()
    running = await start_running(own_redis.url, now_ms=T0_MS + DAY_MS,
                                  ledger_url=ledger_url, recover_on_start="true")
    try:
        after = table(await report(running, account_id, "OPERATION", "LABEL:project", "HOUR"))
        assert after == before
    finally:
        await stop_running(running)


async def test_a_budget_gives_back_refunds_of_charges_made_before_it(live: Running) -> None:
    """Proves a budget created after a charge counts it, and a refund of that charge
    frees the budget again."""
    account_id = await create(live, 100_000)
    charged = await charge(live, account_id, "image.upscale", 10, "before")  # 100
    await live.accounts.SetBudget(account_pb2.SetBudgetRequest(
        account_id=account_id, budget=common_pb2.Budget(operation="image.upscale",
                                                        limit_units=150)))
    await live.quota.Refund(quota_pb2.RefundRequest(reservation_id=charged.reservation_id,
                                                    idempotency_key="f"))
    listed = await live.accounts.ListBudgets(account_pb2.ListBudgetsRequest(account_id=account_id))
    assert listed.budgets[0].used_units == 0
    await charge(live, account_id, "image.upscale", 15, "fits")  # 150: exactly the limit


async def test_all_accounts_report_groups_by_account_from_the_ledger(live: Running) -> None:
    """Proves the admins' report without an account id lists every account's flushed
    usage, grouped by account."""
    first, second = await create(live, 1000), await create(live, 1000)
    await charge(live, first, "image.upscale", 2, "a")
    await charge(live, second, "image.vectorize", 3, "b")
    await live.authority.flusher.flush_all()
    rep = await usage(live).GetUsageReport(usage_pb2.GetUsageReportRequest(
        start=ts(ms(2026, 11, 25)), group_by=["OPERATION"]))
    mine = sorted((r.account_id, r.operation, r.units) for r in rep.report.rows
                  if r.account_id in (first, second))
    assert mine == sorted([(first, "image.upscale", 20), (second, "image.vectorize", 15)])


async def test_bad_budget_and_alert_input_is_refused_and_changes_nothing(live: Running) -> None:
    """Proves malformed budgets and alert settings are INVALID_ARGUMENT naming the field
    and leave the account (balance, budgets, ledger) untouched."""
    account_id = await create(live, 100)
    await live.authority.flusher.flush_all()
    before_balance = await live.quota.GetBalance(quota_pb2.GetBalanceRequest(account_id=account_id))
    before_entries = await live.authority.ledger.entries(account_id)
    bad_budgets = [
        (common_pb2.Budget(limit_units=10), "budget"),
        (common_pb2.Budget(operation="image.upscale", label_key="p", label_value="x",
                           limit_units=10), "budget"),
        (common_pb2.Budget(label_key="project", limit_units=10), "budget.label_value"),
        (common_pb2.Budget(label_key="bad key", label_value="x", limit_units=10),
         "budget.label_key"),
        (common_pb2.Budget(operation="Bad Op", limit_units=10), "budget.operation"),
        (common_pb2.Budget(operation="image.upscale", limit_units=-1), "budget.limit_units"),
    ]
    for budget, field in bad_budgets:
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await live.accounts.SetBudget(account_pb2.SetBudgetRequest(
                account_id=account_id, budget=budget))
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT, field
        assert field in (bad.value.details() or ""), (field, bad.value.details())
    for alerts, field in [
        (common_pb2.AlertSettings(allotment_used_percent=[0]), "alerts.allotment_used_percent"),
        (common_pb2.AlertSettings(allotment_used_percent=list(range(1, 18))),
         "alerts.allotment_used_percent"),
        (common_pb2.AlertSettings(balance_below=-5), "alerts.balance_below"),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await live.accounts.UpdateAccount(account_pb2.UpdateAccountRequest(
                account_id=account_id, alerts=alerts))
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT, field
        assert field in (bad.value.details() or ""), (field, bad.value.details())
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await live.accounts.DeleteBudget(account_pb2.DeleteBudgetRequest(
            account_id=account_id, budget_id="operation:image.upscale"))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    await live.authority.flusher.flush_all()
    after_balance = await live.quota.GetBalance(quota_pb2.GetBalanceRequest(account_id=account_id))
    assert after_balance.SerializeToString() == before_balance.SerializeToString()
    assert await live.authority.ledger.entries(account_id) == before_entries
    listed = await live.accounts.ListBudgets(account_pb2.ListBudgetsRequest(account_id=account_id))
    assert list(listed.budgets) == []


async def test_alert_entries_can_be_listed_by_type(live: Running) -> None:
    """Proves ListLedgerEntries filters on every type the scripts write, alerts included:
    types=["alert"] lists exactly the account's alert entries."""
    account_id = await create(
        live, 1000, alerts=common_pb2.AlertSettings(allotment_used_percent=[50, 80]),
    )
    await charge(live, account_id, "image.upscale", 60, "c1")  # 600 used: crosses 50
    await charge(live, account_id, "image.upscale", 25, "c2")  # 850 used: crosses 80
    await live.authority.flusher.flush_all()
    listed = await live.accounts.ListLedgerEntries(account_pb2.ListLedgerEntriesRequest(
        account_id=account_id, types=["alert"]))
    assert [e.type for e in listed.entries] == ["alert", "alert"]
    assert await alerts_of(live, account_id) == ["allotment_used_50", "allotment_used_80"]
