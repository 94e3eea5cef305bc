"""SyncTallyClient against a real server: the hot path to the unit, hold() with its
heartbeat, shortfalls, retries with one key, deadlines, round robin, the token."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import grpc
import pytest

from tally_client import RetryPolicy, SyncTallyClient, TallyRpcError
from tally_client.v1 import account_pb2_grpc

from .conftest import UPSCALE, new_account, set_budget
from .proxy import Proxy

FAST = RetryPolicy(backoff_initial_s=0.01, backoff_max_s=0.05)


@pytest.fixture
def tally(target: str, token: str) -> Iterator[SyncTallyClient]:
    with SyncTallyClient(target, token=token, timeout_s=10) as client:
        yield client


def test_reserve_commit_partial_and_refund_move_units_exactly(
    tally: SyncTallyClient, account: str
) -> None:
    """Proves a full commit, a partial commit and a refund, each figure to the unit."""
    full = tally.reserve(account, UPSCALE, 2)
    committed = tally.commit(full.reservation_id)
    assert (full.units, committed.units_charged, committed.units_released) == (20, 20, 0)
    partial = tally.reserve(account, UPSCALE, 3)
    part = tally.commit(partial.reservation_id, 1)
    assert (part.units_charged, part.units_released) == (10, 20)
    refunded = tally.refund(tally.reserve(account, UPSCALE, 4).reservation_id)
    assert refunded.units_refunded == 40
    balance = tally.balance(account)
    assert (balance.available, balance.held, balance.period_consumed) == (4970, 0, 30)


def test_hold_commits_what_was_delivered_and_releases_on_error(
    tally: SyncTallyClient, account: str
) -> None:
    """Proves hold() commits the delivered quantity, and an exception releases it all."""
    with tally.hold(account, UPSCALE, 5) as hold:
        assert tally.balance(account).held == 50
        hold.deliver(2)
    assert hold.committed is not None
    assert (hold.committed.units_charged, hold.committed.units_released) == (20, 30)
    with pytest.raises(RuntimeError, match="gpu"), tally.hold(account, UPSCALE, 7) as failed:
        raise RuntimeError("gpu fell over")
    assert failed.released is not None and failed.released.units_refunded == 70
    balance = tally.balance(account)
    assert (balance.available, balance.held) == (4980, 0)


def test_the_heartbeat_keeps_a_long_job_s_hold_alive(
    tally: SyncTallyClient, account: str
) -> None:
    """Proves a 1 s hold outlives a 2.5 s job with its heartbeat; without it the hold
    expires and its Commit is late (charged from what is available after the release)."""
    with tally.hold(account, UPSCALE, 1, ttl_s=1) as kept:
        time.sleep(2.5)
    assert kept.committed is not None
    assert (kept.committed.units_charged, kept.committed.late) == (10, False)
    assert kept.heartbeat_error is None
    with tally.hold(account, UPSCALE, 1, ttl_s=1, heartbeat=False) as expired:
        time.sleep(2.5)
    assert expired.committed is not None
    assert (expired.committed.units_charged, expired.committed.late) == (10, True)
    balance = tally.balance(account)
    assert (balance.available, balance.held) == (4980, 0)


def test_a_shortfall_carries_the_figures_and_the_budget(
    tally: SyncTallyClient, accounts: account_pb2_grpc.AccountServiceStub
) -> None:
    """Proves RESOURCE_EXHAUSTED carries InsufficientUnits: the balance's figures with no
    budget_id, then a budget's figures with its budget_id."""
    account = new_account(accounts, 100)
    with pytest.raises(TallyRpcError) as short:
        tally.reserve(account, UPSCALE, 11)
    error = short.value
    assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert (error.available, error.required, error.budget_id) == (100, 110, None)
    assert error.insufficient is not None and error.insufficient.account_id == account
    budget_id = set_budget(accounts, account, 30)
    with pytest.raises(TallyRpcError) as over_budget:
        tally.reserve(account, UPSCALE, 4)
    assert (over_budget.value.available, over_budget.value.required) == (30, 40)
    assert over_budget.value.budget_id == budget_id != ""


def test_unavailable_is_retried_with_the_same_key_and_applied_once(
    proxy: Proxy, token: str, account: str
) -> None:
    """Proves refused attempts and a lost reply are retried with one idempotency key,
    past what gRPC's own retries cover, and the units move once."""
    proxy.refuse = 6  # more than the service config's 4 attempts: the client loop retries
    with SyncTallyClient(proxy.address, token=token, retry=FAST) as tally:
        held = tally.reserve(account, UPSCALE, 3)
        proxy.lose_replies = 1
        charged = tally.charge(account, UPSCALE, 1)
        balance = tally.balance(account)
    reserves = proxy.keys("Reserve")
    assert len(reserves) == 7 and len(set(reserves)) == 1 and reserves[0]
    charges = proxy.keys("Charge")
    assert len(charges) == 2 and len(set(charges)) == 1
    assert (held.units, charged.units, charged.replayed) == (30, 10, True)
    assert (balance.available, balance.held) == (4960, 30)


def test_retries_never_run_past_the_call_s_deadline(proxy: Proxy, token: str) -> None:
    """Proves a lasting UNAVAILABLE is retried (beyond gRPC's own attempts) only while
    the deadline allows: the call raises by its deadline, not after max_attempts."""
    proxy.refuse_all = True
    patient = RetryPolicy(max_attempts=1000, backoff_initial_s=0.01, backoff_max_s=0.05)
    with SyncTallyClient(proxy.address, token=token, retry=patient) as tally:
        started = time.monotonic()
        with pytest.raises(TallyRpcError) as raised:
            tally.reserve("acct-x", UPSCALE, timeout_s=1.0)
        took = time.monotonic() - started
    # UNAVAILABLE from the client's loop; DEADLINE_EXCEEDED if gRPC's own retries ran out
    assert raised.value.code in {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
    assert len(proxy.attempts) > 4
    assert 1.0 - 0.1 < took < 1.0 + 0.5  # by the deadline (a margin for a busy machine)


def test_a_hold_is_entered_once(tally: SyncTallyClient, account: str) -> None:
    """Proves entering one hold object twice is refused (it would replay the first
    Reserve and charge the second job nothing)."""
    hold = tally.hold(account, UPSCALE, 1)
    with hold:
        pass
    with pytest.raises(RuntimeError, match="entered once"), hold:
        pass
    assert tally.balance(account).period_consumed == 10


def test_each_call_has_a_deadline_of_its_own(proxy: Proxy, token: str) -> None:
    """Proves timeout_s on a call overrides the client's and reaches the server."""
    proxy.delay_s = 1.0
    with SyncTallyClient(proxy.address, token=token, timeout_s=30) as tally, pytest.raises(
        TallyRpcError
    ) as raised:
        tally.balance("acct-x", timeout_s=0.3)
    assert raised.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    remaining = proxy.attempts[0].time_remaining_s
    # the call's 0.3 s, not the client's 30 s (gRPC rounds the deadline it sends up)
    assert remaining is not None and 0 < remaining < 1


def test_calls_are_spread_over_every_server(target: str, token: str, account: str) -> None:
    """Proves several addresses are balanced round robin: both servers answer calls."""
    with Proxy(target) as first, Proxy(target) as second, SyncTallyClient(
        [first.address, second.address], token=token
    ) as tally:
        for _ in range(20):
            tally.balance(account)
    assert len(first.attempts) > 0 and len(second.attempts) > 0
    assert len(first.attempts) + len(second.attempts) == 20


def test_the_client_is_shared_between_threads(tally: SyncTallyClient, account: str) -> None:
    """Proves one client serves many threads' holds, every unit accounted for."""
    def work() -> None:
        for _ in range(5):
            with tally.hold(account, UPSCALE, 1):
                pass

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    balance = tally.balance(account)
    assert (balance.available, balance.held, balance.period_consumed) == (4800, 0, 200)


def test_without_a_token_the_server_refuses(target: str, token: str, account: str) -> None:
    """Proves the token option is what authenticates (the server requires one)."""
    if not token:
        pytest.fail("this test needs TALLY_TEST_TOKEN and a server with --auth required")
    with SyncTallyClient(target) as anonymous, pytest.raises(TallyRpcError) as raised:
        anonymous.balance(account)
    assert raised.value.code == grpc.StatusCode.UNAUTHENTICATED
