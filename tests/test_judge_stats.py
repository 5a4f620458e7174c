"""The statistics of canary-judge against brute force and textbook values."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from trt_heartbeat.judge import stats
from trt_heartbeat.judge.queries import Scope, SelectorError, parse_selector


def brute_u(canary: list[float], baseline: list[float]) -> float:
    return sum(1.0 if c > b else 0.5 if c == b else 0.0
               for c, b in itertools.product(canary, baseline))  # fmt: skip


def test_binned_u_equals_counting_pairs() -> None:
    rng = random.Random(1)
    for _ in range(50):
        bins = rng.randint(1, 6)
        canary = [float(rng.randint(0, 9)) for _ in range(bins)]
        baseline = [float(rng.randint(0, 9)) for _ in range(bins)]
        c_samples = [i for i, n in enumerate(canary) for _ in range(int(n))]
        b_samples = [i for i, n in enumerate(baseline) for _ in range(int(n))]
        result = stats.rank_test_binned(canary, baseline)
        assert result.u == pytest.approx(brute_u(c_samples, b_samples))
        if c_samples and b_samples:
            assert result.effect == pytest.approx(result.u / (len(c_samples) * len(b_samples)))


def test_rank_test_p_value_matches_the_exact_permutation_distribution() -> None:
    # 8 vs 8 distinct values, canary the top 6 and 2 low: exact one-sided p by enumeration.
    canary = [3.0, 9, 10, 11, 12, 13, 14, 15]
    baseline = [1.0, 2, 4, 5, 6, 7, 8, 16]
    observed = brute_u(canary, baseline)
    pooled = canary + baseline
    total = hits = 0
    for chosen in itertools.combinations(range(16), 8):
        c = [pooled[i] for i in chosen]
        b = [pooled[i] for i in range(16) if i not in chosen]
        total += 1
        hits += brute_u(c, b) >= observed
    exact = hits / total
    approx = stats.rank_test_samples(canary, baseline).p_value
    assert approx == pytest.approx(exact, rel=0.15)
    assert 0.01 < exact < 0.05


def test_identical_tracks_show_no_effect() -> None:
    result = stats.rank_test_binned([10, 50, 40, 0], [10, 50, 40, 0])
    assert result.effect == pytest.approx(0.5)
    assert result.p_value > 0.4


def test_everything_in_one_bin_is_no_evidence() -> None:
    result = stats.rank_test_binned([0, 100, 0], [0, 80, 0])
    assert (result.effect, result.p_value) == (0.5, 1.0)


def test_a_shift_is_not_a_dispersion_change_but_a_spread_is() -> None:
    # Geometric bounds, so that a shift by one bucket is the same shift in log space everywhere.
    centres = stats.bin_centres([1e-3, 2e-3, 4e-3, 8e-3, 16e-3, math.inf])
    shifted = stats.dispersion_test_binned([0, 20, 60, 20, 0, 0], [20, 60, 20, 0, 0, 0], centres)
    assert shifted.effect == pytest.approx(0.5) and shifted.p_value > 0.4
    wider = stats.dispersion_test_binned([25, 10, 30, 10, 25, 0], [5, 20, 50, 20, 5, 0], centres)
    # By hand: deviations 2/1/0 buckets with shares .5/.2/.3 against .1/.4/.5.
    assert wider.effect == pytest.approx(0.5 * 0.95 + 0.2 * 0.7 + 0.3 * 0.25)
    assert wider.p_value < 1e-6


def test_rate_test_is_the_exact_binomial_tail() -> None:
    # 5 failures in 100 canary probes, none in 100 baseline ones: P(all 5 on the canary) = 1/32.
    assert stats.rate_test(5, 100, 0, 100).p_value == pytest.approx(1 / 32)
    # No canary failures: nothing to see.
    assert stats.rate_test(0, 100, 7, 100).p_value == 1.0
    brute = sum(math.comb(12, i) * 0.25**i * 0.75 ** (12 - i) for i in range(6, 13))
    assert stats.rate_test(6, 100, 6, 300).p_value == pytest.approx(brute)


def test_bucket_quantile_interpolates_like_prometheus() -> None:
    bounds = [0.001, 0.0025, 0.005, math.inf]
    assert stats.bucket_quantile(0.5, bounds, [0, 50, 100, 100]) == pytest.approx(0.0025)
    assert stats.bucket_quantile(0.25, bounds, [0, 50, 100, 100]) == pytest.approx(0.00175)
    assert stats.bucket_quantile(0.99, bounds, [0, 0, 50, 100]) == 0.005  # in +Inf
    assert math.isnan(stats.bucket_quantile(0.5, bounds, [0, 0, 0, 0]))


@pytest.mark.parametrize(
    ("text", "inner"),
    [('{namespace="a"}', 'namespace="a"'), ('a="1", b=~"x|y"', 'a="1", b=~"x|y"'), ("{}", ""),
     ('job!="a,b"', 'job!="a,b"'), ("", "")],
)  # fmt: skip
def test_selectors(text: str, inner: str) -> None:
    assert parse_selector(text) == inner


@pytest.mark.parametrize("text", ["{a=b}", "a", 'a="1" b="2"', '{a="1"', 'a="unterminated'])
def test_bad_selectors(text: str) -> None:
    with pytest.raises(SelectorError):
        parse_selector(text)


def test_matchers_combine_selector_tracks_and_extra() -> None:
    scope = Scope(1800, 0, 'namespace="infer"', "track", "canary", "stable")
    assert scope.matchers('phase="total"') == (
        '{phase="total", namespace="infer", track=~"canary|stable"}'
    )
    assert scope.range == "[1800s]"
