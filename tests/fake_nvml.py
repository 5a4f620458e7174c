"""Test-only stand-in for `pynvml`: the NVML faults we cannot cause on a machine without a GPU.

Controlled by a JSON file named in $TRT_HEARTBEAT_FAKE_NVML, read on every call:
  {"mode": "ok|hang|error|missing", "free": bytes, "pids": [pid, ...]}
"""

from __future__ import annotations

import json
import os
import time
from types import SimpleNamespace
from typing import Any

ENV = "TRT_HEARTBEAT_FAKE_NVML"
NVML_TEMPERATURE_GPU = 0
NVML_VOLATILE_ECC = 0
NVML_MEMORY_ERROR_TYPE_CORRECTED = 0
NVML_MEMORY_ERROR_TYPE_UNCORRECTED = 1
TOTAL = 80 << 30
GPUS = [("GPU-fake-0", "0000:3B:00.0"), ("GPU-fake-1", "0000:5E:00.0")]


class NVMLError(Exception):
    pass


class NVMLError_LibraryNotFound(NVMLError):
    pass


class NVMLError_GpuIsLost(NVMLError):
    pass


class NVMLError_NotSupported(NVMLError):
    pass


def _control() -> dict[str, Any]:
    path = os.environ.get(ENV, "")
    if not path or not os.path.exists(path):
        return {"mode": "ok"}
    with open(path) as fh:
        return dict(json.load(fh))


def _call() -> dict[str, Any]:
    ctl = _control()
    mode = ctl.get("mode", "ok")
    if mode == "hang":
        time.sleep(3600)
    if mode == "missing":
        raise NVMLError_LibraryNotFound("NVML Shared Library Not Found")
    if mode == "error":
        raise NVMLError_GpuIsLost("GPU is lost")
    return ctl


def nvmlInit() -> None:
    _call()


def nvmlShutdown() -> None:
    pass


def nvmlSystemGetDriverVersion() -> str:
    return "580.159.04"


def nvmlSystemGetCudaDriverVersion() -> int:
    return 13000


def nvmlDeviceGetCount() -> int:
    _call()
    return len(GPUS)


def nvmlDeviceGetHandleByIndex(index: int) -> int:
    return index


def nvmlDeviceGetHandleByUUID(uuid: str) -> int:
    return [u for u, _ in GPUS].index(uuid)


def nvmlDeviceGetUUID(handle: int) -> str:
    return GPUS[handle][0]


def nvmlDeviceGetName(handle: int) -> str:
    return "NVIDIA Fake H200"


def nvmlDeviceGetPciInfo(handle: int) -> Any:
    return SimpleNamespace(busId=GPUS[handle][1].encode())


def nvmlDeviceGetCudaComputeCapability(handle: int) -> tuple[int, int]:
    return 9, 0


nvmlMemory_v2 = 0x02000028
RESERVED = 350 << 20


def nvmlDeviceGetMemoryInfo(handle: int, version: int | None = None) -> Any:
    free = int(_call().get("free", 60 << 30))
    if version == nvmlMemory_v2:  # as nvidia-smi: driver-reserved memory is not "used"
        return SimpleNamespace(total=TOTAL, free=free, reserved=RESERVED,
                               used=TOTAL - free - RESERVED)  # fmt: skip
    return SimpleNamespace(total=TOTAL, free=free, used=TOTAL - free)


def nvmlDeviceGetUtilizationRates(handle: int) -> Any:
    return SimpleNamespace(gpu=37, memory=5)


def nvmlDeviceGetTemperature(handle: int, sensor: int) -> int:
    return 41


def nvmlDeviceGetPowerUsage(handle: int) -> int:
    if handle == 1:
        raise NVMLError_NotSupported("Not Supported")
    return 123456  # milliwatts


def nvmlDeviceGetTotalEccErrors(handle: int, kind: int, counter: int) -> int:
    return 2 if kind == NVML_MEMORY_ERROR_TYPE_CORRECTED else 0


def nvmlDeviceGetComputeRunningProcesses(handle: int) -> list[Any]:
    return [SimpleNamespace(pid=pid, usedGpuMemory=270532608) for pid in _call().get("pids", [])]
