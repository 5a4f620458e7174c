"""CUDA host API on NVIDIA's cuda-python driver bindings (`cuda.bindings.driver`, 12.x and 13.x).

Every binding returns `(error, *results)`; `_check` turns a failure into a BackendError with the
driver's error name, so the frame can tell a missing GPU from an old driver from a wedged stream.
"""

from __future__ import annotations

import ctypes
from typing import Any

import numpy as np
from cuda.bindings import driver as cu  # cuda-bindings >= 12.6 (13.x removed cuda.cuda)

from trt_heartbeat.errors import BackendError, Reason
from trt_heartbeat.exporter.cuda_host import DeviceInfo, cuda_failure

_SUCCESS = cu.CUresult.CUDA_SUCCESS


def _check(call: str, result: Any) -> Any:
    if isinstance(result, tuple):
        err, rest = result[0], result[1:]
    else:
        err, rest = result, ()
    if err != _SUCCESS:
        raise _failure(call, err)
    if not rest:
        return None
    return rest[0] if len(rest) == 1 else rest


def _failure(call: str, err: Any) -> BackendError:
    _, name = cu.cuGetErrorName(err)
    _, text = cu.cuGetErrorString(err)
    return cuda_failure(call, _text(name) or str(err), _text(text))


_memcpy_htod, _memcpy_dtoh = cu.cuMemcpyHtoDAsync, cu.cuMemcpyDtoHAsync
_event_record, _stream_synchronize, _launch_kernel = (
    cu.cuEventRecord,
    cu.cuStreamSynchronize,
    cu.cuLaunchKernel,
)


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value or "")


def format_uuid(raw: bytes) -> str:
    h = raw.hex()
    return f"GPU-{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"


class CudaPythonHost:
    name = "cuda-python"

    def __init__(self, device_index: int = 0) -> None:
        try:
            _check("cuInit", cu.cuInit(0))
        except BackendError:
            raise
        except Exception as exc:  # libcuda.so missing: cuda-pathfinder raises, no error code
            raise BackendError(
                Reason.NO_GPU, f"NVIDIA driver library (libcuda) not found: {exc}"
            ) from exc
        count = _check("cuDeviceGetCount", cu.cuDeviceGetCount())
        if device_index >= count:
            raise BackendError(Reason.NO_GPU, f"no CUDA device {device_index} ({count} visible)")
        self._dev = _check("cuDeviceGet", cu.cuDeviceGet(device_index))
        self._ctx = _check("cuDevicePrimaryCtxRetain", cu.cuDevicePrimaryCtxRetain(self._dev))
        # Pinned host buffers: id(array) -> (address, size, array); freed at close.
        self._pinned: dict[int, tuple[int, int, np.ndarray]] = {}
        self._device_buffers: list[int] = []
        self._modules: list[Any] = []
        self._stream: Any = None
        self._events: list[Any] = []
        _check("cuCtxSetCurrent", cu.cuCtxSetCurrent(self._ctx))
        # The per-thread stack reservation is SMs x threads/SM x stack size (~264 MiB on an
        # H200 at the 1 KiB default); the probe kernels need none. A launch that needs stack
        # grows it back, so this only ever saves memory.
        _check("cuCtxSetLimit", cu.cuCtxSetLimit(cu.CUlimit.CU_LIMIT_STACK_SIZE, 0))
        self.device = self._device_info()
        self._stream = _check(
            "cuStreamCreate", cu.cuStreamCreate(cu.CUstream_flags.CU_STREAM_NON_BLOCKING.value)
        )
        self._events = [
            _check("cuEventCreate", cu.cuEventCreate(cu.CUevent_flags.CU_EVENT_DEFAULT.value))
            for _ in range(4)
        ]
        self._elapsed = getattr(cu, "cuEventElapsedTime_v2", None) or cu.cuEventElapsedTime
        self._launch: tuple[Any, list[Any], Any, int] | None = None

    def _attribute(self, attribute: Any) -> int:
        return int(_check("cuDeviceGetAttribute", cu.cuDeviceGetAttribute(attribute, self._dev)))

    def _device_info(self) -> DeviceInfo:
        attr = cu.CUdevice_attribute
        name = _text(_check("cuDeviceGetName", cu.cuDeviceGetName(256, self._dev)))
        get_uuid = getattr(cu, "cuDeviceGetUuid_v2", None) or cu.cuDeviceGetUuid
        uuid = _check("cuDeviceGetUuid", get_uuid(self._dev))
        version = int(_check("cuDriverGetVersion", cu.cuDriverGetVersion()))
        return DeviceInfo(
            name=name.split("\x00", 1)[0].strip(),
            uuid=format_uuid(bytes(uuid.bytes)),
            compute_capability=(
                self._attribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR),
                self._attribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR),
            ),
            total_memory=int(_check("cuDeviceTotalMem", cu.cuDeviceTotalMem(self._dev))),
            multiprocessors=self._attribute(attr.CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT),
            cuda_driver_version=f"{version // 1000}.{version % 1000 // 10}",
        )

    def alloc(self, nbytes: int) -> int:
        ptr = int(_check("cuMemAlloc", cu.cuMemAlloc(nbytes)))
        self._device_buffers.append(ptr)
        return ptr

    def pinned(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        dt = np.dtype(dtype)
        nbytes = int(np.prod(shape)) * dt.itemsize
        ptr = int(_check("cuMemAllocHost", cu.cuMemAllocHost(nbytes)))
        raw = (ctypes.c_char * nbytes).from_address(ptr)
        array = np.frombuffer(raw, dtype=dt).reshape(shape)
        self._pinned[id(array)] = (ptr, nbytes, array)  # kept: its id stays its own
        return array

    def _host(self, array: np.ndarray) -> tuple[int, int]:
        # `ndarray.ctypes.data` builds a ctypes object per call (1-2 µs); a probe's buffers are
        # the pinned ones made here, whose address is known.
        known = self._pinned.get(id(array))
        return (known[0], known[1]) if known is not None else (array.ctypes.data, array.nbytes)

    def stream_handle(self) -> int:
        return int(self._stream)

    # The calls of every probe: bindings bound once, the error checked without _check's
    # unpacking (each costs a probe ~1 µs per call otherwise).

    def h2d(self, device_ptr: int, host: np.ndarray) -> None:
        ptr, nbytes = self._host(host)
        (err,) = _memcpy_htod(device_ptr, ptr, nbytes, self._stream)
        if err != _SUCCESS:
            raise _failure("cuMemcpyHtoDAsync", err)

    def d2h(self, host: np.ndarray, device_ptr: int) -> None:
        ptr, nbytes = self._host(host)
        (err,) = _memcpy_dtoh(ptr, device_ptr, nbytes, self._stream)
        if err != _SUCCESS:
            raise _failure("cuMemcpyDtoHAsync", err)

    def record(self, index: int) -> None:
        (err,) = _event_record(self._events[index], self._stream)
        if err != _SUCCESS:
            raise _failure("cuEventRecord", err)

    def elapsed(self, start: int, end: int) -> float:
        err, ms = self._elapsed(self._events[start], self._events[end])
        if err != _SUCCESS:
            raise _failure("cuEventElapsedTime", err)
        return float(ms) / 1000.0

    def synchronize(self) -> None:
        (err,) = _stream_synchronize(self._stream)
        if err != _SUCCESS:
            raise _failure("cuStreamSynchronize", err)

    def load_kernel(self, image: bytes, name: str) -> Any:
        module = _check("cuModuleLoadData", cu.cuModuleLoadData(image))
        self._modules.append(module)
        return _check("cuModuleGetFunction", cu.cuModuleGetFunction(module, name.encode()))

    def launch(self, kernel: Any, grid: int, block: int, pointers: list[int]) -> None:
        # kernelParams is an array of pointers to the argument values; a probe launches the same
        # kernel with the same buffers every time, so it is built once.
        key = (kernel, tuple(pointers))
        if self._launch is None or self._launch[0] != key:
            values = [ctypes.c_uint64(p) for p in pointers]
            params = (ctypes.c_void_p * len(values))(*[ctypes.addressof(v) for v in values])
            self._launch = (key, values, params, ctypes.addressof(params))
        (err,) = _launch_kernel(
            kernel, grid, 1, 1, block, 1, 1, 0, self._stream, self._launch[3], 0
        )
        if err != _SUCCESS:
            raise _failure("cuLaunchKernel", err)

    def memory_info(self) -> tuple[int, int]:
        free, total = _check("cuMemGetInfo", cu.cuMemGetInfo())
        return int(free), int(total)

    def close(self) -> None:
        # Best effort: after a sticky error every call fails, and process exit frees it all.
        for event in self._events:
            cu.cuEventDestroy(event)
        if self._stream is not None:
            cu.cuStreamDestroy(self._stream)
        for ptr in self._device_buffers:
            cu.cuMemFree(ptr)
        for ptr, _, _ in self._pinned.values():
            cu.cuMemFreeHost(ptr)
        for module in self._modules:
            cu.cuModuleUnload(module)
        cu.cuDevicePrimaryCtxRelease(self._dev)
        self._events, self._stream, self._device_buffers, self._pinned = [], None, [], {}
        self._modules = []
