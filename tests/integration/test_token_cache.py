"""The token cache under a burst: calls that miss it together share one Redis read."""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis

from tally.auth.authenticator import Authenticator
from tally.auth.roles import Role
from tally.auth.tokens import new_token
from tally.clock import ManualClock
from tally.store.token_store import TokenStore
from tests.support import T0_MS, RedisProcess

BURST = 200


async def hgets(redis: aioredis.Redis) -> int:
    stats = await redis.info("commandstats")
    return int(stats.get("cmdstat_hget", {}).get("calls", 0))


async def test_a_burst_of_calls_missing_the_cache_reads_the_token_once(
    module_redis: RedisProcess,
) -> None:
    """Proves 200 calls with one token arriving together on a cold cache (and again
    after the cache period ends) cost one HGET each time, and all are authenticated."""
    redis = aioredis.Redis.from_url(module_redis.url)
    try:
        clock = ManualClock(T0_MS)
        token = new_token(Role.WORKER, (), "burst", T0_MS, 0, "test")
        store = TokenStore(redis)
        await store.put(token.record)
        authenticator = Authenticator(store, clock, cache_ttl_s=2.0)
        bearer = f"Bearer {token.text}"
        for _ in range(2):  # cold, then after the cache period
            await redis.config_resetstat()
            principals = await asyncio.gather(
                *(authenticator.principal(bearer) for _ in range(BURST))
            )
            assert {p.role for p in principals} == {Role.WORKER}
            assert await hgets(redis) == 1
            clock.advance(2000)
    finally:
        await redis.aclose()
