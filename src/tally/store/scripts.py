"""Loads the Lua scripts: one file per operation, shared helpers composed in.

A script's header may carry two directives:
    --! flags: no-writes          -> the `#!lua flags=...` shebang line
    --! include: codec account    -> lib/<name>.lua prepended, in that order
The composed text is what Redis runs; its SHA1 is what EVALSHA names.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources

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
    "balance",
    "quote",
    "set_price",
    "apply_price",
    "set_budget",
    "delete_budget",
)


@dataclass(frozen=True)
class LuaScript:
    name: str
    source: str
    sha: str
    read_only: bool


def read_source(relative: str) -> str:
    """The text of a Lua file under store/lua/ (a script or lib/<helper>.lua)."""
    return resources.files("tally.store").joinpath("lua", relative).read_text(encoding="utf-8")


def compose(name: str) -> LuaScript:
    body = read_source(f"{name}.lua")
    flags: list[str] = []
    includes: list[str] = []
    for line in body.splitlines():
        if not line.startswith("--!"):
            break
        directive, _, value = line[3:].partition(":")
        if directive.strip() == "flags":
            flags.extend(value.split())
        elif directive.strip() == "include":
            includes.extend(value.split())
        else:
            raise ValueError(f"{name}.lua: unknown directive {line!r}")
    shebang = "#!lua flags=" + ",".join(flags) if flags else "#!lua"
    parts = [shebang, *(read_source(f"lib/{lib}.lua") for lib in includes), body]
    source = "\n".join(parts)
    sha = hashlib.sha1(source.encode()).hexdigest()
    return LuaScript(name=name, source=source, sha=sha, read_only="no-writes" in flags)


def load_all() -> dict[str, LuaScript]:
    return {name: compose(name) for name in SCRIPT_NAMES}
