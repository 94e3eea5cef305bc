"""The one list of entry types against what the Lua scripts write."""

from __future__ import annotations

import re
from pathlib import Path

from tally.api.ledger_query import ENTRY_TYPES
from tally.domain.events import EntryType

LUA = Path(__file__).resolve().parents[2] / "src" / "tally" / "store" / "lua"

# every entry type a script names: emit(ctx, 'x' ...), `... and 'x' or 'y'` as the
# emitted type, release_hold(..., 'x'), and set_price's XADD ... 'type', 'x'
_WRITTEN = [
    re.compile(r"emit\(ctx, '([a-z_]+)'"),
    re.compile(r"emit\(ctx, [^,]* and '([a-z_]+)' or '([a-z_]+)'"),
    re.compile(r"release_hold\(ctx, hold, '[A-Z]+', '([a-z_]+)'\)"),
    re.compile(r"'XADD', [^\n]*'type', '([a-z_]+)'"),
]


def written_types() -> set[str]:
    found: set[str] = set()
    for path in LUA.rglob("*.lua"):
        text = path.read_text()
        for pattern in _WRITTEN:
            for match in pattern.finditer(text):
                found.update(group for group in match.groups() if group)
    return found


def test_every_type_a_script_writes_is_an_entry_type_and_filterable() -> None:
    """Proves EntryType lists exactly the types the scripts write, and that
    ListLedgerEntries accepts each of them as a filter."""
    written = written_types()
    assert "alert" in written and "price_change" in written
    assert written == {t.value for t in EntryType}
    assert written == ENTRY_TYPES
