"""A call that may hang or crash, run in a short-lived spawned process under a deadline.

Start-up questions that load driver code (which GPUs are there, what a backend class declares)
are asked here, never in the exporter's own process: a driver that hangs, or a library that
crashes on import, costs a child process and a clear error, not the HTTP server. The probe
workers (`worker`) and the NVML poller (`nvml_poller`) are long-lived children with their own
request loop; this is the one-shot form.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
from collections.abc import Callable
from typing import Any

from trt_heartbeat.errors import HeartbeatError


class ChildError(HeartbeatError):
    """The call did not return a value: `kind` says why (timeout, died, failed)."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind


def _run(conn: multiprocessing.connection.Connection, func: Callable[..., Any], args: Any) -> None:
    try:
        result = func(*args)
    except Exception as exc:
        conn.send(("failed", f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__))
    else:
        conn.send(("ok", result))


def call_in_child(
    func: Callable[..., Any], *args: Any, timeout: float, name: str, context: Any = None
) -> Any:
    """func(*args) in a spawned process; its return value, or ChildError.

    `func` and `args` must pickle (a module-level function); an exception inside it comes back
    as ChildError("failed", "<Type>: <message>").
    """
    ctx = context or multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    process = ctx.Process(target=_run, args=(child, func, args), name=name, daemon=True)
    process.start()
    child.close()
    try:
        if not parent.poll(timeout):
            raise ChildError("timeout", f"did not answer within {timeout:g}s")
        status, result = parent.recv()
    except EOFError as exc:
        raise ChildError("died", f"process died (exit code {process.exitcode})") from exc
    finally:
        if process.is_alive():
            process.kill()
        process.join(5)
        parent.close()
    if status != "ok":
        raise ChildError("failed", result)
    return result
