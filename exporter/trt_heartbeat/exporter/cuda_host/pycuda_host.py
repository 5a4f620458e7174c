"""CUDA host API on pycuda, for installations that standardised on it.

pycuda's `autoinit` makes a non-primary context current in the importing thread only; this uses
the device's primary context explicitly (the one TensorRT's runtime also attaches to).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from trt_heartbeat.errors import BackendError, Reason
from trt_heartbeat.exporter.cuda_host import DeviceInfo, cuda_failure

try:
    import pycuda.driver as cuda
except ImportError as exc:  # pragma: no cover - surfaced by open_host as runtime_missing
    raise ImportError(f"pycuda is not installed: {exc}") from exc


# pycuda reports the driver's error string, not its name; map the strings that need their own
# reason code.
_TEXT_REASONS = {
    "no CUDA-capable device": "CUDA_ERROR_NO_DEVICE",
    "driver version is insufficient": "CUDA_ERROR_INSUFFICIENT_DRIVER",
}


def _failure(call: str, exc: Exception) -> BackendError:
    text = str(exc)
    name = next((n for key, n in _TEXT_REASONS.items() if key in text), type(exc).__name__)
    return cuda_failure(call, name, text)


class PyCudaHost:
    name = "pycuda"

    def __init__(self, device_index: int = 0) -> None:
        try:
            cuda.init()
        except cuda.Error as exc:
            raise _failure("cuInit", exc) from exc
        count = cuda.Device.count()
        if device_index >= count:
            raise BackendError(Reason.NO_GPU, f"no CUDA device {device_index} ({count} visible)")
        self._device = cuda.Device(device_index)
        self._ctx = self._device.retain_primary_context()
        self._ctx.push()
        cuda.Context.set_limit(cuda.limit.STACK_SIZE, 0)
        attrs = self._device.get_attributes()
        major, minor = self._device.compute_capability()
        version = cuda.get_driver_version()
        self.device = DeviceInfo(
            name=self._device.name(),
            uuid=_uuid(self._device),
            compute_capability=(major, minor),
            total_memory=int(self._device.total_memory()),
            multiprocessors=int(attrs[cuda.device_attribute.MULTIPROCESSOR_COUNT]),
            cuda_driver_version=f"{version // 1000}.{version % 1000 // 10}",
        )
        self._stream = cuda.Stream(flags=1)  # CU_STREAM_NON_BLOCKING
        self._events = [cuda.Event() for _ in range(4)]
        self._keep: list[Any] = []

    def _call(self, name: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except cuda.Error as exc:
            raise _failure(name, exc) from exc

    def alloc(self, nbytes: int) -> int:
        allocation = self._call("cuMemAlloc", cuda.mem_alloc, nbytes)
        self._keep.append(allocation)
        return int(allocation)

    def pinned(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        array: np.ndarray = self._call("cuMemHostAlloc", cuda.pagelocked_empty, shape, dtype)
        return array

    def stream_handle(self) -> int:
        return int(self._stream.handle)

    def h2d(self, device_ptr: int, host: np.ndarray) -> None:
        self._call("cuMemcpyHtoDAsync", cuda.memcpy_htod_async, device_ptr, host, self._stream)

    def d2h(self, host: np.ndarray, device_ptr: int) -> None:
        self._call("cuMemcpyDtoHAsync", cuda.memcpy_dtoh_async, host, device_ptr, self._stream)

    def record(self, index: int) -> None:
        self._call("cuEventRecord", self._events[index].record, self._stream)

    def elapsed(self, start: int, end: int) -> float:
        ms = self._call("cuEventElapsedTime", self._events[end].time_since, self._events[start])
        return float(ms) / 1000.0

    def synchronize(self) -> None:
        self._call("cuStreamSynchronize", self._stream.synchronize)

    def load_kernel(self, image: bytes, name: str) -> Any:
        module = self._call("cuModuleLoadData", cuda.module_from_buffer, image)
        self._keep.append(module)
        function = self._call("cuModuleGetFunction", module.get_function, name)
        function.prepare("P" * 6)
        return function

    def launch(self, kernel: Any, grid: int, block: int, pointers: list[int]) -> None:
        self._call(
            "cuLaunchKernel",
            kernel.prepared_async_call,
            (grid, 1),
            (block, 1, 1),
            self._stream,
            *pointers,
        )

    def memory_info(self) -> tuple[int, int]:
        free, total = self._call("cuMemGetInfo", cuda.mem_get_info)
        return int(free), int(total)

    def close(self) -> None:
        self._keep.clear()
        try:
            self._ctx.pop()
            self._ctx.detach()
        except cuda.Error:
            pass  # after a sticky error the context is gone with the process anyway


def _uuid(device: Any) -> str:
    get_uuid = getattr(device, "get_uuid", None)  # pycuda >= 2023.1
    if get_uuid is None:
        return ""
    h = bytes(get_uuid()).hex()
    return f"GPU-{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"
