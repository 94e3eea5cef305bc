"""Fixtures: one private redis-server per test session, an in-process
authority per test (manual clock), and stubs to call it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from tests.cluster_support import RedisClusterProcesses
from tests.support import PostgresServer, RedisProcess, Running, start_running, stop_running


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    server = RedisProcess(Path(tmp_path_factory.mktemp("redis")))
    server.start()
    yield server
    server.stop()


@pytest_asyncio.fixture
async def running(redis_server: RedisProcess) -> AsyncIterator[Running]:
    """An authority on the session Redis; tests use unique account ids."""
    authority = await start_running(redis_server.url)
    yield authority
    await stop_running(authority)


@pytest.fixture(scope="session")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresServer]:
    server = PostgresServer(Path(tmp_path_factory.mktemp("postgres")))
    server.start()
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger_url(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[str]:
    """A fresh, empty ledger on each backend."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
        return
    server: PostgresServer = request.getfixturevalue("postgres")
    url = server.create_database()
    yield url
    server.drop_database(url)


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisProcess]:
    """A private redis-server this test may kill, restart or wipe."""
    server = RedisProcess(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def module_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    """A private redis-server shared by one test module (no other module sees its keys)."""
    server = RedisProcess(Path(tmp_path_factory.mktemp("redis-module")))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterProcesses]:
    """A real 3-master Redis Cluster shared by one test module."""
    cluster = RedisClusterProcesses(Path(tmp_path_factory.mktemp("redis-cluster")))
    cluster.start()
    yield cluster
    cluster.stop()
