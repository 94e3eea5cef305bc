"""Two servers that make the same new reservation id: the script refuses the second
(nothing moves) and the store tries a new id at once, so the caller never sees it."""

from __future__ import annotations

from tally_client.v1 import account_pb2, quota_pb2
from tests.support import Running, unique


async def test_a_reservation_id_made_twice_is_replaced_without_the_caller_seeing_it(
    running: Running,
) -> None:
    """Proves a Reserve and a Charge whose new id is already taken (as another server
    with a stopped clock would make it) succeed under a new id, and every unit is
    where it should be."""
    account_id = unique()
    await running.accounts.CreateAccount(
        account_pb2.CreateAccountRequest(account_id=account_id, monthly_allotment=1000)
    )
    first = await running.quota.Reserve(quota_pb2.ReserveRequest(
        account_id=account_id, operation="image.upscale", quantity=1, idempotency_key="a"))
    taken = int(first.reservation_id.split(".")[1])
    ids = running.authority.store.reservation_ids
    for key, call in (("b", running.quota.Reserve), ("c", running.quota.Charge)):
        ids._last = taken - 1  # the clock stands still: the next id is the taken one
        request_type = (quota_pb2.ReserveRequest if call is running.quota.Reserve
                        else quota_pb2.ChargeRequest)
        reply = await call(request_type(
            account_id=account_id, operation="image.upscale", quantity=2, idempotency_key=key))
        assert reply.reservation_id != first.reservation_id
        assert int(reply.reservation_id.split(".")[1]) > taken
    balance = (await running.quota.GetBalance(
        quota_pb2.GetBalanceRequest(account_id=account_id))).balance
    assert (balance.available, balance.held) == (1000 - 10 - 20 - 20, 30)
