"""The composition root: wires settings, targets, probe loops, NVML telemetry and the collectors
into the Exporter that the HTTP routes (`web.routes`) read."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from prometheus_client import ProcessCollector

from trt_heartbeat.domain import Target
from trt_heartbeat.exporter.backends import BackendOptions, resolve_spec
from trt_heartbeat.exporter.collector import ClockCollector, NodeCollector, TargetCollector
from trt_heartbeat.exporter.config import Settings
from trt_heartbeat.exporter.gpus import probes_gpus, targets_for
from trt_heartbeat.exporter.nvml_poller import NvmlTelemetry, TelemetryState
from trt_heartbeat.exporter.scheduler import Scheduler, TargetLoop, WorkerFactory
from trt_heartbeat.exporter.state import TargetSnapshot, TargetState
from trt_heartbeat.exporter.web.exposition import Exposition
from trt_heartbeat.exporter.worker import Worker, WorkerSpec

NO_TELEMETRY = TelemetryState(up=False, last_success=None, snapshot=None)


def make_telemetry(settings: Settings, has_gpu: bool) -> NvmlTelemetry | None:
    """NVML telemetry where it can work: `auto` means only where a GPU is visible."""
    enabled = has_gpu if settings.nvml_enabled == "auto" else bool(settings.nvml_enabled)
    return NvmlTelemetry(settings.nvml_interval, settings.nvml_timeout) if enabled else None


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
            state = TargetState(
                target, wall_clock, settings.history, settings.buckets, settings.histogram_phases
            )
            worker_spec = WorkerSpec(spec, target, settings.precision, options, bind_gpu=bind_gpu)
            loops.append(
                TargetLoop(
                    worker_spec,
                    state,
                    settings,
                    worker_factory=worker_factory,
                    wall_clock=wall_clock,
                    telemetry=self.telemetry_state,
                )
            )
        self.scheduler = Scheduler(loops)
        states = self.scheduler.states
        live_process = ProcessCollector(registry=None)
        self.exposition = Exposition(
            [
                NodeCollector(states, settings, backend, self.telemetry_state),
                *(TargetCollector(state, settings) for state in states),
            ],
            ClockCollector(states, settings, wall_clock, self.telemetry_state),
            [live_process],
        )

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

    def snapshots(self) -> list[TargetSnapshot]:
        return [state.snapshot() for state in self.scheduler.states]

    def now(self) -> float:
        return self._wall_clock()
