"""`cuda` backend: the canonical network as one small kernel, compiled with NVRTC.

It gives a real GPU heartbeat (driver, context, stream, kernel, copies, golden check) on nodes
without TensorRT. One block of 256 threads: each computes one hidden unit, then 128 of them one
output each. Weights live on the device from prepare(); a probe copies the input in and the
output out, like an inference request would.
"""

from __future__ import annotations

import hashlib
from typing import Any, ClassVar

import numpy as np

from trt_heartbeat.domain import EngineInfo, Target
from trt_heartbeat.errors import BackendError, Reason
from trt_heartbeat.exporter import canonical
from trt_heartbeat.exporter.backends.base import BackendOptions
from trt_heartbeat.exporter.backends.gpu_backend import GpuBackend, io_buffers, upload
from trt_heartbeat.exporter.cuda_host import open_host
from trt_heartbeat.exporter.nvml import NvmlView

KERNEL_NAME = "canonical_mlp"
_DTYPES = {"fp32": (np.float32, "float"), "fp64": (np.float64, "double")}

KERNEL_SOURCE = r"""
// Generated per precision; shapes are the canonical network's. No macros: NVRTC's builtin
// headers use short template parameter names that a -D definition would clobber.
typedef {real} real_t;
constexpr int BATCH = {batch}, IN_FEATURES = {in_features}, HIDDEN = {hidden},
              OUT_FEATURES = {out_features};

extern "C" __global__ void __launch_bounds__(BATCH * HIDDEN) canonical_mlp(
    const real_t* __restrict__ x, const real_t* __restrict__ w1, const real_t* __restrict__ b1,
    const real_t* __restrict__ w2, const real_t* __restrict__ b2, real_t* __restrict__ y) {{
  __shared__ real_t hidden[BATCH * HIDDEN];
  const int t = threadIdx.x;
  const int row = t / HIDDEN, unit = t % HIDDEN;
  real_t acc = b1[unit];
  #pragma unroll 8
  for (int k = 0; k < IN_FEATURES; ++k) acc += x[row * IN_FEATURES + k] * w1[k * HIDDEN + unit];
  hidden[t] = acc > real_t(0) ? acc : real_t(0);
  __syncthreads();
  if (t < BATCH * OUT_FEATURES) {{
    const int r = t / OUT_FEATURES, c = t % OUT_FEATURES;
    real_t out = b2[c];
    #pragma unroll 8
    for (int k = 0; k < HIDDEN; ++k) out += hidden[r * HIDDEN + k] * w2[k * OUT_FEATURES + c];
    y[t] = out;
  }}
}}
"""


def kernel_source(real: str) -> str:
    return KERNEL_SOURCE.format(
        real=real,
        batch=canonical.BATCH,
        in_features=canonical.IN_FEATURES,
        hidden=canonical.HIDDEN,
        out_features=canonical.OUT_FEATURES,
    )


class CudaBackend(GpuBackend):
    name: ClassVar[str] = "cuda"
    precisions: ClassVar[tuple[str, ...]] = tuple(_DTYPES)

    def __init__(
        self, target: Target, precision: str, options: BackendOptions | None = None
    ) -> None:
        super().__init__(target, precision, options)
        self._kernel: Any = None
        self._args: list[int] = []

    def prepare(self) -> EngineInfo:
        try:  # NVRTC comes from cuda-python, whichever host API runs the probe
            from trt_heartbeat.exporter.cuda_host import nvrtc
        except ImportError as exc:
            raise BackendError(
                Reason.RUNTIME_MISSING, f"the cuda backend needs cuda-python (NVRTC): {exc}"
            ) from exc
        dtype, ctype = _DTYPES[self.precision]
        self._memory = NvmlView(self.target.uuid)
        host = self._host = open_host(self.options.cuda_api)
        net = canonical.network()
        weights = [
            upload(host, np.ascontiguousarray(a, dtype=dtype))
            for a in (net.w1, net.b1, net.w2, net.b2)
        ]
        self._io = io_buffers(host, net.x.astype(dtype), (canonical.BATCH, canonical.OUT_FEATURES))
        image = nvrtc.compile_cubin(
            kernel_source(ctype), "canonical_mlp.cu", host.device.compute_capability
        )
        self._kernel = host.load_kernel(image, KERNEL_NAME)
        self._args = [self._io.dev_in, *weights, self._io.dev_out]
        self._memory.setup_done()
        versions, details = self._stack(host, self._memory)
        return EngineInfo(
            backend=self.name,
            precision=self.precision,
            model=canonical.model_id(),
            engine_sha256=hashlib.sha256(image).hexdigest(),
            versions={**versions, "nvrtc_version": nvrtc.version()},
            details=details,
        )

    def _compute(self) -> None:
        assert self._host is not None
        self._host.launch(self._kernel, 1, canonical.BATCH * canonical.HIDDEN, self._args)
