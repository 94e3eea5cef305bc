"""Loads the Lua scripts: one file per operation, shared helpers composed in.

A script's header may carry two directives:
    --! flags: no-writes          -> the flags the function is registered with
    --! include: codec grants     -> the helpers the script uses directly
A helper (lib/<name>.lua) names the helpers it uses with its own include line.
The composer resolves includes transitively and puts each helper in once,
every helper after those it depends on; a cycle or an unknown name is an error.

Two pieces are generated here rather than written by hand, so that a fact
Python owns is never copied into Lua:
    prelude   opens every script, included or not: `local NAME = value` for
              every limit of domain/limits.py, HOUR_MS (the usage bucket of
              domain/usage.py), USAGE_OTHER_LABEL and `ENTRY`, the entry types of
              domain/events.py (`emit(ctx, ENTRY.RESERVE, ...)`)
    keys      the builders of the names the scripts write themselves,
              from store/keys.py's templates (keys.LUA_BUILT)
The composed text is a Redis Functions library holding one function, the
script: FUNCTION LOAD defines the prelude and the helpers once per load, where
EVAL would define them again on every call (a sixth of a Reserve's instructions).
The script runs as it would under EVAL: KEYS and ARGV are the call's keys and
arguments. Library and function are named after the script and the SHA1 of
what they run (its version), so servers of two versions run side by side
during a rolling upgrade, each calling its own.
"""

from __future__ import annotations

import hashlib
import string
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib import resources

from tally.domain import limits
from tally.domain.events import EntryType
from tally.domain.usage import HOUR_MS, OTHER_LABEL
from tally.store import keys

SCRIPT_NAMES = (
    "create_account",
    "update_account",
    "purchase",
    "reserve",
    "charge",
    "commit",
    "refund",
    "extend",
    "expire_hold",
    "close_period",
    "restore_hold",
    "balance",
    "quote",
    "set_price",
    "apply_price",
    "set_budget",
    "delete_budget",
    "read_usage",
    "restore_usage",
    "billing_period",
    "reserve_batch",
    "commit_batch",
    "refund_batch",
    "lease_acquire",
    "lease_release",
    "lease_heartbeat",
)

KEYS_HELPER = "keys"


@dataclass(frozen=True)
class LuaScript:
    """A script as a Functions library: `source` is what FUNCTION LOAD takes,
    `function` what FCALL (FCALL_RO when read_only) names, and the library's
    name too; `version` is the SHA1 of the code it runs."""

    name: str
    source: str
    version: str
    function: str
    read_only: bool


@dataclass(frozen=True)
class LuaUnit:
    """A script or a helper: its text and what its header directives say."""

    text: str
    flags: tuple[str, ...]
    includes: tuple[str, ...]


def read_source(relative: str) -> str:
    """The text of a Lua file under store/lua/ (a script or lib/<helper>.lua)."""
    return resources.files("tally.store").joinpath("lua", relative).read_text(encoding="utf-8")


def parse_unit(label: str, text: str) -> LuaUnit:
    """Reads the `--!` directives that open a script or helper."""
    flags: list[str] = []
    includes: list[str] = []
    for line in text.splitlines():
        if not line.startswith("--!"):
            break
        directive, _, value = line[3:].partition(":")
        if directive.strip() == "flags":
            flags.extend(value.split())
        elif directive.strip() == "include":
            includes.extend(value.split())
        else:
            raise ValueError(f"{label}: unknown directive {line!r}")
    return LuaUnit(text=text, flags=tuple(flags), includes=tuple(includes))


def prelude() -> str:
    """What opens every script: the limits, the usage bucket and the entry types."""
    lines = ["-- limits: generated from tally/domain/limits.py"]
    for name, value in vars(limits).items():
        if name.isupper():
            if type(value) is not int or abs(value) > limits.UNITS_MAX:
                raise TypeError(f"limits.{name} must be an integer Lua holds exactly")
            lines.append(f"local {name} = {value}")
    lines.append("-- the usage counters' bucket: generated from tally/domain/usage.py")
    lines.append(f"local HOUR_MS = {HOUR_MS}")
    lines.append(f"local USAGE_OTHER_LABEL = {lua_string(OTHER_LABEL)}")
    lines.append("-- entry types: generated from tally/domain/events.py")
    entries = ", ".join(f"{entry.name} = {lua_string(entry.value)}" for entry in EntryType)
    lines.append(f"local ENTRY = {{{entries}}}")
    return "\n".join(lines)


def lua_string(text: str) -> str:
    if any(ch in text for ch in "'\\\n\r\0"):
        raise ValueError(f"{text!r} needs escaping in a Lua string; key names never do")
    return f"'{text}'"


def lua_builder(template: keys.NameTemplate) -> str:
    """A Lua function writing the names `template` describes, as Python would."""
    params: list[str] = []
    parts: list[str] = []
    for literal, field, spec, conversion in string.Formatter().parse(template.pattern):
        if literal:
            parts.append(lua_string(literal))
        if field is None:
            continue
        if conversion or spec not in ("", "d") or not field.isidentifier():
            raise ValueError(f"{template.name}: field {field!r} has an unsupported format")
        params.append(field)
        # Integers are formatted as %d: Lua's own number-to-text rounds to 14 digits.
        parts.append(f"string.format('%d', {field})" if spec == "d" else field)
    body = " .. ".join(parts)
    return f"local function {template.name}({', '.join(params)})\n  return {body}\nend"


def keys_helper() -> str:
    builders = (lua_builder(template) for template in keys.LUA_BUILT)
    return "\n".join(["-- keys: generated from tally/store/keys.py", *builders])


def read_helper(name: str) -> LuaUnit:
    if name == KEYS_HELPER:
        return LuaUnit(text=keys_helper(), flags=(), includes=())
    try:
        text = read_source(f"lib/{name}.lua")
    except FileNotFoundError:
        raise ValueError(f"unknown Lua helper {name!r} (no lib/{name}.lua)") from None
    unit = parse_unit(f"lib/{name}.lua", text)
    if unit.flags:
        raise ValueError(f"lib/{name}.lua: flags belong to scripts, not helpers")
    return unit


HelperReader = Callable[[str], LuaUnit]


def resolve_helpers(
    label: str, includes: Iterable[str], read: HelperReader = read_helper
) -> dict[str, LuaUnit]:
    """The helpers `includes` need, each once, every one after its own includes."""
    resolved: dict[str, LuaUnit] = {}
    resolving: list[str] = []

    def visit(name: str) -> None:
        if name in resolved:
            return
        if name in resolving:
            cycle = " -> ".join([*resolving[resolving.index(name) :], name])
            raise ValueError(f"{label}: Lua helpers include each other: {cycle}")
        resolving.append(name)
        unit = read(name)
        for dependency in unit.includes:
            visit(dependency)
        resolving.pop()
        resolved[name] = unit

    for name in includes:
        visit(name)
    return resolved


# Characters of the version in library and function names.
VERSION_CHARS = 16


def compose(name: str) -> LuaScript:
    script = parse_unit(f"{name}.lua", read_source(f"{name}.lua"))
    helpers = resolve_helpers(f"{name}.lua", script.includes)
    flags = ", ".join(lua_string(flag) for flag in script.flags)
    code = "\n".join([
        prelude(),
        "-- a call's keys and arguments, read by the script and helpers as under EVAL",
        "local KEYS, ARGV",
        *(unit.text for unit in helpers.values()),
        "local function script()",
        script.text,
        "end",
    ])
    version = hashlib.sha1(f"{flags}\n{code}".encode()).hexdigest()
    function = f"tally_{name}_{version[:VERSION_CHARS]}"
    register = (
        f"redis.register_function{{function_name = {lua_string(function)},\n"
        "  callback = function(keys, args) KEYS, ARGV = keys, args; return script() end,\n"
        f"  flags = {{{flags}}}}}"
    )
    source = "\n".join([f"#!lua name={function}", code, register])
    return LuaScript(name=name, source=source, version=version, function=function,
                     read_only="no-writes" in script.flags)


def load_all() -> dict[str, LuaScript]:
    return {name: compose(name) for name in SCRIPT_NAMES}
