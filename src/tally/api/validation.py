"""Validation of every request field. Bad input raises InvalidArgument naming
the field, before anything reaches the store."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from tally.domain.errors import InvalidArgument
from tally.domain.ids import ACCOUNT_ID
from tally.domain.limits import (
    ACCOUNT_ID_BYTES_MAX,
    ALERT_PERCENT_MAX,
    ALERT_PERCENT_MIN,
    ALERT_PERCENTAGES_MAX,
    IDEMPOTENCY_KEY_BYTES_MAX,
    LABEL_KEY_BYTES_MAX,
    LABEL_VALUE_BYTES_MAX,
    LABELS_MAX,
    OPERATION_BYTES_MAX,
    TIMESTAMP_MS_MAX,
    UNITS_MAX,
)
from tally.store.contract import AlertSettings, SetBudgetRequest
from tally_client.v1 import common_pb2

# Each pattern's first character is counted apart, hence the `- 1`.
OPERATION = re.compile(rf"[a-z0-9][a-z0-9._-]{{0,{OPERATION_BYTES_MAX - 1}}}")
IDEMPOTENCY_KEY = re.compile(rf"[\x21-\x7e]{{1,{IDEMPOTENCY_KEY_BYTES_MAX}}}")
LABEL_KEY = re.compile(rf"[A-Za-z_][A-Za-z0-9_.-]{{0,{LABEL_KEY_BYTES_MAX - 1}}}")


@dataclass(frozen=True)
class HoldTtlLimits:
    default_ms: int
    min_ms: int
    max_ms: int


def _required_match(value: str, field: str, pattern: re.Pattern[str], rule: str) -> str:
    """`value` is required and must match `pattern`; `rule` says what it must be."""
    if not value:
        raise InvalidArgument(f"{field} is required", field_name=field)
    if not pattern.fullmatch(value):
        raise InvalidArgument(f"{field} must be {rule}", field_name=field)
    return value


# What each pattern asks, said once (not formatted again on every call).
ACCOUNT_ID_RULE = (
    f"1-{ACCOUNT_ID_BYTES_MAX} characters of A-Z a-z 0-9 . _ @ - "
    "and start with a letter or digit"
)
OPERATION_RULE = f"1-{OPERATION_BYTES_MAX} characters of a-z 0-9 . _ -"
IDEMPOTENCY_KEY_RULE = (
    f"1-{IDEMPOTENCY_KEY_BYTES_MAX} printable ASCII characters without spaces"
)


def account_id(value: str, field: str = "account_id") -> str:
    return _required_match(value, field, ACCOUNT_ID, ACCOUNT_ID_RULE)


def operation(value: str, field: str = "operation") -> str:
    return _required_match(value, field, OPERATION, OPERATION_RULE)


def idempotency_key(value: str, field: str = "idempotency_key") -> str:
    return _required_match(value, field, IDEMPOTENCY_KEY, IDEMPOTENCY_KEY_RULE)


def units(value: int, field: str, *, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(f"{field} must be an integer", field_name=field)
    if value < minimum or value > UNITS_MAX:
        raise InvalidArgument(
            f"{field} must be between {minimum} and {UNITS_MAX} (2^53 - 1)", field_name=field
        )
    return value


def quantity(value: int, field: str = "quantity") -> int:
    """0 means 1, per the API contract."""
    return units(value, field) or 1


def labels(value: Mapping[str, str], field: str = "labels") -> dict[str, str]:
    if len(value) > LABELS_MAX:
        raise InvalidArgument(f"{field} may hold at most {LABELS_MAX} entries", field_name=field)
    for key, text in value.items():
        if not LABEL_KEY.fullmatch(key):
            raise InvalidArgument(
                f"{field} key {key[:64]!r} must match {LABEL_KEY.pattern}", field_name=field
            )
        if len(text.encode()) > LABEL_VALUE_BYTES_MAX:
            raise InvalidArgument(
                f"{field}[{key}] must be at most {LABEL_VALUE_BYTES_MAX} bytes", field_name=field
            )
    return dict(value)


def text(value: str, field: str, max_bytes: int) -> str:
    # A character is at most 4 bytes: short text needs no encoding to be measured.
    if len(value) * 4 > max_bytes and len(value.encode()) > max_bytes:
        raise InvalidArgument(f"{field} must be at most {max_bytes} bytes", field_name=field)
    return value


def duration_ms(value: Duration, field: str) -> int:
    if value.seconds < 0 or value.nanos < 0:
        raise InvalidArgument(f"{field} must not be negative", field_name=field)
    if value.nanos % 1_000_000:
        raise InvalidArgument(f"{field} must be a whole number of milliseconds", field_name=field)
    return value.seconds * 1000 + value.nanos // 1_000_000


def hold_ttl_ms(value: Duration | None, field: str, limits: HoldTtlLimits) -> int:
    if value is None:
        return limits.default_ms
    ttl = duration_ms(value, field)
    if not limits.min_ms <= ttl <= limits.max_ms:
        raise InvalidArgument(
            f"{field} must be between {limits.min_ms / 1000:g}s and {limits.max_ms / 1000:g}s",
            field_name=field,
        )
    return ttl


def timestamp_ms(value: Timestamp, field: str) -> int:
    if value.seconds < 0 or value.nanos < 0:
        raise InvalidArgument(f"{field} must not be before 1970", field_name=field)
    ms = value.seconds * 1000 + value.nanos // 1_000_000
    if ms > TIMESTAMP_MS_MAX:
        raise InvalidArgument(f"{field} must be before year 10000", field_name=field)
    return ms


def alert_settings(value: common_pb2.AlertSettings, field: str = "alerts") -> AlertSettings:
    """Each percentage once, in ascending order."""
    percentages = list(value.allotment_used_percent)
    if len(percentages) > ALERT_PERCENTAGES_MAX:
        raise InvalidArgument(
            f"{field}.allotment_used_percent may hold at most {ALERT_PERCENTAGES_MAX} values",
            field_name=f"{field}.allotment_used_percent",
        )
    for percent in percentages:
        if not ALERT_PERCENT_MIN <= percent <= ALERT_PERCENT_MAX:
            raise InvalidArgument(
                f"{field}.allotment_used_percent values must be between {ALERT_PERCENT_MIN} "
                f"and {ALERT_PERCENT_MAX}",
                field_name=f"{field}.allotment_used_percent",
            )
    return AlertSettings(
        allotment_used_percent=tuple(sorted(set(percentages))),
        balance_below=units(value.balance_below, f"{field}.balance_below"),
        overage_started=bool(value.overage_started),
    )


def budget(
    account_id: str, value: common_pb2.Budget, *, by: str, field: str = "budget"
) -> SetBudgetRequest:
    """A budget names an operation, or a label key and value; `by` sets it."""
    has_operation = bool(value.operation)
    has_label = bool(value.label_key)
    if has_operation == has_label:
        raise InvalidArgument(
            f"{field} names either an operation or a label_key (with label_value)",
            field_name=field,
        )
    if has_operation:
        operation(value.operation, f"{field}.operation")
    else:
        if not LABEL_KEY.fullmatch(value.label_key):
            raise InvalidArgument(
                f"{field}.label_key must match {LABEL_KEY.pattern}", field_name=f"{field}.label_key"
            )
        if not value.label_value:
            raise InvalidArgument(
                f"{field}.label_value is required with label_key", field_name=f"{field}.label_value"
            )
        text(value.label_value, f"{field}.label_value", LABEL_VALUE_BYTES_MAX)
    return SetBudgetRequest(
        account_id=account_id,
        operation=value.operation,
        label_key=value.label_key,
        label_value=value.label_value,
        limit_units=units(value.limit_units, f"{field}.limit_units"),
        by=by,
    )
