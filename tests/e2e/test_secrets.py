"""Secrets stay secret: the embedded Redis's password, and a Redis or ledger URL's."""

from __future__ import annotations

import io
import logging
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from tally import logs
from tally_client.v1 import account_pb2
from tests.support import RedisProcess, start_running, stop_running, unique

TALLY = str(Path(sys.executable).with_name("tally"))
PASSWORD = "hunter2-not-for-anyone"


def modes(folder: Path, *names: str) -> set[int]:
    return {stat.S_IMODE((folder / name).stat().st_mode) for name in names}


def command_line(pid: int) -> bytes:
    """What `ps` shows of a process."""
    return Path(f"/proc/{pid}/cmdline").read_bytes()


async def test_the_embedded_redis_asks_for_a_password_nobody_else_can_read(
    tmp_path: Path,
) -> None:
    """The generated password is in owner-only files, not on redis-server's command
    line; Redis refuses a client without it, and the server works with it."""
    running = await start_running("", data_dir=tmp_path)
    try:
        embedded = running.authority.embedded
        assert embedded is not None and embedded.process is not None
        folder = tmp_path / "redis"
        password = embedded.password
        assert len(password) >= 32
        assert modes(folder, "redis.password", "redis.conf", "redis.url") == {0o600}
        assert password.encode() not in command_line(embedded.process.pid)

        stranger = aioredis.Redis(port=embedded.port)
        with pytest.raises(aioredis.AuthenticationError):
            await stranger.ping()
        await stranger.aclose()

        account_id = unique("secret")
        await running.accounts.CreateAccount(
            account_pb2.CreateAccountRequest(account_id=account_id, monthly_allotment=10)
        )
    finally:
        await stop_running(running)


def test_a_wrong_redis_password_is_refused_without_being_told(tmp_path: Path) -> None:
    """`tally serve` with a Redis URL holding a wrong password fails, and neither its
    logs (DEBUG) nor its error show the password; nor does a ledger URL's."""
    guarded = RedisProcess(tmp_path / "redis", "--requirepass", "the-right-one")
    guarded.start()
    try:
        environ = {
            **os.environ,
            "TALLY_REDIS_URL": f"redis://:{PASSWORD}@127.0.0.1:{guarded.port}/0",
            "TALLY_DATA_DIR": str(tmp_path / "data"),
            "TALLY_LISTEN": "127.0.0.1:0",
            "TALLY_METRICS_LISTEN": "",
            "TALLY_LOG_LEVEL": "DEBUG",
        }
        refused = subprocess.run([TALLY, "serve"], env=environ, capture_output=True,
                                 timeout=60, check=False)
        bad_ledger = subprocess.run(
            [TALLY, "serve"], capture_output=True, timeout=60, check=False,
            env={**environ, "TALLY_LEDGER_URL": f"mysql://tally:{PASSWORD}@db/tally"},
        )
    finally:
        guarded.stop()
    for outcome in (refused, bad_ledger):
        assert outcome.returncode != 0
        assert outcome.stderr, "it says why it stopped"
        assert PASSWORD.encode() not in outcome.stdout + outcome.stderr
    assert b"mysql://tally:***@db/tally" in bad_ledger.stderr


def test_log_lines_mask_url_passwords() -> None:
    """Every log line, JSON or text, masks the password of a URL in its message,
    extras or traceback."""
    for fmt in ("json", "text"):
        logs.configure("INFO", fmt)
        stream = io.StringIO()
        handler = logging.getLogger().handlers[0]
        assert isinstance(handler, logging.StreamHandler)
        handler.setStream(stream)
        url = f"postgresql://tally:{PASSWORD}@db:5432/tally"
        try:
            raise ConnectionError(f"cannot reach {url}")
        except ConnectionError:
            logging.getLogger("tally.test").exception("lost %s", url, extra={"url": url})
        assert PASSWORD not in stream.getvalue()
        assert "postgresql://tally:***@db:5432/tally" in stream.getvalue()
    logging.getLogger().handlers.clear()
