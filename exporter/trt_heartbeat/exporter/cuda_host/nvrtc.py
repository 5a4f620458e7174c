"""Run-time compilation of the probe kernel with NVRTC (through cuda-python's bindings)."""

from __future__ import annotations

from typing import Any

from cuda.bindings import nvrtc

from trt_heartbeat.errors import BackendError, Reason


def _check(call: str, result: Any, program: Any = None) -> Any:
    err, *rest = result if isinstance(result, tuple) else (result,)
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        _, text = nvrtc.nvrtcGetErrorString(err)
        message = f"{call} failed: {text.decode() if isinstance(text, bytes) else text}"
        if program is not None:
            message += f": {program_log(program)}"
        raise BackendError(Reason.ENGINE_LOAD_FAILED, message)
    return rest[0] if len(rest) == 1 else rest


def program_log(program: Any) -> str:
    size = _check("nvrtcGetProgramLogSize", nvrtc.nvrtcGetProgramLogSize(program))
    log = b" " * int(size)
    _check("nvrtcGetProgramLog", nvrtc.nvrtcGetProgramLog(program, log))
    return log.decode(errors="replace").strip("\x00 \n")


def version() -> str:
    major, minor = _check("nvrtcVersion", nvrtc.nvrtcVersion())
    return f"{major}.{minor}"


def compile_cubin(source: str, name: str, compute_capability: tuple[int, int]) -> bytes:
    """Compile `source` to a cubin for exactly this GPU's architecture."""
    program = _check(
        "nvrtcCreateProgram", nvrtc.nvrtcCreateProgram(source.encode(), name.encode(), 0, [], [])
    )
    try:
        major, minor = compute_capability
        options = [f"--gpu-architecture=sm_{major}{minor}".encode(), b"--std=c++17"]
        _check(
            "nvrtcCompileProgram",
            nvrtc.nvrtcCompileProgram(program, len(options), options),
            program,
        )
        size = _check("nvrtcGetCUBINSize", nvrtc.nvrtcGetCUBINSize(program))
        image = b" " * int(size)
        _check("nvrtcGetCUBIN", nvrtc.nvrtcGetCUBIN(program, image))
        return image
    finally:
        nvrtc.nvrtcDestroyProgram(program)
