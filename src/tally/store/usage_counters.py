"""The usage counters the scripts keep per account and billing period.

A counter hash (KeySpace.usage) has one field per kind, hour, operation and
label set: `<u|q|c>|<hour ms>|<operation>|<labels as sorted JSON pairs>`
(u: units, q: quantity, c: count), written by the scripts and rebuilt by
recovery from the ledger.
"""

from __future__ import annotations

import json

from tally.domain.usage import Usage


def counter_fields(usage: Usage) -> dict[str, int]:
    """The counter increments one net usage record makes (zero ones left out)."""
    pairs = sorted(usage.labels.items())
    signature = json.dumps([list(p) for p in pairs], separators=(",", ":")) if pairs else ""
    suffix = f"{usage.bucket_ms}|{usage.operation}|{signature}"
    fields = {f"u|{suffix}": usage.units}
    if usage.quantity:
        fields[f"q|{suffix}"] = usage.quantity
    if usage.count:
        fields[f"c|{suffix}"] = usage.count
    return fields


def usages_of(account_id: str, counters: dict[str, int]) -> list[Usage]:
    """The usage records a counter hash holds (field -> value)."""
    merged: dict[tuple[int, str, str], dict[str, int]] = {}
    for field, value in counters.items():
        kind, bucket_text, operation, signature = field.split("|", 3)
        merged.setdefault((int(bucket_text), operation, signature), {})[kind] = value
    usages = []
    for (bucket_ms, operation, signature), values in merged.items():
        labels = {k: val for k, val in json.loads(signature)} if signature else {}
        usages.append(Usage(bucket_ms, account_id, operation, labels, values.get("u", 0),
                            values.get("q", 0), values.get("c", 0)))
    return usages
