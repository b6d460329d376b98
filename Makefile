# aoe-twisted: every target does its own set-up on a fresh Debian machine (as root).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: help venv deps test lint demo bench clean

help:
	@echo "make demo   - serve a memory disk on a private veth pair and use it from the other end"
	@echo "make test   - install everything the tests need and run the whole trial suite"
	@echo "make lint   - ruff over src, tests and benchmarks"
	@echo "make bench  - micro-benchmarks of the protocol core"

deps:
	@scripts/install-system-deps

$(STAMP): pyproject.toml
	@scripts/install-system-deps --python-only
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@# Build Twisted's plugin cache once, so twistd does not rescan on every start.
	$(PY) -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"
	@touch $@

venv: $(STAMP)

test: deps venv
	$(PY) scripts/run_trial.py --temp-directory=$(VENV)/_trial_temp tests
	$(VENV)/bin/ruff check src tests benchmarks

lint: venv
	$(VENV)/bin/ruff check src tests benchmarks

demo: venv
	@scripts/install-system-deps --demo
	$(PY) scripts/demo.py

bench: venv
	$(PY) benchmarks/micro_codec.py
	$(PY) benchmarks/micro_serve.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info src/twisted/plugins/dropin.cache _trial_temp
