"""The PromQL canary-judge runs, built from the user's selector, and what it reads back.

Every comparison is made per GPU model, joined from `trt_heartbeat_gpu_info` the same way the
rule pack's `instance_gpu:trt_heartbeat_gpu_model:info` does ("unknown" without NVML), but over
the judged window and without depending on the rule pack being installed.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from trt_heartbeat.canary.judge.prometheus import PrometheusClient
from trt_heartbeat.canary.promql import LABEL_NAME, bad_matcher, quote
from trt_heartbeat.errors import HeartbeatError

PLOT_POINTS = 120  # range-query steps across the window for the plot and the gauges


class SelectorError(HeartbeatError):
    """A --selector or label flag that cannot be used in PromQL."""


class PhaseNotExported(HeartbeatError):
    """A track's exporters ran probes but export no histogram of the --phase: a setting, not a
    verdict (waiting would never bring the data)."""


@dataclass(frozen=True)
class Scope:
    window: float  # seconds
    at: float  # unix time the window ends
    selector: str = ""  # label matchers, without braces
    track_label: str = "track"
    canary: str = "canary"
    baseline: str = "stable"
    phase: str = "total"

    @property
    def tracks(self) -> tuple[str, str]:
        return self.canary, self.baseline

    def matchers(self, *extra: str) -> str:
        """The braces of a series selector: the user's matchers, the tracks, any extra."""
        values = "|".join(re.escape(t).replace("\\", "\\\\") for t in self.tracks)
        parts = [*extra, self.selector, f'{self.track_label}=~"{values}"']
        return "{" + ", ".join(p for p in parts if p) + "}"

    @property
    def range(self) -> str:
        return f"[{duration(self.window)}]"


def parse_selector(text: str, flag: str = "--selector") -> str:
    """`{a="b", c=~"d"}` or `a="b", c=~"d"` to the inner matchers; one clear error if malformed."""
    inner = text.strip()
    if inner.startswith("{"):
        if not inner.endswith("}"):
            raise SelectorError(f"{flag}: missing closing brace in {text!r}")
        inner = inner[1:-1].strip()
    if not inner:
        return ""
    bad = bad_matcher(inner)
    if bad is not None:
        raise SelectorError(f'{flag}: {bad!r} is not a label matcher like name="value"')
    return inner


def check_label_name(flag: str, name: str) -> str:
    if not LABEL_NAME.match(name):
        raise SelectorError(f"{flag}: {name!r} is not a Prometheus label name")
    return name


def duration(seconds: float) -> str:
    return f"{int(seconds)}s" if seconds == int(seconds) else f"{int(seconds * 1000)}ms"


def gpu_model(scope: Scope) -> str:
    """One series per (job, instance, gpu) carrying `gpu_model`."""
    m, r = scope.matchers(), scope.range
    return (
        "max by (job, instance, gpu, gpu_model) (label_replace("
        f'last_over_time(trt_heartbeat_gpu_info{m}{r}), "gpu_model", "$1", "name", "(.+)"))'
        " or on (job, instance, gpu) max by (job, instance, gpu, gpu_model) (label_replace("
        f'last_over_time(trt_heartbeat_up{m}{r}), "gpu_model", "unknown", "", ""))'
    )


def _with_model(expr: str, scope: Scope) -> str:
    """`expr`, one series per target, labelled with the GPU model of its target."""
    return f"{expr} * on (job, instance, gpu) group_left (gpu_model) ({gpu_model(scope)})"


def _by_model(expr: str, scope: Scope, by: str) -> str:
    return f"sum by ({scope.track_label}, gpu_model{by}) ({_with_model(f'({expr})', scope)})"


def _buckets(scope: Scope) -> str:
    phase = "phase=" + quote(scope.phase)
    return f"trt_heartbeat_probe_duration_seconds_bucket{scope.matchers(phase)}"


def latency_buckets(scope: Scope) -> str:
    series = _buckets(scope)
    return _by_model(f"increase({series}{scope.range})", scope, ", le")


def probe_counts(scope: Scope) -> str:
    return _by_model(
        f"increase(trt_heartbeat_probes_total{scope.matchers()}{scope.range})", scope, ", result"
    )


def per_series(metric: str, scope: Scope, over_time: str) -> str:
    """A gauge per target over the window, labelled with its GPU model (instant query)."""
    return _with_model(f"{over_time}({metric}{scope.matchers()}{scope.range})", scope)


def gauge_samples(metric: str, scope: Scope) -> str:
    """A gauge per target at each step of a range query across the window."""
    return _with_model(f"{metric}{scope.matchers()}", scope)


def quantile_over_time(q: float, scope: Scope, step: float) -> str:
    series = _buckets(scope)
    rate_window = duration(max(60.0, 4 * step))
    return (
        f"histogram_quantile({q:g}, sum by ({scope.track_label}, le) "
        f"(rate({series}[{rate_window}])))"
    )


# --- what comes back --------------------------------------------------------------------------

Key = tuple[str, str]  # (gpu model, track)


@dataclass
class Observations:
    """Everything the checks compare, per (GPU model, track)."""

    bounds: list[float] = field(default_factory=list)  # bucket upper bounds, +Inf last
    buckets: dict[Key, list[float]] = field(default_factory=dict)  # per-bin counts
    results: dict[Key, dict[str, int]] = field(default_factory=dict)  # probes by result
    deviation: dict[Key, list[float]] = field(default_factory=dict)  # output error samples
    memory: dict[Key, list[float]] = field(default_factory=dict)  # max per target
    engine_load: dict[Key, list[float]] = field(default_factory=dict)  # max per target
    promql: dict[str, str] = field(default_factory=dict)  # check input -> query

    def bins(self, key: Key) -> list[float]:
        """Counts per bucket; all zero for a track that observed no latency (only timeouts)."""
        return self.buckets.get(key, [0.0] * len(self.bounds))

    def models(self) -> set[str]:
        return {model for model, _ in [*self.buckets, *self.results]}


def observe(client: PrometheusClient, scope: Scope) -> Observations:
    obs = Observations()
    track = scope.track_label
    start, step = scope.at - scope.window, max(1.0, scope.window / PLOT_POINTS)

    obs.promql["latency"] = expr = latency_buckets(scope)
    cumulative: dict[Key, dict[float, float]] = defaultdict(dict)
    for s in client.query(expr, scope.at):
        le = float(s.labels.get("le", "nan"))
        if not math.isnan(le):
            cumulative[(s.labels.get("gpu_model", "unknown"), s.labels[track])][le] = s.values[0][1]
    obs.bounds, obs.buckets = bins(cumulative)

    obs.promql["probes"] = expr = probe_counts(scope)
    for s in client.query(expr, scope.at):
        key = (s.labels.get("gpu_model", "unknown"), s.labels[track])
        obs.results.setdefault(key, {})[s.labels.get("result", "")] = round(s.values[0][1])

    _check_phase_exported(obs, scope)

    deviation = "trt_heartbeat_output_max_abs_error"
    obs.promql["output_deviation"] = expr = gauge_samples(deviation, scope)
    for s in client.query_range(expr, start, scope.at, step):
        key = (s.labels.get("gpu_model", "unknown"), s.labels[track])
        obs.deviation.setdefault(key, []).extend(v for _, v in s.values if math.isfinite(v))

    for name, metric, target in (
        ("gpu_memory", "trt_heartbeat_probe_gpu_memory_bytes", obs.memory),
        ("engine_load", "trt_heartbeat_engine_load_duration_seconds", obs.engine_load),
    ):
        obs.promql[name] = expr = per_series(metric, scope, "max_over_time")
        for s in client.query(expr, scope.at):
            key = (s.labels.get("gpu_model", "unknown"), s.labels[track])
            target.setdefault(key, []).append(s.values[0][1])
    return obs


def _check_phase_exported(obs: Observations, scope: Scope) -> None:
    """Refuse a --phase whose histogram a probing track does not export at all. `total` always
    has one (the exporter refuses a setting without it); the other phases only where
    `metrics.histogram_phases` includes them, which by default it does not."""
    if scope.phase == "total":
        return
    probing = {track for (_, track), counts in obs.results.items() if sum(counts.values()) > 0}
    observed = {track for _, track in obs.buckets}
    for track in scope.tracks:
        if track in probing and track not in observed:
            raise PhaseNotExported(
                f"--phase: no trt_heartbeat_probe_duration_seconds data for phase "
                f'"{scope.phase}" from {scope.track_label}={track!r}, whose probes ran: the '
                "exporters export that phase's histogram only with metrics.histogram_phases "
                "including it (default: total only) and a backend that times it"
            )


def bins(cumulative: dict[Any, dict[float, float]]) -> tuple[list[float], dict[Any, list[float]]]:
    """Cumulative buckets per key to counts per bin, over one common, sorted set of bounds.

    increase() extrapolates to the window's edges: counts are rounded to whole observations, and
    a bucket never drops below the one before it.
    """
    bounds = sorted({le for per in cumulative.values() for le in per})
    out = {}
    for key, per in cumulative.items():
        running, counts = 0.0, []
        for le in bounds:
            value = max(running, float(round(per.get(le, running))))
            counts.append(value - running)
            running = value
        out[key] = counts
    return bounds, out


@dataclass(frozen=True)
class Timeline:
    """Per-track latency quantiles across the window, for the plot."""

    quantiles: dict[tuple[str, float], list[tuple[float, float]]]  # (track, q) -> points


def timeline(client: PrometheusClient, scope: Scope) -> Timeline:
    start, step = scope.at - scope.window, max(1.0, scope.window / PLOT_POINTS)
    out: dict[tuple[str, float], list[tuple[float, float]]] = {}
    for q in (0.5, 0.99):
        for s in client.query_range(quantile_over_time(q, scope, step), start, scope.at, step):
            points = [(t, v) for t, v in s.values if math.isfinite(v)]
            out[(s.labels.get(scope.track_label, ""), q)] = points
    return Timeline(out)
