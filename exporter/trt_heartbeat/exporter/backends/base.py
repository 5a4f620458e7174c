"""The tiny interface every probe backend implements.

A backend only computes: it loads the canonical network once (`prepare`) and runs it
(`run`), reporting the phases it can time itself, and says what it can of device memory
(`memory`). Timing the whole probe, checking the output
against golden, counting results and restarting workers belong to the frame.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Protocol

import numpy as np

from trt_heartbeat.domain import EngineInfo, Target


@dataclass(frozen=True)
class BackendOptions:
    """Settings a backend may use; each backend reads only what concerns it."""

    cuda_api: str = "cuda-python"
    engine_cache_dir: str = ""


@dataclass(frozen=True)
class RunResult:
    output: np.ndarray
    phases: dict[str, float]  # seconds per phase measured by the backend (h2d, compute, d2h)


@dataclass(frozen=True)
class MemoryReading:
    """Device memory as a backend sees it right after a probe. The worker reads it once the
    probe's answer is on its way, so the reading never counts in the probe's latency."""

    held_bytes: int | None = None  # device memory this worker holds, where measurable
    held_source: str = ""  # how it was measured: nvml_process or setup_delta
    # Free and total memory of the device (a MIG instance: its own share) as the driver saw it
    # from the probe's context, where the backend can ask (cuMemGetInfo).
    device: tuple[int, int] | None = None


class Backend(Protocol):
    name: ClassVar[str]
    precisions: ClassVar[tuple[str, ...]]
    # True: one target (and one worker, bound to it) per GPU; False: one target, the host.
    probes_gpus: ClassVar[bool]

    def prepare(self) -> EngineInfo:
        """Build or load the probe model; raise BackendError with a reason on failure."""

    def run(self) -> RunResult:
        """Run one canonical inference."""

    def memory(self) -> MemoryReading:
        """Read device memory after a probe; an empty reading where the backend cannot."""

    def close(self) -> None:
        """Release what prepare() acquired."""


class BackendFactory(Protocol):
    name: ClassVar[str]
    precisions: ClassVar[tuple[str, ...]]
    probes_gpus: ClassVar[bool]

    def __call__(self, target: Target, precision: str, options: BackendOptions) -> Backend: ...
