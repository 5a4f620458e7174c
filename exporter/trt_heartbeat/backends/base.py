"""The tiny interface every probe backend implements.

A backend only computes: it loads the canonical network once (`prepare`) and runs it
(`run`), reporting the phases it can time itself. Timing the whole probe, checking the output
against golden, counting results and restarting workers belong to the frame.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Protocol

import numpy as np

# Phases a backend may report; "total" is always measured by the exporter itself.
PHASES = ("total", "h2d", "compute", "d2h")


@dataclass(frozen=True)
class Target:
    """One probe target: a GPU (index and UUID) or the CPU for the reference backend."""

    gpu: str
    uuid: str = ""


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
    gpu_memory_bytes: int | None = None  # device memory this worker holds, where measurable
    gpu_memory_source: str = ""  # how it was measured: nvml_process or setup_delta


class Backend(Protocol):
    name: ClassVar[str]
    precisions: ClassVar[tuple[str, ...]]

    def prepare(self) -> EngineInfo:
        """Build or load the probe model; raise BackendError with a reason on failure."""

    def run(self) -> RunResult:
        """Run one canonical inference."""

    def close(self) -> None:
        """Release what prepare() acquired."""


class BackendFactory(Protocol):
    name: ClassVar[str]
    precisions: ClassVar[tuple[str, ...]]

    def __call__(self, target: Target, precision: str, options: BackendOptions) -> Backend: ...
