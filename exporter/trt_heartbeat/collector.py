"""A custom Collector: fresh metric families at scrape time from the latest target snapshots.

Nothing here waits on a worker or touches a GPU; a scrape costs a few lock acquisitions and
string formatting, whatever state the probes are in.
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

from . import __version__
from .config import Settings
from .health import STATUSES, heartbeat_age, overall_health, target_health
from .state import BUCKETS, TargetSnapshot, TargetState

PREFIX = "trt_heartbeat"
# build_info labels filled from what the worker reports about the stack it runs on.
STACK_VERSIONS = ("tensorrt_version", "cuda_driver_version", "driver_version")
_go_float = cast(Callable[[float], str], floatToGoString)  # untyped in client_python
_BUCKET_LABELS = [*(_go_float(b) for b in BUCKETS), "+Inf"]
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


class HeartbeatCollector(Collector):
    def __init__(
        self,
        states: Sequence[TargetState],
        settings: Settings,
        backend: str,
        clock: Callable[[], float],
    ) -> None:
        self._states = states
        self._settings = settings
        self._backend = backend
        self._clock = clock
        self._f = _Families(settings.constant_labels)

    def describe(self) -> list[Metric]:
        # Families vary with state (series appear after the first probe); let the registry
        # skip describe-time collection instead of probing an empty snapshot.
        return []

    def collect(self) -> Iterator[Metric]:
        now = self._clock()
        snaps = [state.snapshot() for state in self._states]
        yield from self._config_gauges()
        yield self._build_info(snaps)
        yield self._health_status(snaps, now)
        yield from self._per_target(snaps, now)

    def _config_gauges(self) -> Iterator[Metric]:
        f, s = self._f, self._settings
        for name, value, doc in (
            ("interval_seconds", s.interval, "Configured time between two probes of a target."),
            ("timeout_seconds", s.timeout, "Configured time a probe may take before it counts "
             "as a timeout and its worker is replaced."),
            ("max_age_seconds", s.max_age, "Configured heartbeat age beyond which a target is "
             "unhealthy."),
            ("latency_objective_seconds", s.latency_objective, "Configured probe latency "
             "objective; slower passing probes make a target degraded."),
        ):  # fmt: skip
            family = f.gauge(name, doc)
            family.add_metric(f.label_values(), value)
            yield family

    def _build_info(self, snaps: list[TargetSnapshot]) -> Metric:
        f = self._f
        versions: dict[str, str] = {}
        for snap in snaps:
            if snap.engine is not None:
                versions = {**snap.engine.versions, **versions}
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

    def _health_status(self, snaps: list[TargetSnapshot], now: float) -> Metric:
        f = self._f
        health = overall_health([target_health(s, now, self._settings) for s in snaps])
        family = f.gauge(
            "health_status",
            "Overall exporter health as served on /health; exactly one status is 1.",
            ["status"],
        )
        for status in STATUSES:
            family.add_metric(f.label_values(status), 1 if status == health.status else 0)
        return family

    def _per_target(self, snaps: list[TargetSnapshot], now: float) -> Iterator[Metric]:
        f = self._f
        target = ["gpu", "uuid"]
        up = f.gauge("up", "1 when the last probe of the target passed, else 0." + _TIMER_NOTE,
                     target)  # fmt: skip
        last_success = f.gauge(
            "last_success_timestamp_seconds",
            "Unix time at which the last passing probe of the target completed.",
            target,
        )
        age = f.gauge(
            "age_seconds",
            "Seconds since the last passing probe, computed at scrape time (since probing began "
            "while none has passed).",
            target,
        )
        probes = f.counter(
            "probes",
            "Probes run, by result (success, error, timeout, mismatch)." + _TIMER_NOTE,
            [*target, "result"],
        )
        durations = f.histogram(
            "probe_duration_seconds",
            "Probe latency by phase: total is the exporter-measured round trip, h2d/compute/d2h "
            "are timed by the backend. Timed-out probes are not observed.",
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
            age.add_metric(t, heartbeat_age(snap, now))
            for result, count in snap.probes_total.items():
                probes.add_metric([*t, result], count)
            for phase, hist in snap.durations.items():
                buckets = list(zip(_BUCKET_LABELS, hist.cumulative, strict=True))
                durations.add_metric([*t, phase], buckets, hist.sum)
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
            if snap.last_failure is not None and snap.last_failure.reason is not None:
                failure.add_metric([*t, str(snap.last_failure.reason)], 1)
        yield from (up, last_success, age, probes, durations, error, failures, restarts, load,
                    engine, memory, failure)  # fmt: skip
