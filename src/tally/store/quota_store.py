"""The store facade: one method per operation, each one script call.

Methods take validated plain values and return the script's reply as a
dict (see each script's header for its shape). The gRPC layer never speaks
Redis; it calls these.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack

from tally.clock import Clock
from tally.domain.catalog import DEFAULT_CATALOG
from tally.domain.usage import Usage
from tally.store.client import ScriptRunner, store_errors
from tally.store.contract import BillingPeriodRequest, ReadUsageRequest
from tally.store.keys import META_KEY, KeySpace
from tally.store.usage_counters import usage_of


@dataclass(frozen=True)
class StoreLimits:
    idempotency_window_ms: int
    reservation_retention_ms: int


class QuotaStore:
    def __init__(
        self, runner: ScriptRunner, keys: KeySpace, clock: Clock, limits: StoreLimits
    ) -> None:
        self.runner = runner
        self.keys = keys
        self.clock = clock
        self.limits = limits

    @property
    def redis(self) -> Any:
        return self.runner.redis

    async def close(self) -> None:
        await self.redis.aclose()

    def _base(self, account_id: str) -> dict[str, Any]:
        shard = self.keys.shard_of(account_id)
        return {
            "now": self.clock.now_ms(),
            "prefix": self.keys.prefix(shard),
            "shard": self.keys.tag(shard),
            "retention_ms": self.limits.reservation_retention_ms,
            "account_id": account_id,
        }

    async def create_account(
        self, account: dict[str, Any], timeout_s: float | None
    ) -> dict[str, Any]:
        request = self._base(account["account_id"]) | account
        return await self.runner.run(
            "create_account", self.keys.account_keys(account["account_id"]), request, timeout_s
        )

    async def update_account(
        self, account_id: str, changes: dict[str, Any], timeout_s: float | None
    ) -> dict[str, Any]:
        request = self._base(account_id) | {"set": changes}
        return await self.runner.run(
            "update_account", self.keys.account_keys(account_id), request, timeout_s
        )

    async def set_budget(
        self, account_id: str, budget: dict[str, Any], timeout_s: float | None
    ) -> dict[str, Any]:
        request = self._base(account_id) | budget
        return await self.runner.run(
            "set_budget", self.keys.account_keys(account_id), request, timeout_s
        )

    async def delete_budget(
        self, account_id: str, budget_id: str, timeout_s: float | None
    ) -> dict[str, Any]:
        request = self._base(account_id) | {"budget_id": budget_id}
        return await self.runner.run(
            "delete_budget", self.keys.account_keys(account_id), request, timeout_s
        )

    async def balance(self, account_id: str, timeout_s: float | None) -> dict[str, Any]:
        return await self.runner.run(
            "balance", self.keys.account_keys(account_id), self._base(account_id), timeout_s
        )

    async def purchase(
        self, account_id: str, request: dict[str, Any], timeout_s: float | None
    ) -> dict[str, Any]:
        keys = [
            *self.keys.account_keys(account_id),
            self.keys.idempotency(account_id, request["idempotency_key"]),
        ]
        full = self._base(account_id) | request
        full["idem_window_ms"] = self.limits.idempotency_window_ms
        return await self.runner.run("purchase", keys, full, timeout_s)

    def _spend_keys(self, account_id: str, idempotency_key: str) -> list[str]:
        shard = self.keys.shard_of(account_id)
        return [
            *self.keys.account_keys(account_id),
            self.keys.idempotency(account_id, idempotency_key),
            self.keys.prices(shard),
            self.keys.price_history(shard),
        ]

    async def reserve(self, request: dict[str, Any], timeout_s: float | None) -> dict[str, Any]:
        account_id = request["account_id"]
        full = self._base(account_id) | request
        full["idem_window_ms"] = self.limits.idempotency_window_ms
        keys = self._spend_keys(account_id, request["idempotency_key"])
        return await self.runner.run("reserve", keys, full, timeout_s)

    async def charge(self, request: dict[str, Any], timeout_s: float | None) -> dict[str, Any]:
        account_id = request["account_id"]
        full = self._base(account_id) | request
        full["idem_window_ms"] = self.limits.idempotency_window_ms
        keys = self._spend_keys(account_id, request["idempotency_key"])
        return await self.runner.run("charge", keys, full, timeout_s)

    async def commit(
        self, reservation_id: str, quantity: int | None, timeout_s: float | None
    ) -> dict[str, Any]:
        """quantity None: the whole reserved quantity."""
        ref = self.keys.parse_reservation_id(reservation_id)
        request = self._base(ref.account_id) | {"reservation_id": reservation_id}
        if quantity is not None:
            request["quantity"] = quantity
        keys = self.keys.account_keys(ref.account_id)
        return await self.runner.run("commit", keys, request, timeout_s)

    async def refund(self, request: dict[str, Any], timeout_s: float | None) -> dict[str, Any]:
        """request["units"] None: all that is still refundable."""
        ref = self.keys.parse_reservation_id(request["reservation_id"])
        full = self._base(ref.account_id) | {k: v for k, v in request.items() if v is not None}
        full["idem_window_ms"] = self.limits.idempotency_window_ms
        keys = [
            *self.keys.account_keys(ref.account_id),
            self.keys.idempotency(ref.account_id, request["idempotency_key"]),
        ]
        return await self.runner.run("refund", keys, full, timeout_s)

    async def extend(
        self, reservation_id: str, ttl_ms: int, timeout_s: float | None
    ) -> dict[str, Any]:
        ref = self.keys.parse_reservation_id(reservation_id)
        request = self._base(ref.account_id) | {
            "reservation_id": reservation_id,
            "ttl_ms": ttl_ms,
        }
        return await self.runner.run(
            "extend", self.keys.account_keys(ref.account_id), request, timeout_s
        )

    async def quote(
        self, account_id: str, operation: str, quantity: int, timeout_s: float | None
    ) -> dict[str, Any]:
        shard = self.keys.shard_of(account_id)
        keys = [
            *self.keys.account_keys(account_id),
            self.keys.prices(shard),
            self.keys.price_history(shard),
        ]
        request = self._base(account_id) | {"operation": operation, "quantity": quantity}
        return await self.runner.run("quote", keys, request, timeout_s)

    async def expire_hold(self, shard: int, reservation_id: str) -> dict[str, Any]:
        ref = self.keys.parse_reservation_id(reservation_id)
        request = self._base(ref.account_id) | {"reservation_id": reservation_id}
        return await self.runner.run(
            "expire_hold", self.keys.account_keys(ref.account_id), request, None
        )

    async def due_holds(self, shard: int, batch: int) -> list[str]:
        with store_errors():
            raw = await self.redis.zrangebyscore(
                self.keys.expiries(shard), "-inf", self.clock.now_ms(), start=0, num=batch
            )
        return [r.decode() for r in raw]

    # --- catalog -----------------------------------------------------------

    async def set_price(
        self, operation: str, units_per_quantity: int, timeout_s: float | None
    ) -> dict[str, Any]:
        """Sets the price on shard 0 (authoritative), then copies it to every shard."""
        keys = [
            self.keys.prices(0),
            self.keys.price_history(0),
            self.keys.catalog_meta(),
            self.keys.events(0),
        ]
        request = {
            "now": self.clock.now_ms(),
            "operation": operation,
            "price": units_per_quantity,
        }
        result = await self.runner.run("set_price", keys, request, timeout_s)
        await self._apply_everywhere(
            operation, units_per_quantity, int(result["version"]), int(result["at"]), timeout_s
        )
        return result

    async def _apply_everywhere(
        self, operation: str, price: int, version: int, at_ms: int, timeout_s: float | None
    ) -> None:
        request = {
            "now": self.clock.now_ms(),
            "operation": operation,
            "price": price,
            "version": version,
            "at": at_ms,
        }
        for shard in range(1, self.keys.shards):
            keys = [self.keys.prices(shard), self.keys.price_history(shard)]
            await self.runner.run("apply_price", keys, request, timeout_s)

    async def list_prices(self) -> tuple[list[dict[str, Any]], int]:
        with store_errors():
            raw = await self.redis.hgetall(self.keys.prices(0))
            version = await self.redis.hget(self.keys.catalog_meta(), "version")
        prices = []
        for operation, packed in sorted(raw.items()):
            record = msgpack.unpackb(packed, raw=False)
            prices.append({"operation": operation.decode(), **record})
        return prices, int(version or 0)

    async def sync_catalog(self, load_defaults: bool) -> None:
        """Loads the default catalog into an empty one, then repairs every shard's copy
        (a SetPrice interrupted between shards is finished here)."""
        prices, _ = await self.list_prices()
        if not prices and load_defaults:
            for operation, units in DEFAULT_CATALOG.items():
                await self.set_price(operation, units, None)
            return
        history = await self.redis.hgetall(self.keys.price_history(0))
        current = {p["operation"]: p for p in prices}
        for name, price in history.items():
            operation, _, version = name.decode().rpartition("@")
            at_ms = int(current[operation]["at"]) if operation in current else 0
            await self._apply_everywhere(operation, int(price), int(version), at_ms, None)

    # --- deployment checks -------------------------------------------------

    async def check_deployment(self) -> None:
        """Refuses a Redis that can evict keys, or one laid out with another shard count."""
        policy = await self.redis.config_get("maxmemory-policy")
        value = policy.get("maxmemory-policy") or policy.get(b"maxmemory-policy")
        value = value.decode() if isinstance(value, bytes) else value
        if value != "noeviction":
            raise RuntimeError(
                f"Redis maxmemory-policy is {value!r}: eviction would delete balances; "
                "set maxmemory-policy noeviction"
            )
        stored = await self.redis.hget(META_KEY, "shards")
        if stored is None:
            await self.redis.hsetnx(META_KEY, "shards", self.keys.shards)
        elif int(stored) != self.keys.shards:
            raise RuntimeError(
                f"this Redis holds data laid out in {int(stored)} shards; "
                f"--shards {self.keys.shards} would lose it"
            )

    # --- usage counters and billing periods ----------------------------------

    async def usage(
        self, account_id: str, period_start_ms: int, timeout_s: float | None
    ) -> list[Usage]:
        """The usage an account's counters of one billing period hold (read_usage.lua)."""
        request = ReadUsageRequest(now=self.clock.now_ms())
        keys = [self.keys.usage(account_id, period_start_ms)]
        reply = await self.runner.run("read_usage", keys, dict(request), timeout_s)
        return [usage_of(account_id, record) for record in reply["records"]]

    async def billing_period(
        self, year: int, month: int, anchor_day: int, timeout_s: float | None
    ) -> tuple[int, int]:
        """The [start, end) ms of the billing period that starts in that month on
        anchor_day (billing_period.lua: the calendar is Lua's alone)."""
        request = BillingPeriodRequest(
            now=self.clock.now_ms(), year=year, month=month, anchor_day=anchor_day
        )
        reply = await self.runner.run("billing_period", [], dict(request), timeout_s)
        return int(reply["period_start"]), int(reply["period_end"])
