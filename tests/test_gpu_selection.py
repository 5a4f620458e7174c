"""GPU backends on a machine without a GPU: selection, discovery, clear failure reasons."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import Running, wait_for
from trt_heartbeat import gpus
from trt_heartbeat.app import gpu_visible, select_backend
from trt_heartbeat.backends import Target
from trt_heartbeat.cuda_host import cuda_failure
from trt_heartbeat.errors import Reason, UnknownBackendError

FOUND = [(0, "GPU-aaaa"), (1, "GPU-bbbb")]


def test_select_all() -> None:
    assert gpus.select_targets("all", FOUND) == [Target("0", "GPU-aaaa"), Target("1", "GPU-bbbb")]


def test_select_by_index_and_uuid() -> None:
    assert gpus.select_targets([1], FOUND) == [Target("1", "GPU-bbbb")]
    assert gpus.select_targets(["GPU-aaaa"], FOUND) == [Target("0", "GPU-aaaa")]


def test_missing_gpus_become_targets_that_will_report_no_gpu() -> None:
    assert gpus.select_targets([3, "GPU-cccc"], FOUND) == [Target("3", ""), Target("", "GPU-cccc")]


def test_gpu_visible_reads_procfs_and_dev(tmp_path: Path) -> None:
    proc, dev = tmp_path / "proc", tmp_path / "dev"
    proc.mkdir()
    dev.mkdir()
    assert not gpu_visible(proc, dev)
    assert not gpu_visible(tmp_path / "missing", dev)
    (dev / "nvidiactl").touch()  # the control node alone is no GPU
    assert not gpu_visible(proc, dev)
    (dev / "nvidia0").touch()
    assert gpu_visible(proc, dev)
    (dev / "nvidia0").unlink()
    (proc / "0000:3b:00.0").mkdir()
    assert gpu_visible(proc, dev)


def test_auto_backend() -> None:
    assert select_backend("auto", has_gpu=True) == "tensorrt"
    assert select_backend("auto", has_gpu=False) == "reference"
    assert select_backend("cuda", has_gpu=False) == "cuda"
    with pytest.raises(UnknownBackendError):
        select_backend("cudaa", has_gpu=True)


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("CUDA_ERROR_NO_DEVICE", Reason.NO_GPU),
        ("CUDA_ERROR_INSUFFICIENT_DRIVER", Reason.DRIVER_TOO_OLD),
        ("CUDA_ERROR_SYSTEM_DRIVER_MISMATCH", Reason.DRIVER_TOO_OLD),
        ("CUDA_ERROR_LAUNCH_FAILED", Reason.CUDA_ERROR),
        ("CUDA_ERROR_ILLEGAL_ADDRESS", Reason.CUDA_ERROR),
    ],
)
def test_cuda_errors_map_to_reasons(name: str, reason: Reason) -> None:
    error = cuda_failure("cuLaunchKernel", name, "details")
    assert error.reason is reason and error.fatal
    assert str(error) == f"cuLaunchKernel failed: {name} (details)"


def test_discovery_without_a_driver_fails_clearly() -> None:
    with pytest.raises(gpus.DiscoveryError) as info:
        gpus.discover(timeout=60)
    assert str(info.value).startswith("GPU discovery failed: ")


def _installed(*modules: str) -> bool:
    return any(importlib.util.find_spec(m) for m in modules)


@pytest.mark.parametrize(
    ("backend", "modules"),
    [("cuda", ("cuda.bindings",)), ("tensorrt", ("tensorrt", "tensorrt_lean_bindings"))],
)
def test_gpu_backend_on_a_cpu_host_is_unhealthy_with_a_reason(
    run_exporter: Callable[..., Running], backend: str, modules: tuple[str, ...]
) -> None:
    # Without the library: runtime_missing. With it, on this GPU-less machine, the driver is
    # what is missing: no_gpu.
    reason = Reason.NO_GPU if _installed(*modules) else Reason.RUNTIME_MISSING
    r = run_exporter(backend=backend)
    snap = wait_for(lambda: (s := r.snapshot()).restarts_total["error"] >= 1 and s)
    assert snap.load_failure is not None and snap.load_failure[0] is reason, snap.load_failure
    assert snap.target == Target("0", "")  # discovery failed: probe GPU 0 anyway, and say why
    report, ready = r.exporter.health_report()
    assert not ready and report["reason"] == reason.value
    assert r.exporter.alive()


@pytest.mark.skipif(importlib.util.find_spec("cuda") is None, reason="needs cuda-python (NVRTC)")
@pytest.mark.parametrize("real", ["float", "double"])
@pytest.mark.parametrize("arch", [(8, 0), (9, 0)])
def test_probe_kernel_compiles_with_nvrtc(real: str, arch: tuple[int, int]) -> None:
    # NVRTC needs no GPU: the kernel source is checked on every CI run.
    from trt_heartbeat.backends.cuda import kernel_source
    from trt_heartbeat.cuda_host import nvrtc

    image = nvrtc.compile_cubin(kernel_source(real), "canonical_mlp.cu", arch)
    assert image.startswith(b"\x7fELF")
