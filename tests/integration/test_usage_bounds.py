"""The usage counters stay bounded per account and period whatever the labels'
cardinality: USAGE_LABEL_SETS_MAX label sets tracked (none longer than
USAGE_LABEL_SET_BYTES_MAX), the rest under the one other label set, kept only a short
grace past the period; reports stay exact in their totals and budgets are enforced."""

from __future__ import annotations

import json

import grpc
import pytest

from tally.domain.limits import (
    USAGE_LABEL_SET_BYTES_MAX,
    USAGE_LABEL_SETS_MAX,
    USAGE_RETENTION_MS,
)
from tally.domain.usage import OTHER_LABEL, OTHER_LABELS
from tally_client.v1 import (
    account_pb2,
    catalog_pb2,
    common_pb2,
    quota_pb2,
    usage_pb2,
    usage_pb2_grpc,
)
from tests.support import Running, unique, usage_slot


async def setup(running: Running) -> tuple[str, str, account_pb2.Account]:
    """A priced operation (1 unit each) and an account with units to spend."""
    operation = f"test.usage-{unique('op')}"
    await running.catalog.SetPrice(catalog_pb2.SetPriceRequest(
        operation=operation, units_per_quantity=1))
    created = await running.accounts.CreateAccount(account_pb2.CreateAccountRequest(
        account_id=unique(), monthly_allotment=100_000))
    return operation, created.account.account_id, created.account


async def charge(running: Running, account_id: str, operation: str, quantity: int, key: str,
                 labels: dict[str, str]) -> quota_pb2.ChargeResponse:
    return await running.quota.Charge(quota_pb2.ChargeRequest(
        account_id=account_id, operation=operation, quantity=quantity, idempotency_key=key,
        labels=labels))


async def report(running: Running, account_id: str, *group_by: str) -> usage_pb2.UsageReport:
    stub = usage_pb2_grpc.UsageServiceStub(running.stubs.channel)
    return (await stub.GetUsageReport(usage_pb2.GetUsageReportRequest(
        account_id=account_id, group_by=list(group_by)))).report


def signature(labels: dict[str, str]) -> str:
    """A label set as the counters name it: its pairs sorted by key, as compact JSON."""
    return json.dumps(sorted(labels.items()), separators=(",", ":"))


async def test_label_sets_past_the_cap_count_as_other_and_totals_stay_exact(
    running: Running,
) -> None:
    """Proves a period's counters track the first USAGE_LABEL_SETS_MAX label sets (the
    last one exactly at the cap) and count usage with any further one under the other
    label set, which reports show as "*", with every total still exact."""
    operation, account_id, account = await setup(running)
    extra = 6
    for n in range(USAGE_LABEL_SETS_MAX + extra):
        await charge(running, account_id, operation, n + 1, f"c{n}", {"job": f"j{n:03d}"})
    store = running.authority.store
    key = await usage_slot(store, account_id, account.period_start.ToMilliseconds())
    assert key is not None
    assert len(json.loads(await store.redis.hget(key, "sets"))) == USAGE_LABEL_SETS_MAX
    usages = await store.usage(account_id, account.period_start.ToMilliseconds(), None)
    tracked = sorted(u.labels["job"] for u in usages if u.labels != OTHER_LABELS)
    assert tracked == [f"j{n:03d}" for n in range(USAGE_LABEL_SETS_MAX)]
    rep = await report(running, account_id, "LABEL:job")
    total = sum(range(1, USAGE_LABEL_SETS_MAX + extra + 1))
    assert (rep.total_units, rep.total_quantity, rep.total_count) == (
        total, total, USAGE_LABEL_SETS_MAX + extra)
    other = [(r.units, r.count) for r in rep.rows if r.labels["job"] == OTHER_LABEL]
    assert other == [(sum(range(USAGE_LABEL_SETS_MAX + 1, USAGE_LABEL_SETS_MAX + extra + 1)),
                      extra)]
    assert len(rep.rows) == USAGE_LABEL_SETS_MAX + 1


async def test_a_label_set_longer_than_the_bound_counts_as_other(running: Running) -> None:
    """Proves a label set exactly USAGE_LABEL_SET_BYTES_MAX bytes long as text is
    tracked, and one a byte longer is counted under the other label set."""
    operation, account_id, account = await setup(running)
    at_bound = {"a": "x" * 256, "b": "x" * 256, "c": "x" * 256, "d": "x" * 219}
    beyond = at_bound | {"d": "x" * 220}
    assert len(signature(at_bound)) == USAGE_LABEL_SET_BYTES_MAX
    assert len(signature(beyond)) == USAGE_LABEL_SET_BYTES_MAX + 1
    await charge(running, account_id, operation, 1, "at", at_bound)
    await charge(running, account_id, operation, 2, "beyond", beyond)
    usages = await running.authority.store.usage(
        account_id, account.period_start.ToMilliseconds(), None)
    assert sorted((u.units, u.labels == at_bound, u.labels == OTHER_LABELS) for u in usages) == [
        (1, True, False), (2, False, True)]


async def test_budgets_start_from_tracked_usage_and_are_enforced_on_untracked_values(
    running: Running,
) -> None:
    """Proves a label budget set mid-period starts from the units its value was charged
    in tracked label sets (units counted under the other label set are not known by
    value: a budget on an untracked value starts from 0), and is then enforced exactly
    on every charge carrying the value, tracked or not."""
    operation, account_id, _ = await setup(running)
    for n in range(USAGE_LABEL_SETS_MAX):
        await charge(running, account_id, operation, 2, f"c{n}", {"job": f"j{n:03d}"})
    await charge(running, account_id, operation, 3, "untracked", {"job": "late"})

    async def set_budget(value: str, limit: int) -> common_pb2.Budget:
        return (await running.accounts.SetBudget(account_pb2.SetBudgetRequest(
            account_id=account_id, budget=common_pb2.Budget(
                label_key="job", label_value=value, limit_units=limit)))).budget

    assert (await set_budget("j000", 10)).used_units == 2
    assert (await set_budget("late", 5)).used_units == 0
    await charge(running, account_id, operation, 5, "to-the-limit", {"job": "late"})
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await charge(running, account_id, operation, 1, "past-the-limit", {"job": "late"})
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_counters_leave_a_short_grace_after_their_period_and_only_it(
    running: Running,
) -> None:
    """Proves the counters expire USAGE_RETENTION_MS after their period's end, and that a
    refund of an earlier period's charge writes no counters for that period (it is
    reported from the ledger)."""
    operation, account_id, account = await setup(running)
    store = running.authority.store
    start_ms, end_ms = account.period_start.ToMilliseconds(), account.period_end.ToMilliseconds()
    charged = await charge(running, account_id, operation, 7, "c1", {"job": "a"})
    key = await usage_slot(store, account_id, start_ms)
    assert key is not None
    assert await store.redis.pexpiretime(key) == end_ms + USAGE_RETENTION_MS
    before = await store.redis.hgetall(key)
    running.clock.set(end_ms)
    await running.quota.Refund(quota_pb2.RefundRequest(
        reservation_id=charged.reservation_id, idempotency_key="r1"))
    assert await store.redis.hgetall(key) == before
    assert await store.redis.pexpiretime(key) == end_ms + USAGE_RETENTION_MS
