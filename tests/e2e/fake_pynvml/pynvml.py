"""`pynvml` for the end-to-end fleet: the exporters' NVML reader imports this in place of the
real module (PYTHONPATH), so the GPU telemetry panels and rules see data on a CPU machine."""

from fake_nvml import *  # noqa: F403
