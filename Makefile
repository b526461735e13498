# Payload Manager — the two commands a new user needs are `make run` and
# `make test`; both build what they need.

CARGO ?= cargo
VENV ?= $(CURDIR)/.venv
# The peers `make bench-peers` measures (Vineyard, Ray) live apart from $(VENV).
BENCH_VENV ?= $(CURDIR)/.venv-bench
# Where `make run` keeps its state; override to start afresh.
STATE_DIR ?= $(or $(XDG_STATE_HOME),$(HOME)/.local/state)/payload-manager

.PHONY: build run test test-rust test-python test-e2e images lint crds bench bench-peers clean venv

build:
	$(CARGO) build --release --workspace --bins

## Run a standalone node (agent + SQLite catalog) on the default socket and 127.0.0.1:50051.
run:
	$(CARGO) build --release -p payload-agent -p payload-client --bins
	@echo "payloadctl is at target/release/payloadctl; try: target/release/payloadctl put README.md"
	RUST_LOG=$${RUST_LOG:-info} ./target/release/payload-agent standalone --state-dir "$(STATE_DIR)"

## The operator's and the agent's images (Dockerfile), tagged with the chart's
## appVersion as the chart expects; IMAGE_PREFIX=registry.example/pm/ to push.
IMAGE_PREFIX ?= payload-manager/
IMAGE_TAG ?= $(shell sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$$/\1/p' charts/payload-manager/Chart.yaml)
images:
	@command -v docker >/dev/null || { echo "make images needs docker (or a docker-compatible CLI with BuildKit)" >&2; exit 2; }
	docker build --target operator -t $(IMAGE_PREFIX)operator:$(IMAGE_TAG) .
	docker build --target agent -t $(IMAGE_PREFIX)agent:$(IMAGE_TAG) .

## The install suite against the cluster KUBECONFIG names (skips without one):
## the chart, a pool, a policy, a pod that puts and a pod that gets.
test-e2e: venv
	PM_E2E_INSTALL=1 "$(VENV)/bin/python" -m pytest -q -rs -p no:cacheprovider e2e/python/test_install.py e2e/python/test_cluster.py

## Every test: Rust unit and integration tests, then the Python compatibility suite.
test: test-rust test-python

# One private PostgreSQL cluster (on 127.0.0.1, a spare port) serves the
# whole run; the parity suite runs every catalog test on it and on SQLite.
WITH_POSTGRES = $(CARGO) run -q -p payload-catalog --features testing --bin with-postgres --

# Tests build the agent with its fault points (they abort only when
# PM_FAILPOINT names one); release builds never have them.
TEST_FEATURES = --features payload-agent/failpoints

# The Python tools the tests use: grpcio for the compatibility suite and
# moto_server, the S3-compatible server the object-tier tests start.
venv:
	@[ -x "$(VENV)/bin/python" ] || python3 -m venv "$(VENV)"
	@"$(VENV)/bin/python" -c 'import grpc_tools, pytest, moto, kubernetes_validate, jsonschema, yaml, helm_python' 2>/dev/null || \
		"$(VENV)/bin/pip" install --quiet --disable-pip-version-check -r e2e/python/requirements.txt

test-rust: venv
	@if $(CARGO) nextest --version >/dev/null 2>&1; then \
		$(WITH_POSTGRES) $(CARGO) nextest run --workspace $(TEST_FEATURES) --no-fail-fast; \
	else \
		$(WITH_POSTGRES) $(CARGO) test --workspace $(TEST_FEATURES) --no-fail-fast; \
	fi

test-python:
	$(CARGO) build -p payload-agent -p payload-client -p payload-operator $(TEST_FEATURES) \
		--bin payload-agent --bin payloadctl --bin payload-operator
	VENV="$(VENV)" PM_AGENT_BIN="$(CURDIR)/target/debug/payload-agent" \
		PM_PAYLOADCTL_BIN="$(CURDIR)/target/debug/payloadctl" \
		PM_OPERATOR_BIN="$(CURDIR)/target/debug/payload-operator" bash e2e/python/run.sh

## The CRDs in crds/ and in the chart, generated from the operator's Rust types.
CRD_DIRS = crds charts/payload-manager/crds
crds:
	for dir in $(CRD_DIRS); do $(CARGO) run -q -p payload-operator --bin crdgen -- $$dir || exit 1; done

lint:
	$(CARGO) fmt --all -- --check
	for dir in $(CRD_DIRS); do $(CARGO) run -q -p payload-operator --bin crdgen -- --check $$dir || exit 1; done
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) clippy --workspace --all-targets $(TEST_FEATURES) -- -D warnings
	RUSTDOCFLAGS="-D warnings" $(CARGO) doc --workspace --no-deps

## Benchmarks: figures and ratios against the floor, measured in one run.
bench: venv
	$(CARGO) bench -p payload-agent --bench standalone
	$(CARGO) bench -p payload-agent --bench catalog
	$(CARGO) bench -p payload-agent --bench objects
	$(CARGO) bench -p payload-agent --bench native
	$(CARGO) build --release -p payload-operator --bin payload-operator
	$(CARGO) bench -p payload-agent --bench cluster
	$(CARGO) bench -p payload-agent --bench cluster_scale
	$(CARGO) bench -p payload-operator --bench reconcile

## Ours beside Vineyard and Ray's object store (PyPI, in .venv-bench) on the
## same workloads, one run, one table in docs/benchmarks.md.
bench-peers:
	CARGO="$(CARGO)" BENCH_VENV="$(BENCH_VENV)" OUT="$(CURDIR)/target/bench-peers" bash bench/peers/run.sh

clean:
	$(CARGO) clean
