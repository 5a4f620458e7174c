"""Whether the NVIDIA driver exposes a GPU here, from its device nodes alone: no CUDA or NVML
library is loaded, and nothing but the standard library is imported, so `make run` asks this
file (`python3 exporter/trt_heartbeat/exporter/devices.py`) before anything is installed.

The NVIDIA container runtime mounts the driver's procfs entries and /dev/nvidiaN nodes of the
GPUs a container may see, so this also holds inside Kubernetes pods. A Jetson's integrated GPU
has neither: its nodes are /dev/nvgpu/igpu0/* (JetPack 6) or /dev/nvhost-ctrl-gpu (JetPack 5
and older).
"""

from __future__ import annotations

from pathlib import Path

NVIDIA_PROC = Path("/proc/driver/nvidia/gpus")
DEV = Path("/dev")


def visible_gpu_node(proc_dir: Path = NVIDIA_PROC, dev_dir: Path = DEV) -> Path | None:
    """The first driver node that shows a GPU, or None."""
    try:
        entry = next(iter(sorted(proc_dir.iterdir())), None)
    except OSError:
        entry = None
    if entry is not None:
        return entry
    if (dev_dir / "nvgpu").is_dir():  # JetPack 6
        return dev_dir / "nvgpu"
    if (dev_dir / "nvhost-ctrl-gpu").exists():  # JetPack 5 and older
        return dev_dir / "nvhost-ctrl-gpu"
    return next(iter(sorted(dev_dir.glob("nvidia[0-9]*"))), None)


def gpu_visible(proc_dir: Path = NVIDIA_PROC, dev_dir: Path = DEV) -> bool:
    """Whether the NVIDIA driver exposes a GPU here, without loading any CUDA library."""
    return visible_gpu_node(proc_dir, dev_dir) is not None


if __name__ == "__main__":
    print(visible_gpu_node() or "")
