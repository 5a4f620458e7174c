"""Domain exceptions and the fixed set of failure reason codes.

Reason codes are part of the metric contract (`trt_heartbeat_last_failure_info{reason}`) and of
the `/health` body, so alerts and runbooks can say *why* a probe failed. Keep the set small and
stable; docs/runbooks.md has a section per code.
"""

from __future__ import annotations

from enum import Enum


class Reason(str, Enum):
    TIMEOUT = "timeout"  # probe did not answer within `timeout`; the worker was killed
    WORKER_CRASH = "worker_crash"  # worker process died (signal, segfault, exit)
    MISMATCH = "mismatch"  # output outside tolerance of the golden output
    PROBE_ERROR = "probe_error"  # backend raised during a probe
    CUDA_ERROR = "cuda_error"  # a CUDA call failed during a probe
    ENGINE_LOAD_FAILED = "engine_load_failed"  # building or loading the probe model failed
    ENGINE_INCOMPATIBLE = "engine_incompatible"  # a cached plan does not fit this runtime/GPU
    RUNTIME_MISSING = "runtime_missing"  # backend library (TensorRT, CUDA bindings) not installed
    NO_GPU = "no_gpu"  # the backend needs a GPU and none is visible
    DRIVER_TOO_OLD = "driver_too_old"  # the driver does not support the runtime
    STARTUP_TIMEOUT = "startup_timeout"  # the worker did not load its model within startup_timeout

    def __str__(self) -> str:
        return self.value


class HeartbeatError(Exception):
    """Base class for errors raised inside the package."""


class ConfigError(HeartbeatError):
    """Invalid configuration; the message is one line naming the key path and what was expected."""


class UnknownBackendError(HeartbeatError):
    """A backend name that is neither registered nor an importable `module:Class`."""


class BackendError(HeartbeatError):
    """Raised by a backend with a reason code.

    `fatal` tells the worker frame the backend's state can no longer be trusted (a sticky CUDA
    error, a lost context), so the worker process is replaced instead of reused.
    """

    def __init__(self, reason: Reason, message: str, *, fatal: bool = False) -> None:
        super().__init__(message)
        self.reason = reason
        self.fatal = fatal

    def __reduce__(self) -> tuple[object, ...]:
        # Keyword-only `fatal` and the extra positional argument defeat default pickling,
        # which multiprocessing needs to carry the error out of a worker.
        return (_rebuild_backend_error, (self.reason, str(self), self.fatal))


def _rebuild_backend_error(reason: Reason, message: str, fatal: bool) -> BackendError:
    return BackendError(reason, message, fatal=fatal)
