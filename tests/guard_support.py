"""Helpers for the hardening tests (validation, Lua guards, pitfalls, key slots):
error assertions and "nothing changed" snapshots of an account's shard."""

from __future__ import annotations

from collections.abc import Awaitable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from tally.store.leases import REAPER, SWEEPER
from tally_client.v1 import account_pb2, quota_pb2
from tests.support import Running

if TYPE_CHECKING:
    from tally_client.v1.account_pb2_grpc import AccountServiceAsyncStub
    from tally_client.v1.catalog_pb2_grpc import CatalogServiceAsyncStub
    from tally_client.v1.quota_pb2_grpc import QuotaServiceAsyncStub

MAX_UNITS = 2**53 - 1


@dataclass(frozen=True)
class AioStubs:
    """The running authority's stubs, typed as the asyncio stubs they are."""

    quota: QuotaServiceAsyncStub
    accounts: AccountServiceAsyncStub
    catalog: CatalogServiceAsyncStub


def aio(running: Running) -> AioStubs:
    return AioStubs(
        cast(Any, running.quota), cast(Any, running.accounts), cast(Any, running.catalog)
    )


async def rpc_error(call: Awaitable[Any]) -> grpc.aio.AioRpcError:
    """Awaits a call that must fail and returns its error."""
    try:
        answer = await call
    except grpc.aio.AioRpcError as error:
        return error
    raise AssertionError(f"the call succeeded but should have failed: {answer!r}")


def field_violations(error: grpc.aio.AioRpcError) -> list[str]:
    """The fields named by the google.rpc.BadRequest detail, if the server sent one."""
    status = rpc_status.from_call(error)
    if status is None:
        return []
    fields: list[str] = []
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields.extend(v.field for v in bad.field_violations)
    return fields


def assert_status(
    error: grpc.aio.AioRpcError, code: grpc.StatusCode, field: str | None = None
) -> None:
    """The error has `code`; when `field` is given, the BadRequest detail names it, and
    so does the message of an INVALID_ARGUMENT."""
    assert error.code() == code, f"expected {code.name}, got {error.code().name}: {error.details()}"
    if field is not None:
        message = error.details() or ""
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            assert field in message, f"message {message!r} does not name the field {field!r}"
        assert field in field_violations(error), (
            f"BadRequest detail names {field_violations(error)!r}, not {field!r}"
        )


@dataclass(frozen=True)
class Snapshot:
    """What an account's shard looks like: its balance, how many events its stream has
    ever taken, and every other key's DUMP."""

    balance: bytes | None
    events_added: tuple[int, ...]
    keys: dict[bytes, bytes | None]


def shards_of(running: Running, account_ids: Iterable[str]) -> list[int]:
    """The accounts' shards and shard 0 (the catalog's), in order."""
    keys = running.authority.store.keys
    return sorted({keys.shard_of(a) for a in account_ids} | {0})


def shard_prefixes(running: Running, account_ids: Iterable[str]) -> list[str]:
    keys = running.authority.store.keys
    return [keys.prefix(s) for s in shards_of(running, account_ids)]


async def events_added(redis: Any, stream: str) -> int:
    """Entries ever added to a stream. Unlike XLEN it ignores trimming by the ledger
    flusher, which may run at any time; without a stream it is 0."""
    if not await redis.exists(stream):
        return 0
    info = await redis.xinfo_stream(stream)
    return int(info["entries-added"])


async def snapshot(running: Running, account_id: str, *others: str) -> Snapshot:
    """Balance (None when the account does not exist), events ever added to the shards'
    streams and a DUMP of every other key of the shards (shard 0, the catalog, included)
    but the background jobs' leases, which their holders renew on their own schedule."""
    store = running.authority.store
    try:
        balance: bytes | None = (
            await aio(running).quota.GetBalance(quota_pb2.GetBalanceRequest(account_id=account_id))
        ).SerializeToString(deterministic=True)
    except grpc.aio.AioRpcError as error:
        assert error.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT)
        balance = None
    redis = store.redis
    prefixes = shard_prefixes(running, [account_id, *others])
    added = tuple([await events_added(redis, p + "events") for p in prefixes])
    dumped: dict[bytes, bytes | None] = {}
    for shard, prefix in zip(shards_of(running, [account_id, *others]), prefixes, strict=True):
        leases = {store.keys.shard_lease(shard, job).encode() for job in (REAPER, SWEEPER)}
        async for key in redis.scan_iter(match=prefix + "*", count=1000):
            if key not in leases and await redis.type(key) != b"stream":
                dumped[key] = await redis.dump(key)
    return Snapshot(balance, added, dumped)


async def create_account(running: Running, account_id: str, **fields: Any) -> account_pb2.Account:
    fields.setdefault("monthly_allotment", 1000)
    answer: account_pb2.CreateAccountResponse = await aio(running).accounts.CreateAccount(
        account_pb2.CreateAccountRequest(account_id=account_id, **fields)
    )
    return answer.account


async def balance(running: Running, account_id: str) -> Any:
    reply = await aio(running).quota.GetBalance(quota_pb2.GetBalanceRequest(account_id=account_id))
    return reply.balance


def assert_books(b: Any) -> None:
    """granted = available + held + charged - refunded + expired (design notes, section 1)."""
    assert b.units_granted_total == (
        b.available + b.held + b.units_charged_total - b.units_refunded_total
        + b.units_expired_total
    ), b
