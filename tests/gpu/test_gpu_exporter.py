"""The exporter as users run it, on a real GPU: serve, scrape, freeze a worker, probe."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest
from served import Served, serve  # noqa: F401 (a fixture)

from conftest import cli, wait_for

pytestmark = pytest.mark.gpu


def test_cuda_backend_serves_passing_probes(serve: Callable[..., Served]) -> None:
    s = serve("--backend", "cuda", "--gpus", "0", "--interval", "1s", "--timeout", "900ms")
    wait_for(
        lambda: any(
            v >= 5
            for labels, v in s.samples().get("trt_heartbeat_probes_total", [])
            if labels["result"] == "success"
        ),
        timeout=90,
    )
    samples = s.samples()
    (up,) = samples["trt_heartbeat_up"]
    assert up[1] == 1 and up[0]["uuid"].startswith("GPU-") and up[0]["gpu"].isdigit()
    phases = {
        labels["phase"] for labels, _ in samples["trt_heartbeat_probe_duration_seconds_count"]
    }
    assert phases == {"total"}  # by default; metrics.histogram_phases adds the others
    # Every phase of the last probe, timed with CUDA events inside the round trip.
    last = {
        labels["phase"]: v for labels, v in samples["trt_heartbeat_last_probe_duration_seconds"]
    }
    assert set(last) == {"total", "h2d", "compute", "d2h"}, last
    assert 0 < last["h2d"] + last["compute"] + last["d2h"] < last["total"] < 0.9, last
    (build,) = samples["trt_heartbeat_build_info"]
    assert build[0]["backend"] == "cuda" and build[0]["cuda_driver_version"]
    (memory,) = samples["trt_heartbeat_probe_gpu_memory_bytes"]
    assert 0 < memory[1] <= 300 << 20
    status, body = s.get("/health")
    report = json.loads(body)
    assert status == 200 and report["status"] in ("healthy", "degraded"), report
    target = report["targets"][0]
    assert target["engine"]["gpu_name"] and target["engine"]["cuda_api"] == "cuda-python"
    (tmp := s.log.parent / "scrape.txt").write_bytes(s.get("/metrics")[1])
    out = os.environ.get("OUT")
    if out:
        Path(out, "gpu-scrape.txt").write_bytes(tmp.read_bytes())
        Path(out, "gpu-health.json").write_bytes(body)


def test_frozen_gpu_worker_is_replaced_and_recovers(serve: Callable[..., Served]) -> None:
    s = serve("--backend", "cuda", "--gpus", "0", "--interval", "2s", "--timeout", "1s")
    probes: Callable[[str], float] = lambda result: sum(  # noqa: E731
        v
        for labels, v in s.samples().get("trt_heartbeat_probes_total", [])
        if labels["result"] == result
    )
    wait_for(lambda: probes("success") >= 1, timeout=90)
    worker = int(json.loads(s.get("/probes")[1])["targets"][0]["worker_pid"])
    os.kill(worker, signal.SIGSTOP)
    wait_for(lambda: probes("timeout") >= 1, timeout=30)
    assert s.get("/metrics")[0] == 200 and s.get("/ping")[0] == 200
    before = probes("success")
    wait_for(lambda: probes("success") > before, timeout=60, what="recovery on the GPU")


def test_auto_without_a_plan_is_unhealthy_with_a_reason(
    serve: Callable[..., Served], tmp_path: Path
) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(f"engine_cache_dir: {tmp_path / 'empty-cache'}\ngpus: [0]\n")
    s = serve("--config", str(config), "--interval", "1s", "--timeout", "900ms")

    def settled() -> dict[str, object] | None:
        status, body = s.get("/health")
        report = json.loads(body)
        return report if status == 503 and report["reason"] != "starting" else None

    report = wait_for(settled, timeout=90)
    assert report["backend"] == "tensorrt"
    # With the lean runtime and no plan: engine_load_failed; without TensorRT: runtime_missing.
    assert report["reason"] in ("engine_load_failed", "runtime_missing"), report
    samples = s.samples()
    reasons = {labels["reason"] for labels, _ in samples["trt_heartbeat_last_failure_info"]}
    assert reasons == {report["reason"]}
    assert s.get("/ping")[0] == 200  # the exporter keeps serving


def test_probe_command_on_the_gpu() -> None:
    result = cli("probe", "--backend", "cuda", "--gpus", "0", "--count", "20", timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["passed"] and report["targets"][0]["passed"] == 20


def test_one_worker_per_gpu_each_on_its_own(serve: Callable[..., Served]) -> None:
    from trt_heartbeat.exporter import gpus

    found = gpus.discover()
    if len(found) < 2:
        pytest.skip("needs two GPUs")
    s = serve("--backend", "cuda", "--interval", "1s", "--timeout", "900ms")

    def passing() -> set[str]:
        return {labels["uuid"] for labels, v in s.samples().get("trt_heartbeat_up", []) if v == 1}

    wait_for(lambda: passing() == {g.uuid for g in found}, timeout=120, what="all GPUs up")
    # NVML's per-process lists: every worker appears on exactly one GPU, and each GPU has one.
    import pynvml

    pynvml.nvmlInit()
    try:
        workers = {t["worker_pid"] for t in json.loads(s.get("/probes")[1])["targets"]}
        seen: dict[int, list[str]] = {}
        for gpu in found:
            uuid = gpu.uuid
            handle = pynvml.nvmlDeviceGetHandleByIndex(gpu.index)
            for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                if proc.pid in workers:
                    seen.setdefault(proc.pid, []).append(uuid)
    finally:
        pynvml.nvmlShutdown()
    assert len(seen) == len(found), seen
    assert all(len(uuids) == 1 for uuids in seen.values()), seen
    out = os.environ.get("OUT")
    if out:
        Path(out, "gpu2-scrape.txt").write_bytes(s.get("/metrics")[1])
