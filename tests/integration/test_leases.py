"""Leases of background work (store/leases.py) on a real Redis: renewal, release,
takeover of a lapsed owner's lease, fair shares over a fleet, the registry's bound,
and the start-up lease's mutual exclusion."""

from __future__ import annotations

import asyncio
import itertools
import math
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from tally import metrics
from tally.clock import ManualClock
from tally.domain.errors import InvalidArgument
from tally.domain.limits import LEASE_MEMBERS_MAX, LEASE_TTL_MS_MAX
from tally.store.client import ScriptRunner, connect
from tally.store.keys import KeySpace
from tally.store.layout import ShardLayout, TagScheme
from tally.store.leases import (
    LEASE_TTL_MAX_S,
    LEASE_TTL_MIN_S,
    GlobalLease,
    LeaseCalls,
    LeaseSettings,
    ShardLeases,
    exclusive,
)
from tests.support import T0_MS, RedisProcess, unique

SHARDS = 16
TTL = LeaseSettings(ttl_s=60.0)


@pytest_asyncio.fixture
async def runner(module_redis: RedisProcess) -> AsyncIterator[ScriptRunner]:
    redis = connect(module_redis.url, socket_timeout_s=5.0, max_connections=8)
    try:
        scripts = ScriptRunner(redis, pipelined=False)
        await scripts.load()
        yield scripts
    finally:
        await redis.aclose()


def fleet_of(runner: ScriptRunner, clock: ManualClock, size: int) -> list[LeaseCalls]:
    return [LeaseCalls(runner, unique("owner"), clock) for _ in range(size)]


def job() -> str:
    """A job name of its own per test (the module's Redis is shared)."""
    return "t_" + unique("").replace("-", "").lower()[:24]


async def test_a_lease_is_renewed_by_its_owner_refused_to_others_and_taken_once_lapsed(
    runner: ScriptRunner,
) -> None:
    """Proves the owner renews its lease, another owner is refused while it lasts (to the
    millisecond), takes it over once it has lapsed (counted as a takeover), and that a
    release by anyone but the holder frees nothing while the holder's frees it at once
    (the next taker's is no takeover)."""
    clock = ManualClock(T0_MS)
    first, second = fleet_of(runner, clock, 2)
    key = KeySpace.lease(job())
    assert await first.acquire(key, 1000) == (True, False)
    assert await first.acquire(key, 1000) == (True, False)  # renewed: until T0 + 1000
    clock.advance(999)
    assert await second.acquire(key, 1000) == (False, False)
    clock.advance(1)
    assert await second.acquire(key, 1000) == (True, True)
    assert await first.release(key) is False
    assert await second.acquire(key, 1000) == (True, False)
    assert await second.release(key) is True
    assert await first.acquire(key, 1000) == (True, False)


async def test_lease_requests_beyond_their_bounds_are_refused(runner: ScriptRunner) -> None:
    """Proves the scripts check the ttl (1 ms .. LEASE_TTL_MS_MAX) and the registry's
    bound (1 .. LEASE_MEMBERS_MAX) themselves, accepting both ends."""
    calls = LeaseCalls(runner, unique("owner"), ManualClock(T0_MS))
    key, registry = KeySpace.lease(job()), KeySpace.lease_members(job())
    assert (await calls.acquire(key, LEASE_TTL_MS_MAX))[0]
    with pytest.raises(InvalidArgument):
        await calls.acquire(key, LEASE_TTL_MS_MAX + 1)
    with pytest.raises(InvalidArgument):
        await calls.acquire(key, 0)
    assert await calls.heartbeat(registry, 1000, LEASE_MEMBERS_MAX) == 1
    with pytest.raises(InvalidArgument):
        await calls.heartbeat(registry, 1000, LEASE_MEMBERS_MAX + 1)


def test_lease_settings_accept_their_bounds_and_refuse_beyond() -> None:
    """Proves the ttl is bounded (LEASE_TTL_MIN_S .. LEASE_TTL_MAX_S, both accepted) and
    renewals come three per ttl."""
    assert LeaseSettings(ttl_s=LEASE_TTL_MIN_S).renew_s == pytest.approx(LEASE_TTL_MIN_S / 3)
    assert LeaseSettings(ttl_s=LEASE_TTL_MAX_S).ttl_ms == LEASE_TTL_MS_MAX
    for ttl_s in (LEASE_TTL_MIN_S / 2, LEASE_TTL_MAX_S + 1):
        with pytest.raises(ValueError, match="lease ttl"):
            LeaseSettings(ttl_s=ttl_s)
    with pytest.raises(ValueError, match="members_max"):
        LeaseSettings(ttl_s=1.0, members_max=LEASE_MEMBERS_MAX + 1)


async def refresh_all(fleet: list[ShardLeases], rounds: int = 3) -> None:
    for _ in range(rounds):
        for leases in fleet:
            await leases.refresh()


def assert_partition(fleet: list[ShardLeases], share: int) -> None:
    held = [set(leases.shards()) for leases in fleet]
    assert all(len(shards) <= share for shards in held), held
    for a, b in itertools.combinations(held, 2):
        assert not a & b, (a, b)
    assert set().union(*held) == set(range(SHARDS))


async def test_shards_spread_over_the_fleet_and_a_dead_process_is_taken_over(
    runner: ScriptRunner,
) -> None:
    """Proves three processes split the shards, each at most its fair share
    ceil(16 / 3) = 6, none twice and none left out; one stopping gives its shards
    back and the two left cover every shard at their next renewals; one dying
    (no release) leaves its shards until its leases lapse, then the last one takes
    them over (counted) and holds all 16."""
    clock = ManualClock(T0_MS)
    name, keys = job(), KeySpace(ShardLayout(SHARDS, TagScheme.SLOT_RANGE))
    fleet = [ShardLeases(calls, keys, name, TTL) for calls in fleet_of(runner, clock, 3)]
    await refresh_all(fleet)
    assert_partition(fleet, math.ceil(SHARDS / 3))

    stopped = fleet.pop()
    await stopped.release()
    assert stopped.shards() == []
    await refresh_all(fleet)
    assert_partition(fleet, SHARDS // 2)

    survivor = fleet[1]  # fleet[0] dies: it neither renews nor releases from here on
    takeovers = metrics.LEASE_TAKEOVERS.labels(job=name)
    before = takeovers._value.get()
    clock.advance(TTL.ttl_ms - 1)
    await survivor.refresh()
    assert len(survivor.shards()) == SHARDS // 2  # the dead one's leases still last
    clock.advance(1)
    await survivor.refresh()
    assert survivor.shards() == list(range(SHARDS))
    assert takeovers._value.get() - before == SHARDS // 2


async def test_the_registry_counts_at_most_members_max_processes(runner: ScriptRunner) -> None:
    """Proves a job's registry holds members_max processes at most: one beyond is not
    added and counts the registry as full (its share is ceil(shards / members_max)),
    and its place frees once a member leaves."""
    clock = ManualClock(T0_MS)
    registry = KeySpace.lease_members(job())
    fleet = fleet_of(runner, clock, 4)
    counts = [await calls.heartbeat(registry, 1000, 3) for calls in fleet]
    assert counts == [1, 2, 3, 3]
    assert await runner.redis.zcard(registry) == 3
    await fleet[0].leave(registry)
    assert await fleet[3].heartbeat(registry, 1000, 3) == 3
    assert await runner.redis.zscore(registry, fleet[3].owner) is not None


async def test_a_global_lease_has_one_holder_and_passes_on_at_release(
    runner: ScriptRunner,
) -> None:
    """Proves one process of two holds a global lease, and the other holds it at its
    next renewal once the first gives it back."""
    clock = ManualClock(T0_MS)
    name = job()
    first, second = (GlobalLease(calls, name, TTL) for calls in fleet_of(runner, clock, 2))
    await first.refresh()
    await second.refresh()
    assert (first.held(), second.held()) == (True, False)
    await first.release()
    await second.refresh()
    assert (first.held(), second.held()) == (False, True)


async def test_the_startup_lease_runs_concurrent_starts_one_at_a_time(
    runner: ScriptRunner,
) -> None:
    """Proves blocks under the same exclusive lease never overlap (three at once), and
    that a process waiting longer than its wait gives up naming the lease."""
    name, active, most = job(), 0, 0

    async def start_up(calls: LeaseCalls) -> None:
        nonlocal active, most
        async with exclusive(calls, name, LeaseSettings(ttl_s=1.0), wait_s=10.0):
            active += 1
            most = max(most, active)
            await asyncio.sleep(0.05)
            active -= 1

    await asyncio.gather(*(start_up(LeaseCalls(runner, unique("owner"))) for _ in range(3)))
    assert most == 1

    holder, late = LeaseCalls(runner, unique("owner")), LeaseCalls(runner, unique("owner"))
    async with exclusive(holder, name, LeaseSettings(ttl_s=1.0), wait_s=0):
        with pytest.raises(RuntimeError, match=f"held the {name} lease"):
            async with exclusive(late, name, LeaseSettings(ttl_s=1.0), wait_s=0.2):
                pass


def test_lease_keys_live_in_their_shards_slot() -> None:
    """Proves a per-shard lease carries its shard's hash tag and the global ones one tag
    of their own."""
    keys = KeySpace(ShardLayout(SHARDS, TagScheme.SLOT_RANGE))
    assert keys.shard_lease(7, "reaper") == f"tally:{{{keys.tag(7)}}}:lease:reaper"
    assert KeySpace.lease("snapshot") == "tally:{lease}:snapshot"
    assert KeySpace.lease_members("reaper") == "tally:{lease}:members:reaper"

