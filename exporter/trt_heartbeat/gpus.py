"""Which GPUs to probe: discovered in a short-lived child process, never in the exporter itself.

NVML (or, without it, the CUDA driver) is asked once at start-up from a spawned process with a
timeout, so a driver that hangs on enumeration cannot hang the exporter. Each probe worker is
then bound to its GPU through CUDA_VISIBLE_DEVICES=<uuid> and sees only that device.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
from typing import Any

from .backends import Target
from .errors import HeartbeatError

DISCOVERY_TIMEOUT = 30.0


class DiscoveryError(HeartbeatError):
    pass


def _discover_nvml() -> list[tuple[int, str]]:
    import pynvml

    pynvml.nvmlInit()
    try:
        found = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            uuid = pynvml.nvmlDeviceGetUUID(pynvml.nvmlDeviceGetHandleByIndex(index))
            found.append((index, uuid.decode() if isinstance(uuid, bytes) else str(uuid)))
        return found
    finally:
        pynvml.nvmlShutdown()


def _discover_cuda() -> list[tuple[int, str]]:
    from cuda.bindings import driver as cu

    from .cuda_host.cuda_python import format_uuid

    cu.cuInit(0)
    err, count = cu.cuDeviceGetCount()
    if err != cu.CUresult.CUDA_SUCCESS:
        raise RuntimeError(f"cuDeviceGetCount: {err}")
    get_uuid = getattr(cu, "cuDeviceGetUuid_v2", None) or cu.cuDeviceGetUuid
    found = []
    for index in range(count):
        _, dev = cu.cuDeviceGet(index)
        _, uuid = get_uuid(dev)
        found.append((index, format_uuid(bytes(uuid.bytes))))
    return found


def _discover_child(conn: multiprocessing.connection.Connection) -> None:
    errors = []
    for source, discover in (("nvml", _discover_nvml), ("cuda", _discover_cuda)):
        try:
            conn.send(("ok", source, discover()))
            return
        except Exception as exc:
            errors.append(f"{source}: {type(exc).__name__}: {exc}")
    conn.send(("error", "", "; ".join(errors)))


def discover(timeout: float = DISCOVERY_TIMEOUT, context: Any = None) -> list[tuple[int, str]]:
    """(index, uuid) of every GPU visible to this container, in NVML (PCI bus) order."""
    ctx = context or multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    process = ctx.Process(target=_discover_child, args=(child,), name="gpu-discovery", daemon=True)
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


def select_targets(selection: str | list[int | str], found: list[tuple[int, str]]) -> list[Target]:
    """Targets for `gpus: all | [indexes] | [uuids]`.

    A configured GPU that is not there still becomes a target: its worker then fails with
    `no_gpu`, visible in /health and the metrics, instead of the exporter refusing to start.
    """
    if selection == "all":
        return [Target(str(index), uuid) for index, uuid in found]
    by_index = {index: uuid for index, uuid in found}
    by_uuid = {uuid: index for index, uuid in found}
    targets = []
    for item in selection:
        if isinstance(item, int):
            targets.append(Target(str(item), by_index.get(item, "")))
        elif item in by_uuid:
            targets.append(Target(str(by_uuid[item]), item))
        else:
            targets.append(Target("", item))
    return targets


def visible_devices(target: Target) -> str:
    """CUDA_VISIBLE_DEVICES for a target's worker: its UUID, else its index."""
    return target.uuid or target.gpu
