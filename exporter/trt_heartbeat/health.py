"""Health of each target and of the exporter, shared by /health and trt_heartbeat_health_status.

unhealthy: the model is not loaded, no probe passed within max_age, or the last output was wrong.
degraded:  the last probe failed (but a recent one passed), free memory on the target's GPU is
           below the low-memory threshold, the last probe was slower than the latency
           objective, or the first probe has not run yet.
healthy:   the last probe passed within the objective.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import Settings
from .errors import Reason
from .nvml_reader import GpuReading
from .state import TargetSnapshot
from .telemetry import TelemetryState

STATUSES = ("healthy", "degraded", "unhealthy")
# Health reasons beyond the failure Reasons: states, not failures.
OK, STARTING, STALE, SLOW, AWAITING_FIRST_PROBE, GPU_MEMORY_LOW = (
    "ok", "starting", "stale", "slow", "awaiting_first_probe", "gpu_memory_low",
)  # fmt: skip


@dataclass(frozen=True)
class Health:
    status: str
    reason: str

    @property
    def rank(self) -> int:
        return STATUSES.index(self.status)


def heartbeat_age(snap: TargetSnapshot, now: float) -> float:
    """Seconds since the last passing probe, or since probing began while none has passed."""
    return max(0.0, now - (snap.last_success if snap.last_success is not None else snap.started_at))


def target_health(
    snap: TargetSnapshot, now: float, settings: Settings, gpu: GpuReading | None = None
) -> Health:
    """Health of one target; `gpu` is its latest NVML reading, if NVML is up."""
    last = snap.last_probe
    if not snap.loaded:
        if snap.load_failure is not None:
            return Health("unhealthy", str(snap.load_failure[0]))
        if last is not None and last.reason is not None:
            return Health("unhealthy", str(last.reason))  # worker lost, being replaced
        return Health("unhealthy", STARTING)
    if last is not None and last.result == "mismatch":
        return Health("unhealthy", str(Reason.MISMATCH))
    if heartbeat_age(snap, now) > settings.max_age:
        reason = str(last.reason) if last is not None and last.reason is not None else STALE
        return Health("unhealthy", reason)
    if last is None:
        return Health("degraded", AWAITING_FIRST_PROBE)
    if last.result != "success":
        return Health("degraded", str(last.reason))
    if gpu is not None and gpu.memory_free < settings.gpu_memory_low_threshold:
        return Health("degraded", GPU_MEMORY_LOW)
    if last.phases.get("total", 0.0) > settings.latency_objective:
        return Health("degraded", SLOW)
    return Health("healthy", OK)


def target_healths(
    snaps: list[TargetSnapshot], now: float, settings: Settings, telemetry: TelemetryState
) -> list[Health]:
    return [target_health(s, now, settings, telemetry.gpu(s.target.uuid)) for s in snaps]


def overall_health(healths: list[Health]) -> Health:
    """The worst target decides; an exporter with no targets cannot probe anything."""
    if not healths:
        return Health("unhealthy", "no_targets")
    return max(healths, key=lambda h: h.rank)
