"""The domain's vocabulary, shared by every module of both products: what a probe target is,
what a backend loaded, the probe phases and results the metric contract names, and the
histogram buckets. A leaf: it imports nothing of the package.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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


# 10 us (a GPU kernel) ... 10 s (a probe about to time out): the resolution canary-judge's
# rank tests and p99 intervals are tuned for.
BUCKETS: tuple[float, ...] = (
    1e-5,
    2.5e-5,
    5e-5,
    1e-4,
    2.5e-4,
    5e-4,
    1e-3,
    2.5e-3,
    5e-3,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
# Named bucket sets of the `metrics.buckets` setting; `coarse` keeps a factor of about 2-5
# between bounds for fleets that count series.
BUCKET_SETS: dict[str, tuple[float, ...]] = {
    "default": BUCKETS,
    "coarse": (1e-4, 5e-4, 1e-3, 5e-3, 0.025, 0.1, 0.5, 2.5, 10.0),
}
# Phases with a probe_duration_seconds histogram unless `metrics.histogram_phases` says more:
# `total`, which the alerts, the recording rules and canary-judge read. Each histogram costs a
# GPU one series per bucket and three more (22 by default); the last probe's phases are a gauge.
HISTOGRAM_PHASES: tuple[str, ...] = ("total",)
RESULTS = ("success", "error", "timeout", "mismatch")
RESTART_REASONS = ("timeout", "crash", "error")
