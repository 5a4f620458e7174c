"""Which GPUs to probe: discovered in a short-lived child process, never in the exporter itself.

NVML (or, without it, the CUDA driver) is asked once at start-up from a spawned process with a
timeout, so a driver that hangs on enumeration cannot hang the exporter. Each probe worker is
then bound to its GPU through CUDA_VISIBLE_DEVICES=<uuid> and sees only that device. A GPU in MIG
mode is probed per MIG instance (CUDA_VISIBLE_DEVICES=MIG-<uuid>): each instance is what a
service gets, and each can wedge or run out of memory on its own.
"""

from __future__ import annotations

import importlib
import multiprocessing
import multiprocessing.connection
import re
from dataclasses import dataclass
from typing import Any

from trt_heartbeat.domain import Target
from trt_heartbeat.errors import ConfigError, HeartbeatError

DISCOVERY_TIMEOUT = 30.0
# The driver's older MIG name: MIG-<parent GPU UUID>/<GPU instance>/<compute instance>.
_LEGACY_MIG = re.compile(r"MIG-(GPU-[0-9a-fA-F-]+)/([0-9]+)/([0-9]+)")


class DiscoveryError(HeartbeatError):
    pass


@dataclass(frozen=True)
class FoundGpu:
    """A GPU discovery found; in MIG mode, with the targets of its MIG instances."""

    index: int
    uuid: str
    mig_enabled: bool = False
    instances: tuple[Target, ...] = ()

    def targets(self) -> list[Target]:
        """What probing this GPU means: each MIG instance, or the whole GPU. A GPU in MIG mode
        without instances stays one target, whose worker then reports `no_gpu`."""
        return list(self.instances) or [Target(str(self.index), self.uuid)]


def _discover_nvml(module: str = "pynvml") -> list[FoundGpu]:
    from trt_heartbeat.exporter.nvml import mig_devices, mig_enabled

    nvml: Any = importlib.import_module(module)
    nvml.nvmlInit()
    try:
        found = []
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            uuid = nvml.nvmlDeviceGetUUID(handle)
            instances = tuple(Target(mig.label, mig_uuid, mig)
                              for _, mig_uuid, mig in mig_devices(nvml, index, handle))  # fmt: skip
            text = uuid.decode() if isinstance(uuid, bytes) else str(uuid)
            found.append(FoundGpu(index, text, mig_enabled(nvml, handle), instances))
        return found
    finally:
        nvml.nvmlShutdown()


def _discover_cuda() -> list[FoundGpu]:
    from cuda.bindings import driver as cu

    from trt_heartbeat.exporter.cuda_host.cuda_python import format_uuid

    cu.cuInit(0)
    err, count = cu.cuDeviceGetCount()
    if err != cu.CUresult.CUDA_SUCCESS:
        raise RuntimeError(f"cuDeviceGetCount: {err}")
    get_uuid = getattr(cu, "cuDeviceGetUuid_v2", None) or cu.cuDeviceGetUuid
    found = []
    for index in range(count):
        _, dev = cu.cuDeviceGet(index)
        _, uuid = get_uuid(dev)
        found.append(FoundGpu(index, format_uuid(bytes(uuid.bytes))))
    return found


def _discover_child(conn: multiprocessing.connection.Connection, nvml_module: str) -> None:
    errors = []
    for source in ("nvml", "cuda"):
        try:
            found = _discover_nvml(nvml_module) if source == "nvml" else _discover_cuda()
            conn.send(("ok", source, found))
            return
        except Exception as exc:
            errors.append(f"{source}: {type(exc).__name__}: {exc}")
    conn.send(("error", "", "; ".join(errors)))


def discover(
    timeout: float = DISCOVERY_TIMEOUT, context: Any = None, nvml_module: str = "pynvml"
) -> list[FoundGpu]:
    """Every GPU visible to this container, in NVML (PCI bus) order, with its MIG instances."""
    ctx = context or multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    process = ctx.Process(target=_discover_child, args=(child, nvml_module),
                          name="gpu-discovery", daemon=True)  # fmt: skip
    process.start()
    child.close()
    try:
        if not parent.poll(timeout):
            raise DiscoveryError(f"GPU discovery did not answer within {timeout:g}s")
        status, _source, result = parent.recv()
    except EOFError as exc:
        raise DiscoveryError(f"GPU discovery process died (exit code {process.exitcode})") from exc
    finally:
        if process.is_alive():
            process.kill()
        process.join(5)
        parent.close()
    if status != "ok":
        raise DiscoveryError(f"GPU discovery failed: {result}")
    return list(result)


def _find_instance(item: str, found: list[FoundGpu]) -> Target | None:
    legacy = _LEGACY_MIG.fullmatch(item)
    for gpu in found:
        for target in gpu.instances:
            mig = target.mig
            if target.uuid == item or (
                legacy is not None and mig is not None and mig.parent_uuid == legacy.group(1)
                and (mig.gpu_instance, mig.compute_instance) == (int(legacy[2]), int(legacy[3]))
            ):  # fmt: skip
                return target
    return None


def select_targets(selection: str | list[int | str], found: list[FoundGpu]) -> list[Target]:
    """Targets for `gpus: all | [indexes, GPU UUIDs, MIG UUIDs]`.

    A GPU named by index or UUID is probed as `FoundGpu.targets` says: per MIG instance when it
    is in MIG mode (selection by parent). A configured GPU or MIG instance that is not there
    still becomes a target: its worker then fails with `no_gpu`, visible in /health and the
    metrics, instead of the exporter refusing to start. Selecting a MIG instance twice, by
    itself and through its parent, is a configuration error (ConfigError).
    """
    if selection == "all":
        return [target for gpu in found for target in gpu.targets()]
    by_index = {gpu.index: gpu for gpu in found}
    by_uuid = {gpu.uuid: gpu for gpu in found}
    targets: list[Target] = []
    chosen: dict[str, int] = {}  # UUID -> position in `gpus` that selected it
    for position, item in enumerate(selection):
        gpu = by_index.get(item) if isinstance(item, int) else by_uuid.get(item)
        if gpu is not None:
            picked = gpu.targets()
        elif isinstance(item, int):
            picked = [Target(str(item), "")]
        else:
            picked = [_find_instance(item, found) or Target("", item)]
        for target in picked:
            if target.uuid and target.uuid in chosen:
                earlier = chosen[target.uuid]
                raise ConfigError(
                    f"gpus[{position}]: {item} selects {target.uuid}, which gpus[{earlier}] "
                    f"({selection[earlier]}) already selects"
                )
            chosen[target.uuid] = position
            targets.append(target)
    return targets


def visible_devices(target: Target) -> str:
    """CUDA_VISIBLE_DEVICES for a target's worker: its UUID, else its index."""
    return target.uuid or target.gpu
