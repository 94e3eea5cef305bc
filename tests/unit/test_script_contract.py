"""The script contract (store/contract.py) and the Lua scripts' headers say the same
thing, fingerprints keep their bytes, and replies decode as typed."""

from __future__ import annotations

import dataclasses
import re

import pytest

from tally.store import contract
from tally.store.scripts import SCRIPT_NAMES, read_source

# A field list: `a, b (note), c = {x, y}`; a nested list is kept for its names.
Fields = dict[str, tuple[str, ...] | None]


def _top_level(text: str) -> list[str]:
    """`text` split at the commas outside braces and parentheses."""
    items, depth, current = [], 0, ""
    for ch in text:
        depth += ch in "{(" or -(ch in "})")
        if ch == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += ch
    return [*items, current]


def _braced(text: str) -> str:
    """The inside of the first {...} in text."""
    start = text.index("{")
    depth = 0
    for i in range(start, len(text)):
        depth += text[i] == "{" or -(text[i] == "}")
        if depth == 0:
            return text[start + 1 : i]
    raise ValueError(f"unbalanced braces in {text!r}")


def parse_fields(text: str) -> Fields:
    fields: Fields = {}
    for item in _top_level(text):
        item = re.sub(r"\([^()]*\)", "", item).strip()
        name, _, value = (part.strip() for part in item.partition("="))
        if not re.fullmatch(r"[a-z_]+", name):
            raise ValueError(f"{name!r} in {text!r} is not a field name")
        fields[name] = tuple(parse_fields(_braced(value))) if value.startswith("{") else None
    return fields


def header_entries(source: str) -> dict[str, str]:
    """The opening comment's `-- Label: text` entries, continuation lines joined."""
    entries: dict[str, str] = {}
    label = ""
    for line in source.splitlines():
        if line.startswith("--!"):
            continue
        if not line.startswith("--"):
            break
        text = line[2:]
        entry = re.match(r" ([A-Za-z][\w\[\] ()]*?): (.*)", text)
        if entry and not text.startswith("   "):
            label = entry.group(1)
            entries[label] = entry.group(2)
        elif label and text.startswith("   "):
            entries[label] += " " + text.strip()
        else:
            label = ""
    return entries


def names(cls: type) -> set[str]:
    return {field.name for field in dataclasses.fields(cls)}


def argv_names(request: type[contract.ScriptRequest[contract.Reply]]) -> set[str]:
    extra = {"fingerprint"} if issubclass(request, contract.IdempotentRequest) else set()
    return names(request.CONTEXT) | names(request) | extra


# Request fields that are maps of their own, listed in the header.
NESTED: dict[str, type] = {"set": contract.AccountChanges, "alerts": contract.AlertSettings}


@pytest.mark.parametrize("request_type", contract.REQUESTS, ids=lambda r: r.SCRIPT)
def test_script_header_matches_its_contract(
    request_type: type[contract.ScriptRequest[contract.Reply]],
) -> None:
    """Proves each script's header lists exactly the map keys its contract request sends
    (context included, nested maps too) and the keys its contract reply reads."""
    entries = header_entries(read_source(f"{request_type.SCRIPT}.lua"))
    argv = parse_fields(entries["ARGV[1] (msgpack)"])
    assert set(argv) == argv_names(request_type)
    for name, nested in argv.items():
        if nested is None:
            continue
        if issubclass(request_type, contract.BatchRequest) and name == "items":
            # an item: its single script's request, with the account it names
            item = request_type.ITEM
            assert set(nested) == (argv_names(item) - names(item.CONTEXT)) | {"account_id"}
        else:
            assert set(nested) == names(NESTED[name]), name
    replies = parse_fields(_braced(entries["Returns"]))
    assert set(replies) == names(request_type.REPLY)


def test_every_script_has_a_contract() -> None:
    """Proves the contract covers every script the store loads, each once."""
    assert sorted(r.SCRIPT for r in contract.REQUESTS) == sorted(SCRIPT_NAMES)


@pytest.mark.parametrize(
    ("label", "view"),
    [
        ("grant view", contract.GrantView),
        ("balance view", contract.BalanceView),
        ("account view", contract.AccountView),
        ("alert settings", contract.AlertSettings),
        ("budget view", contract.BudgetView),
    ],
)
def test_views_header_matches_the_contract(label: str, view: type) -> None:
    """Proves lib/views.lua's header lists exactly the fields of each view type."""
    entries = header_entries(read_source("lib/views.lua"))
    assert set(parse_fields(_braced(entries[label]))) == names(view)


LABELS = {"model": "x", "team": "a"}


@pytest.mark.parametrize(
    ("request_", "expected"),
    [
        (contract.ReserveRequest("acct-1", "image.upscale", 2, "k-1", LABELS, 0, 30_000),
         "a447161bd50ecce593c76851e3ca4183"),
        (contract.ChargeRequest("acct-1", "image.upscale", 2, "k-1", LABELS, 3),
         "4769801404dfba17416c433cf180962c"),
        (contract.RefundRequest("r-1", None, "retry", "k-2"), "e38c608c3a007bc445d53ad97a565b28"),
        (contract.RefundRequest("r-1", 5, "", "k-2"), "0d2f41b413a01331f2f260499a1bb06b"),
        (contract.PurchaseRequest("acct-1", 100, 0, "inv-7", "k-3"),
         "666305a411176a216bb491f16b0bee93"),
    ],
)
def test_fingerprints_keep_their_bytes(
    request_: contract.IdempotentRequest[contract.Reply], expected: str
) -> None:
    """Proves fingerprints are the bytes earlier releases stored (computed with the
    former validation.fingerprint), so stored idempotency records still match."""
    assert request_.fingerprint() == expected
    assert request_.argv_fields()["fingerprint"] == expected


def test_encoding_leaves_out_absent_fields_and_checks_the_context() -> None:
    """Proves None fields are left out of the map (the script's default applies), nested
    settings become maps, and a request given another script's context is refused."""
    context = contract.ScriptContext(now=5, account_id="a", prefix="p:", shard="{s00}",
                                     retention_ms=7)
    changes = contract.AccountChanges(monthly_allotment=10, alerts=contract.AlertSettings((50,)))
    encoded = contract.UpdateAccountRequest("a", changes).encode(context)
    assert encoded == {
        "now": 5, "account_id": "a", "prefix": "p:", "shard": "{s00}", "retention_ms": 7,
        "set": {"monthly_allotment": 10, "alerts": {"allotment_used_percent": (50,),
                                                    "balance_below": 0,
                                                    "overage_started": False}},
    }
    with pytest.raises(TypeError):
        contract.PurchaseRequest("a", 1, 0, "", "k").encode(context)


def test_reply_decoding_reads_lua_empty_tables() -> None:
    """Proves replies decode Lua's empty tables (packed as arrays) as empty maps."""
    account = contract.AccountView.decode({
        "account_id": "a", "monthly_allotment": 1, "overage_policy": "DENY",
        "overage_limit": 0, "labels": [], "auto_purchase_units": 0,
        "auto_purchase_threshold": 0, "billing_anchor_day": 3, "created_at": 1,
        "period_start": 1, "period_end": 2,
        "alerts": {"allotment_used_percent": [], "balance_below": 0, "overage_started": False},
        "budgets": [],
    })
    assert account.labels == {}
    assert account.budgets == ()
    assert account.alerts == contract.AlertSettings()
