"""Stream entries to ledger events.

Each script appends events to its shard's stream; the last event of a script
also carries msgpack images of what the script wrote (`_acct`, `_holds`,
`_idem`), which is what recovery restores from.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import msgpack

IMAGE_FIELDS = ("_acct", "_holds", "_idem")
TEXT_COLUMNS = ("reservation_id", "operation", "idempotency_key")
INT_COLUMNS = ("quantity", "units", "available_after")


@dataclass(frozen=True)
class IdempotencyImage:
    key: str
    record: bytes
    expires_at_ms: int


@dataclass(frozen=True)
class LedgerEvent:
    stream_id: str
    shard: int
    event_id: str
    account_id: str
    seq: int
    type: str
    occurred_at_ms: int
    reservation_id: str
    operation: str
    quantity: int
    units: int
    available_after: int
    labels: dict[str, str]
    idempotency_key: str
    detail: dict[str, str]
    account_image: bytes | None = None
    hold_images: dict[str, bytes] = field(default_factory=dict)
    idempotency_image: IdempotencyImage | None = None

    @property
    def price_version(self) -> int:
        return int(self.detail.get("price_version", "0") or 0)


def _int(text: str | None) -> int:
    if not text:
        return 0
    return int(text)


def _seq(event_id: str) -> int:
    """`<account>/<seq>` for account events, `catalog/<version>` for prices."""
    return int(event_id.rpartition("/")[2])


def decode(shard: int, stream_id: bytes | str, fields: dict[bytes, bytes]) -> LedgerEvent:
    text = {
        k.decode(): v.decode()
        for k, v in fields.items()
        if k.decode() not in IMAGE_FIELDS
    }
    labels_text = text.get("labels", "{}")
    labels: Any = json.loads(labels_text) if labels_text else {}
    hold_images: dict[str, bytes] = {}
    raw_holds = fields.get(b"_holds")
    if raw_holds:
        holds = msgpack.unpackb(raw_holds, raw=False, strict_map_key=False)
        hold_images = {rid: msgpack.packb(hold, use_bin_type=True) for rid, hold in holds.items()}
    idempotency_image = None
    raw_idem = fields.get(b"_idem")
    if raw_idem:
        idem = msgpack.unpackb(raw_idem, raw=False, strict_map_key=False)
        idempotency_image = IdempotencyImage(
            key=idem["key"],
            record=msgpack.packb(idem["record"], use_bin_type=True),
            expires_at_ms=int(idem["record"]["exp"]),
        )
    return LedgerEvent(
        stream_id=stream_id.decode() if isinstance(stream_id, bytes) else stream_id,
        shard=shard,
        event_id=text["event_id"],
        account_id=text.get("account_id", ""),
        seq=_seq(text["event_id"]),
        type=text["type"],
        occurred_at_ms=_int(text.get("at")),
        reservation_id=text.get("reservation_id", ""),
        operation=text.get("operation", ""),
        quantity=_int(text.get("quantity")),
        units=_int(text.get("units")),
        available_after=_int(text.get("available_after")),
        labels=labels if isinstance(labels, dict) else {},
        idempotency_key=text.get("idempotency_key", ""),
        detail=text,
        account_image=fields.get(b"_acct"),
        hold_images=hold_images,
        idempotency_image=idempotency_image,
    )
