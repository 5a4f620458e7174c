"""What the exporter knows about each target, updated by the scheduler, read at scrape time.

Writers hold the lock only to copy a few numbers in; readers take an immutable snapshot. No
lock is ever held while waiting on a worker, so scrapes never queue behind a wedged GPU.
"""

from __future__ import annotations

import bisect
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from trt_heartbeat.domain import (
    BUCKETS,
    HISTOGRAM_PHASES,
    RESTART_REASONS,
    RESULTS,
    EngineInfo,
    Target,
)
from trt_heartbeat.errors import Reason


@dataclass(frozen=True)
class HistogramSnapshot:
    cumulative: tuple[int, ...]  # one count per bucket bound, then +Inf
    sum: float

    @property
    def count(self) -> int:
        return self.cumulative[-1]


class _Histogram:
    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds
        self._counts = [0] * (len(bounds) + 1)
        self._sum = 0.0

    def observe(self, value: float) -> None:
        self._counts[bisect.bisect_left(self._bounds, value)] += 1
        self._sum += value

    def snapshot(self) -> HistogramSnapshot:
        running, cumulative = 0, []
        for n in self._counts:
            running += n
            cumulative.append(running)
        return HistogramSnapshot(tuple(cumulative), self._sum)


@dataclass(frozen=True)
class ProbeRecord:
    timestamp: float  # wall clock at probe start
    result: str  # one of RESULTS
    phases: dict[str, float]  # seconds; "total" measured by the exporter
    reason: Reason | None = None
    message: str = ""
    max_abs_error: float | None = None
    gpu_memory_bytes: int | None = None  # held by the worker, as the backend measured it
    gpu_memory_source: str = ""
    device_memory: tuple[int, int] | None = None  # (free, total) seen from the probe's context


@dataclass(frozen=True)
class TargetSnapshot:
    target: Target
    started_at: float  # when the exporter began probing this target
    first_loaded_at: float | None  # when a worker first held the model; None until then
    engine: EngineInfo | None  # the last model a worker loaded, kept while it is replaced
    loaded: bool  # a worker holds the model now
    engine_load_seconds: float | None
    load_failure: tuple[Reason, str] | None
    last_success: float | None
    last_probe: ProbeRecord | None
    last_failure: ProbeRecord | None
    consecutive_failures: int
    gpu_memory: tuple[int, str] | None  # (bytes, source) from the last probe that measured it
    # (free, total) of the device from the current worker's last probe; None while no worker
    # holds the GPU (a reading of a lost worker's context would be stale).
    device_memory: tuple[int, int] | None
    # When the current worker finished loading, and when the last one was lost (clock time):
    # between the two no probe worker holds GPU memory. The loss counts from the last moment
    # the worker was known alive, not from when it was noticed: its memory is freed at its death.
    # While no worker is loaded, the gap runs on from worker_gone_since.
    worker_since: float | None
    worker_gone_since: float | None
    probes_total: dict[str, int]
    restarts_total: dict[str, int]
    durations: dict[str, HistogramSnapshot]
    # The last probe that returned timings, as the histograms observed it: every probe but a
    # timed-out one (its duration is the timeout) and a model that failed to load (no probe ran).
    last_timed_probe: ProbeRecord | None = None
    history: tuple[ProbeRecord, ...] = field(default=())


class TargetState:
    def __init__(
        self,
        target: Target,
        clock: Callable[[], float],
        history: int = 20,
        buckets: tuple[float, ...] = BUCKETS,
        histogram_phases: tuple[str, ...] = HISTOGRAM_PHASES,
    ) -> None:
        self.target = target
        self.buckets = buckets
        self._histogram_phases = frozenset(histogram_phases)
        self._lock = threading.Lock()
        self._started_at = clock()
        self._first_loaded_at: float | None = None
        self._engine: EngineInfo | None = None
        self._loaded = False
        self._engine_load_seconds: float | None = None
        self._load_failure: tuple[Reason, str] | None = None
        self._last_success: float | None = None
        self._last_probe: ProbeRecord | None = None
        self._last_failure: ProbeRecord | None = None
        self._last_timed_probe: ProbeRecord | None = None
        self._consecutive_failures = 0
        self._gpu_memory: tuple[int, str] | None = None
        self._device_memory: tuple[int, int] | None = None
        self._clock = clock
        self._worker_since: float | None = None
        self._worker_gone_since: float | None = None
        # Every label value starts at zero so rate() and increase() see the first failure.
        self._probes = dict.fromkeys(RESULTS, 0)
        self._restarts = dict.fromkeys(RESTART_REASONS, 0)
        self._durations: dict[str, _Histogram] = {}
        self._history: deque[ProbeRecord] = deque(maxlen=history)
        self._version = 0  # bumped by every change, so renderings of this state can be reused
        self._snapshot: tuple[int, TargetSnapshot] | None = None

    @property
    def version(self) -> int:
        return self._version

    def engine_loaded(self, info: EngineInfo, seconds: float) -> None:
        with self._lock:
            self._engine, self._engine_load_seconds, self._load_failure = info, seconds, None
            self._loaded = True
            self._worker_since = self._clock()
            if self._first_loaded_at is None:
                self._first_loaded_at = self._worker_since
            self._version += 1

    def engine_failed(self, reason: Reason, message: str) -> None:
        with self._lock:
            self._load_failure = reason, message
            self._lose_worker(None)
            self._version += 1

    def record(
        self, probe: ProbeRecord, worker_lost: str | None = None, gone_since: float | None = None
    ) -> None:
        """A probe's outcome; with `worker_lost`, also that its worker is being replaced: one
        change, so that nobody sees the failure with the worker still counted as loaded.
        `gone_since` is the last moment the lost worker was known alive (default: now)."""
        with self._lock:
            if worker_lost is not None:
                self._lose_worker(gone_since)
                self._restarts[worker_lost] += 1
            self._version += 1
            self._probes[probe.result] += 1
            self._last_probe = probe
            self._history.append(probe)
            if probe.device_memory is not None and self._loaded:
                self._device_memory = probe.device_memory
            if probe.gpu_memory_bytes is not None:
                self._gpu_memory = (probe.gpu_memory_bytes, probe.gpu_memory_source)
            if probe.result == "success":
                self._last_success = probe.timestamp + probe.phases.get("total", 0.0)
                self._consecutive_failures = 0
            else:
                self._last_failure = probe
                self._consecutive_failures += 1
            if probe.result != "timeout":  # a timeout's duration is the timeout, not a latency
                if probe.phases:
                    self._last_timed_probe = probe
                for phase, seconds in probe.phases.items():
                    if phase in self._histogram_phases:
                        histogram = self._durations.get(phase) or _Histogram(self.buckets)
                        self._durations[phase] = histogram
                        histogram.observe(seconds)

    def _lose_worker(self, since: float | None) -> None:
        """No worker holds the GPU from `since` on (caller holds the lock). A gap already open
        (a replacement that failed to load) keeps its start: no worker ran in it either."""
        if self._loaded or self._worker_gone_since is None:
            since = self._clock() if since is None else since
            # Not before the worker was there: the gap is the one after it.
            self._worker_gone_since = max(since, self._worker_since or since)
        self._loaded = False
        self._device_memory = None

    def snapshot(self) -> TargetSnapshot:
        with self._lock:
            # Scrapes and /health read far more often than probes write.
            if self._snapshot is not None and self._snapshot[0] == self._version:
                return self._snapshot[1]
            snap = TargetSnapshot(
                target=self.target,
                started_at=self._started_at,
                first_loaded_at=self._first_loaded_at,
                engine=self._engine,
                loaded=self._loaded,
                engine_load_seconds=self._engine_load_seconds,
                load_failure=self._load_failure,
                last_success=self._last_success,
                last_probe=self._last_probe,
                last_failure=self._last_failure,
                consecutive_failures=self._consecutive_failures,
                gpu_memory=self._gpu_memory,
                device_memory=self._device_memory,
                worker_since=self._worker_since,
                worker_gone_since=self._worker_gone_since,
                probes_total=dict(self._probes),
                restarts_total=dict(self._restarts),
                durations={k: h.snapshot() for k, h in self._durations.items()},
                last_timed_probe=self._last_timed_probe,
                history=tuple(self._history),
            )
            self._snapshot = (self._version, snap)
            return snap
