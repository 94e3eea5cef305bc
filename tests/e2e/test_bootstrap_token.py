"""Trying to get in with the bootstrap token: a server started with
--bootstrap-token-file registers the token in the file as an unscoped admin once,
and a revoked bootstrap token stays refused across restarts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from tally_client.v1 import account_pb2, quota_pb2, token_pb2, token_pb2_grpc
from tests.e2e.test_auth import bearer
from tests.e2e.test_ops_cli import tally
from tests.support import RedisProcess, Running, start_running, stop_running, unique

README = Path(__file__).resolve().parents[2] / "README.md"
# The command README "Docker" gives for writing a bootstrap token.
MAKE_TOKEN = ("import secrets; "
              "print(f'tly_tok_{secrets.token_hex(8)}_{secrets.token_urlsafe(32)}')")


def written_token(folder: Path) -> tuple[Path, str]:
    token = subprocess.run([sys.executable, "-c", MAKE_TOKEN], check=True,
                           capture_output=True, text=True).stdout.strip()
    path = folder / "bootstrap-token"
    path.write_text(token + "\n")
    path.chmod(0o600)
    return path, token


async def bootstrap_records(running: Running, admin: str) -> list[token_pb2.TokenInfo]:
    tokens = token_pb2_grpc.TokenServiceStub(running.stubs.channel)
    listed = await tokens.ListTokens(token_pb2.ListTokensRequest(), metadata=bearer(admin))
    return [t for t in listed.tokens if t.created_by == "bootstrap-token-file"]


async def state(running: Running, account_id: str, admin: str) -> list[object]:
    """The account's balance and ledger entries (flushed first)."""
    await running.authority.flusher.flush_all()
    balance = await running.quota.GetBalance(
        quota_pb2.GetBalanceRequest(account_id=account_id), metadata=bearer(admin)
    )
    entries = await running.accounts.ListLedgerEntries(
        account_pb2.ListLedgerEntriesRequest(account_id=account_id), metadata=bearer(admin)
    )
    return [balance.balance, list(entries.entries)]


async def test_a_bootstrap_token_is_registered_once_and_stays_revoked(
    own_redis: RedisProcess, tmp_path: Path
) -> None:
    """Proves the file's token is an admin at first start, a restart adds no second
    record, and once revoked it is UNAUTHENTICATED after a restart, nothing moved."""
    assert MAKE_TOKEN in README.read_text()
    ledger_url = f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
    path, token = written_token(tmp_path)
    boot = {"ledger_url": ledger_url, "auth": "required", "bootstrap_token_file": str(path)}
    account_id = unique("boot")

    running = await start_running(own_redis.url, **boot)
    try:
        await running.accounts.CreateAccount(
            account_pb2.CreateAccountRequest(account_id=account_id, monthly_allotment=500),
            metadata=bearer(token),
        )
        first = await bootstrap_records(running, token)
    finally:
        await stop_running(running)
    assert [(t.role, list(t.accounts), t.revoked_by) for t in first] == [("admin", [], "")]

    running = await start_running(own_redis.url, now_ms=first[0].created_at.ToMilliseconds()
                                  + 60_000, **boot)
    try:
        assert await bootstrap_records(running, token) == first
        tokens = token_pb2_grpc.TokenServiceStub(running.stubs.channel)
        await tokens.RevokeToken(token_pb2.RevokeTokenRequest(token_id=first[0].token_id),
                                 metadata=bearer(token))
    finally:
        await stop_running(running)

    env = {k: v for k, v in os.environ.items() if not k.startswith("TALLY_")}
    env.update(TALLY_REDIS_URL=own_redis.url, TALLY_LEDGER_URL=ledger_url,
               TALLY_METRICS_LISTEN="")
    code, out, err = await tally(env, "tokens", "create", "--json", "--role", "admin")
    assert code == 0, err
    admin = json.loads(out)["token"]
    running = await start_running(own_redis.url, **boot)
    try:
        balance = quota_pb2.GetBalanceRequest(account_id=account_id)
        before = await state(running, account_id, admin)
        for call, request in (
            (running.accounts.PurchaseUnits,
             account_pb2.PurchaseUnitsRequest(account_id=account_id, units=7,
                                              idempotency_key="boot")),
            (running.quota.GetBalance, balance),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call(request, metadata=bearer(token))
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        (again,) = await bootstrap_records(running, admin)
        assert again.revoked_by == first[0].token_id and again.HasField("revoked_at")
        assert await state(running, account_id, admin) == before
    finally:
        await stop_running(running)


async def test_a_bootstrap_file_without_a_token_stops_the_start(
    own_redis: RedisProcess, tmp_path: Path
) -> None:
    """Proves a file holding no token, or a token whose id is held with another
    secret, stops the start with an error that never quotes the file."""
    ledger_url = f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
    path = tmp_path / "bootstrap-token"
    path.write_text("tly_not-a-token-but-secret")
    with pytest.raises(RuntimeError, match="does not hold a Tally token") as caught:
        await start_running(own_redis.url, ledger_url=ledger_url, bootstrap_token_file=str(path))
    assert "not-a-token-but-secret" not in str(caught.value)

    _, token = written_token(tmp_path)
    running = await start_running(own_redis.url, ledger_url=ledger_url,
                                  bootstrap_token_file=str(path))
    await stop_running(running)
    other_secret = token[:-43] + "A" * 43  # the secret is the last 43 characters (may hold '_')
    path.write_text(other_secret)
    with pytest.raises(RuntimeError, match="belongs to another token") as caught:
        await start_running(own_redis.url, ledger_url=ledger_url, bootstrap_token_file=str(path))
    assert "A" * 43 not in str(caught.value)
