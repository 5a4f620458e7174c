"""The probe loop with real worker processes: results, restarts, recovery, health."""

from __future__ import annotations

import logging
import os
import signal
import time
import urllib.request
from collections.abc import Callable

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import Faults, Running, wait_for
from trt_heartbeat.domain import Target
from trt_heartbeat.errors import Reason
from trt_heartbeat.exporter.nvml import GpuReading, NvmlSnapshot
from trt_heartbeat.exporter.nvml_poller import NvmlTelemetry, TelemetryState
from trt_heartbeat.exporter.web.routes import health_report

Start = Callable[..., Running]


def test_steady_state_counts_successes(run_exporter: Start, faults: Faults) -> None:
    r = run_exporter()
    snap = wait_for(lambda: (s := r.snapshot()).probes_total["success"] >= 3 and s)
    assert snap.loaded and snap.consecutive_failures == 0
    assert snap.probes_total == {
        "success": snap.probes_total["success"],
        "error": 0,
        "timeout": 0,
        "mismatch": 0,
    }
    assert snap.restarts_total == {"timeout": 0, "crash": 0, "error": 0}
    assert snap.durations["total"].count == snap.probes_total["success"]
    assert snap.engine is not None and snap.engine.backend == "fault"


def scrape(r: Running) -> dict[str, dict[str, float]]:
    """Family name -> {phase: value} of the phase-labelled samples of the exporter's /metrics."""
    with urllib.request.urlopen(r.url + "/metrics", timeout=5) as response:
        text = response.read().decode()
    found: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if "phase" in sample.labels:
                found.setdefault(sample.name, {})[sample.labels["phase"]] = sample.value
    return found


def last_phases(r: Running) -> dict[str, float]:
    return scrape(r).get("trt_heartbeat_last_probe_duration_seconds", {})


def test_last_probe_phases_are_exported_and_kept_through_timeouts(
    run_exporter: Start, faults: Faults
) -> None:
    faults.set(gpu_phases=True)  # h2d, compute and d2h, as the GPU backends time them
    r = run_exporter()
    wait_for(lambda: r.snapshot().probes_total["success"] >= 1)
    metrics = scrape(r)
    # By default only `total` has a histogram; every phase of the last probe is a gauge.
    assert set(metrics["trt_heartbeat_probe_duration_seconds_count"]) == {"total"}
    gauge = metrics["trt_heartbeat_last_probe_duration_seconds"]
    assert set(gauge) == {"total", "h2d", "compute", "d2h"}
    assert gauge["h2d"] == gauge["d2h"] == 1e-5  # what the backend reported, as it reported it
    assert 0 < gauge["compute"] < gauge["total"] < 0.25  # the round trip holds the compute
    # A timed-out probe has no timings: the gauge keeps showing the last probe that had them.
    faults.set(gpu_phases=True, probe="hang")
    snap = wait_for(lambda: (s := r.snapshot()).restarts_total["timeout"] >= 1 and s)
    assert snap.last_probe.result == "timeout"
    assert snap.last_timed_probe is not None and snap.last_timed_probe.result == "success"
    assert last_phases(r) == snap.last_timed_probe.phases
    # The phases the last probe measured, no more: the reference backend's, then a probe that
    # failed before the backend answered (total only).
    faults.set()
    wait_for(lambda: set(last_phases(r)) == {"total", "compute"}, what="reference phases")
    faults.set(probe="raise")
    wait_for(lambda: set(last_phases(r)) == {"total"}, what="a failed probe's round trip")


def test_timeout_kills_respawns_and_recovers(run_exporter: Start, faults: Faults) -> None:
    r = run_exporter()
    loop = r.exporter.scheduler.loops[0]
    wait_for(lambda: r.snapshot().probes_total["success"] >= 1, what="first success")
    first_pid = loop.worker_pid
    faults.set(probe="hang")
    snap = wait_for(lambda: (s := r.snapshot()).restarts_total["timeout"] >= 1 and s)
    assert snap.probes_total["timeout"] >= 1
    assert snap.last_failure is not None and snap.last_failure.reason is Reason.TIMEOUT
    faults.set()
    snap = wait_for(
        lambda: (s := r.snapshot()).last_probe.result == "success" and s, what="recovery"
    )
    assert snap.consecutive_failures == 0 and snap.loaded
    assert loop.worker_pid not in (None, first_pid)
    # The hung worker was killed, not left behind.
    assert first_pid is not None
    wait_for(lambda: not _alive(first_pid), what="old worker gone")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); look at its state.
    with open(f"/proc/{pid}/stat") as fh:
        return fh.read().split(") ")[1][0] != "Z"


def test_crash_respawns_and_is_counted(run_exporter: Start, faults: Faults) -> None:
    r = run_exporter()
    wait_for(lambda: r.snapshot().probes_total["success"] >= 1)
    faults.set(probe="crash")
    snap = wait_for(lambda: (s := r.snapshot()).restarts_total["crash"] >= 1 and s)
    assert snap.last_failure is not None
    assert snap.last_failure.reason is Reason.WORKER_CRASH
    assert snap.last_failure.message == "worker killed by SIGSEGV"
    faults.set()
    wait_for(lambda: r.snapshot().last_probe.result == "success", what="recovery after crash")


def test_worker_killed_from_outside_is_a_crash(run_exporter: Start, faults: Faults) -> None:
    r = run_exporter(interval=1.0, timeout=0.8)
    loop = r.exporter.scheduler.loops[0]
    wait_for(lambda: r.snapshot().probes_total["success"] >= 1)
    pid = loop.worker_pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    snap = wait_for(lambda: (s := r.snapshot()).restarts_total["crash"] >= 1 and s)
    assert snap.last_failure.message == "worker killed by SIGKILL"
    wait_for(
        lambda: loop.worker_pid not in (None, pid) and r.snapshot().last_probe.result == "success",
        what="new worker passing",
    )


def test_frozen_worker_times_out_and_recovers(run_exporter: Start, faults: Faults) -> None:
    r = run_exporter()
    loop = r.exporter.scheduler.loops[0]
    wait_for(lambda: r.snapshot().probes_total["success"] >= 1)
    pid = loop.worker_pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    snap = wait_for(lambda: (s := r.snapshot()).restarts_total["timeout"] >= 1 and s)
    assert snap.last_failure.reason is Reason.TIMEOUT
    wait_for(lambda: r.snapshot().last_probe.result == "success", what="recovery after SIGSTOP")
    assert loop.worker_pid != pid


def test_load_failure_backs_off_and_recovers(run_exporter: Start, faults: Faults) -> None:
    faults.set(load="fail")
    r = run_exporter()
    snap = wait_for(lambda: (s := r.snapshot()).restarts_total["error"] >= 2 and s)
    assert not snap.loaded
    assert snap.load_failure == (Reason.ENGINE_LOAD_FAILED, "injected: engine build failed")
    assert snap.probes_total["error"] >= 2  # a model that cannot load is a failing probe
    assert snap.durations == {}  # but not a latency
    assert r.exporter.scheduler.loops[0]._backoff >= 2.0  # 1 s, then doubled
    faults.set()
    wait_for(lambda: r.snapshot().last_probe.result == "success", timeout=30, what="load ok")
    assert r.exporter.scheduler.loops[0]._backoff == 0


def test_mismatch_and_errors_then_recovery(run_exporter: Start, faults: Faults) -> None:
    r = run_exporter()
    wait_for(lambda: r.snapshot().probes_total["success"] >= 1)
    faults.set(probe="wrong")
    snap = wait_for(lambda: (s := r.snapshot()).probes_total["mismatch"] >= 2 and s)
    assert snap.consecutive_failures >= 2
    assert snap.restarts_total == {"timeout": 0, "crash": 0, "error": 0}
    faults.set(probe="raise")
    wait_for(lambda: r.snapshot().probes_total["error"] >= 1)
    faults.set()
    snap = wait_for(lambda: (s := r.snapshot()).last_probe.result == "success" and s)
    assert snap.consecutive_failures == 0
    assert snap.last_failure.reason is Reason.PROBE_ERROR  # kept for last_failure_info


def test_stop_closes_workers(run_exporter: Start, faults: Faults) -> None:
    r = run_exporter()
    loop = r.exporter.scheduler.loops[0]
    wait_for(lambda: r.snapshot().probes_total["success"] >= 1)
    pid = loop.worker_pid
    assert pid is not None
    r.exporter.stop()
    assert loop.worker_pid is None
    wait_for(lambda: not _alive(pid), what="worker gone after stop")
    assert not r.exporter.alive()


def test_targets_probe_concurrently_and_independently(run_exporter: Start, faults: Faults) -> None:
    r = run_exporter(targets=[Target("0", "GPU-a"), Target("1", "GPU-b")])
    states = r.exporter.scheduler.states
    wait_for(lambda: all(s.snapshot().probes_total["success"] >= 1 for s in states))
    faults.set(**{"gpu:0": {"probe": "hang"}, "gpu:1": {}})
    before = states[1].snapshot().probes_total["success"]
    # While target 0 hangs, times out and is replaced, target 1 keeps passing on schedule.
    wait_for(lambda: states[0].snapshot().restarts_total["timeout"] >= 2)
    after = states[1].snapshot()
    assert after.probes_total["success"] >= before + 3
    assert after.restarts_total["timeout"] == 0 and after.consecutive_failures == 0
    pids = {loop.worker_pid for loop in r.exporter.scheduler.loops}
    assert len(pids) == 2, "one worker process per target"


# --- low GPU memory across a worker killed from outside (issue #24: the H200 sequence) -------

MiB = 1 << 20


class StubTelemetry(NvmlTelemetry):
    """NVML readings published by the test, each with the time it was taken."""

    def __init__(self) -> None:
        super().__init__(5.0, 2.0)
        self._published = TelemetryState(False, None, None)

    def publish(self, free_mib: int, at: float) -> None:
        total, free = 80_000 * MiB, free_mib * MiB
        gpu = GpuReading(
            0,
            "GPU-fake-0",
            "H200",
            "0000:3B:00.0",
            "9.0",
            total,
            total - free,
            free,
            None,
            None,
            None,
            None,
            None,
        )
        self._published = TelemetryState(True, at, NvmlSnapshot("580", "13.0", (gpu,)))

    def state(self) -> TelemetryState:
        return self._published

    def start(self) -> None:
        pass

    def stop(self, timeout: float = 5.0) -> None:
        pass


def test_a_worker_killed_between_probes_never_leaves_low_memory_healthy(
    run_exporter: Start, faults: Faults
) -> None:
    # As on the H200 (docs/gpu-validation.md): another process leaves 400 MiB free next to the
    # worker's 263 MiB. The worker is SIGKILLed just after a probe; the driver frees its memory
    # and NVML's next read, 0.3 s after the kill, sees 663 MiB free, long before the next probe
    # (2 s) would have found the worker gone. That reading must count as taken without the
    # worker: before the loss is noticed, and after the new worker's first probe passes.
    telemetry = StubTelemetry()
    r = run_exporter(
        targets=[Target("0", "GPU-fake-0")], telemetry=telemetry, interval=2.0, timeout=1.0
    )
    loop = r.exporter.scheduler.loops[0]

    def health() -> tuple[str, str]:
        report = health_report(r.exporter)[0]
        return report["status"], report["reason"]

    telemetry.publish(400, time.time())
    wait_for(lambda: health() == ("degraded", "gpu_memory_low"), what="low memory")
    # Kill right after a probe, so that the next one is 2 s away.
    first = r.snapshot().probes_total["success"]
    wait_for(lambda: r.snapshot().probes_total["success"] > first, what="a fresh probe")
    pid = loop.worker_pid
    assert pid is not None
    killed = time.time()
    os.kill(pid, signal.SIGKILL)
    seen: list[tuple[float, str, str]] = []
    published, back = False, None
    while back is None or time.time() < back + 0.5:
        now = time.time()
        assert now < killed + 15, seen
        if not published and now >= killed + 0.3:
            telemetry.publish(663, now)  # the worker's memory freed, NVML reads it
            published = True
        seen.append((round(now - killed, 3), *health()))
        snap = r.snapshot()
        if (
            back is None
            and loop.worker_pid not in (None, pid)
            and snap.last_success is not None
            and snap.last_success > killed
        ):
            back = now
        time.sleep(0.02)
    assert not [s for s in seen if s[1] == "healthy"], seen
    assert seen[-1][1:] == ("degraded", "gpu_memory_low"), seen
    assert r.snapshot().last_failure.message == "worker killed by SIGKILL"


def test_the_log_follows_a_new_nvml_reading_between_probes(
    run_exporter: Start, faults: Faults, caplog: pytest.LogCaptureFixture
) -> None:
    # On the H200, /health turned degraded when NVML read 400 MiB free, and the log said so only
    # at the next probe, 2 s later. The log now follows /health within a fraction of a second.
    caplog.set_level(logging.INFO, logger="trt_heartbeat")
    telemetry = StubTelemetry()
    telemetry.publish(2000, time.time())
    r = run_exporter(
        targets=[Target("0", "GPU-fake-0")], telemetry=telemetry, interval=10.0, timeout=1.0
    )
    wait_for(lambda: r.snapshot().probes_total["success"] >= 1, what="first probe")

    def logged() -> list[str]:
        return [
            f"{fields['status']}/{fields['reason']}"
            for rec in caplog.records
            if rec.getMessage() == "target health changed"
            for fields in [rec.__dict__["fields"]]
        ]

    wait_for(lambda: logged()[-1:] == ["healthy/ok"], what="healthy in the log")
    telemetry.publish(400, time.time())
    published = time.monotonic()
    wait_for(lambda: logged()[-1:] == ["degraded/gpu_memory_low"], timeout=5, what="the log")
    assert time.monotonic() - published < 1.0
    assert r.snapshot().probes_total["success"] == 1  # no probe ran in between
