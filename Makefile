# Two commands on a fresh machine: `make run` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
PROTOS := $(wildcard protos/tally/v1/*.proto)
STUBS := src/tally/v1/quota_pb2.py

.PHONY: setup proto run test lint typecheck unit clean

setup: $(INSTALLED) $(STUBS)

$(INSTALLED): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(INSTALLED)

# The one command that generates the Python stubs from protos/ (not committed).
proto $(STUBS): $(INSTALLED) $(PROTOS) scripts/gen_protos.sh
	PYTHON=$(PY) ./scripts/gen_protos.sh

run: setup
	@if [ -z "$$TALLY_REDIS_URL" ] && ! command -v redis-server >/dev/null; then \
	  echo "make run: redis-server is not installed. Install it with"; \
	  echo "  sudo apt-get install -y redis-server     (Debian/Ubuntu)"; \
	  echo "  brew install redis                       (macOS)"; \
	  echo "or set TALLY_REDIS_URL=redis://host:port/0 to use an existing Redis."; \
	  exit 1; fi
	$(VENV)/bin/tally serve

lint: setup
	$(VENV)/bin/ruff check src tests bench loadtests

typecheck: setup
	$(VENV)/bin/mypy

test: lint typecheck
	$(VENV)/bin/pytest -q

clean:
	rm -rf $(VENV) src/tally/v1/*_pb2*.py src/tally/v1/*_pb2*.pyi .mypy_cache .pytest_cache
