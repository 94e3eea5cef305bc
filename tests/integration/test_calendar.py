"""The Lua calendar (billing periods from a clock value) against Python's own."""

from __future__ import annotations

import calendar
from datetime import UTC, datetime

import redis
from hypothesis import given, settings
from hypothesis import strategies as st

from tally.store.scripts import read_source
from tests.support import RedisProcess

PROBE = """
local start_ms, end_ms = period_bounds(tonumber(ARGV[1]), tonumber(ARGV[2]))
return {start_ms, end_ms, day_of_month(tonumber(ARGV[1]))}
"""
LOW_MS = int(datetime(1971, 1, 1, tzinfo=UTC).timestamp() * 1000)
HIGH_MS = int(datetime(2199, 12, 31, tzinfo=UTC).timestamp() * 1000)


def reference(now_ms: int, anchor_day: int) -> tuple[int, int]:
    now = datetime.fromtimestamp(now_ms / 1000, UTC)

    def anchor(year: int, month: int) -> datetime:
        day = min(anchor_day, calendar.monthrange(year, month)[1])
        return datetime(year, month, day, tzinfo=UTC)

    def shift(year: int, month: int, by: int) -> tuple[int, int]:
        index = year * 12 + (month - 1) + by
        return index // 12, index % 12 + 1

    year, month = now.year, now.month
    if now < anchor(year, month):
        year, month = shift(year, month, -1)
    start = anchor(year, month)
    end = anchor(*shift(year, month, 1))
    return int(start.timestamp() * 1000), int(end.timestamp() * 1000)


@settings(max_examples=300, deadline=None)
@given(now_ms=st.integers(LOW_MS, HIGH_MS), anchor_day=st.integers(1, 31))
def test_lua_period_bounds_match_python(
    redis_server: RedisProcess, now_ms: int, anchor_day: int
) -> None:
    """Proves calendar.lua computes the same [start, end) billing period and day of
    month as Python's calendar for any instant and anchor day."""
    client = redis.Redis.from_url(redis_server.url)
    try:
        start_ms, end_ms, day = client.eval(
            read_source("lib/calendar.lua") + PROBE, 0, now_ms, anchor_day
        )
    finally:
        client.close()
    assert (start_ms, end_ms) == reference(now_ms, anchor_day)
    assert start_ms <= now_ms < end_ms
    assert day == datetime.fromtimestamp(now_ms / 1000, UTC).day
