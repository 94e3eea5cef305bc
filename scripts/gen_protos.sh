#!/usr/bin/env bash
# Generates the Python stubs (and .pyi files for mypy) from protos/ into
# src/tally/v1/, and copies the gRPC service config beside them (package data
# that tally.client reads). The output is not committed; `make proto` runs this.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
BIN=$(dirname "$PY")
rm -f src/tally/v1/*_pb2*.py src/tally/v1/*_pb2*.pyi src/tally/v1/service_config.json
"$PY" -m grpc_tools.protoc -I protos \
  --python_out=src --grpc_python_out=src \
  --plugin=protoc-gen-mypy="$BIN/protoc-gen-mypy" --plugin=protoc-gen-mypy_grpc="$BIN/protoc-gen-mypy_grpc" \
  --mypy_out=src --mypy_grpc_out=src \
  protos/tally/v1/*.proto
cp protos/tally/v1/service_config.json src/tally/v1/service_config.json
