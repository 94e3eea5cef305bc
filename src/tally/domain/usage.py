"""Net usage records, the one definition reports and recovery share.

A charge (commit, late commit, charge) adds its units, quantity and a count of
one in the hour it was charged; a refund takes its units back in the hour of
the charge it refunds (the scripts' usage counters follow the same rule).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace

from tally.domain.events import CHARGE_TYPES, Entry, EntryType

HOUR_MS = 3_600_000
# Usage the counters do not track by label set (past USAGE_LABEL_SETS_MAX in a
# period, or longer than USAGE_LABEL_SET_BYTES_MAX) is reported under this one
# label set: "*" is no label key a caller may send (api/validation.LABEL_KEY).
OTHER_LABEL = "*"
OTHER_LABELS = {OTHER_LABEL: OTHER_LABEL}


@dataclass(frozen=True)
class Usage:
    """Net usage of one (hour, account, operation, label set)."""

    bucket_ms: int
    account_id: str
    operation: str
    labels: dict[str, str]
    units: int
    quantity: int
    count: int


def from_entries(entries: Iterable[Entry]) -> list[Usage]:
    usages = []
    for entry in entries:
        if entry.type in CHARGE_TYPES:
            usages.append(Usage(entry.occurred_at_ms // HOUR_MS * HOUR_MS, entry.account_id,
                                entry.operation, entry.labels, entry.units, entry.quantity, 1))
        elif entry.type == EntryType.REFUND:
            charged_at = int(entry.detail.get("charged_at") or entry.occurred_at_ms)
            usages.append(Usage(charged_at // HOUR_MS * HOUR_MS, entry.account_id,
                                entry.operation, entry.labels, -entry.units, 0, 0))
    return usages


def net(usages: Iterable[Usage]) -> list[Usage]:
    """One record per (hour, account, operation, label set), summing those given."""
    sums: dict[tuple[int, str, str, tuple[tuple[str, str], ...]], Usage] = {}
    for usage in usages:
        key = (usage.bucket_ms, usage.account_id, usage.operation,
               tuple(sorted(usage.labels.items())))
        seen = sums.get(key)
        sums[key] = usage if seen is None else replace(
            seen, units=seen.units + usage.units, quantity=seen.quantity + usage.quantity,
            count=seen.count + usage.count,
        )
    return list(sums.values())
