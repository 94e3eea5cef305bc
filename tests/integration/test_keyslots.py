"""Redis Cluster readiness, watched with MONITOR while a server runs a varied workload:
every key a script touches is one of the keys its call declared (Redis Cluster and the
proxies in front of managed Redis route and check a script by those), and lives in the
hash slot of the script's first key."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import pytest_asyncio
from google.protobuf.duration_pb2 import Duration

from tally.ledger.recovery import recover
from tally.store.contract import ClosePeriodRequest
from tally.store.scripts import SCRIPT_NAMES
from tally.store.state_images import StateImages
from tally_client.v1 import (
    account_pb2,
    catalog_pb2,
    common_pb2,
    quota_pb2,
    usage_pb2,
    usage_pb2_grpc,
)
from tests.guard_support import aio, create_account
from tests.support import RedisProcess, Running, start_running, stop_running, unique

CLUSTER_SLOTS = 16384


def crc16_xmodem(data: bytes) -> int:
    """CRC16-CCITT (XMODEM): polynomial 0x1021, initial value 0 (Redis cluster spec)."""
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc


def hash_tag(key: bytes) -> bytes | None:
    """The part of the key that is hashed when it has a non-empty {...} tag."""
    start = key.find(b"{")
    if start < 0:
        return None
    end = key.find(b"}", start + 1)
    if end < 0 or end == start + 1:
        return None
    return key[start + 1 : end]


def keyslot(key: bytes) -> int:
    tag = hash_tag(key)
    return crc16_xmodem(key if tag is None else tag) % CLUSTER_SLOTS


def test_keyslot_matches_the_cluster_spec() -> None:
    """Proves the test's CRC16/keyslot agrees with the reference values of the cluster spec
    and the hash tag rules (first '{', first '}' after it, empty tag ignored)."""
    assert crc16_xmodem(b"123456789") == 0x31C3
    assert keyslot(b"foo") == 12182
    assert keyslot(b"{user1000}.following") == keyslot(b"{user1000}.followers")
    assert hash_tag(b"foo{}{bar}") is None  # an empty first tag: the whole key is hashed
    assert keyslot(b"foo{{bar}}zap") == keyslot(b"{bar")
    assert keyslot(b"foo{bar}{zap}") == keyslot(b"bar")


# Commands whose first argument is a key, and those all of whose arguments are keys.
FIRST_ARG_KEY = {
    "GET", "SET", "SETNX", "SETEX", "PSETEX", "GETSET", "GETDEL", "INCR", "INCRBY", "DECR",
    "DECRBY", "EXPIRE", "PEXPIRE", "PEXPIREAT", "EXPIREAT", "PERSIST", "TTL", "PTTL", "TYPE",
    "HGET", "HSET", "HSETNX", "HDEL", "HINCRBY", "HGETALL", "HMGET", "HMSET", "HEXISTS",
    "HKEYS", "HVALS", "HLEN",
    "ZADD", "ZREM", "ZSCORE", "ZCARD", "ZRANGE", "ZRANGEBYSCORE", "ZREVRANGEBYSCORE",
    "ZREMRANGEBYSCORE", "ZCOUNT", "ZINCRBY", "ZPOPMIN",
    "XADD", "XLEN", "XRANGE", "XREVRANGE", "XTRIM", "XDEL",
    "SADD", "SREM", "SISMEMBER", "SMEMBERS", "SCARD",
    "LPUSH", "RPUSH", "LPOP", "RPOP", "LRANGE", "LLEN", "LTRIM",
}
ALL_ARGS_KEYS = {"DEL", "UNLINK", "EXISTS", "MGET", "TOUCH"}
NO_KEYS = {"TIME", "PING", "ECHO"}


def parse_monitor_args(text: str) -> list[bytes]:
    """Splits the quoted arguments of a MONITOR line (sdscatrepr escaping)."""
    args: list[bytes] = []
    i = 0
    escapes = {"n": b"\n", "r": b"\r", "t": b"\t", "a": b"\a", "b": b"\b", "\\": b"\\",
               '"': b'"'}
    while i < len(text):
        if text[i] != '"':
            i += 1
            continue
        i += 1
        out = bytearray()
        while text[i] != '"':
            if text[i] == "\\":
                nxt = text[i + 1]
                if nxt == "x":
                    out.append(int(text[i + 2 : i + 4], 16))
                    i += 4
                    continue
                out.extend(escapes[nxt])
                i += 2
                continue
            out.extend(text[i].encode("latin-1"))
            i += 1
        args.append(bytes(out))
        i += 1
    return args


MONITOR_LINE = re.compile(r"^\+?(\d+\.\d+) \[(\d+) ([^\]]+)\] (.*)$")


@dataclass
class ScriptCall:
    command: str
    function: str
    script_keys: list[bytes]
    touched: list[tuple[str, bytes]] = field(default_factory=list)


def group_script_calls(lines: list[str]) -> list[ScriptCall]:
    """Each FCALL/FCALL_RO line with the `[n lua]` lines that follow it (a script runs
    atomically, so nothing else can come between)."""
    calls: list[ScriptCall] = []
    current: ScriptCall | None = None
    for line in lines:
        match = MONITOR_LINE.match(line)
        if not match:
            continue
        origin, args = match.group(3), parse_monitor_args(match.group(4))
        if not args:
            continue
        command = args[0].decode().upper()
        if origin == "lua":
            assert current is not None, f"a script command without its FCALL: {line}"
            if command in NO_KEYS:
                continue
            if command in ALL_ARGS_KEYS:
                current.touched.extend((command, k) for k in args[1:])
            elif command in FIRST_ARG_KEY:
                current.touched.append((command, args[1]))
            else:
                raise AssertionError(f"classify the keys of {command} for this test: {line}")
            continue
        current = None
        if command in ("FCALL", "FCALL_RO", "EVALSHA", "EVALSHA_RO", "EVAL", "EVAL_RO"):
            numkeys = int(args[2])
            current = ScriptCall(command, args[1].decode("latin-1"),
                                 list(args[3 : 3 + numkeys]))
            calls.append(current)
    return calls


def test_monitor_parsing_groups_script_commands() -> None:
    """Proves the MONITOR parser ties [lua] lines to their FCALL, unescapes binary
    arguments, and that a key in another slot would be visible to the check."""
    lines = [
        '+1.000001 [0 127.0.0.1:5000] "FCALL" "abc" "2" "tally:{s01}:acct:a" '
        '"tally:{s01}:events" "\\x81\\xa3now\\x01"',
        '+1.000002 [0 lua] "GET" "tally:{s01}:acct:a"',
        '+1.000003 [0 lua] "XADD" "tally:{s01}:events" "*" "type" "say \\"hi\\""',
        '+1.000004 [0 lua] "SET" "tally:{s02}:res:x" "\\x00"',
        '+1.000005 [0 127.0.0.1:5001] "ZRANGEBYSCORE" "tally:{s03}:expiries" "-inf" "5"',
    ]
    [call] = group_script_calls(lines)
    assert call.script_keys == [b"tally:{s01}:acct:a", b"tally:{s01}:events"]
    assert call.touched == [("GET", b"tally:{s01}:acct:a"), ("XADD", b"tally:{s01}:events"),
                            ("SET", b"tally:{s02}:res:x")]
    assert parse_monitor_args('"a\\x00\\n" "\\\\"') == [b"a\x00\n", b"\\"]
    assert keyslot(call.touched[2][1]) != keyslot(call.script_keys[0])


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisProcess]:
    server = RedisProcess(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


async def monitor(port: int, lines: list[str], ready: asyncio.Event) -> None:
    # a batch's lines (its FCALL, its XADDs with state images) run past 64 KiB
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=2**24)
    try:
        writer.write(b"MONITOR\r\n")
        await writer.drain()
        assert (await reader.readline()).startswith(b"+OK")
        ready.set()
        while line := await reader.readline():
            lines.append(line.decode("latin-1").rstrip("\r\n"))
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def workload(running: Running) -> list[str]:
    """Every script, across several accounts and shards, expiry included."""
    quota, accounts = aio(running).quota, aio(running).accounts
    ids = [unique("slot") for _ in range(6)]
    for i, account_id in enumerate(ids):
        await create_account(running, account_id, overage_policy=common_pb2.OVERAGE_POLICY_ALLOW,
                             overage_limit=100, labels={"team": f"t{i}"})
        held = await quota.Reserve(quota_pb2.ReserveRequest(
            account_id=account_id, operation="image.upscale", quantity=3,
            idempotency_key="r", labels={"model": "x"}))
        await quota.Extend(quota_pb2.ExtendRequest(reservation_id=held.reservation_id,
                                                  ttl=Duration(seconds=120)))
        await quota.Commit(quota_pb2.CommitRequest(reservation_id=held.reservation_id,
                                                  quantity=2))
        await quota.Refund(quota_pb2.RefundRequest(reservation_id=held.reservation_id,
                                                  units=5, idempotency_key="f"))
        charged = await quota.Charge(quota_pb2.ChargeRequest(
            account_id=account_id, operation="image.vectorize", quantity=2, idempotency_key="c"))
        await quota.Refund(quota_pb2.RefundRequest(reservation_id=charged.reservation_id,
                                                  idempotency_key="f2"))
        await accounts.PurchaseUnits(account_pb2.PurchaseUnitsRequest(
            account_id=account_id, units=100, idempotency_key="p", reference="inv"))
        await quota.Quote(quota_pb2.QuoteRequest(account_id=account_id,
                                                 operation="image.upscale", quantity=2))
        await quota.GetBalance(quota_pb2.GetBalanceRequest(account_id=account_id))
        await accounts.GetAccount(account_pb2.GetAccountRequest(account_id=account_id))
        await accounts.UpdateAccount(account_pb2.UpdateAccountRequest(
            account_id=account_id, monthly_allotment=2000, labels={"tier": "gold"}))
        await quota.Reserve(quota_pb2.ReserveRequest(
            account_id=account_id, operation="image.upscale", idempotency_key="short",
            ttl=Duration(seconds=1)))
    # Batches: one script call per shard group, pipelined.
    reserved = await quota.ReserveBatch(quota_pb2.ReserveBatchRequest(items=[
        quota_pb2.ReserveRequest(account_id=account_id, operation="image.upscale",
                                 idempotency_key=f"batch-{i}", labels={"model": "x"})
        for i, account_id in enumerate(ids * 2)]))
    rids = [result.response.reservation_id for result in reserved.results]
    await quota.CommitBatch(quota_pb2.CommitBatchRequest(
        items=[quota_pb2.CommitRequest(reservation_id=rid) for rid in rids[:6]]))
    await quota.RefundBatch(quota_pb2.RefundBatchRequest(
        items=[quota_pb2.RefundRequest(reservation_id=rid, idempotency_key="batch-f")
               for rid in rids]))
    await aio(running).catalog.SetPrice(catalog_pb2.SetPriceRequest(operation="image.new",
                                                               units_per_quantity=3))
    # Holds expire: by the reaper for the idle accounts, lazily for one touched account.
    running.clock.advance(2_000)
    await quota.GetBalance(quota_pb2.GetBalanceRequest(account_id=ids[0]))
    await quota.Reserve(quota_pb2.ReserveRequest(account_id=ids[1], operation="image.new",
                                                 idempotency_key="after-expiry"))
    # Budgets, and the usage report (read_usage, billing_period).
    await accounts.SetBudget(account_pb2.SetBudgetRequest(
        account_id=ids[3], budget=common_pb2.Budget(label_key="model", label_value="x",
                                                    limit_units=5000)))
    await accounts.DeleteBudget(account_pb2.DeleteBudgetRequest(
        account_id=ids[3], budget_id="label:model=x"))
    reports = usage_pb2_grpc.UsageServiceStub(running.stubs.channel)
    await reports.GetUsageReport(
        usage_pb2.GetUsageReportRequest(account_id=ids[3], group_by=["operation"]))
    await reports.GetUsageReport(usage_pb2.GetUsageReportRequest(account_id=ids[3],
                                                                 period="2025-01"))
    # Past the closed window (10 minutes): a closed reservation comes back from the
    # ledger's image (restore_hold) for a Commit replay.
    running.clock.advance(11 * 60_000)
    await quota.Commit(quota_pb2.CommitRequest(reservation_id=rids[0]))
    # A new billing period (allotment roll-over) on the next touch; the period
    # sweeper's step (close_period) for an account (closed already if the reaper
    # touched it first: then a no-op).
    running.clock.advance(40 * 86_400_000)
    await quota.Charge(quota_pb2.ChargeRequest(account_id=ids[2], operation="image.upscale",
                                               idempotency_key="next-period"))
    await running.authority.store.close_period(ClosePeriodRequest(ids[5]))
    await asyncio.sleep(0.3)  # reaper passes
    # Recovery from the ledger of an account Redis lost (restore_usage), then a call on it.
    await running.authority.flusher.flush_all(steal=True)
    authority = running.authority
    await authority.store.redis.delete(authority.store.keys.account_keys(ids[4])[0])
    await recover(StateImages.of(authority.store), authority.ledger, running.clock.now_ms(),
                  lambda _: None, authority.store.limits.reservation_retention_ms)
    await quota.Reserve(quota_pb2.ReserveRequest(account_id=ids[4], operation="image.upscale",
                                                 idempotency_key="after-recovery"))
    return ids


@dataclass
class Monitored:
    """What MONITOR saw while a server ran the workload once."""

    lines: list[str]
    calls: list[ScriptCall]
    scripts: dict[str, str]  # function name -> script name


@pytest_asyncio.fixture(scope="module")
async def monitored(
    module_redis: RedisProcess, tmp_path_factory: pytest.TempPathFactory
) -> Monitored:
    """The workload run once under MONITOR, for the tests that read what it saw."""
    lines: list[str] = []
    ready = asyncio.Event()
    watcher = asyncio.create_task(monitor(module_redis.port, lines, ready))
    await asyncio.wait_for(ready.wait(), 5)
    data_dir = tmp_path_factory.mktemp("data-keyslots")
    running = await start_running(module_redis.url, data_dir=str(data_dir))
    try:
        await workload(running)
        scripts = {s.function: s.name for s in running.authority.store.runner.scripts.values()}
    finally:
        await stop_running(running)
        await asyncio.sleep(0.1)
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
    calls = group_script_calls(lines)
    assert sum(len(c.touched) for c in calls) > len(calls), "no [lua] lines were parsed"
    return Monitored(lines, calls, scripts)


async def test_every_key_a_script_touches_is_in_one_slot(monitored: Monitored) -> None:
    """Proves, from MONITOR, that every key each script declares or touches (the [lua]
    lines after its FCALL) hashes to the slot of its first KEYS argument, for every
    script the workload ran, over several shards."""
    calls, scripts = monitored.calls, monitored.scripts
    assert calls, "MONITOR saw no script call"
    seen_scripts: set[str] = set()
    slots: set[int] = set()
    for call in calls:
        if not call.script_keys:
            assert call.touched == [], f"a script call without keys touched keys: {call}"
            continue
        slot = keyslot(call.script_keys[0])
        slots.add(slot)
        for key in call.script_keys:
            assert keyslot(key) == slot, f"declared key {key!r} is not in slot {slot}: {call}"
        for command, key in call.touched:
            assert keyslot(key) == slot, (
                f"{command} {key!r} is in slot {keyslot(key)}, the script's keys in {slot}")
    for line in monitored.lines:
        match = MONITOR_LINE.match(line)
        if match and match.group(3) != "lua":
            args = parse_monitor_args(match.group(4))
            if args and args[0].upper() in (b"FCALL", b"FCALL_RO"):
                seen_scripts.add(scripts.get(args[1].decode(), "?"))
    expected = {"create_account", "reserve", "extend", "commit", "refund", "charge", "purchase",
                "quote", "balance", "update_account", "set_price", "apply_price", "expire_hold",
                "reserve_batch", "commit_batch", "refund_batch"}
    assert expected <= seen_scripts, f"the workload never ran {expected - seen_scripts}"
    assert len(slots) >= 4, "the workload should spread over several shards"


async def test_every_key_a_script_touches_is_one_it_declared(monitored: Monitored) -> None:
    """Proves, from MONITOR, that every key each script reads or writes (the [lua] lines
    after its FCALL) is among the keys that FCALL declared, for every script of
    SCRIPT_NAMES: batches, the reaper's and sweeper's, recovery's and the catalog's
    included."""
    calls, scripts = monitored.calls, monitored.scripts
    seen = {scripts.get(call.function, "?") for call in calls}
    assert set(SCRIPT_NAMES) <= seen, f"the workload never ran {set(SCRIPT_NAMES) - seen}"
    undeclared = sorted({
        f"{scripts.get(call.function, '?')}: {command} {key!r}"
        for call in calls
        for command, key in call.touched
        if key not in call.script_keys
    })
    assert undeclared == [], "keys touched without being declared:\n" + "\n".join(undeclared)


async def test_every_stored_key_carries_a_shard_hash_tag(
    own_redis: RedisProcess, tmp_path: Path
) -> None:
    """Proves that after the workload every key in Redis except tally:meta carries one of
    the deployment's shard hash tags, i.e. can live in a Redis Cluster slot with the rest
    of its shard, but the global leases of background work and their registries, which
    share the {lease} tag."""
    running = await start_running(own_redis.url, data_dir=str(tmp_path / "data"))
    try:
        await workload(running)
        redis = running.authority.store.redis
        keys = [k async for k in redis.scan_iter(count=1000)]
        tags = set(running.authority.store.keys.layout.tags())
    finally:
        await stop_running(running)
    assert len(keys) > 20
    tagged = {k: re.match(rb"^tally:\{([0-9A-Za-z]+)\}:", k) for k in keys if k != b"tally:meta"}
    untagged = [k for k, m in tagged.items() if m is None or m.group(1).decode() not in tags]
    assert sorted(untagged) == [
        b"tally:{lease}:members:reaper", b"tally:{lease}:members:sweeper",
        b"tally:{lease}:prune", b"tally:{lease}:snapshot"]
