"""Money-in and admin actions are recorded in the ledger with the principal that did them."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest_asyncio

from tally.api.servicers import AccountServicer, CatalogServicer
from tally.auth.principal import ANONYMOUS, Principal, Role, running_as
from tally.ledger.durability import MoneyInBarrier
from tally_client.v1 import account_pb2, catalog_pb2, common_pb2, quota_pb2
from tests.support import RedisProcess, Running, start_running, stop_running, unique


@pytest_asyncio.fixture
async def durable(own_redis: RedisProcess, ledger_url: str) -> AsyncIterator[Running]:
    """An authority on a private Redis and a fresh ledger (SQLite and PostgreSQL)."""
    running = await start_running(own_redis.url, ledger_url=ledger_url)
    yield running
    await stop_running(running)


class _InProcess:
    """The servicer's side of a call made without a channel: no deadline."""

    def time_remaining(self) -> None:
        return None


async def _admin_actions(
    accounts: Any, catalog: Any, account_id: str, operation: str, context: Any = None
) -> None:
    """Every audited action once: through stubs (context None) or servicers."""
    calls = [
        (accounts.CreateAccount, account_pb2.CreateAccountRequest(
            account_id=account_id, monthly_allotment=100)),
        (accounts.UpdateAccount, account_pb2.UpdateAccountRequest(
            account_id=account_id, overage_limit=5)),
        (accounts.PurchaseUnits, account_pb2.PurchaseUnitsRequest(
            account_id=account_id, units=40, idempotency_key="p1")),
        (accounts.SetBudget, account_pb2.SetBudgetRequest(
            account_id=account_id, budget=common_pb2.Budget(operation=operation, limit_units=9))),
        (accounts.DeleteBudget, account_pb2.DeleteBudgetRequest(
            account_id=account_id, budget_id=f"operation:{operation}")),
        (catalog.SetPrice, catalog_pb2.SetPriceRequest(
            operation=operation, units_per_quantity=3)),
    ]
    for method, request in calls:
        await (method(request) if context is None else method(request, context))


async def test_admin_actions_name_the_anonymous_principal_with_auth_off(
    durable: Running,
) -> None:
    """Proves, with auth off, every money-in and admin action's ledger entry names
    `anonymous` (ListLedgerEntries and the ledger's rows), while spending names nobody."""
    account_id, operation = unique(), f"test.audit-{unique('op')}"
    await _admin_actions(durable.accounts, durable.catalog, account_id, operation)
    await durable.quota.Charge(quota_pb2.ChargeRequest(
        account_id=account_id, operation=operation, quantity=1, idempotency_key="c1"))
    await durable.authority.flusher.flush_all()
    listed = (await durable.accounts.ListLedgerEntries(
        account_pb2.ListLedgerEntriesRequest(account_id=account_id))).entries
    assert [(e.type, e.principal) for e in listed] == [
        ("plan_change", "anonymous"),  # created
        ("allotment", ""),
        ("plan_change", "anonymous"),  # updated
        ("purchase", "anonymous"),
        ("plan_change", "anonymous"),  # budget set
        ("plan_change", "anonymous"),  # budget deleted
        ("charge", ""),
    ]
    prices = await durable.authority.ledger.entries("")
    assert [(e.operation, e.principal) for e in prices if e.operation == operation] == [
        (operation, "anonymous")
    ]


async def test_admin_actions_name_the_principal_they_run_as(durable: Running) -> None:
    """Proves the principal the call runs as (`running_as`, as the auth interceptor
    sets it) is what the ledger records for each action."""
    authority = durable.authority
    barrier = MoneyInBarrier(authority.flusher)
    accounts = AccountServicer(authority.store, barrier, authority.ledger)
    catalog = CatalogServicer(authority.store, barrier)
    admin = Principal("tok_audit7", Role.ADMIN)
    assert admin != ANONYMOUS
    account_id, operation = unique(), f"test.audit-{unique('op')}"
    with running_as(admin):
        await _admin_actions(accounts, catalog, account_id, operation, _InProcess())
    entries = await authority.ledger.entries(account_id)
    assert {e.principal for e in entries if e.type != "allotment"} == {"tok_audit7"}
    assert len(entries) == 6
    prices = await authority.ledger.entries("")
    assert [e.principal for e in prices if e.operation == operation] == ["tok_audit7"]
