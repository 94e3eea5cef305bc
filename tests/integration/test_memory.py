"""What a call leaves in Redis: compact records without balance copies, idempotency
keys that never shape key names, closed reservations that leave Redis after a
replay window and come back from the ledger, and the sizing projection."""

from __future__ import annotations

from tally.ledger import recovery
from tally.store.keys import idempotency_digest
from tally.store.state_images import StateImages
from tally.v1 import account_pb2, quota_pb2
from tests.integration.test_semantics import balance, charge, create, reserve
from tests.support import RedisProcess, Running, start_running, stop_running

# Idempotency keys of every allowed form that look like parts of key names.
ODD_KEYS = ("x}:acct:ghost", "}:acct:", "{s00}:acct:a", "*", "a:b:c", "tally:{s01}:events",
            "\\x00~!@#$%^&*()_+|\"<>?", "}" * 128, "k")


async def test_replays_answer_their_own_figures_with_the_balance_as_of_the_replay(
    running: Running,
) -> None:
    """Proves a replayed Reserve, Charge, Commit, Refund and PurchaseUnits answer the
    first call's own figures, flagged replayed, with the account's balance as of the
    replay (not a copy of the balance the first call saw)."""
    account_id = await create(running, allotment=1000)
    held = await reserve(running, account_id, 2, "r-1", ttl_s=60)
    charged = await charge(running, account_id, 1, "c-1")
    commit = quota_pb2.CommitRequest(reservation_id=held.reservation_id)
    committed = await running.quota.Commit(commit)
    refund = quota_pb2.RefundRequest(reservation_id=charged.reservation_id, units=4,
                                     idempotency_key="f-1")
    refunded = await running.quota.Refund(refund)
    purchase = account_pb2.PurchaseUnitsRequest(account_id=account_id, units=70,
                                                idempotency_key="p-1")
    bought = await running.accounts.PurchaseUnits(purchase)
    # something else moves the balance after every first call
    await charge(running, account_id, 3, "c-2")
    now = await balance(running, account_id)

    again = await reserve(running, account_id, 2, "r-1", ttl_s=60)
    assert again.replayed
    assert (again.reservation_id, again.units, again.expires_at, again.price_version,
            again.units_per_quantity, again.quantity) == (
        held.reservation_id, held.units, held.expires_at, held.price_version,
        held.units_per_quantity, held.quantity)
    assert again.balance == now != held.balance
    charged_again = await charge(running, account_id, 1, "c-1")
    assert charged_again.replayed
    assert (charged_again.reservation_id, charged_again.units, charged_again.overage_units,
            charged_again.price_version) == (charged.reservation_id, charged.units,
                                             charged.overage_units, charged.price_version)
    assert charged_again.balance == now
    committed_again = await running.quota.Commit(commit)
    assert committed_again.replayed
    assert (committed_again.units_charged, committed_again.units_released,
            committed_again.operation) == (committed.units_charged, committed.units_released,
                                           committed.operation)
    assert committed_again.balance == now != committed.balance
    refunded_again = await running.quota.Refund(refund)
    assert refunded_again.replayed
    assert (refunded_again.units_refunded, refunded_again.units_refundable) == (
        refunded.units_refunded, refunded.units_refundable)
    assert refunded_again.balance == now != refunded.balance
    assert (await running.accounts.PurchaseUnits(purchase)).grant == bought.grant
    assert await balance(running, account_id) == now


async def test_idempotency_keys_of_any_allowed_form_never_shape_key_names(
    own_redis: RedisProcess,
) -> None:
    """Proves idempotency keys that look like key names (`x}:acct:ghost`, globs, hash
    tags, 128 bytes) work, replay, leave only fixed-length digests in Redis' key
    names, and leave `verify` clean (no phantom account)."""
    running = await start_running(own_redis.url)
    try:
        account_id = await create(running, allotment=1000)
        for key in ODD_KEYS:
            first = await reserve(running, account_id, 1, key, ttl_s=60)
            again = await reserve(running, account_id, 1, key, ttl_s=60)
            assert again.replayed and again.reservation_id == first.reservation_id
            await running.quota.Commit(
                quota_pb2.CommitRequest(reservation_id=first.reservation_id))
        names = [key.decode() async for key in running.authority.store.redis.scan_iter(
            match="*:idem:*")]
        assert sorted(name.rsplit(":", 1)[1] for name in names) == sorted(
            idempotency_digest(account_id, key) for key in ODD_KEYS)
        assert all(len(name.rsplit(":", 1)[1]) == 22 for name in names)
        authority = running.authority
        report = await recovery.verify(
            StateImages.of(authority.store), authority.ledger, authority.flusher,
            lambda _: None,
        )
        assert report.differences == []
        assert report.accounts == 1
    finally:
        await stop_running(running)
