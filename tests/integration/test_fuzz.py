"""The fuzz test: random and mutated messages for every RPC, and raw invalid bytes,
against the real in-process server; it never crashes, never answers UNKNOWN or
INTERNAL, and afterwards every account's books balance and Redis and the ledger agree.

Messages are built by hypothesis from the protobuf descriptors (every field of every
request type, boundary values mixed with random ones, names of the accounts and the
reservation the test set up, so some calls do real work). Raw bytes go through a
generic channel call with no serializer. The bounded form runs in `make test`;
TALLY_FUZZ_EXAMPLES=<n> runs n examples per RPC (the long form).

Callers are parametrized (`CALLERS`): the metadata each call carries; with auth off
there is one, anonymous. Token callers join it when authentication lands.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor as pbd
from google.protobuf import message_factory
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tally.api.watch import POSITION_METADATA
from tally.auth.book import TokenBook
from tally.auth.principal import Role
from tally.ledger import recovery
from tally.store.state_images import StateImages
from tally.store.token_store import TokenStore
from tally_client.v1 import account_pb2, catalog_pb2, quota_pb2, usage_pb2
from tests.guard_support import assert_status
from tests.integration.test_watch_limits import close_watches
from tests.support import RedisProcess, Running, start_running, stop_running

EXAMPLES = int(os.environ.get("TALLY_FUZZ_EXAMPLES", "0")) or 12
RAW_EXAMPLES = EXAMPLES * 4
FORBIDDEN = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
ACCOUNTS = ("fuzz-a", "fuzz-b")
OPERATION = "fuzz.op"

Metadata = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Caller:
    """Who fuzzes: auth off (every call an unscoped admin), or auth required and a
    token of this role (None: no token at all), scoped to the first account or not."""

    auth: str
    role: Role | None = None
    scoped: bool = False


CALLERS: dict[str, Caller] = {
    "anonymous": Caller("off"),
    "no token": Caller("required"),
    "scoped worker": Caller("required", Role.WORKER, scoped=True),
    "admin": Caller("required", Role.ADMIN),
}


@dataclass(frozen=True)
class Rpc:
    path: str  # /tally.v1.QuotaService/Reserve
    request: type[Message]
    response: type[Message]
    streaming: bool


def every_rpc() -> list[Rpc]:
    rpcs = []
    for module in (quota_pb2, account_pb2, catalog_pb2, usage_pb2):
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                rpcs.append(Rpc(
                    path=f"/{service.full_name}/{method.name}",
                    request=message_factory.GetMessageClass(method.input_type),
                    response=message_factory.GetMessageClass(method.output_type),
                    streaming=method.server_streaming,
                ))
    return rpcs


RPCS = every_rpc()

# --- strategies from descriptors -------------------------------------------------

_INT_BOUNDS = {
    pbd.FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    pbd.FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    pbd.FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    pbd.FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    pbd.FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    pbd.FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    pbd.FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    pbd.FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    pbd.FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    pbd.FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}
_EDGES = (0, 1, -1, 2, 1000, 2**31 - 1, -(2**31), 2**53 - 1, 2**53, 2**63 - 1, -(2**63))


def _integers(field_type: int) -> st.SearchStrategy[int]:
    low, high = _INT_BOUNDS[field_type]
    edges = [e for e in _EDGES if low <= e <= high]
    return st.one_of(st.sampled_from(edges), st.integers(low, high))


def _strings(known: tuple[str, ...]) -> st.SearchStrategy[str]:
    """Known names (so some calls do real work), edges of the text limits, and any text."""
    edges = ("", "a" * 128, "a" * 129, "a" * 64, "x" * 1025, "\x00", "..", "-a", "A.b_c@d",
             "label:tier=pro", "operation:fuzz.op", "\u202e\U0001f600", "LABEL:tier", "DAY")
    return st.one_of(st.sampled_from(known + edges), st.text(max_size=300))


def _scalar(field: pbd.FieldDescriptor, known: tuple[str, ...]) -> st.SearchStrategy[Any]:
    kind = field.type
    if kind == pbd.FieldDescriptor.TYPE_STRING:
        return _strings(known)
    if kind == pbd.FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=64)
    if kind == pbd.FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if kind == pbd.FieldDescriptor.TYPE_ENUM:
        values = [v.number for v in field.enum_type.values]
        return st.one_of(st.sampled_from(values), st.integers(-(2**31), 2**31 - 1))
    if kind in (pbd.FieldDescriptor.TYPE_DOUBLE, pbd.FieldDescriptor.TYPE_FLOAT):
        return st.floats(width=32 if kind == pbd.FieldDescriptor.TYPE_FLOAT else 64)
    if kind == pbd.FieldDescriptor.TYPE_MESSAGE:
        return messages(field.message_type, known)
    return _integers(kind)


def _is_map(field: pbd.FieldDescriptor) -> bool:
    return field.type == pbd.FieldDescriptor.TYPE_MESSAGE and (
        field.message_type.GetOptions().map_entry
    )


def messages(descriptor: pbd.Descriptor, known: tuple[str, ...]) -> st.SearchStrategy[Message]:
    """Any message of `descriptor`'s type: each field set or not, maps and lists up to
    past their limits."""
    cls = message_factory.GetMessageClass(descriptor)

    @st.composite
    def build(draw: st.DrawFn) -> Message:
        fields: dict[str, Any] = {}
        for field in descriptor.fields:
            if not draw(st.booleans()):
                continue
            if _is_map(field):
                key, value = field.message_type.fields_by_name["key"], (
                    field.message_type.fields_by_name["value"]
                )
                fields[field.name] = draw(st.dictionaries(
                    _scalar(key, known), _scalar(value, known), max_size=40
                ))
            elif field.is_repeated:
                fields[field.name] = draw(st.lists(_scalar(field, known), max_size=20))
            else:
                fields[field.name] = draw(_scalar(field, known))
        return cls(**fields)

    return build()


def _mutated(seed: bytes) -> st.SearchStrategy[bytes]:
    """`seed` with bytes flipped, cut short or spliced with random ones."""
    @st.composite
    def mutate(draw: st.DrawFn) -> bytes:
        data = bytearray(seed)
        for _ in range(draw(st.integers(1, 4))):
            at = draw(st.integers(0, max(0, len(data) - 1)))
            action = draw(st.sampled_from(("flip", "cut", "splice")))
            if action == "flip" and data:
                data[at] ^= draw(st.integers(1, 255))
            elif action == "cut":
                del data[at:]
            else:
                data[at:at] = draw(st.binary(min_size=1, max_size=16))
        return bytes(data)

    return mutate()


# --- the server and calls ------------------------------------------------------------


@dataclass
class Target:
    loop: asyncio.AbstractEventLoop
    running: Running
    known: tuple[str, ...]  # account ids, the reservation id, the operation
    metadata: Metadata

    def call(self, rpc: Rpc, request: Message | bytes) -> grpc.StatusCode:
        return self.loop.run_until_complete(self._call(rpc, request))

    async def _call(self, rpc: Rpc, request: Message | bytes) -> grpc.StatusCode:
        channel = self.running.stubs.channel
        raw = isinstance(request, bytes)
        serializer: Callable[[Any], bytes] | None = None if raw else rpc.request.SerializeToString
        if rpc.streaming:
            stream = channel.unary_stream(
                rpc.path, request_serializer=serializer, response_deserializer=None
            )(request, metadata=self.metadata)
            metadata = dict(await stream.initial_metadata() or ())
            if POSITION_METADATA in metadata:  # a watch that started: it is not refused
                stream.cancel()
                return grpc.StatusCode.OK
            return await stream.code()
        unary = channel.unary_unary(
            rpc.path, request_serializer=serializer, response_deserializer=None
        )
        try:
            await unary(request, metadata=self.metadata)
        except grpc.aio.AioRpcError as error:
            return error.code()
        return grpc.StatusCode.OK


@pytest.fixture(params=sorted(CALLERS))
def target(request: pytest.FixtureRequest, own_redis: RedisProcess) -> Iterator[Target]:
    """The server on an event loop of its own (hypothesis drives it from plain
    functions), with two accounts, a price and an open reservation to aim at."""
    caller = CALLERS[request.param]
    loop = asyncio.new_event_loop()
    running = loop.run_until_complete(start_running(own_redis.url, auth=caller.auth))
    try:
        admin = loop.run_until_complete(_bearer(running, Role.ADMIN, ()))
        reservation = loop.run_until_complete(_seed(running, admin))
        metadata: Metadata = ()
        if caller.role is not None:
            scope = ACCOUNTS[:1] if caller.scoped else ()
            metadata = loop.run_until_complete(_bearer(running, caller.role, scope))
        yield Target(loop, running, (*ACCOUNTS, reservation, OPERATION), metadata)
        loop.run_until_complete(_books_balance(running, admin))
    finally:
        loop.run_until_complete(stop_running(running))
        # watches the test cancelled may still be ending (their Redis reads unwinding)
        loop.run_until_complete(close_watches(asyncio.all_tasks(loop)))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


async def _bearer(running: Running, role: Role, accounts: tuple[str, ...]) -> Metadata:
    """The authorization metadata of a new token (made as `tally tokens create` does)."""
    store = running.authority.store
    book = TokenBook(running.authority.ledger, TokenStore(store.redis), store.clock)
    token = await book.create(role, accounts, f"fuzz {role}", 0, by="fuzz")
    return (("authorization", f"Bearer {token.text}"),)


async def _seed(running: Running, admin: Metadata) -> str:
    await running.catalog.SetPrice(
        catalog_pb2.SetPriceRequest(operation=OPERATION, units_per_quantity=3), metadata=admin
    )
    for account_id in ACCOUNTS:
        await running.accounts.CreateAccount(
            account_pb2.CreateAccountRequest(account_id=account_id, monthly_allotment=10_000),
            metadata=admin,
        )
    held = await running.quota.Reserve(quota_pb2.ReserveRequest(
        account_id=ACCOUNTS[0], operation=OPERATION, quantity=2, idempotency_key="seed"
    ), metadata=admin)
    return held.reservation_id


async def _books_balance(running: Running, admin: Metadata) -> None:
    """Every account: granted = available + held + charged - refunded + expired, no
    grant below zero; and Redis and the ledger agree on all of them."""
    images = StateImages.of(running.authority.store)
    account_ids = await images.account_ids()
    assert set(ACCOUNTS) <= set(account_ids)
    for account_id in account_ids:
        b = (await running.quota.GetBalance(
            quota_pb2.GetBalanceRequest(account_id=account_id), metadata=admin
        )).balance
        assert b.units_granted_total == (
            b.available + b.overage_used + b.held + b.overage_held + b.units_charged_total
            - b.units_refunded_total + b.units_expired_total
        ) or b.units_granted_total == (
            b.available + b.held + b.units_charged_total - b.units_refunded_total
            + b.units_expired_total
        ), f"{account_id}: the books do not balance: {b}"
        assert all(g.units_remaining >= 0 for g in b.grants), f"{account_id}: {b}"
    authority = running.authority
    report = await recovery.verify(images, authority.ledger, authority.flusher, lambda _: None)
    assert not report.differences, report.differences


FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES, deadline=None, database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.mark.parametrize("rpc", RPCS, ids=lambda rpc: rpc.path.rpartition(".")[2])
@pytest.mark.timeout(600)
def test_random_messages_never_break_the_server(target: Target, rpc: Rpc) -> None:
    """Proves random messages of every field of the RPC's request (edges of every
    limit included) are answered with a deliberate status, never UNKNOWN or INTERNAL."""

    @FUZZ_SETTINGS
    @given(request=messages(rpc.request.DESCRIPTOR, target.known))
    def one(request: Message) -> None:
        code = target.call(rpc, request)
        assert code not in FORBIDDEN, f"{rpc.path} answered {code.name} to {request}"

    one()


@pytest.mark.parametrize("rpc", RPCS, ids=lambda rpc: rpc.path.rpartition(".")[2])
@pytest.mark.timeout(600)
def test_raw_and_mutated_bytes_never_break_the_server(target: Target, rpc: Rpc) -> None:
    """Proves bytes that are no valid request (random, or a valid request mutated)
    are answered with a deliberate status, never UNKNOWN or INTERNAL."""
    seed = rpc.request(**_seed_fields(rpc.request.DESCRIPTOR, target.known)).SerializeToString()

    @settings(FUZZ_SETTINGS, max_examples=RAW_EXAMPLES)
    @given(raw=st.one_of(st.binary(max_size=200), _mutated(seed)))
    def one(raw: bytes) -> None:
        code = target.call(rpc, raw)
        assert code not in FORBIDDEN, f"{rpc.path} answered {code.name} to {raw!r}"

    one()


def _seed_fields(descriptor: pbd.Descriptor, known: tuple[str, ...]) -> dict[str, Any]:
    """A plausible request to mutate: its string fields named after the test's account."""
    return {
        f.name: known[0] for f in descriptor.fields
        if f.type == pbd.FieldDescriptor.TYPE_STRING
        and not f.is_repeated
    }


async def test_undecodable_bytes_are_invalid_argument_naming_the_request(
    running: Running,
) -> None:
    """Proves a Reserve whose bytes do not decode (a string field holding invalid UTF-8)
    is INVALID_ARGUMENT naming `request`, and the account's balance did not move."""
    account_id = f"fuzz-{os.urandom(4).hex()}"
    await running.accounts.CreateAccount(
        account_pb2.CreateAccountRequest(account_id=account_id, monthly_allotment=100)
    )
    valid = quota_pb2.ReserveRequest(
        account_id=account_id, operation="image.upscale", idempotency_key="k"
    ).SerializeToString()
    undecodable = valid.replace(b"k", b"\xff")  # the idempotency key, no longer UTF-8
    reserve = running.stubs.channel.unary_unary(
        "/tally.v1.QuotaService/Reserve", request_serializer=None, response_deserializer=None
    )
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await reserve(undecodable)
    assert_status(refused.value, grpc.StatusCode.INVALID_ARGUMENT, "request")
    balance = (await running.quota.GetBalance(
        quota_pb2.GetBalanceRequest(account_id=account_id)
    )).balance
    assert (balance.available, balance.held) == (100, 0)
