# The two commands: `make run` (set up and start) and `make test` (set up and test).
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
TOOLS := .tools
UV := $(TOOLS)/bin/uv
RUNTIME_STAMP := $(VENV)/.runtime-synced
DEV_STAMP := $(VENV)/.dev-synced
TEST_STAMP := $(VENV)/.test-synced
# uv finds a Python 3.11 here and never downloads one; its environment is $(VENV).
export UV_PYTHON := 3.11
export UV_PYTHON_DOWNLOADS := never
export UV_PROJECT_ENVIRONMENT := $(VENV)

.PHONY: run test bench check lint typecheck services format clean lock env-check

# uv, from PyPI with its hashes checked (requirements-uv.txt), in a folder of its own so that
# syncing the project's environment never removes it.
$(UV): requirements-uv.txt
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/pip install --quiet --no-deps --require-hashes -r requirements-uv.txt
	touch $@

# Every install comes from uv.lock (--locked: fail if it no longer matches pyproject.toml).
# `make run` needs only the runtime set; --inexact leaves the test sets alone if present.
$(RUNTIME_STAMP): uv.lock pyproject.toml | $(UV)
	$(UV) sync --locked --inexact --no-dev
	touch $@

# Runtime and the dev group (lint, type-check, benchmarks), without XTTS.
$(DEV_STAMP): uv.lock pyproject.toml | $(UV)
	$(UV) sync --locked --inexact
	touch $@

# The test set: runtime, the dev group and XTTS (torch and coqui-tts, several GB).
$(TEST_STAMP): uv.lock pyproject.toml | $(UV)
	$(UV) sync --locked --extra xtts
	touch $@

# Regenerate uv.lock after changing pyproject.toml; `make lock UPGRADE=1` also moves every
# unpinned transitive package to its newest release. Commit both files together.
lock: $(UV)
	$(UV) lock $(if $(UPGRADE),--upgrade)

# The guard before the tests: what is installed is exactly the lock, and consistent.
env-check: $(TEST_STAMP)
	@$(UV) lock --check --quiet || { echo "error: uv.lock is out of date with pyproject.toml: run 'make lock'." >&2; exit 1; }
	@$(UV) sync --locked --extra xtts --check || { echo "error: $(VENV) differs from uv.lock (something was installed by hand?): run '$(UV) sync --locked --extra xtts' or 'make clean'." >&2; exit 1; }
	@$(UV) pip check --quiet --python $(BIN)/python
	@echo "$(VENV) matches uv.lock."

# A local .env with a fresh SECRET_KEY, so that DEBUG can stay off.
.env:
	@echo "SECRET_KEY=$$($(PYTHON) -c 'import secrets; print(secrets.token_urlsafe(50))')" > .env
	@echo "Wrote .env with a new SECRET_KEY."

# `prepare` migrates, collects static files and ensures the demo tenant, skipping each step
# that is already done; serve exits non-zero with a one-line reason if it cannot listen.
run: $(RUNTIME_STAMP) .env
	$(BIN)/python manage.py prepare
	$(BIN)/python -m callwaiting_tts.serve

# Postgres and Redis up; Debian's chromium installed for the browser tests (as root, once).
services:
	scripts/ensure_services.sh
	scripts/ensure_chromium.sh

lint: $(DEV_STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/hadolint Dockerfile
	$(BIN)/lint-imports --no-cache

typecheck: $(DEV_STAMP)
	$(BIN)/mypy .

check: lint typecheck

# Each test has its own limit (pytest-timeout); this one is the backstop for a hang no
# signal handler can reach: SIGABRT makes Python dump every thread's stack, then exit.
# 90 minutes: the suite took some 22 on 2 idle cores and about 40 beside stress-ng --cpu 4
# before the bounded-memory test (tests/e2e/test_bounded_memory.py, 16 min of it on a
# loaded machine); with it, 62 beside stress-ng and a second suite. A shared machine's load
# must not be what ends it.
test: env-check services check
	timeout --signal=ABRT 5400 $(BIN)/pytest

# Every benchmark scenario against a local server (Postgres, Redis); prints one table.
bench: $(DEV_STAMP) services
	$(BIN)/python bench/run.py

format: $(DEV_STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) $(TOOLS) var staticfiles .pytest_cache .mypy_cache .ruff_cache
