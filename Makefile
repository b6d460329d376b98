# aoe-twisted: every target does its own set-up on a fresh Debian machine (as root).
# Debian's own python3 when there is one: world-readable, so the least-privilege
# tests can run the server as nobody from this virtual environment.
PYTHON ?= $(shell [ -x /usr/bin/python3 ] && echo /usr/bin/python3 || echo python3)
export PYTHON
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: help venv deps test lint demo bench clean

help:
	@echo "make demo   - serve a memory disk on a private veth pair and use it from the other end"
	@echo "make test   - install everything the tests need and run the whole trial suite"
	@echo "make lint   - ruff over src, tests, benchmarks, fuzz and scripts"
	@echo "make fuzz   - run each atheris fuzz target for FUZZ_SECONDS (default 60)"
	@echo "make fuzz-native - the lane and frames targets for FUZZ_SECONDS each, against _lane.c built with ASan and UBSan"
	@echo "make bench  - micro-benchmarks, then vblade vs aoe-twisted (veth load generator, Linux initiator; quick)"

deps:
	@scripts/install-system-deps

$(STAMP): pyproject.toml Makefile src/aoe_twisted/lane/_lane.c
	@scripts/install-system-deps --python-only
	@# Debian's python3-libnbd and python3-rbd (nbd:, rbd:) are not on PyPI: see them.
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@# Build Twisted's plugin cache once, so twistd does not rescan on every start.
	$(PY) -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"
	@touch $@

venv: $(STAMP)

test: deps venv
	$(PY) scripts/run_trial.py --temp-directory=$(VENV)/_trial_temp tests
	$(VENV)/bin/ruff check src tests benchmarks fuzz scripts

lint: venv
	$(VENV)/bin/ruff check src tests benchmarks fuzz scripts

demo: venv
	@scripts/install-system-deps --demo
	$(PY) scripts/demo.py

bench: deps venv
	$(PY) benchmarks/micro_codec.py
	$(PY) benchmarks/micro_serve.py --into
	$(PY) benchmarks/micro_serve.py --lane
	$(PY) benchmarks/raw_capacity.py --quick
	$(PY) benchmarks/linux_initiator.py --quick

clean:
	rm -rf $(VENV) build dist src/*.egg-info src/twisted/plugins/dropin.cache _trial_temp

# make fuzz FUZZ_SECONDS=60: each atheris target (fuzz/) for that many seconds; the
# minimized corpus (fuzz/corpus/) and any crashers (fuzz/crashers/) stay in the repository.
FUZZ_SECONDS ?= 60
.PHONY: fuzz
fuzz: venv
	$(PY) -m pip install -q -e '.[fuzz]'
	$(PY) fuzz/run.py --seconds $(FUZZ_SECONDS)

# make fuzz-native FUZZ_SECONDS=150: the compiled lane (_lane.c) built with AddressSanitizer and
# UndefinedBehaviorSanitizer into build/fuzz-native/, checked to be instrumented (a canary must
# abort), then the lane and frames targets against it; fuzz/native.py says how.
.PHONY: fuzz-native
fuzz-native: venv
	$(PY) -m pip install -q -e '.[fuzz]'
	$(PY) fuzz/native.py --seconds $(FUZZ_SECONDS)
