"""The supervisor against the real server: the reaper and the flusher are restarted
after an unexpected error, health follows whether they can stay up, and a shutdown
restarts nothing.

Faults are injected into the project's own code: the per-pass method of the real
reaper or flusher instance is replaced so that it raises; Redis and the ledger stay
real. Metrics are process-global: every assertion compares before and after."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import pytest_asyncio
from google.protobuf.duration_pb2 import Duration
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tally import metrics
from tally_client.v1 import account_pb2, quota_pb2
from tests.support import RedisProcess, Running, start_running, stop_running, unique

WITHIN_S = 10.0
# Fast enough for tests: a task is down after two failures in a row (the second
# one BACKOFF_MIN_S after the first) and up again after 300 ms of running.
FAILURES_MAX = 2
STABLE_AFTER = "300ms"


@pytest_asyncio.fixture
async def supervised(module_redis: RedisProcess) -> AsyncIterator[Running]:
    running = await start_running(
        module_redis.url,
        background_failures_max=FAILURES_MAX,
        background_stable_after=STABLE_AFTER,
        flush_interval="50ms",
    )
    yield running
    await stop_running(running)


class Fault:
    """Replaces `method` on the instance `target` by one that raises RuntimeError
    (only the first call when `once`); `heal()` gives the class's method back."""

    def __init__(self, target: object, method: str, *, once: bool = False) -> None:
        self.target = target
        self.method = method
        self.once = once
        self.calls = 0
        setattr(target, method, self._fail)

    async def _fail(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        if self.once:
            self.heal()
        raise RuntimeError(f"injected fault in {self.method}")

    def heal(self) -> None:
        if self.method in vars(self.target):
            delattr(self.target, self.method)


def sample(name: str, **labels: str) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


def restarts(task: str) -> float:
    return sample("tally_background_restarts_total", task=task)


async def until(condition: Callable[[], Awaitable[bool]], what: str) -> None:
    deadline = time.monotonic() + WITHIN_S
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {WITHIN_S}s: {what}")
        await asyncio.sleep(0.02)


async def health_status(running: Running) -> int:
    stub: Any = health_pb2_grpc.HealthStub(running.stubs.channel)
    reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
    status: int = reply.status
    return status


async def reserve(running: Running, ttl_s: int) -> tuple[str, str]:
    account_id = unique("supervised")
    await running.accounts.CreateAccount(
        account_pb2.CreateAccountRequest(account_id=account_id, monthly_allotment=1000)
    )
    held = await running.quota.Reserve(
        quota_pb2.ReserveRequest(
            account_id=account_id, operation="image.upscale", quantity=1,
            idempotency_key=unique("key"), ttl=Duration(seconds=ttl_s),
        )
    )
    return account_id, held.reservation_id


def failure_logs(caplog: pytest.LogCaptureFixture, task: str, message: str) -> list[Any]:
    return [
        r for r in caplog.records
        if r.name == "tally.supervisor" and r.getMessage() == message
        and getattr(r, "task", None) == task
    ]


async def test_a_reaper_that_raises_is_restarted_logged_and_reaps_again(
    supervised: Running, caplog: pytest.LogCaptureFixture
) -> None:
    """Proves a reaper pass that raises an unexpected error ends the reaper, which is
    logged with its traceback, counted in tally_background_restarts_total{task=reaper}
    and started again: once restarted it releases an expired hold by itself."""
    before = restarts("reaper")
    expired_before = sample("tally_holds_expired_total")
    fault = Fault(supervised.authority.reaper, "reap_once", once=True)

    async def restarted() -> bool:
        return restarts("reaper") > before

    await until(restarted, "the reaper restarted")
    assert fault.calls == 1
    assert restarts("reaper") == before + 1
    [failed] = failure_logs(caplog, "reaper", "background task failed; restarting")
    assert failed.exc_info is not None and failed.exc_info[0] is RuntimeError
    assert failed.failures_in_a_row == 1

    await reserve(supervised, ttl_s=1)
    supervised.clock.advance(1001)  # nobody touches the account: only the reaper frees it

    async def reaped() -> bool:
        return sample("tally_holds_expired_total") > expired_before

    await until(reaped, "the restarted reaper expired the hold")
    assert sample("tally_background_task_up", task="reaper") == 1
    assert await health_status(supervised) == health_pb2.HealthCheckResponse.SERVING


async def test_a_flusher_that_raises_is_restarted_and_flushes_again(
    supervised: Running,
) -> None:
    """Proves a flush pass that raises an unexpected error ends the flusher, which is
    restarted and counted, and that the restarted flusher writes new events to the
    ledger (a reserve is no money-in: only the background flusher writes it)."""
    before = restarts("flusher")
    Fault(supervised.authority.flusher, "flush_all", once=True)

    async def restarted() -> bool:
        return restarts("flusher") > before

    await until(restarted, "the flusher restarted")
    account_id, reservation_id = await reserve(supervised, ttl_s=60)

    async def flushed() -> bool:
        listing = await supervised.accounts.ListLedgerEntries(
            account_pb2.ListLedgerEntriesRequest(account_id=account_id, types=["reserve"])
        )
        return [e.reservation_id for e in listing.entries] == [reservation_id]

    await until(flushed, "the restarted flusher wrote the reserve to the ledger")
    assert restarts("flusher") == before + 1
    assert sample("tally_background_task_up", task="flusher") == 1


async def test_health_is_not_serving_while_a_task_cannot_stay_up_and_serving_after(
    supervised: Running, caplog: pytest.LogCaptureFixture
) -> None:
    """Proves a reaper failing every pass turns gRPC health NOT_SERVING after
    FAILURES_MAX failures in a row while the server goes on answering, and that once
    the fault is gone the restarted reaper, up for STABLE_AFTER, turns it SERVING."""
    background = supervised.authority.background
    fault = Fault(supervised.authority.reaper, "reap_once")

    async def not_serving() -> bool:
        return await health_status(supervised) == health_pb2.HealthCheckResponse.NOT_SERVING

    await until(not_serving, "health NOT_SERVING")
    assert fault.calls >= FAILURES_MAX
    assert background.cannot_stay_up() == {"reaper"}
    assert failure_logs(caplog, "reaper", "background task cannot stay up")
    account_id = (await reserve(supervised, ttl_s=60))[0]
    reply = await supervised.quota.GetBalance(quota_pb2.GetBalanceRequest(account_id=account_id))
    assert reply.balance.held > 0  # calls are still answered: health tells the balancer

    fault.heal()

    async def serving() -> bool:
        return await health_status(supervised) == health_pb2.HealthCheckResponse.SERVING

    await until(serving, "health SERVING again")
    assert background.cannot_stay_up() == frozenset()
    assert sample("tally_background_task_up", task="reaper") == 1
    assert failure_logs(caplog, "reaper", "background task up again")


async def test_shutdown_restarts_nothing_even_a_task_failing_as_it_stops(
    module_redis: RedisProcess, caplog: pytest.LogCaptureFixture
) -> None:
    """Proves a shutdown is no failure: both tasks end, neither is restarted, and a
    reaper pass that raises while the server stops is logged, not restarted."""
    caplog.set_level(logging.INFO, logger="tally.supervisor")
    running = await start_running(module_redis.url)
    reaper = running.authority.reaper
    before = {task: restarts(task) for task in ("reaper", "flusher")}
    stopping = asyncio.Event()
    passing = asyncio.Event()
    stop_reaper = reaper.stop

    async def pass_failing_at_stop() -> int:
        passing.set()
        await stopping.wait()
        raise RuntimeError("injected fault while stopping")

    def stop() -> None:
        stop_reaper()
        stopping.set()

    reaper.reap_once = pass_failing_at_stop  # type: ignore[method-assign]
    reaper.stop = stop  # type: ignore[method-assign]
    await passing.wait()
    await stop_running(running)

    assert {task: restarts(task) for task in before} == before
    assert sample("tally_background_task_up", task="reaper") == 0
    assert sample("tally_background_task_up", task="flusher") == 0
    [failed] = failure_logs(
        caplog, "reaper", "background task failed while stopping; not restarted"
    )
    assert failed.exc_info is not None and failed.exc_info[0] is RuntimeError
    assert failure_logs(caplog, "flusher", "background task ended")
    assert not failure_logs(caplog, "reaper", "background task failed; restarting")
