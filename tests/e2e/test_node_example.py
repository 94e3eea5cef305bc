"""The TypeScript worker of examples/node-worker against a real `tally serve`:
installed from its lockfile, generated from protos/, compiled, run."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tally_client.channel import service_config
from tally_client.v1 import quota_pb2, quota_pb2_grpc
from tests.e2e.test_auth import bearer
from tests.e2e.test_bootstrap_token import written_token
from tests.e2e.test_serve import start
from tests.support import free_port, kill_all

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "node-worker"
# Marks node_modules as installed from this exact lockfile (a cache, never a skip of the run).
LOCK_STAMP = EXAMPLE / "node_modules" / ".tally-lockfile-sha256"
NPM_CI_TIMEOUT_S = 300
BUILD_TIMEOUT_S = 120
WORKER_TIMEOUT_S = 60

pytestmark = [pytest.mark.slow, pytest.mark.timeout(NPM_CI_TIMEOUT_S + BUILD_TIMEOUT_S + 120)]


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: the Node.js example needs it "
                    "(apt-get install -y npm; .ci/run installs it)")
    return path


def _run(command: list[str], timeout_s: float, env: dict[str, str] | None = None,
         ) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(command, cwd=EXAMPLE, env=env, capture_output=True, text=True,
                          timeout=timeout_s, check=False)
    assert done.returncode == 0, f"{' '.join(command)} exited {done.returncode}:\n" \
        f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def worker() -> list[str]:
    """The command running dist/worker.js, built from the sources and protos of
    this checkout."""
    npm = _tool("npm")
    node = _tool("node")
    lock = hashlib.sha256((EXAMPLE / "package-lock.json").read_bytes()).hexdigest()
    if not LOCK_STAMP.exists() or LOCK_STAMP.read_text() != lock:
        _run([npm, "ci", "--no-audit", "--no-fund"], NPM_CI_TIMEOUT_S)
        LOCK_STAMP.write_text(lock)
    _run([npm, "run", "build"], BUILD_TIMEOUT_S)
    return [node, str(EXAMPLE / "dist" / "worker.js")]


@pytest.fixture
def started() -> Iterator[list[subprocess.Popen[bytes]]]:
    processes: list[subprocess.Popen[bytes]] = []
    yield processes
    kill_all(processes)


def _worker_env(token: str = "") -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TALLY_")}
    if token:
        env["TALLY_TOKEN"] = token
    return env


def _expected(address: str, attempts: int) -> str:
    """The pattern of all the worker prints on a fresh server: the default catalog
    has image.upscale at 10 units, the worker's account an allotment of 1000."""
    e = re.escape
    lines = [
        e(f"target {address}: retry UNAVAILABLE up to {attempts} attempts, "
          "deadline 5000 ms per call"),
        r"account (?P<account>node-worker-[0-9a-f]{8}): created, available 1000",
        e("quote: image.upscale costs 10 units per quantity"),
        e("reserve+commit: held 20, charged 20, available 1000 -> 980"),
        e("reserve+partial commit: held 30, charged 10, released 20, available 980 -> 970"),
        e("reserve+refund: held 20, refunded 20, available 970 -> 970"),
        e("insufficient: Reserve of 98 x image.upscale refused with RESOURCE_EXHAUSTED, "
          'available=970 required=980 budget_id=""'),
        e("replay: the same idempotency key answered reservation ") + r"\S+"
        + e(" again (replayed=true), held once: available 970 -> 960, released -> 970"),
        e(f"unavailable: a server answering UNAVAILABLE got {attempts} attempts with one "
          "idempotency key, then the worker gave up within the 5000 ms deadline"),
        e("deadline: a call whose deadline has passed is not sent (DEADLINE_EXCEEDED)"),
        r"balance (?P=account): available=(?P<available>\d+) held=(?P<held>\d+) "
        r"charged_total=(?P<charged>\d+) refunded_total=(?P<refunded>\d+)",
        "ok",
    ]
    return "\n".join(lines) + "\n"


def test_the_node_worker_runs_every_step_against_a_real_server(
    worker: list[str], started: list[subprocess.Popen[bytes]], tmp_path: Path,
) -> None:
    """Proves the TypeScript worker, compiled from this checkout, goes through every
    step with exact figures against `tally serve`, and that the balance it reports
    is the one the server gives Python."""
    address = f"127.0.0.1:{free_port()}"
    started.append(start(address, tmp_path))
    attempts = json.loads(service_config())["methodConfig"][0]["retryPolicy"]["maxAttempts"]
    done = subprocess.run([*worker, "--target", address], env=_worker_env(),
                          capture_output=True, text=True, timeout=WORKER_TIMEOUT_S, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    found = re.fullmatch(_expected(address, attempts), done.stdout)
    assert found is not None, done.stdout
    with grpc.insecure_channel(address) as channel:
        balance = quota_pb2_grpc.QuotaServiceStub(channel).GetBalance(
            quota_pb2.GetBalanceRequest(account_id=found["account"]), timeout=10
        ).balance
    reported = {k: int(found[k]) for k in ("available", "held", "charged", "refunded")}
    assert reported == {
        "available": balance.available,
        "held": balance.held,
        "charged": balance.units_charged_total,
        "refunded": balance.units_refunded_total,
    }
    # 20 + 10 charged of the 1000 granted; the refunded and replayed holds were released.
    assert (balance.available, balance.held, balance.units_charged_total) == (970, 0, 30)


def test_the_node_worker_sends_its_token(
    worker: list[str], started: list[subprocess.Popen[bytes]], tmp_path: Path,
) -> None:
    """Proves TALLY_TOKEN reaches the server as a bearer token: with --auth required
    the worker passes with the admin token and is refused UNAUTHENTICATED without."""
    address = f"127.0.0.1:{free_port()}"
    token_file, token = written_token(tmp_path)
    started.append(start(address, tmp_path / "data", extra=[
        "--auth", "required", "--bootstrap-token-file", str(token_file)]))
    without = subprocess.run([*worker, "--target", address], env=_worker_env(),
                             capture_output=True, text=True, timeout=WORKER_TIMEOUT_S, check=False)
    assert without.returncode == 1
    assert "node-worker failed: Unauthenticated" in without.stderr, without.stderr
    with_token = subprocess.run([*worker, "--target", address], env=_worker_env(token),
                                capture_output=True, text=True, timeout=WORKER_TIMEOUT_S,
                                check=False)
    assert with_token.returncode == 0, with_token.stdout + with_token.stderr
    assert with_token.stdout.endswith("\nok\n")
    account = re.search(r"^account (\S+): created", with_token.stdout, re.MULTILINE)
    assert account is not None
    with grpc.insecure_channel(address) as channel:
        balance = quota_pb2_grpc.QuotaServiceStub(channel).GetBalance(
            quota_pb2.GetBalanceRequest(account_id=account[1]), timeout=10,
            metadata=bearer(token),
        ).balance
    assert f"balance {account[1]}: available={balance.available} " in with_token.stdout
