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
# The repository's protos/; an sdist carries its own copy (setup.py).
DEFAULT_PROTOS = HERE / "protos" if (HERE / "protos").is_dir() else HERE.parent / "protos"
DEFAULT_OUT = HERE / "src" / "tally_client" / "v1"
# The imports between the modules, and the module name each _pb2.py gives its
# classes; nothing else (the serialized descriptors keep tally/v1 and tally.v1).
GENERATED_IMPORT = re.compile(r"^from tally\.v1 import ", re.MULTILINE)
GENERATED_MODULE = re.compile(r"(BuildTopDescriptorsAndMessages\(DESCRIPTOR, ')tally\.v1\.")
SERVICE_CONFIG = "service_config.json"


def _plugin(name: str) -> str:
    """A protoc plugin installed beside this Python (a build environment's scripts
    folder is on PATH only sometimes)."""
    beside = Path(sysconfig.get_path("scripts")) / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        raise SystemExit(f"gen_stubs: {name} not found (pip install mypy-protobuf)")
    return found


def _renamed(generated: Path) -> str:
    text = GENERATED_IMPORT.sub("from tally_client.v1 import ", generated.read_text())
    text, named = GENERATED_MODULE.subn(r"\1tally_client.v1.", text)
    if generated.name.endswith("_pb2.py") and named != 1:
        raise SystemExit(f"gen_stubs: {generated.name}: the module name was not found once "
                         "(a new protoc layout?)")
    if re.search(r"^(from|import) tally\.v1\b", text, re.MULTILINE):
        raise SystemExit(f"gen_stubs: {generated.name} still imports tally.v1")
    return text


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
            (out / generated.name).write_text(_renamed(generated))
    shutil.copyfile(protos / "tally" / "v1" / SERVICE_CONFIG, out / SERVICE_CONFIG)


if __name__ == "__main__":
    arguments = [Path(arg) for arg in sys.argv[1:3]]
    generate(*arguments)
