"""NVML telemetry through a real reader process, with tests/fake_nvml.py standing in for pynvml."""

from __future__ import annotations

import json
import logging
import os
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

import fake_nvml
from conftest import Faults, Running, fake_telemetry, wait_for
from trt_heartbeat.domain import MigInstance, Target
from trt_heartbeat.exporter.nvml import NvmlView
from trt_heartbeat.exporter.nvml_poller import NvmlTelemetry
from trt_heartbeat.exporter.web.routes import health_report

Start = Callable[..., Running]
GPU0 = Target("0", "GPU-fake-0")


@pytest.fixture
def telemetry(fake_nvml: Faults) -> Iterator[NvmlTelemetry]:
    t = fake_telemetry()
    t.start()
    yield t
    t.stop()


def scrape(r: Running) -> dict[str, float]:
    with urllib.request.urlopen(r.url + "/metrics", timeout=2) as response:
        text = response.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}"] = s.value
    return out


def test_readings(telemetry: NvmlTelemetry) -> None:
    state = wait_for(lambda: (s := telemetry.state()).up and s)
    assert state.snapshot.driver_version == "580.159.04"
    assert state.snapshot.cuda_driver_version == "13.0"
    gpu = state.gpu("GPU-fake-0")
    assert (gpu.index, gpu.name, gpu.pci_bus_id, gpu.compute_capability) == (
        0,
        "NVIDIA Fake H200",
        "0000:3B:00.0",
        "9.0",
    )
    assert gpu.memory_total == 80 << 30 and gpu.memory_free == 60 << 30
    assert gpu.memory_used == (20 << 30) - (350 << 20), "v2 query: reserved memory not used"
    assert (gpu.utilization, gpu.temperature, gpu.power) == (0.37, 41.0, 123.456)
    assert (gpu.ecc_corrected, gpu.ecc_uncorrected) == (2, 0)
    assert state.gpu("GPU-fake-1").power is None  # NotSupported on that board: absent, not 0


def test_error_marks_down_and_drops_values(
    telemetry: NvmlTelemetry, fake_nvml: Faults, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="trt_heartbeat")
    first = wait_for(lambda: (s := telemetry.state()).up and s)
    fake_nvml.set(mode="error")
    state = wait_for(lambda: (s := telemetry.state()) and not s.up and s)
    assert state.snapshot is None, "stale values must not be served as fresh"
    assert state.last_success is not None and state.last_success >= first.last_success
    wait_for(lambda: caplog.text.count("NVML read failed") >= 1)
    fake_nvml.set(mode="ok")
    wait_for(lambda: telemetry.state().up, what="recovery")
    assert caplog.text.count("NVML read failed") == 1, "one line per state change"
    assert "NVML readings resumed" in caplog.text


def test_hang_is_cut_off_and_the_reader_replaced(
    telemetry: NvmlTelemetry, fake_nvml: Faults
) -> None:
    wait_for(lambda: telemetry.state().up)
    reader = telemetry._process
    assert reader is not None
    pid = reader.pid
    assert pid is not None
    fake_nvml.set(mode="hang")
    wait_for(lambda: not telemetry.state().up, what="down after the timeout")
    wait_for(lambda: telemetry._process is not reader, what="hung reader replaced")
    wait_for(lambda: not Path(f"/proc/{pid}").exists() or _zombie(pid), what="hung reader gone")
    fake_nvml.set(mode="ok")
    wait_for(lambda: telemetry.state().up, what="recovery")


def test_missing_nvml_is_quiet(fake_nvml: Faults, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="trt_heartbeat")
    fake_nvml.set(mode="missing")
    t = fake_telemetry(interval=0.05, timeout=0.04)
    t.start()
    try:
        wait_for(lambda: caplog.text.count("NVML not available") == 1)
        reads = 0
        # Several more failed reads: still the one line.
        while reads < 5:
            wait_for(lambda: not t.state().up)
            reads += 1
    finally:
        t.stop()
    assert caplog.text.count("NVML not available") == 1
    assert "NVML read failed" not in caplog.text
    assert t.state().last_success is None


def test_nvml_module_not_installed(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="trt_heartbeat")
    t = NvmlTelemetry(0.2, 0.15, module="no_such_nvml_module")
    t.start()
    try:
        wait_for(lambda: "NVML not available" in caplog.text)
    finally:
        t.stop()
    assert not t.state().up


def test_metrics_and_health(run_exporter: Start, fake_nvml: Faults, faults: Faults) -> None:
    r = run_exporter(targets=[GPU0], telemetry=fake_telemetry(), gpu_memory_low_threshold="512MiB")
    wait_for(lambda: r.exporter.telemetry_state().up and r.snapshot().probes_total["success"])
    s = scrape(r)
    assert s["trt_heartbeat_nvml_up{}"] == 1
    assert s["trt_heartbeat_gpu_memory_free_bytes{gpu=0,source=nvml,uuid=GPU-fake-0}"] == 60 << 30
    assert s["trt_heartbeat_gpu_memory_total_bytes{gpu=0,source=nvml,uuid=GPU-fake-0}"] == 80 << 30
    assert (
        s[
            "trt_heartbeat_gpu_info{compute_capability=9.0,gpu=0,name=NVIDIA Fake H200,"
            "pci_bus_id=0000:3B:00.0,uuid=GPU-fake-0}"
        ]
        == 1
    )
    assert s["trt_heartbeat_gpu_ecc_errors_total{gpu=0,type=corrected,uuid=GPU-fake-0}"] == 2
    assert s["trt_heartbeat_gpu_memory_low_threshold_bytes{}"] == 512 << 20
    build = next(k for k in s if k.startswith("trt_heartbeat_build_info"))
    assert "driver_version=580.159.04" in build and "cuda_driver_version=13.0" in build
    assert "trt_heartbeat_gpu_power_watts{gpu=1,uuid=GPU-fake-1}" not in s

    fake_nvml.set(mode="ok", free=100 << 20)
    report = wait_for(
        lambda: (h := health_report(r.exporter)[0])["reason"] == "gpu_memory_low" and h
    )
    assert report["status"] == "degraded" and health_report(r.exporter)[1]
    assert report["targets"][0]["gpu_memory"] == {
        "free_mib": 100,
        "total_mib": 81920,
        "source": "nvml",
    }

    fake_nvml.set(mode="error")
    wait_for(lambda: not r.exporter.telemetry_state().up)
    s = scrape(r)
    assert s["trt_heartbeat_nvml_up{}"] == 0
    assert not any(k.startswith("trt_heartbeat_gpu_memory_free_bytes") for k in s)
    assert s["trt_heartbeat_nvml_last_success_timestamp_seconds{}"] > 0
    # No reading, no low-memory verdict: health goes by the probes alone.
    assert health_report(r.exporter)[0]["reason"] == "ok"


def test_low_memory_is_hidden_with_hardware_details(
    run_exporter: Start, fake_nvml: Faults, faults: Faults
) -> None:
    fake_nvml.set(mode="ok", free=100 << 20)
    r = run_exporter(
        targets=[GPU0], telemetry=fake_telemetry(), web={"hide_hardware_details": True}
    )
    report = wait_for(
        lambda: (h := health_report(r.exporter)[0])["reason"] == "gpu_memory_low" and h
    )
    assert "gpu_memory" not in report["targets"][0]
    assert json.dumps(report).count("MiB") == 0


def test_worker_memory_source_in_a_foreign_pid_namespace(fake_nvml: Faults) -> None:
    # Inside a container NVML lists host PIDs: ours is not there, so the set-up delta is used.
    fake_nvml.set(mode="ok", free=60 << 30, pids=[4242])
    now = [0.0]
    view = NvmlView("GPU-fake-0", nvml=fake_nvml_module(), clock=lambda: now[0])
    fake_nvml.set(mode="ok", free=(60 << 30) - (263 << 20), pids=[4242])
    view.setup_done()
    assert view.current() == 263 << 20 and view.source == "setup_delta"
    fake_nvml.set(mode="ok", free=60 << 30, pids=[4242, os.getpid()])
    # The footprint only changes with set-up: NVML's process list is asked again after REFRESH.
    now[0] += NvmlView.REFRESH - 0.1
    assert view.current() == 263 << 20 and view.source == "setup_delta"
    now[0] += 0.1
    assert view.current() == 270532608 and view.source == "nvml_process"
    assert view.driver_version == "580.159.04"


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] == "Z"
    except (OSError, IndexError):
        return True


def fake_nvml_module() -> Any:
    return fake_nvml


def test_worker_memory_without_nvml() -> None:
    view = NvmlView("GPU-x", nvml=object())  # not NVML at all
    view.setup_done()
    assert view.current() is None and view.source == "unavailable"


def test_memory_from_the_probe_where_nvml_is_absent(run_exporter: Start, faults: Faults) -> None:
    # Jetson, or a container with a broken driver mount: no NVML, but the probe's own context
    # can say how much of the device is free (cuMemGetInfo; the fault backend stands in).
    faults.set(device_memory=[60 << 30, 80 << 30])
    r = run_exporter(targets=[GPU0], gpu_memory_low_threshold="512MiB")
    cuda = "gpu=0,source=cuda,uuid=GPU-fake-0"
    wait_for(lambda: f"trt_heartbeat_gpu_memory_free_bytes{{{cuda}}}" in scrape(r))
    s = scrape(r)
    assert s[f"trt_heartbeat_gpu_memory_free_bytes{{{cuda}}}"] == 60 << 30
    assert s[f"trt_heartbeat_gpu_memory_total_bytes{{{cuda}}}"] == 80 << 30
    assert s[f"trt_heartbeat_gpu_memory_used_bytes{{{cuda}}}"] == 20 << 30
    assert s["trt_heartbeat_nvml_up{}"] == 0
    assert health_report(r.exporter)[0]["reason"] == "ok"

    # An external process leaves 400 MiB: the next probe says so, and health follows.
    faults.set(device_memory=[400 << 20, 80 << 30])
    report = wait_for(
        lambda: (h := health_report(r.exporter)[0])["reason"] == "gpu_memory_low" and h
    )
    assert report["status"] == "degraded"
    assert report["targets"][0]["gpu_memory"] == {
        "free_mib": 400,
        "total_mib": 81920,
        "source": "cuda",
    }

    # A lost worker's reading is not current: the series goes with it, not stale numbers.
    faults.set(probe="cuda", device_memory=[400 << 20, 80 << 30])
    wait_for(
        lambda: not any(k.startswith("trt_heartbeat_gpu_memory_free_bytes") for k in scrape(r))
    )


def test_nvml_wins_over_the_probe_reading(
    run_exporter: Start, fake_nvml: Faults, faults: Faults
) -> None:
    faults.set(device_memory=[1 << 30, 80 << 30])
    r = run_exporter(targets=[GPU0], telemetry=fake_telemetry())
    wait_for(lambda: r.exporter.telemetry_state().up and r.snapshot().device_memory is not None)
    s = scrape(r)
    memory = {k: v for k, v in s.items() if k.startswith("trt_heartbeat_gpu_memory_free_bytes")}
    assert memory == {
        "trt_heartbeat_gpu_memory_free_bytes{gpu=0,source=nvml,uuid=GPU-fake-0}": 60 << 30,
        "trt_heartbeat_gpu_memory_free_bytes{gpu=1,source=nvml,uuid=GPU-fake-1}": 60 << 30,
    }
    # NVML down: the probe's reading takes over for the probed GPU.
    fake_nvml.set(mode="error")
    wait_for(
        lambda: (
            "trt_heartbeat_gpu_memory_free_bytes{gpu=0,source=cuda,uuid=GPU-fake-0}" in scrape(r)
        )
    )
    assert health_report(r.exporter)[0]["targets"][0]["gpu_memory"]["source"] == "cuda"


def test_mig_instances_are_read_one_by_one(
    run_exporter: Start, fake_nvml: Faults, faults: Faults
) -> None:
    fake_nvml.set(mode="ok", mig={"0": ["1g.10gb", "3g.40gb"]})
    placement = MigInstance("0", "GPU-fake-0", "1g.10gb", 1, 0)
    small = Target("0/1/0", fake_nvml_module().mig_uuid(0, 0), placement)
    r = run_exporter(targets=[small], telemetry=fake_telemetry())
    wait_for(lambda: r.exporter.telemetry_state().up and r.snapshot().probes_total["success"])
    s = scrape(r)
    mig = f"gpu=0/1/0,source=nvml,uuid={small.uuid}"
    assert s[f"trt_heartbeat_gpu_memory_total_bytes{{{mig}}}"] == 10 << 30
    assert s[f"trt_heartbeat_gpu_memory_free_bytes{{{mig}}}"] == 5 << 30
    info = (
        f"compute_capability=9.0,gpu=0/1/0,name=NVIDIA Fake H200 MIG 1g.10gb,"
        f"pci_bus_id=0000:3B:00.0,uuid={small.uuid}"
    )
    assert s[f"trt_heartbeat_gpu_info{{{info}}}"] == 1
    where = (
        f"compute_instance_id=0,gpu=0/1/0,gpu_instance_id=1,parent_gpu=0,"
        f"parent_uuid=GPU-fake-0,profile=1g.10gb,uuid={small.uuid}"
    )
    assert s[f"trt_heartbeat_mig_info{{{where}}}"] == 1
    assert s[f"trt_heartbeat_up{{gpu=0/1/0,uuid={small.uuid}}}"] == 1
    # Utilization, temperature, power and ECC are the parent's: not repeated per instance.
    assert not any(k.startswith("trt_heartbeat_gpu_temperature_celsius{gpu=0/") for k in s)
    # The instance's own memory decides its health.
    assert health_report(r.exporter)[0]["targets"][0]["gpu_memory"]["total_mib"] == 10240
