"""Grants merge or leave on every path that adds them (auto-purchase, refund credits,
restored units), so an account's live grants stay within GRANTS_MAX whatever its
history."""

from __future__ import annotations

import grpc
import pytest

from tally.domain.limits import GRANTS_MAX
from tally_client.v1 import account_pb2, catalog_pb2, common_pb2, quota_pb2
from tests.support import Running, unique

DAY_MS = 86_400_000


async def priced_operation(running: Running, units_per_quantity: int) -> str:
    operation = f"test.grants-{unique('op')}"
    await running.catalog.SetPrice(catalog_pb2.SetPriceRequest(
        operation=operation, units_per_quantity=units_per_quantity))
    return operation


async def create(running: Running, **fields: object) -> account_pb2.Account:
    created = await running.accounts.CreateAccount(account_pb2.CreateAccountRequest(
        account_id=unique(), **fields))  # type: ignore[arg-type]
    return created.account


async def grants(running: Running, account_id: str) -> list[common_pb2.Grant]:
    reply = await running.quota.GetBalance(quota_pb2.GetBalanceRequest(account_id=account_id))
    return list(reply.balance.grants)


async def charge(running: Running, account_id: str, operation: str, quantity: int,
                 key: str) -> quota_pb2.ChargeResponse:
    return await running.quota.Charge(quota_pb2.ChargeRequest(
        account_id=account_id, operation=operation, quantity=quantity, idempotency_key=key))


async def purchase(running: Running, account_id: str, units: int, key: str,
                   expires_at_ms: int = 0) -> account_pb2.PurchaseUnitsResponse:
    request = account_pb2.PurchaseUnitsRequest(account_id=account_id, units=units,
                                               idempotency_key=key)
    if expires_at_ms:
        request.expires_at.FromMilliseconds(expires_at_ms)
    return await running.accounts.PurchaseUnits(request)


async def test_auto_purchases_join_one_grant_also_at_the_grant_limit(running: Running) -> None:
    """Proves every auto-purchased pack joins the account's one auto-purchase grant (ten
    top-ups leave one grant, not ten), and that at GRANTS_MAX live grants a spend still
    buys its pack into that grant: the account never holds more than GRANTS_MAX grants,
    while a customer's purchase beyond it stays FAILED_PRECONDITION."""
    operation = await priced_operation(running, 5)
    account = await create(
        running, overage_policy=common_pb2.OVERAGE_POLICY_AUTO_PURCHASE,
        auto_purchase_units=5, auto_purchase_threshold=0, overage_limit=10**9)
    for n in range(10):
        await charge(running, account.account_id, operation, 1, f"c{n}")
    held = await grants(running, account.account_id)
    assert [(g.kind, g.units_granted, g.units_remaining) for g in held] == [
        (common_pb2.GRANT_KIND_PURCHASE, 50, 0)]
    for n in range(GRANTS_MAX - 1):
        await purchase(running, account.account_id, 1, f"p{n}")
    assert len(await grants(running, account.account_id)) == GRANTS_MAX
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await purchase(running, account.account_id, 1, "one-too-many")
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    # 999 units available; 1000 to spend: one more pack, into the auto-purchase grant
    await charge(running, account.account_id, operation, 200, "at-the-limit")
    held = await grants(running, account.account_id)
    assert len(held) == GRANTS_MAX
    auto = [(g.units_granted, g.units_remaining) for g in held if g.reference == "auto-purchase"]
    assert auto == [(55, 0)]  # the oldest grant, spent first
    assert sum(g.units_remaining for g in held) == 4


async def test_refund_credits_join_one_credit_grant(running: Running) -> None:
    """Proves overage invoiced at a period's end and refunded later comes back as a
    PROMOTIONAL credit, every such credit in one live credit grant, each refund exact."""
    operation = await priced_operation(running, 10)
    account = await create(running, overage_policy=common_pb2.OVERAGE_POLICY_ALLOW,
                           overage_limit=1000)
    charged = [await charge(running, account.account_id, operation, 1, f"c{n}")
               for n in range(3)]
    running.clock.set(account.period_end.ToMilliseconds())
    for n, done in enumerate(charged):
        refunded = await running.quota.Refund(quota_pb2.RefundRequest(
            reservation_id=done.reservation_id, idempotency_key=f"r{n}"))
        assert refunded.units_refunded == 10
    held = await grants(running, account.account_id)
    assert [(g.kind, g.units_granted, g.units_remaining, g.expires_at.ToMilliseconds())
            for g in held] == [(common_pb2.GRANT_KIND_PROMOTIONAL, 30, 30, 0)]


async def test_a_refund_to_a_grant_gone_joins_a_live_grant_of_its_kind_and_expiry(
    running: Running,
) -> None:
    """Proves units refunded to a grant that left the account exhausted (at a period's
    end) but is still valid join a live grant of the same kind and expiry rather than
    bringing the old grant back, exactly (the units come back, nothing is granted)."""
    operation = await priced_operation(running, 1)
    account = await create(running)
    expires_ms = account.period_end.ToMilliseconds() + 60 * DAY_MS
    await purchase(running, account.account_id, 10, "p1", expires_ms)
    spent = await charge(running, account.account_id, operation, 10, "c1")
    running.clock.set(account.period_end.ToMilliseconds())
    await purchase(running, account.account_id, 5, "p2", expires_ms)  # the first one left
    refunded = await running.quota.Refund(quota_pb2.RefundRequest(
        reservation_id=spent.reservation_id, units=4, idempotency_key="r1"))
    assert refunded.units_refunded == 4
    held = await grants(running, account.account_id)
    assert [(g.kind, g.units_granted, g.units_remaining) for g in held] == [
        (common_pb2.GRANT_KIND_PURCHASE, 5, 9)]
