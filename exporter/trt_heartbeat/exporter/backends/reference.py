"""CPU reference backend: the canonical network in numpy.

It proves the exporter's plumbing on hosts without a GPU and is the yardstick the GPU
backends are compared with. It has no transfers, so it reports only the compute phase.
"""

from __future__ import annotations

import time
from typing import ClassVar

import numpy as np

from trt_heartbeat.domain import EngineInfo, Target
from trt_heartbeat.exporter import canonical
from trt_heartbeat.exporter.backends.base import BackendOptions, MemoryReading, RunResult

_DTYPES: dict[str, type[np.floating]] = {
    "fp64": np.float64,
    "fp32": np.float32,
    "fp16": np.float16,
}


class ReferenceBackend:
    name: ClassVar[str] = "reference"
    probes_gpus: ClassVar[bool] = False
    precisions: ClassVar[tuple[str, ...]] = tuple(_DTYPES)

    def __init__(
        self, target: Target, precision: str, options: BackendOptions | None = None
    ) -> None:
        self.target = target
        self.precision = precision
        self._weights: dict[str, np.ndarray] = {}

    def prepare(self) -> EngineInfo:
        dtype = _DTYPES[self.precision]
        self._weights = {k: v.astype(dtype) for k, v in canonical.network().arrays().items()}
        return EngineInfo(
            backend=self.name,
            precision=self.precision,
            model=canonical.model_id(),
            versions={"numpy_version": np.__version__},
        )

    def run(self) -> RunResult:
        w = self._weights
        start = time.perf_counter()
        hidden = np.maximum(w["x"] @ w["w1"] + w["b1"], 0)
        out = hidden @ w["w2"] + w["b2"]
        return RunResult(output=out, phases={"compute": time.perf_counter() - start})

    def memory(self) -> MemoryReading:
        return MemoryReading()  # no device

    def close(self) -> None:
        self._weights = {}
