"""Every NVML call of the exporter, made in a child process (the exporter process never loads
NVML): the poller's reads, GPU discovery at start-up, and a probe worker's view of its own GPU.

The poller's child (`reader_main`) answers each "read" request with one snapshot of every GPU
NVML can see. A GPU that fell off the bus can make an NVML call hang; the parent
(`nvml_poller`) then kills this process and starts another, so a hang costs one missed snapshot,
never a scrape. Discovery (`discover`) runs in a one-shot child (`gpus`); `NvmlView` in the
probe worker of a GPU backend.
"""

from __future__ import annotations

import contextlib
import importlib
import multiprocessing.connection
import os
import re
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from trt_heartbeat.domain import MigInstance, Target

_PROFILE = re.compile(r"MIG (\S+)$")  # "NVIDIA H100 80GB HBM3 MIG 1g.10gb" -> "1g.10gb"


@dataclass(frozen=True)
class GpuReading:
    index: int
    uuid: str
    name: str
    pci_bus_id: str
    compute_capability: str
    memory_total: int
    memory_used: int
    memory_free: int
    utilization: float | None  # ratio 0..1 of time a kernel was running
    temperature: float | None  # degrees Celsius
    power: float | None  # watts
    ecc_corrected: int | None  # volatile counts since the driver loaded
    ecc_uncorrected: int | None
    mig: MigInstance | None = None  # set for a MIG instance; `index` is then its parent's

    @property
    def gpu(self) -> str:
        """The `gpu` label, equal to the probe target's for the same device."""
        return self.mig.label if self.mig else str(self.index)


@dataclass(frozen=True)
class NvmlSnapshot:
    driver_version: str
    cuda_driver_version: str
    gpus: tuple[GpuReading, ...]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _optional(call: Any, *args: Any) -> Any:
    """An NVML query a GPU may not support (power on some boards, ECC on consumer cards)."""
    try:
        return call(*args)
    except Exception:
        return None


def _memory(nvml: Any, handle: Any) -> Any:
    """Memory info as nvidia-smi shows it: the v2 query's `used` leaves out what the driver
    reserves (~350 MiB on an H200), which the v1 query counts as used."""
    version = getattr(nvml, "nvmlMemory_v2", None)
    if version is not None:
        try:
            return nvml.nvmlDeviceGetMemoryInfo(handle, version=version)
        except Exception:
            pass  # driver without the v2 query
    return nvml.nvmlDeviceGetMemoryInfo(handle)


def mig_enabled(nvml: Any, handle: Any) -> bool:
    """Whether the GPU runs in MIG mode now (a pending change counts from the next reset)."""
    try:
        current, _pending = nvml.nvmlDeviceGetMigMode(handle)
    except Exception:
        return False  # NVMLError_NotSupported: a GPU without MIG, or a driver that predates it
    return bool(current == getattr(nvml, "NVML_DEVICE_MIG_ENABLE", 1))


def mig_devices(nvml: Any, index: int, handle: Any) -> list[tuple[Any, str, MigInstance]]:
    """(handle, UUID, placement) of each MIG instance of a GPU in MIG mode; [] for a whole GPU.

    Only reads: the MIG mode of a GPU is its operator's to set, never the exporter's.
    """
    if not mig_enabled(nvml, handle):
        return []
    parent_uuid = _text(nvml.nvmlDeviceGetUUID(handle))
    found = []
    for slot in range(int(nvml.nvmlDeviceGetMaxMigDeviceCount(handle))):
        try:
            mig = nvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, slot)
        except Exception as exc:
            if type(exc).__name__ == "NVMLError_NotFound":
                continue  # an empty slot: fewer instances than the GPU could hold
            raise
        profile = _PROFILE.search(_text(nvml.nvmlDeviceGetName(mig)))
        placement = MigInstance(
            parent_gpu=str(index),
            parent_uuid=parent_uuid,
            profile=profile.group(1) if profile else "",
            gpu_instance=int(nvml.nvmlDeviceGetGpuInstanceId(mig)),
            compute_instance=int(nvml.nvmlDeviceGetComputeInstanceId(mig)),
        )
        found.append((mig, _text(nvml.nvmlDeviceGetUUID(mig)), placement))
    return found


def _gpu(nvml: Any, index: int) -> tuple[GpuReading, ...]:
    """The GPU's reading, then one per MIG instance (memory is all NVML reads per instance:
    utilization, temperature, power and ECC belong to the parent)."""
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    memory = _memory(nvml, handle)
    major, minor = nvml.nvmlDeviceGetCudaComputeCapability(handle)
    util = _optional(nvml.nvmlDeviceGetUtilizationRates, handle)
    temp = _optional(nvml.nvmlDeviceGetTemperature, handle, nvml.NVML_TEMPERATURE_GPU)
    power_mw = _optional(nvml.nvmlDeviceGetPowerUsage, handle)

    def ecc(kind: Any) -> int | None:
        value = _optional(nvml.nvmlDeviceGetTotalEccErrors, handle, kind, nvml.NVML_VOLATILE_ECC)
        return None if value is None else int(value)

    whole = GpuReading(
        index=index,
        uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
        name=_text(nvml.nvmlDeviceGetName(handle)),
        pci_bus_id=_text(nvml.nvmlDeviceGetPciInfo(handle).busId),
        compute_capability=f"{major}.{minor}",
        memory_total=int(memory.total),
        memory_used=int(memory.used),
        memory_free=int(memory.free),
        utilization=None if util is None else util.gpu / 100.0,
        temperature=None if temp is None else float(temp),
        power=None if power_mw is None else power_mw / 1000.0,
        ecc_corrected=ecc(nvml.NVML_MEMORY_ERROR_TYPE_CORRECTED),
        ecc_uncorrected=ecc(nvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED),
    )
    instances = []
    for mig, uuid, placement in mig_devices(nvml, index, handle):
        share = _memory(nvml, mig)
        instances.append(
            GpuReading(
                index=index,
                uuid=uuid,
                name=_text(nvml.nvmlDeviceGetName(mig)),
                pci_bus_id=whole.pci_bus_id,
                compute_capability=whole.compute_capability,
                memory_total=int(share.total),
                memory_used=int(share.used),
                memory_free=int(share.free),
                utilization=None,
                temperature=None,
                power=None,
                ecc_corrected=None,
                ecc_uncorrected=None,
                mig=placement,
            )
        )
    return (whole, *instances)


def read(nvml: Any) -> NvmlSnapshot:
    cuda = int(nvml.nvmlSystemGetCudaDriverVersion())
    return NvmlSnapshot(
        driver_version=_text(nvml.nvmlSystemGetDriverVersion()),
        cuda_driver_version=f"{cuda // 1000}.{cuda % 1000 // 10}",
        gpus=tuple(g for i in range(nvml.nvmlDeviceGetCount()) for g in _gpu(nvml, i)),
    )


def _missing(exc: BaseException) -> bool:
    """NVML's library or driver is absent: a CPU host, not a failure worth shouting about."""
    name = type(exc).__name__
    return isinstance(exc, ImportError) or name in (
        "NVMLError_LibraryNotFound",
        "NVMLError_DriverNotLoaded",
        "NVMLError_NoPermission",
    )


def reader_main(conn: multiprocessing.connection.Connection, module_name: str) -> None:
    """Child process: answer each "read" with ("ok", snapshot), ("missing" | "error", message)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    conn.send(("started", ""))  # process start-up is not NVML's time: the parent waits for this
    nvml: Any = None
    while True:
        try:
            request = conn.recv()
        except EOFError:
            return
        if request != "read":
            break
        try:
            if nvml is None:
                module = importlib.import_module(module_name)
                module.nvmlInit()
                nvml = module
            conn.send(("ok", read(nvml)))
        except Exception as exc:
            kind = "missing" if _missing(exc) else "error"
            conn.send((kind, f"{type(exc).__name__}: {exc}"))
            if nvml is not None:  # start afresh next time: the driver may have been reloaded
                with contextlib.suppress(Exception):
                    nvml.nvmlShutdown()
                nvml = None
    if nvml is not None:
        nvml.nvmlShutdown()


class NvmlView:
    """What NVML says about this worker on its GPU: the memory it holds, and the driver version.

    NVML's per-process list reports host PIDs; inside a container's PID namespace our PID does not
    appear there. Then fall back to the rise in the device's used memory across our own set-up
    (context, buffers, module or engine), measured before and after it.

    The footprint changes only with set-up, and NVML's process list is a slow call next to a
    probe (docs/performance.md), so it is asked at most once per REFRESH seconds.
    """

    REFRESH = 10.0

    def __init__(
        self, uuid: str, nvml: Any = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._clock = clock
        self._asked_at: float | None = None
        self._last: int | None = None
        self.source = "unavailable"
        self.driver_version = ""
        self._nvml: Any = None
        self._handle: Any = None
        self._baseline: int | None = None
        self._delta: int | None = None
        try:
            if nvml is None:
                nvml = importlib.import_module("pynvml")
            nvml.nvmlInit()
            version = nvml.nvmlSystemGetDriverVersion()
            self.driver_version = version.decode() if isinstance(version, bytes) else str(version)
            self._handle = nvml.nvmlDeviceGetHandleByUUID(uuid)
            self._baseline = int(nvml.nvmlDeviceGetMemoryInfo(self._handle).used)
            self._nvml = nvml
        except Exception:
            pass  # NVML missing or failing: the metric is simply absent

    def setup_done(self) -> None:
        if self._nvml is not None and self._baseline is not None:
            used = int(self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used)
            self._delta = max(0, used - self._baseline)

    def current(self) -> int | None:
        if self._nvml is None:
            return None
        now = self._clock()
        if self._asked_at is not None and now - self._asked_at < self.REFRESH:
            return self._last
        self._asked_at = now
        self._last = self._ask()
        return self._last

    def _ask(self) -> int | None:
        try:
            for proc in self._nvml.nvmlDeviceGetComputeRunningProcesses(self._handle):
                if proc.pid == os.getpid() and proc.usedGpuMemory is not None:
                    self.source = "nvml_process"
                    return int(proc.usedGpuMemory)
        except Exception:
            pass
        self.source = "setup_delta" if self._delta is not None else "unavailable"
        return self._delta

    def close(self) -> None:
        if self._nvml is not None:
            with contextlib.suppress(Exception):
                self._nvml.nvmlShutdown()


def discover(nvml_module: str = "pynvml") -> list[tuple[int, str, bool, tuple[Target, ...]]]:
    """(index, UUID, MIG mode, MIG instance targets) of every GPU, in NVML (PCI bus) order."""
    nvml: Any = importlib.import_module(nvml_module)
    nvml.nvmlInit()
    try:
        found = []
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            instances = tuple(
                Target(mig.label, mig_uuid, mig)
                for _, mig_uuid, mig in mig_devices(nvml, index, handle)
            )
            uuid = _text(nvml.nvmlDeviceGetUUID(handle))
            found.append((index, uuid, mig_enabled(nvml, handle), instances))
        return found
    finally:
        nvml.nvmlShutdown()
