# The two commands: `make run` (set up and start) and `make test` (set up and test).
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
RUNTIME_STAMP := $(VENV)/.runtime-installed
DEV_STAMP := $(VENV)/.dev-installed
XTTS_STAMP := $(VENV)/.xtts-installed

.PHONY: run test bench check lint typecheck services format clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(RUNTIME_STAMP): requirements.txt | $(BIN)/python
	$(BIN)/pip install --quiet -r requirements.txt
	touch $@

$(DEV_STAMP): $(RUNTIME_STAMP) requirements-dev.txt
	$(BIN)/pip install --quiet -r requirements-dev.txt
	touch $@

# torch and coqui-tts: several GB, so only the tests and the GPU image take them.
$(XTTS_STAMP): $(RUNTIME_STAMP) requirements-xtts.txt
	$(BIN)/pip install --quiet -r requirements-xtts.txt
	touch $@

# A local .env with a fresh SECRET_KEY, so that DEBUG can stay off.
.env:
	@echo "SECRET_KEY=$$($(PYTHON) -c 'import secrets; print(secrets.token_urlsafe(50))')" > .env
	@echo "Wrote .env with a new SECRET_KEY."

run: $(RUNTIME_STAMP) .env
	$(BIN)/python manage.py migrate --noinput
	$(BIN)/python manage.py collectstatic --noinput --verbosity 0
	$(BIN)/python manage.py ensure_demo_tenant
	$(BIN)/python -m callwaiting_tts.serve

services:
	scripts/ensure_services.sh

lint: $(DEV_STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/hadolint Dockerfile

typecheck: $(DEV_STAMP)
	$(BIN)/mypy .

check: lint typecheck

test: $(DEV_STAMP) $(XTTS_STAMP) services check
	$(BIN)/pytest

# Every benchmark scenario against a local server (Postgres, Redis); prints one table.
bench: $(DEV_STAMP) services
	$(BIN)/python bench/run.py

format: $(DEV_STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) var staticfiles .pytest_cache .mypy_cache .ruff_cache
