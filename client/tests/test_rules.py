"""The rules both clients share, without a server: keys, backoff, deadlines."""

from __future__ import annotations

import grpc
import pytest

from tally_client import RetryPolicy, SyncTallyClient, requests
from tally_client.retry import MIN_ATTEMPT_S


def test_a_release_key_is_distinct_for_distinct_keys_and_fits_the_limit() -> None:
    """Proves two long Reserve keys differing only at their end get different release
    keys, each within the server's 128 bytes, and a short key keeps its readable form."""
    first, second = "k" * 127 + "a", "k" * 127 + "b"
    released = {requests.release_key(first), requests.release_key(second)}
    assert len(released) == 2
    assert all(len(key.encode()) <= requests.IDEMPOTENCY_KEY_BYTES_MAX for key in released)
    assert requests.release_key("job-7") == "release-job-7"


def test_only_unavailable_is_retried_and_never_past_the_deadline() -> None:
    """Proves the policy retries UNAVAILABLE alone, stops at max_attempts, and never
    plans a pause that leaves less than one attempt's time before the deadline."""
    policy = RetryPolicy(max_attempts=3, backoff_initial_s=0.1, backoff_max_s=0.4)
    for code in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED):
        assert policy.pause_before_retry(code, 1, now=0.0, deadline=10.0) is None
    pause = policy.pause_before_retry(grpc.StatusCode.UNAVAILABLE, 1, now=0.0, deadline=10.0)
    assert pause is not None and 0.05 <= pause <= 0.1
    assert policy.pause_before_retry(grpc.StatusCode.UNAVAILABLE, 3, 0.0, 10.0) is None
    # the shortest pause (half the first backoff) leaves no time for an attempt
    assert policy.pause_before_retry(
        grpc.StatusCode.UNAVAILABLE, 1, now=0.0, deadline=0.05 + MIN_ATTEMPT_S
    ) is None
    for retry in range(10):
        assert policy.backoff_s(retry) <= 0.4


def test_bad_settings_are_refused() -> None:
    """Proves a policy or a timeout that cannot work is refused when made."""
    with pytest.raises(ValueError):
        RetryPolicy(max_attempts=0)
    with pytest.raises(ValueError):
        RetryPolicy(backoff_initial_s=1.0, backoff_max_s=0.5)
    with pytest.raises(ValueError, match="timeout_s"):
        SyncTallyClient("127.0.0.1:1", timeout_s=0)
    with SyncTallyClient("127.0.0.1:1") as tally, pytest.raises(ValueError, match="timeout_s"):
        tally.balance("acct-x", timeout_s=0)
