"""A probe kernel that never finishes, on a real GPU: the watchdog kills the worker, the GPU
recovers, probes pass again. Prints the recovery time (docs/gpu-validation.md)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import Faults, Running, wait_for
from trt_heartbeat.domain import Target
from trt_heartbeat.exporter import gpus

pytestmark = pytest.mark.gpu


def test_never_finishing_kernel_is_killed_and_the_gpu_recovers(
    run_exporter: Callable[..., Running], faults: Faults, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = gpus.discover()[0]
    index, uuid = first.index, first.uuid
    # A backend given as module:Class is not bound to its GPU by the frame: bind it here.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", uuid)
    r = run_exporter(
        targets=[Target(str(index), uuid)],
        backend="gpu_hang_backend:HangingCudaBackend",
        interval=1.0,
        timeout=0.8,
        startup_timeout=60,
    )
    loop = r.exporter.scheduler.loops[0]
    assert loop.spec.target.uuid == uuid
    wait_for(lambda: r.snapshot().probes_total["success"] >= 2, timeout=120)
    hung_worker = loop.worker_pid
    faults.set(probe="hang")
    t0 = time.time()
    wait_for(lambda: r.snapshot().restarts_total["timeout"] >= 1, timeout=60)
    killed = time.time() - t0
    faults.set()
    snap = wait_for(
        lambda: (s := r.snapshot()).last_probe.result == "success" and s.last_success > t0 and s,
        timeout=120,
    )
    recovered = snap.last_success - t0
    assert loop.worker_pid != hung_worker
    print(
        f"spinning kernel: worker killed after {killed:.2f} s, probes pass again after "
        f"{recovered:.2f} s"
    )
    out = os.environ.get("OUT")
    if out:
        Path(out, "gpu-watchdog.json").write_text(
            json.dumps({"killed_after_s": killed, "recovered_after_s": recovered})
        )
