from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trt_heartbeat.domain import Target
from trt_heartbeat.exporter import canonical
from trt_heartbeat.exporter.backends.reference import ReferenceBackend

# Pinned: a change to the network, its weights or its input must be deliberate (a new model id).
DIGEST = "75169a163420"


def test_model_identity_is_pinned() -> None:
    assert canonical.model_digest().startswith(DIGEST)
    assert canonical.model_id() == f"canonical-mlp-v1@{DIGEST}"


def test_shapes_and_values_are_exact_in_half_precision() -> None:
    net = canonical.network()
    assert net.x.shape == (8, 64) and net.w1.shape == (64, 32) and net.w2.shape == (32, 16)
    for array in net.arrays().values():
        # Dyadic rationals with small numerators: float16 represents every one exactly.
        assert np.array_equal(array.astype(np.float16).astype(np.float64), array)


def test_golden_output_is_nontrivial() -> None:
    out = canonical.golden()
    assert out.shape == (8, 16)
    hidden = np.maximum(canonical.network().x @ canonical.network().w1 + canonical.network().b1, 0)
    assert 0.2 < (hidden == 0).mean() < 0.8, "ReLU must matter: some units on, some off"
    assert len(np.unique(out.round(9))) > 100, "outputs must differ so a shuffled buffer fails"


@pytest.mark.parametrize("precision", canonical.PRECISIONS)
def test_reference_backend_passes_at_every_precision(precision: str) -> None:
    backend = ReferenceBackend(Target("cpu"), precision)
    info = backend.prepare()
    assert info.model == canonical.model_id() and info.precision == precision
    result = backend.run()
    check = canonical.check_output(result.output, precision)
    assert check.passed, check.reason
    assert set(result.phases) == {"compute"} and result.phases["compute"] >= 0


@pytest.mark.parametrize("precision", canonical.PRECISIONS)
def test_error_just_outside_tolerance_is_a_mismatch(precision: str) -> None:
    tol = canonical.TOLERANCES[precision]
    out = canonical.golden().copy()
    out[3, 7] += tol.atol + tol.rtol * abs(out[3, 7]) * 1.01 + tol.atol * 0.01
    check = canonical.check_output(out, precision)
    assert not check.passed
    assert "1 of 128 outputs outside tolerance" in check.reason
    inside = canonical.golden().copy()
    inside[3, 7] += tol.atol * 0.5
    assert canonical.check_output(inside, precision).passed


def test_fp16_rounding_fails_the_fp32_tolerance() -> None:
    # A runtime silently computing in half precision must not pass an fp32 probe.
    noisy = canonical.golden() + np.where(np.arange(128).reshape(8, 16) % 2, 1e-3, -1e-3)
    assert canonical.check_output(noisy, "fp16").passed
    assert not canonical.check_output(noisy, "fp32").passed


def test_wrong_shape_and_nan_fail() -> None:
    assert "shape" in canonical.check_output(np.zeros((16, 8)), "fp32").reason
    bad = canonical.golden().copy()
    bad[0, 0] = np.nan
    check = canonical.check_output(bad, "fp32")
    assert not check.passed and check.reason == "output contains NaN or Inf"
    assert check.max_abs_error == float("inf")


ERRORS = st.floats(allow_nan=True, allow_infinity=True, width=32)


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(canonical.PRECISIONS),
    st.lists(st.tuples(st.integers(0, 127), ERRORS), max_size=4),
    st.sampled_from([np.float16, np.float32, np.float64]),
)
def test_the_golden_check_agrees_with_its_definition(
    precision: str, errors: list[tuple[int, float]], dtype: type
) -> None:
    # Passes exactly when every output is finite and within atol + rtol * |golden| (the check's
    # shortcut for the usual case must not change a verdict).
    ref = canonical.golden()
    out = ref.copy()
    for index, error in errors:
        out.flat[index] += error
    with np.errstate(over="ignore", invalid="ignore"):
        out = out.astype(dtype)  # as a backend of that precision would answer
        seen = out.astype(np.float64)
        tol = canonical.TOLERANCES[precision]
        within = np.abs(seen - ref) <= tol.atol + tol.rtol * np.abs(ref)
        expected = bool(np.all(np.isfinite(seen)) and np.all(within))
        assert canonical.check_output(out, precision).passed is expected
