"""The canonical probe network, defined once for every backend.

x[8,64] -> MatMul W1[64,32] + b1 -> ReLU -> MatMul W2[32,16] + b2 -> y[8,16]

Every value is a small dyadic rational generated in closed form, so it is exact in
float16, float32, TF32 and float64 alike and identical on every numpy version and CPU:
the golden output depends on nothing but this file.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from functools import cache

import numpy as np

NAME = "canonical-mlp-v1"
BATCH, IN_FEATURES, HIDDEN, OUT_FEATURES = 8, 64, 32, 16
INPUT_NAME, OUTPUT_NAME = "x", "y"


@dataclass(frozen=True)
class Tolerance:
    """An output element passes when |y - golden| <= atol + rtol * |golden| (numpy.allclose)."""

    atol: float
    rtol: float


# Outputs lie within +-0.15. fp32 allows for TF32 tensor-core matmuls (10-bit mantissa), which
# GPU runtimes use by default; a real corruption (bit flip, wrong kernel, stale buffer) is orders
# of magnitude larger.
TOLERANCES: dict[str, Tolerance] = {
    "fp64": Tolerance(atol=1e-9, rtol=1e-9),
    "fp32": Tolerance(atol=5e-4, rtol=1e-3),
    "fp16": Tolerance(atol=5e-3, rtol=1e-2),
}
PRECISIONS = tuple(TOLERANCES)


def _pattern(rows: int, cols: int, a: int, b: int, c: int, modulus: int, scale: int) -> np.ndarray:
    """((a*i + b*j + c) mod modulus - modulus//2) / scale: integers over a power of two."""
    i = np.arange(rows, dtype=np.int64)[:, None]
    j = np.arange(cols, dtype=np.int64)[None, :]
    return (((a * i + b * j + c) % modulus) - modulus // 2).astype(np.float64) / scale


@dataclass(frozen=True)
class CanonicalNetwork:
    x: np.ndarray
    w1: np.ndarray
    b1: np.ndarray
    w2: np.ndarray
    b2: np.ndarray

    def arrays(self) -> dict[str, np.ndarray]:
        return {"x": self.x, "w1": self.w1, "b1": self.b1, "w2": self.w2, "b2": self.b2}

    def forward(self, dtype: type[np.floating] = np.float64) -> np.ndarray:
        """The network evaluated with every tensor in `dtype` (float64 gives the golden output)."""
        a = {k: v.astype(dtype) for k, v in self.arrays().items()}
        hidden = np.maximum(a["x"] @ a["w1"] + a["b1"], 0)
        return np.asarray(hidden @ a["w2"] + a["b2"], dtype=dtype)


@cache
def network() -> CanonicalNetwork:
    return CanonicalNetwork(
        x=_pattern(BATCH, IN_FEATURES, 37, 11, 5, 17, 16),
        w1=_pattern(IN_FEATURES, HIDDEN, 13, 7, 3, 19, 64),
        b1=_pattern(1, HIDDEN, 0, 5, 1, 9, 32),
        w2=_pattern(HIDDEN, OUT_FEATURES, 7, 17, 2, 23, 64),
        b2=_pattern(1, OUT_FEATURES, 0, 3, 4, 7, 32),
    )


@cache
def golden() -> np.ndarray:
    out = network().forward(np.float64)
    out.setflags(write=False)
    return out


@cache
def model_digest() -> str:
    """sha256 over the network definition, the weights and the input: the model identity."""
    net = network()
    h = hashlib.sha256()
    definition = {
        "name": NAME,
        "layers": ["matmul(x,w1)", "add(b1)", "relu", "matmul(w2)", "add(b2)"],
        "shapes": {k: list(v.shape) for k, v in net.arrays().items()},
    }
    h.update(json.dumps(definition, sort_keys=True).encode())
    for key, value in net.arrays().items():
        h.update(key.encode())
        h.update(np.ascontiguousarray(value, dtype="<f8").tobytes())
    return h.hexdigest()


def model_id() -> str:
    """Short model label for metrics: name plus the first 12 hex digits of the digest."""
    return f"{NAME}@{model_digest()[:12]}"


@dataclass(frozen=True)
class GoldenCheck:
    passed: bool
    max_abs_error: float
    reason: str  # "" when passed, else a short human message


@cache
def _bound(precision: str) -> tuple[np.ndarray, float]:
    """Per output, the largest error the precision's tolerance allows; and the least of them."""
    tol = TOLERANCES[precision]
    bound = tol.atol + tol.rtol * np.abs(golden())
    return bound, float(bound.min())


def check_output(output: object, precision: str) -> GoldenCheck:
    """Compare a backend's output with the golden output under the precision's tolerance."""
    ref = golden()
    arr = np.asarray(output)
    if arr.shape != ref.shape:
        return GoldenCheck(False, float("inf"), f"output shape {arr.shape} != {ref.shape}")
    diff = np.abs(arr - ref)  # float64, as the golden output is
    max_err = float(diff.max())  # NaN if any output is NaN
    if not math.isfinite(max_err):
        return GoldenCheck(False, float("inf"), "output contains NaN or Inf")
    bound, least = _bound(precision)
    if max_err <= least:  # every output within even the tightest bound: the usual case
        return GoldenCheck(True, max_err, "")
    bad = diff > bound
    if bad.any():
        tol = TOLERANCES[precision]
        return GoldenCheck(
            False,
            max_err,
            f"{int(bad.sum())} of {bad.size} outputs outside tolerance "
            f"(max abs error {max_err:.3g}, atol {tol.atol:g}, rtol {tol.rtol:g})",
        )
    return GoldenCheck(True, max_err, "")
