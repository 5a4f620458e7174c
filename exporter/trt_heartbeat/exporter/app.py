"""Wires settings, probe loops, the collector and the reports the HTTP server serves."""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from prometheus_client import ProcessCollector

from trt_heartbeat import __version__
from trt_heartbeat.domain import Target
from trt_heartbeat.exporter import gpus
from trt_heartbeat.exporter.backends import GPU_BACKENDS, REGISTRY, BackendOptions, resolve_spec
from trt_heartbeat.exporter.collector import ClockCollector, NodeCollector, TargetCollector
from trt_heartbeat.exporter.config import Settings
from trt_heartbeat.exporter.health import (
    device_memory,
    heartbeat_age,
    overall_health,
    target_healths,
)
from trt_heartbeat.exporter.nvml_poller import NvmlTelemetry, TelemetryState
from trt_heartbeat.exporter.scheduler import Scheduler, TargetLoop, WorkerFactory
from trt_heartbeat.exporter.state import ProbeRecord, TargetSnapshot, TargetState
from trt_heartbeat.exporter.web.exposition import Exposition
from trt_heartbeat.exporter.worker import Worker, WorkerSpec

log = logging.getLogger("trt_heartbeat")

NVIDIA_PROC = Path("/proc/driver/nvidia/gpus")
DEV = Path("/dev")


def gpu_visible(proc_dir: Path = NVIDIA_PROC, dev_dir: Path = DEV) -> bool:
    """Whether the NVIDIA driver exposes a GPU here, without loading any CUDA library.

    The NVIDIA container runtime mounts the driver's procfs entries and /dev/nvidiaN nodes of
    the GPUs a container may see, so this also holds inside Kubernetes pods. A Jetson's
    integrated GPU has neither: its nodes are /dev/nvgpu/igpu0/* (JetPack 6) or
    /dev/nvhost-ctrl-gpu (JetPack 5 and older).
    """
    try:
        if any(proc_dir.iterdir()):
            return True
    except OSError:
        pass
    jetson = (dev_dir / "nvgpu").is_dir() or (dev_dir / "nvhost-ctrl-gpu").exists()
    return jetson or any(dev_dir.glob("nvidia[0-9]*"))


def select_backend(name: str, has_gpu: bool) -> str:
    """Resolve `auto`: tensorrt where a GPU is visible, reference only where none is.

    With a GPU present a broken TensorRT makes the targets unhealthy (runtime_missing); it never
    falls back to a CPU probe that would report a healthy heartbeat for a GPU it did not touch.
    """
    if name != "auto":
        resolve_spec(name)  # fail early on a typo, before any worker starts
        return name
    return "tensorrt" if has_gpu else "reference"


def probes_gpus(backend: str, settings: Settings, has_gpu: bool) -> bool:
    """Whether a backend's targets are the GPUs (one worker each, bound to its GPU) or the host.

    The built-in GPU backends always, `reference` never; a backend of your own
    (`package.module:Class`, imported only by workers, so it cannot say) wherever a GPU is
    visible or `gpus` names some.
    """
    if backend in GPU_BACKENDS or backend in REGISTRY:
        return backend in GPU_BACKENDS
    return has_gpu or settings.gpus != "all"


def targets_for(backend: str, settings: Settings, has_gpu: bool = False) -> list[Target]:
    if not probes_gpus(backend, settings, has_gpu):
        return [Target(gpu="cpu")]
    try:
        found = gpus.discover()
    except gpus.DiscoveryError as exc:
        # Probe what was asked for anyway: each worker then reports the real failure reason.
        log.error("GPU discovery failed", extra={"fields": {"error": str(exc)}})
        found = []
    targets = gpus.select_targets(settings.gpus, found)
    if not targets:
        log.error("no GPU found to probe", extra={"fields": {"gpus": str(settings.gpus)}})
        targets = [Target(gpu="0")]
    return targets


NO_TELEMETRY = TelemetryState(up=False, last_success=None, snapshot=None)


def make_telemetry(settings: Settings, has_gpu: bool) -> NvmlTelemetry | None:
    """NVML telemetry where it can work: `auto` means only where a GPU is visible."""
    enabled = has_gpu if settings.nvml_enabled == "auto" else bool(settings.nvml_enabled)
    return NvmlTelemetry(settings.nvml_interval, settings.nvml_timeout) if enabled else None


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, timezone.utc).isoformat()


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def probe_record_json(r: ProbeRecord, hide_message: bool = False) -> dict[str, Any]:
    """One probe as JSON, the same in /probes and the `probe` command: strict JSON, with no
    NaN or Infinity (a NaN/Inf output reads null here and is said in the message)."""
    out: dict[str, Any] = {
        "time": _iso(r.timestamp),
        "result": r.result,
        "reason": str(r.reason) if r.reason else None,
        "phases_seconds": {k: _finite(round(v, 9)) for k, v in r.phases.items()},
        "max_abs_error": _finite(r.max_abs_error),
    }
    if not hide_message:
        out["message"] = r.message
    return out


class Exporter:
    def __init__(
        self,
        settings: Settings,
        backend: str,
        targets: Sequence[Target] | None = None,
        *,
        worker_factory: WorkerFactory = Worker,
        wall_clock: Callable[[], float] = time.time,
        telemetry: NvmlTelemetry | None = None,
        has_gpu: bool = False,
    ) -> None:
        self.settings = settings
        self.backend = backend
        self._wall_clock = wall_clock
        self.telemetry = telemetry
        spec = resolve_spec(backend)
        options = BackendOptions(settings.cuda_api, settings.engine_cache_dir)
        loops = []
        bind_gpu = probes_gpus(backend, settings, has_gpu)
        for target in targets if targets is not None else targets_for(backend, settings, has_gpu):
            state = TargetState(target, wall_clock, settings.history, settings.buckets,
                                settings.histogram_phases)  # fmt: skip
            worker_spec = WorkerSpec(spec, target, settings.precision, options, bind_gpu=bind_gpu)
            loops.append(
                TargetLoop(
                    worker_spec, state, settings,
                    worker_factory=worker_factory, wall_clock=wall_clock,
                    telemetry=self.telemetry_state,
                )
            )  # fmt: skip
        self.scheduler = Scheduler(loops)
        states = self.scheduler.states
        live_process = ProcessCollector(registry=None)
        self.exposition = Exposition(
            [NodeCollector(states, settings, backend, self.telemetry_state),
             *(TargetCollector(state, settings) for state in states)],
            ClockCollector(states, settings, wall_clock, self.telemetry_state),
            [live_process],
        )  # fmt: skip

    @property
    def telemetry_path(self) -> str:
        return self.settings.telemetry_path

    def telemetry_state(self) -> TelemetryState:
        return self.telemetry.state() if self.telemetry else NO_TELEMETRY

    def start(self) -> None:
        if self.telemetry:
            self.telemetry.start()
        self.scheduler.start()

    def stop(self) -> None:
        self.scheduler.stop()
        if self.telemetry:
            self.telemetry.stop()

    def alive(self) -> bool:
        return self.scheduler.alive()

    def render_metrics(self, accept: str | None, gzip: bool = False) -> tuple[bytes, str]:
        return self.exposition.render(accept, gzip)

    def _snapshots(self) -> list[TargetSnapshot]:
        return [state.snapshot() for state in self.scheduler.states]

    def health_report(self) -> tuple[dict[str, Any], bool]:
        """The /health body, and whether the exporter is ready (healthy or degraded)."""
        now = self._wall_clock()
        hide = self.settings.hide_hardware_details
        telemetry = self.telemetry_state()
        snaps = self._snapshots()
        healths = target_healths(snaps, now, self.settings, telemetry)
        targets = []
        for snap, health in zip(snaps, healths, strict=True):
            gpu = telemetry.gpu(snap.target.uuid)
            last = snap.last_probe
            entry: dict[str, Any] = {
                "gpu": snap.target.gpu,
                "status": health.status,
                "reason": health.reason,
                "heartbeat_age_seconds": round(heartbeat_age(snap, now), 3),
                "last_result": last.result if last else None,
                "consecutive_failures": snap.consecutive_failures,
                "engine_loaded": snap.loaded,
            }
            if not hide:
                entry["uuid"] = snap.target.uuid
                if snap.engine is not None:
                    entry["engine"] = {
                        "backend": snap.engine.backend,
                        "model": snap.engine.model,
                        "precision": snap.engine.precision,
                        "engine_sha256": snap.engine.engine_sha256,
                        "versions": dict(snap.engine.versions),
                        **dict(snap.engine.details),
                    }
                if snap.gpu_memory is not None:
                    entry["probe_gpu_memory_bytes"] = snap.gpu_memory[0]
                    entry["probe_gpu_memory_source"] = snap.gpu_memory[1]
                memory = device_memory(snap, gpu, telemetry.last_success)
                if memory is not None:
                    entry["gpu_memory"] = {"free_mib": memory.free >> 20,
                                           "total_mib": memory.total >> 20,
                                           "source": memory.source}  # fmt: skip
                if snap.last_failure is not None:
                    entry["last_failure"] = {
                        "reason": str(snap.last_failure.reason),
                        "message": snap.last_failure.message,
                        "time": _iso(snap.last_failure.timestamp),
                    }
            targets.append(entry)
        overall = overall_health(healths)
        report = {
            "status": overall.status,
            "reason": overall.reason,
            "version": __version__,
            "backend": self.backend,
            "targets": targets,
        }
        return report, overall.status != "unhealthy"

    def probe_report(self) -> dict[str, Any]:
        """The /probes body: the last few probes of each target, newest first."""
        hide = self.settings.hide_hardware_details

        return {
            "backend": self.backend,
            "pid": os.getpid(),
            "targets": [
                {
                    "gpu": loop.target.gpu,
                    **({} if hide else {"uuid": loop.target.uuid}),
                    "worker_pid": loop.worker_pid,
                    "probes": [
                        probe_record_json(r, hide_message=hide)
                        for r in reversed(loop.state.snapshot().history)
                    ],
                }
                for loop in self.scheduler.loops
            ],
        }
