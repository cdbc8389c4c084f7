# relay: every developer task is a target here. `make help` lists them.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help install run lint fmt test test-fast redis-server bench clean

help:             ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | expand -t 18

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP) ## create .venv and install relay with its development tools

run: $(STAMP)     ## one pod on 127.0.0.1:8000 (internal :8001) with the in-memory broker
	@echo "relay: WebSocket ws://127.0.0.1:8000/<group>  metrics http://127.0.0.1:8001/metrics  (Ctrl+C drains)"
	RELAY_DRAIN_DELAY=$${RELAY_DRAIN_DELAY:-0} $(BIN)/python -m service

lint: $(STAMP)    ## ruff (format and rules) and mypy --strict, changing nothing
	$(BIN)/ruff format --check service tests
	$(BIN)/ruff check service tests
	$(BIN)/mypy

fmt: $(STAMP)     ## apply ruff's formatting and safe fixes
	$(BIN)/ruff format service tests
	$(BIN)/ruff check --fix service tests

redis-server:     ## make sure redis-server is installed (apt-get when root), else fail clearly
	@command -v redis-server >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; \
	  else echo "relay tests need redis-server (7.0+) on PATH: install it (apt-get install redis-server)" >&2; exit 1; fi; }
	@redis-server --version

test: lint redis-server ## everything CI runs: lint, unit and end-to-end tests (starts its own redis-server)
	$(BIN)/pytest -n auto --dist loadgroup

test-fast: $(STAMP) ## unit tests only: no subprocesses, no Redis
	$(BIN)/pytest -m "not integration"

clean:            ## remove the virtualenv and caches
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
