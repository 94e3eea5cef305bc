"""The ledger entry: its types, its fields and the one decoder of a stream entry.

Each Lua script appends the entries it caused to its shard's stream (see
store/lua/lib/events.lua `emit`, and set_price.lua for `price_change`); the
flusher copies them into the ledger, the watch sends them, reports and
recovery sum them. They all use `Entry`.

A stream entry is flat text fields: `type`, `event_id` (`<account>/<seq>`, or
`catalog/<version>` for prices), `account_id`, `at` (ms), `reservation_id`,
`operation`, `quantity`, `units`, `available_after`, `labels` (JSON object),
`idempotency_key`, `fence` (the shard's fence count the script's write phase
reached; 0 for prices), `by` (the principal of a money-in or admin action),
plus type-specific ones kept in `detail` (`alert`, `charged_at`, `expired`,
`price_version`, ...). The last entry of a script also
carries msgpack images of what the script wrote (`_acct`, `_holds`, `_idem`),
which is what recovery restores from.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import msgpack


class EntryType(StrEnum):
    """Every type of entry the scripts write (each one can be filtered on)."""

    RESERVE = "reserve"
    COMMIT = "commit"
    LATE_COMMIT = "late_commit"
    RELEASE = "release"
    EXPIRE = "expire"
    REFUND = "refund"
    CHARGE = "charge"
    PURCHASE = "purchase"
    ALLOTMENT = "allotment"
    ALLOTMENT_EXPIRE = "allotment_expire"
    GRANT_EXPIRE = "grant_expire"
    OVERAGE = "overage"
    PLAN_CHANGE = "plan_change"
    PRICE_CHANGE = "price_change"
    EXTEND = "extend"
    ALERT = "alert"


# Entries whose units are charged (usage adds them); a refund takes units back.
CHARGE_TYPES = frozenset({EntryType.COMMIT, EntryType.LATE_COMMIT, EntryType.CHARGE})
USAGE_TYPES = CHARGE_TYPES | {EntryType.REFUND}

IMAGE_FIELDS = (b"_acct", b"_holds", b"_idem")

Fields = Mapping[bytes, bytes]


@dataclass(frozen=True)
class Entry:
    """One ledger entry: a stream entry's fields, a ledger row, a usage input."""

    entry_id: str
    account_id: str  # empty for price_change
    seq: int  # the account's event number (the catalog version for price_change)
    type: EntryType
    occurred_at_ms: int
    reservation_id: str
    operation: str
    quantity: int
    units: int
    available_after: int
    labels: dict[str, str]
    idempotency_key: str
    detail: dict[str, str]  # every text field of the stream entry
    shard: int
    fence: int  # the shard's fence count after the script (store/lua/lib/fence.lua)
    # who did a money-in or admin action (the event's `by`); empty for the others
    principal: str = ""

    @property
    def price_version(self) -> int:
        return int(self.detail.get("price_version", "0") or 0)

    @property
    def alert(self) -> str:
        return self.detail.get("alert", "")


@dataclass(frozen=True)
class IdempotencyImage:
    key: str
    record: bytes
    expires_at_ms: int


@dataclass(frozen=True)
class EntryImages:
    """What the script that wrote an entry left in Redis (on its last entry only)."""

    account: bytes | None = None
    holds: dict[str, bytes] = field(default_factory=dict)
    idempotency: IdempotencyImage | None = None


@dataclass(frozen=True)
class StreamEntry:
    """An entry as it sits in its shard's stream."""

    stream_id: str
    entry: Entry
    images: EntryImages


def stream_id_order(stream_id: str) -> tuple[int, int]:
    """A stream id (`<ms>-<seq>`) as something that sorts like Redis does."""
    ms, _, seq = stream_id.partition("-")
    return int(ms), int(seq or 0)


def decode(shard: int, stream_id: bytes | str, fields: Fields) -> StreamEntry:
    """The one decoder of a stream entry."""
    text = {k.decode(): v.decode() for k, v in fields.items() if k not in IMAGE_FIELDS}
    event_id = text["event_id"]
    entry = Entry(
        entry_id=event_id,
        account_id=text.get("account_id", ""),
        seq=int(event_id.rpartition("/")[2]),
        type=EntryType(text["type"]),
        occurred_at_ms=_int(text.get("at")),
        reservation_id=text.get("reservation_id", ""),
        operation=text.get("operation", ""),
        quantity=_int(text.get("quantity")),
        units=_int(text.get("units")),
        available_after=_int(text.get("available_after")),
        labels=labels_of(text.get("labels")),
        idempotency_key=text.get("idempotency_key", ""),
        detail=text,
        shard=shard,
        fence=_int(text.get("fence")),
        principal=text.get("by", ""),
    )
    return StreamEntry(
        stream_id=stream_id.decode() if isinstance(stream_id, bytes) else stream_id,
        entry=entry,
        images=_images(fields),
    )


def labels_of(raw: str | None) -> dict[str, str]:
    """A labels JSON object (`{}` when absent or not an object)."""
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except ValueError:
        return {}
    if not isinstance(value, dict):
        return {}
    return {str(k): str(v) for k, v in value.items()}


def _int(text: str | None) -> int:
    if not text:
        return 0
    try:
        return int(text)
    except ValueError:  # Lua may hand Redis a number in exponent notation
        return int(float(text))


def _unpack(raw: bytes) -> Any:
    return msgpack.unpackb(raw, raw=False, strict_map_key=False)


def _images(fields: Fields) -> EntryImages:
    holds: dict[str, bytes] = {}
    raw_holds = fields.get(b"_holds")
    if raw_holds:
        holds = {
            rid: msgpack.packb(hold, use_bin_type=True)
            for rid, hold in _unpack(raw_holds).items()
        }
    idempotency = None
    raw_idem = fields.get(b"_idem")
    if raw_idem:
        idem = _unpack(raw_idem)
        idempotency = IdempotencyImage(
            key=idem["key"],
            record=msgpack.packb(idem["record"], use_bin_type=True),
            expires_at_ms=int(idem["expires_at"]),
        )
    return EntryImages(account=fields.get(b"_acct"), holds=holds, idempotency=idempotency)
