# Trellis: `make run` (demo) and `make test` work on a fresh machine; everything they
# need is installed here, into .venv and node_modules.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
BUF := npx --no-install buf

.PHONY: help system-deps install run test proto lint up bench soak clean

help:
	@echo "make run    - install, start the embedded stack, run an example goal"
	@echo "make test   - install, run every test (unit, integration, end-to-end, stubs, buf)"
	@echo "make proto  - regenerate the committed Python stubs from protos/"
	@echo "make lint   - buf lint, buf format, buf breaking (vs main), ruff, lint-imports (layers)"
	@echo "make up     - start the five services as processes on their default ports"
	@echo "make bench  - cache, executor, batching and five-process figures into bench/results/latest.json"
	@echo "make soak   - SOAK_CLIENTS (50) clients x SOAK_SECONDS (60) s against the stack as processes"

$(INSTALLED): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $@

# `npm install`, not `npm ci`: npm 11 writes only this platform's optional buf binaries
# into the lock file and `npm ci` then refuses it as out of sync. The lock still pins buf.
node_modules/.installed: package.json package-lock.json
	npm install --no-audit --no-fund --loglevel=error
	@touch $@

examples/node-tool-server/node_modules/.installed: examples/node-tool-server/package.json examples/node-tool-server/package-lock.json
	npm install --prefix examples/node-tool-server --no-audit --no-fund --loglevel=error
	@touch $@

clients/node/node_modules/.installed: clients/node/package.json clients/node/package-lock.json
	npm install --prefix clients/node --no-audit --no-fund --loglevel=error
	@touch $@

# Real MCP servers from npm (server-everything, server-filesystem), pinned, for the gateway's tests.
MCP_SERVERS := tests/services/trellis_toolgateway/servers
$(MCP_SERVERS)/node_modules/.installed: $(MCP_SERVERS)/package.json $(MCP_SERVERS)/package-lock.json
	npm install --prefix $(MCP_SERVERS) --no-audit --no-fund --loglevel=error
	@touch $@

# System packages the tests need (redis-server, prometheus/promtool, docker-compose,
# kubectl, node): installed with apt-get when missing, see the script.
system-deps:
	@scripts/system-deps.sh

install: system-deps $(INSTALLED) node_modules/.installed examples/node-tool-server/node_modules/.installed \
	clients/node/node_modules/.installed $(MCP_SERVERS)/node_modules/.installed

run: $(INSTALLED)
	$(VENV)/bin/trellis demo

up: $(INSTALLED)
	$(VENV)/bin/trellis up

# The benchmark-only extra (langgraph for the baseline, matplotlib for the Gantt chart,
# py-spy for bench/profile_processes.py).
$(VENV)/.bench-installed: $(INSTALLED) pyproject.toml
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[bench]'
	@touch $@

bench: $(INSTALLED) $(VENV)/.bench-installed
	$(PY) -m bench

# Mixed runs from N clients for T seconds against the five services as processes:
# lost runs, timeouts, shed calls, latency and each process's memory (soak/README.md).
SOAK_CLIENTS ?= 50
SOAK_SECONDS ?= 60
soak: $(INSTALLED)
	$(PY) -m soak --clients $(SOAK_CLIENTS) --seconds $(SOAK_SECONDS) --out soak/results/latest.json

# The layering contract first (seconds): a broken layer fails before the long suite runs.
test: install
	$(VENV)/bin/lint-imports --no-cache
	$(PY) -m pytest

proto: $(INSTALLED)
	$(PY) scripts/gen_protos.py

lint: install
	$(BUF) lint
	$(BUF) format --diff --exit-code
	@if git rev-parse --verify -q main >/dev/null && git ls-tree -r --name-only main -- protos | grep -q '\.proto$$'; then \
		echo "buf breaking --against main"; $(BUF) breaking --against '.git#branch=main'; \
	else echo "buf breaking: main has no protos yet, skipped"; fi
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports --no-cache

clean:
	rm -rf $(VENV) node_modules .trellis .pytest_cache .ruff_cache
