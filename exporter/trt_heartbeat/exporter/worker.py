"""Probe worker processes: the only place a backend is imported and run.

Each target gets its own process, started with multiprocessing `spawn` (never `fork`: a forked
CUDA context is unusable, and forking a threaded server copies its locks). The parent talks to it
over a pipe (channel.py) and never blocks on it for longer than a short slice, so a wedged GPU can
freeze the worker but never the exporter.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.connection
import os
import signal
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from trt_heartbeat.domain import EngineInfo, Target
from trt_heartbeat.errors import BackendError, Reason
from trt_heartbeat.exporter.backends import (
    Backend,
    BackendOptions,
    MemoryReading,
    RunResult,
    load_backend,
)
from trt_heartbeat.exporter.channel import Channel
from trt_heartbeat.exporter.child import reap, spawn
from trt_heartbeat.exporter.gpus import visible_devices

_SLICE = 0.1  # seconds between liveness checks while waiting on a worker
# An answer due within microseconds is waited for without sleeping first: a sleeping wait adds
# the scheduler's wake-up latency (tens of µs) to it.
_SPIN = 0.0005
# A woken worker waits this long for its probe request without sleeping (it comes at once).
_WAKE_SPIN = 0.01
_CLOSE_GRACE = 2.0  # seconds a worker gets to release its GPU before it is killed


@dataclass(frozen=True)
class WorkerSpec:
    backend_spec: str
    target: Target
    precision: str
    options: BackendOptions = field(default_factory=BackendOptions)
    bind_gpu: bool = False  # restrict the worker to its target's GPU


@dataclass(frozen=True)
class ProbeReply:
    """What the worker answered to one probe request."""

    result: RunResult | None
    reason: Reason | None = None
    message: str = ""
    fatal: bool = False
    memory: MemoryReading = field(default_factory=MemoryReading)
    # From the request to its answer, with the worker already awake (see Worker.probe).
    seconds: float = 0.0


class WorkerFailure(Exception):
    """The worker is gone or unusable; `restart_reason` labels worker_restarts_total."""

    def __init__(self, reason: Reason, restart_reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.restart_reason = restart_reason


class WorkerAborted(Exception):
    """The caller asked to stop waiting (shutdown)."""


@dataclass(frozen=True)
class _Deadline:
    """When waiting on the worker ends, and what a wait past it means."""

    seconds: float
    late: Reason
    restart_reason: str
    at: float = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "at", time.monotonic() + self.seconds)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".strip().rstrip(":")


def worker_main(conn: multiprocessing.connection.Connection, spec: WorkerSpec) -> None:
    """Entry point of the worker process."""
    # The parent owns shutdown; a Ctrl-C delivered to the process group must not race it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    channel = Channel(conn.fileno())  # `conn` owns the pipe and stays open while this runs
    if spec.bind_gpu:
        # Before any CUDA library loads: the worker sees its own GPU, as device 0, and no other.
        os.environ["CUDA_VISIBLE_DEVICES"] = visible_devices(spec.target)
        os.environ.setdefault("CUDA_MODULE_LOADING", "LAZY")
    start = time.perf_counter()
    try:
        factory = load_backend(spec.backend_spec)
        backend = factory(spec.target, spec.precision, spec.options)
        info = backend.prepare()
    except BackendError as exc:
        channel.send(("load_failed", exc.reason, str(exc)))
        return
    except Exception as exc:
        channel.send(("load_failed", Reason.ENGINE_LOAD_FAILED, _describe(exc)))
        return
    channel.send(("ready", info, time.perf_counter() - start))
    try:
        while True:
            try:
                command = channel.recv()
            except EOFError:
                return
            if command == "wake":
                channel.send("awake")
                channel.spin(_WAKE_SPIN)
            elif command == "probe":
                answer = _run(backend)
                channel.send(answer)
                if answer[0] == "ok":
                    channel.send(("memory", _memory(backend)))
            else:
                return
    finally:
        backend.close()


def _run(backend: Backend) -> tuple[Any, ...]:
    try:
        return _pack(backend.run())
    except BackendError as exc:
        return ("error", exc.reason, str(exc), exc.fatal)
    except Exception as exc:
        # Unknown failure: the backend's state cannot be trusted any more.
        detail = traceback.format_exception_only(type(exc), exc)[-1].strip()
        return ("error", Reason.PROBE_ERROR, detail, True)


def _memory(backend: Backend) -> MemoryReading:
    # A device that fails here fails the next probe too, which says why; the reading is only
    # left out.
    try:
        return backend.memory()
    except Exception:
        return MemoryReading()


def _pack(result: RunResult) -> tuple[Any, ...]:
    # Plain values instead of the pickled dataclass and array: that pickle cost more per round
    # trip than a probe's GPU phases take (docs/performance.md).
    out = np.ascontiguousarray(result.output)
    return ("ok", out.tobytes(), out.dtype.str, out.shape, tuple(result.phases.items()))


def _unpack(message: tuple[Any, ...]) -> RunResult:
    _, data, dtype, shape, phases = message
    return RunResult(np.frombuffer(data, dtype).reshape(shape), dict(phases))


class Worker:
    """Parent-side handle of one worker process."""

    def __init__(self, spec: WorkerSpec, context: Any = None) -> None:
        self.spec = spec
        self._ctx = context or multiprocessing.get_context("spawn")
        self._process: multiprocessing.process.BaseProcess | None = None
        self._conn: multiprocessing.connection.Connection | None = None  # owns the pipe
        self._channel: Channel | None = None  # reads and writes it

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def exited(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for the worker process to end; True once it has (or
        where none runs). Wakes as soon as the process exits, so a killed worker is noticed at
        once rather than at the next probe."""
        if self._process is None:
            return True
        return bool(multiprocessing.connection.wait([self._process.sentinel], max(0.0, timeout)))

    def start(self) -> None:
        name = f"trt-heartbeat-worker-{self.spec.target.gpu}"
        process, parent_conn = spawn(worker_main, (self.spec,), name, self._ctx)
        self._process, self._conn = process, parent_conn
        self._channel = Channel(parent_conn.fileno())

    def wait_ready(
        self, timeout: float, keep_waiting: Callable[[], bool]
    ) -> tuple[EngineInfo, float]:
        """Wait for the backend to load; returns its EngineInfo and load time in seconds."""
        deadline = _Deadline(timeout, Reason.STARTUP_TIMEOUT, "timeout")
        message = self._receive(deadline, keep_waiting)
        if message[0] == "ready":
            return message[1], message[2]
        self.kill()
        raise WorkerFailure(message[1], "error", message[2])

    def probe(self, timeout: float, keep_waiting: Callable[[], bool]) -> ProbeReply:
        """One probe. The worker, idle since its last probe, is woken first and the clock
        starts once it is awake: the answer's time is the probe's, not the scheduler's latency
        in waking a sleeping process (which a GPU's health does not change). `timeout` bounds
        the whole exchange."""
        deadline = _Deadline(timeout, Reason.TIMEOUT, "timeout")
        self._send("wake")
        self._expect(self._receive(deadline, keep_waiting), "awake")
        started = time.perf_counter()
        self._send("probe")
        message = self._receive(deadline, keep_waiting)
        seconds = time.perf_counter() - started
        if self._expect(message, "ok", "error") == "error":
            _, reason, text, fatal = message
            return ProbeReply(None, reason, text, fatal, seconds=seconds)
        memory = self._receive(deadline, keep_waiting)
        self._expect(memory, "memory")
        return ProbeReply(_unpack(message), memory=memory[1], seconds=seconds)

    def _expect(self, message: Any, *kinds: str) -> str:
        """The kind of `message`, one of `kinds`; anything else means the two ends are out of
        step, and only a new worker puts them back in it."""
        kind = message if isinstance(message, str) else message[0]
        if kind not in kinds:
            self.kill()
            detail = f"worker answered {kind!r}, expected {' or '.join(kinds)}"
            raise WorkerFailure(Reason.WORKER_CRASH, "crash", detail)
        return str(kind)

    def _send(self, command: str) -> None:
        assert self._channel is not None
        try:
            self._channel.send(command)
        except OSError as exc:
            raise self._crashed(f"worker pipe closed: {exc}") from exc

    def _receive(self, deadline: _Deadline, keep_waiting: Callable[[], bool]) -> tuple[Any, ...]:
        assert self._channel is not None
        try:
            self._wait(deadline, keep_waiting)
            message: tuple[Any, ...] = self._channel.recv()
        except (EOFError, OSError) as exc:
            raise self._crashed(f"worker pipe closed: {exc}") from exc
        return message

    def _wait(self, deadline: _Deadline, keep_waiting: Callable[[], bool]) -> None:
        channel = self._channel
        assert channel is not None and self._process is not None
        if channel.spin(_SPIN):
            return
        while True:
            remaining = deadline.at - time.monotonic()
            if remaining <= 0:
                self.kill()
                raise WorkerFailure(
                    deadline.late,
                    deadline.restart_reason,
                    f"no answer within {deadline.seconds:g}s",
                )
            if channel.poll(min(_SLICE, remaining)):
                return
            if not self._process.is_alive():
                raise self._crashed("worker exited")
            if not keep_waiting():
                raise WorkerAborted()

    def _crashed(self, detail: str) -> WorkerFailure:
        assert self._process is not None
        self._process.join(_CLOSE_GRACE)
        code = self._process.exitcode
        self.kill()
        if code is not None and code < 0:
            try:
                detail = f"worker killed by {signal.Signals(-code).name}"
            except ValueError:
                detail = f"worker killed by signal {-code}"
        elif code is not None:
            detail = f"worker exited with code {code}"
        return WorkerFailure(Reason.WORKER_CRASH, "crash", detail)

    def close(self) -> None:
        """Ask the worker to release its backend, then make sure it is gone."""
        if self._process is None:
            return
        if self._channel is not None:
            with contextlib.suppress(OSError):
                self._channel.send("close")
        self._process.join(_CLOSE_GRACE)
        self.kill()

    def kill(self) -> None:
        process, conn = self._process, self._conn
        self._process = self._conn = self._channel = None
        reap(process, conn)
