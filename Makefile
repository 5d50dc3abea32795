# kemi-o365. Two commands, on a fresh Debian 12 machine as root:
#   make run    set up what is missing, then one real seed call through the lab (ladder + verdict)
#   make test   the same set-up, then lint and the whole test suite
SHELL := /bin/bash
# Kamailio embeds Debian's /usr/bin/python3, so the venv must be made from that interpreter.
SYSTEM_PYTHON := /usr/bin/python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kemi-o365-installed

.PHONY: setup system venv run test lint unit bench clean install

# `make install`: the SBC for systemd. PREFIX holds a venv made from Debian's python3 with the package
# (not editable: the clone may go) and Kamailio's files; the units go to SYSTEMDDIR, an example policy
# to SYSCONFDIR unless one is there. DESTDIR stages everything under another root (packaging, tests).
PREFIX ?= /opt/kemi-o365
SYSCONFDIR ?= /etc/kemi-o365
SYSTEMDDIR ?= /etc/systemd/system
DESTDIR ?=

setup: system venv

system:
	@bash scripts/setup-system.sh

venv: $(STAMP)

$(STAMP): pyproject.toml | system
	@if [ ! -x $(PY) ] || [ "$$($(PY) -c 'import sys; print(sys.base_prefix)')" != "/usr" ]; then \
		echo "setup: creating $(VENV) from $(SYSTEM_PYTHON)"; rm -rf $(VENV); $(SYSTEM_PYTHON) -m venv $(VENV); fi
	@echo "setup: installing kemi-o365 and its dependencies into $(VENV) (pip; up to a minute) ..."
	@$(PY) -m pip install --quiet --disable-pip-version-check -e '.[lab,dev]'
	@touch $(STAMP)

run: setup
	@$(VENV)/bin/kemi-o365 demo

install:
	@if [ -z "$(DESTDIR)" ]; then bash scripts/setup-system.sh --runtime; fi
	@DESTDIR="$(DESTDIR)" PREFIX="$(PREFIX)" SYSCONFDIR="$(SYSCONFDIR)" SYSTEMDDIR="$(SYSTEMDDIR)" \
		bash scripts/install.sh

lint: venv
	@$(VENV)/bin/ruff check .
	@$(VENV)/bin/ruff format --check .
	@$(VENV)/bin/mypy

test: setup lint
	@$(VENV)/bin/pytest

unit: venv
	@$(VENV)/bin/pytest tests/unit

# Long runs, not part of `make test` (which holds a short version of each so they cannot rot):
# kemi-o365 against native kamailio.cfg (benchmarks/results/latest.json + report.md), then the TLS soak.
# matplotlib (the report's plots) is installed here only, once: `make test` does not need it.
BENCH_STAMP := $(VENV)/.kemi-o365-bench-installed

$(BENCH_STAMP): pyproject.toml | $(STAMP)
	@echo "setup: installing the bench extra (matplotlib) into $(VENV) ..."
	@$(PY) -m pip install --quiet --disable-pip-version-check -e '.[lab,dev,bench]'
	@touch $(BENCH_STAMP)

bench: setup $(BENCH_STAMP)
	@$(PY) benchmarks/bench.py
	@$(PY) benchmarks/tls_soak.py --connections 50000 --minutes 10

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
