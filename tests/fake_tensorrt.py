"""A stand-in for the TensorRT Python API, for the builder path only.

The full TensorRT (with the builder) installs only from NVIDIA's own package index, which our
machines cannot reach; this records what the backend asks of the documented 10.x/11.x API
(see ../shared/notes/tensorrt.md) so the wiring is tested. Real plans are never produced.
"""

from __future__ import annotations

import enum
from types import SimpleNamespace
from typing import Any

import numpy as np

__version__ = "11.4.0.106"
float32, float16 = "float32", "float16"


def nptype(dtype: str) -> type:
    return {"float32": np.float32, "float16": np.float16}[dtype]


class NetworkDefinitionCreationFlag(enum.IntEnum):
    STRONGLY_TYPED = 0  # 11.x: accepted and ignored


class BuilderFlag(enum.Enum):
    VERSION_COMPATIBLE = "VERSION_COMPATIBLE"
    TF32 = "TF32"


class HardwareCompatibilityLevel(enum.Enum):
    NONE = "NONE"
    AMPERE_PLUS = "AMPERE_PLUS"


MemoryPoolType = SimpleNamespace(WORKSPACE="WORKSPACE")
MatrixOperation = SimpleNamespace(NONE="NONE")
ElementWiseOperation = SimpleNamespace(SUM="SUM")
ActivationType = SimpleNamespace(RELU="RELU")


class ILogger:
    Severity = SimpleNamespace(INTERNAL_ERROR=0, ERROR=1, WARNING=2, INFO=3, VERBOSE=4)

    def __init__(self) -> None:
        pass


class Weights:
    def __init__(self, array: np.ndarray) -> None:
        assert array.flags["C_CONTIGUOUS"]
        self.array = array


class Tensor:
    def __init__(self, dtype: str, shape: tuple[int, ...], name: str = "") -> None:
        self.dtype, self.shape, self.name = dtype, shape, name


class Layer:
    def __init__(self, out: Tensor) -> None:
        self._out = out

    def get_output(self, index: int) -> Tensor:
        assert index == 0
        return self._out


class Network:
    def __init__(self, flags: int) -> None:
        self.flags = flags
        self.name = ""
        self.inputs: list[Tensor] = []
        self.outputs: list[Tensor] = []
        self.constants: list[np.ndarray] = []
        self.ops: list[str] = []

    def add_input(self, name: str, dtype: str, shape: tuple[int, ...]) -> Tensor:
        tensor = Tensor(dtype, tuple(shape), name)
        self.inputs.append(tensor)
        return tensor

    def add_constant(self, shape: tuple[int, ...], weights: Weights) -> Layer:
        assert tuple(shape) == weights.array.shape
        self.constants.append(weights.array)
        return Layer(Tensor(str(weights.array.dtype), tuple(shape)))

    def add_matrix_multiply(self, a: Tensor, op_a: str, b: Tensor, op_b: str) -> Layer:
        assert a.dtype == b.dtype, "strongly typed: operand types must match"
        assert a.shape[-1] == b.shape[0]
        self.ops.append("matmul")
        return Layer(Tensor(a.dtype, (a.shape[0], b.shape[1])))

    def add_elementwise(self, a: Tensor, b: Tensor, op: str) -> Layer:
        assert a.dtype == b.dtype and len(a.shape) == len(b.shape)
        self.ops.append("add")
        return Layer(Tensor(a.dtype, a.shape))

    def add_activation(self, x: Tensor, kind: str) -> Layer:
        self.ops.append("relu")
        return Layer(Tensor(x.dtype, x.shape))

    def mark_output(self, tensor: Tensor) -> None:
        self.outputs.append(tensor)


class BuilderConfig:
    def __init__(self) -> None:
        self.flags: set[Any] = set()
        self.pools: dict[str, int] = {}
        self.hardware_compatibility_level = HardwareCompatibilityLevel.NONE

    def set_flag(self, flag: Any) -> None:
        self.flags.add(flag)

    def set_memory_pool_limit(self, pool: str, size: int) -> None:
        self.pools[pool] = size


class Builder:
    last: Builder | None = None
    fail = False

    def __init__(self, logger: Any) -> None:
        self.logger = logger
        self.network: Network | None = None
        self.config: BuilderConfig | None = None
        Builder.last = self

    def create_network(self, flags: int) -> Network:
        self.network = Network(flags)
        return self.network

    def create_builder_config(self) -> BuilderConfig:
        self.config = BuilderConfig()
        return self.config

    def build_serialized_network(self, network: Network, config: BuilderConfig) -> bytes | None:
        if Builder.fail:
            self.logger.log(ILogger.Severity.ERROR, "injected: no implementation for MatMul")
            return None
        return b"ftrt" + bytes(20) + bytes([11, 4, 0, 106]) + b"fake plan body" * 10


class Runtime:
    refuse = False

    def __init__(self, logger: Any) -> None:
        self.logger = logger
        self.engine_host_code_allowed = False
        self.loaded: list[bytes] = []

    def deserialize_cuda_engine(self, plan: bytes) -> Any:
        self.loaded.append(plan)
        if Runtime.refuse:
            self.logger.log(ILogger.Severity.ERROR, "injected: Magic tag does not match")
            return None
        return SimpleNamespace(plan=plan)
