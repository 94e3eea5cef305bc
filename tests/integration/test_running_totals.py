"""Running totals are bounded like amounts (at most UNITS_MAX = 2^53 - 1), refused
before any write, and every number the scripts write to a stream is plain decimal."""

from __future__ import annotations

import re

import grpc
import pytest

from tally.domain.limits import UNITS_MAX
from tally.domain.usage import HOUR_MS
from tally_client.v1 import account_pb2, catalog_pb2, quota_pb2
from tests.support import Running, unique

DECIMAL = re.compile(rb"-?[0-9]+")


async def test_a_running_total_past_the_bound_is_refused_before_any_write(
    running: Running,
) -> None:
    """Proves charges and refunds may take units_charged_total and units_refunded_total
    (and an hour's usage counters) exactly to UNITS_MAX, that a charge that would pass
    one is FAILED_PRECONDITION naming it with nothing changed, and that every number in
    the account's stream entries is an integer in decimal form."""
    operation = f"test.totals-{unique('op')}"
    await running.catalog.SetPrice(catalog_pb2.SetPriceRequest(
        operation=operation, units_per_quantity=1))
    account_id = unique()
    await running.accounts.CreateAccount(account_pb2.CreateAccountRequest(account_id=account_id))
    await running.accounts.PurchaseUnits(account_pb2.PurchaseUnitsRequest(
        account_id=account_id, units=2**52, idempotency_key="p"))
    for n, quantity in enumerate([2**52, 2**52 - 1]):
        charged = await running.quota.Charge(quota_pb2.ChargeRequest(
            account_id=account_id, operation=operation, quantity=quantity,
            idempotency_key=f"c{n}"))
        await running.quota.Refund(quota_pb2.RefundRequest(
            reservation_id=charged.reservation_id, idempotency_key=f"r{n}"))
    balance_request = quota_pb2.GetBalanceRequest(account_id=account_id)
    before = (await running.quota.GetBalance(balance_request)).balance
    assert (before.units_charged_total, before.units_refunded_total) == (UNITS_MAX, UNITS_MAX)
    for past in ("usage counted for", "units_charged_total"):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await running.quota.Charge(quota_pb2.ChargeRequest(
                account_id=account_id, operation=operation, quantity=1,
                idempotency_key="past"))
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert past in (refused.value.details() or "")
        assert f"would pass {UNITS_MAX}" in (refused.value.details() or "")
        running.clock.advance(HOUR_MS)  # the next hour's counters start from 0
    after = (await running.quota.GetBalance(balance_request)).balance
    before.ClearField("as_of")
    after.ClearField("as_of")
    assert after == before
    store = running.authority.store
    stream = store.keys.events(store.keys.shard_of(account_id))
    entries = [fields for _, fields in await store.redis.xrange(stream)
               if fields.get(b"account_id") == account_id.encode()]
    numbers = {name: value for fields in entries for name, value in fields.items()
               if name in (b"at", b"units", b"available_after", b"credit", b"overage")}
    assert numbers and all(DECIMAL.fullmatch(value) for value in numbers.values())
