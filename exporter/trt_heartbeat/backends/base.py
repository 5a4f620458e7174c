"""The tiny interface every probe backend implements.

A backend only computes: it loads the canonical network once (`prepare`) and runs it
(`run`), reporting the phases it can time itself, and says what it can of device memory
(`memory`). Timing the whole probe, checking the output
against golden, counting results and restarting workers belong to the frame.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Protocol

import numpy as np

# Phases a backend may report; "total" is always measured by the exporter itself.
PHASES = ("total", "h2d", "compute", "d2h")


@dataclass(frozen=True)
class MigInstance:
    """Where a MIG instance lives: its parent GPU and its place and size there."""

    parent_gpu: str  # the parent's index, as in the parent's own `gpu` label
    parent_uuid: str
    profile: str  # e.g. "1g.10gb"; "" where NVML does not say
    gpu_instance: int
    compute_instance: int

    @property
    def label(self) -> str:
        """The instance's `gpu` label, as nvidia-smi names it: GPU 0, GI 1, CI 0 -> "0/1/0"."""
        return f"{self.parent_gpu}/{self.gpu_instance}/{self.compute_instance}"


@dataclass(frozen=True)
class Target:
    """One probe target: a GPU (index and UUID), a MIG instance of one, or the CPU for the
    reference backend."""

    gpu: str  # the `gpu` label: "0", "cpu", or "0/1/0" (parent/GPU instance/compute instance)
    uuid: str = ""
    mig: MigInstance | None = None


@dataclass(frozen=True)
class BackendOptions:
    """Settings a backend may use; each backend reads only what concerns it."""

    cuda_api: str = "cuda-python"
    engine_cache_dir: str = ""


@dataclass(frozen=True)
class EngineInfo:
    """What a backend loaded, reported once per worker start."""

    backend: str
    precision: str
    model: str
    engine_sha256: str = ""
    # Stack versions seen from inside the worker; empty where not applicable.
    versions: dict[str, str] = field(default_factory=dict)
    # Free-form facts for /health and the log: runtime flavour, cache hit, memory source...
    details: dict[str, str] = field(default_factory=dict)


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

    def __call__(self, target: Target, precision: str, options: BackendOptions) -> Backend: ...
