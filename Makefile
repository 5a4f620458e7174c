# `make test` is the one command that installs what the tests need and runs all of them;
# .ci/run calls it on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
DEBIAN_PACKAGES := prometheus prometheus-alertmanager

.PHONY: run test lint bench deps system-deps clean rules

# Start the exporter with the arguments in ARGS (make run ARGS="--interval 5s").
run: $(VENV)/.installed
	$(VENV)/bin/trt-heartbeat-exporter serve $(ARGS)

test: lint
	$(PY) -m pytest -q

lint: deps
	$(VENV)/bin/ruff check exporter tests bench deploy grafana rules
	$(VENV)/bin/ruff format --check exporter tests bench deploy grafana rules
	$(VENV)/bin/mypy

bench: deps
	$(PY) bench/bench_overhead.py
	$(PY) bench/bench_soak.py
	$(PY) bench/bench_halfopen.py --mode half-open
	$(PY) bench/bench_halfopen.py --mode idle

# The rollout guard's rules are generated from the service sources (tests keep them equal).
rules: $(VENV)/.installed
	$(VENV)/bin/trt-heartbeat-exporter service-rules > rules/service-sources.rules.yml
	$(VENV)/bin/trt-heartbeat-exporter service-rules --canary > rules/service-canary.rules.yml
	$(PY) deploy/generate.py

deps: system-deps $(VENV)/.installed

# promtool, amtool and Alertmanager (Debian packages prometheus, prometheus-alertmanager) run in
# the tests for real.
system-deps:
	@{ command -v promtool && command -v amtool && command -v prometheus-alertmanager; } >/dev/null 2>&1 || { \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends \
	    $(DEBIAN_PACKAGES) >/dev/null; }

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,lint,gpu,tensorrt-lean]'
	touch $@

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache exporter/*.egg-info
