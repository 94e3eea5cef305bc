"""The known pitfalls of design notes section 7, each checked against a real redis-server:
FUNCTION FLUSH, a connection dropped mid-script (no client retry), eviction policies,
deadlines, Redis going down and coming back, and hold expiry by the reaper."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import msgpack
import pytest
from google.protobuf.duration_pb2 import Duration

from tally import app
from tally.clock import ManualClock
from tally.domain.errors import DeadlineExceeded
from tally.store.client import ScriptRunner, connect
from tally_client.v1 import account_pb2, quota_pb2, quota_pb2_grpc
from tests.guard_support import (
    aio,
    assert_books,
    assert_status,
    balance,
    create_account,
    events_added,
    rpc_error,
    snapshot,
)
from tests.support import (
    T0_MS,
    RedisProcess,
    Running,
    free_port,
    settings,
    start_running,
    stop_running,
    unique,
)

UNAVAILABLE = grpc.StatusCode.UNAVAILABLE


@contextlib.asynccontextmanager
async def serving(url: str, data_dir: Path, **overrides: Any) -> AsyncIterator[Running]:
    """An authority on `url`. When the test body fails, a failure to stop is swallowed so
    the body's own failure is the one reported; otherwise stopping must succeed too."""
    running = await start_running(url, data_dir=str(data_dir), **overrides)
    try:
        yield running
    except BaseException:
        with contextlib.suppress(Exception):
            await stop_running(running)
        raise
    await stop_running(running)


def reserve_request(account_id: str, key: str, quantity: int = 1, **kw: Any) -> Any:
    return quota_pb2.ReserveRequest(
        account_id=account_id, operation="image.upscale", quantity=quantity,
        idempotency_key=key, **kw,
    )


# --- a. FUNCTION FLUSH --------------------------------------------------------------


async def library_names(redis: Any) -> set[str]:
    """The Functions libraries Redis holds (FUNCTION LIST: a list of name/value pairs each)."""
    libraries = [dict(zip(lib[::2], lib[1::2], strict=True)) for lib in await redis.function_list()]
    return {lib[b"library_name"].decode() for lib in libraries}


async def test_function_flush_is_survived(own_redis: RedisProcess, tmp_path: Path) -> None:
    """Proves that after FUNCTION FLUSH under a live server (as after a restart without
    persistence), scripts are re-loaded on "function not found": the next Reserve,
    GetBalance (FCALL_RO) and Commit succeed and move units once."""
    async with serving(own_redis.url, tmp_path / "data") as running:
        account_id = unique()
        await create_account(running, account_id)
        first = await aio(running).quota.Reserve(reserve_request(account_id, "before-flush"))
        redis = running.authority.store.redis
        scripts = running.authority.store.runner.scripts
        await redis.function_flush()
        assert await library_names(redis) == set()

        second = await aio(running).quota.Reserve(reserve_request(account_id, "after-flush", 2))
        assert not second.replayed
        b = await balance(running, account_id)  # balance.lua runs as FCALL_RO
        assert (b.held, b.available) == (30, 970)
        await redis.function_flush()
        committed = await aio(running).quota.Commit(
            quota_pb2.CommitRequest(reservation_id=first.reservation_id)
        )
        assert committed.units_charged == 10
        b = await balance(running, account_id)
        assert (b.held, b.available, b.units_charged_total) == (20, 970, 10)
        assert_books(b)
        assert {scripts["commit"].function, scripts["balance"].function} <= await library_names(
            redis)


# --- b. a connection dropped while the script runs ------------------------------------


def parse_commands(buffer: bytearray) -> list[list[bytes]]:
    """Takes every complete RESP command off the front of `buffer`."""
    commands: list[list[bytes]] = []
    while True:
        pos = 0
        if not buffer.startswith(b"*"):
            return commands
        end = buffer.find(b"\r\n", pos)
        if end < 0:
            return commands
        count = int(buffer[1:end])
        pos = end + 2
        args: list[bytes] = []
        for _ in range(count):
            end = buffer.find(b"\r\n", pos)
            if end < 0 or buffer[pos : pos + 1] != b"$":
                return commands
            length = int(buffer[pos + 1 : end])
            start = end + 2
            if len(buffer) < start + length + 2:
                return commands
            args.append(bytes(buffer[start : start + length]))
            pos = start + length + 2
        del buffer[:pos]
        commands.append(args)


@dataclass
class DroppingProxy:
    """A TCP proxy in front of Redis. Armed with a script's function, it forwards the
    next FCALL of that function to Redis, lets Redis run it, then closes the client's
    connection instead of relaying the reply."""

    redis_port: int
    port: int = 0
    fcall_seen: Counter[str] = field(default_factory=Counter)
    armed_function: str | None = None
    dropped: asyncio.Event = field(default_factory=asyncio.Event)
    _server: asyncio.Server | None = None
    _tasks: set[asyncio.Task[Any]] = field(default_factory=set)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    def arm(self, function: str) -> None:
        self.dropped.clear()
        self.armed_function = function

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        redis_r, redis_w = await asyncio.open_connection("127.0.0.1", self.redis_port)
        drop_next_reply = asyncio.Event()

        async def upstream() -> None:
            pending = bytearray()
            while data := await client_r.read(65536):
                pending.extend(data)
                for command in parse_commands(pending):
                    if command[0].upper() in (b"FCALL", b"FCALL_RO"):
                        function = command[1].decode()
                        self.fcall_seen[function] += 1
                        if function == self.armed_function:
                            self.armed_function = None
                            drop_next_reply.set()
                redis_w.write(data)
                await redis_w.drain()

        async def downstream() -> None:
            while data := await redis_r.read(65536):
                if drop_next_reply.is_set():
                    self.dropped.set()
                    return  # the reply is lost with the connection
                client_w.write(data)
                await client_w.drain()

        pumps = [asyncio.create_task(upstream()), asyncio.create_task(downstream())]
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            for writer in (client_w, redis_w):
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
            self._tasks.discard(task)


@dataclass(frozen=True)
class DropCase:
    script: str
    prepare: Callable[[Running, str], Awaitable[dict[str, Any]]]
    call: Callable[[Running, str, dict[str, Any]], Awaitable[Any]]


async def _nothing(running: Running, account_id: str) -> dict[str, Any]:
    return {}


async def _a_hold(running: Running, account_id: str) -> dict[str, Any]:
    held = await aio(running).quota.Reserve(reserve_request(account_id, "prep", 3))
    return {"rid": held.reservation_id}


async def _a_charge(running: Running, account_id: str) -> dict[str, Any]:
    charged = await aio(running).quota.Charge(quota_pb2.ChargeRequest(
        account_id=account_id, operation="image.upscale", quantity=3, idempotency_key="prep"))
    return {"rid": charged.reservation_id}


DROP_CASES = [
    DropCase("reserve", _nothing,
             lambda r, a, p: aio(r).quota.Reserve(reserve_request(a, "drop", 2))),
    DropCase("charge", _nothing,
             lambda r, a, p: aio(r).quota.Charge(quota_pb2.ChargeRequest(
                 account_id=a, operation="image.upscale", quantity=2, idempotency_key="drop"))),
    DropCase("commit", _a_hold,
             lambda r, a, p: aio(r).quota.Commit(quota_pb2.CommitRequest(
                 reservation_id=p["rid"], quantity=2))),
    DropCase("refund", _a_charge,
             lambda r, a, p: aio(r).quota.Refund(quota_pb2.RefundRequest(
                 reservation_id=p["rid"], units=20, idempotency_key="drop"))),
    DropCase("purchase", _nothing,
             lambda r, a, p: aio(r).accounts.PurchaseUnits(account_pb2.PurchaseUnitsRequest(
                 account_id=a, units=500, idempotency_key="drop"))),
]

# What the account looks like once the dropped call has taken effect exactly once
# (1000 units allotted; upscale costs 10 a unit).
EXPECTED = {
    "reserve": {"available": 980, "held": 20, "units_charged_total": 0},
    "charge": {"available": 980, "held": 0, "units_charged_total": 20},
    "commit": {"available": 980, "held": 0, "units_charged_total": 20},
    "refund": {"available": 990, "held": 0, "units_charged_total": 30,
               "units_refunded_total": 20},
    "purchase": {"available": 1500, "held": 0, "units_granted_total": 1500},
}


@pytest.mark.parametrize("case", DROP_CASES, ids=[c.script for c in DROP_CASES])
async def test_dropped_connection_never_moves_units_twice(
    module_redis: RedisProcess, tmp_path: Path, case: DropCase
) -> None:
    """Proves a connection lost after Redis ran the script but before the reply arrived is
    UNAVAILABLE with exactly one FCALL sent (no client-side retry), and the caller's
    retry with the same idempotency key replays: the units moved exactly once."""
    proxy = DroppingProxy(module_redis.port)
    await proxy.start()
    try:
        async with serving(proxy.url, tmp_path / "data") as running:
            account_id = unique()
            await create_account(running, account_id)
            prepared = await case.prepare(running, account_id)
            function = running.authority.store.runner.scripts[case.script].function
            stream = running.authority.store.keys.events(
                running.authority.store.keys.shard_of(account_id))
            added = await events_added(running.authority.store.redis, stream)
            seen = proxy.fcall_seen[function]
            proxy.arm(function)

            error = await rpc_error(case.call(running, account_id, prepared))
            assert_status(error, UNAVAILABLE)
            assert proxy.dropped.is_set(), "the proxy never dropped a reply"
            await asyncio.sleep(0.2)  # a late client-side retry would show up here
            assert proxy.fcall_seen[function] == seen + 1, "FCALL was sent more than once"
            assert await events_added(running.authority.store.redis, stream) > added, (
                "the script did not run before the connection dropped")

            retried = await case.call(running, account_id, prepared)
            if hasattr(retried, "replayed"):
                assert retried.replayed, "the retry moved units again instead of replaying"
            b = await balance(running, account_id)
            for name, value in EXPECTED[case.script].items():
                assert getattr(b, name) == value, (name, b)
            assert_books(b)
    finally:
        await proxy.stop()


# --- c. an eviction policy that can drop keys -------------------------------------------


@pytest.mark.parametrize("policy", ["allkeys-lru", "volatile-ttl"])
async def test_refuses_to_start_when_redis_may_evict(tmp_path: Path, policy: str) -> None:
    """Proves app.start raises a RuntimeError naming maxmemory-policy against a Redis whose
    eviction policy can drop keys (balances, or the idempotency records that carry a TTL),
    and writes nothing to it."""
    redis = RedisProcess(tmp_path / "redis", "--maxmemory-policy", policy)
    redis.start()
    try:
        with pytest.raises(RuntimeError, match="maxmemory-policy"):
            await app.start(
                settings(redis.url, data_dir=str(tmp_path / "data")), clock=ManualClock(T0_MS)
            )
        probe = connect(redis.url, socket_timeout_s=2, max_connections=2)
        try:
            assert await probe.dbsize() == 0
        finally:
            await probe.aclose()
    finally:
        redis.stop()


# --- d. deadlines --------------------------------------------------------------------


async def test_a_deadline_already_past_moves_nothing(
    own_redis: RedisProcess, tmp_path: Path
) -> None:
    """Proves Reserve, Charge and PurchaseUnits calls whose deadline has already passed fail
    with DEADLINE_EXCEEDED and leave the balance and the event stream unchanged."""
    async with serving(own_redis.url, tmp_path / "data") as running:
        account_id = unique()
        await create_account(running, account_id)
        before = await snapshot(running, account_id)
        for timeout in (-1.0, -0.001):
            for call in (
                aio(running).quota.Reserve(reserve_request(account_id, "late"), timeout=timeout),
                aio(running).quota.Charge(quota_pb2.ChargeRequest(
                    account_id=account_id, operation="image.upscale", idempotency_key="late"),
                    timeout=timeout),
                aio(running).accounts.PurchaseUnits(account_pb2.PurchaseUnitsRequest(
                    account_id=account_id, units=5, idempotency_key="late"), timeout=timeout),
            ):
                assert_status(await rpc_error(call), grpc.StatusCode.DEADLINE_EXCEEDED)
        await asyncio.sleep(0.1)
        assert await snapshot(running, account_id) == before


async def test_tiny_deadlines_are_safe_to_retry(own_redis: RedisProcess, tmp_path: Path) -> None:
    """Proves Reserve calls with a near-zero deadline (1us, 0) either succeed or fail
    DEADLINE_EXCEEDED, and a retry with the same key without deadline lands each hold
    exactly once. (gRPC rounds such a deadline up, so the server may legitimately have
    started the script with a fraction of a millisecond left: DEADLINE_EXCEEDED means
    "outcome unknown", like UNAVAILABLE.)"""
    async with serving(own_redis.url, tmp_path / "data") as running:
        account_id = unique()
        await create_account(running, account_id)
        keys = [f"tiny-{i}" for i in range(10)]
        for i, key in enumerate(keys):
            with contextlib.suppress(grpc.aio.AioRpcError):
                await aio(running).quota.Reserve(
                    reserve_request(account_id, key), timeout=0.0 if i % 2 else 0.000001)
        await asyncio.sleep(0.1)
        for key in keys:
            await aio(running).quota.Reserve(reserve_request(account_id, key))
        b = await balance(running, account_id)
        assert (b.held, b.available) == (100, 900)
        assert_books(b)


def _fcalls(info: dict[str, Any]) -> int:
    return sum(
        int(stats["calls"]) for name, stats in info.items()
        if name in ("cmdstat_fcall", "cmdstat_fcall_ro")
    )


async def test_server_never_starts_a_mutation_after_the_deadline(
    own_redis: RedisProcess, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Proves a Reserve that reaches the server only after its deadline passed (the
    server's event loop was busy) runs no script: DEADLINE_EXCEEDED, no FCALL sent,
    balance and stream unchanged."""
    caplog.set_level(logging.INFO, logger="tally.api")
    async with serving(own_redis.url, tmp_path / "data") as running:
        account_id = unique()
        await create_account(running, account_id)
        redis = running.authority.store.redis
        before = await snapshot(running, account_id)
        calls_before = _fcalls(await redis.info("commandstats"))
        outcome: dict[str, Any] = {}

        def call_from_another_thread() -> None:
            with grpc.insecure_channel(running.authority.address) as channel:
                stub = quota_pb2_grpc.QuotaServiceStub(channel)
                try:
                    stub.Reserve(reserve_request(account_id, "busy"), timeout=0.3)
                    outcome["code"] = grpc.StatusCode.OK
                except grpc.RpcError as error:
                    outcome["code"] = error.code()

        caller = threading.Thread(target=call_from_another_thread)
        caller.start()
        # The server shares this event loop: keep it busy past the caller's deadline.
        time.sleep(0.6)  # noqa: ASYNC251
        caller.join(5)
        await asyncio.sleep(0.3)  # let the server see the expired call, if it ever does
        assert outcome.get("code") == grpc.StatusCode.DEADLINE_EXCEEDED
        assert _fcalls(await redis.info("commandstats")) == calls_before
        assert await snapshot(running, account_id) == before


async def test_script_runner_refuses_a_spent_deadline_without_touching_redis() -> None:
    """Proves ScriptRunner.run with timeout_s=0 (or less) raises DeadlineExceeded before
    any connection is made (against a port where nothing listens, any attempt would be
    a connection error instead)."""
    dead = connect(f"redis://127.0.0.1:{free_port()}/0", socket_timeout_s=1, max_connections=1)
    runner = ScriptRunner(dead)
    try:
        for timeout in (0.0, -0.5):
            with pytest.raises(DeadlineExceeded):
                await runner.run(
                    "reserve", ["tally:{s00}:acct:x"], {"now": T0_MS}, timeout_s=timeout
                )
        assert msgpack.packb({"now": T0_MS})  # the payload itself was fine
    finally:
        await dead.aclose()


# --- e. Redis down, and back -----------------------------------------------------------


async def test_redis_down_is_unavailable_and_recovers(
    own_redis: RedisProcess, tmp_path: Path
) -> None:
    """Proves that while Redis is killed (SIGKILL) calls fail UNAVAILABLE (never UNKNOWN or
    INTERNAL), and once the same Redis restarts (AOF, appendfsync always) the same server
    serves the very next calls (a burst of 8 concurrent Reserves, although its pool held
    connections from before the crash), with every acknowledged hold intact."""
    async with serving(own_redis.url, tmp_path / "data") as running:
        account_id = unique()
        await create_account(running, account_id)
        acknowledged = await aio(running).quota.Reserve(reserve_request(account_id, "ack", 4))
        # A busy server's pool: several connections, idle when Redis dies.
        redis = running.authority.store.redis
        await asyncio.gather(*(redis.ping() for _ in range(8)))

        own_redis.kill()
        for call in (
            aio(running).quota.Reserve(reserve_request(account_id, "during-outage")),
            aio(running).quota.Charge(quota_pb2.ChargeRequest(
                account_id=account_id, operation="image.upscale", idempotency_key="c")),
            aio(running).quota.GetBalance(quota_pb2.GetBalanceRequest(account_id=account_id)),
            aio(running).quota.Commit(
                quota_pb2.CommitRequest(reservation_id=acknowledged.reservation_id)),
            aio(running).accounts.PurchaseUnits(account_pb2.PurchaseUnitsRequest(
                account_id=account_id, units=5, idempotency_key="p")),
        ):
            assert_status(await rpc_error(call), UNAVAILABLE)

        own_redis.start()
        outcomes = await asyncio.gather(
            *(aio(running).quota.Reserve(reserve_request(account_id, f"after-{i}"))
              for i in range(8)),
            return_exceptions=True,
        )
        failed = [o for o in outcomes if isinstance(o, BaseException)]
        assert not failed, f"{len(failed)} of 8 calls failed after Redis came back: {failed[0]}"
        replay = await aio(running).quota.Reserve(reserve_request(account_id, "ack", 4))
        assert replay.replayed and replay.reservation_id == acknowledged.reservation_id
        retried = await aio(running).quota.Reserve(reserve_request(account_id, "during-outage"))
        assert not retried.replayed  # the call that failed during the outage never ran
        b = await balance(running, account_id)
        assert (b.held, b.available) == (130, 870)
        assert_books(b)


async def test_reaper_survives_a_redis_outage(own_redis: RedisProcess, tmp_path: Path) -> None:
    """Proves the reaper keeps working through a Redis outage: a 1s hold made before Redis
    is killed for several reaper passes is still released once Redis is back and the clock
    has passed its expiry, and the authority then stops cleanly."""
    async with serving(own_redis.url, tmp_path / "data") as running:
        account_id = unique()
        await create_account(running, account_id)
        short = await aio(running).quota.Reserve(
            reserve_request(account_id, "short", ttl=Duration(seconds=1)))
        own_redis.kill()
        await asyncio.sleep(0.3)  # several reaper passes (every 50ms) meet the outage
        own_redis.start()
        running.clock.advance(1_001)
        assert await wait_for_expiry(running, short.reservation_id, 2.0), (
            "the reaper did not release an expired hold after Redis came back")


# --- f. the reaper ---------------------------------------------------------------------


async def hold_state(running: Running, reservation_id: str) -> str:
    """A reservation's state: held ones are in their account's held hash, closed
    ones under their own key."""
    store = running.authority.store
    account_id = store.keys.parse_reservation_id(reservation_id).account_id
    raw = await store.redis.hget(store.keys.held(account_id), reservation_id)
    if raw is None:
        raw = await store.redis.get(store.keys.reservation(reservation_id))
    record = msgpack.unpackb(raw, raw=False, strict_map_key=False)
    return str(record["state"])


async def wait_for_expiry(running: Running, reservation_id: str, within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if await hold_state(running, reservation_id) == "EXPIRED":
            return True
        await asyncio.sleep(0.02)
    return False


async def test_reaper_releases_an_idle_accounts_hold(
    own_redis: RedisProcess, tmp_path: Path
) -> None:
    """Proves a 1-second hold on an account nobody touches again is released by the reaper
    once the clock passes its expiry (not a millisecond before): the record is EXPIRED, the
    hold indexes are empty, an 'expire' event is in the stream and the units are back."""
    async with serving(own_redis.url, tmp_path / "data") as running:
        account_id = unique()
        await create_account(running, account_id)
        store = running.authority.store
        held = await aio(running).quota.Reserve(
            reserve_request(account_id, "short", 3, ttl=Duration(seconds=1)))
        rid = held.reservation_id
        shard = store.keys.shard_of(account_id)
        holds_key = store.keys.account_keys(account_id)[1]

        running.clock.advance(999)
        await asyncio.sleep(0.3)  # several reaper passes (every 50ms)
        assert await hold_state(running, rid) == "HELD"
        assert await store.redis.zscore(store.keys.expiries(shard), rid) is not None

        running.clock.advance(1)
        assert await wait_for_expiry(running, rid, 2.0), "the reaper did not release the hold"
        assert await store.redis.zcard(holds_key) == 0
        assert await store.redis.zscore(store.keys.expiries(shard), rid) is None
        events = await store.redis.xrange(store.keys.events(shard))
        expired = [f for _, f in events
                   if f.get(b"type") == b"expire" and f.get(b"reservation_id") == rid.encode()]
        if not expired:  # the flusher may have trimmed it already: ask the ledger
            expired = [e for e in await ledger_types(running, account_id) if e == "expire"]
        assert len(expired) == 1
        b = await balance(running, account_id)
        assert (b.held, b.available) == (0, 1000)
        assert_books(b)


async def ledger_types(running: Running, account_id: str) -> list[str]:
    """Event types of the account as the ledger has them (empty without a ledger)."""
    try:
        answer = await aio(running).accounts.ListLedgerEntries(
            account_pb2.ListLedgerEntriesRequest(account_id=account_id, page_size=100))
    except grpc.aio.AioRpcError:
        return []
    return [e.type for e in answer.entries]
