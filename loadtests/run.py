"""`make loadtest`: the Locust load test, headless, for a bounded time.

Without TALLY_TARGET it starts its own server first: `tally serve` on a free
loopback port, with its embedded Redis and SQLite ledger in a scratch folder,
authentication required and a bootstrap admin token written for the run; it stops
that server (and so its Redis) afterwards and removes the folder. With
TALLY_TARGET it calls that server as the admin token in TALLY_TOKEN (or the file
in TALLY_TOKEN_FILE); TLS through TALLY_TLS_CA and the client variables.

Prints Locust's summary and writes <results>/tally_stats.csv (with _failures,
_exceptions and _stats_history) and <results>/tally.html. Arguments after `--`
go to Locust as they are (e.g. `-- --tally-accounts 500`). Exits with Locust's
code: 1 when any call failed.
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

HERE = Path(__file__).resolve().parent
LOCUSTFILE = HERE / "locustfile.py"
RESULTS_PREFIX = "tally"
SERVER_START_TIMEOUT_S = 60.0
SERVER_STOP_TIMEOUT_S = 30.0
SERVER_SHUTDOWN_GRACE = "2s"


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=20, help="concurrent users (default 20)")
    parser.add_argument("--spawn-rate", type=float, default=10,
                        help="users started per second (default 10)")
    parser.add_argument("--run-time", default="60s", help="how long, e.g. 60s, 5m (default 60s)")
    parser.add_argument("--processes", type=int, default=1,
                        help="Locust processes on this machine; -1: one per core (default 1)")
    parser.add_argument("--results", type=Path, default=HERE / "results",
                        help="folder for the CSV and HTML reports (default loadtests/results)")
    if "--" in argv:
        split = argv.index("--")
        return parser.parse_args(argv[:split]), argv[split + 1 :]
    return parser.parse_args(argv), []


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def new_admin_token() -> str:
    """A token in Tally's format (README, Docker), registered by --bootstrap-token-file."""
    return f"tly_tok_{secrets.token_hex(8)}_{secrets.token_urlsafe(32)}"


def wait_serving(target: str, server: subprocess.Popen[bytes], log: Path) -> None:
    """Returns once the server answers its health check; exits if it died or never did."""
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    with grpc.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if server.poll() is not None:
                break
            try:
                answer = health.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                if answer.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass  # not listening yet
            time.sleep(0.2)
    sys.stderr.write(log.read_text(errors="replace"))
    raise SystemExit(f"loadtest: the server did not start within {SERVER_START_TIMEOUT_S:.0f}s")


@contextmanager
def own_server() -> Iterator[dict[str, str]]:
    """A `tally serve` of our own; yields the variables that point Locust at it."""
    with tempfile.TemporaryDirectory(prefix="tally-loadtest-") as scratch:
        folder = Path(scratch)
        token = new_admin_token()
        token_file = folder / "bootstrap-token"
        token_file.write_text(token + "\n")
        token_file.chmod(0o600)
        target = f"127.0.0.1:{free_port()}"
        log = folder / "server.log"
        with log.open("wb") as log_file:
            server = subprocess.Popen(
                [sys.executable, "-m", "tally.cli.main", "serve", "--listen", target,
                 "--data-dir", str(folder / "data"), "--auth", "required",
                 "--bootstrap-token-file", str(token_file), "--metrics-listen", "",
                 "--log-level", "WARNING", "--shutdown-grace", SERVER_SHUTDOWN_GRACE],
                stdout=log_file, stderr=subprocess.STDOUT,
            )
        try:
            wait_serving(target, server, log)
            print(f"loadtest: started tally serve on {target} (embedded Redis, SQLite ledger)",
                  flush=True)
            yield {"TALLY_TARGET": target, "TALLY_TOKEN": token}
        finally:
            stop(server)


def stop(server: subprocess.Popen[bytes]) -> None:
    """SIGTERM (the server stops its embedded Redis), SIGKILL if it hangs."""
    if server.poll() is None:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(SERVER_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def locust_command(args: argparse.Namespace, passed: list[str]) -> list[str]:
    args.results.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--only-summary",
        "--users", str(args.users), "--spawn-rate", str(args.spawn_rate),
        "--run-time", args.run_time, "--stop-timeout", "10",
        "--csv", str(args.results / RESULTS_PREFIX),
        "--html", str(args.results / f"{RESULTS_PREFIX}.html"),
        "--exit-code-on-error", "1",
    ]
    if args.processes != 1:
        command += ["--processes", str(args.processes)]
    return command + passed


def main(argv: list[str]) -> int:
    args, passed = parse(argv)
    command = locust_command(args, passed)
    if os.environ.get("TALLY_TARGET"):
        code = subprocess.call(command)
    else:
        with own_server() as variables:
            code = subprocess.call(command, env={**os.environ, **variables})
    print(f"loadtest: reports in {args.results}/ ({RESULTS_PREFIX}_stats.csv, "
          f"{RESULTS_PREFIX}.html); exit code {code}", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
