"""Plain-text tables and JSON for the admin commands (no third-party library).

Without `--json` an answer is an aligned plain-text table; with it, one JSON
object on stdout.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

_INT64_TYPES = frozenset(
    {
        FieldDescriptor.TYPE_INT64,
        FieldDescriptor.TYPE_UINT64,
        FieldDescriptor.TYPE_SINT64,
        FieldDescriptor.TYPE_FIXED64,
        FieldDescriptor.TYPE_SFIXED64,
    }
)
_WELL_KNOWN_JSON = frozenset(
    {
        "google.protobuf.Timestamp",
        "google.protobuf.Duration",
        "google.protobuf.Struct",
        "google.protobuf.Value",
        "google.protobuf.Any",
        "google.protobuf.FieldMask",
    }
)


def iso(ts: Timestamp, unset: str = "-") -> str:
    """A Timestamp as ISO 8601 UTC (`2026-11-25T12:00:00Z`); `unset` when it is zero."""
    if ts.seconds == 0 and ts.nanos == 0:
        return unset
    moment = datetime.fromtimestamp(ts.seconds, tz=UTC).replace(microsecond=ts.nanos // 1000)
    text = moment.isoformat(timespec="milliseconds" if ts.nanos else "seconds")
    return text.replace("+00:00", "Z")


def _normalize(descriptor: Any, value: dict[str, Any]) -> dict[str, Any]:
    """Proto3 JSON writes int64 as strings and leaves unset message fields out;
    scripts want numbers and a stable shape. Walk the descriptor (a Descriptor,
    pure-Python or upb): every 64-bit integer becomes an int, an unset field
    becomes null, and the keys follow the proto's field order."""
    result: dict[str, Any] = {}
    for field in descriptor.fields:
        if field.name not in value:
            result[field.name] = None
            continue
        item = value[field.name]
        message_type = field.message_type
        if message_type is not None and message_type.GetOptions().map_entry:
            value_field = message_type.fields_by_name["value"]
            if value_field.type in _INT64_TYPES:
                item = {k: int(v) for k, v in item.items()}
            elif value_field.message_type is not None and (
                value_field.message_type.full_name not in _WELL_KNOWN_JSON
            ):
                item = {k: _normalize(value_field.message_type, v) for k, v in item.items()}
        elif field.type in _INT64_TYPES:
            item = [int(v) for v in item] if isinstance(item, list) else int(item)
        elif message_type is not None and message_type.full_name not in _WELL_KNOWN_JSON:
            item = (
                [_normalize(message_type, v) for v in item]
                if isinstance(item, list)
                else _normalize(message_type, item)
            )
        result[field.name] = item
    return result


def message_dict(message: Message) -> dict[str, Any]:
    """A message as a JSON-ready dict: proto field names in proto order, every
    field present (unset ones as null), enums by name, timestamps as RFC 3339
    UTC and 64-bit integers as numbers."""
    value = json_format.MessageToDict(
        message,
        preserving_proto_field_name=True,
        always_print_fields_with_no_presence=True,
    )
    return _normalize(message.DESCRIPTOR, value)


def dumps(value: Mapping[str, Any]) -> str:
    return json.dumps(value, indent=2, sort_keys=False)


def emit(
    args: argparse.Namespace, as_json: Mapping[str, Any], as_text: Callable[[], str]
) -> None:
    """Prints one answer: as JSON with --json, else the text `as_text` makes."""
    print(dumps(as_json) if args.json else as_text())


def _is_number(cell: str) -> bool:
    return cell.lstrip("-").isdigit()


def table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """Columns aligned with two spaces between them; all-number columns align right."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    numeric = [
        bool(cells) and all(_is_number(row[i]) for row in cells) for i in range(len(headers))
    ]

    def line(row: Sequence[str]) -> str:
        parts = [
            cell.rjust(widths[i]) if numeric[i] else cell.ljust(widths[i])
            for i, cell in enumerate(row)
        ]
        return "  ".join(parts).rstrip()

    return "\n".join([line(list(headers)), *(line(row) for row in cells)])


def fields(pairs: Iterable[tuple[str, object]]) -> str:
    """A two-column `name  value` listing for one object."""
    items = [(name, str(value)) for name, value in pairs]
    width = max((len(name) for name, _ in items), default=0)
    return "\n".join(f"{name.ljust(width)}  {value}".rstrip() for name, value in items)


def labels(value: Mapping[str, str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(value.items())) or "-"
