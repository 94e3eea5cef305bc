"""The usage counters' scripts: read_usage.lua reads a period's counters as records,
restore_usage.lua writes records back with the formatter the hot path writes with
(lib/usage.lua), and both guard their inputs."""

from __future__ import annotations

from typing import Any

import pytest

from tally.domain.errors import InvalidArgument
from tally.domain.limits import USAGE_RECORDS_PER_CALL_MAX
from tally.domain.usage import HOUR_MS, Usage
from tally.store.quota_store import QuotaStore
from tally.store.state_images import StateImages
from tally_client.v1 import account_pb2, quota_pb2
from tests.support import T0_MS, Running, unique, usage_slot

# Labels whose JSON text differs between encoders: Lua's cjson writes "/" as "\/" and
# keeps UTF-8, Python's json keeps "/" and escapes non-ASCII.
AWKWARD_LABELS = {"path": "models/sdxl-1.0", "owner": "Zoë \"Z\" Ølund", "tab": "a\tb"}


async def counters(store: QuotaStore, account_id: str, period_start_ms: int) -> tuple[Any, ...]:
    """The counter hash exactly as Redis holds it, and when it leaves."""
    key = await usage_slot(store, account_id, period_start_ms)
    assert key is not None, "no counters of the period"
    return await store.redis.hgetall(key), await store.redis.pexpiretime(key)


async def charged_account(running: Running) -> tuple[str, int, int]:
    """An account with charges (with and without labels) over two hours and a partial
    refund; returns it with its period's bounds."""
    account_id = unique()
    created = await running.accounts.CreateAccount(account_pb2.CreateAccountRequest(
        account_id=account_id, monthly_allotment=10_000))
    for key, operation, quantity, labels in [
        ("a", "image.upscale", 3, AWKWARD_LABELS), ("b", "image.vectorize", 2, {}),
        ("c", "image.upscale", 1, AWKWARD_LABELS),
    ]:
        charged = await running.quota.Charge(quota_pb2.ChargeRequest(
            account_id=account_id, operation=operation, quantity=quantity,
            idempotency_key=key, labels=labels))
        running.clock.advance(HOUR_MS)
    await running.quota.Refund(quota_pb2.RefundRequest(
        reservation_id=charged.reservation_id, units=4, idempotency_key="r"))
    account = created.account
    return (account_id, account.period_start.ToMilliseconds(),
            account.period_end.ToMilliseconds())


async def test_records_read_and_restored_rebuild_the_very_same_counters(
    running: Running,
) -> None:
    """Proves read_usage.lua returns a period's counters as records (hours, operations,
    labels, net units, quantity, count) and that restore_usage.lua, given those records,
    writes back byte for byte the fields and expiry the hot-path scripts wrote, labels
    whose JSON text encoders disagree about included."""
    store = running.authority.store
    account_id, start_ms, end_ms = await charged_account(running)
    written = await counters(store, account_id, start_ms)
    usages = await store.usage(account_id, start_ms, None)
    first_hour = T0_MS // HOUR_MS * HOUR_MS
    assert sorted((u.bucket_ms - first_hour, u.operation, u.units, u.quantity, u.count,
                   tuple(sorted(u.labels.items()))) for u in usages) == [
        (0, "image.upscale", 30, 3, 1, tuple(sorted(AWKWARD_LABELS.items()))),
        (HOUR_MS, "image.vectorize", 10, 2, 1, ()),
        (2 * HOUR_MS, "image.upscale", 6, 1, 1, tuple(sorted(AWKWARD_LABELS.items()))),
    ]
    await store.redis.delete(*store.keys.usage_slots(account_id))
    images = StateImages.of(store)
    await images.restore_usage(account_id, start_ms, end_ms, usages, running.clock.now_ms())
    assert await counters(store, account_id, start_ms) == written


async def test_restore_nets_and_batches_records_and_replaces_what_was_there(
    running: Running,
) -> None:
    """Proves restoring more records than one call takes writes them all (in calls of
    USAGE_RECORDS_PER_CALL_MAX), nets records of one counter, replaces the counters it
    finds, and that restoring no records leaves no counters."""
    store = running.authority.store
    account_id, start_ms, end_ms = await charged_account(running)
    hours = USAGE_RECORDS_PER_CALL_MAX * 2 + 7
    usages = [Usage(start_ms + h * HOUR_MS, account_id, "image.upscale", {"h": str(h % 3)},
                    10, 1, 1) for h in range(hours)]
    refunds = [Usage(start_ms, account_id, "image.upscale", {"h": "0"}, -4, 0, 0)]
    images = StateImages.of(store)
    await images.restore_usage(account_id, start_ms, end_ms, usages + refunds, T0_MS)
    read = sorted(await store.usage(account_id, start_ms, None), key=lambda u: u.bucket_ms)
    assert len(read) == hours
    assert read[0] == Usage(start_ms, account_id, "image.upscale", {"h": "0"}, 6, 1, 1)
    assert read[1:] == usages[1:]
    await images.restore_usage(account_id, start_ms, end_ms, [], T0_MS)
    assert await usage_slot(store, account_id, start_ms) is None
    assert await store.usage(account_id, start_ms, None) == []


def good_record() -> dict[str, Any]:
    return {"bucket_ms": T0_MS // HOUR_MS * HOUR_MS, "operation": "image.upscale",
            "labels": {"project": "atlas"}, "units": 10, "quantity": 1, "count": 1}


def with_bad_second_record(name: str, value: Any) -> dict[str, Any]:
    """A request change: two records, the second one with `name` set to value (None:
    left out)."""
    bad = {k: v for k, v in (good_record() | {name: value}).items() if v is not None}
    return {"records": [good_record(), bad]}


BAD_REQUESTS: list[tuple[dict[str, Any], str]] = [
    ({"replace": 1}, "replace"),
    ({"period_start": -1}, "period_start"),
    ({"period_end": -1}, "period_end"),
    ({"records": "none"}, "records"),
    ({"records": [good_record()] * (USAGE_RECORDS_PER_CALL_MAX + 1)}, "records"),
    (with_bad_second_record("bucket_ms", T0_MS + 1), "records[2].bucket_ms"),  # not whole
    (with_bad_second_record("bucket_ms", -HOUR_MS), "records[2].bucket_ms"),
    (with_bad_second_record("bucket_ms", 1.5), "records[2].bucket_ms"),
    (with_bad_second_record("operation", "image|upscale"), "records[2].operation"),
    (with_bad_second_record("operation", ""), "records[2].operation"),
    (with_bad_second_record("operation", 7), "records[2].operation"),
    (with_bad_second_record("labels", "project=atlas"), "records[2].labels"),
    (with_bad_second_record("labels", {"k": 5}), "records[2].labels"),
    (with_bad_second_record("labels", {f"k{i}": "v" for i in range(33)}), "records[2].labels"),
    (with_bad_second_record("units", 2**53), "records[2].units"),
    (with_bad_second_record("units", 0.5), "records[2].units"),
    (with_bad_second_record("quantity", -1), "records[2].quantity"),
    (with_bad_second_record("count", None), "records[2].count"),
]


@pytest.mark.parametrize(("change", "reported"), BAD_REQUESTS)
async def test_restore_refuses_a_bad_request_or_record_and_writes_nothing(
    running: Running, change: dict[str, Any], reported: str
) -> None:
    """Proves restore_usage.lua checks its request and every record before its first
    write: a malformed field (or more records than one call takes) is INVALID_ARGUMENT
    naming it, and the counters are untouched (not even the replacing delete happened)."""
    store = running.authority.store
    account_id, start_ms, end_ms = await charged_account(running)
    before = await counters(store, account_id, start_ms)
    request = {"now": T0_MS, "period_start": start_ms, "replace": True, "period_end": end_ms,
               "records": [good_record()]} | change
    with pytest.raises(InvalidArgument) as refused:
        await store.runner.run("restore_usage", store.keys.usage_slots(account_id), request,
                               None)
    assert refused.value.field_name == reported, refused.value.message
    assert await counters(store, account_id, start_ms) == before


@pytest.mark.parametrize(("change", "reported"), [
    ({"year": 1969}, "period"), ({"year": 9999}, "period"), ({"year": 2026.5}, "period"),
    ({"month": 0}, "period"), ({"month": 13}, "period"), ({"month": "11"}, "period"),
    ({"anchor_day": 0}, "anchor_day"), ({"anchor_day": 32}, "anchor_day"),
])
async def test_billing_period_refuses_what_is_no_month_or_anchor_day(
    running: Running, change: dict[str, Any], reported: str
) -> None:
    """Proves billing_period.lua checks its own inputs (the years a period may start in,
    months, anchor days) rather than trusting the caller's validation."""
    store = running.authority.store
    request = {"now": T0_MS, "year": 2026, "month": 11, "anchor_day": 25}
    assert await store.runner.run("billing_period", [], request, None) == {
        "period_start": 1795564800000, "period_end": 1798156800000}
    with pytest.raises(InvalidArgument) as refused:
        await store.runner.run("billing_period", [], request | change, None)
    assert refused.value.field_name == reported


async def test_an_account_keeps_two_periods_of_counters_in_its_two_slots(
    running: Running,
) -> None:
    """Proves the counters of a new period take the slot of the older of the two
    periods kept: the period just ended stays readable (its short grace), the one
    before it is dropped, and the account never has more than its two slots."""
    store = running.authority.store
    account_id = unique()
    created = await running.accounts.CreateAccount(account_pb2.CreateAccountRequest(
        account_id=account_id, monthly_allotment=10_000))
    starts = []
    for n in range(3):
        account = (await running.accounts.GetAccount(
            account_pb2.GetAccountRequest(account_id=account_id))).account
        starts.append(account.period_start.ToMilliseconds())
        await running.quota.Charge(quota_pb2.ChargeRequest(
            account_id=account_id, operation="image.upscale", quantity=n + 1,
            idempotency_key=f"c{n}"))
        running.clock.set(account.period_end.ToMilliseconds() + HOUR_MS)
    assert starts[0] == created.account.period_start.ToMilliseconds()
    assert len(set(starts)) == 3
    assert [u.quantity for u in await store.usage(account_id, starts[2], None)] == [3]
    assert [u.quantity for u in await store.usage(account_id, starts[1], None)] == [2]
    assert await store.usage(account_id, starts[0], None) == []
    slots = [await usage_slot(store, account_id, start) for start in starts]
    assert slots[0] is None and {slots[1], slots[2]} == set(store.keys.usage_slots(account_id))
    usage_keys = [k async for k in store.redis.scan_iter(match=f"*usage:{account_id}*")]
    assert len(usage_keys) == 2
