# Every dependency is installed from this project's own files: `make test` on a fresh machine
# with only Python 3.11+ creates .venv, installs the project with its dev extras, and runs the suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PROTO := protos/ecu_sidecar/api/v1/quota.proto
PYTEST_ARGS ?=

.PHONY: install run test lint fmt proto proto-check clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

## Run the sidecar on the embedded default (no Redis or database needed).
run: $(STAMP)
	$(BIN)/ecu-sidecar serve

## The whole test suite (real Redis on 127.0.0.1:6379 and a Redis Cluster it starts itself).
test: $(STAMP)
	$(BIN)/python -m ruff check .
	$(BIN)/python -m pytest $(PYTEST_ARGS)

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

clean:
	rm -rf $(VENV) .proto-check .pytest_cache build *.egg-info
