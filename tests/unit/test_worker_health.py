"""Health with workers: a worker answers NOT_SERVING until the primary says SERVING,
and the primary says so only once every worker has started, its background tasks
are up and no shard is fenced."""

from __future__ import annotations

from grpc_health.v1 import health, health_pb2

from tally.api.server import Serving
from tally.workers.pool import WorkerPool
from tally.workers.primary import PrimaryHealth

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def status(servicer: health.aio.HealthServicer) -> int:
    reply = await servicer.Check(health_pb2.HealthCheckRequest(service=""), None)
    return int(reply.status)


async def test_a_worker_serves_only_once_the_primary_says_so() -> None:
    """Proves a worker's Serving starts NOT_SERVING, follows the primary's word, and
    stays NOT_SERVING after close whatever the primary says."""
    servicer = health.aio.HealthServicer()
    serving = Serving(servicer, primary_up=False)
    await serving.fences(False)
    assert await status(servicer) == NOT_SERVING
    await serving.primary(True)
    assert await status(servicer) == SERVING
    await serving.primary(False)
    assert await status(servicer) == NOT_SERVING
    await serving.primary(True)
    await serving.close()
    await serving.primary(True)
    assert await status(servicer) == NOT_SERVING


class Told(WorkerPool):
    """A pool that records what it would tell the workers."""

    def __init__(self) -> None:
        self.told: list[bool] = []

    async def publish(self, serving: bool) -> None:
        self.told.append(serving)


async def test_the_primary_says_serving_once_every_worker_started() -> None:
    """Proves the primary's health is NOT_SERVING before its workers are ready, and
    after that follows its background tasks and fences."""
    pool = Told()
    primary = PrimaryHealth(pool)
    await primary.tasks(True)
    await primary.fences(False)
    assert pool.told == [False, False]
    await primary.ready()
    await primary.fences(True)
    await primary.fences(False)
    await primary.tasks(False)
    assert pool.told == [False, False, True, False, True, False]
