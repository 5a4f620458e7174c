"""Operations that must not page, end to end: real exporters, a real Prometheus with the rule pack
unchanged, a real Alertmanager with the example configuration, a webhook receiver.

Four exporters start together, each probing "GPU 0" through a backend of its own (named in
`gpus`, so a custom backend probes it as a GPU), at the exporter's default probe settings
(interval 10s, max age 30s) with a startup timeout of 100s:

  slow-load    a custom backend (`--backend fault_backend:FaultBackend`) whose model takes 90s to
               load, as an engine build or a TensorRT upgrade does: it must not page;
  never-loads  the same backend whose load never finishes: one page, TrtHeartbeatModelNotLoaded,
               once the startup timeout has passed;
  edge         an edge node, `nvml.enabled: false`: NVML is down by contract, so
               TrtHeartbeatNvmlDown must never even be pending;
  nvml-broken  `nvml.enabled: true` on a host where NVML cannot load: TrtHeartbeatNvmlDown
               pending, proving the rule is live in this Prometheus.

NvmlDown's `for` is 10 minutes: an alert that is never pending while its input is steady never
fires, so watching the pending state for the run stands for watching 15 minutes of firing.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
from test_fleet import (
    Exporter,
    Stack,
    _start,
    alerting_stack,
    tear_down,
)

from conftest import cli_env, wait_for

INTERVAL = "10s"  # the exporter's default, so max age is its default 30s
STARTUP_TIMEOUT, LOAD_SECONDS = 100.0, 90.0
SCRAPE = EVAL = 5.0
EXPORTERS = {  # name: (fault control, config file)
    "slow-load": ({"load": "slow", "load_delay": LOAD_SECONDS}, ""),
    "never-loads": ({"load": "hang"}, ""),
    "edge": ({}, "nvml: {enabled: false}\n"),
    "nvml-broken": ({}, "nvml: {enabled: true, interval: 1s, timeout: 500ms}\n"),
}


def scrape_configs(exporters: list[Exporter]) -> list[dict[str, Any]]:
    return [
        {
            "job_name": "trt-heartbeat-exporter",
            "static_configs": [
                {"targets": [e.instance], "labels": {"pod": e.name}} for e in exporters
            ],
        }
    ]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    work = tmp_path_factory.mktemp("operations")
    processes: list[subprocess.Popen[bytes]] = []
    hook_server = None
    try:
        exporters = {}
        for name, (faults, config) in EXPORTERS.items():
            control, log = work / f"{name}.faults.json", work / f"{name}.log"
            control.write_text(json.dumps(faults))
            (work / f"{name}.yaml").write_text(f"startup_timeout: {STARTUP_TIMEOUT:g}s\n{config}")
            process = _start(
                [
                    sys.executable,
                    "-m",
                    "trt_heartbeat",
                    "serve",
                    "--backend",
                    "fault_backend:FaultBackend",
                    "--gpus",
                    "0",
                    "--interval",
                    INTERVAL,
                    "--web.listen-address",
                    "127.0.0.1:0",
                    "--log.format",
                    "json",
                    "--config",
                    str(work / f"{name}.yaml"),
                ],
                log,
                cli_env(TRT_HEARTBEAT_FAULT_FILE=str(control)),
            )
            processes.append(process)
            exporters[name] = Exporter(name, "stable", process, control, log)
        stack, hook_server = alerting_stack(work, processes, exporters, scrape_configs, SCRAPE)
        yield stack
    finally:
        tear_down(processes, hook_server, work, "operations")


def test_cold_starts_and_edge_nodes_do_not_page(stack: Stack) -> None:
    started = time.monotonic()
    seen: set[tuple[str, str, str]] = set()  # (alertname, pod, state) ever seen in ALERTS

    def watch() -> bool:
        for r in stack.query('ALERTS{alertname=~"TrtHeartbeat.*"}'):
            m = r["metric"]
            seen.add((m["alertname"], m.get("pod", ""), m["alertstate"]))
        return False

    def done() -> bool:
        watch()
        paged = {(a, pod) for _, a, pod in stack.webhook.alerts("/pager")}
        loaded = stack.query('trt_heartbeat_up{pod="slow-load"} == 1')
        return ("TrtHeartbeatModelNotLoaded", "never-loads") in paged and bool(loaded)

    wait_for(done, timeout=STARTUP_TIMEOUT + 120, what="never-loads paged, slow-load passing")
    # A minute more with slow-load passing: a page for it would have come by now.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        watch()
        time.sleep(1)

    pages = stack.webhook.alerts("/pager")
    assert {(a, pod) for _, a, pod in pages} == {("TrtHeartbeatModelNotLoaded", "never-loads")}
    assert sum(1 for _, a, _ in pages if a == "TrtHeartbeatModelNotLoaded") == 1, pages
    paged_at = next(t for t, a, _ in pages if a == "TrtHeartbeatModelNotLoaded") - started
    # The cold start: nothing about slow-load was ever pending, let alone stale.
    assert {(a, state) for a, pod, state in seen if pod == "slow-load"} == set(), seen
    # The edge node's NVML is down by contract; the broken one is a fault.
    nvml = {pod for a, pod, _ in seen if a == "TrtHeartbeatNvmlDown"}
    assert nvml == {"nvml-broken"}, seen
    ages = {
        r["metric"]["pod"]: float(r["value"][1]) for r in stack.query("trt_heartbeat_age_seconds")
    }
    assert ages["slow-load"] < 30, ages  # counted from the load, not from the exporter's start
    print(
        f"\nModelNotLoaded paged {paged_at:.0f}s after the exporters started "
        f"(startup timeout {STARTUP_TIMEOUT:g}s, scrape and evaluation {SCRAPE:g}s)"
    )
