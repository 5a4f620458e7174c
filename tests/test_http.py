"""The HTTP endpoints on a real server, with real workers, including a frozen one."""

from __future__ import annotations

import gzip
import json
import os
import signal
import socket
import struct
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import Faults, Running, wait_for

Start = Callable[..., Running]
# Generous: a liveness check that nothing blocks, not a speed claim.
CLIENT_TIMEOUT = 2.0


def get(
    url: str, method: str = "GET", headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=CLIENT_TIMEOUT) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def health(r: Running) -> tuple[int, dict[str, Any]]:
    status, _, body = get(r.url + "/health")
    return status, json.loads(body)


def samples(r: Running) -> dict[str, float]:
    _, _, body = get(r.url + "/metrics")
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}"] = s.value
    return out


def test_endpoints_answer_while_the_worker_is_frozen(run_exporter: Start, faults: Faults) -> None:
    r = run_exporter(interval=2, timeout=1.5)
    wait_for(lambda: r.snapshot().probes_total["success"] >= 1)
    pid = r.exporter.scheduler.loops[0].worker_pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    requests, deadline = 0, time.monotonic() + 30
    # Hammer every endpoint through the whole freeze: the next probe goes to the stopped
    # worker, waits out its timeout, and the worker is killed and replaced.
    while r.snapshot().restarts_total["timeout"] == 0:
        assert time.monotonic() < deadline, "the frozen worker was never replaced"
        for path in ("/metrics", "/health", "/ping", "/probes", "/"):
            status, _, _ = get(r.url + path)  # raises if it takes longer than CLIENT_TIMEOUT
            assert status in (200, 503), path
            requests += 1
    assert requests >= 10
    assert r.snapshot().last_failure.reason.value == "timeout"


def test_metrics_and_health_while_probing_hangs(run_exporter: Start, faults: Faults) -> None:
    r = run_exporter(interval=2, timeout=1.5, max_age=2)
    wait_for(lambda: r.snapshot().probes_total["success"] >= 1)
    faults.set(probe="hang")
    # Scrapes keep answering across timeouts, kills and respawns; health turns unhealthy.
    status, report = wait_for(
        lambda: (h := health(r))[1]["reason"] == "timeout" and h, what="timeout reason"
    )
    assert status == 503 and report["status"] == "unhealthy"
    s = samples(r)
    assert s["trt_heartbeat_up{gpu=cpu,uuid=}"] == 0
    assert s["trt_heartbeat_health_status{status=unhealthy}"] == 1
    assert s["trt_heartbeat_last_failure_info{gpu=cpu,reason=timeout,uuid=}"] == 1
    assert get(r.url + "/ping")[0] == 200  # the exporter's own loop is fine


def test_health_document(run_exporter: Start, faults: Faults) -> None:
    r = run_exporter()
    status, report = wait_for(lambda: (h := health(r))[1]["status"] == "healthy" and h)
    assert status == 200
    assert report["reason"] == "ok" and report["backend"] == "fault_backend:FaultBackend"
    (target,) = report["targets"]
    assert target["gpu"] == "cpu" and target["engine_loaded"] is True
    assert target["engine"]["model"].startswith("canonical-mlp-v1@")
    faults.set(probe="raise")
    status, report = wait_for(lambda: (h := health(r))[1]["status"] == "degraded" and h)
    assert status == 200 and report["reason"] == "probe_error"
    assert report["targets"][0]["last_failure"]["message"] == "injected: transient probe error"
    faults.set(probe="wrong")
    status, report = wait_for(lambda: (h := health(r))[1]["status"] == "unhealthy" and h)
    assert status == 503 and report["reason"] == "mismatch"


def test_hide_hardware_details(run_exporter: Start, faults: Faults) -> None:
    r = run_exporter(web={"hide_hardware_details": True})
    wait_for(lambda: r.snapshot().probes_total["success"] >= 1)
    faults.set(probe="raise")
    wait_for(lambda: r.snapshot().probes_total["error"] >= 1)
    _, report = health(r)
    (target,) = report["targets"]
    assert not {"uuid", "engine", "last_failure"} & set(target)
    _, _, body = get(r.url + "/probes")
    text = body.decode()
    assert "injected" not in text and "uuid" not in text


def test_probes_debug_view(run_exporter: Start, faults: Faults) -> None:
    r = run_exporter(history=4)
    wait_for(lambda: r.snapshot().probes_total["success"] >= 1)
    faults.set(probe="wrong")
    wait_for(lambda: r.snapshot().probes_total["mismatch"] >= 5)
    status, headers, body = get(r.url + "/probes")
    assert status == 200 and headers["Content-Type"] == "application/json"
    report = json.loads(body)
    probes = report["targets"][0]["probes"]
    assert len(probes) == 4
    newest = probes[0]
    assert newest["result"] == "mismatch" and newest["reason"] == "mismatch"
    assert newest["max_abs_error"] == pytest.approx(0.5)
    assert "outside tolerance" in newest["message"]
    assert set(newest["phases_seconds"]) == {"total", "compute"}


def test_ping_fails_when_the_probe_loop_is_gone(run_exporter: Start, faults: Faults) -> None:
    r = run_exporter()
    wait_for(lambda: r.snapshot().probes_total["success"] >= 1)
    assert get(r.url + "/ping") == (200, get(r.url + "/ping")[1], b"OK\n")
    r.exporter.stop()
    status, _, body = get(r.url + "/ping")
    assert (status, body) == (503, b"probe loop stalled\n")


def test_content_negotiation_and_compression(run_exporter: Start, faults: Faults) -> None:
    r = run_exporter()
    wait_for(lambda: r.snapshot().probes_total["success"] >= 1)
    status, headers, body = get(r.url + "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert b"# EOF" not in body
    om = "application/openmetrics-text; version=1.0.0; charset=utf-8"
    _, headers, body = get(r.url + "/metrics", headers={"Accept": om})
    assert headers["Content-Type"].startswith("application/openmetrics-text")
    assert body.endswith(b"# EOF\n")
    assert b"trt_heartbeat_probes_total{" in body
    _, headers, zipped = get(r.url + "/metrics", headers={"Accept-Encoding": "gzip"})
    assert headers["Content-Encoding"] == "gzip"
    assert b"trt_heartbeat_up{" in gzip.decompress(zipped)


def test_methods_paths_and_landing_page(run_exporter: Start, faults: Faults) -> None:
    r = run_exporter(web={"telemetry_path": "/custom-metrics"})
    status, headers, body = get(r.url + "/")
    assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
    for link in ("/custom-metrics", "/health", "/ping", "/probes"):
        assert f'href="{link}"'.encode() in body
    assert get(r.url + "/custom-metrics")[0] == 200
    assert get(r.url + "/metrics")[0] == 404
    status, headers, body = get(r.url + "/ping", method="HEAD")
    assert status == 200 and body == b"" and headers["Content-Length"] == "3"
    for method in ("POST", "PUT", "DELETE"):
        status, headers, _ = get(r.url + "/custom-metrics", method=method)
        assert status == 405 and headers["Allow"] == "GET, HEAD"
    status, _, body = get(r.url + "/<script>")
    assert status == 404 and b"<script>" not in body


def test_constant_labels_on_every_series(run_exporter: Start, faults: Faults) -> None:
    r = run_exporter(constant_labels={"track": "canary", "release": "2.13.0"})
    wait_for(lambda: r.snapshot().probes_total["success"] >= 1)
    _, _, body = get(r.url + "/metrics")
    families = [
        f
        for f in text_string_to_metric_families(body.decode())
        if f.name.startswith("trt_heartbeat_")
    ]
    assert families
    for family in families:
        for s in family.samples:
            assert s.labels.get("track") == "canary" and s.labels.get("release") == "2.13.0", s


def test_a_client_hanging_up_mid_response_is_not_an_error(
    run_exporter: Start, capfd: pytest.CaptureFixture[str]
) -> None:
    r = run_exporter(interval=2, timeout=1.5)
    wait_for(lambda: r.snapshot().probes_total["success"] >= 1)
    for _ in range(20):
        with socket.create_connection(("127.0.0.1", r.server.port)) as sock:
            sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            # Linger 0: close() sends RST, so the server's write or next read fails.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    assert get(r.url + "/metrics")[0] == 200
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Exception occurred" not in err
