"""Health rules on real TargetState objects with an injected clock."""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

import pytest

from conftest import Faults, Running, settings, wait_for
from trt_heartbeat.domain import EngineInfo, Target
from trt_heartbeat.errors import Reason
from trt_heartbeat.exporter.health import Health, heartbeat_age, overall_health, target_health
from trt_heartbeat.exporter.nvml import GpuReading
from trt_heartbeat.exporter.state import ProbeRecord, TargetState

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
    state.record(fail(clock.now, "timeout", Reason.TIMEOUT), worker_lost="timeout")
    assert health(state, clock) == Health("unhealthy", "timeout")
    assert state.snapshot().restarts_total["timeout"] == 1
    state.engine_failed(Reason.ENGINE_INCOMPATIBLE, "plan from another TensorRT")
    assert health(state, clock) == Health("unhealthy", "engine_incompatible")
    snap = state.snapshot()
    assert snap.engine == ENGINE, "engine_info keeps the last loaded model while it is replaced"


def test_heartbeat_age() -> None:
    state, clock = make()
    clock.now += 7
    assert heartbeat_age(state.snapshot(), clock.now) == 7  # since probing began
    state.engine_loaded(ENGINE, 7.0)
    clock.now += 3
    # A long cold start is not a lost heartbeat: without a passing probe, age counts from the load.
    assert heartbeat_age(state.snapshot(), clock.now) == 3
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


def test_the_last_timed_probe_is_the_last_the_histograms_observed() -> None:
    state, clock = make()
    assert state.snapshot().last_timed_probe is None  # the gauge is absent until a probe ran
    passed = ProbeRecord(clock.now, "success", {"total": 0.002, "compute": 0.001})
    state.record(passed)
    # Neither a timeout (its duration is the timeout) nor a model that failed to load (no probe
    # ran) has timings: the last probe that had them stays.
    state.record(ProbeRecord(clock.now + 10, "timeout", {"total": 5.0}, Reason.TIMEOUT))
    state.record(ProbeRecord(clock.now + 20, "error", {}, Reason.ENGINE_LOAD_FAILED))
    assert state.snapshot().last_timed_probe is passed
    crashed = ProbeRecord(clock.now + 30, "error", {"total": 0.03}, Reason.WORKER_CRASH)
    state.record(crashed)
    snap = state.snapshot()
    assert snap.last_timed_probe is crashed and snap.durations["total"].count == 2


# --- low GPU memory across a worker restart (NVML reads every few seconds, on its own) -------

MiB = 1 << 20


def reading(free_mib: int) -> GpuReading:
    used = (80_000 - free_mib) * MiB
    return GpuReading(
        0,
        "GPU-x",
        "H100",
        "0000:3B:00.0",
        "9.0",
        80_000 * MiB,
        used,
        free_mib * MiB,
        None,
        None,
        None,
        None,
        None,
    )


def test_a_worker_restart_does_not_hide_low_memory() -> None:
    # Another process leaves 400 MiB free while the probe worker holds its 258 MiB context. When
    # the worker is killed, NVML sees 658 MiB free until its next read after the new worker has
    # loaded; that reading is older than the new worker and must not make the target healthy.
    state, clock = make()
    state.engine_loaded(ENGINE, 0.5)
    state.record(
        ProbeRecord(
            clock.now,
            "success",
            {"total": 0.001},
            max_abs_error=0.0,
            gpu_memory_bytes=258 * MiB,
            gpu_memory_source="nvml",
        )
    )
    with_worker = reading(400)
    assert target_health(state.snapshot(), clock.now, S, with_worker, clock.now) == Health(
        "degraded", "gpu_memory_low"
    )
    clock.now += 1
    state.record(fail(clock.now, "timeout", Reason.TIMEOUT), worker_lost="timeout")
    clock.now += 1
    without_worker, read_at = reading(658), clock.now  # the read while no worker runs
    clock.now += 1
    state.engine_loaded(ENGINE, 0.5)
    state.record(ok(clock.now))
    assert target_health(state.snapshot(), clock.now, S, without_worker, read_at) == Health(
        "degraded", "gpu_memory_low"
    )
    clock.now += 5  # NVML's next read, with the new worker's context in place
    assert target_health(state.snapshot(), clock.now, S, reading(400), clock.now) == Health(
        "degraded", "gpu_memory_low"
    )
    # Memory really freed while no worker ran is not held against the target afterwards.
    assert target_health(state.snapshot(), clock.now, S, reading(2000), clock.now) == Health(
        "healthy", "ok"
    )


def test_a_reading_taken_before_the_worker_was_lost_counts_as_it_is() -> None:
    state, clock = make()
    state.engine_loaded(ENGINE, 0.5)
    state.record(
        ProbeRecord(
            clock.now,
            "success",
            {"total": 0.001},
            max_abs_error=0.0,
            gpu_memory_bytes=258 * MiB,
            gpu_memory_source="nvml",
        )
    )
    read_at = clock.now
    clock.now += 1
    state.record(fail(clock.now, "timeout", Reason.TIMEOUT), worker_lost="timeout")
    clock.now += 1
    state.engine_loaded(ENGINE, 0.5)
    state.record(ok(clock.now))
    assert target_health(state.snapshot(), clock.now, S, reading(600), read_at) == Health(
        "healthy", "ok"
    )


def test_a_reading_between_the_death_and_its_notice_counts_without_the_worker() -> None:
    # The sequence measured on an H200 (docs/gpu-validation.md): the worker, last seen alive at
    # its probe, is SIGKILLed; the driver frees its memory 70 ms later and NVML reads 663 MiB free
    # 0.43 s after the kill; the loss is recorded afterwards, counted from the last sign of life.
    state, clock = make()
    state.engine_loaded(ENGINE, 0.5)
    state.record(
        ProbeRecord(
            clock.now,
            "success",
            {"total": 0.001},
            max_abs_error=0.0,
            gpu_memory_bytes=263 * MiB,
            gpu_memory_source="nvml",
        )
    )
    alive, before = clock.now + 0.001, reading(400)  # read with the worker, before its death
    clock.now += 0.25
    assert target_health(state.snapshot(), clock.now, S, before, alive) == Health(
        "degraded", "gpu_memory_low"
    )
    freed, read_at = reading(663), clock.now + 0.43  # killed at clock.now, read after it
    clock.now += 0.45
    state.record(
        fail(clock.now, "error", Reason.WORKER_CRASH), worker_lost="crash", gone_since=alive
    )
    assert target_health(state.snapshot(), clock.now, S, freed, read_at).status == "unhealthy"
    clock.now += 1.7
    state.engine_loaded(ENGINE, 0.35)
    state.record(ok(clock.now))
    assert target_health(state.snapshot(), clock.now, S, freed, read_at) == Health(
        "degraded", "gpu_memory_low"
    )
    # A reading from before the last sign of life was taken with the worker: as it is.
    assert target_health(state.snapshot(), clock.now, S, reading(600), alive - 0.5) == Health(
        "healthy", "ok"
    )


def test_a_failed_reload_keeps_the_start_of_the_gap() -> None:
    # Lost at 1001, the first replacement fails to load at 1003: a reading at 1002 was still
    # taken with no worker, also once a later replacement has loaded.
    state, clock = make()
    state.engine_loaded(ENGINE, 0.5)
    state.record(
        ProbeRecord(
            clock.now,
            "success",
            {"total": 0.001},
            max_abs_error=0.0,
            gpu_memory_bytes=258 * MiB,
            gpu_memory_source="nvml",
        )
    )
    clock.now += 1
    state.record(fail(clock.now, "error", Reason.WORKER_CRASH), worker_lost="crash")
    read_at = clock.now + 1
    clock.now += 2
    state.engine_failed(Reason.ENGINE_LOAD_FAILED, "no memory")
    state.record(fail(clock.now, "error", Reason.ENGINE_LOAD_FAILED), worker_lost="error")
    assert state.snapshot().worker_gone_since == 1001
    clock.now += 2
    state.engine_loaded(ENGINE, 0.5)
    state.record(ok(clock.now))
    assert target_health(state.snapshot(), clock.now, S, reading(658), read_at) == Health(
        "degraded", "gpu_memory_low"
    )


def test_the_log_and_health_endpoint_agree_after_a_timeout(
    run_exporter: Callable[..., Running], faults: Faults, caplog: pytest.LogCaptureFixture
) -> None:
    # Regression: the log said degraded/timeout while /health answered unhealthy/timeout until
    # the replacement worker had loaded. Both now report what one function decided.
    caplog.set_level(logging.INFO, logger="trt_heartbeat")
    r = run_exporter(targets=[Target("0", "GPU-fake-0")])

    def health_endpoint() -> dict[str, Any]:
        try:
            with urllib.request.urlopen(r.url + "/health", timeout=5) as response:
                return dict(json.load(response))
        except urllib.error.HTTPError as err:
            return dict(json.load(err))

    def logged() -> list[str]:
        return [
            f"{fields['status']}/{fields['reason']}"
            for rec in caplog.records
            if rec.getMessage() == "target health changed"
            for fields in [rec.__dict__["fields"]]
        ]

    wait_for(lambda: health_endpoint()["status"] == "healthy")
    faults.set(probe="hang", load="hang")  # the probe times out, the next worker never loads
    wait_for(lambda: health_endpoint()["reason"] == "timeout", what="timeout in /health")
    answer = health_endpoint()
    said = f"{answer['status']}/{answer['reason']}"
    wait_for(lambda: logged()[-1] == said, what=f"the log to say {said}")
    assert answer["status"] == "unhealthy"
    assert "degraded/timeout" not in logged(), logged()
