"""The TensorRT backend's builder and cache logic against a stand-in of the TensorRT API.

Real TensorRT: the lean runtime ran on an H200 (tests/gpu); the full builder cannot be installed
on our machines, so its wiring is checked here against the documented API.
"""

from __future__ import annotations

import types
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import fake_tensorrt as fake
from trt_heartbeat.domain import Target
from trt_heartbeat.errors import BackendError, Reason
from trt_heartbeat.exporter import canonical
from trt_heartbeat.exporter.backends import BackendOptions
from trt_heartbeat.exporter.backends.tensorrt import (
    TensorRTBackend,
    build_plan,
    make_logger,
    plan_request,
)
from trt_heartbeat.exporter.cuda_host import DeviceInfo
from trt_heartbeat.exporter.engine_cache import EngineCache


@pytest.fixture(autouse=True)
def reset() -> Iterator[None]:
    fake.Builder.fail = fake.Runtime.refuse = False
    yield
    fake.Builder.fail = fake.Runtime.refuse = False


def test_fp32_network_is_the_canonical_one() -> None:
    plan = build_plan(fake, make_logger(fake), "fp32")
    builder = fake.Builder.last
    assert builder is not None and builder.network is not None and builder.config is not None
    net = builder.network
    assert net.flags == 1 << int(fake.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    assert net.name == canonical.model_id()
    assert [(t.name, t.dtype, t.shape) for t in net.inputs] == [("x", "float32", (8, 64))]
    assert [(t.name, t.shape) for t in net.outputs] == [("y", (8, 16))]
    assert net.ops == ["matmul", "add", "relu", "matmul", "add"]
    ref = canonical.network()
    for got, want in zip(net.constants, (ref.w1, ref.b1, ref.w2, ref.b2), strict=True):
        assert got.dtype == np.float32 and np.array_equal(got, want)
    assert builder.config.flags == set()
    assert builder.config.pools == {"WORKSPACE": 64 << 20}
    assert plan.startswith(b"ftrt")


def test_fp16_comes_from_tensor_types_not_builder_flags() -> None:
    build_plan(fake, make_logger(fake), "fp16")
    builder = fake.Builder.last
    assert builder is not None and builder.network is not None and builder.config is not None
    assert builder.network.inputs[0].dtype == "float16"
    assert all(c.dtype == np.float16 for c in builder.network.constants)
    assert builder.config.flags == set(), "11.x has no FP16 flag; strong typing sets precision"


def test_portable_plans() -> None:
    build_plan(fake, make_logger(fake), "fp32", version_compatible=True, hardware_compatible=True)
    assert fake.Builder.last is not None
    config = fake.Builder.last.config
    assert config is not None
    assert config.flags == {fake.BuilderFlag.VERSION_COMPATIBLE}
    assert config.hardware_compatibility_level is fake.HardwareCompatibilityLevel.AMPERE_PLUS


def test_weakly_typed_releases_get_the_fp16_flag() -> None:
    old = types.SimpleNamespace(**{k: getattr(fake, k) for k in dir(fake) if not k.startswith("_")})
    old.NetworkDefinitionCreationFlag = types.SimpleNamespace()  # no STRONGLY_TYPED
    old.BuilderFlag = types.SimpleNamespace(FP16="FP16", VERSION_COMPATIBLE="VC")
    build_plan(old, make_logger(fake), "fp16")
    builder = fake.Builder.last
    assert builder.network.flags == 0 and builder.config.flags == {"FP16"}  # type: ignore[union-attr]


def test_build_failure_carries_tensorrt_messages() -> None:
    fake.Builder.fail = True
    with pytest.raises(BackendError) as info:
        build_plan(fake, make_logger(fake), "fp32")
    assert info.value.reason is Reason.ENGINE_LOAD_FAILED
    assert str(info.value) == (
        "TensorRT engine build failed: injected: no implementation for MatMul"
    )


def test_the_lean_runtime_cannot_build() -> None:
    lean = types.SimpleNamespace(__version__="11.4.0.106")
    with pytest.raises(BackendError) as info:
        build_plan(lean, None, "fp32")
    assert info.value.reason is Reason.RUNTIME_MISSING


class FakeHost:
    name = "fake"
    device = DeviceInfo("NVIDIA H200", "GPU-1", (9, 0), 141 << 30, 132, "13.0")


def plan_for(cache_dir: Path, flavour: str) -> tuple[TensorRTBackend, fake.Runtime, str]:
    backend = TensorRTBackend(
        Target("0", "GPU-1"), "fp32", BackendOptions(engine_cache_dir=str(cache_dir))
    )
    backend._logger = make_logger(fake)
    runtime = fake.Runtime(backend._logger)
    request = plan_request(fake, FakeHost(), "fp32")  # type: ignore[arg-type]
    _, state = backend._plan(fake, flavour, runtime, request, EngineCache(cache_dir))
    return backend, runtime, state


def test_full_runtime_builds_caches_and_then_reuses(tmp_path: Path) -> None:
    _, runtime, state = plan_for(tmp_path, "full")
    assert state == "built" and len(list(tmp_path.glob("*.plan"))) == 1
    _, runtime, state = plan_for(tmp_path, "full")
    assert state == "hit" and runtime.engine_host_code_allowed is False


def test_full_runtime_rebuilds_a_corrupted_plan(tmp_path: Path) -> None:
    plan_for(tmp_path, "full")
    (plan_file,) = tmp_path.glob("*.plan")
    plan_file.write_bytes(plan_file.read_bytes()[:-3])
    _, _, state = plan_for(tmp_path, "full")
    assert state == "rebuilt"
    _, _, state = plan_for(tmp_path, "full")
    assert state == "hit"


def test_full_runtime_rebuilds_a_plan_tensorrt_refuses(tmp_path: Path) -> None:
    plan_for(tmp_path, "full")
    fake.Runtime.refuse = True
    with pytest.raises(BackendError) as info:  # it refuses the rebuilt one too
        plan_for(tmp_path, "full")
    assert info.value.reason is Reason.ENGINE_LOAD_FAILED
    assert "could not load the plan it just built: injected: Magic tag" in str(info.value)


def test_lean_runtime_reports_what_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(BackendError) as info:
        plan_for(tmp_path, "lean")
    assert info.value.reason is Reason.ENGINE_LOAD_FAILED
    assert "the lean runtime cannot build one" in str(info.value)
    plan_for(tmp_path, "full")  # an init container built one
    _, _, state = plan_for(tmp_path, "lean")
    assert state == "hit"
    fake.Runtime.refuse = True
    with pytest.raises(BackendError) as info:
        plan_for(tmp_path, "lean")
    assert info.value.reason is Reason.ENGINE_INCOMPATIBLE
    assert "TensorRT refused it: injected: Magic tag does not match" in str(info.value)


def test_unwritable_cache_still_probes(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    _, _, state = plan_for(blocker / "engines", "full")
    assert state.startswith("built, not cached: ")


def test_a_full_disk_under_the_cache_still_probes(full_disk: Path) -> None:
    backend, _, state = plan_for(full_disk / "engines", "full")
    assert state == "built, not cached: No space left on device"
    assert backend._engine is not None  # the plan built in memory is used all the same
    assert list((full_disk / "engines").iterdir()) == []  # no half-written plan left behind
