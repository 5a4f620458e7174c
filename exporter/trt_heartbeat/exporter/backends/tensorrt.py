"""`tensorrt` backend: the canonical network as a TensorRT engine, run with the v3 API.

Works with the full TensorRT (which has the builder) and with the lean runtime (which can only
deserialize plans built elsewhere, e.g. by `build-engine` in an init container), TensorRT 10.x and
11.x. Features are detected, not inferred from version strings.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any, ClassVar

import numpy as np

from trt_heartbeat.domain import EngineInfo, Target
from trt_heartbeat.errors import BackendError, Reason
from trt_heartbeat.exporter import canonical
from trt_heartbeat.exporter.backends.base import BackendOptions
from trt_heartbeat.exporter.backends.gpu_backend import GpuBackend, io_buffers
from trt_heartbeat.exporter.cuda_host import CudaHost, open_host
from trt_heartbeat.exporter.engine_cache import (
    EngineCache,
    Manifest,
    PlanRequest,
    default_cache_dir,
)
from trt_heartbeat.exporter.nvml import NvmlView

# Import names, most capable first. The PyPI meta packages provide `tensorrt`/`tensorrt_lean`;
# the bindings wheels alone provide the *_bindings modules.
_MODULES = ("tensorrt", "tensorrt_bindings", "tensorrt_lean", "tensorrt_lean_bindings")
_DTYPES = {"fp32": np.float32, "fp16": np.float16}
WORKSPACE_BYTES = 64 << 20


def import_tensorrt() -> tuple[ModuleType, str]:
    """The installed TensorRT module and its flavour: "full" (has a builder) or "lean"."""
    problems = []
    for name in _MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError as exc:
            problems.append(f"{name}: {exc}")
            continue
        return module, "full" if hasattr(module, "Builder") else "lean"
    raise BackendError(
        Reason.RUNTIME_MISSING,
        "TensorRT is not installed (neither tensorrt nor tensorrt_lean imports): "
        + "; ".join(problems[:2]),
    )


def make_logger(trt: Any) -> Any:
    """An ILogger that keeps errors, so a failed build or load can say why."""

    class CapturingLogger(trt.ILogger):  # type: ignore[misc]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            if severity in (trt.ILogger.Severity.ERROR, trt.ILogger.Severity.INTERNAL_ERROR):
                self.errors.append(msg.strip())

        def take(self) -> str:
            text = " | ".join(self.errors[-3:]) or "no message from TensorRT"
            self.errors.clear()
            return text

    return CapturingLogger()


def build_plan(
    trt: Any,
    logger: Any,
    precision: str,
    version_compatible: bool = False,
    hardware_compatible: bool = False,
) -> bytes:
    """Build the canonical network with the network-definition API (no ONNX) and serialize it."""
    if not hasattr(trt, "Builder"):
        raise BackendError(
            Reason.RUNTIME_MISSING,
            "building an engine needs the full TensorRT; the lean runtime only runs plans "
            "(build one with `trt-heartbeat-exporter build-engine` where TensorRT is installed)",
        )
    dtype = _DTYPES[precision]
    trt_dtype = trt.float16 if precision == "fp16" else trt.float32
    builder = trt.Builder(logger)
    # Strongly typed: precision follows tensor types. 11.x only has strong typing (the flag is
    # accepted and ignored); 10.x needs the flag. Very old releases lack it: fall back to the
    # FP16 builder flag there.
    strong = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    network = builder.create_network(1 << int(strong) if strong is not None else 0)
    network.name = canonical.model_id()
    net = canonical.network()
    keep = []  # TensorRT references weight memory until the build finishes

    def constant(array: np.ndarray) -> Any:
        values = np.ascontiguousarray(array, dtype=dtype)
        keep.append(values)
        return network.add_constant(values.shape, trt.Weights(values)).get_output(0)

    def dense(inputs: Any, weights: np.ndarray, bias: np.ndarray) -> Any:
        none = trt.MatrixOperation.NONE
        product = network.add_matrix_multiply(inputs, none, constant(weights), none).get_output(0)
        return network.add_elementwise(
            product, constant(bias), trt.ElementWiseOperation.SUM
        ).get_output(0)

    x = network.add_input(canonical.INPUT_NAME, trt_dtype, (canonical.BATCH, canonical.IN_FEATURES))
    hidden = network.add_activation(dense(x, net.w1, net.b1), trt.ActivationType.RELU)
    y = dense(hidden.get_output(0), net.w2, net.b2)
    y.name = canonical.OUTPUT_NAME
    network.mark_output(y)

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    if strong is None and precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    if version_compatible:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    if hardware_compatible:
        config.hardware_compatibility_level = trt.HardwareCompatibilityLevel.AMPERE_PLUS
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise BackendError(
            Reason.ENGINE_LOAD_FAILED, f"TensorRT engine build failed: {logger.take()}"
        )
    return bytes(plan)


def plan_request(trt: Any, host: CudaHost, precision: str) -> PlanRequest:
    major, minor = host.device.compute_capability
    return PlanRequest(
        tensorrt_version=trt.__version__,
        gpu_name=host.device.name,
        compute_capability=f"{major}.{minor}",
        model_digest=canonical.model_digest(),
        precision=precision,
    )


class TensorRTBackend(GpuBackend):
    name: ClassVar[str] = "tensorrt"
    precisions: ClassVar[tuple[str, ...]] = tuple(_DTYPES)

    def __init__(
        self, target: Target, precision: str, options: BackendOptions | None = None
    ) -> None:
        super().__init__(target, precision, options)
        self._engine: Any = None
        self._context: Any = None
        self._logger: Any = None

    def prepare(self) -> EngineInfo:
        trt, flavour = import_tensorrt()
        self._memory = NvmlView(self.target.uuid)
        host = self._host = open_host(self.options.cuda_api)  # context current before TensorRT
        self._logger = make_logger(trt)
        runtime = trt.Runtime(self._logger)
        request = plan_request(trt, host, self.precision)
        cache = EngineCache(self.options.engine_cache_dir or default_cache_dir())
        manifest, cache_state = self._plan(trt, flavour, runtime, request, cache)
        self._bind(trt, host)
        self._memory.setup_done()
        versions, details = self._stack(host, self._memory)
        return EngineInfo(
            backend=self.name,
            precision=self.precision,
            model=canonical.model_id(),
            engine_sha256=manifest.plan_sha256 if manifest else "",
            versions={**versions, "tensorrt_version": trt.__version__},
            details={
                **details,
                "tensorrt_runtime": flavour,
                "engine_cache": cache_state,
                "plan_file": str(cache.directory / manifest.plan_file) if manifest else "",
            },
        )

    def _plan(
        self, trt: Any, flavour: str, runtime: Any, request: PlanRequest, cache: EngineCache
    ) -> tuple[Manifest | None, str]:
        """Load a cached plan, or build (full TensorRT only) and cache one."""
        cached, problems = cache.lookup(request)
        if cached is not None:
            runtime.engine_host_code_allowed = cached.manifest.version_compatible
            self._engine = runtime.deserialize_cuda_engine(cached.plan)
            if self._engine is not None:
                return cached.manifest, "hit"
            refused = self._logger.take()
            problems.append(f"{cached.manifest.plan_file}: TensorRT refused it: {refused}")
        if flavour == "lean":
            # The lean runtime cannot build; say exactly what is wrong, once, and stay unhealthy.
            if problems:
                raise BackendError(
                    Reason.ENGINE_INCOMPATIBLE,
                    f"no usable plan in {cache.directory}: " + "; ".join(problems),
                )
            raise BackendError(
                Reason.ENGINE_LOAD_FAILED,
                f"no plan in {cache.directory} for TensorRT {request.tensorrt_version} on "
                f"{request.gpu_name} ({request.precision}); the lean runtime cannot build one: run "
                "`trt-heartbeat-exporter build-engine` with the full TensorRT",
            )
        plan = build_plan(trt, self._logger, self.precision)
        runtime.engine_host_code_allowed = False
        self._engine = runtime.deserialize_cuda_engine(plan)
        if self._engine is None:
            raise BackendError(
                Reason.ENGINE_LOAD_FAILED,
                f"TensorRT could not load the plan it just built: {self._logger.take()}",
            )
        try:
            manifest = cache.store(plan, request)
            state = "rebuilt" if problems else "built"
        except OSError as exc:  # an unwritable cache costs a rebuild next start, not the probe
            manifest, state = None, f"built, not cached: {exc.strerror or exc}"
        return manifest, state

    def _bind(self, trt: Any, host: CudaHost) -> None:
        engine = self._engine
        names = {engine.get_tensor_name(i) for i in range(engine.num_io_tensors)}
        expected = {canonical.INPUT_NAME, canonical.OUTPUT_NAME}
        if names != expected:
            raise BackendError(
                Reason.ENGINE_INCOMPATIBLE,
                f"engine tensors {sorted(names)} are not the canonical {sorted(expected)}",
            )
        dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(canonical.INPUT_NAME)))
        x = canonical.network().x.astype(dtype)
        out_shape = tuple(engine.get_tensor_shape(canonical.OUTPUT_NAME))
        self._io = io_buffers(host, x, out_shape)
        self._context = engine.create_execution_context()
        if self._context is None:
            raise BackendError(
                Reason.ENGINE_LOAD_FAILED,
                f"could not create an execution context: {self._logger.take()}",
            )
        for name, ptr in (
            (canonical.INPUT_NAME, self._io.dev_in),
            (canonical.OUTPUT_NAME, self._io.dev_out),
        ):
            if not self._context.set_tensor_address(name, ptr):
                raise BackendError(Reason.ENGINE_LOAD_FAILED, f"set_tensor_address({name}) failed")

    def _compute(self) -> None:
        assert self._host is not None
        if not self._context.execute_async_v3(self._host.stream_handle()):
            raise BackendError(
                Reason.CUDA_ERROR, f"execute_async_v3 failed: {self._logger.take()}", fatal=True
            )

    def _release(self) -> None:
        self._context = self._engine = None


def build_engine(
    precision: str,
    cache_dir: str,
    version_compatible: bool,
    hardware_compatible: bool,
    cuda_api: str = "cuda-python",
) -> Manifest:
    """Build the canonical plan ahead of time and store it in the cache (`build-engine`)."""
    trt, flavour = import_tensorrt()
    if flavour != "full":
        raise BackendError(
            Reason.RUNTIME_MISSING,
            f"build-engine needs the full TensorRT (found {trt.__name__} {trt.__version__}, "
            "which can only run plans)",
        )
    host = open_host(cuda_api)
    try:
        logger = make_logger(trt)
        plan = build_plan(trt, logger, precision, version_compatible, hardware_compatible)
        hardware = "ampere_plus" if hardware_compatible else "none"
        return EngineCache(cache_dir).store(
            plan, plan_request(trt, host, precision), version_compatible, hardware
        )
    finally:
        host.close()
