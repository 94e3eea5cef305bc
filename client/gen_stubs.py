"""Generates the Python stubs of protos/ into tally_client/v1: messages, gRPC
stubs and their .pyi types (mypy-protobuf), and the service config beside them.

protoc names a module after its proto file (tally/v1/quota.proto ->
tally.v1.quota_pb2); the modules live in tally_client.v1 here, so the imports
between them are renamed after generation. The descriptors keep their proto
names (tally/v1/quota.proto, package tally.v1): the wire does not change.

    python client/gen_stubs.py [PROTOS_DIR] [OUT_DIR]

`make proto` runs it for a checkout; the wheel build (setup.py) runs it into
the wheel.
"""

from __future__ import annotations

import re
import shutil
import sys
import sysconfig
import tempfile
from importlib import resources
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_PROTOS = HERE.parent / "protos"
DEFAULT_OUT = HERE / "src" / "tally_client" / "v1"
# tally.v1.quota_pb2 / tally.v1.quota_pb2_grpc, as imports and as module names
GENERATED_MODULE = re.compile(r"\btally\.v1\.(\w+_pb2(?:_grpc)?)\b")
GENERATED_IMPORT = re.compile(r"^from tally\.v1 import ", re.MULTILINE)
SERVICE_CONFIG = "service_config.json"


def _plugin(name: str) -> str:
    """A protoc plugin installed beside this Python (a build environment's scripts
    folder is on PATH only sometimes)."""
    beside = Path(sysconfig.get_path("scripts")) / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        raise SystemExit(f"gen_stubs: {name} not found (pip install mypy-protobuf)")
    return found


def generate(protos: Path = DEFAULT_PROTOS, out: Path = DEFAULT_OUT) -> None:
    from grpc_tools import protoc

    sources = sorted((protos / "tally" / "v1").glob("*.proto"))
    if not sources:
        raise SystemExit(f"gen_stubs: no .proto files under {protos}/tally/v1")
    well_known = resources.files("grpc_tools") / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "protoc", f"-I{protos}", f"-I{well_known}",
            f"--python_out={tmp}", f"--grpc_python_out={tmp}",
            f"--plugin=protoc-gen-mypy={_plugin('protoc-gen-mypy')}",
            f"--plugin=protoc-gen-mypy_grpc={_plugin('protoc-gen-mypy_grpc')}",
            f"--mypy_out={tmp}", f"--mypy_grpc_out={tmp}",
            *(str(source) for source in sources),
        ]
        if protoc.main(args) != 0:
            raise SystemExit("gen_stubs: protoc failed")
        out.mkdir(parents=True, exist_ok=True)
        for stale in [*out.glob("*_pb2*.py"), *out.glob("*_pb2*.pyi")]:
            stale.unlink()
        for generated in sorted((Path(tmp) / "tally" / "v1").iterdir()):
            text = GENERATED_IMPORT.sub("from tally_client.v1 import ", generated.read_text())
            text = GENERATED_MODULE.sub(r"tally_client.v1.\1", text)
            (out / generated.name).write_text(text)
    shutil.copyfile(protos / "tally" / "v1" / SERVICE_CONFIG, out / SERVICE_CONFIG)


if __name__ == "__main__":
    arguments = [Path(arg) for arg in sys.argv[1:3]]
    generate(*arguments)
