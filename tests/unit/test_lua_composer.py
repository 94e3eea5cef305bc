"""The script composer: helpers resolved by their include lines, limits and key
names generated from Python. Generated text is checked by running it in a real
redis-server (EVAL, FUNCTION LOAD), not by reading it back."""

from __future__ import annotations

import re
from collections.abc import Iterator
from importlib import resources
from typing import Any

import msgpack
import pytest
import redis

from tally.domain import limits
from tally.domain.events import EntryType
from tally.domain.usage import HOUR_MS
from tally.store import keys, scripts
from tally.store.keys import KeySpace
from tally.store.layout import ShardLayout, TagScheme
from tally.store.scripts import LuaUnit
from tests.support import RedisProcess

LUA_KEYWORDS = frozenset({
    "and", "break", "do", "else", "elseif", "end", "false", "for", "function", "if", "in",
    "local", "nil", "not", "or", "repeat", "return", "then", "true", "until", "while",
})
LUA_BUILTINS = frozenset({
    "pairs", "ipairs", "type", "error", "pcall", "tonumber", "tostring", "next", "unpack",
    "select", "assert",
})
# String literals and comments, whichever starts first, so neither hides the other.
STRINGS_AND_COMMENTS = re.compile(r"'(?:\\.|[^'\\])*'|\"(?:\\.|[^\"\\])*\"|--[^\n]*")
CALL = re.compile(r"(?<![\w.:])([A-Za-z_]\w*)\s*\(")
DEFINITION = re.compile(r"\blocal\s+function\s+(\w+)")


def code_of(text: str) -> str:
    return STRINGS_AND_COMMENTS.sub(" ", text)


def functions_called(text: str) -> set[str]:
    return set(CALL.findall(code_of(text))) - LUA_KEYWORDS - LUA_BUILTINS


def functions_defined(text: str) -> list[str]:
    return DEFINITION.findall(code_of(text))


def all_helpers() -> dict[str, LuaUnit]:
    names = [scripts.KEYS_HELPER]
    for entry in resources.files("tally.store").joinpath("lua", "lib").iterdir():
        if entry.name.endswith(".lua"):
            names.append(entry.name.removesuffix(".lua"))
    return {name: scripts.read_helper(name) for name in names}


@pytest.fixture(scope="module")
def client(module_redis: RedisProcess) -> Iterator[redis.Redis]:
    connection = redis.Redis.from_url(module_redis.url)
    yield connection
    connection.close()


def test_prelude_holds_python_values(client: redis.Redis) -> None:
    """Proves every limit of domain/limits.py, the usage bucket and every entry type reach
    Lua with their Python values, by returning each one from a script that runs the
    generated prelude."""
    expected = {name: value for name, value in vars(limits).items() if name.isupper()}
    assert "UNITS_MAX" in expected and "TIMESTAMP_MS_MAX" in expected
    expected["HOUR_MS"] = HOUR_MS
    names = sorted(expected)
    probe = f"{scripts.prelude()}\nreturn {{{', '.join(names)}}}"
    values = client.eval(probe, 0)
    assert dict(zip(names, values, strict=True)) == expected
    entries = [entry.name for entry in EntryType]
    probe = f"{scripts.prelude()}\nreturn {{{', '.join(f'ENTRY.{n}' for n in entries)}}}"
    assert [value.decode() for value in client.eval(probe, 0)] == [e.value for e in EntryType]


@pytest.mark.parametrize(
    "layout",
    [ShardLayout(shards, scheme) for scheme in TagScheme for shards in (1, 16, 256, 4096)],
    ids=str,
)
def test_lua_key_builders_write_keyspace_names(client: redis.Redis, layout: ShardLayout) -> None:
    """Proves the generated Lua builders write exactly the names Python writes, for
    every name the scripts build themselves, by running them in Redis."""
    space = KeySpace(layout)
    account_id = "Team.a_b@example-1"
    operation = "image.generate.sdxl"
    shard = space.shard_of(account_id)
    sequence = 2**53 - 1  # as large as a Lua number holds exactly
    reservation_id = keys.RESERVATION_ID.format(
        tag=space.tag(shard), sequence=sequence, account_id=account_id
    )
    probe = (
        f"{scripts.keys_helper()}\n"
        "local tag, account_id, operation = ARGV[1], ARGV[2], ARGV[3]\n"
        "local sequence = tonumber(ARGV[4])\n"
        "local rid = reservation_id_for(tag, sequence, account_id)\n"
        "return {rid, price_version_field(operation, sequence)}"
    )
    args = (space.tag(shard), account_id, operation, sequence)
    built = client.eval(probe, 0, *args)
    assert [name.decode() for name in built] == [
        reservation_id,
        keys.PRICE_VERSION_FIELD.format(operation=operation, version=sequence),
    ]
    assert space.parse_reservation_id(reservation_id).account_id == account_id
    assert {t.name for t in keys.LUA_BUILT} == {
        "reservation_id_for", "price_version_field",
    }


@pytest.mark.parametrize("name", scripts.SCRIPT_NAMES)
def test_every_script_composes_with_each_helper_once(client: redis.Redis, name: str) -> None:
    """Proves each composed script opens with the limits, defines no function twice
    (so no helper came in twice), and loads in Redis as a library of one function named
    after the script and its version (FUNCTION LOAD, which also enforces Lua's limit of
    200 locals per function)."""
    script = scripts.compose(name)
    assert script.source.split("\n")[1:2] == ["-- limits: generated from tally/domain/limits.py"]
    defined = functions_defined(script.source)
    assert len(defined) == len(set(defined)), sorted({f for f in defined if defined.count(f) > 1})
    assert script.function == f"tally_{name}_{script.version[:scripts.VERSION_CHARS]}"
    assert client.function_load(script.source, replace=True) == script.function.encode()
    [library] = client.function_list(library=script.function)
    [function] = as_map(library)[b"functions"]
    assert as_map(function)[b"name"] == script.function.encode()
    assert (b"no-writes" in as_map(function)[b"flags"]) == script.read_only


def test_two_versions_of_a_script_run_side_by_side(
    client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Proves a changed script is another library and function (its name carries the
    version), so the servers of a rolling upgrade each load and call their own."""
    current = scripts.compose("billing_period")
    read = scripts.read_source
    monkeypatch.setattr(scripts, "read_source", lambda relative: read(relative) + (
        "\n-- the next version" if relative == "billing_period.lua" else ""))
    upgraded = scripts.compose("billing_period")
    assert upgraded.version != current.version and upgraded.function != current.function
    for script in (current, upgraded):
        client.function_load(script.source, replace=True)
    request = msgpack.packb({"now": 0, "year": 2026, "month": 2, "anchor_day": 31})
    replies = [client.fcall_ro(s.function, 0, request) for s in (current, upgraded)]
    assert replies[0] == replies[1]
    assert msgpack.unpackb(replies[0])["ok"] is True


def as_map(pairs: list[Any]) -> dict[Any, Any]:
    """A RESP2 reply of alternating names and values (FUNCTION LIST's) as a dict."""
    return dict(zip(pairs[::2], pairs[1::2], strict=True))


def test_include_lines_name_exactly_what_each_file_calls() -> None:
    """Proves every script's and helper's include line names exactly the helpers
    defining the functions it calls itself (nothing missing, nothing unused), and
    that each helper function is defined in one helper only."""
    helpers = all_helpers()
    owner: dict[str, str] = {}
    for helper, unit in helpers.items():
        for function in functions_defined(unit.text):
            assert function not in owner, f"{function} is defined in {owner[function]} and {helper}"
            owner[function] = helper
    units = {f"lib/{helper}.lua": unit for helper, unit in helpers.items()}
    for name in scripts.SCRIPT_NAMES:
        units[f"{name}.lua"] = scripts.parse_unit(name, scripts.read_source(f"{name}.lua"))
    for label, unit in units.items():
        called = functions_called(unit.text) - set(functions_defined(unit.text))
        unknown = {f for f in called if f not in owner}
        assert not unknown, f"{label} calls {sorted(unknown)}, which no helper defines"
        uses = {owner[f] for f in called}
        assert set(unit.includes) == uses, f"{label}: includes {unit.includes}, uses {uses}"
        assert len(unit.includes) == len(uses), f"{label} names a helper twice"


def fake_helpers(includes: dict[str, tuple[str, ...]]) -> scripts.HelperReader:
    def read(name: str) -> LuaUnit:
        if name not in includes:
            raise ValueError(f"unknown Lua helper {name!r}")
        return LuaUnit(text=f"-- {name}", flags=(), includes=includes[name])

    return read


def test_helpers_come_once_after_what_they_include() -> None:
    """Proves the resolution order: each helper once, after every helper it
    includes, however many paths lead to it."""
    read = fake_helpers({"a": ("b", "c"), "b": ("d",), "c": ("d",), "d": ()})
    assert list(scripts.resolve_helpers("s.lua", ["a", "d"], read)) == ["d", "b", "c", "a"]


def test_a_cycle_or_an_unknown_helper_fails_loudly() -> None:
    """Proves composing refuses helpers that include each other and names it refuses
    to guess at."""
    read = fake_helpers({"a": ("b",), "b": ("c",), "c": ("a",)})
    with pytest.raises(ValueError, match="a -> b -> c -> a"):
        scripts.resolve_helpers("s.lua", ["a"], read)
    with pytest.raises(ValueError, match="unknown Lua helper 'nope'"):
        scripts.resolve_helpers("s.lua", ["codec", "nope"])
