"""TallyClient (asyncio) against a real server: the same rules as the synchronous
client, through the async API."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc
import pytest
import pytest_asyncio

from tally_client import RetryPolicy, TallyClient, TallyRpcError
from tally_client.v1 import account_pb2_grpc

from .conftest import UPSCALE, new_account, set_budget
from .proxy import Proxy

FAST = RetryPolicy(backoff_initial_s=0.01, backoff_max_s=0.05)


@pytest_asyncio.fixture
async def tally(target: str, token: str) -> AsyncIterator[TallyClient]:
    async with TallyClient(target, token=token, timeout_s=10) as client:
        yield client


async def test_reserve_commit_partial_and_refund_move_units_exactly(
    tally: TallyClient, account: str
) -> None:
    """Proves a full commit, a partial commit and a refund, each figure to the unit."""
    full = await tally.reserve(account, UPSCALE, 2)
    await tally.commit(full.reservation_id)
    partial = await tally.reserve(account, UPSCALE, 3)
    part = await tally.commit(partial.reservation_id, 1)
    assert (part.units_charged, part.units_released) == (10, 20)
    refunded = await tally.refund((await tally.reserve(account, UPSCALE, 4)).reservation_id)
    assert refunded.units_refunded == 40
    balance = await tally.balance(account)
    assert (balance.available, balance.held, balance.period_consumed) == (4970, 0, 30)


async def test_hold_heartbeat_keeps_a_long_job_s_hold_alive(
    tally: TallyClient, account: str
) -> None:
    """Proves a 1 s hold outlives a 2.5 s job with its heartbeat; without it the Commit
    comes late, after the hold expired; an exception releases the hold."""
    async with tally.hold(account, UPSCALE, 1, ttl_s=1) as kept:
        await asyncio.sleep(2.5)
        kept.deliver(1)
    assert kept.committed is not None
    assert (kept.committed.units_charged, kept.committed.late) == (10, False)
    assert kept.heartbeat_error is None
    async with tally.hold(account, UPSCALE, 1, ttl_s=1, heartbeat=False) as expired:
        await asyncio.sleep(2.5)
    assert expired.committed is not None and expired.committed.late is True
    with pytest.raises(RuntimeError):
        async with tally.hold(account, UPSCALE, 7) as failed:
            raise RuntimeError("gpu fell over")
    assert failed.released is not None and failed.released.units_refunded == 70
    balance = await tally.balance(account)
    assert (balance.available, balance.held) == (4980, 0)


async def test_a_shortfall_carries_the_figures_and_the_budget(
    tally: TallyClient, accounts: account_pb2_grpc.AccountServiceStub
) -> None:
    """Proves RESOURCE_EXHAUSTED carries InsufficientUnits, budget_id included."""
    account = new_account(accounts, 100)
    with pytest.raises(TallyRpcError) as short:
        await tally.charge(account, UPSCALE, 11)
    assert (short.value.available, short.value.required, short.value.budget_id) == (
        100, 110, None)
    budget_id = set_budget(accounts, account, 30)
    with pytest.raises(TallyRpcError) as over_budget:
        async with tally.hold(account, UPSCALE, 4):
            pass
    assert over_budget.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert (over_budget.value.required, over_budget.value.budget_id) == (40, budget_id)


async def test_unavailable_is_retried_with_the_same_key_within_the_deadline(
    proxy: Proxy, token: str, account: str
) -> None:
    """Proves refused attempts are retried with one key and the units move once, and a
    lasting UNAVAILABLE is retried until the call's own deadline, not past it."""
    proxy.refuse = 6
    async with TallyClient(proxy.address, token=token, retry=FAST) as tally:
        grant = await tally.purchase(account, 500, reference="inv-1")
        purchases = proxy.keys("PurchaseUnits")
        assert len(purchases) == 7 and len(set(purchases)) == 1
        assert (grant.units_granted, (await tally.balance(account)).available) == (500, 5500)
    proxy.refuse_all = True
    patient = RetryPolicy(max_attempts=1000, backoff_initial_s=0.01, backoff_max_s=0.05)
    async with TallyClient(proxy.address, token=token, retry=patient) as tally:
        before = len(proxy.attempts)
        started = time.monotonic()
        with pytest.raises(TallyRpcError) as raised:
            await tally.balance(account, timeout_s=0.5)
        took = time.monotonic() - started
    assert raised.value.code in {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
    assert len(proxy.attempts) - before >= 2
    assert 0.5 - 0.1 < took < 0.5 + 0.5  # by the deadline (a margin for a busy machine)


async def test_deadline_per_call_and_round_robin(target: str, token: str, account: str) -> None:
    """Proves a call's own timeout_s reaches the server, and two servers share the calls."""
    with Proxy(target) as first, Proxy(target) as second:
        first.delay_s = 0.5
        async with TallyClient(
            [first.address, second.address], token=token, timeout_s=30
        ) as tally:
            for _ in range(6):
                await tally.balance(account, timeout_s=5)
            slow = [a.time_remaining_s for a in first.attempts]
            assert len(slow) > 0 and len(second.attempts) > 0
            # the call's 5 s, not the client's 30 s (gRPC rounds the deadline it sends up)
            assert all(r is not None and 0 < r < 6 for r in slow), slow
            with pytest.raises(TallyRpcError) as raised:
                for _ in range(4):  # round robin: some of these go through the slow one
                    await tally.balance(account, timeout_s=0.3)
    assert raised.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
