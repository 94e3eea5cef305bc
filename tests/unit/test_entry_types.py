"""The one list of entry types against what the Lua scripts write."""

from __future__ import annotations

import re
from pathlib import Path

from tally.api.ledger_query import ENTRY_TYPES
from tally.domain.events import EntryType

LUA = Path(__file__).resolve().parents[2] / "src" / "tally" / "store" / "lua"

# A script names the type it writes as ENTRY.<NAME> (the prelude generated from EntryType)
_NAMED = re.compile(r"\bENTRY\.([A-Z_]+)\b")
# ...never as a bare string where a type goes: emit(ctx, '...'), `and '...' or '...'`
# as the emitted type, release_hold(..., '...') and set_price's XADD ... 'type', '...'
_BARE = [
    re.compile(r"emit\(ctx, [^,{\n]*'[a-z_]+'"),
    re.compile(r"release_hold\(ctx, hold, '[A-Z]+', '"),
    re.compile(r"'XADD', [^\n]*'type', '"),
]


def lua_sources() -> dict[str, str]:
    return {str(path.relative_to(LUA)): path.read_text() for path in LUA.rglob("*.lua")}


def test_every_type_a_script_writes_is_an_entry_type_and_filterable() -> None:
    """Proves the scripts name exactly the members of EntryType (each one written
    somewhere, none unknown), and that ListLedgerEntries accepts each as a filter."""
    named = {name for text in lua_sources().values() for name in _NAMED.findall(text)}
    assert "ALERT" in named and "PRICE_CHANGE" in named
    assert named == {t.name for t in EntryType}
    assert {t.value for t in EntryType} == ENTRY_TYPES


def test_no_script_writes_a_type_as_a_bare_string() -> None:
    """Proves no script spells an entry type itself (it would escape the check above)."""
    for path, text in lua_sources().items():
        for pattern in _BARE:
            assert not pattern.search(text), f"{path}: {pattern.search(text)}"
