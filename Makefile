# Local serving, demo and tests on CPU. Each target creates .venv on first use, installs what it needs, and
# reinstalls only when a requirements file's content changes.
#
#   make demo [IMAGES=folder]   start the server, detect defects in sample (or your) boards, write out/demo/
#   make serve [SERVE_ARGS=...] serve models/ in the foreground (ports: HTTP_PORT, GRPC_PORT, METRICS_PORT)
#   make test [PYTEST_ARGS=...] the whole test suite, live-server tests included (what CI runs)
#   make unit [PYTEST_ARGS=...] the unit tier: no server, no GPU, not slow (under a minute)
#   make lint                   ruff lint over models/, tools/ and tests/

SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
VENV_PYTHON := $(VENV)/bin/python
IMAGES ?=
DEMO_OUT ?= out/demo
PYTEST_ARGS ?=
# Extra flags of python -m tools.serve, e.g. --http-address 0.0.0.0 or --trace-config rate=100. Latency summaries,
# the stub supervisor and (with OTEL_EXPORTER_OTLP_TRACES_ENDPOINT set) OpenTelemetry tracing are on by default.
SERVE_ARGS ?=

PY_VERSION := $(shell $(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])')
# libpython for the Triton Python-backend stub, libb64 for perf_analyzer (tritonclient[all]).
SYSTEM_LIBRARIES := libpython$(PY_VERSION).so.1.0 libb64.so.0d
SYSTEM_PACKAGES := libpython$(PY_VERSION) libb64-0d
LDCONFIG := $(shell command -v ldconfig || echo /sbin/ldconfig)

# Stamp names carry a hash of the requirements, so editing them (and nothing else) triggers a reinstall.
SERVE_STAMP := $(VENV)/.installed-serve-$(shell cat requirements/serve.txt | sha256sum | cut -c1-16)
TEST_STAMP := $(VENV)/.installed-test-$(shell cat $(sort $(wildcard requirements/*.txt)) | sha256sum | cut -c1-16)

.PHONY: help demo serve test unit lint system-deps

help:
	@sed -n '1,10s/^# \{0,1\}//p' $(firstword $(MAKEFILE_LIST))

demo: $(SERVE_STAMP) system-deps
	$(VENV_PYTHON) -m tools.demo --out "$(DEMO_OUT)" $(if $(IMAGES),--images "$(IMAGES)")

serve: $(SERVE_STAMP) system-deps
	$(VENV_PYTHON) -m tools.serve $(SERVE_ARGS)

# The venv's bin goes first on PATH, as if activated: some tests run its command-line tools (hadolint).
test: $(TEST_STAMP) system-deps
	PATH="$(abspath $(VENV))/bin:$$PATH" $(VENV_PYTHON) -m pytest $(PYTEST_ARGS)

# The tiers are markers that tests/conftest.py applies (pyproject.toml lists them).
unit: $(TEST_STAMP) system-deps
	PATH="$(abspath $(VENV))/bin:$$PATH" $(VENV_PYTHON) -m pytest -m "not live and not slow and not gpu" $(PYTEST_ARGS)

lint: $(TEST_STAMP)
	$(VENV)/bin/ruff check models tools tests

# Installs the missing system packages with apt-get when run as root; otherwise says what to install.
system-deps:
	@missing=""; \
	for library in $(SYSTEM_LIBRARIES); do \
		$(LDCONFIG) -p | grep -q "$$library" || missing="$$missing $$library"; \
	done; \
	$(PYTHON) -c 'import ensurepip' 2>/dev/null || missing="$$missing python$(PY_VERSION)-venv"; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			echo "Installing system packages for:$$missing"; \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
				$(SYSTEM_PACKAGES) $$( $(PYTHON) -c 'import ensurepip' 2>/dev/null || echo python$(PY_VERSION)-venv ); \
		else \
			echo "Missing:$$missing. Install: sudo apt-get install $(SYSTEM_PACKAGES) python$(PY_VERSION)-venv" >&2; \
			exit 1; \
		fi; \
	fi

$(VENV_PYTHON): | system-deps
	$(PYTHON) -m venv $(VENV)

$(SERVE_STAMP): | $(VENV_PYTHON)
	$(VENV_PYTHON) -m pip install -r requirements/serve.txt
	rm -f $(VENV)/.installed-serve-*
	touch $@

# requirements/test.txt includes serve.txt (and gpu-tools.txt), so this also satisfies the serve stamp.
$(TEST_STAMP): | $(VENV_PYTHON)
	$(VENV_PYTHON) -m pip install -r requirements/test.txt
	rm -f $(VENV)/.installed-test-* $(VENV)/.installed-serve-*
	touch $@ $(SERVE_STAMP)
