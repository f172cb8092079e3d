# Trellis: `make run` (demo) and `make test` work on a fresh machine; everything they
# need is installed here, into .venv and node_modules.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
BUF := npx --no-install buf

.PHONY: help system-deps install run test proto lint up bench clean

help:
	@echo "make run    - install, start the embedded stack, run an example goal"
	@echo "make test   - install, run every test (unit, integration, end-to-end, stubs, buf)"
	@echo "make proto  - regenerate the committed Python stubs from protos/"
	@echo "make lint   - buf lint, buf format, buf breaking (vs main), ruff"
	@echo "make up     - start the five services as processes on their default ports"
	@echo "make bench  - cache, single-flight and executor figures into bench/results/latest.json"

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

# Tests start their own redis-server and prometheus (never the machine's shared ones);
# install them when the machine lacks them and apt-get is there (root, Debian), else say
# what is missing. Debian's `prometheus` package also ships `promtool` (asset checks).
# Its postinst may start a daemon on :9090 where an init system allows it; the tests
# never use it (they start their own on a free port) and leave it alone.
system-deps:
	@command -v redis-server >/dev/null || { \
		if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
			apt-get update -qq && apt-get install -y -qq redis-server >/dev/null; \
		else echo "redis-server is needed by the tests: install it (e.g. apt-get install redis-server)"; exit 1; fi; }
	@{ command -v prometheus && command -v promtool; } >/dev/null || { \
		if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
				--no-install-recommends prometheus >/dev/null; \
		else echo "prometheus and promtool are needed by the tests: install them (e.g. apt-get install prometheus)"; exit 1; fi; }
	@command -v node >/dev/null || { echo "node (>= 18) is needed by the tests"; exit 1; }

install: system-deps $(INSTALLED) node_modules/.installed examples/node-tool-server/node_modules/.installed

run: $(INSTALLED)
	$(VENV)/bin/trellis demo

up: $(INSTALLED)
	$(VENV)/bin/trellis up

# The benchmark-only extra (langgraph for the baseline, matplotlib for the Gantt chart).
$(VENV)/.bench-installed: $(INSTALLED) pyproject.toml
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[bench]'
	@touch $@

bench: $(INSTALLED) $(VENV)/.bench-installed
	$(PY) -m bench

test: install
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

clean:
	rm -rf $(VENV) node_modules .trellis .pytest_cache .ruff_cache
