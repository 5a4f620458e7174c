"""One probe as the frame sees it: the round trip's time, the answer checked, the result classified.

Shared by the scheduler (`serve`) and the one-shot `probe` command so both judge a probe the
same way.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from trt_heartbeat.errors import Reason
from trt_heartbeat.exporter import canonical
from trt_heartbeat.exporter.state import ProbeRecord
from trt_heartbeat.exporter.worker import Worker, WorkerFailure


@dataclass(frozen=True)
class ProbeOutcome:
    record: ProbeRecord
    # Set when the worker must be replaced; its value labels worker_restarts_total.
    restart_reason: str | None = None


def run_probe(
    worker: Worker,
    precision: str,
    timeout: float,
    keep_waiting: Callable[[], bool],
    wall_clock: Callable[[], float] = time.time,
    perf_counter: Callable[[], float] = time.perf_counter,
) -> ProbeOutcome:
    started = wall_clock()
    t0 = perf_counter()
    try:
        reply = worker.probe(timeout, keep_waiting)
    except WorkerFailure as failure:
        kind = "timeout" if failure.reason is Reason.TIMEOUT else "error"
        elapsed = perf_counter() - t0
        record = ProbeRecord(started, kind, {"total": elapsed}, failure.reason, str(failure))
        return ProbeOutcome(record, restart_reason=failure.restart_reason)
    phases = {"total": reply.seconds}
    if reply.result is None:
        reason = reply.reason or Reason.PROBE_ERROR
        record = ProbeRecord(started, "error", phases, reason, reply.message)
        return ProbeOutcome(record, restart_reason="error" if reply.fatal else None)
    phases.update(reply.result.phases)
    check = canonical.check_output(reply.result.output, precision)
    memory = reply.memory
    record = ProbeRecord(
        started,
        "success" if check.passed else "mismatch",
        phases,
        None if check.passed else Reason.MISMATCH,
        check.reason,
        check.max_abs_error,
        memory.held_bytes,
        memory.held_source,
        memory.device,
    )
    return ProbeOutcome(record)
