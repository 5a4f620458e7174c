"""Backends of a user's own that declare where they probe, as the interface asks
(`probes_gpus`): one a GPU runtime would be (one worker per GPU), one that probes the host."""

from __future__ import annotations

from typing import ClassVar

from fault_backend import FaultBackend


class GpuOfMine(FaultBackend):
    probes_gpus: ClassVar[bool] = True


class HostOfMine(FaultBackend):
    probes_gpus: ClassVar[bool] = False
