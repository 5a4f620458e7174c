"""Probe backends, looked up by name and imported lazily.

The exporter's own process never imports a backend: only child processes do (the probe workers,
and the short-lived one that reads a backend of your own's `probes_gpus`), so CUDA, TensorRT
and NVML code can never wedge or crash the HTTP server.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from functools import cache
from typing import cast

from trt_heartbeat.domain import EngineInfo, MigInstance, Target
from trt_heartbeat.errors import UnknownBackendError
from trt_heartbeat.exporter.backends.base import (
    Backend,
    BackendFactory,
    BackendOptions,
    MemoryReading,
    RunResult,
)
from trt_heartbeat.exporter.child import ChildError, call_in_child


@dataclass(frozen=True)
class Registered:
    """A built-in backend: its import spec, and its class's `probes_gpus` as data, so that
    start-up needs no child process for it (tests/test_gpu_selection.py keeps the two equal)."""

    spec: str
    probes_gpus: bool


# name -> the built-in backend; modules are imported only inside child processes.
REGISTRY: dict[str, Registered] = {
    "reference": Registered("trt_heartbeat.exporter.backends.reference:ReferenceBackend", False),
    "cuda": Registered("trt_heartbeat.exporter.backends.cuda:CudaBackend", True),
    "tensorrt": Registered("trt_heartbeat.exporter.backends.tensorrt:TensorRTBackend", True),
}
# A backend that does not answer within this is asked no further; its workers report why.
DECLARATION_TIMEOUT = 30.0


def known_backends() -> list[str]:
    return sorted(REGISTRY)


def resolve_spec(name: str) -> str:
    """Map a backend name to its import spec without importing it.

    Besides the registered names, a `package.module:Class` spec loads a backend of your own.
    """
    if name in REGISTRY:
        return REGISTRY[name].spec
    if ":" in name:
        module, _, attr = name.partition(":")
        if module and attr:
            return name
    raise UnknownBackendError(
        f"unknown backend {name!r}: expected auto, {', '.join(known_backends())} "
        "or a 'package.module:Class' spec"
    )


def load_backend(spec: str) -> BackendFactory:
    """Import a backend class from its spec (call only inside a child process)."""
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
        return cast(BackendFactory, getattr(module, attr))
    except (ImportError, AttributeError) as exc:
        raise UnknownBackendError(f"cannot load backend {spec!r}: {exc}") from exc


def _declared(spec: str) -> bool | None:
    declared = getattr(load_backend(spec), "probes_gpus", None)
    return declared if isinstance(declared, bool) else None


@cache
def declared_gpu_use(spec: str) -> bool | None:
    """A backend class's `probes_gpus`: from the registry for a built-in one, else read in a
    short-lived child process (never imported here); None where it does not say or cannot be
    loaded (its workers then say why)."""
    builtin = next((r for r in REGISTRY.values() if r.spec == spec), None)
    if builtin is not None:
        return builtin.probes_gpus
    try:
        declared: bool | None = call_in_child(
            _declared, spec, timeout=DECLARATION_TIMEOUT, name="backend-declaration"
        )
    except ChildError:
        return None
    return declared


__all__ = [
    "DECLARATION_TIMEOUT",
    "REGISTRY",
    "Backend",
    "BackendFactory",
    "BackendOptions",
    "EngineInfo",
    "MemoryReading",
    "MigInstance",
    "Registered",
    "RunResult",
    "Target",
    "declared_gpu_use",
    "known_backends",
    "load_backend",
    "resolve_spec",
]
