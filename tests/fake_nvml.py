"""Test-only stand-in for `pynvml`: the NVML faults we cannot cause on a machine without a GPU.

Controlled by a JSON file named in $TRT_HEARTBEAT_FAKE_NVML, read on every call:
  {"mode": "ok|hang|error|missing", "free": bytes, "pids": [pid, ...],
   "mig": {"0": ["1g.10gb", "3g.40gb"]}}
"mig" puts a GPU in MIG mode with one instance per profile listed (an empty list: MIG mode
without instances). GPU 1 is a board without MIG (NotSupported), as GPU 0 is without it by default.
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
NVML_DEVICE_MIG_ENABLE = 1
MAX_MIG_DEVICES = 7
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


class NVMLError_NotFound(NVMLError):
    pass


# A MIG device handle: (parent index, slot); a GPU's is its index.
Handle = int | tuple[int, int]


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


def mig_uuid(index: int, slot: int) -> str:
    return f"MIG-{index:08x}-0000-4000-8000-{slot:012x}"


def _profiles(index: int) -> list[str] | None:
    mig = _control().get("mig", {})
    return list(mig[str(index)]) if str(index) in mig else None


def nvmlDeviceGetHandleByUUID(uuid: str) -> Handle:
    for index in range(len(GPUS)):
        for slot in range(len(_profiles(index) or [])):
            if mig_uuid(index, slot) == uuid:
                return index, slot
    return [u for u, _ in GPUS].index(uuid)


def nvmlDeviceGetUUID(handle: Handle) -> str:
    return mig_uuid(*handle) if isinstance(handle, tuple) else GPUS[handle][0]


def nvmlDeviceGetName(handle: Handle) -> str:
    if isinstance(handle, tuple):
        return f"NVIDIA Fake H200 MIG {(_profiles(handle[0]) or [])[handle[1]]}"
    return "NVIDIA Fake H200"


def nvmlDeviceGetMigMode(handle: int) -> list[int]:
    if handle == 1:
        raise NVMLError_NotSupported("Not Supported")
    mode = int(_profiles(handle) is not None)
    return [mode, mode]


def nvmlDeviceGetMaxMigDeviceCount(handle: int) -> int:
    return MAX_MIG_DEVICES


def nvmlDeviceGetMigDeviceHandleByIndex(handle: int, slot: int) -> Handle:
    if slot >= len(_profiles(handle) or []):
        raise NVMLError_NotFound("Not Found")
    return handle, slot


def nvmlDeviceGetGpuInstanceId(handle: tuple[int, int]) -> int:
    return [1, 2, 3, 5, 7, 9, 11][handle[1]]  # IDs as the driver hands them out: not the slot


def nvmlDeviceGetComputeInstanceId(handle: tuple[int, int]) -> int:
    return 0


def _mig_total(handle: tuple[int, int]) -> int:
    profile = (_profiles(handle[0]) or [])[handle[1]]  # "3g.40gb" -> 40 GiB
    return int(profile.split(".")[1].removesuffix("gb")) << 30


def nvmlDeviceGetPciInfo(handle: int) -> Any:
    return SimpleNamespace(busId=GPUS[handle][1].encode())


def nvmlDeviceGetCudaComputeCapability(handle: int) -> tuple[int, int]:
    return 9, 0


nvmlMemory_v2 = 0x02000028
RESERVED = 350 << 20


def nvmlDeviceGetMemoryInfo(handle: Handle, version: int | None = None) -> Any:
    if isinstance(handle, tuple):  # a MIG instance: its share, half of it free
        total = _mig_total(handle)
        return SimpleNamespace(total=total, free=total // 2, used=total - total // 2)
    free = int(_call().get("free", 60 << 30))
    if version == nvmlMemory_v2:  # as nvidia-smi: driver-reserved memory is not "used"
        return SimpleNamespace(
            total=TOTAL, free=free, reserved=RESERVED, used=TOTAL - free - RESERVED
        )
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


def nvmlDeviceGetComputeRunningProcesses(handle: Handle) -> list[Any]:
    return [SimpleNamespace(pid=pid, usedGpuMemory=270532608) for pid in _call().get("pids", [])]
