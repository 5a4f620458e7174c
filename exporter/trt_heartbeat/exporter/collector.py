"""Custom Collectors: fresh metric families at scrape time from the latest snapshots.

Nothing here waits on a worker or touches a GPU. `NodeCollector` (configuration, versions, NVML)
and one `TargetCollector` per target yield what depends only on recorded state, so a rendering
can be reused until a probe, a worker load or an NVML read changes it (see web/exposition.py);
`ClockCollector` yields the few families that also depend on the time of the scrape.
"""

from __future__ import annotations

import platform
from collections.abc import Callable, Iterator, Sequence
from typing import cast

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from trt_heartbeat import __version__
from trt_heartbeat.exporter.config import Settings
from trt_heartbeat.exporter.health import (
    STATUSES,
    device_memory,
    heartbeat_age,
    overall_health,
    target_healths,
)
from trt_heartbeat.exporter.nvml_poller import TelemetryState
from trt_heartbeat.exporter.state import TargetSnapshot, TargetState

PREFIX = "trt_heartbeat"
# build_info labels filled from what the worker reports about the stack it runs on.
STACK_VERSIONS = ("tensorrt_version", "cuda_driver_version", "driver_version")
_go_float = cast(Callable[[float], str], floatToGoString)  # untyped in client_python
_TIMER_NOTE = (
    " Probes run on the exporter's own timer, not per scrape, so HA Prometheus pairs and"
    " scrape settings do not multiply GPU load."
)


class _Families:
    """Builds families whose label names start with the configured constant labels."""

    def __init__(self, const_labels: dict[str, str]) -> None:
        self.names = list(const_labels)
        self.values = list(const_labels.values())

    def gauge(self, name: str, doc: str, labels: Sequence[str] = ()) -> GaugeMetricFamily:
        return GaugeMetricFamily(f"{PREFIX}_{name}", doc, labels=[*self.names, *labels])

    def counter(self, name: str, doc: str, labels: Sequence[str] = ()) -> CounterMetricFamily:
        return CounterMetricFamily(f"{PREFIX}_{name}", doc, labels=[*self.names, *labels])

    def histogram(self, name: str, doc: str, labels: Sequence[str] = ()) -> HistogramMetricFamily:
        return HistogramMetricFamily(f"{PREFIX}_{name}", doc, labels=[*self.names, *labels])

    def label_values(self, *values: str) -> list[str]:
        return [*self.values, *values]


class NodeCollector(Collector):
    """Configuration, stack versions and NVML telemetry: one set per exporter."""

    def __init__(
        self,
        states: Sequence[TargetState],
        settings: Settings,
        backend: str,
        telemetry: Callable[[], TelemetryState],
    ) -> None:
        self._states = states
        self._settings = settings
        self._backend = backend
        self._telemetry = telemetry
        self._f = _Families(settings.constant_labels)

    def describe(self) -> list[Metric]:
        # Families vary with state (series appear after the first probe); let the registry
        # skip describe-time collection instead of probing an empty snapshot.
        return []

    def version(self) -> tuple[object, ...]:
        """Equal as long as what `collect` yields is unchanged."""
        snaps = [state.snapshot() for state in self._states]
        return (*((s.engine, s.device_memory) for s in snaps), self._telemetry())

    def collect(self) -> Iterator[Metric]:
        snaps = [state.snapshot() for state in self._states]
        telemetry = self._telemetry()
        yield from self._config_gauges()
        yield self._build_info(snaps, telemetry)
        yield from self._gpu_telemetry(telemetry)
        yield from self._gpu_memory(snaps, telemetry)

    def _config_gauges(self) -> Iterator[Metric]:
        f, s = self._f, self._settings
        for name, value, doc in (
            ("interval_seconds", s.interval, "Configured time between two probes of a target."),
            (
                "timeout_seconds",
                s.timeout,
                "Configured time a probe may take before it counts "
                "as a timeout and its worker is replaced.",
            ),
            (
                "startup_timeout_seconds",
                s.startup_timeout,
                "Configured time a worker may take "
                "to load its model before it counts as a timeout and is replaced.",
            ),
            (
                "max_age_seconds",
                s.max_age,
                "Configured heartbeat age beyond which a target is unhealthy.",
            ),
            (
                "latency_objective_seconds",
                s.latency_objective,
                "Configured probe latency objective; slower passing probes make a target degraded.",
            ),
            (
                "gpu_memory_low_threshold_bytes",
                s.gpu_memory_low_threshold,
                "Configured free GPU memory below which a probed GPU makes the exporter degraded.",
            ),
        ):
            family = f.gauge(name, doc)
            family.add_metric(f.label_values(), value)
            yield family

    def _build_info(self, snaps: list[TargetSnapshot], telemetry: TelemetryState) -> Metric:
        f = self._f
        versions: dict[str, str] = {}
        for snap in snaps:
            if snap.engine is not None:
                versions = {**snap.engine.versions, **versions}
        if telemetry.snapshot is not None:  # NVML knows the driver even before a worker loads
            versions["driver_version"] = telemetry.snapshot.driver_version
            versions["cuda_driver_version"] = telemetry.snapshot.cuda_driver_version
        family = f.gauge(
            "build_info",
            "Versions of the exporter and of the stack its probes run on; constant 1.",
            ["version", "python_version", "backend", *STACK_VERSIONS],
        )
        family.add_metric(
            f.label_values(
                __version__,
                platform.python_version(),
                self._backend,
                *(versions.get(key, "") for key in STACK_VERSIONS),
            ),
            1,
        )
        return family

    def _gpu_telemetry(self, telemetry: TelemetryState) -> Iterator[Metric]:
        f = self._f
        up = f.gauge(
            "nvml_up",
            "1 when the last NVML read succeeded within its timeout, else 0 "
            "(per-GPU telemetry is then not exported).",
        )
        up.add_metric(f.label_values(), 1 if telemetry.up else 0)
        yield up
        # Where NVML is off or absent (Jetson, `auto` on a host where it never answered), a 0
        # above is the contract, not a fault: this says whether to expect a 1.
        enabled = f.gauge(
            "nvml_enabled",
            "1 where NVML is expected to answer: nvml.enabled "
            "true, or auto once a read has succeeded; else 0.",
        )
        expected = self._settings.nvml_enabled is True or telemetry.last_success is not None
        enabled.add_metric(f.label_values(), 1 if expected else 0)
        yield enabled
        last = f.gauge(
            "nvml_last_success_timestamp_seconds", "Unix time of the last successful NVML read."
        )
        if telemetry.last_success is not None:
            last.add_metric(f.label_values(), telemetry.last_success)
        yield last
        target = ["gpu", "uuid"]
        info = f.gauge(
            "gpu_info",
            "GPU (or MIG instance) identity as NVML reports it; constant 1.",
            [*target, "name", "pci_bus_id", "compute_capability"],
        )
        util = f.gauge(
            "gpu_utilization_ratio",
            "Fraction of the last sample period in which a kernel ran on the GPU (0-1).",
            target,
        )
        temp = f.gauge("gpu_temperature_celsius", "GPU core temperature.", target)
        power = f.gauge("gpu_power_watts", "GPU power draw.", target)
        ecc = f.counter(
            "gpu_ecc_errors",
            "ECC memory errors since the driver loaded (NVML volatile counts), by type.",
            [*target, "type"],
        )
        for g in telemetry.snapshot.gpus if telemetry.snapshot else ():
            t = f.label_values(g.gpu, g.uuid)
            info.add_metric([*t, g.name, g.pci_bus_id, g.compute_capability], 1)
            for family, value in ((util, g.utilization), (temp, g.temperature), (power, g.power)):
                if value is not None:
                    family.add_metric(t, value)
            for kind, count in (("corrected", g.ecc_corrected), ("uncorrected", g.ecc_uncorrected)):
                if count is not None:
                    ecc.add_metric([*t, kind], count)
        yield from (info, util, temp, power, ecc)

    def _gpu_memory(
        self, snaps: list[TargetSnapshot], telemetry: TelemetryState
    ) -> Iterator[Metric]:
        """Memory of every GPU and MIG instance NVML reads, and of each probed device NVML does
        not read (absent, off, down: Jetson, a broken driver mount) as its probe saw it."""
        f = self._f
        labels = ["gpu", "uuid", "source"]
        total = f.gauge(
            "gpu_memory_total_bytes",
            "Total memory of the GPU (of a MIG instance: "
            "its share), by source (nvml, or cuda from the probe's own context).",
            labels,
        )
        used = f.gauge(
            "gpu_memory_used_bytes",
            "Memory of the GPU in use by all processes; "
            "source nvml leaves driver-reserved memory out (as nvidia-smi shows it), "
            "source cuda counts it.",
            labels,
        )
        free = f.gauge("gpu_memory_free_bytes", "Free memory of the GPU, by source.", labels)
        rows = [
            (g.gpu, g.uuid, g.memory_total, g.memory_used, g.memory_free, "nvml")
            for g in (telemetry.snapshot.gpus if telemetry.snapshot else ())
        ]
        for snap in snaps:
            if telemetry.gpu(snap.target.uuid) is None:
                memory = device_memory(snap, None, None)
                if memory is not None:
                    rows.append(
                        (
                            snap.target.gpu,
                            snap.target.uuid,
                            memory.total,
                            memory.used,
                            memory.free,
                            memory.source,
                        )
                    )
        for gpu, uuid, total_bytes, used_bytes, free_bytes, source in rows:
            t = f.label_values(gpu, uuid, source)
            total.add_metric(t, total_bytes)
            used.add_metric(t, used_bytes)
            free.add_metric(t, free_bytes)
        yield from (total, used, free)


class TargetCollector(Collector):
    """Everything recorded about one target's probes and worker."""

    def __init__(self, state: TargetState, settings: Settings) -> None:
        self._state = state
        self._f = _Families(settings.constant_labels)
        self._bucket_labels = [*(_go_float(b) for b in state.buckets), "+Inf"]

    def describe(self) -> list[Metric]:
        return []

    def version(self) -> int:
        return self._state.version

    def collect(self) -> Iterator[Metric]:
        yield from self._per_target([self._state.snapshot()])

    def _per_target(self, snaps: list[TargetSnapshot]) -> Iterator[Metric]:
        f = self._f
        target = ["gpu", "uuid"]
        up = f.gauge(
            "up", "1 when the last probe of the target passed, else 0." + _TIMER_NOTE, target
        )
        last_success = f.gauge(
            "last_success_timestamp_seconds",
            "Unix time at which the last passing probe of the target completed.",
            target,
        )
        probes = f.counter(
            "probes",
            "Probes run, by result (success, error, timeout, mismatch)." + _TIMER_NOTE,
            [*target, "result"],
        )
        durations = f.histogram(
            "probe_duration_seconds",
            "Probe latency by phase, for the phases in metrics.histogram_phases (default total): "
            "total is the exporter-measured round trip, h2d/compute/d2h are timed by the backend. "
            "Timed-out probes are not observed.",
            [*target, "phase"],
        )
        # blackbox_exporter's probe_http_duration_seconds{phase}: every phase of the last probe
        # for a series each, where a histogram would cost 22 (metrics.histogram_phases).
        last_phases = f.gauge(
            "last_probe_duration_seconds",
            "Seconds each phase of the target's last probe that returned timings took: total is "
            "the exporter-measured round trip, h2d/compute/d2h as the backend reports them. A "
            "timed-out probe has none; the previous probe's stay.",
            [*target, "phase"],
        )
        error = f.gauge(
            "output_max_abs_error",
            "Largest absolute deviation of the last probe output from the golden output.",
            target,
        )
        failures = f.gauge(
            "consecutive_failures", "Failed probes since the last passing one.", target
        )
        restarts = f.counter(
            "worker_restarts",
            "Probe worker processes replaced, by reason (timeout, crash, error).",
            [*target, "reason"],
        )
        load = f.gauge(
            "engine_load_duration_seconds",
            "Time the current worker took to build or load the probe model.",
            target,
        )
        engine = f.gauge(
            "engine_info",
            "The probe model the target runs; constant 1.",
            [*target, "backend", "model", "precision", "engine_sha256"],
        )
        memory = f.gauge(
            "probe_gpu_memory_bytes",
            "Device memory held by the probe worker on its GPU (NVML per-process where the PID "
            "matches, else the rise in used memory across the worker's own set-up).",
            target,
        )
        mig = f.gauge(
            "mig_info",
            "Where a MIG instance target lives (parent GPU, profile, GPU and compute instance); "
            "constant 1, only for MIG instances. Join on uuid to group by parent or profile.",
            [
                *target,
                "parent_gpu",
                "parent_uuid",
                "profile",
                "gpu_instance_id",
                "compute_instance_id",
            ],
        )
        failure = f.gauge(
            "last_failure_info",
            "Reason code of the most recent failed probe of the target; constant 1.",
            [*target, "reason"],
        )
        for snap in snaps:
            t = f.label_values(snap.target.gpu, snap.target.uuid)
            last = snap.last_probe
            up.add_metric(t, 1 if last is not None and last.result == "success" else 0)
            if snap.last_success is not None:
                last_success.add_metric(t, snap.last_success)
            for result, count in snap.probes_total.items():
                probes.add_metric([*t, result], count)
            for phase, hist in snap.durations.items():
                buckets = list(zip(self._bucket_labels, hist.cumulative, strict=True))
                durations.add_metric([*t, phase], buckets, hist.sum)
            if snap.last_timed_probe is not None:
                for phase, seconds in snap.last_timed_probe.phases.items():
                    last_phases.add_metric([*t, phase], seconds)
            if last is not None and last.max_abs_error is not None:
                error.add_metric(t, last.max_abs_error)
            failures.add_metric(t, snap.consecutive_failures)
            for reason, count in snap.restarts_total.items():
                restarts.add_metric([*t, reason], count)
            if snap.engine_load_seconds is not None:
                load.add_metric(t, snap.engine_load_seconds)
            if snap.engine is not None:
                e = snap.engine
                engine.add_metric([*t, e.backend, e.model, e.precision, e.engine_sha256], 1)
            if snap.gpu_memory is not None:
                memory.add_metric(t, snap.gpu_memory[0])
            placement = snap.target.mig
            if placement is not None:
                mig.add_metric(
                    [
                        *t,
                        placement.parent_gpu,
                        placement.parent_uuid,
                        placement.profile,
                        str(placement.gpu_instance),
                        str(placement.compute_instance),
                    ],
                    1,
                )
            if snap.last_failure is not None and snap.last_failure.reason is not None:
                failure.add_metric([*t, str(snap.last_failure.reason)], 1)
        yield from (
            up,
            last_success,
            probes,
            durations,
            last_phases,
            error,
            failures,
            restarts,
            load,
            engine,
            memory,
            mig,
            failure,
        )


class ClockCollector(Collector):
    """Families computed from the state and the time of the scrape: rendered on every scrape."""

    def __init__(
        self,
        states: Sequence[TargetState],
        settings: Settings,
        clock: Callable[[], float],
        telemetry: Callable[[], TelemetryState],
    ) -> None:
        self._states = states
        self._settings = settings
        self._clock = clock
        self._telemetry = telemetry
        self._f = _Families(settings.constant_labels)

    def describe(self) -> list[Metric]:
        return []

    def values(self) -> list[float]:
        """The values `collect` yields now, in its order: the health statuses, then each
        target's age (exposition.py fills them into a kept rendering)."""
        now = self._clock()
        snaps = [state.snapshot() for state in self._states]
        health = overall_health(target_healths(snaps, now, self._settings, self._telemetry()))
        return [
            *(1.0 if name == health.status else 0.0 for name in STATUSES),
            *(heartbeat_age(snap, now) for snap in snaps),
        ]

    def collect(self) -> Iterator[Metric]:
        f, values = self._f, iter(self.values())
        status = f.gauge(
            "health_status",
            "Overall exporter health as served on /health; exactly one status is 1.",
            ["status"],
        )
        for name in STATUSES:
            status.add_metric(f.label_values(name), next(values))
        yield status
        age = f.gauge(
            "age_seconds",
            "Seconds since the last passing probe, computed at scrape time (since probing began "
            "while none has passed).",
            ["gpu", "uuid"],
        )
        for state in self._states:
            age.add_metric(f.label_values(state.target.gpu, state.target.uuid), next(values))
        yield age
