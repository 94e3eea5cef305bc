"""Where reservation records live now that every key a script touches is declared
(store/lua/lib/holds.lua): held ones in their account's held hash, closed ones under
their own key, and a reservation id the store made before the call."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration

from tally.domain.errors import Unavailable
from tally.store.contract import ReserveRequest
from tally.store.state_images import unpack_image
from tally_client.v1 import quota_pb2
from tests.integration.test_semantics import create, reserve
from tests.support import RedisProcess, Running, start_running, stop_running


async def records(running: Running, account_id: str, rid: str) -> tuple[Any, Any, int]:
    """The reservation's record in the held hash, under its own key, and its own
    key's time to live (ms; -2: no key)."""
    store = running.authority.store
    held = await store.redis.hget(store.keys.held(account_id), rid)
    key = store.keys.reservation(rid)
    own = await store.redis.get(key)
    return (held and unpack_image(held), own and unpack_image(own),
            await store.redis.pttl(key))


async def test_a_hold_expired_unnamed_stays_in_the_held_hash_until_the_reaper_moves_it(
    own_redis: RedisProcess,
) -> None:
    """Proves a due hold that another call expired (its key not declared) stays, closed,
    in the held hash with its shard expiries entry; the reaper's next pass names it and
    moves it under its own key for what is left of its closed window; past that window
    the reaper drops it."""
    running = await start_running(own_redis.url, reaper_interval="1h")
    try:
        store = running.authority.store
        account_id = await create(running)
        due = (await reserve(running, account_id, 1, "due", ttl_s=1)).reservation_id
        running.clock.advance(2_000)
        await reserve(running, account_id, 1, "touch", ttl_s=60)
        in_hash, own, _ = await records(running, account_id, due)
        assert in_hash["state"] == "EXPIRED" and own is None
        expiries = store.keys.expiries(store.keys.shard_of(account_id))
        assert await store.redis.zscore(expiries, due) is not None
        running.clock.advance(60_000)
        await running.authority.reaper.reap_once()
        in_hash, own, ttl_ms = await records(running, account_id, due)
        assert in_hash is None and own["state"] == "EXPIRED"
        window_ms = store.limits.closed_reservation_window_ms
        assert window_ms - 60_000 - 1_000 < ttl_ms <= window_ms - 60_000
        assert await store.redis.zscore(expiries, due) is None

        late = (await reserve(running, account_id, 1, "late", ttl_s=1)).reservation_id
        running.clock.advance(2_000)
        await reserve(running, account_id, 1, "touch-2", ttl_s=60)
        running.clock.advance(window_ms)
        await running.authority.reaper.reap_once()
        assert await records(running, account_id, late) == (None, None, -2)
        assert await store.redis.zscore(expiries, late) is None
    finally:
        await stop_running(running)


async def test_a_held_record_an_earlier_release_kept_under_its_own_key_still_works(
    running: Running,
) -> None:
    """Proves a held record under its own key (as releases before the held hash kept
    it) is found by the calls that name it, and moves into the held hash when written
    (its own key deleted)."""
    store = running.authority.store
    account_id = await create(running)
    rid = (await reserve(running, account_id, 1, "old", ttl_s=60)).reservation_id
    held_key = store.keys.held(account_id)
    raw = await store.redis.hget(held_key, rid)
    await store.redis.hdel(held_key, rid)
    await store.redis.set(store.keys.reservation(rid), raw)
    await running.quota.Extend(quota_pb2.ExtendRequest(reservation_id=rid,
                                                      ttl=Duration(seconds=120)))
    in_hash, own, _ = await records(running, account_id, rid)
    assert in_hash["state"] == "HELD" and own is None
    committed = await running.quota.Commit(quota_pb2.CommitRequest(reservation_id=rid))
    assert committed.units_charged > 0
    in_hash, own, _ = await records(running, account_id, rid)
    assert in_hash is None and own["state"] == "COMMITTED"


async def test_a_reservation_id_already_taken_is_refused_as_worth_a_retry(
    running: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Proves a reserve whose new id is one the account has (two servers made the same
    one) is UNAVAILABLE and changes nothing, and that a replay of the first reserve
    answers its id as before."""
    store = running.authority.store
    account_id = await create(running)
    monkeypatch.setattr(store.reservation_ids, "next_sequence", lambda now_ms: 77)
    first = await reserve(running, account_id, 1, "first", ttl_s=60)
    assert first.reservation_id.split(".")[1] == "77"
    before = await store.redis.get(store.keys.account_keys(account_id)[0])
    with pytest.raises(grpc.aio.AioRpcError) as taken:
        await reserve(running, account_id, 1, "second", ttl_s=60)
    assert taken.value.code() == grpc.StatusCode.UNAVAILABLE
    assert await store.redis.get(store.keys.account_keys(account_id)[0]) == before
    replay = await reserve(running, account_id, 1, "first", ttl_s=60)
    assert replay.reservation_id == first.reservation_id
    request = ReserveRequest(account_id=account_id, operation="image.upscale", quantity=1,
                             idempotency_key="third", labels={}, price_version=0,
                             ttl_ms=60_000)
    with pytest.raises(Unavailable):
        await store.reserve(request, None)
