"""`tally serve --workers N` as an operator runs it: real processes, the embedded
Redis, the SQLite ledger. Workers share the port; the primary alone runs the
background work; workers are replaced, drained and never orphaned."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tally_client.v1 import (
    account_pb2,
    account_pb2_grpc,
    quota_pb2,
    quota_pb2_grpc,
    token_pb2,
    token_pb2_grpc,
)
from tests.e2e.test_auth import bearer
from tests.e2e.test_bootstrap_token import written_token
from tests.e2e.test_serve import TALLY, alive, redis_pid
from tests.support import free_port

START_TIMEOUT_S = 60.0
EXIT_TIMEOUT_S = 30.0
WORKERS = 2
# Fresh connections per call: a new TCP connection each time is what the kernel spreads.
FRESH_CONNECTION = (("grpc.use_local_subchannel_pool", 1),)
CALLS = 40


def free_port_run(length: int) -> int:
    """A port p with p .. p + length - 1 all free now (the metrics endpoints)."""
    while True:
        base = free_port()
        if base + length > 65535:
            continue
        sockets = []
        try:
            for port in range(base, base + length):
                sock = socket.socket()
                sockets.append(sock)
                sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()


def children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        found += [int(child) for child in task.read_text().split()]
    return found


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except FileNotFoundError:
        return ""


def metric(port: int, name: str, **labels: str) -> float:
    """The sample's value on the endpoint at `port` (0 when absent)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    wanted = name + ("{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"
                     if labels else "")
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        sample, _, value = line.rpartition(" ")
        if _same_sample(sample, wanted):
            return float(value)
    return 0.0


def _same_sample(sample: str, wanted: str) -> bool:
    if "{" not in sample or "{" not in wanted:
        return sample == wanted
    name, _, labels = sample.partition("{")
    wanted_name, _, wanted_labels = wanted.partition("{")
    return name == wanted_name and sorted(labels.rstrip("}").split(",")) == sorted(
        wanted_labels.rstrip("}").split(","))


@dataclass
class Served:
    process: subprocess.Popen[bytes]
    address: str
    data_dir: Path
    metrics_port: int
    log: Path
    admin: str = ""
    extra: list[str] = field(default_factory=list)

    def worker_pids(self) -> list[int]:
        return [pid for pid in children(self.process.pid)
                if "tally.workers.worker" in cmdline(pid)]

    def worker_ports(self) -> list[int]:
        return [self.metrics_port + index for index in range(1, WORKERS + 1)]

    def log_lines(self) -> list[dict[str, object]]:
        lines = []
        for line in self.log.read_text().splitlines():
            if line.startswith("{"):
                lines.append(json.loads(line))
        return lines

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return bearer(self.admin) if self.admin else ()


def wait_for(condition: object, what: str, timeout_s: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if callable(condition) and condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def serving(address: str) -> bool:
    with grpc.insecure_channel(address, options=FRESH_CONNECTION) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=0.5)
        except grpc.RpcError:
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


@pytest.fixture
def launched(tmp_path: Path) -> Iterator[list[Served]]:
    """Every server started here is killed at the end, with its workers and Redis."""
    started: list[Served] = []
    yield started
    for served in started:
        pids = served.worker_pids() if served.process.poll() is None else []
        if served.process.poll() is None:
            served.process.kill()
            served.process.wait()
        for pid in pids:  # PR_SET_PDEATHSIG stops them; this only guards a failed test
            wait_for(lambda pid=pid: not alive(pid), f"worker {pid} to exit", EXIT_TIMEOUT_S)


def start(launched: list[Served], data_dir: Path, *extra: str, admin: str = "") -> Served:
    address = f"127.0.0.1:{free_port()}"
    metrics_port = free_port_run(WORKERS + 1)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TALLY_")}
    log = data_dir.parent / f"{data_dir.name}.log"
    with log.open("ab") as stderr:
        process = subprocess.Popen(
            [TALLY, "serve", "--workers", str(WORKERS), "--listen", address,
             "--data-dir", str(data_dir), "--metrics-listen", f"127.0.0.1:{metrics_port}",
             "--flush-interval", "100ms", *extra],
            env=env, stdout=subprocess.DEVNULL, stderr=stderr,
        )
    served = Served(process, address, data_dir, metrics_port, log, admin, list(extra))
    launched.append(served)
    wait_for(lambda: process.poll() is not None or serving(address), "SERVING")
    assert process.poll() is None, log.read_text()
    return served


def charge(served: Served, account_id: str, key: str) -> None:
    with grpc.insecure_channel(served.address, options=FRESH_CONNECTION) as channel:
        quota_pb2_grpc.QuotaServiceStub(channel).Charge(
            quota_pb2.ChargeRequest(account_id=account_id, operation="image.upscale",
                                    quantity=1, idempotency_key=key),
            metadata=served.metadata(), timeout=10)


def create_account(served: Served, account_id: str, allotment: int) -> None:
    with grpc.insecure_channel(served.address) as channel:
        account_pb2_grpc.AccountServiceStub(channel).CreateAccount(
            account_pb2.CreateAccountRequest(account_id=account_id, monthly_allotment=allotment),
            metadata=served.metadata(), timeout=10)


def ledger_rows(data_dir: Path, query: str, *args: object) -> list[tuple[object, ...]]:
    with sqlite3.connect(f"file:{data_dir / 'ledger.sqlite3'}?mode=ro", uri=True) as db:
        return list(db.execute(query, args))


def by_worker(served: Served, method: str) -> list[float]:
    return [metric(port, "tally_rpc_requests_total", method=method, code="OK")
            for port in served.worker_ports()]


@pytest.mark.parametrize("workers", ["0", "65"])
def test_workers_beyond_the_bound_are_refused_naming_the_flag(
    workers: str, tmp_path: Path
) -> None:
    """Proves --workers 0 and 65 (the bound is 64) stop `tally serve` before anything
    starts, with exit code 2 and a message naming --workers and its range."""
    result = subprocess.run(
        [TALLY, "serve", "--workers", workers, "--data-dir", str(tmp_path / "var")],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert f"--workers (TALLY_WORKERS) must be between 1 and 64, got {workers}" in result.stderr
    assert not (tmp_path / "var").exists()


def test_workers_share_the_port_and_the_background_work_runs_once(
    tmp_path: Path, launched: list[Served]
) -> None:
    """Proves, with authentication on, that calls over many connections land on both
    workers (each worker's own /metrics), that what the request path needs from the
    ledger works in each: money in is in the ledger when acknowledged, a token created
    through one worker is honoured by all, a reservation gone from Redis is refunded
    from the ledger; and that the flusher, reaper and sweeper run in the primary only."""
    token_file, admin = written_token(tmp_path)
    served = start(
        launched, tmp_path / "var", "--auth", "required", "--bootstrap-token-file",
        str(token_file), "--hold-ttl-min", "100ms", "--flush-claim-idle", "200ms",
        "--closed-reservation-window", "300ms", admin=admin,
    )
    assert len(served.worker_pids()) == WORKERS
    messages = [line.get("msg") for line in served.log_lines()]
    ready_at = messages.index("serving")  # the primary's: after every worker started
    assert messages[:ready_at].count("worker started") == WORKERS
    create_account(served, "spread", 1_000_000)
    # money in through both workers: each purchase is in the ledger once acknowledged
    for i in range(CALLS // 2):
        with grpc.insecure_channel(served.address, options=FRESH_CONNECTION) as channel:
            account_pb2_grpc.AccountServiceStub(channel).PurchaseUnits(
                account_pb2.PurchaseUnitsRequest(account_id="spread", units=10,
                                                 idempotency_key=f"p{i}"),
                metadata=served.metadata(), timeout=10)
        assert ledger_rows(served.data_dir, "SELECT 1 FROM ledger_entries WHERE type = "
                           "'purchase' AND idempotency_key = ?", f"p{i}")
    assert all(count > 0 for count in by_worker(served, "AccountService/PurchaseUnits"))
    # a token made through one worker, honoured by every worker
    with grpc.insecure_channel(served.address) as channel:
        worker_token = token_pb2_grpc.TokenServiceStub(channel).CreateToken(
            token_pb2.CreateTokenRequest(role="worker", name="w"), metadata=served.metadata(),
            timeout=10).token
    served.admin = worker_token
    reservations = []
    for i in range(CALLS):
        with grpc.insecure_channel(served.address, options=FRESH_CONNECTION) as channel:
            quota = quota_pb2_grpc.QuotaServiceStub(channel)
            held = quota.Reserve(quota_pb2.ReserveRequest(
                account_id="spread", operation="image.upscale", quantity=1,
                idempotency_key=f"r{i}"), metadata=served.metadata(), timeout=10)
            quota.Commit(quota_pb2.CommitRequest(reservation_id=held.reservation_id),
                         metadata=served.metadata(), timeout=10)
            reservations.append(held.reservation_id)
    commits = by_worker(served, "QuotaService/Commit")
    assert sum(commits) == CALLS and all(count > 0 for count in commits), commits
    # past the closed window: each refund finds its reservation in the ledger
    time.sleep(1.0)
    for i, reservation_id in enumerate(reservations):
        with grpc.insecure_channel(served.address, options=FRESH_CONNECTION) as channel:
            quota_pb2_grpc.QuotaServiceStub(channel).Refund(
                quota_pb2.RefundRequest(reservation_id=reservation_id, idempotency_key=f"f{i}"),
                metadata=served.metadata(), timeout=10)
    assert all(count > 0 for count in by_worker(served, "QuotaService/Refund"))
    for port in served.worker_ports():  # each brought reservations back from the ledger
        assert metric(port, "tally_redis_script_duration_seconds_count",
                      script="restore_hold") > 0
    # short holds left to expire: the primary's reaper releases them
    for i in range(3):
        with grpc.insecure_channel(served.address, options=FRESH_CONNECTION) as channel:
            quota_pb2_grpc.QuotaServiceStub(channel).Reserve(quota_pb2.ReserveRequest(
                account_id="spread", operation="image.upscale", quantity=1,
                idempotency_key=f"x{i}", ttl=Duration(nanos=200_000_000)),
                metadata=served.metadata(), timeout=10)
    primary = served.metrics_port
    wait_for(lambda: metric(primary, "tally_holds_expired_total") == 3, "the reaper", 30)
    wait_for(lambda: ledger_rows(served.data_dir, "SELECT count(*) FROM ledger_entries WHERE "
                                 "type = 'refund'") == [(CALLS,)], "the flusher", 30)
    for task in ("flusher", "reaper", "sweeper", "fence_watch"):
        assert metric(primary, "tally_background_task_up", task=task) == 1
    assert metric(primary, "tally_flusher_events_flushed_total") > 0
    assert metric(primary, "tally_workers_serving") == WORKERS
    for port in served.worker_ports():
        for task in ("flusher", "reaper", "sweeper"):
            assert f'task="{task}"' not in urllib.request.urlopen(
                f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        assert metric(port, "tally_flusher_events_flushed_total") == 0
        assert metric(port, "tally_holds_expired_total") == 0
    bootstrap_lines = [line for line in served.log_lines()
                     if line.get("msg") == "bootstrap token in place"]
    assert len(bootstrap_lines) == 1  # once, by the primary


def test_a_killed_worker_is_replaced_logged_and_counted(
    tmp_path: Path, launched: list[Served]
) -> None:
    """Proves a worker killed with SIGKILL is started again by the primary, which logs
    it and counts it in tally_worker_restarts_total, and that calls are served by two
    workers again afterwards."""
    served = start(launched, tmp_path / "var")
    create_account(served, "survivor", 100_000)
    killed = served.worker_pids()[0]
    os.kill(killed, signal.SIGKILL)
    wait_for(lambda: len(served.worker_pids()) == WORKERS and killed not in served.worker_pids()
             and metric(served.metrics_port, "tally_workers_serving") == WORKERS,
             "a replacement worker")
    restarts = [line for line in served.log_lines()
                if line.get("msg") == "worker exited; restarting"]
    assert len(restarts) == 1 and restarts[0]["pid"] == killed
    index = str(restarts[0]["worker"])
    wait_for(lambda: metric(served.metrics_port, "tally_worker_restarts_total",
                            worker=index) == 1, "the restart counted once")
    wait_for(lambda: serving(served.address), "SERVING after the restart")
    for i in range(CALLS):
        charge(served, "survivor", f"c{i}")
    assert all(count > 0 for count in by_worker(served, "QuotaService/Charge"))


def test_sigterm_drains_every_worker_and_the_ledger_holds_every_acknowledged_call(
    tmp_path: Path, launched: list[Served]
) -> None:
    """Proves SIGTERM to the primary, with calls still arriving, ends in exit code 0
    with no worker and no Redis left, and every Charge a caller saw acknowledged is in
    the ledger (the workers drain first, then the primary's last flush)."""
    served = start(launched, tmp_path / "var")
    create_account(served, "drained", 1_000_000)
    workers, redis = served.worker_pids(), redis_pid(served.data_dir)
    acknowledged: list[str] = []
    stop = threading.Event()

    def caller(name: str) -> None:
        i = 0
        while not stop.is_set():
            key = f"{name}-{i}"
            i += 1
            try:
                charge(served, "drained", key)
            except grpc.RpcError:
                continue  # refused while stopping: not acknowledged, not counted
            acknowledged.append(key)

    callers = [threading.Thread(target=caller, args=(f"t{n}",)) for n in range(4)]
    for thread in callers:
        thread.start()
    wait_for(lambda: len(acknowledged) >= CALLS, "calls acknowledged")
    served.process.send_signal(signal.SIGTERM)
    try:
        assert served.process.wait(EXIT_TIMEOUT_S) == 0
    finally:
        stop.set()
        for thread in callers:
            thread.join()
    assert not any(alive(pid) for pid in [*workers, redis])
    keys = {key for (key,) in ledger_rows(
        served.data_dir, "SELECT idempotency_key FROM ledger_entries WHERE type = 'charge'")}
    assert set(acknowledged) <= keys
    assert '"msg": "stopped"' in served.log.read_text()


def test_sigkill_of_the_primary_leaves_no_worker_serving(
    tmp_path: Path, launched: list[Served]
) -> None:
    """Proves a primary killed with SIGKILL takes its workers (PR_SET_PDEATHSIG) and
    its embedded Redis down with it: none is left serving the port."""
    served = start(launched, tmp_path / "var")
    workers, redis = served.worker_pids(), redis_pid(served.data_dir)
    assert len(workers) == WORKERS
    served.process.kill()
    served.process.wait()
    for pid in [*workers, redis]:
        wait_for(lambda pid=pid: not alive(pid), f"process {pid} to exit", EXIT_TIMEOUT_S)
    assert not serving(served.address)


def test_recovery_and_token_restore_at_the_primary_reach_every_worker(
    tmp_path: Path, launched: list[Served]
) -> None:
    """Proves the once-only start-up work done by the primary serves every worker: after
    the embedded Redis lost everything, a restart with --recover-on-start rebuilds the
    account and restores a token made through a worker, and both workers honour that
    token and serve the recovered balance."""
    token_file, admin = written_token(tmp_path)
    flags = ("--auth", "required", "--bootstrap-token-file", str(token_file))
    served = start(launched, tmp_path / "var", *flags, admin=admin)
    create_account(served, "recovered", 10_000)
    with grpc.insecure_channel(served.address) as channel:
        worker_token = token_pb2_grpc.TokenServiceStub(channel).CreateToken(
            token_pb2.CreateTokenRequest(role="worker", name="w"), metadata=served.metadata(),
            timeout=10).token
    served.admin = worker_token
    charge(served, "recovered", "before")
    served.process.send_signal(signal.SIGTERM)
    assert served.process.wait(EXIT_TIMEOUT_S) == 0
    shutil.rmtree(served.data_dir / "redis" / "appendonlydir")  # Redis lost everything
    again = start(launched, tmp_path / "var", *flags, "--recover-on-start", "true",
                  admin=worker_token)
    for i in range(CALLS // 2):
        with grpc.insecure_channel(again.address, options=FRESH_CONNECTION) as channel:
            balance = quota_pb2_grpc.QuotaServiceStub(channel).GetBalance(
                quota_pb2.GetBalanceRequest(account_id="recovered"),
                metadata=again.metadata(), timeout=10).balance
        assert balance.available == 10_000 - 10, i
    assert all(count > 0 for count in by_worker(again, "QuotaService/GetBalance"))
    messages = [line.get("msg") for line in again.log_lines()]
    assert "recovered Redis from the ledger" in messages
    assert "restored token records from the ledger" in messages
