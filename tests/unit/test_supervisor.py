"""The restart policy's arithmetic: backoff doubling between its bounds."""

from __future__ import annotations

import pytest

from tally.supervisor import BACKOFF_MAX_S, BACKOFF_MIN_S, RestartPolicy


def test_backoff_doubles_from_its_minimum_up_to_its_maximum() -> None:
    """Proves the wait before a restart starts at BACKOFF_MIN_S, doubles with each
    failure in a row, never exceeds BACKOFF_MAX_S, and stays bounded for any count."""
    policy = RestartPolicy(failures_max=5, stable_after_s=10.0)
    waits = [policy.backoff_s(failures) for failures in range(1, 10)]
    assert waits[:4] == [BACKOFF_MIN_S, 2 * BACKOFF_MIN_S, 4 * BACKOFF_MIN_S, 8 * BACKOFF_MIN_S]
    assert waits == sorted(waits)
    assert max(waits) == BACKOFF_MAX_S
    assert policy.backoff_s(10**9) == BACKOFF_MAX_S


@pytest.mark.parametrize(
    "fields",
    [
        {"failures_max": 0, "stable_after_s": 1.0},
        {"failures_max": 1, "stable_after_s": 0.0},
        {"failures_max": 1, "stable_after_s": 1.0, "backoff_min_s": 0.0},
        {"failures_max": 1, "stable_after_s": 1.0, "backoff_min_s": 2.0, "backoff_max_s": 1.0},
    ],
)
def test_a_policy_without_bounds_is_refused(fields: dict[str, float]) -> None:
    """Proves a restart policy that could restart without end or without waiting is a
    programmer error raised at construction."""
    with pytest.raises(ValueError, match="invalid restart policy"):
        RestartPolicy(**fields)  # type: ignore[arg-type]
