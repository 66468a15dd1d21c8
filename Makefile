# `make up` and `make test` work on a fresh machine: both install what they need first.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: install up test lint bench chaos clean-venv services deploy-deps image

$(STAMP): pyproject.toml scripts/install.sh scripts/build_llama_server.sh
	PY=$(PY) bash scripts/install.sh
	touch $@

install: $(STAMP)

## Set up, then run a whole cluster on this machine (controller, worker, gateway, bundled models).
up: install
	$(BIN)/modelfleet up

## Set up, then run ruff and the whole test suite against real PostgreSQL, MariaDB and Redis.
test: install services deploy-deps
	$(BIN)/ruff check src tests bench
	$(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

services:
	bash scripts/services.sh

## podman, mmdebstrap, podman-compose, promtool for tests/deploy (apt-get, only what is missing).
deploy-deps:
	bash scripts/deploy-deps.sh

## Build the images (slim: controller/gateway; cpu: workers) with podman or docker: docs/deploy.md.
image:
	bash deploy/docker/build.sh all

lint: install
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

bench: install services
	$(BIN)/python bench/registry.py
	$(BIN)/python bench/runners.py
	$(BIN)/python bench/gateway.py
	$(BIN)/python bench/e2e.py

## The failure matrix against real processes: table, bench/results/chaos.json, docs/reliability.md.
chaos: install services
	$(BIN)/python bench/chaos.py

clean-venv:
	rm -rf $(VENV)
