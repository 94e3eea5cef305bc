"""What recovery and verification read from and write back into Redis.

The ledger keeps copies (msgpack images) of what the scripts wrote: accounts,
reservations, idempotency records, prices. Recovery writes them back, with the
indexes and counters the scripts keep beside them; verification reads the
accounts to compare them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import msgpack

from tally.deployment import record_in_redis
from tally.domain.usage import Usage
from tally.store.client import ScriptRunner
from tally.store.contract import CatalogContext, FenceMark
from tally.store.failures import redis_errors
from tally.store.keys import KeySpace
from tally.store.quota_store import QuotaStore
from tally.store.usage_counters import restore_requests

PIPELINE_BATCH = 500
SCAN_COUNT = 1000

# (operation, version, price, effective at ms), as the ledger keeps them
PriceVersion = tuple[str, int, int, int]


class StateImages:
    def __init__(self, scripts: ScriptRunner, keys: KeySpace) -> None:
        # what the scripts own a format of (the usage counters) goes back through them
        self.scripts = scripts
        self.redis: Any = scripts.redis  # the store's pool (an aioredis.Redis)
        self.keys = keys

    @classmethod
    def of(cls, store: QuotaStore) -> StateImages:
        """On the store's scripts, connection pool and key space."""
        return cls(store.runner, store.keys)

    # --- reads ------------------------------------------------------------------

    async def account(self, account_id: str) -> bytes | None:
        with redis_errors():
            raw = await self.redis.get(self._account_key(account_id))
        return None if raw is None else bytes(raw)

    async def account_seqs(self, account_ids: Sequence[str]) -> dict[str, int]:
        """Each account's event sequence in Redis (-1: missing)."""
        seqs: dict[str, int] = {}
        with redis_errors():
            for start in range(0, len(account_ids), PIPELINE_BATCH):
                chunk = account_ids[start : start + PIPELINE_BATCH]
                pipe = self.redis.pipeline(transaction=False)
                for account_id in chunk:
                    pipe.get(self._account_key(account_id))
                for account_id, raw in zip(chunk, await pipe.execute(), strict=True):
                    seqs[account_id] = -1 if raw is None else int(
                        unpack_image(raw).get("event_seq", 0)
                    )
        return seqs

    async def account_ids(self) -> list[str]:
        """Every account Redis holds, in no particular order."""
        with redis_errors():
            return [
                self.keys.account_id_of(key.decode())
                async for key in self.redis.scan_iter(
                    match=self.keys.account_pattern(), count=SCAN_COUNT
                )
            ]

    async def fences(self) -> list[FenceMark]:
        """Every shard's fence as Redis holds it ({0, 0} when missing)."""
        with redis_errors():
            pipe = self.redis.pipeline(transaction=False)
            for shard in range(self.keys.shards):
                pipe.hmget(self.keys.fence(shard), "epoch", "count")
            rows = await pipe.execute()
        return [FenceMark(int(epoch or 0), int(count or 0)) for epoch, count in rows]

    async def has_catalog(self) -> bool:
        with redis_errors():
            return bool(await self.redis.exists(self.keys.prices(0)))

    # --- restores ---------------------------------------------------------------

    async def restore_account(self, account_id: str, image: bytes) -> None:
        """The account, due at once in its shard's closings: the sweeper's first pass
        closes it if it is due and indexes its next closing (close_period.lua)."""
        closings = self.keys.closings(self.keys.shard_of(account_id))
        with redis_errors():
            await self.redis.set(self._account_key(account_id), image)
            await self.redis.zadd(closings, {account_id: 0})

    async def restore_usage(
        self, account_id: str, period_start_ms: int, period_end_ms: int,
        usages: Iterable[Usage], now_ms: int,
    ) -> None:
        """Replaces the period's usage counters with these usage records'
        (restore_usage.lua writes them, in the scripts' own format)."""
        keys = self.keys.usage_slots(account_id)
        with redis_errors():
            for request in restore_requests(period_start_ms, period_end_ms, usages):
                context = CatalogContext(now=now_ms)
                await self.scripts.run(request.SCRIPT, keys, request.encode(context), None)

    async def restore_open_hold(
        self, reservation_id: str, account_id: str, image: bytes, expires_at_ms: int
    ) -> None:
        """A held reservation (in its account's held hash), with the expiry indexes
        the reaper and the account use."""
        _, holds_key, expiries_key, *_ = self.keys.account_keys(account_id)
        with redis_errors():
            await self.redis.hset(self.keys.held(account_id), reservation_id, image)
            await self.redis.zadd(holds_key, {reservation_id: expires_at_ms})
            await self.redis.zadd(expiries_key, {reservation_id: expires_at_ms})

    async def restore_closed_hold(self, reservation_id: str, image: bytes, ttl_ms: int) -> None:
        with redis_errors():
            await self.redis.set(self.keys.reservation(reservation_id), image, px=ttl_ms)

    async def restore_idempotency(self, record_key: str, image: bytes, ttl_ms: int) -> None:
        with redis_errors():
            await self.redis.set(record_key, image, px=ttl_ms)

    async def restore_catalog(self, prices: Sequence[PriceVersion]) -> None:
        """Every price version into the history, superseded when the operation's next
        version took effect; the newest of each operation as its price (unless Redis
        has a newer one); the catalog version at least the newest."""
        newest: dict[str, PriceVersion] = {}
        by_version = sorted(prices, key=lambda price: (price[0], price[1]))
        with redis_errors():
            for index, price in enumerate(by_version):
                operation, version, units, _ = price
                later = by_version[index + 1 : index + 2]
                superseded_at = later[0][3] if later and later[0][0] == operation else 0
                record = {"price": units, "superseded_at": superseded_at}
                await self.redis.hset(
                    self.keys.price_history(0), self.keys.price_version_field(operation, version),
                    msgpack.packb(record),
                )
                if operation not in newest or version > newest[operation][1]:
                    newest[operation] = price
            for operation, version, units, at_ms in newest.values():
                current = await self.redis.hget(self.keys.prices(0), operation)
                if current is None or unpack_image(current)["version"] < version:
                    record = msgpack.packb({"price": units, "version": version, "at": at_ms})
                    await self.redis.hset(self.keys.prices(0), operation, record)
            if prices:
                top = max(version for _, version, _, _ in prices)
                stored = await self.redis.hget(self.keys.catalog_meta(), "version")
                if stored is None or int(stored) < top:
                    await self.redis.hset(self.keys.catalog_meta(), "version", top)

    async def set_fence(self, shard: int, mark: FenceMark) -> None:
        """The shard's fence as recovery left it (lib/fence.lua reads it)."""
        with redis_errors():
            await self.redis.hset(
                self.keys.fence(shard), mapping={"epoch": mark.epoch, "count": mark.count}
            )

    async def restore_deployment(self) -> None:
        """The deployment facts (the shard layout), unless Redis has them."""
        with redis_errors():
            await record_in_redis(self.redis, self.keys.layout)

    def _account_key(self, account_id: str) -> str:
        return self.keys.account_keys(account_id)[0]


def unpack_image(raw: bytes) -> dict[str, Any]:
    """A state image (an account, a reservation...) as the map the scripts wrote."""
    value = msgpack.unpackb(raw, raw=False, strict_map_key=False)
    if not isinstance(value, dict):
        raise ValueError("state image is not a map")
    return value
