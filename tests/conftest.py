"""Fixtures: one private redis-server per test session, an in-process
authority per test (manual clock), and stubs to call it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from tests.support import RedisProcess, Running, start_running, stop_running


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
