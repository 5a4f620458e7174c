"""Synthetic fleet history for canary-judge tests, rendered by the exporter's own collectors.

Each simulated target is a real `TargetState` fed probe records at simulated times and scraped
every `scrape_interval` by the real `TargetCollector`; the scrapes are written as OpenMetrics
with timestamps, the labels Prometheus would add (job, instance, track, scenario) and a
`trt_heartbeat_gpu_info` series, for `promtool tsdb create-blocks-from openmetrics`.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from conftest import settings
from trt_heartbeat.domain import HISTOGRAM_PHASES, EngineInfo, Target
from trt_heartbeat.exporter.collector import TargetCollector
from trt_heartbeat.exporter.state import ProbeRecord, TargetState

Latency = Callable[[random.Random], float]
# family name -> (header lines, {series text before the value: [(time, value)]})
Families = dict[str, tuple[list[str], dict[str, list[tuple[float, float]]]]]


def lognormal(median: float, sigma: float) -> Latency:
    return lambda rng: median * math.exp(rng.gauss(0.0, sigma))


@dataclass(frozen=True)
class Track:
    """Targets of one track in one scenario: `targets` GPUs of `model` on one instance."""

    scenario: str
    track: str
    model: str
    latency: Latency
    targets: int = 2
    probe_interval: float = 10.0
    failure_every: int = 0  # every Nth probe fails with an error (0: never)
    mismatch_at: tuple[int, ...] = ()  # probe numbers that return a wrong answer
    memory_mib: int = 258
    engine_load_s: float = 1.2
    start_offset: float = 0.0  # seconds after the history begins that probing starts
    histogram_phases: tuple[str, ...] = HISTOGRAM_PHASES  # the exporters' metrics setting


@dataclass
class History:
    start: float
    duration: float
    scrape_interval: float = 15.0
    tracks: list[Track] = field(default_factory=list)

    @property
    def end(self) -> float:
        return self.start + self.duration

    def write(self, path: Path, seed: int = 7) -> None:
        rng = random.Random(seed)
        families: Families = {}
        for i, track in enumerate(self.tracks):
            instance = f"{track.scenario}-{track.track}-{i}:9470"
            extra = {
                "job": "trt-heartbeat",
                "instance": instance,
                "track": track.track,
                "scenario": track.scenario,
            }
            for g in range(track.targets):
                self._simulate(track, g, extra, rng, families)
        lines = []
        for header, series in families.values():
            lines.extend(header)
            for prefix, points in series.items():
                lines.extend(f"{prefix} {_num(v)} {t:.3f}" for t, v in points)
        lines.append("# EOF")
        path.write_text("\n".join(lines) + "\n")

    def _simulate(
        self, track: Track, g: int, extra: dict[str, str], rng: random.Random, families: Families
    ) -> None:
        target = Target(str(g), f"GPU-{track.scenario}-{track.track}-{g}")
        clock_now = [self.start]
        state = TargetState(target, lambda: clock_now[0], histogram_phases=track.histogram_phases)
        s = settings(backend="reference", interval=10, timeout=5)
        collector = TargetCollector(state, s)
        registry = CollectorRegistry(auto_describe=False)
        registry.register(collector)
        engine = EngineInfo("tensorrt", "fp32", "canonical-mlp-v1@75169a163420")
        probe_at = self.start + track.start_offset + rng.uniform(0, track.probe_interval)
        n = 0
        t = self.start + rng.uniform(0, self.scrape_interval)
        loaded = False
        while t < self.end:
            while probe_at <= t:
                if not loaded:
                    state.engine_loaded(engine, track.engine_load_s)
                    loaded = True
                n += 1
                state.record(self._probe(track, n, probe_at, rng))
                probe_at += track.probe_interval
            clock_now[0] = t
            if loaded:
                self._scrape(t, generate_latest(registry).decode(), extra, families)
                info = {
                    **extra,
                    "gpu": target.gpu,
                    "uuid": target.uuid,
                    "name": track.model,
                    "pci_bus_id": f"00000000:{g:02X}:00.0",
                    "compute_capability": "9.0",
                }
                name = "trt_heartbeat_gpu_info"
                _add(families, name, "gauge", name, info, t, 1.0)
            t += self.scrape_interval

    @staticmethod
    def _probe(track: Track, n: int, at: float, rng: random.Random) -> ProbeRecord:
        total = track.latency(rng)
        phases = {"total": total, "compute": total / 3}
        memory = track.memory_mib << 20
        if track.failure_every and n % track.failure_every == 0:
            return ProbeRecord(at, "error", phases, None, "injected", None, memory, "nvml")
        if n in track.mismatch_at:
            return ProbeRecord(at, "mismatch", phases, None, "injected", 0.5, memory, "nvml")
        return ProbeRecord(
            at, "success", phases, None, "", 1e-7 * (1 + rng.random()), memory, "nvml"
        )

    @staticmethod
    def _scrape(t: float, text: str, extra: dict[str, str], families: Families) -> None:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                _add(
                    families,
                    family.name,
                    family.type,
                    sample.name,
                    {**extra, **sample.labels},
                    t,
                    sample.value,
                )


def _add(
    families: Families,
    family: str,
    kind: str,
    name: str,
    labels: dict[str, str],
    t: float,
    value: float,
) -> None:
    if family not in families:
        families[family] = ([f"# TYPE {family} {kind}"], defaultdict(list))
    body = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(labels.items()))
    families[family][1][f"{name}{{{body}}}"].append((t, value))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _num(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))
