"""The client's own tests: only tally_client (as installed, e.g. from its wheel with
the oldest supported grpcio and protobuf), pytest and pytest-asyncio, against a
real `tally serve` that the caller started:

    TALLY_TEST_TARGET=127.0.0.1:50051 TALLY_TEST_TOKEN=<admin token> pytest client/tests

(tests/e2e/test_client_wheel.py starts the server, builds the wheel and runs them.)
A proxy in front of the server (proxy.py) loses, delays or counts calls.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import grpc
import pytest

from tally_client.v1 import account_pb2, account_pb2_grpc, common_pb2

from .proxy import Proxy

UPSCALE = "image.upscale"  # 10 units per quantity in the default catalog


@pytest.fixture(scope="session")
def target() -> str:
    address = os.environ.get("TALLY_TEST_TARGET")
    if not address:
        pytest.fail("set TALLY_TEST_TARGET to a running tally serve (and TALLY_TEST_TOKEN)")
    return address


@pytest.fixture(scope="session")
def token() -> str:
    return os.environ.get("TALLY_TEST_TOKEN", "")


@pytest.fixture(scope="session")
def accounts(target: str, token: str) -> Iterator[account_pb2_grpc.AccountServiceStub]:
    with grpc.insecure_channel(target) as channel:
        yield _Authorized(account_pb2_grpc.AccountServiceStub(channel), token)  # type: ignore[misc]


class _Authorized:
    """The generated stub with the admin token on every call."""

    def __init__(self, stub: account_pb2_grpc.AccountServiceStub, token: str) -> None:
        self._stub = stub
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None

    def __getattr__(self, name: str) -> object:
        method = getattr(self._stub, name)
        return lambda request: method(request, timeout=10, metadata=self._metadata)


@pytest.fixture
def account(accounts: account_pb2_grpc.AccountServiceStub) -> str:
    """A new account with 5,000 units this period."""
    return new_account(accounts, 5000)


def new_account(accounts: account_pb2_grpc.AccountServiceStub, allotment: int) -> str:
    account_id = f"client-{uuid.uuid4().hex[:12]}"
    accounts.CreateAccount(
        account_pb2.CreateAccountRequest(account_id=account_id, monthly_allotment=allotment)
    )
    return account_id


def set_budget(
    accounts: account_pb2_grpc.AccountServiceStub, account_id: str, limit_units: int
) -> str:
    reply = accounts.SetBudget(
        account_pb2.SetBudgetRequest(
            account_id=account_id,
            budget=common_pb2.Budget(operation=UPSCALE, limit_units=limit_units),
        )
    )
    return reply.budget.budget_id


@pytest.fixture
def proxy(target: str) -> Iterator[Proxy]:
    with Proxy(target) as running:
        yield running
