"""Script replies (plain dicts) to protobuf messages."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from tally.domain.events import Entry
from tally.v1 import account_pb2, catalog_pb2, common_pb2, quota_pb2

# The store and its Lua scripts name policies and grant kinds without the wire
# enums' prefixes: one table each.
OVERAGE_POLICIES: dict[str, common_pb2.OveragePolicy.ValueType] = {
    "DENY": common_pb2.OVERAGE_POLICY_DENY,
    "ALLOW": common_pb2.OVERAGE_POLICY_ALLOW,
    "AUTO_PURCHASE": common_pb2.OVERAGE_POLICY_AUTO_PURCHASE,
}
GRANT_KINDS: dict[str, common_pb2.GrantKind.ValueType] = {
    "ALLOTMENT": common_pb2.GRANT_KIND_ALLOTMENT,
    "PURCHASE": common_pb2.GRANT_KIND_PURCHASE,
    "PROMOTIONAL": common_pb2.GRANT_KIND_PROMOTIONAL,
}
# An unset policy means DENY (see common.proto).
_POLICY_NAMES = {value: name for name, value in OVERAGE_POLICIES.items()} | {
    common_pb2.OVERAGE_POLICY_UNSPECIFIED: "DENY"
}


def policy_name(value: int) -> str | None:
    """The store's name of a wire policy; None for a number the enum does not know."""
    return _POLICY_NAMES.get(common_pb2.OveragePolicy.ValueType(value))


def timestamp(ms: int) -> Timestamp:
    ts = Timestamp()
    ts.FromMilliseconds(int(ms))
    return ts


def _labels(value: Any) -> dict[str, str]:
    # Lua hands an empty map back as an empty array.
    return dict(value) if isinstance(value, Mapping) else {}


def grant(view: Mapping[str, Any]) -> common_pb2.Grant:
    message = common_pb2.Grant(
        grant_id=view["grant_id"],
        kind=GRANT_KINDS[view["kind"]],
        units_granted=int(view["granted"]),
        units_remaining=int(view["remaining"]),
        granted_at=timestamp(view["granted_at"]),
        reference=view.get("reference", ""),
    )
    if view["expires_at"]:
        message.expires_at.CopyFrom(timestamp(view["expires_at"]))
    return message


def balance(view: Mapping[str, Any]) -> common_pb2.Balance:
    grants = view["grants"] if isinstance(view["grants"], list) else []
    return common_pb2.Balance(
        account_id=view["account_id"],
        available=int(view["available"]),
        held=int(view["held"]),
        grants=[grant(g) for g in grants],
        overage_used=int(view["overage_used"]),
        overage_limit=int(view["overage_limit"]),
        period_start=timestamp(view["period_start"]),
        period_end=timestamp(view["period_end"]),
        period_consumed=int(view["period_consumed"]),
        overage_held=int(view["overage_held"]),
        auto_purchased=int(view["auto_purchased"]),
        units_granted_total=int(view["total_granted"]),
        units_charged_total=int(view["total_charged"]),
        units_refunded_total=int(view["total_refunded"]),
        units_expired_total=int(view["total_expired"]),
        as_of=timestamp(view["as_of"]),
    )


def account(view: Mapping[str, Any], replayed: bool = False) -> account_pb2.Account:
    return account_pb2.Account(
        account_id=view["account_id"],
        monthly_allotment=int(view["allotment"]),
        overage_policy=OVERAGE_POLICIES[view["policy"]],
        overage_limit=int(view["overage_limit"]),
        labels=_labels(view["labels"]),
        auto_purchase_units=int(view["ap_units"]),
        auto_purchase_threshold=int(view["ap_threshold"]),
        billing_anchor_day=int(view["anchor_day"]),
        created_at=timestamp(view["created_at"]),
        period_start=timestamp(view["period_start"]),
        period_end=timestamp(view["period_end"]),
        replayed=replayed,
        alerts=alert_settings(view.get("alerts") or {}),
    )


def alert_settings(view: Mapping[str, Any]) -> common_pb2.AlertSettings:
    return common_pb2.AlertSettings(
        allotment_used_percent=[int(p) for p in view.get("percent") or []],
        balance_below=int(view.get("below") or 0),
        overage_started=bool(view.get("overage")),
    )


def budget(budget_id: str, view: Mapping[str, Any]) -> common_pb2.Budget:
    return common_pb2.Budget(
        budget_id=budget_id,
        operation=view.get("operation", ""),
        label_key=view.get("label_key", ""),
        label_value=view.get("label_value", ""),
        limit_units=int(view["limit"]),
        used_units=int(view["used"]),
    )


def _hold(reply: Mapping[str, Any]) -> dict[str, Any]:
    """The fields ReserveResponse and ExtendResponse share (under the same numbers)."""
    return {
        "reservation_id": reply["reservation_id"],
        "units": int(reply["units"]),
        "expires_at": timestamp(reply["expires_at"]),
        "balance": balance(reply["balance"]),
        "price_version": int(reply["price_version"]),
        "units_per_quantity": int(reply["unit_price"]),
        "quantity": int(reply["quantity"]),
    }


def reserve_response(reply: Mapping[str, Any]) -> quota_pb2.ReserveResponse:
    return quota_pb2.ReserveResponse(**_hold(reply), replayed=bool(reply["replayed"]))


def extend_response(reply: Mapping[str, Any]) -> quota_pb2.ExtendResponse:
    return quota_pb2.ExtendResponse(**_hold(reply))


def price(record: Mapping[str, Any]) -> catalog_pb2.Price:
    return catalog_pb2.Price(
        operation=record["operation"],
        units_per_quantity=int(record["price"]),
        version=int(record["version"]),
        effective_at=timestamp(record["at"]),
    )


def ledger_entry(row: Entry) -> account_pb2.LedgerEntry:
    return account_pb2.LedgerEntry(
        entry_id=row.entry_id,
        account_id=row.account_id,
        type=row.type.value,
        reservation_id=row.reservation_id,
        operation=row.operation,
        quantity=row.quantity,
        units=row.units,
        available_after=row.available_after,
        occurred_at=timestamp(row.occurred_at_ms),
        labels=row.labels,
        idempotency_key=row.idempotency_key,
    )
