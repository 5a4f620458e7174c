"""Health of each target and of the exporter, shared by /health and trt_heartbeat_health_status.

unhealthy: the model is not loaded, no probe passed within max_age, or the last output was wrong.
degraded:  the last probe failed (but a recent one passed), free memory on the target's GPU is
           below the low-memory threshold, the last probe was slower than the latency
           objective, or the first probe has not run yet.
healthy:   the last probe passed within the objective.
"""

from __future__ import annotations

from dataclasses import dataclass

from trt_heartbeat.errors import Reason
from trt_heartbeat.exporter.config import Settings
from trt_heartbeat.exporter.nvml import GpuReading
from trt_heartbeat.exporter.nvml_poller import TelemetryState
from trt_heartbeat.exporter.state import TargetSnapshot

STATUSES = ("healthy", "degraded", "unhealthy")
# Health reasons beyond the failure Reasons: states, not failures.
OK, STARTING, STALE, SLOW, AWAITING_FIRST_PROBE, GPU_MEMORY_LOW = (
    "ok",
    "starting",
    "stale",
    "slow",
    "awaiting_first_probe",
    "gpu_memory_low",
)


@dataclass(frozen=True)
class Health:
    status: str
    reason: str

    @property
    def rank(self) -> int:
        return STATUSES.index(self.status)


def heartbeat_age(snap: TargetSnapshot, now: float) -> float:
    """Seconds since the last passing probe; while none has passed, since the model first loaded
    (a cold start is not a lost heartbeat), and before that since probing began."""
    since = next(
        t for t in (snap.last_success, snap.first_loaded_at, snap.started_at) if t is not None
    )
    return max(0.0, now - since)


def probe_free_memory(snap: TargetSnapshot, gpu: GpuReading, read_at: float | None) -> int:
    """Free memory on the target's GPU as it is while the probe worker holds its context.

    A reading taken while no worker ran — from the last moment the lost worker was known alive
    (the driver frees its memory at its death, before the exporter notices) until the next one
    has loaded — counts the probe's own footprint as free; it is taken off again, so that a
    worker restart cannot hide a low-memory reading that is still current.
    """
    footprint = snap.gpu_memory[0] if snap.gpu_memory else 0
    gone, since = snap.worker_gone_since, snap.worker_since
    if read_at is None or not footprint or gone is None or read_at < gone:
        return gpu.memory_free
    # From `gone` on, no worker ran until a new one loaded (at `since`, after `gone`).
    without_worker = not snap.loaded or since is None or read_at < since
    return gpu.memory_free - footprint if without_worker else gpu.memory_free


@dataclass(frozen=True)
class DeviceMemory:
    """Memory of a target's device from one source: `nvml` (the telemetry process) or `cuda`
    (cuMemGetInfo in the probe worker's own context, where NVML is absent, off or down)."""

    free: int
    total: int
    source: str

    @property
    def used(self) -> int:
        return self.total - self.free


def device_memory(
    snap: TargetSnapshot, gpu: GpuReading | None, read_at: float | None
) -> DeviceMemory | None:
    """The target's device memory: NVML's reading where NVML reads this device, else what the
    current worker's last probe saw; None where neither is known."""
    if gpu is not None:
        return DeviceMemory(probe_free_memory(snap, gpu, read_at), gpu.memory_total, "nvml")
    if snap.device_memory is not None:
        free, total = snap.device_memory
        return DeviceMemory(free, total, "cuda")
    return None


def target_health(
    snap: TargetSnapshot,
    now: float,
    settings: Settings,
    gpu: GpuReading | None = None,
    gpu_read_at: float | None = None,
) -> Health:
    """Health of one target; `gpu` is its latest NVML reading, if NVML is up, taken at
    `gpu_read_at` (without one, the probe's own memory reading counts). /health and the log
    both ask this, with the same inputs."""
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
    memory = device_memory(snap, gpu, gpu_read_at)
    if memory is not None and memory.free < settings.gpu_memory_low_threshold:
        return Health("degraded", GPU_MEMORY_LOW)
    if last.phases.get("total", 0.0) > settings.latency_objective:
        return Health("degraded", SLOW)
    return Health("healthy", OK)


def target_healths(
    snaps: list[TargetSnapshot], now: float, settings: Settings, telemetry: TelemetryState
) -> list[Health]:
    return [
        target_health(s, now, settings, telemetry.gpu(s.target.uuid), telemetry.last_success)
        for s in snaps
    ]


def overall_health(healths: list[Health]) -> Health:
    """The worst target decides; an exporter with no targets cannot probe anything."""
    if not healths:
        return Health("unhealthy", "no_targets")
    return max(healths, key=lambda h: h.rank)
