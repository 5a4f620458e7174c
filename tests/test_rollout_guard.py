"""The rollout guard's wiring: the Argo and Flagger templates query the recorded series as
written, their fields are the controllers' documented fields, and the pause webhook pauses."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from conftest import ROOT, free_port, promql_on_scenario, wait_for

ROLLOUTS = ROOT / "rules" / "rollouts"
RULES = ROOT / "rules"
# Fields of the published CRDs these examples use (Argo Rollouts v1.7 AnalysisTemplate, Flagger
# v1beta1 MetricTemplate), as listed in their API references; no package ships the CRD schemas.
ARGO_METRIC_FIELDS = {
    "name",
    "interval",
    "count",
    "failureLimit",
    "inconclusiveLimit",
    "consecutiveErrorLimit",
    "successCondition",
    "failureCondition",
    "initialDelay",
    "provider",
}
ARGO_PROMETHEUS_FIELDS = {"address", "query", "timeout", "headers", "authentication"}
FLAGGER_SPEC_FIELDS = {"provider", "query"}
FLAGGER_PROVIDER_FIELDS = {"type", "address", "secretRef", "insecureSkipVerify"}


def _argo() -> dict[str, Any]:
    return dict(yaml.safe_load((ROLLOUTS / "argo-service-analysistemplate.yaml").read_text()))


def _flagger() -> list[dict[str, Any]]:
    text = (ROLLOUTS / "flagger-service-metrictemplates.yaml").read_text()
    return list(yaml.safe_load_all(text))


def test_templates_use_only_documented_fields() -> None:
    argo = _argo()
    assert (argo["apiVersion"], argo["kind"]) == ("argoproj.io/v1alpha1", "AnalysisTemplate")
    assert set(argo["spec"]) == {"args", "metrics"}
    for metric in argo["spec"]["metrics"]:
        assert set(metric) <= ARGO_METRIC_FIELDS, metric["name"]
        assert set(metric["provider"]) == {"prometheus"}
        assert set(metric["provider"]["prometheus"]) <= ARGO_PROMETHEUS_FIELDS
    for doc in _flagger():
        assert (doc["apiVersion"], doc["kind"]) == ("flagger.app/v1beta1", "MetricTemplate")
        assert set(doc["spec"]) <= FLAGGER_SPEC_FIELDS
        assert set(doc["spec"]["provider"]) <= FLAGGER_PROVIDER_FIELDS


def _argo_query(name: str) -> str:
    metric = next(m for m in _argo()["spec"]["metrics"] if m["name"] == name)
    query: str = metric["provider"]["prometheus"]["query"]
    return query.replace("{{args.service}}", "inference").replace("{{args.namespace}}", "prod")


def _flagger_query(name: str) -> str:
    doc = next(d for d in _flagger() if d["metadata"]["name"] == name)
    query: str = doc["spec"]["query"]
    return query.replace("{{ target }}", "inference").replace("{{ namespace }}", "prod")


def test_queries_read_the_failing_canary(tmp_path: Path) -> None:
    # The 1.5%-errors scenario of rules/tests/service-canary.test.yml, 10 minutes after the step.
    promql_on_scenario(
        tmp_path,
        "service-canary.test.yml",
        0,
        "20m",
        {
            _argo_query("canary-error-ratio"): 0.015,
            _flagger_query("trt-heartbeat-service-error-ratio"): 0.015,
        },
    )


def test_queries_read_the_long_tail(tmp_path: Path) -> None:
    p99 = 4.242424242424246  # the long-tail scenario: p99 of 210 ms against 49.5 ms
    promql_on_scenario(
        tmp_path,
        "service-canary.test.yml",
        2,
        "30m",
        {
            _argo_query("canary-latency-ratio"): p99,
            _flagger_query("trt-heartbeat-service-p99-ratio"): p99,
        },
    )


@pytest.mark.parametrize("ratio", [0.015, 0.5])
def test_argo_conditions_pause_rather_than_abort(ratio: float) -> None:
    metric = next(m for m in _argo()["spec"]["metrics"] if m["name"] == "canary-error-ratio")
    args = {a["name"]: a.get("value") for a in _argo()["spec"]["args"]}

    def holds(condition: str) -> bool:  # Argo's expr language, for this simple shape
        expression = (
            condition.replace("{{args.pause-ratio}}", args["pause-ratio"])
            .replace("{{args.abort-ratio}}", args["abort-ratio"])
            .replace("&&", "and")
            .replace("len(result)", "1")
            .replace("result[0]", repr(ratio))
        )
        return bool(eval(expression))

    # Neither condition met: an inconclusive measurement, and Argo pauses the rollout.
    assert not holds(metric["successCondition"]) and not holds(metric["failureCondition"])
    assert metric["inconclusiveLimit"] == 0


def test_pause_webhook_manifests_validate() -> None:
    for doc in yaml.safe_load_all((ROLLOUTS / "pause-webhook.yaml").read_text()):
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


@pytest.fixture
def gate() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """A stand-in Flagger load tester recording /gate/close calls."""
    calls: list[dict[str, Any]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            calls.append({"path": self.path, **body})
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", calls
    server.shutdown()


def _bridge(*args: str) -> tuple[subprocess.Popen[str], str]:
    port = free_port()
    command = [
        sys.executable,
        str(ROLLOUTS / "pause_webhook.py"),
        "--listen",
        f"127.0.0.1:{port}",
        *args,
    ]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        try:
            with urllib.request.urlopen(url + "/-/healthy", timeout=1) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    wait_for(healthy, timeout=20, what="pause webhook listening")
    return process, url


def _notify(url: str, alerts: list[dict[str, Any]]) -> int:
    request = urllib.request.Request(
        url + "/alerts",
        data=json.dumps({"alerts": alerts}).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as err:
        return int(err.code)


PAUSE = {
    "status": "firing",
    "labels": {
        "alertname": "TrtHeartbeatServiceCanaryErrorRatioHigh",
        "action": "pause-rollout",
        "service": "inference",
        "namespace": "prod",
        "track": "v2",
    },
}


def test_pause_webhook_closes_the_flagger_gate(gate: tuple[str, list[dict[str, Any]]]) -> None:
    url, calls = gate
    process, bridge = _bridge("--mode", "flagger", "--flagger-gate", url)
    try:
        other = {"status": "firing", "labels": {"alertname": "TrtHeartbeatStale"}}
        resolved = {**PAUSE, "status": "resolved"}
        assert _notify(bridge, [PAUSE, PAUSE, other, resolved]) == 200
    finally:
        process.terminate()
        process.wait(timeout=10)
    assert calls == [{"path": "/gate/close", "name": "inference", "namespace": "prod"}]


def test_pause_webhook_answers_500_when_kubectl_fails(tmp_path: Path) -> None:
    kubectl = tmp_path / "kubectl"
    kubectl.write_text(
        "#!/bin/sh\necho 'rollouts.argoproj.io \"inference\" not found' >&2\nexit 1\n"
    )
    kubectl.chmod(0o755)
    process, bridge = _bridge("--mode", "argo", "--kubectl", str(kubectl))
    try:
        assert _notify(bridge, [PAUSE]) == 500  # Alertmanager retries
    finally:
        process.terminate()
        _, stderr = process.communicate(timeout=10)
    assert 'could not pause prod/inference: rollouts.argoproj.io "inference" not found' in stderr
