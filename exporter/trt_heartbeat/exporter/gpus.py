"""Which GPUs to probe: discovered in a short-lived child process, never in the exporter itself.

NVML (or, without it, the CUDA driver) is asked once at start-up from a spawned process with a
timeout, so a driver that hangs on enumeration cannot hang the exporter. Each probe worker is
then bound to its GPU through CUDA_VISIBLE_DEVICES=<uuid> and sees only that device. A GPU in MIG
mode is probed per MIG instance (CUDA_VISIBLE_DEVICES=MIG-<uuid>): each instance is what a
service gets, and each can wedge or run out of memory on its own.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from trt_heartbeat.domain import Target
from trt_heartbeat.errors import ConfigError, HeartbeatError
from trt_heartbeat.exporter.backends import declared_gpu_use, resolve_spec
from trt_heartbeat.exporter.child import ChildError, call_in_child

if TYPE_CHECKING:  # workers import this module: keep config (jsonschema, yaml) out of them
    from trt_heartbeat.exporter.config import Settings

log = logging.getLogger("trt_heartbeat")

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
    from trt_heartbeat.exporter import nvml

    return [FoundGpu(*gpu) for gpu in nvml.discover(module)]


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


def _discover_any(nvml_module: str) -> list[FoundGpu]:
    errors = []
    for source in ("nvml", "cuda"):
        try:
            return _discover_nvml(nvml_module) if source == "nvml" else _discover_cuda()
        except Exception as exc:
            errors.append(f"{source}: {type(exc).__name__}: {exc}")
    raise DiscoveryError("; ".join(errors))


def discover(
    timeout: float = DISCOVERY_TIMEOUT, context: Any = None, nvml_module: str = "pynvml"
) -> list[FoundGpu]:
    """Every GPU visible to this container, in NVML (PCI bus) order, with its MIG instances."""
    try:
        found = call_in_child(
            _discover_any, nvml_module, timeout=timeout, name="gpu-discovery", context=context
        )
    except ChildError as exc:
        if exc.kind == "failed":
            raise DiscoveryError(f"GPU discovery failed: {exc.message}") from exc
        raise DiscoveryError(f"GPU discovery {exc}") from exc
    return list(found)


def _find_instance(item: str, found: list[FoundGpu]) -> Target | None:
    legacy = _LEGACY_MIG.fullmatch(item)
    for gpu in found:
        for target in gpu.instances:
            mig = target.mig
            if target.uuid == item or (
                legacy is not None
                and mig is not None
                and mig.parent_uuid == legacy.group(1)
                and (mig.gpu_instance, mig.compute_instance) == (int(legacy[2]), int(legacy[3]))
            ):
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


# Where to probe, decided at start-up from the environment and the settings.


def select_backend(name: str, has_gpu: bool) -> str:
    """Resolve `auto`: tensorrt where a GPU is visible, reference only where none is.

    With a GPU present a broken TensorRT makes the targets unhealthy (runtime_missing); it never
    falls back to a CPU probe that would report a healthy heartbeat for a GPU it did not touch.
    """
    if name != "auto":
        resolve_spec(name)  # fail early on a typo, before any worker starts
        return name
    return "tensorrt" if has_gpu else "reference"


def probes_gpus(backend: str, settings: Settings, has_gpu: bool) -> bool:
    """Whether a backend's targets are the GPUs (one worker each, bound to its GPU) or the host.

    As the backend class declares (`probes_gpus`: the registry's for a built-in one, read in a
    child process for one of your own, as the exporter never imports a backend); one of your
    own that does not say probes the GPUs wherever one is visible or `gpus` names some, the
    host elsewhere.
    """
    declared = declared_gpu_use(resolve_spec(backend))
    return declared if declared is not None else has_gpu or settings.gpus != "all"


def targets_for(backend: str, settings: Settings, has_gpu: bool = False) -> list[Target]:
    if not probes_gpus(backend, settings, has_gpu):
        return [Target(gpu="cpu")]
    try:
        found = discover()
    except DiscoveryError as exc:
        # Probe what was asked for anyway: each worker then reports the real failure reason.
        log.error("GPU discovery failed", extra={"fields": {"error": str(exc)}})
        found = []
    targets = select_targets(settings.gpus, found)
    if not targets:
        log.error("no GPU found to probe", extra={"fields": {"gpus": str(settings.gpus)}})
        targets = [Target(gpu="0")]
    return targets
