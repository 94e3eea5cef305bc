"""Watch positions: what a client sends back to resume a watch.

One account: the account's event number n (event ids are `<account>/<n>`), as
decimal text. Every account: an opaque token, per shard the id of the last
stream entry delivered and its number in the stream's history; zlib-compressed
JSON of [ms, seq, number] per shard, base64url, after a version prefix.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import zlib
from collections.abc import Sequence

from tally.api.watch.reader import Cursor
from tally.domain.errors import InvalidArgument
from tally.domain.events import stream_id_order

MAX_SEQ = 2**53 - 1
TOKEN_PREFIX = "v1."
TOKEN_CHARS_MAX = 256 * 1024

_SEQ_TEXT = re.compile(r"[0-9]{1,16}")


def account_position(text: str) -> int | None:
    if not text:
        return None
    if not _SEQ_TEXT.fullmatch(text) or int(text) > MAX_SEQ:
        raise InvalidArgument(
            "after_position must be an event number of the account (decimal, as sent in "
            "UsageEvent.position), or empty for from now",
            field_name="after_position",
        )
    return int(text)


def encode_token(cursors: Sequence[Cursor]) -> str:
    """An all-accounts position: zlib-compressed JSON of [ms, seq, number] per shard."""
    packed = [[*stream_id_order(c.id), c.number] for c in cursors]
    raw = zlib.compress(json.dumps(packed, separators=(",", ":")).encode(), 6)
    return TOKEN_PREFIX + base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_token(text: str, shards: int) -> list[Cursor]:
    bad = InvalidArgument(
        "after_position is not a position of the all-accounts watch of this deployment "
        "(pass a UsageEvent.position it sent, or empty for from now)",
        field_name="after_position",
    )
    if not text.startswith(TOKEN_PREFIX) or len(text) > TOKEN_CHARS_MAX:
        raise bad
    body = text[len(TOKEN_PREFIX):]
    try:
        raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        inflater = zlib.decompressobj()
        data = inflater.decompress(raw, 80 * shards + 64)
        if inflater.unconsumed_tail:
            raise bad
        packed = json.loads(data)
    except (binascii.Error, zlib.error, ValueError):
        raise bad from None
    if not isinstance(packed, list) or len(packed) != shards:
        raise bad
    cursors = []
    for item in packed:
        if (
            not isinstance(item, list)
            or len(item) != 3
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in item)
            or not all(0 <= v < 2**64 for v in item)
        ):
            raise bad
        ms, seq, number = item
        cursors.append(Cursor(f"{ms}-{seq}", number))
    return cursors
