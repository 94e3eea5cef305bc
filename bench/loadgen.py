"""A multi-process gRPC load generator for QuotaService, on raw bytes.

    python -m bench.loadgen --target 127.0.0.1:50051 --scenario pairs \
        [--accounts 10000 | --hot] [--processes 2 --concurrency 64] [--rate 2000] \
        [--duration 8 --warmup 2] [--token tly_...]

Each client process runs one grpc.aio channel and generic unary calls
(`channel.unary_unary(method)` without serializers), so the client pays for no
protobuf message objects: a request is a pre-serialized prefix per account
(account_id, operation, quantity) plus a varying idempotency key, and of a reply
only the reservation id is read (Reserve, ReserveBatch). The client is Python
like the server; its own CPU over the measured window is reported beside the
figures so a reader sees whether it was the bottleneck.

Scenarios: `pairs` (Reserve then Commit of the whole hold: one op is a pair, its
latency the pair's), `charge` (one Charge), `batch` (ReserveBatch of
`--batch-size` items, then CommitBatch of the holds it got: ops are holds).

Modes: closed loop (`--rate` unset: each of the `--concurrency` callers per
process starts its next op as soon as the last one ended: saturation), or open
loop at a fixed offered rate over all processes, each op's latency measured
from the moment it was meant to start (not when a free caller got to it), so a
stalled server shows up in the latency instead of silently lowering the rate
(coordinated omission).

Only ops that end inside the measured window count (after `--warmup`), in
throughput, latency and errors. Errors are counted by status code; refusals
(RESOURCE_EXHAUSTED) apart from the others.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import enum
import json
import multiprocessing
import os
import queue
import resource
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import grpc

SERVICE = "/tally.v1.QuotaService/"
DEFAULT_PROCESSES = 2
DEFAULT_CONCURRENCY = 64
DEFAULT_ACCOUNTS = 10_000
DEFAULT_BATCH_SIZE = 100
DEFAULT_OPERATION = "bench.op"
# Calls an open-loop process keeps started at once at most; a server slower than
# the offered rate makes the rest wait, and their wait counts in their latency.
OPEN_LOOP_MAX_IN_FLIGHT = 2048
# Time for the client processes to start and connect before the first op.
START_DELAY_S = 1.5
# How long after the window the processes may take to hand in their figures
# (calls still in flight end first).
RESULT_TIMEOUT_S = 120.0
REFUSED = "RESOURCE_EXHAUSTED"
# Protobuf wire tags (field number << 3 | wire type 2: length-delimited).
_TAG_1 = 0x0A
_TAG_2 = 0x12
_TAG_4 = 0x22
_VARINT_3 = 0x18  # field 3, varint


class Scenario(enum.StrEnum):
    PAIRS = "pairs"
    CHARGE = "charge"
    BATCH = "batch"


@dataclass(frozen=True)
class LoadSpec:
    target: str
    scenario: Scenario
    accounts: tuple[str, ...]
    operation: str = DEFAULT_OPERATION
    processes: int = DEFAULT_PROCESSES
    concurrency: int = DEFAULT_CONCURRENCY  # callers per process (closed loop)
    rate: float | None = None  # ops/s offered over all processes; None: closed loop
    duration_s: float = 8.0
    warmup_s: float = 2.0
    token: str = ""
    batch_size: int = DEFAULT_BATCH_SIZE


@dataclass
class ProcessTally:
    """What one client process counted inside the window."""

    ok: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    latencies_s: list[float] = field(default_factory=list)
    cpu_s: float = 0.0  # this process's user+system CPU over the window
    # every call that returned OK, by method, in or out of the window (to check the
    # client's count against the server's own counter)
    calls_ok: Counter[str] = field(default_factory=Counter)


@dataclass(frozen=True)
class LoadResult:
    scenario: str
    mode: str  # "closed" or "open"
    offered_rate: float | None
    duration_s: float
    ops: int  # successful ops in the window (pairs, charges or holds)
    ops_per_s: float
    p50_ms: float
    p99_ms: float
    p999_ms: float
    refusals: int  # RESOURCE_EXHAUSTED
    errors: dict[str, int]  # other status codes, by name
    client_cpu_s: float  # all client processes, over the window
    client_processes: int
    concurrency: int
    # calls per op at the gRPC level: 2 for pairs (Reserve + Commit), 1 for Charge
    rpcs: int
    calls_ok: dict[str, int]  # every OK call of the run by method, window or not

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(tag: int, payload: bytes) -> bytes:
    return bytes((tag,)) + _varint(len(payload)) + payload


def request_prefix(account_id: str, operation: str, quantity: int = 1) -> bytes:
    """Fields 1-3 of ReserveRequest and ChargeRequest (same numbers in both)."""
    return (_field(_TAG_1, account_id.encode()) + _field(_TAG_2, operation.encode())
            + bytes((_VARINT_3,)) + _varint(quantity))


def with_key(prefix: bytes, key: bytes) -> bytes:
    """A request: its prefix and field 4, the idempotency key."""
    return prefix + _field(_TAG_4, key)


def _read_varint(data: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, at
        shift += 7


def fields(data: bytes) -> list[tuple[int, int | bytes]]:
    """(field number, value) of a message's top-level fields: varints and
    length-delimited payloads (the only wire types the replies read here use)."""
    out: list[tuple[int, int | bytes]] = []
    at = 0
    while at < len(data):
        key, at = _read_varint(data, at)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, at = _read_varint(data, at)
            out.append((number, value))
        elif wire == 2:
            size, at = _read_varint(data, at)
            out.append((number, data[at:at + size]))
            at += size
        elif wire == 1:
            at += 8
        elif wire == 5:
            at += 4
        else:
            raise ValueError(f"unexpected wire type {wire}")
    return out


def first_string(data: bytes) -> bytes:
    """Field 1 of a reply whose field 1 is a string serialized first (the
    reservation id of ReserveResponse)."""
    if not data or data[0] != _TAG_1:
        raise ValueError("reply has no field 1")
    size, at = _read_varint(data, 1)
    return data[at:at + size]


def batch_outcomes(reply: bytes) -> list[tuple[int, bytes]]:
    """(status code, response bytes) of each result of a Reserve/CommitBatchResponse
    (results = 1; each: status = 1 {code = 1}, response = 2)."""
    outcomes = []
    for number, result in fields(reply):
        if number != 1 or not isinstance(result, bytes):
            continue
        code, response = 0, b""
        for inner, value in fields(result):
            if inner == 1 and isinstance(value, bytes):
                code = next((v for n, v in fields(value) if n == 1 and isinstance(v, int)), 0)
            elif inner == 2 and isinstance(value, bytes):
                response = value
        outcomes.append((code, response))
    return outcomes


def status_name(code: int) -> str:
    for status in grpc.StatusCode:
        if status.value[0] == code:
            return str(status.name)
    return f"CODE_{code}"


def _raw_method(channel: grpc.aio.Channel,
                name: str) -> grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]:
    """A QuotaService method taking and returning bytes (no (de)serializers)."""
    return channel.unary_unary(SERVICE + name)


class _Caller:
    """The ops of one scenario, on one channel."""

    def __init__(self, spec: LoadSpec, channel: grpc.aio.Channel, process: int) -> None:
        self.spec = spec
        self.metadata = (("authorization", f"Bearer {spec.token}"),) if spec.token else None
        self.prefixes = [request_prefix(a, spec.operation) for a in spec.accounts]
        # unique per run and process: a rerun against the same server replays nothing
        self.key_stem = f"b{os.getpid():x}{time.time_ns() % 10**9:x}-{process}-".encode()
        self.sequence = process * 7919  # processes start on different accounts
        self.reserve = _raw_method(channel, "Reserve")
        self.commit = _raw_method(channel, "Commit")
        self.charge = _raw_method(channel, "Charge")
        self.reserve_batch = _raw_method(channel, "ReserveBatch")
        self.commit_batch = _raw_method(channel, "CommitBatch")
        self.calls_ok: Counter[str] = Counter()

    def _next_request(self) -> bytes:
        n = self.sequence
        self.sequence += 1
        return with_key(self.prefixes[n % len(self.prefixes)], self.key_stem + str(n).encode())

    async def op(self) -> tuple[int, Counter[str]]:
        """Run one op: (successes it counts, failed items by status name).
        Raises grpc.aio.AioRpcError when a whole call fails."""
        if self.spec.scenario is Scenario.PAIRS:
            reply = await self.reserve(self._next_request(), metadata=self.metadata)
            self.calls_ok["Reserve"] += 1
            await self.commit(_field(_TAG_1, first_string(reply)), metadata=self.metadata)
            self.calls_ok["Commit"] += 1
            return 1, Counter()
        if self.spec.scenario is Scenario.CHARGE:
            await self.charge(self._next_request(), metadata=self.metadata)
            self.calls_ok["Charge"] += 1
            return 1, Counter()
        return await self._batch()

    async def _batch(self) -> tuple[int, Counter[str]]:
        items = b"".join(_field(_TAG_1, self._next_request())
                         for _ in range(self.spec.batch_size))
        failed: Counter[str] = Counter()
        commits = []
        reserved = await self.reserve_batch(items, metadata=self.metadata)
        self.calls_ok["ReserveBatch"] += 1
        for code, response in batch_outcomes(reserved):
            if code:
                failed[status_name(code)] += 1
            else:
                commits.append(_field(_TAG_1, _field(_TAG_1, first_string(response))))
        if not commits:
            return 0, failed
        committed = 0
        settled = await self.commit_batch(b"".join(commits), metadata=self.metadata)
        self.calls_ok["CommitBatch"] += 1
        for code, _ in batch_outcomes(settled):
            if code:
                failed[status_name(code)] += 1
            else:
                committed += 1
        return committed, failed


class _Window:
    def __init__(self, start: float, end: float) -> None:
        self.start, self.end = start, end
        self.tally = ProcessTally()

    def record(self, began: float, ended: float, ok: int, failed: Counter[str]) -> None:
        if not self.start <= ended < self.end:
            return
        self.tally.ok += ok
        self.tally.errors.update(failed)
        if ok:
            self.tally.latencies_s.append(ended - began)

    def record_error(self, ended: float, error: grpc.aio.AioRpcError) -> None:
        if self.start <= ended < self.end:
            self.tally.errors[error.code().name] += 1


async def _run_process(spec: LoadSpec, process: int, start_at: float) -> ProcessTally:
    measure_start = start_at + spec.warmup_s
    window = _Window(measure_start, measure_start + spec.duration_s)
    loop = asyncio.get_running_loop()
    cpu_marks: list[float] = []
    loop.call_at(_loop_time(loop, window.start), lambda: cpu_marks.append(time.process_time()))
    loop.call_at(_loop_time(loop, window.end), lambda: cpu_marks.append(time.process_time()))
    async with grpc.aio.insecure_channel(spec.target) as channel:
        await channel.channel_ready()
        caller = _Caller(spec, channel, process)
        await asyncio.sleep(max(0.0, start_at - time.monotonic()))
        if spec.rate is None:
            await _closed_loop(caller, window, spec.concurrency)
        else:
            await _open_loop(caller, window, spec.rate / spec.processes)
    # the end mark fires when the window closes; the loops ran at least that long
    window.tally.cpu_s = cpu_marks[1] - cpu_marks[0] if len(cpu_marks) == 2 else 0.0
    window.tally.calls_ok = caller.calls_ok
    return window.tally


def _loop_time(loop: asyncio.AbstractEventLoop, monotonic_at: float) -> float:
    return loop.time() + (monotonic_at - time.monotonic())


async def _timed_op(caller: _Caller, window: _Window, began: float) -> None:
    try:
        ok, failed = await caller.op()
    except grpc.aio.AioRpcError as error:
        window.record_error(time.monotonic(), error)
        return
    window.record(began, time.monotonic(), ok, failed)


async def _closed_loop(caller: _Caller, window: _Window, concurrency: int) -> None:
    async def one_caller() -> None:
        while (began := time.monotonic()) < window.end:
            await _timed_op(caller, window, began)

    await asyncio.gather(*(one_caller() for _ in range(concurrency)))


async def _open_loop(caller: _Caller, window: _Window, rate: float) -> None:
    interval = 1.0 / rate
    slots = asyncio.Semaphore(OPEN_LOOP_MAX_IN_FLIGHT)
    tasks: set[asyncio.Task[None]] = set()
    first = time.monotonic()

    async def at_intended(intended: float) -> None:
        try:
            await _timed_op(caller, window, intended)
        finally:
            slots.release()

    n = 0
    while (intended := first + n * interval) < window.end:
        delay = intended - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        await slots.acquire()
        task = asyncio.create_task(at_intended(intended))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        n += 1
    if tasks:
        await asyncio.gather(*tasks)


def _process_main(spec: LoadSpec, process: int, start_at: float,
                  results: multiprocessing.Queue[tuple[int, ProcessTally]]) -> None:
    with contextlib.suppress(ImportError):
        import uvloop  # the client's own overhead, lowered where it can be

        uvloop.install()
    results.put((process, asyncio.run(_run_process(spec, process, start_at))))


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    if not sorted_values:
        return 0.0
    index = min(len(sorted_values) - 1, int(fraction * len(sorted_values)))
    return sorted_values[index]


def run_load(spec: LoadSpec, on_window_start: Callable[[], None] | None = None,
             on_window_end: Callable[[], None] | None = None) -> LoadResult:
    """Run the load; the callbacks fire (in this process) when the measured window
    opens and closes, for the caller to sample the server's CPU."""
    context = multiprocessing.get_context("spawn")  # no grpc state crosses a fork
    results: multiprocessing.Queue[tuple[int, ProcessTally]] = context.Queue()
    start_at = time.monotonic() + START_DELAY_S
    processes = [context.Process(target=_process_main, args=(spec, i, start_at, results),
                                 daemon=True) for i in range(spec.processes)]
    for process in processes:
        process.start()
    window_start = start_at + spec.warmup_s
    for at, callback in ((window_start, on_window_start),
                         (window_start + spec.duration_s, on_window_end)):
        time.sleep(max(0.0, at - time.monotonic()))
        if callback is not None:
            callback()
    tallies = [_next_tally(results, processes) for _ in processes]
    for process in processes:
        process.join(10)
    return _merge(spec, tallies)


def _next_tally(results: multiprocessing.Queue[tuple[int, ProcessTally]],
                processes: Sequence[multiprocessing.process.BaseProcess]) -> ProcessTally:
    """The next process's figures; a process that died without them is an error."""
    deadline = time.monotonic() + RESULT_TIMEOUT_S
    while time.monotonic() < deadline:
        with contextlib.suppress(queue.Empty):
            return results.get(timeout=0.5)[1]
        dead = [p.exitcode for p in processes if p.exitcode not in (None, 0)]
        if dead:
            raise RuntimeError(f"a load generator process failed (exit code {dead[0]})")
    raise RuntimeError(f"no figures from the load generator within {RESULT_TIMEOUT_S}s")


def _merge(spec: LoadSpec, tallies: list[ProcessTally]) -> LoadResult:
    latencies = sorted(x for t in tallies for x in t.latencies_s)
    errors: Counter[str] = Counter()
    calls_ok: Counter[str] = Counter()
    for t in tallies:
        errors.update(t.errors)
        calls_ok.update(t.calls_ok)
    refusals = errors.pop(REFUSED, 0)
    ok = sum(t.ok for t in tallies)
    return LoadResult(
        scenario=spec.scenario.value,
        mode="closed" if spec.rate is None else "open",
        offered_rate=spec.rate,
        duration_s=spec.duration_s,
        ops=ok,
        ops_per_s=ok / spec.duration_s,
        p50_ms=1000 * percentile(latencies, 0.50),
        p99_ms=1000 * percentile(latencies, 0.99),
        p999_ms=1000 * percentile(latencies, 0.999),
        refusals=refusals,
        errors=dict(errors),
        client_cpu_s=sum(t.cpu_s for t in tallies),
        client_processes=spec.processes,
        concurrency=spec.concurrency,
        rpcs=2 if spec.scenario is not Scenario.CHARGE else 1,
        calls_ok=dict(calls_ok),
    )


def account_ids(count: int, prefix: str = "bench-") -> tuple[str, ...]:
    return tuple(f"{prefix}{i:05d}" for i in range(count))


def _client_rusage_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", required=True)
    parser.add_argument("--scenario", type=Scenario, choices=list(Scenario),
                        default=Scenario.PAIRS)
    parser.add_argument("--accounts", type=int, default=DEFAULT_ACCOUNTS,
                        help="accounts bench-00000.. to spread over")
    parser.add_argument("--hot", action="store_true", help="one account: bench-00000")
    parser.add_argument("--operation", default=DEFAULT_OPERATION)
    parser.add_argument("--processes", type=int, default=DEFAULT_PROCESSES)
    parser.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY)
    parser.add_argument("--rate", type=float, default=None,
                        help="open loop: ops/s offered; unset: closed loop")
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    parser.add_argument("--token", default=os.environ.get("TALLY_TOKEN", ""))
    args = parser.parse_args(argv)
    spec = LoadSpec(
        target=args.target, scenario=args.scenario,
        accounts=account_ids(1 if args.hot else args.accounts), operation=args.operation,
        processes=args.processes, concurrency=args.concurrency, rate=args.rate,
        duration_s=args.duration, warmup_s=args.warmup, token=args.token,
        batch_size=args.batch_size,
    )
    result = run_load(spec)
    figures = result.as_dict() | {"client_cpu_total_s": _client_rusage_s()}
    print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
