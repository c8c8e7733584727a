# agentplane developer commands. Everything runs inside .venv, created by `make setup`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin

.PHONY: setup sandbox-deps gen gen-check lint typecheck buf-lint test check up demo clean

setup: sandbox-deps $(VENV)/.installed

## Install bubblewrap (the local workspace sandbox) when missing and possible; warn otherwise.
sandbox-deps:
	@sh scripts/sandbox-deps.sh

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

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

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

check: lint typecheck buf-lint gen-check test

## Run the whole product on this machine (embedded Postgres/Redis when no URLs are set).
up: setup
	$(BIN)/agentplane up

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
