"""Time to page at production settings: probe interval 10s (timeout 5s, max age 30s), scrape and
rule evaluation every 15s, the example Alertmanager configuration (critical route group_wait 10s).

Three kinds of fault, each injected three times at staggered moments (5s apart, so the runs see
different scrape and evaluation phases), each on its own exporter: a wedged GPU (every probe hangs
and the running worker is SIGSTOPped), a wrong answer (every output off golden), and the exporter
going down (SIGKILL). The test checks that each fault pages the on-call route with the alert it
should, and prints the time from the fault to the notification with its stages; it asserts no
wall-clock time (docs/performance.md records the figures and the worst-case formulas; promtool
proves the rules' timing in rules/tests/time-to-page.test.yml).
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
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

INTERVAL, TIMEOUT = 10.0, 5.0  # the exporter's defaults
SCRAPE = EVAL = 15.0
RUNS = 3
STAGGER = 5.0  # seconds between the runs of one kind
KINDS = {
    "wedge": "TrtHeartbeatStale",
    "mismatch": "TrtHeartbeatOutputMismatch",
    "down": "TrtHeartbeatExporterDown",
}


@dataclass
class Node(Exporter):
    """An exporter of the fleet, the fault it will get, and when it got it."""

    kind: str = ""
    injected: float = 0.0
    stages: dict[str, float] = field(default_factory=dict)


def scrape_configs(nodes: list[Exporter]) -> list[dict[str, Any]]:
    return [
        {
            "job_name": "trt-heartbeat-exporter",
            "static_configs": [
                {"targets": [n.instance], "labels": {"pod": n.name, "track": n.track}}
                for n in nodes
            ],
        }
    ]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    work = tmp_path_factory.mktemp("time-to-page")
    processes: list[subprocess.Popen[bytes]] = []
    hook_server = None
    try:
        nodes = []
        for kind in KINDS:
            for run in range(RUNS):
                name = f"{kind}-{run}"
                control, log = work / f"{name}.faults.json", work / f"{name}.log"
                control.write_text("{}")
                process = _start(
                    [
                        sys.executable,
                        "-m",
                        "trt_heartbeat",
                        "serve",
                        "--backend",
                        "fault_backend:FaultBackend",
                        "--interval",
                        f"{INTERVAL:g}s",
                        "--timeout",
                        f"{TIMEOUT:g}s",
                        "--web.listen-address",
                        "127.0.0.1:0",
                        "--log.format",
                        "json",
                    ],
                    log,
                    cli_env(TRT_HEARTBEAT_FAULT_FILE=str(control)),
                )
                processes.append(process)
                nodes.append(Node(name, "stable", process, control, log, kind=kind))
        stack, hook_server = alerting_stack(
            work, processes, {n.name: n for n in nodes}, scrape_configs, SCRAPE
        )
        yield stack
    finally:
        tear_down(processes, hook_server, work, "time-to-page")


STALE_FIRING = 'ALERTS{alertname="TrtHeartbeatStale",alertstate="firing"}'


def _inject(node: Node) -> None:
    node.injected = time.monotonic()
    if node.kind == "wedge":
        node.set_fault(probe="hang")
        with urllib.request.urlopen(node.url + "/probes", timeout=5) as response:
            worker = json.load(response)["targets"][0]["worker_pid"]
        os.kill(int(worker), signal.SIGSTOP)
    elif node.kind == "mismatch":
        node.set_fault(probe="wrong")
    else:
        node.process.send_signal(signal.SIGKILL)


def _nodes(stack: Stack) -> list[Node]:
    return [n for n in stack.exporters.values() if isinstance(n, Node)]


def test_every_fault_pages_on_call(stack: Stack) -> None:
    nodes = _nodes(stack)
    count = len(nodes)
    # Two scrapes of every healthy target first: the mismatch counter at 0, ages fresh.
    wait_for(
        lambda: (
            len(stack.query("count_over_time(trt_heartbeat_up[1m]) >= 2")) == count
            and len(stack.query("trt_heartbeat_up == 1")) == count
        ),
        timeout=120,
        what="every target scraped twice, passing",
    )
    assert stack.query('ALERTS{severity="critical"}') == [], "a healthy fleet pages nobody"

    start = time.monotonic()
    schedule = sorted(
        ((run * STAGGER, n) for n in nodes for run in [int(n.name.rsplit("-", 1)[1])]),
        key=lambda x: x[0],
    )
    pending = list(schedule)
    wedged = [n for n in nodes if n.kind == "wedge"]

    def paged(node: Node) -> float | None:
        return next(
            (
                t
                for t, alert, pod in stack.webhook.alerts("/pager")
                if alert == KINDS[node.kind] and pod == node.name
            ),
            None,
        )

    deadline = start + 240
    while time.monotonic() < deadline:
        now = time.monotonic()
        while pending and now - start >= pending[0][0]:
            _inject(pending.pop(0)[1])
        for n in wedged:  # the stages of a wedge, at one-second resolution
            if n.injected and "health_503" not in n.stages and n.health_status() == 503:
                n.stages["health_503"] = time.monotonic() - n.injected
        if any(n.injected and "firing" not in n.stages for n in wedged):
            down = {r["metric"]["pod"] for r in stack.query("trt_heartbeat_up == 0")}
            firing = {r["metric"]["pod"] for r in stack.query(STALE_FIRING)}
            for n in wedged:
                if n.injected:
                    if n.name in down:
                        n.stages.setdefault("up_0", time.monotonic() - n.injected)
                    if n.name in firing:
                        n.stages.setdefault("firing", time.monotonic() - n.injected)
        if not pending and all(paged(n) is not None for n in nodes):
            break
        time.sleep(0.5)

    missing = [n.name for n in nodes if paged(n) is None]
    assert not missing, f"no page for {missing}: {stack.webhook.received}"
    # Each page went to on-call and named the fault; a wrong answer also turns the heartbeat
    # stale (no passing probe), a killed exporter inhibits its own stale alert.
    pages = {(alert, pod) for _, alert, pod in stack.webhook.alerts("/pager")}
    expected = {(KINDS[n.kind], n.name) for n in nodes}
    extra = (
        pages - expected - {("TrtHeartbeatStale", n.name) for n in nodes if n.kind == "mismatch"}
    )
    assert extra == set(), extra

    lines = [
        "",
        f"time to page (probe {INTERVAL:g}s/{TIMEOUT:g}s, scrape and evaluation "
        f"{SCRAPE:g}s, group_wait 10s), seconds from the fault:",
    ]
    for kind, alert in KINDS.items():
        runs = [n for n in nodes if n.kind == kind]
        times = [paged(n) - n.injected for n in runs]  # type: ignore[operator]
        lines.append(
            f"  {kind:9s} {alert:28s} "
            + "  ".join(f"{t:5.1f}" for t in times)
            + f"   median {statistics.median(times):5.1f}"
        )
        for n in runs:
            if n.stages:
                lines.append(
                    "            "
                    + n.name
                    + ": "
                    + ", ".join(f"{k} {v:.1f}" for k, v in n.stages.items())
                )
    print("\n".join(lines))
    out = os.environ.get("OUT")
    if out:
        Path(out, "time-to-page.txt").write_text("\n".join(lines) + "\n")
