"""The probe loop: one thread per target, each owning one worker process.

The loop starts the worker, probes every `interval` (with jitter so a fleet does not probe in
lockstep), records every result, and replaces a worker that timed out, crashed or failed, with
exponential backoff. It logs state changes only, never a passing probe.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable

from trt_heartbeat.domain import Target
from trt_heartbeat.errors import Reason
from trt_heartbeat.exporter.config import Settings
from trt_heartbeat.exporter.health import target_healths
from trt_heartbeat.exporter.nvml_poller import NO_TELEMETRY, TelemetryState
from trt_heartbeat.exporter.state import ProbeRecord, TargetState
from trt_heartbeat.exporter.timed_probe import run_probe
from trt_heartbeat.exporter.worker import Worker, WorkerAborted, WorkerFailure, WorkerSpec

log = logging.getLogger("trt_heartbeat")

BACKOFF_INITIAL = 1.0
BACKOFF_MAX = 60.0
# A loop that has not ticked for this long is stuck; /ping then fails so the pod is restarted.
LOOP_STALL_SECONDS = 30.0
# Sleeps are cut into slices only to keep ticking for /ping; stop() wakes a sleep at once.
_SLICE = 5.0
# Between probes the worker's process is watched, so that its death is noticed at once (the
# driver frees its GPU memory then, and NVML may read that before the next probe). Each slice of
# the watch that ends with the process alive proves it was alive then: its loss counts from the
# last such proof. The health log is brought up to date at each slice as well (an NVML reading
# changes /health between probes).
_WATCH = 0.25

WorkerFactory = Callable[[WorkerSpec], Worker]


class TargetLoop:
    def __init__(
        self,
        spec: WorkerSpec,
        state: TargetState,
        settings: Settings,
        *,
        worker_factory: WorkerFactory = Worker,
        wall_clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        telemetry: Callable[[], TelemetryState] = lambda: NO_TELEMETRY,
    ) -> None:
        self.spec = spec
        self._telemetry = telemetry
        self.state = state
        self.settings = settings
        self._worker_factory = worker_factory
        self._wall_clock = wall_clock
        self._rng = rng or random.Random()
        self._stop = threading.Event()
        self._last_tick = time.monotonic()
        self._worker: Worker | None = None
        self._backoff = 0.0
        self._alive_at: float | None = None  # wall clock: the worker last known alive
        self._last_result: tuple[str, str] | None = None
        self._last_health = ""
        self._thread = threading.Thread(
            target=self._run, name=f"probe-loop-{spec.target.gpu}", daemon=True
        )

    @property
    def target(self) -> Target:
        return self.spec.target

    @property
    def worker_pid(self) -> int | None:
        return self._worker.pid if self._worker else None

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def alive(self) -> bool:
        """True while the loop thread runs and ticks (it ticks even while its worker hangs)."""
        stalled = time.monotonic() - self._last_tick > LOOP_STALL_SECONDS
        return self._thread.is_alive() and not stalled

    def _keep_waiting(self) -> bool:
        self._last_tick = time.monotonic()
        return not self._stop.is_set()

    def _sleep_until(self, deadline: float) -> bool:
        """Sleep until `deadline` (monotonic); False once stopped. A worker that dies meanwhile
        ends the sleep at once: the probe that then follows records how it was lost."""
        while self._keep_waiting():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return True
            worker = self._worker
            if worker is None:
                self._stop.wait(min(_SLICE, remaining))
                continue
            if worker.exited(min(_WATCH, remaining)):
                return True
            self._alive_at = self._wall_clock()
            self._log_health()
        return False

    def _fields(self, **extra: object) -> dict[str, object]:
        return {"fields": {"gpu": self.target.gpu, "uuid": self.target.uuid, **extra}}

    def _run(self) -> None:
        try:
            self._loop()
        except WorkerAborted:
            pass
        except Exception:  # a bug here must show in the log and in /ping, not vanish
            log.exception("probe loop crashed", extra=self._fields())
            raise
        finally:
            if self._worker is not None:
                self._worker.close()
                self._worker = None

    def _loop(self) -> None:
        interval, jitter = self.settings.interval, self.settings.jitter
        next_due = time.monotonic() + self._rng.uniform(0, jitter * interval)
        while not self._stop.is_set():
            if self._worker is None:
                if not self._start_worker():
                    continue
                next_due = min(next_due, time.monotonic())
            if not self._sleep_until(next_due):
                return
            self._probe_once()
            next_due += interval * (1 + self._rng.uniform(-jitter, jitter))
            # After a slow probe or a restart, re-anchor instead of firing a burst to catch up.
            next_due = max(next_due, time.monotonic() + interval * (1 - jitter))

    def _start_worker(self) -> bool:
        if self._backoff and not self._sleep_until(time.monotonic() + self._backoff):
            return False
        worker = self._worker_factory(self.spec)
        worker.start()
        try:
            info, seconds = worker.wait_ready(self.settings.startup_timeout, self._keep_waiting)
        except WorkerAborted:
            worker.kill()
            raise
        except WorkerFailure as failure:
            self.state.engine_failed(failure.reason, str(failure))
            result = "timeout" if failure.reason is Reason.STARTUP_TIMEOUT else "error"
            self._record(
                ProbeRecord(self._wall_clock(), result, {}, failure.reason, str(failure)),
                lost=failure.restart_reason,
            )
            return False
        self._worker = worker
        self.state.engine_loaded(info, seconds)
        self._alive_at = self._wall_clock()
        log.info(
            "probe model loaded",
            extra=self._fields(
                backend=info.backend,
                model=info.model,
                precision=info.precision,
                load_seconds=round(seconds, 3),
                pid=worker.pid,
            ),
        )
        self._log_health()
        return True

    def _probe_once(self) -> None:
        assert self._worker is not None
        outcome = run_probe(
            self._worker,
            self.settings.precision,
            self.settings.timeout,
            self._keep_waiting,
            self._wall_clock,
        )
        if outcome.restart_reason is not None:
            self._worker.kill()
            self._worker = None
        else:
            self._alive_at = self._wall_clock()  # it answered
            if outcome.record.result == "success":
                self._backoff = 0.0
        self._record(outcome.record, lost=outcome.restart_reason)

    def _record(self, record: ProbeRecord, lost: str | None = None) -> None:
        """Record a probe (and the loss of its worker, in the same change), log what changed.
        A lost worker is counted gone from the last moment it was known alive."""
        gone_since, self._alive_at = (self._alive_at, None) if lost else (None, self._alive_at)
        self.state.record(record, worker_lost=lost, gone_since=gone_since)
        key = (record.result, str(record.reason or ""))
        if key != self._last_result:
            if record.result == "success":
                log.info(
                    "probe passing" if self._last_result else "first probe passed",
                    extra=self._fields(total_seconds=round(record.phases["total"], 6)),
                )
            else:
                log.warning(
                    "probe failing",
                    extra=self._fields(
                        result=record.result, reason=str(record.reason), message=record.message
                    ),
                )
            self._last_result = key
        if lost is not None:
            self._backoff = min(BACKOFF_MAX, max(BACKOFF_INITIAL, self._backoff * 2))
            log.warning(
                "worker replaced",
                extra=self._fields(restart_reason=lost, backoff_seconds=self._backoff),
            )
        self._log_health()

    def _log_health(self) -> None:
        """Log a change of health, decided as /health decides it: same function, same inputs
        (the GPU's NVML reading included), after every change of the target's state."""
        (health,) = target_healths(
            [self.state.snapshot()], self._wall_clock(), self.settings, self._telemetry()
        )
        label = f"{health.status}/{health.reason}"
        if label != self._last_health:
            level = logging.INFO if health.status == "healthy" else logging.WARNING
            log.log(
                level,
                "target health changed",
                extra=self._fields(
                    status=health.status, reason=health.reason, previous=self._last_health or None
                ),
            )
            self._last_health = label


class Scheduler:
    """Owns the probe loops of all targets."""

    def __init__(self, loops: list[TargetLoop]) -> None:
        self.loops = loops

    @property
    def states(self) -> list[TargetState]:
        return [loop.state for loop in self.loops]

    def start(self) -> None:
        for loop in self.loops:
            loop.start()

    def alive(self) -> bool:
        return bool(self.loops) and all(loop.alive() for loop in self.loops)

    def stop(self, timeout: float = 5.0) -> None:
        for loop in self.loops:
            loop.stop()
        deadline = time.monotonic() + timeout
        for loop in self.loops:
            loop.join(max(0.0, deadline - time.monotonic()))
