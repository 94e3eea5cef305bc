"""Script replies (store/contract.py) to protobuf messages."""

from __future__ import annotations

from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from tally.domain.events import Entry
from tally.store.contract import (
    AccountView,
    AlertSettings,
    BalanceView,
    BudgetView,
    GrantView,
    HoldReply,
    PriceView,
)
from tally_client.v1 import account_pb2, catalog_pb2, common_pb2, quota_pb2

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
    # What Timestamp.FromMilliseconds sets, in one constructor call (no Python-level
    # setters): every balance in a reply carries several.
    ms = int(ms)
    if not _TIMESTAMP_MS_MIN <= ms <= _TIMESTAMP_MS_MAX:
        Timestamp().FromMilliseconds(ms)  # out of Timestamp's range: raises as it did
    return Timestamp(seconds=ms // 1000, nanos=(ms % 1000) * 1_000_000)


# Timestamp's range (0001-01-01 to 9999-12-31T23:59:59.999Z), in milliseconds.
_TIMESTAMP_MS_MIN = -62_135_596_800_000
_TIMESTAMP_MS_MAX = 253_402_300_799_999


def grant(view: GrantView) -> common_pb2.Grant:
    message = common_pb2.Grant(
        grant_id=view.grant_id,
        kind=GRANT_KINDS[view.kind],
        units_granted=view.units_granted,
        units_remaining=view.units_remaining,
        granted_at=timestamp(view.granted_at),
        reference=view.reference,
    )
    if view.expires_at:
        message.expires_at.CopyFrom(timestamp(view.expires_at))
    return message


def balance(view: BalanceView) -> common_pb2.Balance:
    return common_pb2.Balance(
        account_id=view.account_id,
        available=view.available,
        held=view.held,
        grants=[grant(g) for g in view.grants],
        overage_used=view.overage_used,
        overage_limit=view.overage_limit,
        period_start=timestamp(view.period_start),
        period_end=timestamp(view.period_end),
        period_consumed=view.period_consumed,
        overage_held=view.overage_held,
        auto_purchased=view.auto_purchased,
        units_granted_total=view.units_granted_total,
        units_charged_total=view.units_charged_total,
        units_refunded_total=view.units_refunded_total,
        units_expired_total=view.units_expired_total,
        as_of=timestamp(view.as_of),
    )


def account(view: AccountView, replayed: bool = False) -> account_pb2.Account:
    return account_pb2.Account(
        account_id=view.account_id,
        monthly_allotment=view.monthly_allotment,
        overage_policy=OVERAGE_POLICIES[view.overage_policy],
        overage_limit=view.overage_limit,
        labels=view.labels,
        auto_purchase_units=view.auto_purchase_units,
        auto_purchase_threshold=view.auto_purchase_threshold,
        billing_anchor_day=view.billing_anchor_day,
        created_at=timestamp(view.created_at),
        period_start=timestamp(view.period_start),
        period_end=timestamp(view.period_end),
        replayed=replayed,
        alerts=alert_settings(view.alerts),
    )


def alert_settings(view: AlertSettings) -> common_pb2.AlertSettings:
    return common_pb2.AlertSettings(
        allotment_used_percent=view.allotment_used_percent,
        balance_below=view.balance_below,
        overage_started=view.overage_started,
    )


def budget(view: BudgetView) -> common_pb2.Budget:
    return common_pb2.Budget(
        budget_id=view.budget_id,
        operation=view.operation,
        label_key=view.label_key,
        label_value=view.label_value,
        limit_units=view.limit_units,
        used_units=view.used_units,
    )


def _hold(reply: HoldReply) -> dict[str, Any]:
    """The fields ReserveResponse and ExtendResponse share (under the same numbers)."""
    return {
        "reservation_id": reply.reservation_id,
        "units": reply.units,
        "expires_at": timestamp(reply.expires_at),
        "balance": balance(reply.balance),
        "price_version": reply.price_version,
        "units_per_quantity": reply.units_per_quantity,
        "quantity": reply.quantity,
    }


def reserve_response(reply: HoldReply) -> quota_pb2.ReserveResponse:
    return quota_pb2.ReserveResponse(**_hold(reply), replayed=reply.replayed)


def extend_response(reply: HoldReply) -> quota_pb2.ExtendResponse:
    return quota_pb2.ExtendResponse(**_hold(reply))


def price(view: PriceView) -> catalog_pb2.Price:
    return catalog_pb2.Price(
        operation=view.operation,
        units_per_quantity=view.units_per_quantity,
        version=view.version,
        effective_at=timestamp(view.effective_at_ms),
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
        principal=row.principal,
    )
