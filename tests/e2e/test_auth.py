"""Trying to get in: a server with --auth required, tokens from `tally tokens create
--json`, and every way in that must be refused (with nothing moved)."""

from __future__ import annotations

import asyncio
import getpass
import json
import os
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio
from google.protobuf import timestamp_pb2

from tally import app
from tally.auth.tokens import TOKEN_ID_HEX_DIGITS
from tally_client.v1 import (
    account_pb2,
    catalog_pb2,
    quota_pb2,
    token_pb2,
    token_pb2_grpc,
    usage_pb2,
    usage_pb2_grpc,
)
from tests.e2e.test_ops_cli import tally
from tests.support import RedisProcess, Running, settings, start_running, stop_running, unique

UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
PERMISSION_DENIED = grpc.StatusCode.PERMISSION_DENIED
HOUR_MS = 3_600_000

# A token ends with its secret: 43 base64url characters, which may hold '_' themselves.
SECRET_CHARS = 43


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


@dataclass
class Deployment:
    running: Running
    env: dict[str, str]
    account_a: str
    account_b: str
    reservation_b: str  # a hold of B's, open

    async def token(self, *args: str) -> str:
        code, out, err = await tally(self.env, "tokens", "create", "--json", *args)
        assert code == 0, err
        made = json.loads(out)
        assert made["token"].startswith(f"tly_{made['token_id']}_")
        assert made["token"] not in err
        token: str = made["token"]
        return token

    async def state(self, admin: str) -> list[Any]:
        """Both accounts' balances and ledger entries (flushed first)."""
        await self.running.authority.flusher.flush_all()
        result: list[Any] = []
        for account_id in (self.account_a, self.account_b):
            balance = await self.running.quota.GetBalance(
                quota_pb2.GetBalanceRequest(account_id=account_id), metadata=bearer(admin)
            )
            entries = await self.running.accounts.ListLedgerEntries(
                account_pb2.ListLedgerEntriesRequest(account_id=account_id),
                metadata=bearer(admin),
            )
            result += [balance.balance, list(entries.entries)]
        return result


@pytest_asyncio.fixture
async def deployment(own_redis: RedisProcess, tmp_path: Path) -> AsyncIterator[Deployment]:
    ledger_url = f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
    # The server's clock runs an hour ahead: a token made to last 30 minutes is expired.
    running = await start_running(
        own_redis.url, now_ms=int(time.time() * 1000) + HOUR_MS, ledger_url=ledger_url,
        auth="required",
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("TALLY_")}
    env.update(TALLY_REDIS_URL=own_redis.url, TALLY_LEDGER_URL=ledger_url,
               TALLY_METRICS_LISTEN="")
    deployment = Deployment(running, env, unique("a"), unique("b"), "")
    try:
        admin = await deployment.token("--role", "admin", "--name", "setup")
        for account_id in (deployment.account_a, deployment.account_b):
            await running.accounts.CreateAccount(
                account_pb2.CreateAccountRequest(account_id=account_id, monthly_allotment=500),
                metadata=bearer(admin),
            )
        held = await running.quota.Reserve(
            quota_pb2.ReserveRequest(account_id=deployment.account_b, operation="image.upscale",
                                     quantity=1, idempotency_key="hold-b"),
            metadata=bearer(admin),
        )
        deployment.reservation_b = held.reservation_id
        yield deployment
    finally:
        await stop_running(running)


async def refused(call: Any, request: Any, token: str | None, code: grpc.StatusCode) -> None:
    metadata = bearer(token) if token is not None else None
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(request, metadata=metadata)
    assert caught.value.code() == code, caught.value.details()


async def test_calls_without_a_valid_token_are_unauthenticated(deployment: Deployment) -> None:
    """Proves a missing, malformed, wrong, unknown, expired or revoked token gets
    UNAUTHENTICATED on a write and a read, and nothing moves; health needs no token."""
    running = deployment.running
    admin = await deployment.token("--role", "admin")
    expired = await deployment.token("--role", "admin", "--expires-in", "30m")
    revoked = await deployment.token("--role", "admin")
    revoked_id = revoked.split("_")[1] + "_" + revoked.split("_")[2]
    code, _out, err = await tally(deployment.env, "tokens", "revoke", revoked_id)
    assert code == 0, err
    running.clock.advance(3000)  # past --token-cache-ttl
    before = await deployment.state(admin)
    wrong_secret = admin[:-4] + ("AAAA" if not admin.endswith("AAAA") else "BBBB")
    unknown = "tly_tok_0123456789abcdef_" + "A" * 43
    purchase = account_pb2.PurchaseUnitsRequest(
        account_id=deployment.account_a, units=1000, idempotency_key=unique("p")
    )
    for token in (None, "", "not-a-token", "Basic abc", wrong_secret, unknown, expired, revoked):
        await refused(running.accounts.PurchaseUnits, purchase, token, UNAUTHENTICATED)
        await refused(
            running.quota.GetBalance,
            quota_pb2.GetBalanceRequest(account_id=deployment.account_a), token, UNAUTHENTICATED,
        )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await running.accounts.PurchaseUnits(purchase, metadata=(("authorization", admin),))
    assert caught.value.code() == UNAUTHENTICATED  # the token without "Bearer"
    assert await deployment.state(admin) == before
    code, out, err = await tally(deployment.env, "tokens", "list", "--json")
    assert code == 0, err
    listed = {t["token_id"]: t for t in json.loads(out)["tokens"]}
    assert listed[revoked_id]["revoked_at"] > 0
    assert admin[-SECRET_CHARS:] not in out  # no secret is listed


async def test_roles_are_held_to_their_table(deployment: Deployment) -> None:
    """Proves a worker token is PERMISSION_DENIED on admin and reader-only RPCs and a
    reader token on Reserve, Charge and admin RPCs, and nothing moves."""
    running = deployment.running
    admin = await deployment.token("--role", "admin")
    worker = await deployment.token("--role", "worker")
    reader = await deployment.token("--role", "reader")
    before = await deployment.state(admin)
    a = deployment.account_a
    purchase = account_pb2.PurchaseUnitsRequest(account_id=a, units=1000, idempotency_key="p")
    for token in (worker, reader):
        await refused(running.accounts.PurchaseUnits, purchase, token, PERMISSION_DENIED)
        await refused(running.accounts.CreateAccount,
                      account_pb2.CreateAccountRequest(account_id=unique()), token,
                      PERMISSION_DENIED)
        await refused(running.accounts.UpdateAccount,
                      account_pb2.UpdateAccountRequest(account_id=a, monthly_allotment=9),
                      token, PERMISSION_DENIED)
        await refused(running.catalog.SetPrice,
                      catalog_pb2.SetPriceRequest(operation="image.upscale",
                                                  units_per_quantity=1), token,
                      PERMISSION_DENIED)
        await refused(running.accounts.SetBudget,
                      account_pb2.SetBudgetRequest(account_id=a), token, PERMISSION_DENIED)
    await refused(running.accounts.ListLedgerEntries,
                  account_pb2.ListLedgerEntriesRequest(account_id=a), worker, PERMISSION_DENIED)
    await refused(running.quota.Reserve,
                  quota_pb2.ReserveRequest(account_id=a, operation="image.upscale", quantity=1,
                                           idempotency_key="r"), reader, PERMISSION_DENIED)
    await refused(running.quota.Charge,
                  quota_pb2.ChargeRequest(account_id=a, operation="image.upscale", quantity=1,
                                          idempotency_key="c"), reader, PERMISSION_DENIED)
    await running.quota.GetBalance(quota_pb2.GetBalanceRequest(account_id=a),
                                   metadata=bearer(reader))
    assert await deployment.state(admin) == before


async def test_a_scoped_token_batch_touches_its_own_account_alone(
    deployment: Deployment,
) -> None:
    """Proves a worker token scoped to A, sending batches that also name B (and B's
    reservation), gets PERMISSION_DENIED for those items alone: A's items are served,
    nothing of B moves; a reader token may not call the batch RPCs at all."""
    running = deployment.running
    a, b = deployment.account_a, deployment.account_b
    admin = await deployment.token("--role", "admin")
    scoped_worker = await deployment.token("--role", "worker", "--account", a)
    reader = await deployment.token("--role", "reader")
    before_b = await running.quota.GetBalance(
        quota_pb2.GetBalanceRequest(account_id=b), metadata=bearer(admin))
    items = [quota_pb2.ReserveRequest(account_id=target, operation="image.upscale",
                                      quantity=1, idempotency_key=f"batch-{i}")
             for i, target in enumerate((a, b, a))]
    reserved = (await running.quota.ReserveBatch(
        quota_pb2.ReserveBatchRequest(items=items), metadata=bearer(scoped_worker))).results
    assert [r.status.code for r in reserved] == [0, PERMISSION_DENIED.value[0], 0]
    assert reserved[1].status.field.startswith("items[1]")
    commits = quota_pb2.CommitBatchRequest(items=[
        quota_pb2.CommitRequest(reservation_id=reserved[0].response.reservation_id),
        quota_pb2.CommitRequest(reservation_id=deployment.reservation_b),
    ])
    committed = (await running.quota.CommitBatch(
        commits, metadata=bearer(scoped_worker))).results
    assert [r.status.code for r in committed] == [0, PERMISSION_DENIED.value[0]]
    refunds = quota_pb2.RefundBatchRequest(items=[
        quota_pb2.RefundRequest(reservation_id=deployment.reservation_b, idempotency_key="f")])
    refunded = (await running.quota.RefundBatch(
        refunds, metadata=bearer(scoped_worker))).results
    assert [r.status.code for r in refunded] == [PERMISSION_DENIED.value[0]]
    after_b = await running.quota.GetBalance(
        quota_pb2.GetBalanceRequest(account_id=b), metadata=bearer(admin))
    assert after_b.balance.held == before_b.balance.held
    assert after_b.balance.available == before_b.balance.available
    await refused(running.quota.ReserveBatch, quota_pb2.ReserveBatchRequest(items=items[:1]),
                  reader, PERMISSION_DENIED)


async def test_a_scoped_token_cannot_touch_another_account(deployment: Deployment) -> None:
    """Proves a token scoped to A gets PERMISSION_DENIED on B (and on an account that
    does not exist, alike) on every RPC, Commit/Refund/Extend of B's reservation
    included; its all-accounts report and watch show A alone; nothing of B moves."""
    running = deployment.running
    a, b = deployment.account_a, deployment.account_b
    admin = await deployment.token("--role", "admin")
    scoped = await deployment.token("--role", "admin", "--account", a)
    scoped_worker = await deployment.token("--role", "worker", "--account", a)
    before = await deployment.state(admin)
    res_b = deployment.reservation_b
    ttl = quota_pb2.ExtendRequest(reservation_id=res_b)
    ttl.ttl.FromSeconds(60)
    start = timestamp_pb2.Timestamp()
    start.FromMilliseconds(running.clock.now_ms() // HOUR_MS * HOUR_MS - 24 * HOUR_MS)
    for target in (b, unique("nobody")):
        calls: list[tuple[Any, Any]] = [
            (running.quota.Reserve, quota_pb2.ReserveRequest(
                account_id=target, operation="image.upscale", quantity=1, idempotency_key="r")),
            (running.quota.Charge, quota_pb2.ChargeRequest(
                account_id=target, operation="image.upscale", quantity=1, idempotency_key="c")),
            (running.quota.Quote, quota_pb2.QuoteRequest(
                account_id=target, operation="image.upscale", quantity=1)),
            (running.quota.GetBalance, quota_pb2.GetBalanceRequest(account_id=target)),
            (running.accounts.CreateAccount, account_pb2.CreateAccountRequest(
                account_id=target, monthly_allotment=1)),
            (running.accounts.GetAccount, account_pb2.GetAccountRequest(account_id=target)),
            (running.accounts.UpdateAccount, account_pb2.UpdateAccountRequest(
                account_id=target, monthly_allotment=1)),
            (running.accounts.PurchaseUnits, account_pb2.PurchaseUnitsRequest(
                account_id=target, units=1000, idempotency_key="p")),
            (running.accounts.ListLedgerEntries,
             account_pb2.ListLedgerEntriesRequest(account_id=target)),
            (running.accounts.SetBudget, account_pb2.SetBudgetRequest(account_id=target)),
            (running.accounts.ListBudgets, account_pb2.ListBudgetsRequest(account_id=target)),
            (running.accounts.DeleteBudget, account_pb2.DeleteBudgetRequest(
                account_id=target, budget_id="x")),
            (usage_pb2_grpc.UsageServiceStub(running.stubs.channel).GetUsageReport,
             usage_pb2.GetUsageReportRequest(account_id=target)),
        ]
        for call, request in calls:
            await refused(call, request, scoped, PERMISSION_DENIED)
    for call, request in (
        (running.quota.Commit, quota_pb2.CommitRequest(reservation_id=res_b)),
        (running.quota.Refund, quota_pb2.RefundRequest(reservation_id=res_b,
                                                       idempotency_key="f")),
        (running.quota.Extend, ttl),
    ):
        await refused(call, request, scoped, PERMISSION_DENIED)
        await refused(call, request, scoped_worker, PERMISSION_DENIED)
    await refused(running.catalog.SetPrice, catalog_pb2.SetPriceRequest(
        operation="image.upscale", units_per_quantity=1), scoped, PERMISSION_DENIED)
    usage = usage_pb2_grpc.UsageServiceStub(running.stubs.channel)
    watch = usage.WatchUsage(usage_pb2.WatchUsageRequest(account_id=b), metadata=bearer(scoped))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await watch.read()
    assert caught.value.code() == PERMISSION_DENIED
    assert await deployment.state(admin) == before

    # All accounts: A's rows and events alone.
    watch = usage.WatchUsage(usage_pb2.WatchUsageRequest(), metadata=bearer(scoped))
    await watch.initial_metadata()
    for account_id, key in ((b, "wb"), (a, "wa")):
        await running.quota.Charge(
            quota_pb2.ChargeRequest(account_id=account_id, operation="image.upscale",
                                    quantity=1, idempotency_key=key),
            metadata=bearer(admin),
        )
    first = await asyncio.wait_for(watch.read(), timeout=30)
    assert first.event.account_id == a
    watch.cancel()
    await running.authority.flusher.flush_all()
    report = await usage.GetUsageReport(
        usage_pb2.GetUsageReportRequest(start=start), metadata=bearer(scoped)
    )
    assert {row.account_id for row in report.report.rows} == {a}
    everyone = await usage.GetUsageReport(
        usage_pb2.GetUsageReportRequest(start=start), metadata=bearer(admin)
    )
    assert {row.account_id for row in everyone.report.rows} == {a, b}


async def test_a_revocation_reaches_every_server_without_a_restart(
    deployment: Deployment,
) -> None:
    """Proves a token revoked with `tally tokens revoke` is refused by two running
    servers once --token-cache-ttl has passed on their clocks, with no restart."""
    first = deployment.running
    redis_url = deployment.env["TALLY_REDIS_URL"]
    second = await start_running(redis_url, now_ms=first.clock.now_ms(),
                                 ledger_url=deployment.env["TALLY_LEDGER_URL"], auth="required")
    try:
        code, out, err = await tally(deployment.env, "tokens", "create", "--role", "reader",
                                     "--json")
        assert code == 0, err
        made = json.loads(out)
        request = quota_pb2.GetBalanceRequest(account_id=deployment.account_a)
        for server in (first, second):
            await server.quota.GetBalance(request, metadata=bearer(made["token"]))  # cached
        code, _out, err = await tally(deployment.env, "tokens", "revoke", made["token_id"])
        assert code == 0, err
        for server in (first, second):
            server.clock.advance(2001)
            await refused(server.quota.GetBalance, request, made["token"], UNAUTHENTICATED)
    finally:
        await stop_running(second)


def test_auth_defaults_to_required_beyond_loopback() -> None:
    """Proves --auth is off by default on loopback, required by default elsewhere, and
    a non-loopback listen with --auth off is refused."""
    assert not app.auth_required(settings("redis://unused"))
    assert app.auth_required(settings("redis://unused", listen="0.0.0.0:1"))
    assert app.auth_required(settings("redis://unused", auth="required"))
    with pytest.raises(RuntimeError, match="auth off"):
        app.auth_required(settings("redis://unused", listen="0.0.0.0:1", auth="off"))


async def test_unscoped_admins_manage_tokens_over_grpc(deployment: Deployment) -> None:
    """Proves TokenService makes, lists (without secrets) and revokes tokens for an
    unscoped admin, and refuses workers and scoped admins with PERMISSION_DENIED."""
    running = deployment.running
    admin = await deployment.token("--role", "admin")
    worker = await deployment.token("--role", "worker")
    scoped = await deployment.token("--role", "admin", "--account", deployment.account_a)
    tokens = token_pb2_grpc.TokenServiceStub(running.stubs.channel)
    create = token_pb2.CreateTokenRequest(role="reader", accounts=[deployment.account_a])
    for token in (worker, scoped):
        await refused(tokens.CreateToken, create, token, PERMISSION_DENIED)
        await refused(tokens.ListTokens, token_pb2.ListTokensRequest(), token, PERMISSION_DENIED)
    made = await tokens.CreateToken(create, metadata=bearer(admin))
    request = quota_pb2.GetBalanceRequest(account_id=deployment.account_a)
    await running.quota.GetBalance(request, metadata=bearer(made.token))
    listed = await tokens.ListTokens(token_pb2.ListTokensRequest(), metadata=bearer(admin))
    assert made.info.token_id in {t.token_id for t in listed.tokens}
    assert made.token[-SECRET_CHARS:] not in str(listed)
    await tokens.RevokeToken(token_pb2.RevokeTokenRequest(token_id=made.info.token_id),
                             metadata=bearer(admin))
    running.clock.advance(2001)
    await refused(running.quota.GetBalance, request, made.token, UNAUTHENTICATED)


async def test_token_actions_record_who_did_them(deployment: Deployment) -> None:
    """Proves creating and revoking a token records its principal: the operator for
    `tally tokens`, the calling token for TokenService; both lists show them."""
    running = deployment.running
    operator = f"operator:{getpass.getuser()}@{socket.gethostname()}"
    admin = await deployment.token("--role", "admin")
    admin_id = admin[len("tly_"):len("tly_tok_") + TOKEN_ID_HEX_DIGITS]
    tokens = token_pb2_grpc.TokenServiceStub(running.stubs.channel)
    by_grpc = await tokens.CreateToken(token_pb2.CreateTokenRequest(role="reader"),
                                       metadata=bearer(admin))
    by_cli = json.loads((await tally(deployment.env, "tokens", "create", "--json",
                                     "--role", "worker"))[1])["token_id"]
    await tokens.RevokeToken(token_pb2.RevokeTokenRequest(token_id=by_cli),
                             metadata=bearer(admin))
    code, _out, err = await tally(deployment.env, "tokens", "revoke", by_grpc.info.token_id)
    assert code == 0, err
    # a second revocation keeps the first one's principal
    code, _out, err = await tally(deployment.env, "tokens", "revoke", by_cli)
    assert code == 0, err

    listed = await tokens.ListTokens(token_pb2.ListTokensRequest(), metadata=bearer(admin))
    over_grpc = {t.token_id: (t.created_by, t.revoked_by) for t in listed.tokens}
    assert over_grpc[admin_id] == (operator, "")
    assert over_grpc[by_grpc.info.token_id] == (admin_id, operator)
    assert over_grpc[by_cli] == (operator, admin_id)
    assert by_grpc.info.created_by == admin_id
    code, out, err = await tally(deployment.env, "tokens", "list", "--json")
    assert code == 0, err
    over_cli = {t["token_id"]: (t["created_by"], t["revoked_by"])
                for t in json.loads(out)["tokens"]}
    assert over_cli == over_grpc
    code, out, err = await tally(deployment.env, "tokens", "list")
    assert code == 0, err
    row = next(line for line in out.splitlines() if by_cli in line)
    assert operator in row and admin_id in row
