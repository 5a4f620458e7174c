"""Health rules on real TargetState objects with an injected clock."""

from __future__ import annotations

import pytest

from conftest import settings
from trt_heartbeat.backends import EngineInfo, Target
from trt_heartbeat.errors import Reason
from trt_heartbeat.health import Health, heartbeat_age, overall_health, target_health
from trt_heartbeat.state import ProbeRecord, TargetState

S = settings(interval=10, timeout=5, max_age=30, latency_objective=0.1)
ENGINE = EngineInfo("reference", "fp32", "m")


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make() -> tuple[TargetState, Clock]:
    clock = Clock()
    return TargetState(Target("0", "GPU-x"), clock), clock


def ok(t: float, total: float = 0.001) -> ProbeRecord:
    return ProbeRecord(t, "success", {"total": total}, max_abs_error=0.0)


def fail(t: float, result: str, reason: Reason) -> ProbeRecord:
    return ProbeRecord(t, result, {"total": 0.01}, reason, "boom")


def health(state: TargetState, clock: Clock) -> Health:
    return target_health(state.snapshot(), clock.now, S)


def test_lifecycle_transitions() -> None:
    state, clock = make()
    assert health(state, clock) == Health("unhealthy", "starting")
    state.engine_loaded(ENGINE, 0.5)
    assert health(state, clock) == Health("degraded", "awaiting_first_probe")
    state.record(ok(clock.now))
    assert health(state, clock) == Health("healthy", "ok")
    clock.now += 10
    state.record(fail(clock.now, "error", Reason.CUDA_ERROR))
    assert health(state, clock) == Health("degraded", "cuda_error")
    clock.now += 25  # 35 s since the last pass > max_age 30 s
    assert health(state, clock) == Health("unhealthy", "cuda_error")
    state.record(ok(clock.now))
    assert health(state, clock) == Health("healthy", "ok")
    state.record(ok(clock.now, total=0.5))
    assert health(state, clock) == Health("degraded", "slow")
    state.record(fail(clock.now, "mismatch", Reason.MISMATCH))
    assert health(state, clock) == Health("unhealthy", "mismatch")


def test_stale_without_a_failure_reason() -> None:
    state, clock = make()
    state.engine_loaded(ENGINE, 0.5)
    clock.now += 31  # loaded, but no probe has run for longer than max_age
    assert health(state, clock) == Health("unhealthy", "stale")


def test_worker_lost_and_load_failure_are_unhealthy() -> None:
    state, clock = make()
    state.engine_loaded(ENGINE, 0.5)
    state.record(ok(clock.now))
    state.record(fail(clock.now, "timeout", Reason.TIMEOUT))
    state.worker_lost("timeout")
    assert health(state, clock) == Health("unhealthy", "timeout")
    state.engine_failed(Reason.ENGINE_INCOMPATIBLE, "plan from another TensorRT")
    assert health(state, clock) == Health("unhealthy", "engine_incompatible")
    snap = state.snapshot()
    assert snap.engine == ENGINE, "engine_info keeps the last loaded model while it is replaced"


def test_heartbeat_age() -> None:
    state, clock = make()
    clock.now += 7
    assert heartbeat_age(state.snapshot(), clock.now) == 7  # since probing began
    state.record(ok(clock.now, total=0.5))
    clock.now += 2
    assert heartbeat_age(state.snapshot(), clock.now) == 1.5  # since the probe completed


def test_overall_is_the_worst_target() -> None:
    assert overall_health([]) == Health("unhealthy", "no_targets")
    hs = [Health("healthy", "ok"), Health("degraded", "slow"), Health("healthy", "ok")]
    assert overall_health(hs) == Health("degraded", "slow")
    hs.append(Health("unhealthy", "timeout"))
    assert overall_health(hs) == Health("unhealthy", "timeout")


def test_history_is_bounded_and_histograms_skip_timeouts() -> None:
    clock = Clock()
    state = TargetState(Target("cpu"), clock, history=3)
    for i in range(5):
        state.record(ok(clock.now + i, total=0.002))
    state.record(ProbeRecord(clock.now, "timeout", {"total": 5.0}, Reason.TIMEOUT))
    snap = state.snapshot()
    assert len(snap.history) == 3 and snap.history[-1].result == "timeout"
    assert snap.durations["total"].count == 5
    assert snap.durations["total"].sum == pytest.approx(5 * 0.002)
