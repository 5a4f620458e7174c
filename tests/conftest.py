from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fake_nvml import ENV as FAKE_NVML_ENV
from fault_backend import ENV as FAULT_ENV
from trt_heartbeat.domain import Target
from trt_heartbeat.exporter import config
from trt_heartbeat.exporter.app import Exporter
from trt_heartbeat.exporter.nvml_poller import NvmlTelemetry
from trt_heartbeat.exporter.web import config as web_config
from trt_heartbeat.exporter.web.routes import Routes
from trt_heartbeat.exporter.web.server import ExporterHTTPServer

TESTS = Path(__file__).parent
ROOT = TESTS.parent
FAULT_SPEC = "fault_backend:FaultBackend"


class Faults:
    """Writes the fault backend's control file; workers read it on every probe."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def set(self, **control: Any) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(control))
        tmp.replace(self.path)  # atomic: a worker never reads half a file


@pytest.fixture
def fake_nvml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Faults:
    """Control of tests/fake_nvml.py, which stands in for pynvml in the NVML reader process."""
    path = tmp_path / "nvml.json"
    monkeypatch.setenv(FAKE_NVML_ENV, str(path))
    control = Faults(path)
    control.set(mode="ok")
    return control


def fake_telemetry(interval: float = 0.2, timeout: float = 0.15) -> NvmlTelemetry:
    return NvmlTelemetry(interval, timeout, module="fake_nvml")


@pytest.fixture
def faults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Faults:
    path = tmp_path / "faults.json"
    monkeypatch.setenv(FAULT_ENV, str(path))  # inherited by spawned workers
    f = Faults(path)
    f.set()
    return f


def settings(**overrides: Any) -> config.Settings:
    base: dict[str, Any] = {
        "backend": FAULT_SPEC,
        "interval": 0.3,
        "timeout": 0.25,
        "startup_timeout": 20,
        "jitter": 0.0,
        "web": {"listen_address": "127.0.0.1:0"},
    }
    return config.load(None, config._merge(base, overrides))


# Test servers stop within this (serve_forever's default, 0.5 s, would be paid by every test).
POLL_INTERVAL = 0.02


def wait_for(predicate: Callable[[], Any], timeout: float = 20.0, what: str = "") -> Any:
    """Poll until predicate() is truthy; the deadline only bounds a hung test."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what or predicate}")


class Running:
    def __init__(self, exporter: Exporter, server: ExporterHTTPServer) -> None:
        self.exporter = exporter
        self.server = server
        self.url = f"http://127.0.0.1:{server.port}"

    def snapshot(self) -> Any:
        return self.exporter.scheduler.states[0].snapshot()


@pytest.fixture
def run_exporter() -> Iterator[Callable[..., Running]]:
    """Start an in-process exporter with real workers and a real HTTP server on loopback."""
    started: list[Running] = []

    def start(
        targets: list[Target] | None = None,
        telemetry: NvmlTelemetry | None = None,
        **overrides: Any,
    ) -> Running:
        s = settings(**overrides)
        exporter = Exporter(s, s.backend, targets, telemetry=telemetry)
        server = ExporterHTTPServer("127.0.0.1", 0, Routes(exporter))
        server.start_background(POLL_INTERVAL)
        exporter.start()
        running = Running(exporter, server)
        started.append(running)
        return running

    yield start
    for running in started:
        running.server.shutdown()
        running.server.server_close()
        running.exporter.stop()


@pytest.fixture
def serve(faults: Faults) -> Iterator[Callable[..., ExporterHTTPServer]]:
    """Start an exporter on the fault backend behind a real HTTP server on loopback, with the
    given web configuration, request slots, a wrapper around the app, and server limits."""
    servers: list[tuple[ExporterHTTPServer, Exporter]] = []

    def start(
        web: web_config.WebConfig | None = None,
        max_requests: int = 40,
        wrap: Callable[[Exporter], Any] = lambda e: e,
        **limits: Any,
    ) -> ExporterHTTPServer:
        s = settings(backend=FAULT_SPEC)
        exporter = Exporter(s, s.backend)
        server = ExporterHTTPServer(
            "127.0.0.1", 0, Routes(wrap(exporter)), web, max_requests, **limits
        )
        server.start_background(POLL_INTERVAL)
        exporter.start()
        servers.append((server, exporter))
        return server

    yield start
    for server, exporter in servers:
        server.shutdown()
        server.server_close()
        exporter.stop()


@pytest.fixture
def full_disk(tmp_path: Path) -> Iterator[Path]:
    """A directory on a real, tiny filesystem filled to the last byte: writes fail with ENOSPC.

    Needs root to mount a tmpfs (CI runs as root); skipped where mounting is not allowed.
    """
    mount = tmp_path / "full"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        with (mount / "filler").open("wb", buffering=0) as fh, contextlib.suppress(OSError):
            while True:
                fh.write(b"\0" * 1024)
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_ready(url: str) -> bool:
    """Whether a Prometheus or Alertmanager at `url` answers its readiness endpoint."""
    try:
        with urllib.request.urlopen(url + "/-/ready", timeout=1) as response:
            return bool(response.status == 200)
    except OSError:
        return False


@contextlib.contextmanager
def daemon(args: list[str], port: int, log: Path, what: str) -> Iterator[str]:
    """Run a Prometheus or Alertmanager listening on loopback `port`; yields its URL once ready."""
    with log.open("w") as sink:
        process = subprocess.Popen(args, stdout=sink, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: http_ready(url), timeout=60, what=f"{what} ready")
        yield url
    finally:
        process.terminate()
        process.wait(timeout=20)


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRT_HEARTBEAT_")}
    inherited = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(ROOT / "exporter"), *inherited])
    env.update(extra)
    return env


def cli(*args: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trt_heartbeat", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=cli_env(**env),
    )


def require(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.fail(f"{tool} is not installed; `make test` installs it")
    return path


def promql_on_scenario(
    tmp_path: Path, test_file: str, index: int, eval_time: str, expected: dict[str, float]
) -> None:
    """Run PromQL queries (a rollout controller's, say) with promtool on the input series of one
    scenario of rules/tests/`test_file`, expecting one unlabelled value each."""
    import yaml

    rules = ROOT / "rules"
    suite = yaml.safe_load((rules / "tests" / test_file).read_text())
    scenario = suite["tests"][index]
    scenario["alert_rule_test"] = []
    scenario["promql_expr_test"] = [
        {"expr": q, "eval_time": eval_time, "exp_samples": [{"labels": "{}", "value": v}]}
        for q, v in expected.items()
    ]
    suite["tests"] = [scenario]
    suite["rule_files"] = [str(rules / Path(f).name) for f in suite["rule_files"]]
    path = tmp_path / "queries.test.yml"
    path.write_text(yaml.safe_dump(suite))
    result = subprocess.run(
        [require("promtool"), "test", "rules", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# Fixtures that start a Prometheus, Alertmanager or VictoriaMetrics server: a test that uses one
# is in the `prometheus` tier whatever its module, so a new test is tiered by what it starts.
SERVER_FIXTURES = frozenset({"alertmanager", "prometheus", "victoria_metrics", "replayed"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Test tiers (`make test-fast`, `make test-e2e`; `make test` runs all): `e2e` for
    tests/e2e, `prometheus` for those and every test that starts a Prometheus, Alertmanager or
    VictoriaMetrics server. Tests marked `gpu` run where an NVIDIA GPU is visible
    (docs/gpu-validation.md)."""
    from trt_heartbeat.exporter.devices import gpu_visible

    for item in items:
        if "e2e" in item.path.parts:
            item.add_marker(pytest.mark.e2e)
            item.add_marker(pytest.mark.prometheus)
        elif SERVER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.prometheus)
    if gpu_visible():
        return
    skip = pytest.mark.skip(reason="no NVIDIA GPU visible")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
