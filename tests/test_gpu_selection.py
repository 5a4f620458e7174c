"""GPU backends on a machine without a GPU: selection, discovery, clear failure reasons."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

import fake_nvml as fake_nvml_module
from conftest import Faults, Running, cli, cli_env, free_port, settings, wait_for
from trt_heartbeat.domain import MigInstance, Target
from trt_heartbeat.errors import ConfigError, Reason, UnknownBackendError
from trt_heartbeat.exporter import gpus
from trt_heartbeat.exporter.backends import REGISTRY, declared_gpu_use, load_backend
from trt_heartbeat.exporter.cuda_host import cuda_failure
from trt_heartbeat.exporter.devices import gpu_visible
from trt_heartbeat.exporter.gpus import probes_gpus, select_backend, targets_for
from trt_heartbeat.exporter.web.routes import health_report

FOUND = [gpus.FoundGpu(0, "GPU-aaaa"), gpus.FoundGpu(1, "GPU-bbbb")]
PARENT = "GPU-0000aaaa-0000-4000-8000-000000000000"
SMALL = Target(
    "0/1/0", "MIG-00000000-0000-4000-8000-000000000000", MigInstance("0", PARENT, "1g.10gb", 1, 0)
)
LARGE = Target(
    "0/2/0", "MIG-00000000-0000-4000-8000-000000000001", MigInstance("0", PARENT, "3g.40gb", 2, 0)
)
MIXED = [gpus.FoundGpu(0, PARENT, True, (SMALL, LARGE)), gpus.FoundGpu(1, "GPU-bbbb")]


def test_select_all() -> None:
    assert gpus.select_targets("all", FOUND) == [Target("0", "GPU-aaaa"), Target("1", "GPU-bbbb")]


def test_select_by_index_and_uuid() -> None:
    assert gpus.select_targets([1], FOUND) == [Target("1", "GPU-bbbb")]
    assert gpus.select_targets(["GPU-aaaa"], FOUND) == [Target("0", "GPU-aaaa")]


def test_missing_gpus_become_targets_that_will_report_no_gpu() -> None:
    assert gpus.select_targets([3, "GPU-cccc"], FOUND) == [Target("3", ""), Target("", "GPU-cccc")]
    gone = "MIG-00000000-0000-4000-8000-00000000000f"
    assert gpus.select_targets([gone], MIXED) == [Target("", gone)]


def test_a_gpu_in_mig_mode_is_probed_per_instance() -> None:
    assert gpus.select_targets("all", MIXED) == [SMALL, LARGE, Target("1", "GPU-bbbb")]
    # Selection by parent, by index or UUID: every instance on it.
    assert gpus.select_targets([0], MIXED) == [SMALL, LARGE]
    assert gpus.select_targets([PARENT, 1], MIXED) == [SMALL, LARGE, Target("1", "GPU-bbbb")]
    # One instance, by its UUID or by the driver's older MIG-<parent>/<GI>/<CI> name.
    assert gpus.select_targets([LARGE.uuid], MIXED) == [LARGE]
    assert gpus.select_targets([f"MIG-{PARENT}/1/0"], MIXED) == [SMALL]


def test_mig_mode_without_instances_stays_one_target() -> None:
    empty = [gpus.FoundGpu(0, PARENT, mig_enabled=True)]
    assert gpus.select_targets("all", empty) == [Target("0", PARENT)]


def test_an_instance_selected_twice_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as info:
        gpus.select_targets([0, SMALL.uuid], MIXED)
    assert str(info.value) == (
        f"gpus[1]: {SMALL.uuid} selects {SMALL.uuid}, which gpus[0] (0) already selects"
    )


def test_discovery_through_nvml_reports_mig_instances(fake_nvml: Faults) -> None:
    fake_nvml.set(mode="ok", mig={"0": ["1g.10gb", "3g.40gb"]})
    found = gpus.discover(timeout=60, nvml_module="fake_nvml")
    assert [(g.index, g.uuid, g.mig_enabled) for g in found] == [
        (0, "GPU-fake-0", True),
        (1, "GPU-fake-1", False),
    ]
    small = MigInstance("0", "GPU-fake-0", "1g.10gb", 1, 0)
    large = MigInstance("0", "GPU-fake-0", "3g.40gb", 2, 0)
    assert found[0].instances == (
        Target("0/1/0", fake_nvml_module.mig_uuid(0, 0), small),
        Target("0/2/0", fake_nvml_module.mig_uuid(0, 1), large),
    )


def test_discovery_of_whole_gpus_is_unchanged(fake_nvml: Faults) -> None:
    # What the lent GPUs show (MIG off): the same two targets as before MIG support.
    found = gpus.discover(timeout=60, nvml_module="fake_nvml")
    assert found == [gpus.FoundGpu(0, "GPU-fake-0"), gpus.FoundGpu(1, "GPU-fake-1")]
    assert gpus.select_targets("all", found) == [
        Target("0", "GPU-fake-0"),
        Target("1", "GPU-fake-1"),
    ]


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


@pytest.mark.parametrize("node", ["nvgpu/igpu0/ctrl", "nvhost-ctrl-gpu"])
def test_gpu_visible_on_a_jetson(tmp_path: Path, node: str) -> None:
    # An integrated GPU: no NVML procfs entries, no /dev/nvidiaN; JetPack 6 and 5 nodes.
    (tmp_path / "proc").mkdir()
    (tmp_path / "dev" / node).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / "dev" / node).touch()
    assert gpu_visible(tmp_path / "proc", tmp_path / "dev")


@pytest.mark.parametrize(
    ("backend", "gpus_setting", "has_gpu", "expected"),
    [
        ("cuda", "all", False, True),  # a GPU backend probes GPUs, visible or not (no_gpu)
        ("tensorrt", "all", True, True),
        ("reference", "all", True, False),  # the CPU reference never does
        ("reference", [0], False, False),
        # A backend of your own says so in its class (read in a child process): a GPU one
        # probes the GPUs like the built-in ones, visible or not; a host one never does.
        ("declared_backends:GpuOfMine", "all", False, True),
        ("declared_backends:GpuOfMine", "all", True, True),
        ("declared_backends:HostOfMine", "all", True, False),
        ("declared_backends:HostOfMine", [0], True, False),
        # One that does not say probes the GPUs where one is visible or `gpus` names some,
        # the host elsewhere.
        ("fault_backend:FaultBackend", "all", True, True),
        ("fault_backend:FaultBackend", [0], False, True),
        ("fault_backend:FaultBackend", "all", False, False),
    ],
)
def test_which_backends_probe_gpus(
    backend: str, gpus_setting: Any, has_gpu: bool, expected: bool
) -> None:
    chosen = settings(backend=backend, gpus=gpus_setting)
    assert probes_gpus(backend, chosen, has_gpu) is expected
    targets = targets_for(backend, chosen, has_gpu)
    assert all(t.gpu != "cpu" for t in targets) if expected else targets == [Target("cpu")]


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
    """Whether one of `modules` can be imported. find_spec raises for a dotted name whose parent
    package is missing (`cuda.bindings` without the `cuda` extra): that is not installed."""
    for module in modules:
        try:
            if importlib.util.find_spec(module) is not None:
                return True
        except ModuleNotFoundError:
            continue
    return False


def test_installed_is_false_where_the_parent_package_is_missing() -> None:
    assert _installed("no_such_package_here.bindings") is False
    assert _installed("no_such_package_here", "json") is True


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
    report, ready = health_report(r.exporter)
    assert not ready and report["reason"] == reason.value
    assert r.exporter.alive()


@pytest.mark.skipif(importlib.util.find_spec("cuda") is None, reason="needs cuda-python (NVRTC)")
@pytest.mark.parametrize("real", ["float", "double"])
@pytest.mark.parametrize("arch", [(8, 0), (9, 0)])
def test_probe_kernel_compiles_with_nvrtc(real: str, arch: tuple[int, int]) -> None:
    # NVRTC needs no GPU: the kernel source is checked on every CI run.
    from trt_heartbeat.exporter.backends.cuda import kernel_source
    from trt_heartbeat.exporter.cuda_host import nvrtc

    image = nvrtc.compile_cubin(kernel_source(real), "canonical_mlp.cu", arch)
    assert image.startswith(b"\x7fELF")


FAKE_PYNVML = Path(__file__).parent / "e2e" / "fake_pynvml"


def _serve_mig(tmp_path: Path, *args: str) -> subprocess.Popen[str]:
    """`serve` with the stand-in NVML in place of pynvml, GPU 0 in MIG mode with two instances."""
    control = tmp_path / "nvml.json"
    control.write_text(json.dumps({"mode": "ok", "mig": {"0": ["1g.10gb", "3g.40gb"]}}))
    (tmp_path / "c.yaml").write_text("nvml: {enabled: true, interval: 300ms, timeout: 250ms}\n")
    env = cli_env(TRT_HEARTBEAT_FAKE_NVML=str(control))
    env["PYTHONPATH"] = f"{FAKE_PYNVML}{os.pathsep}{env['PYTHONPATH']}"
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "trt_heartbeat",
            "serve",
            "--config",
            str(tmp_path / "c.yaml"),
            "--backend",
            "cuda",
            "--interval",
            "1s",
            "--timeout",
            "900ms",
            *args,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def test_serve_probes_each_mig_instance(tmp_path: Path) -> None:
    port = free_port()
    process = _serve_mig(tmp_path, "--web.listen-address", f"127.0.0.1:{port}")
    try:
        url = f"http://127.0.0.1:{port}/metrics"

        def samples() -> dict[str, list[dict[str, str]]]:
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    text = response.read().decode()
            except OSError:
                return {}  # not listening yet
            out: dict[str, list[dict[str, str]]] = {}
            for family in text_string_to_metric_families(text):
                for s in family.samples:
                    out.setdefault(s.name, []).append(s.labels)
            return out

        s = wait_for(
            lambda: (s := samples()).get("trt_heartbeat_gpu_memory_total_bytes") and s,
            timeout=60,
            what="NVML readings served",
        )
        mig0, mig1 = fake_nvml_module.mig_uuid(0, 0), fake_nvml_module.mig_uuid(0, 1)
        # One target per instance of GPU 0, the whole GPU 1; each with its own worker failing
        # for want of a driver on this machine, none taking the others down.
        assert {(t["gpu"], t["uuid"]) for t in s["trt_heartbeat_up"]} == {
            ("0/1/0", mig0),
            ("0/2/0", mig1),
            ("1", "GPU-fake-1"),
        }
        placed = sorted(
            (m["uuid"], m["parent_gpu"], m["profile"]) for m in s["trt_heartbeat_mig_info"]
        )
        assert placed == [(mig0, "0", "1g.10gb"), (mig1, "0", "3g.40gb")]
        memory = {(m["gpu"], m["source"]) for m in s["trt_heartbeat_gpu_memory_total_bytes"]}
        assert memory == {("0", "nvml"), ("0/1/0", "nvml"), ("0/2/0", "nvml"), ("1", "nvml")}
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_an_instance_selected_with_its_parent_exits_2(tmp_path: Path) -> None:
    mig1 = fake_nvml_module.mig_uuid(0, 1)
    process = _serve_mig(tmp_path, "--gpus", f"0,{mig1}", "--web.listen-address", "127.0.0.1:0")
    out, err = process.communicate(timeout=60)
    assert process.returncode == 2, out + err
    assert err == f"Error: gpus[1]: {mig1} selects {mig1}, which gpus[0] (0) already selects\n"


@pytest.mark.parametrize("where", ["file", "flag", "environment"])
@pytest.mark.parametrize(
    "value", ["MIG-1234", "MIG-GPU-abcd/1", "MIG-gggggggg-0000-4000-8000-000000000000"]
)
def test_a_malformed_mig_uuid_exits_2_alike_everywhere(
    tmp_path: Path, where: str, value: str
) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(f'gpus: ["{value}"]\n' if where == "file" else "")
    args = ["check-config", str(path)] + (["--gpus", value] if where == "flag" else [])
    env: dict[str, Any] = {"TRT_HEARTBEAT_GPUS": value} if where == "environment" else {}
    result = cli(*args, **env)
    assert result.returncode == 2 and result.stdout == ""
    assert len(result.stderr.splitlines()) == 1
    assert "or MIG instance UUIDs (MIG-...)" in result.stderr and value in result.stderr


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_the_registry_says_what_each_built_in_class_declares(name: str) -> None:
    """Start-up reads a built-in backend's `probes_gpus` from the registry (no child process):
    it must be what the class itself declares, as a backend of your own is asked."""
    registered = REGISTRY[name]
    assert load_backend(registered.spec).probes_gpus is registered.probes_gpus
    assert declared_gpu_use(registered.spec) is registered.probes_gpus
