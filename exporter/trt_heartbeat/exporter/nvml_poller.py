"""GPU telemetry on its own schedule: a thread that asks the NVML reader process for snapshots.

`/metrics` and `/health` read the last snapshot and never wait for NVML. A read that fails or does
not answer within `timeout` marks NVML down and drops the per-GPU values, so stale numbers are
never served as fresh; a hung reader is killed and replaced.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from trt_heartbeat.exporter.child import reap, spawn
from trt_heartbeat.exporter.nvml import NvmlSnapshot, reader_main

log = logging.getLogger("trt_heartbeat")
_SLICE = 0.1
STARTUP_TIMEOUT = 30.0  # a new reader process answering at all (Python start-up, not NVML)


@dataclass(frozen=True)
class TelemetryState:
    up: bool
    last_success: float | None
    snapshot: NvmlSnapshot | None  # None while NVML is down: nothing stale is exported

    def gpu(self, uuid: str) -> Any:
        if self.snapshot is None or not uuid:
            return None
        return next((g for g in self.snapshot.gpus if g.uuid == uuid), None)


NO_TELEMETRY = TelemetryState(False, None, None)


class NvmlTelemetry:
    def __init__(
        self,
        interval: float,
        timeout: float,
        module: str = "pynvml",
        wall_clock: Callable[[], float] = time.time,
        context: Any = None,
    ) -> None:
        self.interval, self.timeout, self.module = interval, timeout, module
        self._wall_clock = wall_clock
        self._ctx = context or multiprocessing.get_context("spawn")
        self._lock = threading.Lock()
        self._state = TelemetryState(False, None, None)
        self._stop = threading.Event()
        self._process: multiprocessing.process.BaseProcess | None = None
        self._conn: multiprocessing.connection.Connection | None = None
        self._last_problem = ""
        self._thread = threading.Thread(target=self._run, name="nvml-telemetry", daemon=True)

    def state(self) -> TelemetryState:
        with self._lock:
            return self._state

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._read_once()
                self._stop.wait(self.interval)
        finally:
            self._kill()

    def _spawn(self) -> bool:
        self._process, self._conn = spawn(
            reader_main, (self.module,), "trt-heartbeat-nvml", self._ctx
        )
        reply = self._receive(STARTUP_TIMEOUT)
        if reply is None or reply[0] != "started":
            self._kill()
            self._down("crash", "NVML reader did not start")
            return False
        return True

    def _receive(self, timeout: float) -> tuple[str, Any] | None:
        """The reader's next message; None on timeout, stop, or a dead reader."""
        assert self._conn is not None and self._process is not None
        deadline = time.monotonic() + timeout
        try:
            while not self._conn.poll(_SLICE):
                if self._stop.is_set() or not self._process.is_alive():
                    return None
                if time.monotonic() > deadline:
                    return None
            message: tuple[str, Any] = self._conn.recv()
            return message
        except (EOFError, OSError):
            return None

    def _kill(self) -> None:
        process, conn = self._process, self._conn
        self._process = self._conn = None
        reap(process, conn)

    def _read_once(self) -> None:
        if self._process is None and not self._spawn():
            return
        assert self._conn is not None
        try:
            self._conn.send("read")
        except OSError:
            reply = None
        else:
            reply = self._receive(self.timeout)
        if self._stop.is_set():
            return
        if reply is None:
            # A hung NVML call (or a dead reader): only a new process gets past it.
            self._kill()
            self._down("hung", f"NVML did not answer within {self.timeout:g}s")
            return
        kind, payload = reply
        if kind == "ok":
            with self._lock:
                self._state = TelemetryState(True, self._wall_clock(), payload)
            if self._last_problem:
                log.info("NVML readings resumed")
                self._last_problem = ""
            return
        self._down(kind, str(payload))

    def _down(self, kind: str, message: str) -> None:
        with self._lock:
            self._state = TelemetryState(False, self._state.last_success, None)
        if kind == self._last_problem:
            return  # log state changes, not every failed read
        self._last_problem = kind
        if kind == "missing":
            log.info("NVML not available; GPU telemetry off", extra={"fields": {"error": message}})
        else:
            log.warning("NVML read failed", extra={"fields": {"kind": kind, "error": message}})
