# `make test` is the one command that installs what the tests need and runs all of them;
# .ci/run calls it on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
DEBIAN_PACKAGES := prometheus prometheus-alertmanager victoria-metrics

.PHONY: run test test-fast test-e2e lint bench deps system-deps clean generate rules

# Start the exporter with the arguments in ARGS (make run ARGS="--interval 5s"). It installs what
# running needs, not what the tests need: the base package, plus the gpu extra (and the cuda
# backend, which needs no prebuilt plan) where a GPU is visible, detected by the exporter's own
# check (standard library only, so it runs before anything is installed).
GPU_VISIBLE := $(shell python3 exporter/trt_heartbeat/exporter/devices.py 2>/dev/null)
RUN_EXTRAS := $(if $(GPU_VISIBLE),[gpu])
RUN_BACKEND := $(if $(GPU_VISIBLE),--backend cuda)

run: $(VENV)/.run-installed
	@echo "make run: $(if $(GPU_VISIBLE),GPU visible ($(GPU_VISIBLE)): gpu extra$(,) --backend cuda,no GPU visible: base package$(,) reference backend)"
	$(VENV)/bin/trt-heartbeat-exporter serve $(RUN_BACKEND) $(ARGS)

test: lint
	$(PY) -m pytest -q

# Tiers for the edit loop (make test runs them all): everything that starts no Prometheus,
# Alertmanager or VictoriaMetrics server, on two pytest workers (a file's tests stay on one);
# and the end-to-end stacks alone.
test-fast: lint
	$(PY) -m pytest -q -n 2 --dist loadfile -m "not prometheus"

test-e2e: deps
	$(PY) -m pytest -q -m e2e

lint: deps
	$(VENV)/bin/ruff check exporter tests bench deploy grafana rules
	$(VENV)/bin/ruff format --check exporter tests bench deploy grafana rules
	$(VENV)/bin/mypy

bench: deps
	$(PY) bench/bench_overhead.py
	$(PY) bench/bench_soak.py
	$(PY) bench/bench_halfopen.py --mode half-open
	$(PY) bench/bench_halfopen.py --mode idle
	$(PY) bench/bench_hostile.py
	$(PY) bench/bench_rules_fleet.py
	$(PY) bench/bench_scrape.py

# Every generated file, in dependency order: the rollout guard's rules (from the service
# sources), the dashboards (from grafana/build_dashboards.py), then the Kubernetes files that
# embed both. Tests fail while any of them differs from what this writes.
generate: $(VENV)/.installed
	$(VENV)/bin/trt-heartbeat-exporter service-rules > rules/service-sources.rules.yml
	$(VENV)/bin/trt-heartbeat-exporter service-rules --canary > rules/service-canary.rules.yml
	$(PY) grafana/build_dashboards.py
	$(PY) deploy/generate.py

rules: generate

deps: system-deps $(VENV)/.installed

# promtool, amtool, Alertmanager, VictoriaMetrics and vmalert (Debian packages prometheus,
# prometheus-alertmanager, victoria-metrics) run in the tests for real.
system-deps:
	@{ command -v promtool && command -v amtool && command -v prometheus-alertmanager && command -v vmalert; } >/dev/null 2>&1 || { \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends \
	    $(DEBIAN_PACKAGES) >/dev/null; }

, := ,

$(VENV)/.run-installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -e '.$(RUN_EXTRAS)'
	touch $@

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,lint,gpu,tensorrt-lean]'
	touch $@ $(VENV)/.run-installed

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache exporter/*.egg-info
