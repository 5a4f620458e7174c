"""Every GPU a node has: discovery with MIG off, memory without NVML, one frozen GPU of several."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from served import HOG, Served, serve  # noqa: F401 (a fixture)

from conftest import wait_for

pytestmark = pytest.mark.gpu
MIB = 1 << 20


def _smi(query: str) -> list[list[str]]:
    command = ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader,nounits"]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return [[v.strip() for v in line.split(",")] for line in out.splitlines() if line.strip()]


def _record(name: str, data: object) -> None:
    out = os.environ.get("OUT")
    if out:
        Path(out, name).write_text(json.dumps(data, indent=2))


def test_discovery_with_mig_off_reports_each_whole_gpu() -> None:
    """The lent GPUs run with MIG disabled (and are left so): the MIG-aware discovery must
    report exactly what nvidia-smi lists, one whole-GPU target each."""
    import pynvml

    from trt_heartbeat.domain import Target
    from trt_heartbeat.exporter import gpus, nvml

    rows = _smi("index,uuid,mig.mode.current")
    if any(mode == "Enabled" for _, _, mode in rows):
        pytest.skip("a GPU here is in MIG mode")
    found = gpus.discover()
    assert [(g.index, g.uuid, g.mig_enabled, g.instances) for g in found] == [
        (int(index), uuid, False, ()) for index, uuid, _ in rows
    ]
    assert gpus.select_targets("all", found) == [Target(i, u) for i, u, _ in rows]
    pynvml.nvmlInit()
    try:
        snapshot = nvml.read(pynvml)
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        assert nvml.mig_devices(pynvml, 0, handle) == []
    finally:
        pynvml.nvmlShutdown()
    assert [(g.gpu, g.uuid, g.mig) for g in snapshot.gpus] == [(i, u, None) for i, u, _ in rows]
    _record("mig-off-discovery.json", {"nvidia_smi": rows, "found": [str(g) for g in found]})


@pytest.fixture
def hog() -> Iterator[Callable[[int], tuple[subprocess.Popen[str], int]]]:
    """Another process on GPU 0 that takes all but `leave` bytes of its free memory."""
    started: list[subprocess.Popen[str]] = []

    def start(leave: int) -> tuple[subprocess.Popen[str], int]:
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": _smi("uuid")[0][0]}
        process = subprocess.Popen(
            [sys.executable, "-c", HOG, str(leave)], env=env, stdout=subprocess.PIPE, text=True
        )
        started.append(process)
        assert process.stdout is not None
        return process, int(process.stdout.readline())

    yield start
    for process in started:
        process.kill()
        process.wait()


def test_memory_without_nvml_agrees_and_turns_health_low(
    serve: Callable[..., Served],
    hog: Callable[[int], tuple[subprocess.Popen[str], int]],
    tmp_path: Path,
) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("nvml: {enabled: false}\ngpus: [0]\n")
    s = serve("--config", str(config), "--backend", "cuda", "--interval", "2s", "--timeout", "1s")

    def cuda_memory() -> dict[str, float]:
        samples = s.samples()
        return {
            kind: v
            for kind in ("free", "total")
            for labels, v in samples.get(f"trt_heartbeat_gpu_memory_{kind}_bytes", [])
            if labels["source"] == "cuda"
        }

    wait_for(lambda: len(cuda_memory()) == 2, timeout=90, what="CUDA-sourced memory")
    samples = s.samples()
    assert samples["trt_heartbeat_nvml_up"][0][1] == 0
    assert {labels["source"] for labels, _ in samples["trt_heartbeat_gpu_memory_free_bytes"]} == {
        "cuda"
    }
    # Compare a probe's reading with nvidia-smi taken between two probes.
    ours = cuda_memory()
    (free_mib, total_mib), *_ = [[int(v) for v in row] for row in _smi("memory.free,memory.total")]
    agreement = {
        "cuda_free_mib": ours["free"] / MIB,
        "smi_free_mib": free_mib,
        "cuda_total_mib": ours["total"] / MIB,
        "smi_total_mib": total_mib,
    }
    assert abs(ours["free"] / MIB - free_mib) <= 64, agreement
    assert json.loads(s.get("/health")[1])["reason"] == "ok"

    # Another process leaves 400 MiB free: the next probe says so and health follows.
    _, left = hog(400 * MIB)
    taken = time.monotonic()

    def low() -> dict[str, object] | None:
        report = json.loads(s.get("/health")[1])
        return report if report["reason"] == "gpu_memory_low" else None

    report = wait_for(low, timeout=30, what="gpu_memory_low")
    elapsed = time.monotonic() - taken
    target = report["targets"][0]
    assert report["status"] == "degraded" and target["gpu_memory"]["source"] == "cuda"
    _record(
        "memory-without-nvml.json",
        {
            **agreement,
            "hog_left_free_mib": left / MIB,
            "health_free_mib": target["gpu_memory"]["free_mib"],
            "seconds_to_gpu_memory_low": elapsed,
            "interval_seconds": 2.0,
        },
    )


def test_one_frozen_gpu_of_several_leaves_the_others_passing(
    serve: Callable[..., Served],
) -> None:
    from trt_heartbeat.exporter import gpus

    found = gpus.discover()
    if len(found) < 2:
        pytest.skip("needs two GPUs")
    s = serve("--backend", "cuda", "--interval", "1s", "--timeout", "900ms")

    def counts(result: str) -> dict[str, float]:
        return {
            labels["gpu"]: v
            for labels, v in s.samples().get("trt_heartbeat_probes_total", [])
            if labels["result"] == result
        }

    everyone = {str(g.index) for g in found}
    wait_for(lambda: {g for g, v in counts("success").items() if v >= 1} == everyone, timeout=120)
    workers = {t["gpu"]: t["worker_pid"] for t in json.loads(s.get("/probes")[1])["targets"]}
    os.kill(int(workers["0"]), signal.SIGSTOP)
    before = counts("success")
    wait_for(lambda: counts("timeout").get("0", 0) >= 1, timeout=30, what="GPU 0 times out")
    during = counts("success")
    others = everyone - {"0"}
    # While GPU 0's worker was frozen and then killed, every other GPU kept passing.
    wait_for(lambda: all(counts("success")[g] >= during[g] + 3 for g in others), timeout=30)
    ups = {labels["gpu"]: v for labels, v in s.samples()["trt_heartbeat_up"]}
    assert all(ups[g] == 1 for g in others), ups
    wait_for(lambda: counts("success")["0"] > before["0"], timeout=60, what="GPU 0 recovers")
    _record(
        "frozen-one-of-several.json",
        {
            "gpus": sorted(everyone),
            "before": before,
            "at_timeout": during,
            "after": counts("success"),
        },
    )
