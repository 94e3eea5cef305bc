"""Usage records on their way back into the counters: netted per counter, then cut
into restore_usage.lua calls."""

from __future__ import annotations

from tally.domain.limits import USAGE_RECORDS_PER_CALL_MAX
from tally.domain.usage import HOUR_MS, Usage, net
from tally.store.contract import RestoreUsageRequest, UsageRecord
from tally.store.usage_counters import restore_requests, usage_of


def test_net_sums_the_records_of_one_counter_only() -> None:
    """Proves net() adds up records of the same hour, account, operation and label set
    (label order aside) and keeps every other record apart."""
    usages = [
        Usage(0, "a", "op", {"x": "1", "y": "2"}, 10, 1, 1),
        Usage(0, "a", "op", {"y": "2", "x": "1"}, -4, 0, 0),
        Usage(HOUR_MS, "a", "op", {"x": "1", "y": "2"}, 5, 1, 1),
        Usage(0, "b", "op", {"x": "1", "y": "2"}, 7, 1, 1),
        Usage(0, "a", "other", {}, 3, 2, 1),
        Usage(0, "a", "op", {"x": "1"}, 2, 1, 1),
    ]
    assert net(usages) == [
        Usage(0, "a", "op", {"x": "1", "y": "2"}, 6, 1, 1),
        *usages[2:],
    ]


def test_restore_requests_cut_records_into_bounded_calls_the_first_replacing() -> None:
    """Proves a period's records go in calls of at most USAGE_RECORDS_PER_CALL_MAX, only
    the first one replacing the counters, and that no records still make one replacing
    call (so stale counters go)."""
    usages = [Usage(h * HOUR_MS, "a", "op", {}, 1, 1, 1)
              for h in range(USAGE_RECORDS_PER_CALL_MAX + 1)]
    requests = restore_requests(7, 99, usages)
    assert [(r.replace, len(r.records)) for r in requests] == [
        (True, USAGE_RECORDS_PER_CALL_MAX), (False, 1)
    ]
    assert {(r.period_start, r.period_end) for r in requests} == {(7, 99)}
    assert [usage_of("a", record) for r in requests for record in r.records] == usages
    assert restore_requests(7, 99, []) == [
        RestoreUsageRequest(period_start=7, replace=True, period_end=99, records=())
    ]


def test_usage_of_reads_no_labels_sent_as_an_empty_list() -> None:
    """Proves a record whose labels Lua's msgpack sent as an empty list (it cannot tell
    an empty map from one) reads as no labels."""
    record = {"bucket_ms": HOUR_MS, "operation": "op", "labels": [], "units": -3,
              "quantity": 0, "count": 0}
    assert usage_of("a", UsageRecord.decode(record)) == Usage(HOUR_MS, "a", "op", {}, -3, 0, 0)
