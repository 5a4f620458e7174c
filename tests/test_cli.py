"""The command line as users run it: real subprocesses, real HTTP, real promtool."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import FAULT_SPEC, cli, cli_env, require, wait_for
from trt_heartbeat import __version__

COMMANDS = ("serve", "probe", "check-config")


def test_version() -> None:
    result = cli("--version")
    assert result.returncode == 0
    assert result.stdout == f"trt-heartbeat-exporter, version {__version__}\n"


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command: str) -> None:
    result = cli(command, "--help")
    assert result.returncode == 0
    assert f"Usage: trt-heartbeat-exporter {command}" in result.stdout
    first = result.stdout.split("\n\n")[1].strip()
    assert len(first) > 20, "a one-line description"


def test_serve_help_lists_flags_with_env_vars() -> None:
    out = cli("serve", "--help").stdout
    for flag in (
        "--config",
        "--backend",
        "--interval",
        "--timeout",
        "--web.listen-address",
        "--web.telemetry-path",
        "--log.level",
        "--log.format",
    ):
        assert flag in out
    assert "TRT_HEARTBEAT_WEB_LISTEN_ADDRESS" in out


def test_probe_passes_with_reference_backend() -> None:
    result = cli("probe", "--backend", "reference", "--count", "5")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["passed"] is True and report["backend"] == "reference"
    (target,) = report["targets"]
    assert target["passed"] == 5 and target["failed"] == 0
    assert all(p["result"] == "success" for p in target["probes"])
    assert target["engine"]["model"].startswith("canonical-mlp-v1@")


@pytest.mark.parametrize(
    ("control", "result_kind"),
    [
        ({"probe": "wrong"}, "mismatch"),
        ({"probe": "raise"}, "error"),
        ({"probe": "hang"}, "timeout"),
        ({"probe": "crash"}, "error"),
    ],
)
def test_probe_exits_1_when_a_probe_fails(
    tmp_path: Path, control: dict[str, str], result_kind: str
) -> None:
    faults = tmp_path / "f.json"
    faults.write_text(json.dumps(control))
    result = cli(
        "probe",
        "--backend",
        FAULT_SPEC,
        "--count",
        "2",
        "--timeout",
        "1s",
        TRT_HEARTBEAT_FAULT_FILE=str(faults),
    )
    assert result.returncode == 1, result.stderr
    report = json.loads(result.stdout)
    assert report["passed"] is False
    assert report["targets"][0]["probes"][0]["result"] == result_kind


def _no_constant(name: str) -> Any:
    raise ValueError(f"not JSON: {name}")


def test_probe_report_is_strict_json_for_a_nan_output(tmp_path: Path) -> None:
    # #25 (15): a NaN output printed "max_abs_error": Infinity, which no JSON parser reads.
    faults = tmp_path / "f.json"
    faults.write_text(json.dumps({"probe": "nan"}))
    result = cli(
        "probe",
        "--backend",
        FAULT_SPEC,
        "--count",
        "2",
        "--timeout",
        "1s",
        TRT_HEARTBEAT_FAULT_FILE=str(faults),
    )
    assert result.returncode == 1, result.stderr
    report = json.loads(result.stdout, parse_constant=_no_constant)
    probes = report["targets"][0]["probes"]
    assert probes and all(p["result"] == "mismatch" for p in probes)
    assert all(p["max_abs_error"] is None and p["message"] for p in probes)


def test_probe_and_probes_endpoint_share_one_record_format() -> None:
    import math

    from trt_heartbeat.exporter.state import ProbeRecord
    from trt_heartbeat.exporter.web.routes import probe_record_json

    record = ProbeRecord(
        1_700_000_000.0,
        "mismatch",
        {"total": 0.001, "compute": math.inf},
        message="output has NaN",
        max_abs_error=math.nan,
    )
    out = probe_record_json(record)
    assert json.loads(json.dumps(out, allow_nan=False)) == {
        "time": "2023-11-14T22:13:20+00:00",
        "result": "mismatch",
        "reason": None,
        "phases_seconds": {"total": 0.001, "compute": None},
        "max_abs_error": None,
        "message": "output has NaN",
    }
    assert "message" not in probe_record_json(record, hide_message=True)


def test_probe_reports_a_load_failure(tmp_path: Path) -> None:
    faults = tmp_path / "f.json"
    faults.write_text(json.dumps({"load": "fail"}))
    result = cli("probe", "--backend", FAULT_SPEC, TRT_HEARTBEAT_FAULT_FILE=str(faults))
    assert result.returncode == 1
    target = json.loads(result.stdout)["targets"][0]
    assert target["error"] == {
        "reason": "engine_load_failed",
        "message": "injected: engine build failed",
    }


class Served:
    def __init__(self, process: subprocess.Popen[str], port: int, log: Path) -> None:
        self.process, self.port, self.log = process, port, log
        self.url = f"http://127.0.0.1:{port}"

    def get(self, path: str) -> bytes:
        with urllib.request.urlopen(self.url + path, timeout=5) as response:
            body: bytes = response.read()
            return body

    def lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log.read_text().splitlines() if line]


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    log = tmp_path / "serve.log"
    with log.open("w") as sink:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "trt_heartbeat",
                "serve",
                "--web.listen-address",
                "127.0.0.1:0",
                "--interval",
                "500ms",
                "--timeout",
                "400ms",
                "--log.format",
                "json",
            ],
            stdout=sink,
            stderr=subprocess.STDOUT,
            text=True,
            env=cli_env(),
        )
    served = None
    try:

        def port() -> int | None:
            for line in log.read_text().splitlines():
                match = re.search(r'"msg": "listening".*"port": (\d+)', line)
                if match:
                    return int(match.group(1))
            assert process.poll() is None, log.read_text()
            return None

        served = Served(process, wait_for(port, what="listening line"), log)
        yield served
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_serve_end_to_end_with_promtool(served: Served) -> None:
    wait_for(lambda: b'trt_heartbeat_up{gpu="cpu",uuid=""} 1.0' in served.get("/metrics"))
    body = served.get("/metrics")
    assert b'trt_heartbeat_build_info{backend="reference"' in body
    check = subprocess.run(
        [require("promtool"), "check", "metrics"], input=body, capture_output=True, timeout=30
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert check.stdout == b"" and check.stderr == b"", "promtool lint findings"
    assert json.loads(served.get("/health"))["status"] == "healthy"


def test_serve_logs_state_changes_only_and_stops_cleanly(served: Served) -> None:
    wait_for(lambda: b'result="success",uuid=""} 6.0' in served.get("/metrics"), timeout=30)
    served.process.send_signal(signal.SIGTERM)
    assert served.process.wait(timeout=15) == 0
    messages = [line["msg"] for line in served.lines()]
    assert messages[0].startswith("no GPU visible: probing the CPU with the reference backend")
    # Health changes are logged as /health sees them: awaiting the first probe, then healthy.
    assert messages[1:] == [
        "listening",
        "probe model loaded",
        "target health changed",
        "first probe passed",
        "target health changed",
        "shutting down",
    ]
    health = [
        line["status"] + "/" + line["reason"]
        for line in served.lines()
        if line["msg"] == "target health changed"
    ]
    assert health == ["degraded/awaiting_first_probe", "healthy/ok"]


def test_serve_refuses_a_busy_port(served: Served) -> None:
    result = cli("serve", "--web.listen-address", f"127.0.0.1:{served.port}")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"Error: cannot listen on 127.0.0.1:{served.port}: Address already in use"
    )
    assert "Traceback" not in result.stderr
