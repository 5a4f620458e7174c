"""Pieces shared by the GPU backends: options, host buffers, timed probe phases, memory."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from trt_heartbeat.domain import Target
from trt_heartbeat.errors import BackendError, Reason
from trt_heartbeat.exporter.backends.base import BackendOptions, MemoryReading, RunResult
from trt_heartbeat.exporter.cuda_host import CudaHost
from trt_heartbeat.exporter.nvml import NvmlView


@dataclass
class IOBuffers:
    """Pinned host buffers and device buffers of one probe's input and output."""

    host_in: np.ndarray
    host_out: np.ndarray
    dev_in: int
    dev_out: int


def io_buffers(host: CudaHost, x: np.ndarray, out_shape: tuple[int, ...]) -> IOBuffers:
    host_in = host.pinned(x.shape, x.dtype)
    host_in[...] = x
    host_out = host.pinned(out_shape, x.dtype)
    return IOBuffers(host_in, host_out, host.alloc(x.nbytes), host.alloc(host_out.nbytes))


def upload(host: CudaHost, array: np.ndarray) -> int:
    """Copy a constant (weights) to the device once, at prepare time."""
    staging = host.pinned(array.shape, array.dtype)
    staging[...] = array
    ptr = host.alloc(array.nbytes)
    host.h2d(ptr, staging)
    host.synchronize()
    return ptr


def timed_probe(host: CudaHost, io: IOBuffers, compute: Any) -> tuple[np.ndarray, dict[str, float]]:
    """h2d, compute(), d2h on the probe stream, each phase between two CUDA events:
    0 -h2d- 1 -compute- 2 -d2h- 3 (the phases of domain.PHASES besides total)."""
    out, record, elapsed = io.host_out, host.record, host.elapsed
    out.fill(np.nan)  # a probe that writes nothing must not pass on stale output
    record(0)
    host.h2d(io.dev_in, io.host_in)
    record(1)
    compute()
    record(2)
    host.d2h(out, io.dev_out)
    record(3)
    host.synchronize()
    return out.copy(), {"h2d": elapsed(0, 1), "compute": elapsed(1, 2), "d2h": elapsed(2, 3)}


class GpuBackend:
    """What the GPU backends share: precision check, timed run, device facts, release order.

    Subclasses load their model in prepare() (setting `_host`, `_io`, `_memory`) and launch it in
    `_compute()`; the probe phases around it are the same for every GPU backend.
    """

    name: ClassVar[str]
    probes_gpus: ClassVar[bool] = True
    precisions: ClassVar[tuple[str, ...]]

    def __init__(
        self, target: Target, precision: str, options: BackendOptions | None = None
    ) -> None:
        if precision not in self.precisions:
            raise BackendError(
                Reason.ENGINE_LOAD_FAILED,
                f"the {self.name} backend runs {' or '.join(self.precisions)}, not {precision}",
            )
        self.target = target
        self.precision = precision
        self.options = options or BackendOptions()
        self._host: CudaHost | None = None
        self._io: IOBuffers | None = None
        self._memory: NvmlView | None = None

    def _compute(self) -> None:
        raise NotImplementedError

    def _stack(self, host: CudaHost, memory: NvmlView) -> tuple[dict[str, str], dict[str, str]]:
        """(versions, details) every GPU backend reports in its EngineInfo."""
        major, minor = host.device.compute_capability
        versions = {
            "cuda_driver_version": host.device.cuda_driver_version,
            "driver_version": memory.driver_version,
        }
        details = {
            "gpu_name": host.device.name,
            "uuid": host.device.uuid,
            "compute_capability": f"{major}.{minor}",
            "cuda_api": host.name,
        }
        return versions, details

    def run(self) -> RunResult:
        assert self._host is not None and self._io is not None
        output, phases = timed_probe(self._host, self._io, self._compute)
        return RunResult(output, phases)

    def memory(self) -> MemoryReading:
        assert self._host is not None and self._memory is not None
        held = self._memory.current()
        # After the probe's own synchronize: what the driver says now is what the probe ran in.
        return MemoryReading(held, self._memory.source, self._host.memory_info())

    def _release(self) -> None:
        """Drop what lives inside the CUDA context, before the context goes."""

    def close(self) -> None:
        self._release()
        if self._host is not None:
            self._host.close()
            self._host = None
        if self._memory is not None:
            self._memory.close()
            self._memory = None
