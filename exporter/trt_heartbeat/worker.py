"""Probe worker processes: the only place a backend is imported and run.

Each target gets its own process, started with multiprocessing `spawn` (never `fork`: a forked
CUDA context is unusable, and forking a threaded server copies its locks). The parent talks to it
over a pipe and never blocks on it for longer than a short slice, so a wedged GPU can freeze the
worker but never the exporter.
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

from .backends import BackendOptions, EngineInfo, RunResult, Target, load_backend
from .errors import BackendError, Reason
from .gpus import visible_devices

_SLICE = 0.1  # seconds between liveness checks while waiting on a worker
# A probe answers within a few hundred µs; sleeping in poll() at once adds the scheduler's wake-up
# latency to every measured round trip (30-40 µs on the 2-vCPU development machine), so poll
# without sleeping first.
_SPIN = 0.0005
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


class WorkerFailure(Exception):
    """The worker is gone or unusable; `restart_reason` labels worker_restarts_total."""

    def __init__(self, reason: Reason, restart_reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.restart_reason = restart_reason


class WorkerAborted(Exception):
    """The caller asked to stop waiting (shutdown)."""


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".strip().rstrip(":")


def worker_main(conn: multiprocessing.connection.Connection, spec: WorkerSpec) -> None:
    """Entry point of the worker process."""
    # The parent owns shutdown; a Ctrl-C delivered to the process group must not race it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
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
        conn.send(("load_failed", exc.reason, str(exc)))
        return
    except Exception as exc:
        conn.send(("load_failed", Reason.ENGINE_LOAD_FAILED, _describe(exc)))
        return
    conn.send(("ready", info, time.perf_counter() - start))
    try:
        while True:
            try:
                command = conn.recv()
            except EOFError:
                return
            if command != "probe":
                return
            try:
                conn.send(_pack(backend.run()))
            except BackendError as exc:
                conn.send(("error", exc.reason, str(exc), exc.fatal))
            except Exception as exc:
                # Unknown failure: the backend's state cannot be trusted any more.
                detail = traceback.format_exception_only(type(exc), exc)[-1].strip()
                conn.send(("error", Reason.PROBE_ERROR, detail, True))
    finally:
        backend.close()


def _pack(result: RunResult) -> tuple[Any, ...]:
    # Plain values instead of the pickled dataclass and array: that pickle cost ~50 µs more per
    # round trip on the 2-vCPU development machine, more than a probe's GPU phases take.
    out = np.ascontiguousarray(result.output)
    return ("ok", out.tobytes(), out.dtype.str, out.shape, tuple(result.phases.items()),
            result.gpu_memory_bytes, result.gpu_memory_source, result.device_memory)  # fmt: skip


def _unpack(message: tuple[Any, ...]) -> RunResult:
    _, data, dtype, shape, phases, memory, source, device = message
    output = np.frombuffer(data, dtype).reshape(shape)
    return RunResult(output, dict(phases), memory, source, device)


class Worker:
    """Parent-side handle of one worker process."""

    def __init__(self, spec: WorkerSpec, context: Any = None) -> None:
        self.spec = spec
        self._ctx = context or multiprocessing.get_context("spawn")
        self._process: multiprocessing.process.BaseProcess | None = None
        self._conn: multiprocessing.connection.Connection | None = None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def start(self) -> None:
        parent_conn, child_conn = self._ctx.Pipe()
        process = self._ctx.Process(
            target=worker_main,
            args=(child_conn, self.spec),
            name=f"trt-heartbeat-worker-{self.spec.target.gpu}",
            daemon=True,
        )
        process.start()
        child_conn.close()
        self._process, self._conn = process, parent_conn

    def wait_ready(
        self, timeout: float, keep_waiting: Callable[[], bool]
    ) -> tuple[EngineInfo, float]:
        """Wait for the backend to load; returns its EngineInfo and load time in seconds."""
        message = self._receive(timeout, keep_waiting, Reason.STARTUP_TIMEOUT, "startup")
        if message[0] == "ready":
            return message[1], message[2]
        self.kill()
        raise WorkerFailure(message[1], "error", message[2])

    def probe(self, timeout: float, keep_waiting: Callable[[], bool]) -> ProbeReply:
        assert self._conn is not None
        try:
            self._conn.send("probe")
        except (BrokenPipeError, OSError) as exc:
            raise self._crashed(f"worker pipe closed: {exc}") from exc
        message = self._receive(timeout, keep_waiting, Reason.TIMEOUT, "timeout")
        if message[0] == "ok":
            return ProbeReply(result=_unpack(message))
        _, reason, text, fatal = message
        return ProbeReply(result=None, reason=reason, message=text, fatal=fatal)

    def _receive(
        self, timeout: float, keep_waiting: Callable[[], bool], late: Reason, restart_reason: str
    ) -> tuple[Any, ...]:
        assert self._conn is not None and self._process is not None
        deadline = time.monotonic() + timeout
        spin_until = time.perf_counter() + _SPIN
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.kill()
                raise WorkerFailure(late, restart_reason, f"no answer within {timeout:g}s")
            wait = 0.0 if time.perf_counter() < spin_until else min(_SLICE, remaining)
            try:
                if self._conn.poll(wait):
                    message: tuple[Any, ...] = self._conn.recv()
                    return message
            except (EOFError, OSError) as exc:
                raise self._crashed(f"worker pipe closed: {exc}") from exc
            if wait == 0.0:
                continue
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
        if self._conn is not None:
            with contextlib.suppress(BrokenPipeError, OSError):
                self._conn.send("close")
        self._process.join(_CLOSE_GRACE)
        self.kill()

    def kill(self) -> None:
        process, conn = self._process, self._conn
        self._process = self._conn = None
        reap(process, conn)


def reap(
    process: multiprocessing.process.BaseProcess | None,
    conn: multiprocessing.connection.Connection | None,
) -> None:
    """SIGKILL a child and release it: works on a stopped or wedged process where asking cannot."""
    if process is not None:
        if process.is_alive():
            process.kill()
        process.join(_CLOSE_GRACE)
        # A process stuck in the driver (D state) may outlive SIGKILL; leave it to the kernel
        # rather than block the caller on it.
        if process.exitcode is not None:
            process.close()
    if conn is not None:
        conn.close()
