"""Test-only GPU backend: the cuda backend, plus a kernel that never finishes on demand.

With {"probe": "hang"} in $TRT_HEARTBEAT_FAULT_FILE the probe launches a spinning kernel instead
of the canonical one, so the worker blocks in stream synchronisation on a really busy GPU — the
fault the timeout-and-kill watchdog exists for.
"""

from __future__ import annotations

from typing import Any

from fault_backend import control
from trt_heartbeat.exporter.backends.cuda import CudaBackend
from trt_heartbeat.exporter.cuda_host import nvrtc

SPIN = r"""
extern "C" __global__ void spin(volatile int* flag) {
  while (*flag == 0) { }  // nothing ever sets it
}
"""


class HangingCudaBackend(CudaBackend):
    name = "cuda"

    def prepare(self) -> Any:
        info = super().prepare()
        assert self._host is not None
        image = nvrtc.compile_cubin(SPIN, "spin.cu", self._host.device.compute_capability)
        self._spin = self._host.load_kernel(image, "spin")
        self._flag = self._host.alloc(4)
        zero = self._host.pinned((1,), "int32")
        zero[0] = 0
        self._host.h2d(self._flag, zero)
        self._host.synchronize()
        return info

    def _compute(self) -> None:
        assert self._host is not None
        if control(self.target).get("probe") == "hang":
            self._host.launch(self._spin, 1, 1, [self._flag])
        else:
            super()._compute()
