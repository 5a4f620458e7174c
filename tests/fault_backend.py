"""Test-only backend that injects the faults we cannot cause for real on a CPU machine.

It reads a JSON control file (path in $TRT_HEARTBEAT_FAULT_FILE) before loading and before every
probe, so a test can change its behaviour while the exporter runs:
  {"load": "ok|fail|hang|crash|slow", "load_delay": seconds for a slow load,
   "probe": "ok|raise|fatal|cuda|crash|hang|wrong|nan|slow", "delay": seconds for "slow",
   "device_memory": [free, total] as cuMemGetInfo would say,
   "gpu_phases": true to report h2d/compute/d2h as the GPU backends do,
   "memory": "ok|raise|hang" for the memory reading after a probe}
A key "gpu:<index>" holds a control for that target alone. Without a control file it behaves
like the reference backend.
"""

from __future__ import annotations

import ctypes
import json
import os
import time
from typing import Any, ClassVar

from trt_heartbeat.domain import EngineInfo, Target
from trt_heartbeat.errors import BackendError, Reason
from trt_heartbeat.exporter.backends.base import BackendOptions, MemoryReading, RunResult
from trt_heartbeat.exporter.backends.reference import ReferenceBackend

ENV = "TRT_HEARTBEAT_FAULT_FILE"


def control(target: Target) -> dict[str, Any]:
    path = os.environ.get(ENV)
    if not path or not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as fh:
        ctl = dict(json.load(fh))
    return dict(ctl.get(f"gpu:{target.gpu}", ctl))


def segfault() -> None:
    ctypes.string_at(0)  # a real SIGSEGV, as a crashing native library would cause


class FaultBackend:
    name: ClassVar[str] = "fault"
    precisions: ClassVar[tuple[str, ...]] = ReferenceBackend.precisions

    def __init__(self, target: Target, precision: str, options: BackendOptions) -> None:
        self._target = target
        self._inner = ReferenceBackend(target, precision)

    def prepare(self) -> EngineInfo:
        mode = control(self._target).get("load", "ok")
        if mode == "fail":
            raise BackendError(Reason.ENGINE_LOAD_FAILED, "injected: engine build failed")
        if mode == "hang":
            time.sleep(3600)
        if mode == "crash":
            segfault()
        if mode == "slow":  # an engine build that takes its time, then succeeds
            time.sleep(float(control(self._target).get("load_delay", 90)))
        info = self._inner.prepare()
        versions = {"tensorrt_version": "0.0"}
        return EngineInfo("fault", info.precision, info.model, "ab" * 32, versions)

    def run(self) -> RunResult:
        ctl = control(self._target)
        mode = ctl.get("probe", "ok")
        if mode == "raise":
            raise BackendError(Reason.PROBE_ERROR, "injected: transient probe error")
        if mode == "cuda":
            raise BackendError(Reason.CUDA_ERROR, "injected: CUDA_ERROR_LAUNCH_FAILED", fatal=True)
        if mode == "fatal":
            raise RuntimeError("injected: unexpected backend failure")
        if mode == "crash":
            segfault()
        if mode == "hang":
            time.sleep(3600)
        result = self._inner.run()
        if mode == "slow":
            time.sleep(float(ctl.get("delay", 0.2)))
        output = result.output
        if mode == "wrong":
            output = output + 0.5
        if mode == "nan":
            output = output.copy()
            output[0, 0] = float("nan")
        phases = result.phases
        if ctl.get("gpu_phases"):  # the phases a GPU backend times, for series counts
            phases = {"h2d": 1e-5, "compute": phases["compute"], "d2h": 1e-5}
        return RunResult(output, phases)

    def memory(self) -> MemoryReading:
        # Pretend to hold device memory so the memory series exists, as on a GPU; and, where
        # the control says, report the device's (free, total) as cuMemGetInfo would.
        ctl = control(self._target)
        if ctl.get("memory") == "raise":
            raise BackendError(Reason.CUDA_ERROR, "injected: cuMemGetInfo failed", fatal=True)
        if ctl.get("memory") == "hang":
            time.sleep(3600)
        device = ctl.get("device_memory")
        free_total = None if device is None else (int(device[0]), int(device[1]))
        return MemoryReading(263 << 20, "test", free_total)

    def close(self) -> None:
        self._inner.close()
