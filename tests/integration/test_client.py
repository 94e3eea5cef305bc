"""tally_client.TallyClient against a real authority: retries, hold(), errors."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import pytest
import pytest_asyncio

from tally_client import RetryPolicy, TallyClient, TallyRpcError
from tally_client.v1 import account_pb2, account_pb2_grpc, common_pb2, quota_pb2, quota_pb2_grpc
from tests.support import Running, unique

UPSCALE = "image.upscale"  # 10 units per quantity in the default catalog


class FlakyNetwork(grpc.aio.UnaryUnaryClientInterceptor):
    """Records every attempt's idempotency key and fails chosen attempts.

    `lose_replies` attempts reach the server, which does the work, but the
    caller sees UNAVAILABLE (a reply lost on the way back). `drop_requests`
    attempts never leave the client. `fail_with` fails every attempt with
    that code, before sending.
    """

    def __init__(
        self,
        *,
        lose_replies: int = 0,
        drop_requests: int = 0,
        fail_with: grpc.StatusCode | None = None,
    ) -> None:
        self.lose_replies = lose_replies
        self.drop_requests = drop_requests
        self.fail_with = fail_with
        self.attempts: list[tuple[str, str]] = []

    async def intercept_unary_unary(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Any], Awaitable[Any]],
        client_call_details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        method = client_call_details.method
        name = method.decode() if isinstance(method, bytes) else method
        self.attempts.append((name.rsplit("/", 1)[-1], getattr(request, "idempotency_key", "")))
        if self.fail_with is not None:
            raise grpc.aio.AioRpcError(self.fail_with, None, None, details="injected")
        if self.drop_requests:
            self.drop_requests -= 1
            raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, None, None, "injected drop")
        call = await continuation(client_call_details, request)
        if self.lose_replies:
            self.lose_replies -= 1
            await call  # the server did the work ...
            raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, None, None, "reply lost")
        return call


async def _account(running: Running, allotment: int = 5000) -> str:
    account_id = unique("client")
    accounts = account_pb2_grpc.AccountServiceStub(running.stubs.channel)  # the typed aio stub
    await accounts.CreateAccount(
        account_pb2.CreateAccountRequest(account_id=account_id, monthly_allotment=allotment)
    )
    return account_id


@pytest_asyncio.fixture
async def client(running: Running) -> AsyncIterator[TallyClient]:
    async with TallyClient(running.authority.address, timeout_s=5.0) as tally:
        yield tally


async def test_lost_reply_is_retried_with_the_same_key_and_moves_units_once(
    running: Running,
) -> None:
    """Proves a retried Reserve reuses its idempotency key, so a lost reply costs no double hold."""
    account_id = await _account(running)
    network = FlakyNetwork(lose_replies=1)
    async with TallyClient(
        running.authority.address, interceptors=[network], retry=RetryPolicy(backoff_initial_s=0.01)
    ) as tally:
        held = await tally.reserve(account_id, UPSCALE, 3)
        balance = await tally.balance(account_id)
    reserves = [key for method, key in network.attempts if method == "Reserve"]
    assert len(reserves) == 2
    assert reserves[0] == reserves[1] != ""
    assert held.replayed is True
    assert held.units == 30
    assert (balance.available, balance.held) == (4970, 30)


async def test_dropped_request_is_retried_with_the_same_key(running: Running) -> None:
    """Proves Purchase and Charge retry UNAVAILABLE with one key per call and apply once."""
    account_id = await _account(running)
    network = FlakyNetwork(drop_requests=2)
    async with TallyClient(
        running.authority.address, interceptors=[network], retry=RetryPolicy(backoff_initial_s=0.01)
    ) as tally:
        grant = await tally.purchase(account_id, 1000, reference="inv-1")
        network.lose_replies = 1
        charged = await tally.charge(account_id, UPSCALE, 2, labels={"model": "m1"})
        balance = await tally.balance(account_id)
    purchases = [key for method, key in network.attempts if method == "PurchaseUnits"]
    charges = [key for method, key in network.attempts if method == "Charge"]
    assert len(purchases) == 3 and len(set(purchases)) == 1
    assert len(charges) == 2 and len(set(charges)) == 1
    assert purchases[0] != charges[0]
    assert (grant.units_granted, grant.reference) == (1000, "inv-1")
    assert (charged.units, charged.replayed) == (20, True)
    assert balance.available == 5000 + 1000 - 20


async def test_deadline_exceeded_is_not_retried(running: Running) -> None:
    """Proves DEADLINE_EXCEEDED surfaces after one attempt, as a TallyRpcError."""
    network = FlakyNetwork(fail_with=grpc.StatusCode.DEADLINE_EXCEEDED)
    async with TallyClient(running.authority.address, interceptors=[network]) as tally:
        with pytest.raises(TallyRpcError) as raised:
            await tally.charge(unique(), UPSCALE)
    assert raised.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert len(network.attempts) == 1


async def test_unavailable_gives_up_after_max_attempts(running: Running) -> None:
    """Proves a lasting UNAVAILABLE is tried max_attempts times with one key, then raised."""
    network = FlakyNetwork(fail_with=grpc.StatusCode.UNAVAILABLE)
    async with TallyClient(
        running.authority.address,
        interceptors=[network],
        retry=RetryPolicy(max_attempts=3, backoff_initial_s=0.001, backoff_max_s=0.002),
    ) as tally:
        with pytest.raises(TallyRpcError) as raised:
            await tally.reserve(unique(), UPSCALE)
    assert raised.value.code == grpc.StatusCode.UNAVAILABLE
    assert len(network.attempts) == 3
    assert len({key for _, key in network.attempts}) == 1


async def test_hold_commits_the_whole_quantity_on_success(
    running: Running, client: TallyClient
) -> None:
    """Proves hold() reserves on enter and commits every reserved unit on a normal exit."""
    account_id = await _account(running)
    async with client.hold(account_id, UPSCALE, 4, labels={"worker": "w1"}) as hold:
        assert hold.units == 40
        during = await client.balance(account_id)
        assert (during.available, during.held) == (4960, 40)
    assert hold.committed is not None
    assert (hold.committed.units_charged, hold.committed.units_released) == (40, 0)
    after = await client.balance(account_id)
    assert (after.available, after.held, after.period_consumed) == (4960, 0, 40)


async def test_hold_commits_a_smaller_delivered_quantity(
    running: Running, client: TallyClient
) -> None:
    """Proves hold.deliver(n) charges n and gives the rest of the hold back."""
    account_id = await _account(running)
    async with client.hold(account_id, UPSCALE, 5) as hold:
        hold.deliver(2)
    assert hold.committed is not None
    assert (hold.committed.units_charged, hold.committed.units_released) == (20, 30)
    after = await client.balance(account_id)
    assert (after.available, after.held) == (4980, 0)
    with pytest.raises(ValueError):
        hold.deliver(6)


async def test_hold_releases_on_exception_and_reraises(
    running: Running, client: TallyClient
) -> None:
    """Proves an exception inside hold() releases every unit and propagates unchanged."""
    account_id = await _account(running)

    class WorkFailed(Exception):
        pass

    with pytest.raises(WorkFailed, match="gpu fell over"):
        async with client.hold(account_id, UPSCALE, 7) as hold:
            raise WorkFailed("gpu fell over")
    assert hold.committed is None
    assert hold.released is not None and hold.released.units_refunded == 70
    after = await client.balance(account_id)
    assert (after.available, after.held, after.period_consumed) == (5000, 0, 0)


async def test_resource_exhausted_carries_available_and_required(
    running: Running, client: TallyClient
) -> None:
    """Proves RESOURCE_EXHAUSTED surfaces available/required from the rich status details."""
    account_id = await _account(running, allotment=100)
    entered = False
    with pytest.raises(TallyRpcError) as raised:
        async with client.hold(account_id, UPSCALE, 11):
            entered = True
    assert not entered
    error = raised.value
    assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert (error.available, error.required) == (100, 110)
    quote = await client.quote(account_id, UPSCALE, 11)
    assert (quote.units, quote.affordable, quote.available) == (110, False, 100)


async def test_refund_extend_and_not_found(running: Running, client: TallyClient) -> None:
    """Proves extend, commit and a partial refund move the expected units, and NOT_FOUND maps."""
    account_id = await _account(running)
    held = await client.reserve(account_id, UPSCALE, 2, ttl_s=30)
    extended = await client.extend(held.reservation_id, 120)
    assert extended.reservation_id == held.reservation_id
    assert extended.expires_at.ToMilliseconds() == running.clock.now_ms() + 120_000
    await client.commit(held.reservation_id)
    refunded = await client.refund(held.reservation_id, units=5, reason="bad pixels")
    assert (refunded.units_refunded, refunded.balance.available) == (5, 4985)
    with pytest.raises(TallyRpcError) as raised:
        await client.balance(unique("nobody"))
    assert raised.value.code == grpc.StatusCode.NOT_FOUND
    assert raised.value.available is None and raised.value.required is None


async def test_hold_releases_when_the_task_is_cancelled(
    running: Running, client: TallyClient
) -> None:
    """Proves a worker task cancelled inside hold() gives its units back and stays cancelled."""
    account_id = await _account(running)
    entered = asyncio.Event()

    async def work() -> None:
        async with client.hold(account_id, UPSCALE, 3):
            entered.set()
            await asyncio.Event().wait()

    task = asyncio.create_task(work())
    await entered.wait()
    assert (await client.balance(account_id)).held == 30
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    after = await client.balance(account_id)
    assert (after.available, after.held) == (5000, 0)


class FlakyBalances(quota_pb2_grpc.QuotaServiceServicer):
    """A QuotaService whose GetBalance answers UNAVAILABLE `failures` times, then a balance."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0

    async def GetBalance(
        self, request: quota_pb2.GetBalanceRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> quota_pb2.GetBalanceResponse:
        self.calls += 1
        if self.calls <= self.failures:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "try again")
        return quota_pb2.GetBalanceResponse(
            balance=common_pb2.Balance(account_id=request.account_id, available=7)
        )


async def test_the_channel_retries_unavailable_by_the_service_config() -> None:
    """Proves the client's own channel carries the service config: gRPC retries UNAVAILABLE
    beneath a client allowed one attempt, which a channel without the config does not."""
    server = grpc.aio.server()
    servicer = FlakyBalances(failures=2)
    quota_pb2_grpc.add_QuotaServiceServicer_to_server(servicer, server)
    address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    await server.start()
    try:
        async with TallyClient(address, retry=RetryPolicy(max_attempts=1)) as tally:
            balance = await tally.balance("acct-1")
        assert (balance.account_id, balance.available, servicer.calls) == ("acct-1", 7, 3)

        servicer.calls = 0
        plain = grpc.aio.insecure_channel(address)
        async with TallyClient(address, retry=RetryPolicy(max_attempts=1), channel=plain) as tally:
            with pytest.raises(TallyRpcError) as raised:
                await tally.balance("acct-1")
        await plain.close()
        assert (raised.value.code, servicer.calls) == (grpc.StatusCode.UNAVAILABLE, 1)
    finally:
        await server.stop(None)


async def test_batches_retry_a_lost_reply_with_the_same_keys(running: Running) -> None:
    """Proves reserve_batch gives each keyless item a key, a batch whose reply was lost is
    sent again with the same keys (every item replays, nothing is held twice), and
    commit_batch and refund_batch answer one status per item."""
    accounts = [await _account(running) for _ in range(3)]
    network = FlakyNetwork(lose_replies=1)
    async with TallyClient(
        running.authority.address, interceptors=[network], retry=RetryPolicy(backoff_initial_s=0.01)
    ) as tally:
        items = [quota_pb2.ReserveRequest(account_id=a, operation=UPSCALE, quantity=2)
                 for a in accounts]
        reserved = await tally.reserve_batch(items)
        assert [(r.status.code, r.response.replayed) for r in reserved] == [(0, True)] * 3
        rids = [r.response.reservation_id for r in reserved]
        committed = await tally.commit_batch([(rids[0], 1), (rids[1], None), ("bad", None)])
        assert [r.status.code for r in committed] == [
            0, 0, grpc.StatusCode.INVALID_ARGUMENT.value[0]]
        refunded = await tally.refund_batch([quota_pb2.RefundRequest(reservation_id=rids[2])])
        assert [r.response.units_refunded for r in refunded] == [20]
        balances = [await tally.balance(a) for a in accounts]
    attempts = [request for method, request in network.attempts if method == "ReserveBatch"]
    assert len(attempts) == 2
    assert [(b.available, b.held) for b in balances] == [(4990, 0), (4980, 0), (5000, 0)]
