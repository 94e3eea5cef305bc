"""The requests both clients send: one builder per call, and the idempotency key
made once per logical call when the caller gives none."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import TypeVar

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from tally_client.v1 import account_pb2, quota_pb2

# The server refuses longer idempotency keys (README, Limits).
IDEMPOTENCY_KEY_BYTES_MAX = 128


def key(value: str | None) -> str:
    return value if value else str(uuid.uuid4())


def duration(seconds: float) -> Duration:
    value = Duration()
    value.FromMilliseconds(round(seconds * 1000))
    return value


def timestamp(moment: datetime) -> Timestamp:
    if moment.tzinfo is None:
        raise ValueError("expires_at must be timezone-aware (e.g. datetime.now(UTC))")
    value = Timestamp()
    value.FromDatetime(moment.astimezone(UTC))
    return value


Spend = TypeVar("Spend", quota_pb2.ReserveRequest, quota_pb2.ChargeRequest)


def spend(
    kind: type[Spend],
    account_id: str,
    operation: str,
    quantity: int,
    labels: Mapping[str, str] | None,
    idempotency_key: str | None,
    price_version: int,
) -> Spend:
    """What Reserve and Charge both ask: `quantity` of `operation` on an account."""
    return kind(
        account_id=account_id,
        operation=operation,
        quantity=quantity,
        idempotency_key=key(idempotency_key),
        labels=dict(labels or {}),
        price_version=price_version,
    )


def reserve(
    account_id: str,
    operation: str,
    quantity: int = 1,
    *,
    labels: Mapping[str, str] | None = None,
    ttl_s: float | None = None,
    idempotency_key: str | None = None,
    price_version: int = 0,
) -> quota_pb2.ReserveRequest:
    """A Reserve; `ttl_s` None: the server's default lifetime. Also one item of a
    reserve_batch."""
    request = spend(
        quota_pb2.ReserveRequest, account_id, operation, quantity, labels,
        idempotency_key, price_version,
    )
    if ttl_s is not None:
        request.ttl.CopyFrom(duration(ttl_s))
    return request


def charge(
    account_id: str,
    operation: str,
    quantity: int,
    labels: Mapping[str, str] | None,
    idempotency_key: str | None,
    price_version: int,
) -> quota_pb2.ChargeRequest:
    return spend(
        quota_pb2.ChargeRequest, account_id, operation, quantity, labels,
        idempotency_key, price_version,
    )


def quote(account_id: str, operation: str, quantity: int) -> quota_pb2.QuoteRequest:
    return quota_pb2.QuoteRequest(account_id=account_id, operation=operation, quantity=quantity)


def commit(reservation_id: str, quantity: int | None) -> quota_pb2.CommitRequest:
    request = quota_pb2.CommitRequest(reservation_id=reservation_id)
    if quantity is not None:
        request.quantity = quantity
    return request


def refund(
    reservation_id: str, units: int | None, reason: str, idempotency_key: str | None
) -> quota_pb2.RefundRequest:
    request = quota_pb2.RefundRequest(
        reservation_id=reservation_id, reason=reason, idempotency_key=key(idempotency_key)
    )
    if units is not None:
        request.units = units
    return request


def extend(reservation_id: str, ttl_s: float) -> quota_pb2.ExtendRequest:
    return quota_pb2.ExtendRequest(reservation_id=reservation_id, ttl=duration(ttl_s))


def purchase(
    account_id: str,
    units: int,
    reference: str,
    expires_at: datetime | None,
    idempotency_key: str | None,
) -> account_pb2.PurchaseUnitsRequest:
    request = account_pb2.PurchaseUnitsRequest(
        account_id=account_id, units=units, reference=reference,
        idempotency_key=key(idempotency_key),
    )
    if expires_at is not None:
        request.expires_at.CopyFrom(timestamp(expires_at))
    return request


def reserve_batch(items: Sequence[quota_pb2.ReserveRequest]) -> quota_pb2.ReserveBatchRequest:
    """An item without an idempotency key gets one, kept across retries."""
    request = quota_pb2.ReserveBatchRequest(items=items)
    for item in request.items:
        item.idempotency_key = key(item.idempotency_key)
    return request


def commit_batch(items: Sequence[tuple[str, int | None]]) -> quota_pb2.CommitBatchRequest:
    request = quota_pb2.CommitBatchRequest()
    for reservation_id, quantity in items:
        item = request.items.add(reservation_id=reservation_id)
        if quantity is not None:
            item.quantity = quantity
    return request


def refund_batch(items: Sequence[quota_pb2.RefundRequest]) -> quota_pb2.RefundBatchRequest:
    """An item without an idempotency key gets one, kept across retries."""
    request = quota_pb2.RefundBatchRequest(items=items)
    for item in request.items:
        item.idempotency_key = key(item.idempotency_key)
    return request


def release_key(reserve_key: str) -> str:
    """The idempotency key of a hold's release, derived from its Reserve's: distinct
    for distinct keys, within the server's limit on key length."""
    key = f"release-{reserve_key}"
    if len(key.encode()) <= IDEMPOTENCY_KEY_BYTES_MAX:
        return key
    return f"release-{hashlib.sha256(reserve_key.encode()).hexdigest()}"
