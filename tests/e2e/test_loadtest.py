"""The Locust load test, run for a few seconds the way `make loadtest` runs it:
loadtests/run.py against a server this test starts, read back from Locust's exit
code and its CSV report."""

from __future__ import annotations

import asyncio
import csv
import os
import sys
from pathlib import Path

import grpc

from tally_client.v1 import token_pb2, token_pb2_grpc
from tests.e2e.test_auth import bearer
from tests.e2e.test_bootstrap_token import written_token
from tests.support import RedisProcess, start_running, stop_running
from tests.tls_support import CertificateAuthority

ROOT = Path(__file__).resolve().parents[2]
RUN = ROOT / "loadtests" / "run.py"
RUN_TIMEOUT_S = 90.0
# Few users, short waits, and dry accounts without a unit: each user deals its 20
# tasks (every kind, and jobs for a dry account, refused) within a few seconds.
SMOKE = ("--users", "4", "--spawn-rate", "4", "--run-time", "5s")
SMOKE_LOCUST = ("--tally-think-max", "0.02", "--tally-job-max", "0.02",
                "--tally-accounts", "10", "--tally-dry-accounts", "2", "--tally-dry-units", "0")
# What the workload calls (loadtests/locustfile.py), each under its RPC's name.
RPCS = ("Reserve", "Commit", "Refund", "Extend", "Charge", "Quote", "GetBalance")
REFUSED = "Reserve [refused]"


async def run_loadtest(env: dict[str, str], results: Path) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(RUN), *SMOKE, "--results", str(results), "--", *SMOKE_LOCUST,
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), RUN_TIMEOUT_S)
    assert process.returncode is not None
    return process.returncode, output.decode(errors="replace")


def stats(results: Path) -> dict[str, tuple[int, int]]:
    """Locust's CSV: name -> (requests, failures)."""
    with (results / "tally_stats.csv").open(newline="") as file:
        return {row["Name"]: (int(row["Request Count"]), int(row["Failure Count"]))
                for row in csv.DictReader(file)}


def environment(**variables: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TALLY_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"),
                                                      os.environ.get("PYTHONPATH")]))
    return env | variables


async def test_a_smoke_load_test_calls_every_rpc_and_counts_refusals_apart(
    own_redis: RedisProcess, tmp_path: Path
) -> None:
    """Proves a short Locust run against a server with TLS and authentication required
    (as a deployment runs) makes
    its own accounts and a worker token scoped to them with the admin token it is
    given (revoked at the end), calls every RPC of the workload, counts the dry
    accounts' RESOURCE_EXHAUSTED as refusals, and fails no call: Locust exits 0 (it
    exits 1 on any failure) and its CSV agrees."""
    token_file, token = written_token(tmp_path)
    ca = CertificateAuthority(tmp_path / "ca")
    server = ca.issue("server", server=True)
    running = await start_running(own_redis.url, auth="required",
                                  bootstrap_token_file=str(token_file),
                                  tls_cert=server.cert, tls_key=server.key)
    results = tmp_path / "results"
    credentials = grpc.ssl_channel_credentials(ca.cert.read_bytes())
    try:
        code, output = await run_loadtest(
            environment(TALLY_TARGET=running.authority.address, TALLY_TOKEN=token,
                        TALLY_TLS_CA=str(ca.cert)),
            results,
        )
        async with grpc.aio.secure_channel(running.authority.address, credentials) as channel:
            listed = await token_pb2_grpc.TokenServiceStub(channel).ListTokens(
                token_pb2.ListTokensRequest(), metadata=bearer(token))
    finally:
        await stop_running(running)
    assert code == 0, output
    made = [t for t in listed.tokens if t.created_by != "bootstrap-token-file"]
    assert [(t.role, len(t.accounts), t.HasField("revoked_at")) for t in made] == [
        ("worker", 10, True)
    ]
    counted = stats(results)
    assert {rpc: counted.get(rpc, (0, 0))[0] > 0 for rpc in RPCS} == dict.fromkeys(RPCS, True)
    assert counted[REFUSED][0] > 0, counted
    assert {name: failures for name, (_, failures) in counted.items() if failures} == {}
    assert (results / "tally.html").stat().st_size > 0


async def test_a_load_test_with_a_wrong_token_fails(own_redis: RedisProcess,
                                                    tmp_path: Path) -> None:
    """Proves the run fails (non-zero, the status named) when its setup is refused,
    here for a token the server does not know, rather than reporting an empty success."""
    token_file, _ = written_token(tmp_path)
    running = await start_running(own_redis.url, auth="required",
                                  bootstrap_token_file=str(token_file))
    (tmp_path / "other").mkdir()
    _, stranger = written_token(tmp_path / "other")
    try:
        code, output = await run_loadtest(
            environment(TALLY_TARGET=running.authority.address, TALLY_TOKEN=stranger),
            tmp_path / "results",
        )
    finally:
        await stop_running(running)
    assert code != 0, output
    assert "making the accounts and worker tokens failed: UNAUTHENTICATED" in output


def processes_under(folder: Path) -> list[str]:
    """Command lines of the live processes that name `folder` or work in it (a
    redis-server retitles itself, but works in its --dir)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            cwd = os.readlink(entry / "cwd")
        except (OSError, ValueError):
            continue  # gone, not a process, or not ours to read
        if str(folder) in command or cwd.startswith(str(folder)):
            found.append(command)
    return found


async def test_make_loadtest_starts_and_stops_a_server_of_its_own(tmp_path: Path) -> None:
    """Proves the launcher without TALLY_TARGET (`make loadtest` on a fresh clone)
    starts `tally serve` with its embedded Redis, runs Locust against it with the
    admin token it wrote, and leaves no process and no scratch folder behind."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    code, output = await run_loadtest(environment(TMPDIR=str(scratch)), tmp_path / "results")
    assert code == 0, output
    assert "started tally serve on 127.0.0.1:" in output
    assert stats(tmp_path / "results")["Aggregated"][1] == 0
    assert processes_under(scratch) == []
    assert list(scratch.iterdir()) == []
