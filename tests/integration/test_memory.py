"""What a call leaves in Redis: compact records without balance copies, idempotency
keys that never shape key names, closed reservations that leave Redis after a
replay window and come back from the ledger, and the sizing projection."""

from __future__ import annotations

from pathlib import Path

import grpc
import msgpack
import pytest
import redis.asyncio as aioredis
from google.protobuf.duration_pb2 import Duration

from bench import memory
from tally.ledger import recovery
from tally.store.contract import CommitRequest
from tally.store.failures import HoldNotInStore
from tally.store.keys import idempotency_digest
from tally.store.state_images import StateImages, unpack_image
from tally_client.v1 import account_pb2, common_pb2, quota_pb2
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
            match="*:i:*")]
        assert sorted(name.rsplit(":", 1)[1] for name in names) == sorted(
            idempotency_digest(account_id, key) for key in ODD_KEYS)
        assert all(len(name.rsplit(":", 1)[1]) == 14 for name in names)
        authority = running.authority
        report = await recovery.verify(
            StateImages.of(authority.store), authority.ledger, authority.flusher,
            lambda _: None,
        )
        assert report.differences == []
        assert report.accounts == 1
    finally:
        await stop_running(running)


MINUTE_MS = 60_000


async def closed_reservation_story(running: Running, account_id: str) -> list[str]:
    """Reservations closed, then used again once the clock has passed the closed
    window: every answer, and the account's ledger rows, in order, as text with the
    reservation ids (made at random) named by their role."""
    await running.accounts.CreateAccount(account_pb2.CreateAccountRequest(
        account_id=account_id, monthly_allotment=1000,
        overage_policy=common_pb2.OVERAGE_POLICY_ALLOW, overage_limit=100))
    held = await reserve(running, account_id, 3, "r-1", ttl_s=60)
    commit = quota_pb2.CommitRequest(reservation_id=held.reservation_id, quantity=2)
    answers: list[object] = [await running.quota.Commit(commit)]
    charged = await charge(running, account_id, 5, "c-1")
    answers.append(await running.quota.Refund(quota_pb2.RefundRequest(
        reservation_id=charged.reservation_id, units=10, idempotency_key="f-1")))
    running.clock.advance(11 * MINUTE_MS)  # past the closed window (10 minutes)
    answers.append(await running.quota.Commit(commit))
    answers.append(await running.quota.Refund(quota_pb2.RefundRequest(
        reservation_id=held.reservation_id, units=5, idempotency_key="f-2")))
    answers.append(await running.quota.Refund(quota_pb2.RefundRequest(
        reservation_id=charged.reservation_id, idempotency_key="f-3")))
    with pytest.raises(grpc.aio.AioRpcError) as extended:
        await running.quota.Extend(quota_pb2.ExtendRequest(
            reservation_id=held.reservation_id, ttl=Duration(seconds=60)))
    answers.append((extended.value.code(), extended.value.details()))
    await running.authority.flusher.flush_all(steal=True)
    rows = await running.authority.ledger.entries(account_id)
    named = {held.reservation_id: "<held>", charged.reservation_id: "<charged>"}
    story = []
    for item in [*answers, *((row.entry_id, row.type, row.units, row.available_after,
                              row.detail) for row in rows)]:
        text = repr(item)
        for rid, role in named.items():
            text = text.replace(rid, role)
        story.append(text)
    return story


async def test_closed_reservations_leave_redis_and_come_back_from_the_ledger_unchanged(
    own_redis: RedisProcess,
) -> None:
    """Proves that past the closed window a closed reservation is no longer in Redis,
    and that Commit replays, Refunds and Extends of it are then served from the
    ledger's image with the answers and ledger rows they get while it is in Redis."""
    wipe = aioredis.Redis.from_url(own_redis.url)
    account_id = "story-1"
    kept = await start_running(own_redis.url, closed_reservation_window="35d")
    try:
        expected = await closed_reservation_story(kept, account_id)
    finally:
        await stop_running(kept)
    await wipe.flushall()
    running = await start_running(own_redis.url)
    try:
        assert await closed_reservation_story(running, account_id) == expected
    finally:
        await stop_running(running)
        await wipe.aclose()


async def test_closed_reservation_window_and_retention_bounds(
    running: Running,
) -> None:
    """Proves the bounds: a closed reservation is in Redis until 1 ms before its last
    change + closed_reservation_window and not at that instant; brought back from the
    ledger until 1 ms before closed + reservation_retention, NOT_FOUND from then; an
    id below the account's last one that it never made, unknown to the ledger too, is
    NOT_FOUND."""
    store = running.authority.store
    account_id = await create(running, allotment=1000)
    charged = await charge(running, account_id, 1, "c-1")
    closed_at = running.clock.now_ms()
    window_ms = store.limits.closed_reservation_window_ms
    assert window_ms == 600_000  # the default
    request = CommitRequest(reservation_id=charged.reservation_id)
    running.clock.set(closed_at + window_ms - 1)
    assert (await store.commit(request, None)).replayed
    running.clock.set(closed_at + window_ms)
    with pytest.raises(HoldNotInStore):
        await store.commit(request, None)
    refund = quota_pb2.RefundRequest(reservation_id=charged.reservation_id, units=1,
                                     idempotency_key="f-1")
    retention_ms = store.limits.reservation_retention_ms
    running.clock.set(closed_at + retention_ms - 1)
    assert (await running.quota.Refund(refund)).units_refunded == 1
    refund.idempotency_key = "f-2"
    running.clock.set(closed_at + retention_ms + window_ms)
    with pytest.raises(grpc.aio.AioRpcError) as late:
        await running.quota.Refund(refund)
    assert late.value.code() == grpc.StatusCode.NOT_FOUND
    tag, seq, _ = charged.reservation_id.split(".", 2)
    never_made = f"{tag}.{int(seq) - 1}.{account_id}"  # below the account's last id
    with pytest.raises(grpc.aio.AioRpcError) as other:
        await running.quota.Commit(quota_pb2.CommitRequest(reservation_id=never_made))
    assert other.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_pair_rate_of_1000_per_second_needs_at_most_16_gib_of_redis(
    tmp_path: Path, own_redis: RedisProcess,
) -> None:
    """Proves, from the used_memory growth of what Reserve+Commit pairs leave in Redis
    at the default settings (each record kind for its window, with its keys' expiry
    entries and hash-table slots, at tables just doubled: 2^8 + 1 pairs), that 1,000
    pairs/s need at most 16 GiB of Redis at steady state, and that no kind embeds a
    balance."""
    figures = await memory.measure(257, tmp_path, own_redis.url)
    assert figures.windows_s == {"idempotency": 86400.0, "closed reservation": 600.0,
                                 "stream (flushed)": 30.0}
    assert figures.per_pair("idempotency") <= 160
    assert figures.per_pair("closed reservation") <= 700
    assert figures.steady_state_bytes(1000, strict=True) <= memory.TARGET_BYTES


async def last_event_images(running: Running, account_id: str) -> dict[bytes, bytes]:
    """The fields of the newest event of the account's shard stream."""
    store = running.authority.store
    events_key = store.keys.events(store.keys.shard_of(account_id))
    [(_, fields)] = await store.redis.xrevrange(events_key, count=1)
    return dict(fields)


async def test_images_of_the_last_event_are_the_records_redis_holds(
    own_redis: RedisProcess,
) -> None:
    """Proves the `_holds` and `_idem` images a script's last event carries (built from
    the bytes it wrote, each record packed once) decode to exactly the records in Redis:
    for one hold and its idempotency record, and for a map of more than 15 holds (a
    16-bit msgpack map header), when one Reserve expires the account's due holds."""
    running = await start_running(own_redis.url, reaper_interval="1h")
    try:
        store = running.authority.store
        redis = store.redis
        account_id = await create(running, allotment=1000)
        held = await reserve(running, account_id, 1, "one", ttl_s=60)
        fields = await last_event_images(running, account_id)
        [(rid, hold)] = unpack_image(fields[b"_holds"]).items()
        assert rid == held.reservation_id
        held = store.keys.held(account_id)
        assert hold == unpack_image(await redis.hget(held, rid))
        idem = unpack_image(fields[b"_idem"])
        assert set(idem) == {"key", "record", "expires_at"}
        assert idem["key"] == store.keys.idempotency(account_id, "one")
        assert idem["record"] == msgpack.unpackb(await redis.get(idem["key"]))
        assert isinstance(idem["expires_at"], int)

        due = [(await reserve(running, account_id, 1, f"due-{i}", ttl_s=1)).reservation_id
               for i in range(20)]
        running.clock.advance(2_000)
        fresh = await reserve(running, account_id, 1, "fresh", ttl_s=60)
        holds = unpack_image((await last_event_images(running, account_id))[b"_holds"])
        assert sorted(holds) == sorted([*due, fresh.reservation_id])
        for rid, hold in holds.items():  # due ones the Reserve expired without naming them
            assert hold == unpack_image(await redis.hget(held, rid))
        assert {hold["state"] for rid, hold in holds.items() if rid in due} == {"EXPIRED"}
    finally:
        await stop_running(running)
