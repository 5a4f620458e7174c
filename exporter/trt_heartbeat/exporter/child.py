"""Child processes: how every one of the exporter's is started and ended, and the one-shot call.

Whatever may load driver code, hang or crash runs in a spawned child, never in the exporter's
own process: a probe worker per target (`worker`), the NVML reader (`nvml_poller`), and the
start-up questions (which GPUs are there, what a backend class declares), asked through
`call_in_child` under a deadline. Each starts with `spawn` and ends with `reap`, which works on
a stopped or wedged process where asking cannot. A driver that hangs, or a library that crashes
on import, costs a child process and a clear error, not the HTTP server.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
from collections.abc import Callable
from typing import Any

from trt_heartbeat.errors import HeartbeatError

REAP_GRACE = 2.0  # seconds a killed child gets to be reaped before it is left to the kernel


def spawn(
    target: Callable[..., Any], args: tuple[Any, ...], name: str, context: Any = None
) -> tuple[multiprocessing.process.BaseProcess, multiprocessing.connection.Connection]:
    """Start `target(conn, *args)` in a spawned daemon process; the parent's end of the pipe."""
    ctx = context or multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    process = ctx.Process(target=target, args=(child, *args), name=name, daemon=True)
    process.start()
    child.close()
    return process, parent


def reap(
    process: multiprocessing.process.BaseProcess | None,
    conn: multiprocessing.connection.Connection | None,
) -> None:
    """SIGKILL a child and release it: works on a stopped or wedged process where asking cannot."""
    if process is not None:
        if process.is_alive():
            process.kill()
        process.join(REAP_GRACE)
        # A process stuck in the driver (D state) may outlive SIGKILL; leave it to the kernel
        # rather than block the caller on it.
        if process.exitcode is not None:
            process.close()
    if conn is not None:
        conn.close()


class ChildError(HeartbeatError):
    """The call did not return a value: `kind` says why (timeout, died, failed). For `failed`,
    `message` is the exception's own text and the error reads "<Type>: <message>"."""

    def __init__(self, kind: str, detail: str, message: str = "") -> None:
        super().__init__(detail)
        self.kind, self.message = kind, message or detail


def _run(conn: multiprocessing.connection.Connection, func: Callable[..., Any], args: Any) -> None:
    try:
        result = func(*args)
    except Exception as exc:
        conn.send(("failed", (type(exc).__name__, str(exc))))
    else:
        conn.send(("ok", result))


def call_in_child(
    func: Callable[..., Any], *args: Any, timeout: float, name: str, context: Any = None
) -> Any:
    """func(*args) in a spawned process; its return value, or ChildError.

    `func` and `args` must pickle (a module-level function); an exception inside it comes back
    as ChildError("failed", …) carrying its message.
    """
    process, parent = spawn(_run, (func, args), name, context)
    try:
        if not parent.poll(timeout):
            raise ChildError("timeout", f"did not answer within {timeout:g}s")
        status, result = parent.recv()
    except EOFError as exc:
        raise ChildError("died", f"process died (exit code {process.exitcode})") from exc
    finally:
        reap(process, parent)
    if status != "ok":
        kind, message = result
        raise ChildError("failed", f"{kind}: {message}" if message else kind, message)
    return result
