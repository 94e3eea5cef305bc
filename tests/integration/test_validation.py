"""Bad input on every RPC: the right status code, a message naming the field,
and nothing changed in Redis; plus NOT_FOUND, RESOURCE_EXHAUSTED details and
idempotency (replays, conflicts, concurrent duplicates)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
import pytest_asyncio
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from tally_client.v1 import account_pb2, catalog_pb2, common_pb2, quota_pb2
from tests.guard_support import (
    MAX_UNITS,
    aio,
    assert_books,
    assert_status,
    balance,
    create_account,
    events_added,
    rpc_error,
    snapshot,
)
from tests.support import T0_MS, RedisProcess, Running, start_running, stop_running, unique

INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
FAILED = grpc.StatusCode.FAILED_PRECONDITION
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
NOW_S = T0_MS // 1000


@pytest_asyncio.fixture(scope="module")
async def live(
    module_redis: RedisProcess, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Running]:
    """One authority for the module (its clock never moves here)."""
    data_dir = tmp_path_factory.mktemp("data-validation")
    running = await start_running(module_redis.url, data_dir=str(data_dir))
    yield running
    await stop_running(running)


@dataclass(frozen=True)
class World:
    """A fresh account with 1000 units, a HELD reservation and a committed charge."""

    account_id: str
    held_id: str  # 2 x image.upscale = 20 units held
    charged_id: str  # 1 x image.vectorize = 5 units charged
    ghost_tag: str  # the shard tag of an account that does not exist
    new_account_id: str  # an id nobody created (for CreateAccount cases)


async def make_world(live: Running) -> World:
    account_id = unique()
    await create_account(live, account_id)
    held = await aio(live).quota.Reserve(
        quota_pb2.ReserveRequest(
            account_id=account_id, operation="image.upscale", quantity=2, idempotency_key="held"
        )
    )
    charged = await aio(live).quota.Charge(
        quota_pb2.ChargeRequest(
            account_id=account_id, operation="image.vectorize", idempotency_key="charged"
        )
    )
    keys = live.authority.store.keys
    return World(
        account_id=account_id,
        held_id=held.reservation_id,
        charged_id=charged.reservation_id,
        ghost_tag=keys.tag(keys.shard_of("ghost-account")),
        new_account_id=unique("new"),
    )


def _tag_of(live: Running, account_id: str) -> str:
    keys = live.authority.store.keys
    return keys.tag(keys.shard_of(account_id))


# --- request builders ---------------------------------------------------------


def reserve(w: World, **kw: Any) -> quota_pb2.ReserveRequest:
    fields: dict[str, Any] = {"account_id": w.account_id, "operation": "image.upscale",
                              "quantity": 1, "idempotency_key": "fresh-key"}
    fields.update(kw)
    return quota_pb2.ReserveRequest(**fields)


def charge(w: World, **kw: Any) -> quota_pb2.ChargeRequest:
    fields: dict[str, Any] = {"account_id": w.account_id, "operation": "image.upscale",
                              "quantity": 1, "idempotency_key": "fresh-key"}
    fields.update(kw)
    return quota_pb2.ChargeRequest(**fields)


def commit(w: World, **kw: Any) -> quota_pb2.CommitRequest:
    fields: dict[str, Any] = {"reservation_id": w.held_id}
    fields.update(kw)
    return quota_pb2.CommitRequest(**fields)


def refund(w: World, **kw: Any) -> quota_pb2.RefundRequest:
    fields: dict[str, Any] = {"reservation_id": w.charged_id, "idempotency_key": "fresh-key"}
    fields.update(kw)
    return quota_pb2.RefundRequest(**fields)


def extend(w: World, **kw: Any) -> quota_pb2.ExtendRequest:
    fields: dict[str, Any] = {"reservation_id": w.held_id, "ttl": Duration(seconds=60)}
    fields.update(kw)
    return quota_pb2.ExtendRequest(**fields)


def quote(w: World, **kw: Any) -> quota_pb2.QuoteRequest:
    fields: dict[str, Any] = {"account_id": w.account_id, "operation": "image.upscale"}
    fields.update(kw)
    return quota_pb2.QuoteRequest(**fields)


def create(w: World, **kw: Any) -> account_pb2.CreateAccountRequest:
    fields: dict[str, Any] = {"account_id": w.new_account_id, "monthly_allotment": 100}
    fields.update(kw)
    return account_pb2.CreateAccountRequest(**fields)


def update(w: World, **kw: Any) -> account_pb2.UpdateAccountRequest:
    fields: dict[str, Any] = {"account_id": w.account_id}
    fields.update(kw)
    return account_pb2.UpdateAccountRequest(**fields)


def purchase(w: World, **kw: Any) -> account_pb2.PurchaseUnitsRequest:
    fields: dict[str, Any] = {"account_id": w.account_id, "units": 100,
                              "idempotency_key": "fresh-key"}
    fields.update(kw)
    return account_pb2.PurchaseUnitsRequest(**fields)


def ms(milliseconds: int) -> Duration:
    d = Duration()
    d.FromMilliseconds(milliseconds)
    return d


LONG_ID = "a" * 129
MANY_LABELS = {f"k{i}": "v" for i in range(33)}


@dataclass(frozen=True)
class Case:
    name: str
    rpc: str  # "<service>.<Method>": quota, accounts or catalog
    build: Callable[[World], Any]
    code: grpc.StatusCode
    field: str | None


CASES: list[Case] = [
    # QuotaService.Reserve
    Case("reserve-empty-account", "quota.Reserve", lambda w: reserve(w, account_id=""),
         INVALID, "account_id"),
    Case("reserve-account-space", "quota.Reserve", lambda w: reserve(w, account_id="bad id"),
         INVALID, "account_id"),
    Case("reserve-account-colon", "quota.Reserve", lambda w: reserve(w, account_id="a:b"),
         INVALID, "account_id"),
    Case("reserve-account-leading-dash", "quota.Reserve",
         lambda w: reserve(w, account_id="-abc"), INVALID, "account_id"),
    Case("reserve-account-unicode", "quota.Reserve",
         lambda w: reserve(w, account_id="k\u00e9nt"), INVALID, "account_id"),
    Case("reserve-account-too-long", "quota.Reserve",
         lambda w: reserve(w, account_id=LONG_ID), INVALID, "account_id"),
    Case("reserve-empty-operation", "quota.Reserve", lambda w: reserve(w, operation=""),
         INVALID, "operation"),
    Case("reserve-operation-uppercase", "quota.Reserve",
         lambda w: reserve(w, operation="Image.Upscale"), INVALID, "operation"),
    Case("reserve-operation-slash", "quota.Reserve",
         lambda w: reserve(w, operation="image/upscale"), INVALID, "operation"),
    Case("reserve-operation-too-long", "quota.Reserve",
         lambda w: reserve(w, operation="o" * 129), INVALID, "operation"),
    Case("reserve-negative-quantity", "quota.Reserve", lambda w: reserve(w, quantity=-1),
         INVALID, "quantity"),
    Case("reserve-quantity-2^53", "quota.Reserve", lambda w: reserve(w, quantity=2**53),
         INVALID, "quantity"),
    Case("reserve-quantity-int64-max", "quota.Reserve",
         lambda w: reserve(w, quantity=2**63 - 1), INVALID, "quantity"),
    Case("reserve-quantity-times-price-over-2^53", "quota.Reserve",
         lambda w: reserve(w, quantity=MAX_UNITS), INVALID, "quantity"),
    Case("reserve-empty-idempotency-key", "quota.Reserve",
         lambda w: reserve(w, idempotency_key=""), INVALID, "idempotency_key"),
    Case("reserve-idempotency-key-space", "quota.Reserve",
         lambda w: reserve(w, idempotency_key="a key"), INVALID, "idempotency_key"),
    Case("reserve-idempotency-key-non-ascii", "quota.Reserve",
         lambda w: reserve(w, idempotency_key="cl\u00e9"), INVALID, "idempotency_key"),
    Case("reserve-idempotency-key-too-long", "quota.Reserve",
         lambda w: reserve(w, idempotency_key="k" * 129), INVALID, "idempotency_key"),
    Case("reserve-too-many-labels", "quota.Reserve", lambda w: reserve(w, labels=MANY_LABELS),
         INVALID, "labels"),
    Case("reserve-label-key-digit", "quota.Reserve", lambda w: reserve(w, labels={"1x": "v"}),
         INVALID, "labels"),
    Case("reserve-label-key-empty", "quota.Reserve", lambda w: reserve(w, labels={"": "v"}),
         INVALID, "labels"),
    Case("reserve-label-key-space", "quota.Reserve", lambda w: reserve(w, labels={"a b": "v"}),
         INVALID, "labels"),
    Case("reserve-label-key-too-long", "quota.Reserve",
         lambda w: reserve(w, labels={"k" * 64: "v"}), INVALID, "labels"),
    Case("reserve-label-value-too-long", "quota.Reserve",
         lambda w: reserve(w, labels={"model": "v" * 257}), INVALID, "labels"),
    Case("reserve-ttl-999ms", "quota.Reserve", lambda w: reserve(w, ttl=ms(999)),
         INVALID, "ttl"),
    Case("reserve-ttl-zero", "quota.Reserve", lambda w: reserve(w, ttl=Duration()),
         INVALID, "ttl"),
    Case("reserve-ttl-over-max", "quota.Reserve", lambda w: reserve(w, ttl=ms(3_600_001)),
         INVALID, "ttl"),
    Case("reserve-ttl-negative", "quota.Reserve", lambda w: reserve(w, ttl=Duration(seconds=-5)),
         INVALID, "ttl"),
    Case("reserve-ttl-sub-millisecond", "quota.Reserve",
         lambda w: reserve(w, ttl=Duration(seconds=2, nanos=500)), INVALID, "ttl"),
    Case("reserve-negative-price-version", "quota.Reserve",
         lambda w: reserve(w, price_version=-1), INVALID, "price_version"),
    Case("reserve-unknown-price-version", "quota.Reserve",
         lambda w: reserve(w, price_version=999_999), FAILED, "price_version"),
    Case("reserve-unknown-account", "quota.Reserve",
         lambda w: reserve(w, account_id="ghost-account"), NOT_FOUND, "account_id"),
    Case("reserve-unknown-operation", "quota.Reserve",
         lambda w: reserve(w, operation="image.unknown"), NOT_FOUND, "operation"),
    # QuotaService.Charge
    Case("charge-empty-account", "quota.Charge", lambda w: charge(w, account_id=""),
         INVALID, "account_id"),
    Case("charge-account-bad-charset", "quota.Charge", lambda w: charge(w, account_id="a/b"),
         INVALID, "account_id"),
    Case("charge-account-too-long", "quota.Charge", lambda w: charge(w, account_id=LONG_ID),
         INVALID, "account_id"),
    Case("charge-empty-operation", "quota.Charge", lambda w: charge(w, operation=""),
         INVALID, "operation"),
    Case("charge-operation-bad-charset", "quota.Charge",
         lambda w: charge(w, operation="image upscale"), INVALID, "operation"),
    Case("charge-negative-quantity", "quota.Charge", lambda w: charge(w, quantity=-3),
         INVALID, "quantity"),
    Case("charge-quantity-2^53", "quota.Charge", lambda w: charge(w, quantity=2**53),
         INVALID, "quantity"),
    Case("charge-empty-idempotency-key", "quota.Charge",
         lambda w: charge(w, idempotency_key=""), INVALID, "idempotency_key"),
    Case("charge-too-many-labels", "quota.Charge", lambda w: charge(w, labels=MANY_LABELS),
         INVALID, "labels"),
    Case("charge-bad-label-key", "quota.Charge", lambda w: charge(w, labels={"x:y": "v"}),
         INVALID, "labels"),
    Case("charge-negative-price-version", "quota.Charge",
         lambda w: charge(w, price_version=-7), INVALID, "price_version"),
    Case("charge-unknown-account", "quota.Charge",
         lambda w: charge(w, account_id="ghost-account"), NOT_FOUND, "account_id"),
    Case("charge-unknown-operation", "quota.Charge",
         lambda w: charge(w, operation="image.unknown"), NOT_FOUND, "operation"),
    # QuotaService.Commit
    Case("commit-empty-reservation", "quota.Commit", lambda w: commit(w, reservation_id=""),
         INVALID, "reservation_id"),
    Case("commit-garbage-reservation", "quota.Commit",
         lambda w: commit(w, reservation_id="garbage"), INVALID, "reservation_id"),
    Case("commit-non-numeric-sequence", "quota.Commit",
         lambda w: commit(w, reservation_id=w.held_id.replace(".", ".x", 1)),
         INVALID, "reservation_id"),
    Case("commit-wrong-shard-tag", "quota.Commit",
         lambda w: commit(w, reservation_id="s9999." + w.held_id.split(".", 1)[1]),
         INVALID, "reservation_id"),
    Case("commit-reservation-too-long", "quota.Commit",
         lambda w: commit(w, reservation_id="r" * 301), INVALID, "reservation_id"),
    Case("commit-negative-quantity", "quota.Commit", lambda w: commit(w, quantity=-1),
         INVALID, "quantity"),
    Case("commit-quantity-2^53", "quota.Commit", lambda w: commit(w, quantity=2**53),
         INVALID, "quantity"),
    Case("commit-more-than-reserved", "quota.Commit", lambda w: commit(w, quantity=3),
         INVALID, "quantity"),
    Case("commit-unknown-reservation", "quota.Commit",
         lambda w: commit(w, reservation_id=w.held_id.split(".")[0] + ".999999."
                          + w.account_id),
         NOT_FOUND, "reservation_id"),
    Case("commit-reservation-of-unknown-account", "quota.Commit",
         lambda w: commit(w, reservation_id=f"{w.ghost_tag}.1.ghost-account"), NOT_FOUND, None),
    # QuotaService.Refund
    Case("refund-empty-reservation", "quota.Refund", lambda w: refund(w, reservation_id=""),
         INVALID, "reservation_id"),
    Case("refund-garbage-reservation", "quota.Refund",
         lambda w: refund(w, reservation_id="no-dots-here"), INVALID, "reservation_id"),
    Case("refund-zero-units", "quota.Refund", lambda w: refund(w, units=0), INVALID, "units"),
    Case("refund-negative-units", "quota.Refund", lambda w: refund(w, units=-1),
         INVALID, "units"),
    Case("refund-units-2^53", "quota.Refund", lambda w: refund(w, units=2**53),
         INVALID, "units"),
    Case("refund-empty-idempotency-key", "quota.Refund",
         lambda w: refund(w, idempotency_key=""), INVALID, "idempotency_key"),
    Case("refund-idempotency-key-too-long", "quota.Refund",
         lambda w: refund(w, idempotency_key="k" * 129), INVALID, "idempotency_key"),
    Case("refund-reason-too-long", "quota.Refund", lambda w: refund(w, reason="r" * 513),
         INVALID, "reason"),
    Case("refund-unknown-reservation", "quota.Refund",
         lambda w: refund(w, reservation_id=w.held_id.split(".")[0] + ".999999."
                          + w.account_id),
         NOT_FOUND, "reservation_id"),
    Case("refund-more-than-charged", "quota.Refund", lambda w: refund(w, units=6),
         FAILED, "units"),
    # QuotaService.Extend
    Case("extend-empty-reservation", "quota.Extend", lambda w: extend(w, reservation_id=""),
         INVALID, "reservation_id"),
    Case("extend-garbage-reservation", "quota.Extend",
         lambda w: extend(w, reservation_id="a.b"), INVALID, "reservation_id"),
    Case("extend-missing-ttl", "quota.Extend",
         lambda w: quota_pb2.ExtendRequest(reservation_id=w.held_id), INVALID, "ttl"),
    Case("extend-ttl-999ms", "quota.Extend", lambda w: extend(w, ttl=ms(999)), INVALID, "ttl"),
    Case("extend-ttl-over-max", "quota.Extend", lambda w: extend(w, ttl=ms(3_600_001)),
         INVALID, "ttl"),
    Case("extend-ttl-negative", "quota.Extend", lambda w: extend(w, ttl=Duration(seconds=-1)),
         INVALID, "ttl"),
    Case("extend-unknown-reservation", "quota.Extend",
         lambda w: extend(w, reservation_id=w.held_id.split(".")[0] + ".999999."
                          + w.account_id),
         NOT_FOUND, "reservation_id"),
    Case("extend-committed-reservation", "quota.Extend",
         lambda w: extend(w, reservation_id=w.charged_id), FAILED, "reservation_id"),
    # QuotaService.Quote
    Case("quote-empty-account", "quota.Quote", lambda w: quote(w, account_id=""),
         INVALID, "account_id"),
    Case("quote-account-bad-charset", "quota.Quote", lambda w: quote(w, account_id="a b"),
         INVALID, "account_id"),
    Case("quote-account-too-long", "quota.Quote", lambda w: quote(w, account_id=LONG_ID),
         INVALID, "account_id"),
    Case("quote-empty-operation", "quota.Quote", lambda w: quote(w, operation=""),
         INVALID, "operation"),
    Case("quote-operation-too-long", "quota.Quote", lambda w: quote(w, operation="o" * 129),
         INVALID, "operation"),
    Case("quote-negative-quantity", "quota.Quote", lambda w: quote(w, quantity=-1),
         INVALID, "quantity"),
    Case("quote-quantity-2^53", "quota.Quote", lambda w: quote(w, quantity=2**53),
         INVALID, "quantity"),
    Case("quote-unknown-account", "quota.Quote",
         lambda w: quote(w, account_id="ghost-account"), NOT_FOUND, "account_id"),
    Case("quote-unknown-operation", "quota.Quote",
         lambda w: quote(w, operation="image.unknown"), NOT_FOUND, "operation"),
    # QuotaService.GetBalance
    Case("balance-empty-account", "quota.GetBalance",
         lambda w: quota_pb2.GetBalanceRequest(), INVALID, "account_id"),
    Case("balance-account-bad-charset", "quota.GetBalance",
         lambda w: quota_pb2.GetBalanceRequest(account_id="a*b"), INVALID, "account_id"),
    Case("balance-account-too-long", "quota.GetBalance",
         lambda w: quota_pb2.GetBalanceRequest(account_id=LONG_ID), INVALID, "account_id"),
    Case("balance-unknown-account", "quota.GetBalance",
         lambda w: quota_pb2.GetBalanceRequest(account_id="ghost-account"),
         NOT_FOUND, "account_id"),
    # AccountService.CreateAccount
    Case("create-empty-account", "accounts.CreateAccount", lambda w: create(w, account_id=""),
         INVALID, "account_id"),
    Case("create-account-colon", "accounts.CreateAccount",
         lambda w: create(w, account_id="team:1"), INVALID, "account_id"),
    Case("create-account-too-long", "accounts.CreateAccount",
         lambda w: create(w, account_id=LONG_ID), INVALID, "account_id"),
    Case("create-negative-allotment", "accounts.CreateAccount",
         lambda w: create(w, monthly_allotment=-1), INVALID, "monthly_allotment"),
    Case("create-allotment-2^53", "accounts.CreateAccount",
         lambda w: create(w, monthly_allotment=2**53), INVALID, "monthly_allotment"),
    Case("create-unknown-policy", "accounts.CreateAccount",
         lambda w: create(w, overage_policy=99), INVALID, "overage_policy"),
    Case("create-negative-overage-limit", "accounts.CreateAccount",
         lambda w: create(w, overage_limit=-1), INVALID, "overage_limit"),
    Case("create-negative-ap-units", "accounts.CreateAccount",
         lambda w: create(w, auto_purchase_units=-1), INVALID, "auto_purchase_units"),
    Case("create-ap-threshold-2^53", "accounts.CreateAccount",
         lambda w: create(w, auto_purchase_threshold=2**53), INVALID,
         "auto_purchase_threshold"),
    Case("create-auto-purchase-without-pack", "accounts.CreateAccount",
         lambda w: create(w, overage_policy=common_pb2.OVERAGE_POLICY_AUTO_PURCHASE,
                          overage_limit=100),
         INVALID, "auto_purchase_units"),
    Case("create-too-many-labels", "accounts.CreateAccount",
         lambda w: create(w, labels=MANY_LABELS), INVALID, "labels"),
    Case("create-bad-label-key", "accounts.CreateAccount",
         lambda w: create(w, labels={"-x": "v"}), INVALID, "labels"),
    Case("create-anchor-day-32", "accounts.CreateAccount",
         lambda w: create(w, billing_anchor_day=32), INVALID, "billing_anchor_day"),
    Case("create-anchor-day-negative", "accounts.CreateAccount",
         lambda w: create(w, billing_anchor_day=-1), INVALID, "billing_anchor_day"),
    # AccountService.GetAccount
    Case("get-empty-account", "accounts.GetAccount",
         lambda w: account_pb2.GetAccountRequest(), INVALID, "account_id"),
    Case("get-account-bad-charset", "accounts.GetAccount",
         lambda w: account_pb2.GetAccountRequest(account_id="a\nb"), INVALID, "account_id"),
    Case("get-unknown-account", "accounts.GetAccount",
         lambda w: account_pb2.GetAccountRequest(account_id="ghost-account"),
         NOT_FOUND, "account_id"),
    # AccountService.UpdateAccount
    Case("update-empty-account", "accounts.UpdateAccount", lambda w: update(w, account_id=""),
         INVALID, "account_id"),
    Case("update-account-too-long", "accounts.UpdateAccount",
         lambda w: update(w, account_id=LONG_ID), INVALID, "account_id"),
    Case("update-negative-allotment", "accounts.UpdateAccount",
         lambda w: update(w, monthly_allotment=-5), INVALID, "monthly_allotment"),
    Case("update-allotment-2^53", "accounts.UpdateAccount",
         lambda w: update(w, monthly_allotment=2**53), INVALID, "monthly_allotment"),
    Case("update-unknown-policy", "accounts.UpdateAccount",
         lambda w: update(w, overage_policy=42), INVALID, "overage_policy"),
    Case("update-negative-overage-limit", "accounts.UpdateAccount",
         lambda w: update(w, overage_limit=-1), INVALID, "overage_limit"),
    Case("update-negative-ap-units", "accounts.UpdateAccount",
         lambda w: update(w, auto_purchase_units=-1), INVALID, "auto_purchase_units"),
    Case("update-negative-ap-threshold", "accounts.UpdateAccount",
         lambda w: update(w, auto_purchase_threshold=-1), INVALID, "auto_purchase_threshold"),
    Case("update-auto-purchase-without-pack", "accounts.UpdateAccount",
         lambda w: update(w, overage_policy=common_pb2.OVERAGE_POLICY_AUTO_PURCHASE), INVALID,
         "auto_purchase_units"),
    Case("update-bad-label-key", "accounts.UpdateAccount",
         lambda w: update(w, labels={"9lives": "v"}, replace_labels=True), INVALID, "labels"),
    Case("update-too-many-labels", "accounts.UpdateAccount",
         lambda w: update(w, labels=MANY_LABELS), INVALID, "labels"),
    Case("update-unknown-account", "accounts.UpdateAccount",
         lambda w: update(w, account_id="ghost-account", overage_limit=5), NOT_FOUND,
         "account_id"),
    # AccountService.PurchaseUnits
    Case("purchase-empty-account", "accounts.PurchaseUnits",
         lambda w: purchase(w, account_id=""), INVALID, "account_id"),
    Case("purchase-account-bad-charset", "accounts.PurchaseUnits",
         lambda w: purchase(w, account_id="a;b"), INVALID, "account_id"),
    Case("purchase-zero-units", "accounts.PurchaseUnits", lambda w: purchase(w, units=0),
         INVALID, "units"),
    Case("purchase-negative-units", "accounts.PurchaseUnits", lambda w: purchase(w, units=-100),
         INVALID, "units"),
    Case("purchase-units-2^53", "accounts.PurchaseUnits", lambda w: purchase(w, units=2**53),
         INVALID, "units"),
    Case("purchase-units-would-overflow-account", "accounts.PurchaseUnits",
         lambda w: purchase(w, units=MAX_UNITS), INVALID, "units"),
    Case("purchase-empty-idempotency-key", "accounts.PurchaseUnits",
         lambda w: purchase(w, idempotency_key=""), INVALID, "idempotency_key"),
    Case("purchase-idempotency-key-tab", "accounts.PurchaseUnits",
         lambda w: purchase(w, idempotency_key="a\tb"), INVALID, "idempotency_key"),
    Case("purchase-expires-in-the-past", "accounts.PurchaseUnits",
         lambda w: purchase(w, expires_at=Timestamp(seconds=NOW_S - 1)), INVALID, "expires_at"),
    Case("purchase-expires-now", "accounts.PurchaseUnits",
         lambda w: purchase(w, expires_at=Timestamp(seconds=NOW_S)), INVALID, "expires_at"),
    Case("purchase-expires-before-1970", "accounts.PurchaseUnits",
         lambda w: purchase(w, expires_at=Timestamp(seconds=-1)), INVALID, "expires_at"),
    Case("purchase-expires-after-9999", "accounts.PurchaseUnits",
         lambda w: purchase(w, expires_at=Timestamp(seconds=253402300800)), INVALID,
         "expires_at"),
    Case("purchase-reference-too-long", "accounts.PurchaseUnits",
         lambda w: purchase(w, reference="r" * 257), INVALID, "reference"),
    Case("purchase-unknown-account", "accounts.PurchaseUnits",
         lambda w: purchase(w, account_id="ghost-account"), NOT_FOUND, "account_id"),
    # CatalogService.SetPrice
    Case("price-empty-operation", "catalog.SetPrice",
         lambda w: catalog_pb2.SetPriceRequest(units_per_quantity=3), INVALID, "operation"),
    Case("price-operation-uppercase", "catalog.SetPrice",
         lambda w: catalog_pb2.SetPriceRequest(operation="Image.New", units_per_quantity=3),
         INVALID, "operation"),
    Case("price-operation-too-long", "catalog.SetPrice",
         lambda w: catalog_pb2.SetPriceRequest(operation="o" * 129, units_per_quantity=3),
         INVALID, "operation"),
    Case("price-zero", "catalog.SetPrice",
         lambda w: catalog_pb2.SetPriceRequest(operation="image.new"), INVALID,
         "units_per_quantity"),
    Case("price-negative", "catalog.SetPrice",
         lambda w: catalog_pb2.SetPriceRequest(operation="image.new", units_per_quantity=-3),
         INVALID, "units_per_quantity"),
    Case("price-2^53", "catalog.SetPrice",
         lambda w: catalog_pb2.SetPriceRequest(operation="image.new", units_per_quantity=2**53),
         INVALID, "units_per_quantity"),
]


def stub_method(live: Running, rpc: str) -> Callable[..., Any]:
    service, method = rpc.split(".")
    stub = {"quota": live.quota, "accounts": live.accounts, "catalog": live.catalog}[service]
    call: Callable[..., Any] = getattr(stub, method)
    return call


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
async def test_bad_input_is_refused_and_changes_nothing(live: Running, case: Case) -> None:
    """Proves each bad request gets its status code, a message naming the field, and leaves
    the account's shard (balance, event stream, every key) and the catalog untouched."""
    world = await make_world(live)
    request = case.build(world)
    other_ids = [getattr(request, "account_id", "") or world.account_id, world.new_account_id]
    before = await snapshot(live, world.account_id, *other_ids)
    prices_before = await aio(live).catalog.ListPrices(catalog_pb2.ListPricesRequest())
    error = await rpc_error(stub_method(live, case.rpc)(request))
    assert_status(error, case.code, case.field)
    assert await snapshot(live, world.account_id, *other_ids) == before
    assert await aio(live).catalog.ListPrices(catalog_pb2.ListPricesRequest()) == prices_before
    if case.rpc == "accounts.CreateAccount":
        missing = await rpc_error(
            aio(live).accounts.GetAccount(account_pb2.GetAccountRequest(account_id=world.new_account_id))
        )
        assert_status(missing, NOT_FOUND)


@pytest.mark.parametrize(
    "make_id",
    [
        pytest.param(lambda live, w: f"{_tag_of(live, 'bad id!')}.1.bad id!", id="bad-account"),
        pytest.param(
            lambda live, w: f"{w.held_id.split('.')[0]}.\u0663.{w.account_id}",
            id="non-ascii-digit-sequence",
        ),
    ],
)
async def test_reservation_id_that_cannot_have_been_issued_is_invalid(
    live: Running, make_id: Callable[[Running, World], str]
) -> None:
    """Proves a reservation id whose parts are not a valid sequence and account id is
    INVALID_ARGUMENT (malformed), not NOT_FOUND, on Commit, Refund and Extend."""
    world = await make_world(live)
    reservation_id = make_id(live, world)
    for call in (
        aio(live).quota.Commit(quota_pb2.CommitRequest(reservation_id=reservation_id)),
        aio(live).quota.Refund(
            quota_pb2.RefundRequest(reservation_id=reservation_id, idempotency_key="k")
        ),
        aio(live).quota.Extend(
            quota_pb2.ExtendRequest(reservation_id=reservation_id, ttl=Duration(seconds=5))
        ),
    ):
        assert_status(await rpc_error(call), INVALID, "reservation_id")


async def test_list_prices_needs_no_input(live: Running) -> None:
    """Proves ListPrices (the one catalog RPC without input) answers the default catalog."""
    answer = await aio(live).catalog.ListPrices(catalog_pb2.ListPricesRequest())
    prices = {p.operation: p.units_per_quantity for p in answer.prices}
    assert prices["image.generate.sdxl"] == 5
    assert prices["image.upscale"] == 10
    assert answer.catalog_version >= 3


async def test_ttl_bounds_are_inclusive(live: Running) -> None:
    """Proves a TTL of exactly 1s (the minimum) and exactly the maximum are accepted by
    Reserve and Extend, and set expires_at to now plus the TTL."""
    world = await make_world(live)
    one = await aio(live).quota.Reserve(reserve(world, idempotency_key="ttl-1s", ttl=ms(1000)))
    assert one.expires_at.ToMilliseconds() == live.clock.now_ms() + 1000
    top = await aio(live).quota.Reserve(
        reserve(world, idempotency_key="ttl-max", ttl=ms(3_600_000)))
    assert top.expires_at.ToMilliseconds() == live.clock.now_ms() + 3_600_000
    extended = await aio(live).quota.Extend(extend(world, reservation_id=one.reservation_id,
                                              ttl=ms(1000)))
    assert extended.expires_at.ToMilliseconds() == live.clock.now_ms() + 1000
    extended = await aio(live).quota.Extend(extend(world, reservation_id=one.reservation_id,
                                              ttl=ms(3_600_000)))
    assert extended.expires_at.ToMilliseconds() == live.clock.now_ms() + 3_600_000


async def test_create_account_that_exists_with_other_settings(live: Running) -> None:
    """Proves CreateAccount of an existing id with other settings is ALREADY_EXISTS and
    changes nothing, while the same settings replay."""
    world = await make_world(live)
    before = await snapshot(live, world.account_id)
    error = await rpc_error(create_account(live, world.account_id, monthly_allotment=7))
    assert_status(error, grpc.StatusCode.ALREADY_EXISTS, "account_id")
    again = await create_account(live, world.account_id)
    assert again.replayed
    assert await snapshot(live, world.account_id) == before


# --- RESOURCE_EXHAUSTED details ---------------------------------------------------


def shortfall_details(error: grpc.aio.AioRpcError) -> tuple[Any, Any]:
    status = rpc_status.from_call(error)
    assert status is not None, "no grpc-status-details-bin trailer"
    assert status.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    insufficient, info = None, None
    for detail in status.details:
        if detail.Is(common_pb2.InsufficientUnits.DESCRIPTOR):
            insufficient = common_pb2.InsufficientUnits()
            detail.Unpack(insufficient)
        elif detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
    assert insufficient is not None, "no tally.v1.InsufficientUnits detail"
    assert info is not None, "no google.rpc.ErrorInfo detail"
    return insufficient, info


@pytest.mark.parametrize("rpc", ["Reserve", "Charge"])
async def test_not_enough_units_carries_available_and_required(live: Running, rpc: str) -> None:
    """Proves a spend the account cannot cover is RESOURCE_EXHAUSTED whose status details
    carry available and required (InsufficientUnits and ErrorInfo), and moves nothing."""
    account_id = unique()
    await create_account(live, account_id, monthly_allotment=100)
    before = await snapshot(live, account_id)
    request_cls = quota_pb2.ReserveRequest if rpc == "Reserve" else quota_pb2.ChargeRequest
    request = request_cls(
        account_id=account_id, operation="image.upscale", quantity=11, idempotency_key="big"
    )
    error = await rpc_error(getattr(live.quota, rpc)(request))
    assert error.code() == EXHAUSTED
    insufficient, info = shortfall_details(error)
    assert (insufficient.available, insufficient.required) == (100, 110)
    assert (insufficient.account_id, insufficient.operation) == (account_id, "image.upscale")
    assert info.reason == "INSUFFICIENT_UNITS"
    assert (info.metadata["available"], info.metadata["required"]) == ("100", "110")
    assert await snapshot(live, account_id) == before


async def test_exhausted_overage_and_auto_purchase_report_headroom(live: Running) -> None:
    """Proves ALLOW counts its overage headroom in `available`, and an AUTO_PURCHASE account
    whose cap cannot cover the spend buys nothing (no pack, no event) before refusing."""
    allow_id = unique()
    await create_account(live, allow_id, monthly_allotment=100,
                         overage_policy=common_pb2.OVERAGE_POLICY_ALLOW, overage_limit=50)
    error = await rpc_error(aio(live).quota.Reserve(quota_pb2.ReserveRequest(
        account_id=allow_id, operation="image.upscale", quantity=16, idempotency_key="o")))
    insufficient, _ = shortfall_details(error)
    assert (insufficient.available, insufficient.required) == (150, 160)

    auto_id = unique()
    await create_account(live, auto_id, monthly_allotment=100,
                         overage_policy=common_pb2.OVERAGE_POLICY_AUTO_PURCHASE, overage_limit=40,
                         auto_purchase_units=20, auto_purchase_threshold=10)
    before = await snapshot(live, auto_id)
    error = await rpc_error(aio(live).quota.Reserve(quota_pb2.ReserveRequest(
        account_id=auto_id, operation="image.upscale", quantity=15, idempotency_key="a")))
    insufficient, _ = shortfall_details(error)
    assert (insufficient.available, insufficient.required) == (100, 150)
    assert await snapshot(live, auto_id) == before


# --- idempotency ------------------------------------------------------------------


async def test_reserve_idempotency_replays_and_rejects_changes(live: Running) -> None:
    """Proves Reserve with a reused key replays the same hold (replayed=true, nothing moves
    twice) and a reused key with any other field changed is FAILED_PRECONDITION."""
    world = await make_world(live)
    first = await aio(live).quota.Reserve(reserve(world, idempotency_key="r-1", quantity=3,
                                             labels={"model": "sdxl"}))
    assert not first.replayed
    before = await snapshot(live, world.account_id)
    again = await aio(live).quota.Reserve(reserve(world, idempotency_key="r-1", quantity=3,
                                             labels={"model": "sdxl"}))
    assert again.replayed
    assert (again.reservation_id, again.units, again.expires_at) == (
        first.reservation_id, first.units, first.expires_at)
    assert await snapshot(live, world.account_id) == before
    for changed in (
        {"quantity": 4, "labels": {"model": "sdxl"}},
        {"quantity": 3, "labels": {"model": "other"}},
        {"quantity": 3, "labels": {"model": "sdxl"}, "ttl": ms(60_000)},
        {"quantity": 3, "labels": {"model": "sdxl"}, "operation": "image.vectorize"},
    ):
        error = await rpc_error(aio(live).quota.Reserve(reserve(world, idempotency_key="r-1",
                                                           **changed)))
        assert_status(error, FAILED, "idempotency_key")
    # The same key used for another method is another request, too.
    error = await rpc_error(aio(live).quota.Charge(charge(world, idempotency_key="r-1", quantity=3,
                                                     labels={"model": "sdxl"})))
    assert_status(error, FAILED, "idempotency_key")
    assert await snapshot(live, world.account_id) == before
    b = await balance(live, world.account_id)
    assert (b.held, b.available) == (20 + 30, 1000 - 20 - 5 - 30)


async def test_charge_refund_purchase_idempotency(live: Running) -> None:
    """Proves Charge, Refund and PurchaseUnits replay under a reused key without moving units
    again, and refuse the key with a different request (FAILED_PRECONDITION)."""
    world = await make_world(live)
    charged = await aio(live).quota.Charge(charge(world, idempotency_key="c-1", quantity=2))
    refunded = await aio(live).quota.Refund(refund(world, reservation_id=charged.reservation_id,
                                              idempotency_key="f-1", units=5))
    grant = await aio(live).accounts.PurchaseUnits(purchase(world, idempotency_key="p-1", units=70))
    before = await snapshot(live, world.account_id)

    charged_again = await aio(live).quota.Charge(charge(world, idempotency_key="c-1", quantity=2))
    assert charged_again.replayed
    assert charged_again.reservation_id == charged.reservation_id
    refunded_again = await aio(live).quota.Refund(
        refund(world, reservation_id=charged.reservation_id, idempotency_key="f-1", units=5))
    assert refunded_again.replayed and refunded_again.units_refunded == 5
    grant_again = await aio(live).accounts.PurchaseUnits(
        purchase(world, idempotency_key="p-1", units=70))
    assert grant_again.grant.grant_id == grant.grant.grant_id
    assert await snapshot(live, world.account_id) == before
    assert refunded.units_refunded == 5

    for call in (
        aio(live).quota.Charge(charge(world, idempotency_key="c-1", quantity=1)),
        aio(live).quota.Refund(refund(world, reservation_id=charged.reservation_id,
                                 idempotency_key="f-1", units=4)),
        aio(live).accounts.PurchaseUnits(purchase(world, idempotency_key="p-1", units=71)),
        aio(live).accounts.PurchaseUnits(purchase(world, idempotency_key="p-1", units=70,
                                             reference="another-invoice")),
    ):
        assert_status(await rpc_error(call), FAILED, "idempotency_key")
    assert await snapshot(live, world.account_id) == before
    b = await balance(live, world.account_id)
    assert b.units_charged_total == 5 + 20
    assert b.units_refunded_total == 5
    assert b.units_granted_total == 1000 + 70
    assert_books(b)


async def test_commit_twice_replays_or_conflicts(live: Running) -> None:
    """Proves a second Commit with the same quantity replays (charged once) and one with
    another quantity is FAILED_PRECONDITION; committing a released hold is refused too."""
    world = await make_world(live)
    first = await aio(live).quota.Commit(commit(world, quantity=1))
    assert (first.units_charged, first.units_released, first.replayed) == (10, 10, False)
    before = await snapshot(live, world.account_id)
    again = await aio(live).quota.Commit(commit(world, quantity=1))
    assert (again.units_charged, again.replayed) == (10, True)
    assert_status(await rpc_error(aio(live).quota.Commit(commit(world, quantity=2))), FAILED,
                  "quantity")
    assert_status(await rpc_error(aio(live).quota.Commit(commit(world))), FAILED, "quantity")
    assert await snapshot(live, world.account_id) == before

    other = await aio(live).quota.Reserve(reserve(world, idempotency_key="to-release"))
    await aio(live).quota.Refund(refund(world, reservation_id=other.reservation_id,
                                   idempotency_key="release"))
    before = await snapshot(live, world.account_id)
    error = await rpc_error(
        aio(live).quota.Commit(commit(world, reservation_id=other.reservation_id)))
    assert_status(error, FAILED, "reservation_id")
    assert await snapshot(live, world.account_id) == before


async def test_idempotency_keys_are_per_account(live: Running) -> None:
    """Proves the same idempotency key on two accounts makes two independent holds."""
    a, b = unique(), unique()
    await create_account(live, a)
    await create_account(live, b)
    ra = await aio(live).quota.Reserve(quota_pb2.ReserveRequest(
        account_id=a, operation="image.upscale", idempotency_key="shared"))
    rb = await aio(live).quota.Reserve(quota_pb2.ReserveRequest(
        account_id=b, operation="image.upscale", idempotency_key="shared"))
    assert not ra.replayed and not rb.replayed
    assert ra.reservation_id != rb.reservation_id


async def test_concurrent_duplicate_reserves_hold_once(live: Running) -> None:
    """Proves 20 identical Reserve calls fired at once with one key make exactly one hold:
    every answer carries the same reservation id, one is fresh, units move once."""
    account_id = unique()
    await create_account(live, account_id)
    store = live.authority.store
    shard = store.keys.shard_of(account_id)
    stream = store.keys.events(shard)
    added_before = await events_added(store.redis, stream)
    request = quota_pb2.ReserveRequest(
        account_id=account_id, operation="image.upscale", quantity=3, idempotency_key="dup",
        labels={"worker": "w1"},
    )
    answers = await asyncio.gather(*(aio(live).quota.Reserve(request) for _ in range(20)))
    assert len({a.reservation_id for a in answers}) == 1
    assert [a.replayed for a in answers].count(False) == 1
    assert all(a.units == 30 for a in answers)
    b = await balance(live, account_id)
    assert (b.held, b.available) == (30, 970)
    assert await store.redis.zcard(store.keys.account_keys(account_id)[1]) == 1
    assert await events_added(store.redis, stream) == added_before + 1
