"""The Lua scripts guard their own inputs: crafted msgpack requests that bypass the
Python validation (floats, negatives, zero, NaN, infinities, 2^53 and beyond, strings,
booleans, missing fields) are refused with INVALID_ARGUMENT naming the field, and the
script writes nothing (every key's DUMP and the stream length are unchanged)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import msgpack
import pytest
import pytest_asyncio

from tally import app
from tally.clock import ManualClock
from tally.domain.errors import InvalidArgument
from tally.store.contract import AlertSettings, ChargeRequest, CreateAccountRequest, ReserveRequest
from tally.store.fence import ShardFences
from tally.store.layout import DEFAULT_SHARDS, ShardLayout, TagScheme
from tally.store.quota_store import QuotaStore
from tests.support import T0_MS, RedisProcess, settings, unique

MAX_UNITS = 2**53 - 1
WINDOW_MS = 86_400_000

# Values no integer field may take, whatever its bounds.
NOT_INTEGERS: tuple[Any, ...] = (
    1.5, 0.5, -0.5, float("nan"), float("inf"), float("-inf"), "5", "", True, None, [1], {"n": 1},
)
# 2^64 - 1 is left out here: Redis' cmsgpack reads a uint64 as a signed int64, so it
# arrives as -1 (see test_uint64_does_not_wrap_into_the_minus_one_sentinel).
TOO_LARGE: tuple[Any, ...] = (2**53, 2**53 + 1, 2**53 + 2, 2**63, 2**64 - 2, 1e300)
NEGATIVE: tuple[Any, ...] = (-2, -(2**53), -(2**63))
# Where a field may be absent (commit's quantity, refund's units: absent means "all"),
# leaving it out is a valid request, so None is not a bad value there.
NOT_INTEGERS_WHEN_PRESENT: tuple[Any, ...] = tuple(v for v in NOT_INTEGERS if v is not None)


@pytest_asyncio.fixture(scope="module")
async def module_store(module_redis: RedisProcess) -> AsyncIterator[QuotaStore]:
    layout = ShardLayout(DEFAULT_SHARDS, TagScheme.SLOT_RANGE)
    store = app.build_store(
        settings(module_redis.url), module_redis.url, ManualClock(T0_MS), layout
    )
    await store.check_deployment()
    await store.runner.load()
    yield store
    await store.redis.aclose()


@pytest_asyncio.fixture
async def store(module_store: QuotaStore) -> QuotaStore:
    """The module's store on an emptied Redis with the default catalog (and fences
    reset, as in a server started on it: emptying Redis under a store fences it)."""
    await module_store.redis.flushdb()
    module_store.fences = ShardFences(module_store.keys.shards)
    await module_store.check_deployment()
    await module_store.sync_catalog(load_defaults=True)
    return module_store


@dataclass(frozen=True)
class World:
    account_id: str
    held_id: str
    charged_id: str


def shard_base(store: QuotaStore, shard: int) -> dict[str, Any]:
    return {
        "now": store.clock.now_ms(),
        "prefix": store.keys.prefix(shard),
        "shard": store.keys.tag(shard),
    }


def base(store: QuotaStore, account_id: str) -> dict[str, Any]:
    return shard_base(store, store.keys.shard_of(account_id)) | {
        "retention_ms": WINDOW_MS,
        "closed_window_ms": WINDOW_MS,
        "account_id": account_id,
    }


# The sequence of the reservation id a crafted spend request makes.
NEW_SEQ = 2**52


def spend_keys(store: QuotaStore, account_id: str, idem: str) -> list[str]:
    shard = store.keys.shard_of(account_id)
    new_id = store.reservation_ids.reservation_id(store.keys.tag(shard), NEW_SEQ, account_id)
    return [
        *store.keys.account_keys(account_id),
        store.keys.idempotency(account_id, idem),
        store.keys.prices(shard),
        store.keys.price_history(shard),
        store.keys.reservation(new_id),
    ]


def reservation_keys(store: QuotaStore, reservation_id: str) -> list[str]:
    """The keys of a script that names a reservation: its account's, then its own."""
    account_id = store.keys.parse_reservation_id(reservation_id).account_id
    return [*store.keys.account_keys(account_id), store.keys.reservation(reservation_id)]


async def make_world(store: QuotaStore) -> World:
    account_id = unique()
    await store.create_account(
        CreateAccountRequest(
            account_id=account_id, monthly_allotment=1000, overage_policy="DENY",
            overage_limit=0, labels={}, auto_purchase_units=0, auto_purchase_threshold=0,
            billing_anchor_day=0, alerts=AlertSettings(),
        ),
        None,
    )
    spend = {"account_id": account_id, "operation": "image.upscale", "quantity": 2,
             "labels": {}, "price_version": 0}
    held = await store.reserve(
        ReserveRequest(**spend, idempotency_key="held", ttl_ms=60_000), None
    )
    charged = await store.charge(ChargeRequest(**spend, idempotency_key="charged"), None)
    return World(account_id, held.reservation_id, charged.reservation_id)


Request = tuple[str, list[str], dict[str, Any]]


def valid_request(store: QuotaStore, w: World, script: str) -> Request:
    """A request the script accepts, shaped like quota_store.py builds it."""
    a = w.account_id
    acct_keys = store.keys.account_keys(a)
    shard = store.keys.shard_of(a)
    spend = {"operation": "image.upscale", "quantity": 1, "labels": {"m": "x"},
             "price_version": 0, "idempotency_window_ms": WINDOW_MS, "reservation_seq": NEW_SEQ}
    if script == "reserve":
        return script, spend_keys(store, a, "new"), base(store, a) | spend | {
            "idempotency_key": "new", "fingerprint": "fp-new", "ttl_ms": 30_000}
    if script == "charge":
        return script, spend_keys(store, a, "new"), base(store, a) | spend | {
            "idempotency_key": "new", "fingerprint": "fp-new"}
    if script == "commit":
        return script, reservation_keys(store, w.held_id), base(store, a) | {
            "reservation_id": w.held_id, "quantity": 1}
    if script == "refund":
        keys = [*reservation_keys(store, w.charged_id), store.keys.idempotency(a, "rf")]
        return script, keys, base(store, a) | {
            "reservation_id": w.charged_id, "units": 5, "reason": "", "idempotency_key": "rf",
            "fingerprint": "fp-rf", "idempotency_window_ms": WINDOW_MS}
    if script == "extend":
        return script, reservation_keys(store, w.held_id), base(store, a) | {
            "reservation_id": w.held_id, "ttl_ms": 90_000}
    if script == "quote":
        return script, [*acct_keys, store.keys.prices(shard), store.keys.price_history(shard)], (
            base(store, a) | {"operation": "image.upscale", "quantity": 3})
    if script == "purchase":
        return script, [*acct_keys, store.keys.idempotency(a, "pp")], base(store, a) | {
            "units": 50, "expires_at": 0, "reference": "inv-1", "idempotency_key": "pp",
            "fingerprint": "fp-pp", "idempotency_window_ms": WINDOW_MS}
    if script == "create_account":
        fresh = unique("fresh")
        return script, store.keys.account_keys(fresh), base(store, fresh) | {
            "monthly_allotment": 10, "overage_policy": "DENY", "overage_limit": 0,
            "auto_purchase_units": 0, "auto_purchase_threshold": 0, "billing_anchor_day": 0,
            "labels": {}}
    if script == "update_account":
        return script, acct_keys, base(store, a) | {"set": {"monthly_allotment": 20}}
    if script == "balance":
        return script, acct_keys, base(store, a)
    if script == "expire_hold":  # the held hold is due a second after its 60s TTL
        return script, reservation_keys(store, w.held_id), base(store, a) | {
            "reservation_id": w.held_id, "now": store.clock.now_ms() + 61_000}
    if script == "set_price":
        keys = [store.keys.prices(0), store.keys.price_history(0), store.keys.catalog_meta(),
                store.keys.events(0), store.keys.fence(0)]
        return script, keys, shard_base(store, 0) | {"operation": "image.new",
                                                    "units_per_quantity": 7}
    if script == "apply_price":
        keys = [store.keys.prices(1), store.keys.price_history(1), store.keys.fence(1)]
        return script, keys, shard_base(store, 1) | {
            "operation": "image.new", "units_per_quantity": 7, "version": 99,
            "effective_at_ms": store.clock.now_ms(), "superseded_at_ms": 0}
    raise AssertionError(script)


async def database(store: QuotaStore) -> dict[bytes, Any]:
    """Every key's DUMP, and every stream's length."""
    keys = sorted([k async for k in store.redis.scan_iter(count=1000)])
    state: dict[bytes, Any] = {}
    for key in keys:
        state[key] = await store.redis.dump(key)
        if await store.redis.type(key) == b"stream":
            state[key + b"#xlen"] = await store.redis.xlen(key)
    return state


def corrupt(request: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    crafted = dict(request)
    if path.startswith("set."):
        crafted["set"] = dict(crafted["set"]) | {path[4:]: value}
    elif value is None:
        crafted.pop(path, None)
    else:
        crafted[path] = value
    return crafted


def values(*groups: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(v for group in groups for v in group)


@dataclass(frozen=True)
class Guard:
    script: str
    path: str  # the request field corrupted ("set.x" inside update_account's set)
    reported: str  # the field the script must name
    values: tuple[Any, ...]


GUARDS: list[Guard] = [
    Guard("reserve", "quantity", "quantity", values(NOT_INTEGERS, TOO_LARGE, NEGATIVE, (0, -1))),
    Guard("reserve", "ttl_ms", "ttl", values(NOT_INTEGERS, (0, -1000, 1e300))),
    Guard("reserve", "price_version", "price_version", values(NOT_INTEGERS, TOO_LARGE, (-1,))),
    Guard("reserve", "idempotency_window_ms", "idempotency_window_ms",
          values(NOT_INTEGERS, (0, -1))),
    Guard("reserve", "now", "now", values(NOT_INTEGERS, (-1, 2**53))),
    Guard("charge", "quantity", "quantity", values(NOT_INTEGERS, TOO_LARGE, NEGATIVE, (0, -1))),
    Guard("charge", "price_version", "price_version", (1.5, -1, 2**53, "1")),
    Guard("commit", "quantity", "quantity",
          values(NOT_INTEGERS_WHEN_PRESENT, TOO_LARGE, NEGATIVE, (-1,))),
    Guard("refund", "units", "units",
          values(NOT_INTEGERS_WHEN_PRESENT, TOO_LARGE, NEGATIVE, (0, -1))),
    Guard("extend", "ttl_ms", "ttl", values(NOT_INTEGERS, (0, -1, 2**53))),
    Guard("quote", "quantity", "quantity", values(NOT_INTEGERS, TOO_LARGE, (0, -1))),
    Guard("purchase", "units", "units", values(NOT_INTEGERS, TOO_LARGE, (0, -1))),
    Guard("purchase", "expires_at", "expires_at", values(NOT_INTEGERS, (-1, 2**53))),
    Guard("create_account", "monthly_allotment", "monthly_allotment",
          values(NOT_INTEGERS, TOO_LARGE, (-1,))),
    Guard("create_account", "overage_limit", "overage_limit", (1.5, -1, 2**53, "0")),
    Guard("create_account", "billing_anchor_day", "billing_anchor_day", (1.5, -1, 32, "1")),
    Guard("update_account", "set.monthly_allotment", "monthly_allotment",
          (1.5, float("nan"), float("inf"), "5", True, -1, 2**53, 2**63)),
    Guard("update_account", "set.overage_limit", "overage_limit", (0.25, -1, 2**53)),
    Guard("balance", "now", "now", (1.5, -1, "now", float("nan"))),
    Guard("expire_hold", "now", "now", (1.5, -1, "now")),
    Guard("set_price", "units_per_quantity", "units_per_quantity",
          values(NOT_INTEGERS, TOO_LARGE, (0, -1))),
    Guard("apply_price", "units_per_quantity", "units_per_quantity", (1.5, 0, -1, 2**53, "7")),
    Guard("apply_price", "version", "version", (1.5, 0, -1, 2**53, "7")),
    Guard("apply_price", "superseded_at_ms", "superseded_at_ms", (1.5, -1, 2**53, "7", None)),
]


def _ids(guard: Guard) -> str:
    return f"{guard.script}-{guard.path}"


async def test_valid_crafted_requests_are_accepted(store: QuotaStore) -> None:
    """Proves the crafted request of every script is accepted as built, so each refusal
    below is caused by the one field a guard test corrupts."""
    world = await make_world(store)
    for script in ("quote", "balance", "extend", "reserve", "charge", "refund", "purchase",
                   "update_account", "create_account", "expire_hold", "set_price",
                   "apply_price", "commit"):
        name, keys, request = valid_request(store, world, script)
        await store.runner.run(name, keys, request, None)


@pytest.mark.parametrize("guard", GUARDS, ids=_ids)
async def test_script_refuses_non_integer_or_out_of_range(store: QuotaStore, guard: Guard) -> None:
    """Proves the script itself refuses each bad value of the field with INVALID_ARGUMENT
    naming it, and writes nothing (every key's DUMP and stream length unchanged)."""
    world = await make_world(store)
    name, keys, request = valid_request(store, world, guard.script)
    before = await database(store)
    for value in guard.values:
        crafted = corrupt(request, guard.path, value)
        with pytest.raises(InvalidArgument) as refused:
            await store.runner.run(name, keys, crafted, None)
        assert refused.value.field_name == guard.reported, (value, refused.value.message)
        assert guard.reported in refused.value.message, (value, refused.value.message)
        assert await database(store) == before, f"{name}.lua wrote something for {value!r}"


async def test_largest_safe_integer_is_accepted(store: QuotaStore) -> None:
    """Proves 2^53 - 1 itself passes the integer guard (the bound is inclusive): a price
    of 2^53 - 1 is set exactly, and a quantity of 2^53 - 1 fails only on price x quantity."""
    world = await make_world(store)
    name, keys, request = valid_request(store, world, "set_price")
    answer = await store.runner.run(
        name, keys, request | {"units_per_quantity": MAX_UNITS}, None
    )
    assert answer["units_per_quantity"] == MAX_UNITS
    name, keys, request = valid_request(store, world, "quote")
    with pytest.raises(InvalidArgument) as refused:
        await store.runner.run(name, keys, request | {"quantity": MAX_UNITS}, None)
    assert "price" in refused.value.message


@pytest.mark.parametrize(("script", "field"), [("commit", "quantity"), ("refund", "units")])
async def test_uint64_does_not_wrap_into_the_minus_one_sentinel(
    store: QuotaStore, script: str, field: str
) -> None:
    """Proves 2^64 - 1 (msgpack uint64) is refused by commit and refund rather than read
    as -1, their "the whole quantity" / "everything refundable" sentinel."""
    world = await make_world(store)
    name, keys, request = valid_request(store, world, script)
    before = await database(store)
    with pytest.raises(InvalidArgument) as refused:
        await store.runner.run(name, keys, corrupt(request, field, 2**64 - 1), None)
    assert refused.value.field_name == field
    assert await database(store) == before


@pytest.mark.parametrize("script", ["reserve", "charge", "refund", "purchase"])
async def test_script_refuses_a_missing_fingerprint(store: QuotaStore, script: str) -> None:
    """Proves an idempotent script refuses a request without a non-empty string fingerprint
    (codec validates every argument) rather than storing a record other requests match."""
    world = await make_world(store)
    name, keys, request = valid_request(store, world, script)
    before = await database(store)
    for fingerprint in (None, 7, ""):
        with pytest.raises(InvalidArgument) as refused:
            await store.runner.run(name, keys, corrupt(request, "fingerprint", fingerprint), None)
        assert refused.value.field_name == "fingerprint", fingerprint
        assert await database(store) == before, fingerprint


async def test_expire_hold_of_a_hold_not_due_is_a_no_op(store: QuotaStore) -> None:
    """Proves expire_hold.lua is the no-op the reaper relies on (several reapers, an Extend
    in between) for a HELD hold that is not due yet: it expires nothing and writes nothing."""
    world = await make_world(store)
    keys = reservation_keys(store, world.held_id)
    request = base(store, world.account_id) | {"reservation_id": world.held_id}
    before = await database(store)
    reply = await store.runner.run("expire_hold", keys, request, None)
    assert reply == {"expired": 0}
    assert await database(store) == before


CRAFTED: list[tuple[str, Callable[[dict[str, Any]], dict[str, Any]], str]] = [
    ("reserve", lambda r: r | {"labels": "model=x"}, "labels"),
    ("reserve", lambda r: r | {"labels": {"k": 5}}, "labels"),
    ("reserve", lambda r: r | {"account_id": 12}, "account_id"),
    ("reserve", lambda r: r | {"operation": "o" * 129}, "operation"),
    ("reserve", lambda r: r | {"idempotency_key": ""}, "idempotency_key"),
    ("commit", lambda r: r | {"reservation_id": ["x"]}, "reservation_id"),
    ("update_account", lambda r: r | {"set": "allotment=5"}, "request"),
    ("create_account", lambda r: r | {"overage_policy": "FREE"}, "overage_policy"),
]


@pytest.mark.parametrize(("script", "change", "reported"), CRAFTED,
                         ids=[f"{c[0]}-{c[2]}" for c in CRAFTED])
async def test_script_refuses_malformed_fields(
    store: QuotaStore, script: str, change: Callable[[dict[str, Any]], dict[str, Any]],
    reported: str,
) -> None:
    """Proves strings, maps and enums are type- and bound-checked in Lua as well, before
    anything is written."""
    world = await make_world(store)
    name, keys, request = valid_request(store, world, script)
    before = await database(store)
    with pytest.raises(InvalidArgument) as refused:
        await store.runner.run(name, keys, change(request), None)
    assert refused.value.field_name == reported
    assert await database(store) == before


async def test_garbage_payload_is_refused(store: QuotaStore) -> None:
    """Proves a payload that is not a msgpack map is INVALID_ARGUMENT and writes nothing."""
    world = await make_world(store)
    _, keys, _ = valid_request(store, world, "reserve")
    before = await database(store)
    script = store.runner.scripts["reserve"]
    for payload in (b"", b"\xc1", b"\x93\x01\x02\x03", b"plain text"):
        raw = await store.redis.fcall(script.function, len(keys), *keys, payload)
        reply = msgpack.unpackb(raw, raw=False)
        assert reply["ok"] is False
        assert reply["code"] == "INVALID_ARGUMENT"
        assert reply["field"] in ("request", "now")  # an array decodes to a table without now
    assert await database(store) == before
