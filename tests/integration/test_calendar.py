"""The Lua calendar (billing periods from a clock value) against Python's own."""

from __future__ import annotations

import calendar
from datetime import UTC, datetime

import redis
from hypothesis import given, settings
from hypothesis import strategies as st

from tally.domain.limits import PERIOD_YEAR_MAX, PERIOD_YEAR_MIN, TIMESTAMP_MS_MAX
from tally.store.scripts import read_source
from tests.support import RedisProcess

STARTING_IN_PROBE = """
return {period_starting_in(tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]))}
"""
PROBE = """
local start_ms, end_ms = period_bounds(tonumber(ARGV[1]), tonumber(ARGV[2]))
return {start_ms, end_ms, day_of_month(tonumber(ARGV[1]))}
"""
LOW_MS = int(datetime(1971, 1, 1, tzinfo=UTC).timestamp() * 1000)
HIGH_MS = int(datetime(2199, 12, 31, tzinfo=UTC).timestamp() * 1000)


def anchor(year: int, month: int, anchor_day: int) -> datetime:
    day = min(anchor_day, calendar.monthrange(year, month)[1])
    return datetime(year, month, day, tzinfo=UTC)


def shift(year: int, month: int, by: int) -> tuple[int, int]:
    index = year * 12 + (month - 1) + by
    return index // 12, index % 12 + 1


def starting_in(year: int, month: int, anchor_day: int) -> tuple[int, int]:
    start = anchor(year, month, anchor_day)
    end = anchor(*shift(year, month, 1), anchor_day)
    return int(start.timestamp() * 1000), int(end.timestamp() * 1000)


def reference(now_ms: int, anchor_day: int) -> tuple[int, int]:
    now = datetime.fromtimestamp(now_ms / 1000, UTC)
    year, month = now.year, now.month
    if now < anchor(year, month, anchor_day):
        year, month = shift(year, month, -1)
    return starting_in(year, month, anchor_day)


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


@settings(max_examples=300, deadline=None)
@given(year=st.integers(PERIOD_YEAR_MIN, PERIOD_YEAR_MAX), month=st.integers(1, 12),
       anchor_day=st.integers(1, 31))
def test_lua_period_starting_in_a_month_matches_python(
    redis_server: RedisProcess, year: int, month: int, anchor_day: int
) -> None:
    """Proves calendar.lua's period starting in a month (GetUsageReport's `period`)
    is the [start, end) Python's calendar gives, for every supported year and anchor
    day, and ends before the largest timestamp."""
    client = redis.Redis.from_url(redis_server.url)
    try:
        start_ms, end_ms = client.eval(
            read_source("lib/calendar.lua") + STARTING_IN_PROBE, 0, year, month, anchor_day
        )
    finally:
        client.close()
    assert (start_ms, end_ms) == starting_in(year, month, anchor_day)
    assert 0 <= start_ms < end_ms <= TIMESTAMP_MS_MAX
