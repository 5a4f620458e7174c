"""CUDA host API: device, buffers, stream, events and kernels behind one small interface.

Two implementations, chosen by the `cuda_api` setting: NVIDIA's `cuda-python` bindings (the
default; what TensorRT's own samples use) and `pycuda`. Both are imported only inside worker
processes, and only the one selected.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from trt_heartbeat.errors import BackendError, Reason

CUDA_APIS = {
    "cuda-python": "trt_heartbeat.exporter.cuda_host.cuda_python:CudaPythonHost",
    "pycuda": "trt_heartbeat.exporter.cuda_host.pycuda_host:PyCudaHost",
}

# Driver error names that mean something more specific than "a CUDA call failed".
_REASONS = {
    "CUDA_ERROR_NO_DEVICE": Reason.NO_GPU,
    "CUDA_ERROR_INVALID_DEVICE": Reason.NO_GPU,
    "CUDA_ERROR_INSUFFICIENT_DRIVER": Reason.DRIVER_TOO_OLD,
    "CUDA_ERROR_SYSTEM_DRIVER_MISMATCH": Reason.DRIVER_TOO_OLD,
    "CUDA_ERROR_COMPAT_NOT_SUPPORTED_ON_DEVICE": Reason.DRIVER_TOO_OLD,
    "CUDA_ERROR_UNSUPPORTED_PTX_VERSION": Reason.DRIVER_TOO_OLD,
}


def cuda_failure(call: str, name: str, description: str = "") -> BackendError:
    """A BackendError for a failed CUDA call; a probe-time failure poisons the context."""
    reason = _REASONS.get(name, Reason.CUDA_ERROR)
    detail = f"{call} failed: {name}" + (f" ({description})" if description else "")
    return BackendError(reason, detail, fatal=True)


@dataclass(frozen=True)
class DeviceInfo:
    name: str
    uuid: str  # "GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx"
    compute_capability: tuple[int, int]
    total_memory: int
    multiprocessors: int
    cuda_driver_version: str  # the CUDA version the driver supports, e.g. "13.0"


class CudaHost(Protocol):
    """What the GPU backends need from a CUDA host API; one context on one device."""

    name: str
    device: DeviceInfo

    def alloc(self, nbytes: int) -> int:
        """Device memory; returns the device pointer."""

    def pinned(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        """Page-locked host memory as a numpy array (needed for truly asynchronous copies)."""

    def stream_handle(self) -> int:
        """The probe's own non-blocking stream, as an integer handle (for TensorRT)."""

    def h2d(self, device_ptr: int, host: np.ndarray) -> None: ...

    def d2h(self, host: np.ndarray, device_ptr: int) -> None: ...

    def record(self, index: int) -> None:
        """Record timing event `index` (0..3) on the stream."""

    def elapsed(self, start: int, end: int) -> float:
        """Seconds between two recorded events (after synchronize)."""

    def synchronize(self) -> None: ...

    def load_kernel(self, image: bytes, name: str) -> Any: ...

    def launch(self, kernel: Any, grid: int, block: int, pointers: list[int]) -> None: ...

    def memory_info(self) -> tuple[int, int]:
        """(free, total) device memory as the driver reports it to this context: the whole GPU,
        or the MIG instance's share of it."""

    def close(self) -> None: ...


def open_host(api: str, device_index: int = 0) -> CudaHost:
    """Import the selected host API; open a context on `device_index` as this process sees it."""
    module_name, _, attr = CUDA_APIS[api].partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        package = {"cuda-python": "cuda-python (cuda-bindings)", "pycuda": "pycuda"}[api]
        raise BackendError(
            Reason.RUNTIME_MISSING, f"CUDA host API {api}: {package} is not installed ({exc})"
        ) from exc
    host: CudaHost = getattr(module, attr)(device_index)
    return host
