"""The probe loop with real worker processes: results, restarts, recovery, health."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable

from conftest import Faults, Running, wait_for
from trt_heartbeat.backends import Target
from trt_heartbeat.errors import Reason

Start = Callable[..., Running]


def test_steady_state_counts_successes(run_exporter: Start, faults: Faults) -> None:
    r = run_exporter()
    snap = wait_for(lambda: (s := r.snapshot()).probes_total["success"] >= 3 and s)
    assert snap.loaded and snap.consecutive_failures == 0
    assert snap.probes_total == {"success": snap.probes_total["success"], "error": 0,
                                 "timeout": 0, "mismatch": 0}  # fmt: skip
    assert snap.restarts_total == {"timeout": 0, "crash": 0, "error": 0}
    assert snap.durations["total"].count == snap.probes_total["success"]
    assert snap.engine is not None and snap.engine.backend == "fault"


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
    snap = wait_for(lambda: (s := r.snapshot()).last_probe.result == "success" and s,
                    what="recovery")  # fmt: skip
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
    wait_for(lambda: loop.worker_pid not in (None, pid) and r.snapshot().last_probe.result
             == "success", what="new worker passing")  # fmt: skip


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
