"""GPU backends on a real GPU: the cuda backend end to end, pycuda, the lean TensorRT path."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest

from trt_heartbeat.domain import Target
from trt_heartbeat.errors import BackendError, Reason
from trt_heartbeat.exporter import canonical, gpus
from trt_heartbeat.exporter.backends import BackendOptions
from trt_heartbeat.exporter.backends.cuda import CudaBackend
from trt_heartbeat.exporter.backends.reference import ReferenceBackend

if TYPE_CHECKING:  # imported where it runs: the lean runtime may be missing
    from trt_heartbeat.exporter.backends.tensorrt import TensorRTBackend

pytestmark = pytest.mark.gpu
MIB = 1 << 20


@pytest.fixture(scope="module")
def first_gpu() -> Target:
    first = gpus.discover()[0]
    index, uuid = first.index, first.uuid
    return Target(str(index), uuid)


@pytest.fixture
def bound(first_gpu: Target, monkeypatch: pytest.MonkeyPatch) -> Target:
    # Like a worker: see only this GPU. Tests in this module run in one process, so the first
    # CUDA initialisation fixes the visible set; every test binds the same GPU.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", first_gpu.uuid)
    return first_gpu


def run_backend(backend: CudaBackend, probes: int) -> list[dict[str, object]]:
    info = backend.prepare()
    assert info.model == canonical.model_id()
    results = []
    for _ in range(probes):
        r = backend.run()
        memory = backend.memory()
        check = canonical.check_output(r.output, backend.precision)
        results.append(
            {
                "passed": check.passed,
                "err": check.max_abs_error,
                "phases": r.phases,
                "mem": memory.held_bytes,
                "source": memory.held_source,
                "output": r.output,
            }
        )
    return results


@pytest.mark.parametrize("precision", ["fp32", "fp64"])
def test_cuda_backend_passes_and_agrees_with_reference(bound: Target, precision: str) -> None:
    backend = CudaBackend(bound, precision)
    try:
        results = run_backend(backend, 200)
    finally:
        backend.close()
    assert all(r["passed"] for r in results)
    ref = ReferenceBackend(Target("cpu"), precision)
    ref.prepare()
    ref_out = ref.run().output
    tol = canonical.TOLERANCES[precision]
    out = results[-1]["output"]
    assert isinstance(out, np.ndarray)
    np.testing.assert_allclose(out, ref_out, atol=tol.atol, rtol=tol.rtol)
    for r in results:
        phases = r["phases"]
        assert isinstance(phases, dict) and set(phases) == {"h2d", "compute", "d2h"}
        assert all(v > 0 for v in phases.values())


def test_cuda_backend_footprint(bound: Target) -> None:
    backend = CudaBackend(bound, "fp32")
    try:
        results = run_backend(backend, 500)
    finally:
        backend.close()
    mem = results[-1]["mem"]
    assert isinstance(mem, int), "memory must be measurable on a GPU machine"
    # Target from the issue: at most 300 MiB per GPU after probes have run (stack limit at 0).
    assert mem <= 300 * MIB, f"{mem / MIB:.0f} MiB ({results[-1]['source']})"


@pytest.mark.skipif(importlib.util.find_spec("pycuda") is None, reason="pycuda not installed")
def test_cuda_backend_on_pycuda(bound: Target) -> None:
    backend = CudaBackend(bound, "fp32", BackendOptions(cuda_api="pycuda"))
    try:
        info_results = run_backend(backend, 50)
    finally:
        backend.close()
    assert all(r["passed"] for r in info_results)


def _lean_available() -> bool:
    return any(importlib.util.find_spec(m) for m in ("tensorrt_lean", "tensorrt_lean_bindings"))


@pytest.fixture
def cache_dir(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path


def _write_plan(cache_dir: Path, plan: bytes, version: str, cc: str, name: str) -> None:
    from trt_heartbeat.exporter.engine_cache import Manifest, PlanRequest, plan_key

    request = PlanRequest(version, name, cc, canonical.model_digest(), "fp32")
    key = plan_key(request, False, "none")
    manifest = Manifest(
        1,
        version,
        name,
        cc,
        canonical.model_digest(),
        "fp32",
        f"{key}.plan",
        hashlib.sha256(plan).hexdigest(),
        len(plan),
        "2026-11-22T00:00:00+00:00",
        False,
        "none",
        "test",
    )
    (cache_dir / f"{key}.plan").write_bytes(plan)
    (cache_dir / f"{key}.json").write_text(json.dumps(manifest.__dict__))


def _header(major: int, minor: int, patch: int, build: int) -> bytes:
    return b"ftrt" + bytes(20) + bytes([major, minor, patch, build]) + os.urandom(4000)


@pytest.mark.skipif(not _lean_available(), reason="TensorRT lean runtime not installed")
class TestLeanRuntime:
    def _backend(self, target: Target, cache_dir: Path) -> TensorRTBackend:
        from trt_heartbeat.exporter.backends.tensorrt import TensorRTBackend

        return TensorRTBackend(target, "fp32", BackendOptions(engine_cache_dir=str(cache_dir)))

    def _device(self) -> tuple[str, str, str]:
        from trt_heartbeat.exporter.backends.tensorrt import import_tensorrt
        from trt_heartbeat.exporter.cuda_host import open_host

        trt, _ = import_tensorrt()
        host = open_host("cuda-python")
        try:
            major, minor = host.device.compute_capability
            return trt.__version__, f"{major}.{minor}", host.device.name
        finally:
            host.close()

    def _prepare_error(self, target: Target, cache_dir: Path) -> BackendError:
        backend = self._backend(target, cache_dir)
        try:
            with pytest.raises(BackendError) as info:
                backend.prepare()
        finally:
            backend.close()
        return info.value

    def test_empty_cache_is_a_clear_error(self, bound: Target, cache_dir: Path) -> None:
        error = self._prepare_error(bound, cache_dir)
        assert error.reason is Reason.ENGINE_LOAD_FAILED
        assert "the lean runtime cannot build one" in str(error)

    def test_valid_looking_but_corrupt_plan(self, bound: Target, cache_dir: Path) -> None:
        version, cc, name = self._device()
        v = [int(p) for p in version.split(".")]
        _write_plan(cache_dir, _header(v[0], v[1], v[2], v[3] % 256), version, cc, name)
        error = self._prepare_error(bound, cache_dir)
        assert error.reason is Reason.ENGINE_INCOMPATIBLE
        assert "TensorRT refused it" in str(error), str(error)

    def test_truncated_plan(self, bound: Target, cache_dir: Path) -> None:
        version, cc, name = self._device()
        v = [int(p) for p in version.split(".")]
        _write_plan(cache_dir, _header(v[0], v[1], v[2], 0), version, cc, name)
        plan = next(cache_dir.glob("*.plan"))
        plan.write_bytes(plan.read_bytes()[:100])
        error = self._prepare_error(bound, cache_dir)
        assert error.reason is Reason.ENGINE_INCOMPATIBLE
        assert "truncated plan (100 of 4028 bytes)" in str(error)

    def test_plan_of_another_version(self, bound: Target, cache_dir: Path) -> None:
        version, cc, name = self._device()
        _write_plan(cache_dir, _header(10, 3, 0, 6), version, cc, name)
        error = self._prepare_error(bound, cache_dir)
        assert error.reason is Reason.ENGINE_INCOMPATIBLE
        assert f"plan header says TensorRT 10.3.0, manifest says {version}" in str(error)
