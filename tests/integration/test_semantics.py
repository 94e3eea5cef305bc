"""The domain rules of the design notes, each against the real server."""

from __future__ import annotations

from datetime import UTC, datetime

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from tally_client.v1 import account_pb2, catalog_pb2, common_pb2, quota_pb2
from tests.support import T0_MS, Running, unique

HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS


def ms(year: int, month: int, day: int, hour: int = 0) -> int:
    return int(datetime(year, month, day, hour, tzinfo=UTC).timestamp() * 1000)


async def create(running: Running, allotment: int = 5000, **fields: object) -> str:
    account_id = unique()
    await running.accounts.CreateAccount(
        account_pb2.CreateAccountRequest(
            account_id=account_id, monthly_allotment=allotment, **fields  # type: ignore[arg-type]
        )
    )
    return account_id


async def balance(running: Running, account_id: str) -> common_pb2.Balance:
    reply = await running.quota.GetBalance(quota_pb2.GetBalanceRequest(account_id=account_id))
    return reply.balance


async def reserve(
    running: Running, account_id: str, quantity: int, key: str, *,
    operation: str = "image.upscale", ttl_s: int | None = None, price_version: int = 0,
) -> quota_pb2.ReserveResponse:
    request = quota_pb2.ReserveRequest(
        account_id=account_id, operation=operation, quantity=quantity, idempotency_key=key,
        price_version=price_version,
    )
    if ttl_s is not None:
        request.ttl.CopyFrom(Duration(seconds=ttl_s))
    return await running.quota.Reserve(request)


async def charge(
    running: Running, account_id: str, quantity: int, key: str, operation: str = "image.upscale"
) -> quota_pb2.ChargeResponse:
    return await running.quota.Charge(
        quota_pb2.ChargeRequest(
            account_id=account_id, operation=operation, quantity=quantity, idempotency_key=key
        )
    )


async def purchase(
    running: Running, account_id: str, units: int, key: str, expires_at_ms: int = 0
) -> common_pb2.Grant:
    request = account_pb2.PurchaseUnitsRequest(
        account_id=account_id, units=units, idempotency_key=key
    )
    if expires_at_ms:
        ts = Timestamp()
        ts.FromMilliseconds(expires_at_ms)
        request.expires_at.CopyFrom(ts)
    return (await running.accounts.PurchaseUnits(request)).grant


def remaining_by_kind(b: common_pb2.Balance) -> list[tuple[str, int]]:
    return [(common_pb2.GrantKind.Name(g.kind).removeprefix("GRANT_KIND_"), g.units_remaining)
            for g in b.grants]


async def test_grants_are_consumed_earliest_expiry_first_allotment_before_purchase(
    running: Running,
) -> None:
    """Proves consumption order: an expiring purchase before the allotment, the
    allotment before a never-expiring purchase."""
    account_id = await create(running, allotment=100)
    await purchase(running, account_id, 50, "p-forever")
    await purchase(running, account_id, 30, "p-soon", expires_at_ms=T0_MS + DAY_MS)
    b = await balance(running, account_id)
    assert remaining_by_kind(b) == [("PURCHASE", 30), ("ALLOTMENT", 100), ("PURCHASE", 50)]
    await charge(running, account_id, 4, "c1")  # 40 units
    b = await balance(running, account_id)
    assert remaining_by_kind(b) == [("PURCHASE", 0), ("ALLOTMENT", 90), ("PURCHASE", 50)]
    await charge(running, account_id, 10, "c2")  # 100 units
    b = await balance(running, account_id)
    assert remaining_by_kind(b) == [("PURCHASE", 0), ("ALLOTMENT", 0), ("PURCHASE", 40)]
    assert b.available == 40


async def test_new_period_allotment_appears_lazily_and_old_one_expires(running: Running) -> None:
    """Proves the month boundary: unused allotment expires, the new one appears at
    first touch, purchases carry over, period figures reset."""
    account_id = await create(running, allotment=1000)
    await purchase(running, account_id, 200, "p1")
    await charge(running, account_id, 30, "c1")  # 300 units from the allotment
    b = await balance(running, account_id)
    assert (b.available, b.period_consumed) == (900, 300)
    assert b.period_end.ToMilliseconds() == ms(2026, 12, 25)
    running.clock.set(ms(2026, 12, 25) + 1)
    b = await balance(running, account_id)
    assert b.period_start.ToMilliseconds() == ms(2026, 12, 25)
    assert b.period_end.ToMilliseconds() == ms(2027, 1, 25)
    assert remaining_by_kind(b) == [("ALLOTMENT", 1000), ("PURCHASE", 200)]
    assert (b.available, b.period_consumed, b.units_expired_total) == (1200, 0, 700)
    await charge(running, account_id, 1, "c2")  # 10 units of December's allotment
    # Skipping months goes straight to the current period: December's allotment
    # expires, the skipped months' allotments never appear.
    running.clock.set(ms(2027, 4, 1))
    b = await balance(running, account_id)
    assert b.period_start.ToMilliseconds() == ms(2027, 3, 25)
    assert (b.available, b.units_expired_total) == (1200, 700 + 990)


async def test_anchor_day_past_month_end_is_clamped(running: Running) -> None:
    """Proves an account anchored on the 31st renews on the last day of shorter months."""
    running.clock.set(ms(2027, 1, 31, 10))
    account_id = await create(running, allotment=10, billing_anchor_day=31)
    b = await balance(running, account_id)
    assert b.period_start.ToMilliseconds() == ms(2027, 1, 31)
    assert b.period_end.ToMilliseconds() == ms(2027, 2, 28)
    running.clock.set(ms(2027, 3, 1))
    b = await balance(running, account_id)
    assert b.period_start.ToMilliseconds() == ms(2027, 2, 28)
    assert b.period_end.ToMilliseconds() == ms(2027, 3, 31)


async def test_hold_expires_after_its_ttl_and_late_commit_still_charges(
    running: Running,
) -> None:
    """Proves a 1-second hold is released at its expiry and that a commit after it
    still records the usage, flagged late, with the shortfall as overage."""
    account_id = await create(running, allotment=100)
    held = await reserve(running, account_id, 8, "r1", ttl_s=1)  # 80 units
    assert held.expires_at.ToMilliseconds() == T0_MS + 1000
    running.clock.advance(999)
    assert (await balance(running, account_id)).held == 80
    running.clock.advance(1)
    b = await balance(running, account_id)
    assert (b.held, b.available) == (0, 100)
    await charge(running, account_id, 5, "c1")  # 50 units, leaves 50
    late = await running.quota.Commit(
        quota_pb2.CommitRequest(reservation_id=held.reservation_id)
    )
    assert late.late
    assert (late.units_charged, late.units_released, late.overage_units) == (80, 0, 30)
    assert (late.balance.available, late.balance.overage_used) == (-30, 30)
    again = await running.quota.Commit(
        quota_pb2.CommitRequest(reservation_id=held.reservation_id)
    )
    assert again.replayed and again.late and again.units_charged == 80


async def test_overage_allow_up_to_limit_then_deny(running: Running) -> None:
    """Proves ALLOW lets an account go negative up to overage_limit and no further."""
    account_id = await create(
        running, allotment=100, overage_policy=common_pb2.OVERAGE_POLICY_ALLOW, overage_limit=50
    )
    charged = await charge(running, account_id, 14, "c1")  # 140 units: 40 overage
    assert (charged.overage_units, charged.balance.available) == (40, -40)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await charge(running, account_id, 2, "c2")  # 20 more: over the limit
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    await charge(running, account_id, 1, "c3")  # exactly to the limit
    b = await balance(running, account_id)
    assert (b.available, b.overage_used, b.overage_limit) == (-50, 50, 50)


async def test_overage_deny_refuses_without_moving(running: Running) -> None:
    """Proves DENY refuses a reserve beyond the balance and moves nothing."""
    account_id = await create(running, allotment=100)
    before = await balance(running, account_id)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await reserve(running, account_id, 11, "r1")
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    after = await balance(running, account_id)
    assert after.available == before.available == 100
    assert after.units_granted_total == before.units_granted_total


async def test_auto_purchase_adds_packs_below_threshold_within_cap(running: Running) -> None:
    """Proves AUTO_PURCHASE buys packs when the balance would fall below the
    threshold, never beyond the per-period cap (overage_limit)."""
    account_id = await create(
        running, allotment=100, overage_policy=common_pb2.OVERAGE_POLICY_AUTO_PURCHASE,
        auto_purchase_units=100, auto_purchase_threshold=50, overage_limit=200,
    )
    await charge(running, account_id, 4, "c1")  # 40: 60 left, above threshold
    b = await balance(running, account_id)
    assert (b.available, b.auto_purchased) == (60, 0)
    await charge(running, account_id, 2, "c2")  # 20: would leave 40 -> buy one pack
    b = await balance(running, account_id)
    assert (b.available, b.auto_purchased) == (140, 100)
    assert remaining_by_kind(b)[-1] == ("PURCHASE", 100)
    await charge(running, account_id, 15, "c3")  # 150: would leave -10 -> one more pack
    b = await balance(running, account_id)
    assert (b.available, b.auto_purchased) == (90, 200)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await charge(running, account_id, 10, "c4")  # 100 > 90 and the cap is spent
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_hold_keeps_its_price_and_quoted_version_is_honoured(running: Running) -> None:
    """Proves price versions: a hold keeps the price it was made with, and a Reserve
    carrying a quoted price_version is charged at that version."""
    operation = f"test.op-{unique('p')}"
    first = (await running.catalog.SetPrice(
        catalog_pb2.SetPriceRequest(operation=operation, units_per_quantity=3)
    )).price
    account_id = await create(running, allotment=1000)
    quote = await running.quota.Quote(
        quota_pb2.QuoteRequest(account_id=account_id, operation=operation, quantity=2)
    )
    assert (quote.units, quote.price_version, quote.affordable) == (6, first.version, True)
    held = await reserve(running, account_id, 2, "r1", operation=operation)
    second = (await running.catalog.SetPrice(
        catalog_pb2.SetPriceRequest(operation=operation, units_per_quantity=7)
    )).price
    assert second.version > first.version
    committed = await running.quota.Commit(
        quota_pb2.CommitRequest(reservation_id=held.reservation_id)
    )
    assert committed.units_charged == 6
    quoted = await reserve(
        running, account_id, 2, "r2", operation=operation, price_version=first.version
    )
    assert quoted.units == 6
    current = await reserve(running, account_id, 2, "r3", operation=operation)
    assert (current.units, current.price_version) == (14, second.version)
    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await reserve(running, account_id, 1, "r4", operation=operation, price_version=10**9)
    assert unknown.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    same = (await running.catalog.SetPrice(
        catalog_pb2.SetPriceRequest(operation=operation, units_per_quantity=7)
    )).price
    assert same.version == second.version


async def test_extend_keeps_a_long_job_alive(running: Running) -> None:
    """Proves Extend moves the expiry from now, within the maximum TTL, and that an
    expired hold cannot be extended."""
    account_id = await create(running)
    held = await reserve(running, account_id, 1, "r1", ttl_s=10)
    running.clock.advance(9_000)
    extended = await running.quota.Extend(
        quota_pb2.ExtendRequest(reservation_id=held.reservation_id, ttl=Duration(seconds=60))
    )
    assert extended.expires_at.ToMilliseconds() == running.clock.now_ms() + 60_000
    running.clock.advance(30_000)
    assert (await balance(running, account_id)).held == 10
    with pytest.raises(grpc.aio.AioRpcError) as too_long:
        await running.quota.Extend(
            quota_pb2.ExtendRequest(
                reservation_id=held.reservation_id, ttl=Duration(seconds=3601)
            )
        )
    assert too_long.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "ttl" in (too_long.value.details() or "")
    running.clock.advance(31_000)
    with pytest.raises(grpc.aio.AioRpcError) as expired:
        await running.quota.Extend(
            quota_pb2.ExtendRequest(reservation_id=held.reservation_id, ttl=Duration(seconds=60))
        )
    assert expired.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_refunds_partial_and_more_than_charged(running: Running) -> None:
    """Proves several partial refunds of a commit, then a refund of more than is left
    is FAILED_PRECONDITION and moves nothing."""
    account_id = await create(running, allotment=1000)
    held = await reserve(running, account_id, 10, "r1")  # 100
    await running.quota.Commit(quota_pb2.CommitRequest(reservation_id=held.reservation_id))
    first = await running.quota.Refund(
        quota_pb2.RefundRequest(reservation_id=held.reservation_id, units=30, idempotency_key="f1")
    )
    assert (first.units_refunded, first.units_refundable, first.balance.available) == (30, 70, 930)
    with pytest.raises(grpc.aio.AioRpcError) as too_much:
        await running.quota.Refund(
            quota_pb2.RefundRequest(
                reservation_id=held.reservation_id, units=71, idempotency_key="f2"
            )
        )
    assert too_much.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    rest = await running.quota.Refund(
        quota_pb2.RefundRequest(reservation_id=held.reservation_id, idempotency_key="f3")
    )
    assert (rest.units_refunded, rest.units_refundable, rest.balance.available) == (70, 0, 1000)
    assert rest.balance.period_consumed == 0


async def test_commit_twice_with_another_quantity_is_refused(running: Running) -> None:
    """Proves Commit is idempotent by reservation id and refuses a different quantity."""
    account_id = await create(running)
    held = await reserve(running, account_id, 5, "r1")
    first = await running.quota.Commit(
        quota_pb2.CommitRequest(reservation_id=held.reservation_id, quantity=3)
    )
    replay = await running.quota.Commit(
        quota_pb2.CommitRequest(reservation_id=held.reservation_id, quantity=3)
    )
    assert replay.replayed and replay.units_charged == first.units_charged == 30
    with pytest.raises(grpc.aio.AioRpcError) as other:
        await running.quota.Commit(
            quota_pb2.CommitRequest(reservation_id=held.reservation_id, quantity=4)
        )
    assert other.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.aio.AioRpcError) as more:
        await running.quota.Commit(
            quota_pb2.CommitRequest(reservation_id=held.reservation_id, quantity=6)
        )
    assert more.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_idempotency_record_lapses_after_the_window(running: Running) -> None:
    """Proves the same key is a replay inside the window and a new request after it."""
    account_id = await create(running)
    first = await reserve(running, account_id, 1, "k")
    running.clock.advance(DAY_MS - 1)
    replay = await reserve(running, account_id, 1, "k", ttl_s=None)
    assert replay.replayed and replay.reservation_id == first.reservation_id
    running.clock.advance(1)
    fresh = await reserve(running, account_id, 1, "k")
    assert not fresh.replayed and fresh.reservation_id != first.reservation_id


async def test_refund_of_invoiced_overage_becomes_a_credit(running: Running) -> None:
    """Proves overage refunded after its period was invoiced comes back as a
    PROMOTIONAL credit, keeping the books balanced."""
    account_id = await create(
        running, allotment=100, overage_policy=common_pb2.OVERAGE_POLICY_ALLOW, overage_limit=100
    )
    charged = await charge(running, account_id, 15, "c1")  # 150: 50 overage
    running.clock.set(ms(2026, 12, 26))
    refund = await running.quota.Refund(
        quota_pb2.RefundRequest(reservation_id=charged.reservation_id, idempotency_key="f1")
    )
    b = refund.balance
    assert refund.units_refunded == 150
    kinds = remaining_by_kind(b)
    assert ("PROMOTIONAL", 50) in kinds and ("ALLOTMENT", 100) in kinds
    assert b.overage_used == 0
    lhs = b.units_granted_total
    rhs = (b.available + b.held + b.units_charged_total - b.units_refunded_total
           + b.units_expired_total)
    assert lhs == rhs


async def test_refund_after_the_period_restores_a_pruned_purchase_not_an_expired_allotment(
    running: Running,
) -> None:
    """Proves that at a period's end exhausted grants leave the balance, that a later
    refund brings a still-valid purchase back, and that units whose allotment has
    expired are counted as expired."""
    account_id = await create(running, allotment=100)
    await purchase(running, account_id, 50, "p1")
    charged = await charge(running, account_id, 15, "c1")  # 100 allotment + 50 purchase
    running.clock.set(ms(2026, 12, 26))
    await charge(running, account_id, 1, "c2")  # persists the new period: 10 of 100
    b = await balance(running, account_id)
    assert remaining_by_kind(b) == [("ALLOTMENT", 90)]
    refund = await running.quota.Refund(
        quota_pb2.RefundRequest(reservation_id=charged.reservation_id, idempotency_key="f1")
    )
    b = refund.balance
    assert refund.units_refunded == 150
    assert remaining_by_kind(b) == [("ALLOTMENT", 90), ("PURCHASE", 50)]
    assert b.available == 140
    assert b.units_expired_total == 100


async def test_update_merges_labels_unless_told_to_replace(running: Running) -> None:
    """Proves UpdateAccount adds to the labels by default and replaces them when asked."""
    account_id = await create(running, labels={"team": "x"})
    merged = (await running.accounts.UpdateAccount(
        account_pb2.UpdateAccountRequest(account_id=account_id, labels={"tier": "pro"})
    )).account
    assert dict(merged.labels) == {"team": "x", "tier": "pro"}
    replaced = (await running.accounts.UpdateAccount(
        account_pb2.UpdateAccountRequest(
            account_id=account_id, labels={"tier": "max"}, replace_labels=True
        )
    )).account
    assert dict(replaced.labels) == {"tier": "max"}


async def test_commit_of_a_charged_reservation_replays_the_charge(running: Running) -> None:
    """Proves Commit on a reservation made by Charge answers as a replay of that
    charge (same quantity) and refuses another quantity, moving nothing."""
    account_id = await create(running, allotment=100)
    charged = await charge(running, account_id, 3, "c1")
    replay = await running.quota.Commit(
        quota_pb2.CommitRequest(reservation_id=charged.reservation_id)
    )
    assert replay.replayed and (replay.units_charged, replay.units_released) == (30, 0)
    assert replay.operation == "image.upscale"
    with pytest.raises(grpc.aio.AioRpcError) as other:
        await running.quota.Commit(
            quota_pb2.CommitRequest(reservation_id=charged.reservation_id, quantity=2)
        )
    assert other.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert (await balance(running, account_id)).available == 70


async def test_refunding_what_is_already_refunded_moves_nothing(running: Running) -> None:
    """Proves a refund of everything refundable when nothing is left answers 0 and
    changes nothing, and that its key replays."""
    account_id = await create(running, allotment=100)
    charged = await charge(running, account_id, 1, "c1")
    await running.quota.Refund(
        quota_pb2.RefundRequest(reservation_id=charged.reservation_id, idempotency_key="f1")
    )
    before = await balance(running, account_id)
    nothing = await running.quota.Refund(
        quota_pb2.RefundRequest(reservation_id=charged.reservation_id, idempotency_key="f2")
    )
    assert (nothing.units_refunded, nothing.units_refundable, nothing.replayed) == (0, 0, False)
    again = await running.quota.Refund(
        quota_pb2.RefundRequest(reservation_id=charged.reservation_id, idempotency_key="f2")
    )
    assert again.replayed and again.units_refunded == 0
    after = await balance(running, account_id)
    assert after.SerializeToString() == before.SerializeToString()


async def test_create_again_with_other_labels_anchor_or_alerts_is_already_exists(
    running: Running,
) -> None:
    """Proves CreateAccount replays only the very same account: other labels, another
    anchor day or other alerts are ALREADY_EXISTS."""
    account_id = await create(running, allotment=100, labels={"team": "a"},
                              billing_anchor_day=5)
    same = await running.accounts.CreateAccount(account_pb2.CreateAccountRequest(
        account_id=account_id, monthly_allotment=100, labels={"team": "a"},
        billing_anchor_day=5))
    assert same.account.replayed
    for other in [
        {"labels": {"team": "b"}, "billing_anchor_day": 5},
        {"labels": {"team": "a"}, "billing_anchor_day": 20},
        {"labels": {"team": "a"}, "billing_anchor_day": 5,
         "alerts": common_pb2.AlertSettings(allotment_used_percent=[50])},
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as exists:
            await running.accounts.CreateAccount(account_pb2.CreateAccountRequest(
                account_id=account_id, monthly_allotment=100, **other))  # type: ignore[arg-type]
        assert exists.value.code() == grpc.StatusCode.ALREADY_EXISTS
