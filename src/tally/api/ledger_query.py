"""ListLedgerEntries: validation, paging tokens and the ledger read."""

from __future__ import annotations

import base64
from dataclasses import dataclass

from tally.api import validation as v
from tally.domain.errors import InvalidArgument
from tally.domain.events import Entry, EntryType
from tally.domain.limits import LEDGER_PAGE_SIZE_MAX
from tally.ledger.ledger import Ledger
from tally_client.v1 import account_pb2

ENTRY_TYPES = frozenset(t.value for t in EntryType)
PAGE_SIZE_DEFAULT = 100
TOKEN_PREFIX = "seq:"


@dataclass(frozen=True)
class Query:
    account_id: str
    start_ms: int
    end_ms: int
    types: tuple[EntryType, ...]
    page_size: int
    after_seq: int


def token_after(seq: int) -> str:
    return base64.urlsafe_b64encode(f"{TOKEN_PREFIX}{seq}".encode()).decode()


def _after_seq(token: str) -> int:
    if not token:
        return 0
    try:
        text = base64.urlsafe_b64decode(token.encode()).decode()
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidArgument("page_token is not one this server issued",
                              field_name="page_token") from exc
    if not text.startswith(TOKEN_PREFIX) or not text[len(TOKEN_PREFIX):].isdigit():
        raise InvalidArgument("page_token is not one this server issued", field_name="page_token")
    return int(text[len(TOKEN_PREFIX):])


def parse(request: account_pb2.ListLedgerEntriesRequest) -> Query:
    if len(request.types) > len(ENTRY_TYPES):
        raise InvalidArgument(
            f"types may hold at most {len(ENTRY_TYPES)} entries (each entry type once)",
            field_name="types",
        )
    unknown = sorted(set(request.types) - ENTRY_TYPES)
    if unknown:
        raise InvalidArgument(
            f"types has unknown entry types {unknown}; known: {sorted(ENTRY_TYPES)}",
            field_name="types",
        )
    if not 0 <= request.page_size <= LEDGER_PAGE_SIZE_MAX:
        raise InvalidArgument(
            f"page_size must be between 1 and {LEDGER_PAGE_SIZE_MAX} (0: {PAGE_SIZE_DEFAULT})",
            field_name="page_size",
        )
    start_ms = v.timestamp_ms(request.start, "start") if request.HasField("start") else 0
    end_ms = v.timestamp_ms(request.end, "end") if request.HasField("end") else 0
    if start_ms and end_ms and end_ms <= start_ms:
        raise InvalidArgument("end must be after start", field_name="end")
    return Query(
        account_id=v.account_id(request.account_id),
        start_ms=start_ms,
        end_ms=end_ms,
        types=tuple(EntryType(t) for t in request.types),
        page_size=request.page_size or PAGE_SIZE_DEFAULT,
        after_seq=_after_seq(request.page_token),
    )


async def read(ledger: Ledger, query: Query) -> list[Entry]:
    """One page plus one row (to know whether another page follows)."""
    return await ledger.entries(
        query.account_id,
        start_ms=query.start_ms,
        end_ms=query.end_ms,
        types=query.types,
        after_seq=query.after_seq,
        limit=query.page_size + 1,
    )
