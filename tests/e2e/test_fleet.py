"""End to end on loopback: a stable/canary fleet of exporters, a real Prometheus with the rule pack
unchanged, a real Alertmanager with the example configuration, and a webhook receiver.

One scenario, in order: a healthy baseline; then one stable exporter's probe worker is frozen
(every probe hangs from then on, and the running worker is SIGSTOPped) and one canary starts
returning wrong outputs, while the other canary is slow throughout. The test checks targets,
recording rules, which alerts fire (and that nothing else does), where notifications arrive,
that inhibitions hold, and prints the time to detect each stage (docs/performance.md).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import ROOT, cli, cli_env, free_port, http_ready, require, wait_for
from trt_heartbeat.documents import parse_duration

INTERVAL, TIMEOUT = 1.0, 0.8  # exporter probe interval and timeout
SCRAPE = EVAL = 1.0  # Prometheus scrape and rule evaluation interval
FLEET = [
    ("stable-1", "stable"),
    ("stable-2", "stable"),
    ("canary-1", "canary"),
    ("canary-2", "canary"),
]
SLOW_DELAY = 0.05  # canary-1 adds this to every probe
FAKE_PYNVML = Path(__file__).parent / "fake_pynvml"
CLUSTER = "e2e"


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.load(response)


@dataclass
class Exporter:
    name: str
    track: str
    process: subprocess.Popen[bytes]
    control: Path
    log: Path
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def instance(self) -> str:
        return f"127.0.0.1:{self.port}"

    def set_fault(self, **control: Any) -> None:
        tmp = self.control.with_suffix(".tmp")
        tmp.write_text(json.dumps(control))
        tmp.replace(self.control)

    def health_status(self) -> int:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=2) as response:
                return int(response.status)
        except urllib.error.HTTPError as err:
            return int(err.code)


@dataclass
class Webhook:
    """Records every notification Alertmanager sends, with its arrival time and route."""

    received: list[tuple[float, str, dict[str, Any]]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def alerts(self, path: str) -> list[tuple[float, str, str]]:
        """(arrival, alertname, pod) of every firing alert that reached `path`."""
        with self.lock:
            return [
                (t, a["labels"]["alertname"], a["labels"].get("pod", ""))
                for t, p, body in self.received
                if p == path
                for a in body["alerts"]
                if a["status"] == "firing"
            ]


def start_webhook(port: int) -> tuple[ThreadingHTTPServer, Webhook]:
    hook = Webhook()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with hook.lock:
                hook.received.append((time.monotonic(), self.path, body))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, hook


@dataclass
class Stack:
    exporters: dict[str, Exporter]
    prometheus: str
    alertmanager: str
    webhook: Webhook

    def query(self, promql: str) -> list[dict[str, Any]]:
        url = self.prometheus + "/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        result: list[dict[str, Any]] = get_json(url)["data"]["result"]
        return result

    def alerts(self, state: str) -> set[tuple[str, str]]:
        rows = self.query(f'ALERTS{{alertstate="{state}"}}')
        return {(r["metric"]["alertname"], r["metric"].get("pod", "")) for r in rows}


def listening_port(log: Path) -> int | None:
    """The port an exporter logged that it listens on, once it has."""
    match = re.search(r'"port": (\d+)', log.read_text())
    return int(match.group(1)) if match else None


def _start(
    args: list[str], log: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    with log.open("w") as sink:
        return subprocess.Popen(args, stdout=sink, stderr=subprocess.STDOUT, env=env)


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def tear_down(
    processes: list[subprocess.Popen[bytes]],
    hook_server: ThreadingHTTPServer | None,
    work: Path,
    name: str,
) -> None:
    """Stop what a stack started, newest first; keep its logs under $OUT/name where set."""
    for process in reversed(processes):
        _stop(process)
    if hook_server is not None:
        hook_server.shutdown()
    if os.environ.get("OUT"):
        shutil.copytree(
            work,
            Path(os.environ["OUT"]) / name,
            dirs_exist_ok=True,
            ignore=shutil.ignore_patterns("*-data"),
        )


PACK_INTERVAL = 15.0  # the evaluation interval the pack's group intervals are set against


def scaled_rule_files(work: Path, interval: float) -> list[Path]:
    """The rule files of the pack, unchanged but for the groups that set their own `interval`:
    scaled with the stack's evaluation interval, as the pack's 2m and 3m groups stand to the
    15 s it is set against (at 15 s, exactly the shipped files)."""
    files = sorted((ROOT / "rules").glob("*.rules.yml"))
    if interval == PACK_INTERVAL:
        return files
    scaled_dir = work / "rules"
    scaled_dir.mkdir(exist_ok=True)
    out = []
    for path in files:
        doc = yaml.safe_load(path.read_text())
        for group in doc["groups"]:
            if "interval" in group:
                seconds = parse_duration(group["interval"]) * interval / PACK_INTERVAL
                group["interval"] = f"{max(seconds, interval):g}s"
        out.append(scaled_dir / path.name)
        out[-1].write_text(yaml.safe_dump(doc, sort_keys=False))
    return out


def start_alerting(
    work: Path,
    processes: list[subprocess.Popen[bytes]],
    receivers: dict[str, str],
    scrape_configs: list[dict[str, Any]],
    interval: float,
    ports: tuple[int, int],
) -> tuple[str, str]:
    """A real Alertmanager with the example configuration (receiver URLs replaced as given) and
    a real Prometheus with the rule pack unchanged, scraping and evaluating every `interval`;
    the URLs of both once they are ready."""
    am_port, prom_port = ports
    am_config = (ROOT / "rules" / "alertmanager" / "alertmanager.yml").read_text()
    for url, local in receivers.items():
        am_config = am_config.replace(url, local)
    (work / "alertmanager.yml").write_text(am_config)
    processes.append(
        _start(
            [
                require("prometheus-alertmanager"),
                f"--config.file={work / 'alertmanager.yml'}",
                f"--storage.path={work / 'am-data'}",
                f"--web.listen-address=127.0.0.1:{am_port}",
                "--cluster.listen-address=",
            ],
            work / "alertmanager.log",
        )
    )
    config = {
        "global": {
            "scrape_interval": f"{interval:g}s",
            "scrape_timeout": f"{min(interval, 10.0):g}s",
            "evaluation_interval": f"{interval:g}s",
        },
        "rule_files": [str(p) for p in scaled_rule_files(work, interval)],
        "alerting": {
            "alertmanagers": [{"static_configs": [{"targets": [f"127.0.0.1:{am_port}"]}]}]
        },
        "scrape_configs": scrape_configs,
    }
    (work / "prometheus.yml").write_text(yaml.safe_dump(config))
    processes.append(
        _start(
            [
                require("prometheus"),
                f"--config.file={work / 'prometheus.yml'}",
                f"--storage.tsdb.path={work / 'prom-data'}",
                f"--web.listen-address=127.0.0.1:{prom_port}",
            ],
            work / "prometheus.log",
        )
    )
    prometheus, alertmanager = f"http://127.0.0.1:{prom_port}", f"http://127.0.0.1:{am_port}"
    wait_for(
        lambda: http_ready(prometheus) and http_ready(alertmanager),
        timeout=60,
        what="prometheus and alertmanager ready",
    )
    return prometheus, alertmanager


def alerting_stack(
    work: Path,
    processes: list[subprocess.Popen[bytes]],
    exporters: dict[str, Exporter],
    scrape_configs: Callable[[list[Exporter]], list[dict[str, Any]]],
    interval: float,
) -> tuple[Stack, ThreadingHTTPServer]:
    """Once every exporter listens: a webhook receiver, and Prometheus and Alertmanager
    (start_alerting) with every receiver of the example configuration sent to it."""
    for e in exporters.values():
        e.port = wait_for(partial(listening_port, e.log), timeout=60, what=f"{e.name} listening")
    hook_port, am_port, prom_port = free_port(), free_port(), free_port()
    hook_server, hook = start_webhook(hook_port)
    try:
        prometheus, alertmanager = start_alerting(
            work,
            processes,
            {"http://alert-router.monitoring.svc:8080": f"http://127.0.0.1:{hook_port}"},
            scrape_configs(list(exporters.values())),
            interval,
            (am_port, prom_port),
        )
    except BaseException:
        hook_server.shutdown()
        raise
    return Stack(exporters, prometheus, alertmanager, hook), hook_server


def fleet_scrape_configs(exporters: list[Exporter]) -> list[dict[str, Any]]:
    return [
        {
            "job_name": "trt-heartbeat-exporter",
            # What Kubernetes service discovery would attach to each pod; relabeled as the
            # manifests do: the pod's track label becomes `track`.
            "static_configs": [
                {
                    "targets": [e.instance],
                    "labels": {
                        "__meta_kubernetes_pod_label_track": e.track,
                        "__meta_kubernetes_pod_name": e.name,
                        "cluster": CLUSTER,
                    },
                }
                for e in exporters
            ],
            "relabel_configs": [
                {
                    "source_labels": ["__meta_kubernetes_pod_label_track"],
                    "target_label": "track",
                },
                {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
            ],
        }
    ]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    work = tmp_path_factory.mktemp("e2e")
    processes: list[subprocess.Popen[bytes]] = []
    hook_server = None
    try:
        exporters = {}
        for name, track in FLEET:
            control = work / f"{name}.faults.json"
            control.write_text(
                json.dumps({"probe": "slow", "delay": SLOW_DELAY} if name == "canary-1" else {})
            )
            log = work / f"{name}.log"
            config = work / f"{name}.yaml"
            config.write_text("nvml: {enabled: true, interval: 1s, timeout: 500ms}\n")
            env = cli_env(TRT_HEARTBEAT_FAULT_FILE=str(control))
            env["PYTHONPATH"] = os.pathsep.join([str(FAKE_PYNVML), env["PYTHONPATH"]])
            process = _start(
                [
                    sys.executable,
                    "-m",
                    "trt_heartbeat",
                    "serve",
                    "--backend",
                    "fault_backend:FaultBackend",
                    "--interval",
                    f"{INTERVAL}s",
                    "--timeout",
                    f"{TIMEOUT}s",
                    "--web.listen-address",
                    "127.0.0.1:0",
                    "--log.format",
                    "json",
                    "--config",
                    str(config),
                ],
                log,
                env,
            )
            processes.append(process)
            exporters[name] = Exporter(name, track, process, control, log)
        stack, hook_server = alerting_stack(
            work, processes, exporters, fleet_scrape_configs, SCRAPE
        )
        yield stack
    finally:
        tear_down(processes, hook_server, work, "e2e")


def test_fleet_end_to_end(stack: Stack) -> None:
    exp = stack.exporters
    # --- baseline: all targets up, every heartbeat passing, the slowed canary visible --------
    wait_for(
        lambda: len(stack.query('up{job="trt-heartbeat-exporter"} == 1')) == 4,
        timeout=60,
        what="4 targets up",
    )
    tracks = {r["metric"]["pod"]: r["metric"]["track"] for r in stack.query("trt_heartbeat_up")}
    assert tracks == {name: track for name, track in FLEET}, "relabeling sets track"
    wait_for(lambda: len(stack.query("trt_heartbeat_up == 1")) == 4, timeout=60)
    ratio = wait_for(
        lambda: stack.query(
            "pool:trt_heartbeat_probe_duration_seconds:p99_canary_over_stable"
            " and on (namespace, service, backend, gpu_model)"
            " pool:trt_heartbeat_canary_comparison:sufficient"
        ),
        timeout=90,
        what="canary comparison",
    )
    assert ratio[0]["metric"]["gpu_model"] == "unknown"  # reference backend: no NVML model
    assert float(ratio[0]["value"][1]) > 1, "the slowed canary is slower than stable"
    failure = stack.query("track:trt_heartbeat_probe_failure:ratio_rate5m")
    assert {r["metric"]["track"]: float(r["value"][1]) for r in failure} == {
        "stable": 0.0,
        "canary": 0.0,
    }
    assert stack.alerts("firing") == set(), "a healthy fleet fires nothing"

    # --- canary-judge on the series just scraped: half the canary track is 50 ms slower ------
    def judged() -> dict[str, Any] | None:
        result = cli(
            "canary-judge",
            "--prometheus",
            stack.prometheus,
            "--window",
            "1m",
            "--min-samples",
            "30",
            "--output",
            "json",
        )
        report = json.loads(result.stdout)
        assert result.returncode == report["exit_code"], result.stderr
        return None if report["verdict"] == "inconclusive" else report

    report = wait_for(judged, timeout=90, what="enough probes in the window to judge")
    assert report["verdict"] == "fail"
    checks = {c["name"]: c for c in report["strata"][0]["checks"]}
    assert checks["latency"]["verdict"] == "fail"
    assert checks["failures"]["verdict"] == "pass"
    assert report["strata"][0]["gpu_model"] == "unknown"

    # --- faults -------------------------------------------------------------------------------
    frozen, wrong = exp["stable-2"], exp["canary-2"]
    worker = get_json(frozen.url + "/probes")["targets"][0]["worker_pid"]
    frozen.set_fault(probe="hang")  # every later worker hangs too: the heartbeat stays stale
    wrong.set_fault(probe="wrong")
    t0 = time.monotonic()
    os.kill(worker, signal.SIGSTOP)

    times: dict[str, float] = {}

    def stage(name: str, reached: bool) -> bool:
        if reached and name not in times:
            times[name] = time.monotonic() - t0
        return name in times

    def progress() -> bool:
        stage("a_health_503", frozen.health_status() == 503)
        stage(
            "b_up_0_in_prometheus",
            bool(stack.query(f'trt_heartbeat_up{{pod="{frozen.name}"}} == 0')),
        )
        stage("c_alert_firing", ("TrtHeartbeatStale", frozen.name) in stack.alerts("firing"))
        stage(
            "d_notification",
            any(
                a == "TrtHeartbeatStale" and p == frozen.name
                for _, a, p in stack.webhook.alerts("/pager")
            ),
        )
        return len(times) == 4

    wait_for(progress, timeout=180, what="stale heartbeat detected, alerted and notified")
    # Wrong answers never pass, so the mismatching canary's heartbeat goes stale too.
    expected = {
        ("TrtHeartbeatStale", "stable-2"),
        ("TrtHeartbeatStale", "canary-2"),
        ("TrtHeartbeatOutputMismatch", "canary-2"),
        ("TrtHeartbeatWorkerRestarting", "stable-2"),
    }
    firing = wait_for(lambda: (f := stack.alerts("firing")) >= expected and f, timeout=120)
    assert firing == expected, "nothing else fires"
    pending = {a for a, _ in stack.alerts("pending")}
    # The canary verdict is reached; its `for: 15m` is not waited out here.
    assert "TrtHeartbeatCanaryLatencyRegression" in pending

    # --- notifications: each on its route, inhibited ones nowhere ---------------------------
    def notified(path: str) -> set[tuple[str, str]]:
        return {(a, p) for _, a, p in stack.webhook.alerts(path)}

    critical = {
        ("TrtHeartbeatStale", "stable-2"),
        ("TrtHeartbeatStale", "canary-2"),
        ("TrtHeartbeatOutputMismatch", "canary-2"),
    }
    canary = {("TrtHeartbeatStale", "canary-2"), ("TrtHeartbeatOutputMismatch", "canary-2")}
    wait_for(
        lambda: notified("/pager") >= critical and notified("/release") >= canary,
        timeout=120,
        what="notifications",
    )
    assert notified("/pager") == critical, "critical alerts page"
    assert notified("/release") == canary, "alerts of canary pods reach the release receiver"
    am_alerts = get_json(stack.alertmanager + "/api/v2/alerts")
    restarting = [
        a for a in am_alerts if a["labels"]["alertname"] == "TrtHeartbeatWorkerRestarting"
    ]
    assert restarting and all(a["status"]["state"] == "suppressed" for a in restarting), (
        "the critical stale alert of that GPU inhibits the warning"
    )
    assert stack.webhook.alerts("/tickets") == [], "no ticket for an inhibited warning"

    # --- time to detect -------------------------------------------------------------------------
    for name, seconds in sorted(times.items()):
        print(f"time to detect {name}: {seconds:.1f} s")
    targets = {
        "a_health_503": INTERVAL + TIMEOUT + 1,
        "d_notification": 3 * INTERVAL + 60 + 2 * EVAL + 10,
    }  # max_age + for + 2 evals + group_wait
    for name, target in targets.items():
        print(f"target for {name}: {target:.1f} s ({'met' if times[name] <= target else 'MISSED'})")
    out = os.environ.get("OUT")
    if out:
        Path(out, "e2e-time-to-detect.json").write_text(json.dumps(times, indent=2))


def _substitute(expr: str) -> str:
    """A dashboard query as Grafana sends it with every variable at "All"."""
    for name in ("cluster", "job", "instance", "gpu", "track"):
        expr = expr.replace(f"${name}", ".*")
    return expr.replace("$__rate_interval", "1m")


@pytest.mark.parametrize("dashboard", ["fleet.json", "canary.json"])
def test_every_dashboard_query_returns_data(stack: Stack, dashboard: str) -> None:
    # Runs after the scenario above, on the same stack: faults are in place, so the panels meant
    # for them (firing alerts, restarts, stale GPUs) have something to show.
    document = json.loads((ROOT / "grafana" / dashboard).read_text())
    empty = []
    for variable in document["templating"]["list"]:
        if variable["type"] != "query" or variable["name"] in SERVICE_VARIABLES:
            continue
        match = re.fullmatch(r"label_values\((.*), (\w+)\)", variable["query"]["query"])
        assert match, variable["query"]["query"]
        selector, label = match.groups()
        if not stack.query(f"count by ({label}) ({_substitute(selector)})"):
            empty.append(f"variable {variable['name']}")
    # The service-traffic rows need an inference service: tests/e2e/test_service_canary.py.
    skipped = {id(p) for p in service_panels(document)}
    for panel in document["panels"]:
        if id(panel) in skipped:
            continue
        for target in panel.get("targets", []):
            if not stack.query(_substitute(target["expr"])):
                empty.append(f"{panel['title']} / {target['refId']}: {target['expr']}")
    assert empty == [], "queries that return no data:\n" + "\n".join(empty)


SERVICE_VARIABLES = ("source", "service")


def service_panels(document: dict[str, Any]) -> list[dict[str, Any]]:
    """The panels of the dashboard's service-traffic rows (their titles start 'Service')."""
    out, inside = [], False
    for panel in document["panels"]:
        if panel["type"] == "row":
            inside = panel["title"].startswith("Service")
        elif inside:
            out.append(panel)
    return out
