"""The statistics of canary-judge against brute force and textbook values."""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trt_heartbeat.canary.judge import stats
from trt_heartbeat.canary.judge.queries import Scope, SelectorError, parse_selector
from trt_heartbeat.canary.judge.thresholds import DEFAULTS
from trt_heartbeat.canary.judge.verdict import tail_check


def brute_u(canary: Sequence[float], baseline: Sequence[float]) -> float:
    return sum(
        1.0 if c > b else 0.5 if c == b else 0.0 for c, b in itertools.product(canary, baseline)
    )


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
    [
        ('{namespace="a"}', 'namespace="a"'),
        ('a="1", b=~"x|y"', 'a="1", b=~"x|y"'),
        ("{}", ""),
        ('job!="a,b"', 'job!="a,b"'),
        ("", ""),
    ],
)
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


# --- the tail check, the service checks' tests ---------------------------------------------------

BOUNDS = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, math.inf]
LIMIT = DEFAULTS[("canary_latency_ratio", "")]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.integers(0, 400), min_size=len(BOUNDS), max_size=len(BOUNDS)),
    st.lists(st.integers(0, 400), min_size=len(BOUNDS), max_size=len(BOUNDS)),
)
def test_the_judge_never_passes_a_window_the_alert_would_fire_on(
    canary: list[int], baseline: list[int]
) -> None:
    """The rule pack fires on histogram_quantile(0.99) canary/stable above the threshold, with
    enough probes; on the same buckets the judge's tail check is then fail or marginal."""
    c, b = [float(x) for x in canary], [float(x) for x in baseline]
    enough = min(sum(c), sum(b)) >= 50

    def p99(bins: list[float]) -> float:
        return stats.bucket_quantile(0.99, BOUNDS, list(itertools.accumulate(bins)))

    fires = enough and p99(b) > 0 and p99(c) / p99(b) > LIMIT
    check = tail_check(BOUNDS, c, b, LIMIT, 0.01, enough, "too few", "q")
    if fires:
        assert check.verdict in ("fail", "marginal"), (check.reason, c, b)


def test_tail_check_verdicts() -> None:
    base = [0, 500, 4000, 450, 50, 0, 0, 0]
    same = tail_check(
        BOUNDS, [float(x) for x in base], [float(x) for x in base], LIMIT, 0.01, True, "", "q"
    )
    assert same.verdict == "pass" and same.statistic["p99_ratio"] == pytest.approx(1.0)
    tail = [0, 500, 3600, 400, 100, 300, 100, 0]  # same median, a long tail
    worse = tail_check(
        BOUNDS, [float(x) for x in tail], [float(x) for x in base], LIMIT, 0.01, True, "", "q"
    )
    assert worse.verdict == "fail", worse.reason
    low, high = worse.statistic["p99_ratio_interval"]
    assert low <= worse.statistic["p99_ratio"] <= high


def test_two_proportion_and_homogeneity_tests() -> None:
    # 1.5% against 0.2% on canary volumes: overwhelming; equal ratios: nothing.
    assert stats.two_proportion_test(90, 6000, 23, 11400) < 1e-20
    assert stats.two_proportion_test(12, 6000, 23, 11400) > 0.4
    assert stats.two_proportion_test(0, 100, 0, 100) == 1.0
    drifted = stats.homogeneity_test([300, 300], [7000, 3000])
    assert drifted.tvd == pytest.approx(0.2) and drifted.p_value < 1e-20 and drifted.dof == 1
    # A class the baseline never predicts counts fully in the distance and keeps PSI finite.
    new_class = stats.homogeneity_test([50, 50, 100], [100, 100, 0])
    assert new_class.tvd == pytest.approx(0.5) and math.isfinite(new_class.psi)


@pytest.mark.parametrize(
    ("x", "dof", "p"),
    [(3.841, 1, 0.05), (11.070, 5, 0.05), (23.209, 10, 0.01), (0.5, 3, 0.9189), (2.0, 2, 0.3679)],
)
def test_chi_square_tail_matches_tables(x: float, dof: int, p: float) -> None:
    assert stats.chi_square_sf(x, dof) == pytest.approx(p, rel=2e-3)


def test_thresholds_defaults_equal_the_rule_pack() -> None:
    import yaml

    from conftest import ROOT

    recorded = {}
    pack = yaml.safe_load((ROOT / "rules/thresholds.rules.yml").read_text())
    for rule in pack["groups"][0]["rules"]:
        name = rule["record"].removeprefix("trt_heartbeat:threshold:")
        value = float(rule["expr"].removeprefix("vector(").removesuffix(")"))
        recorded[(name, rule.get("labels", {}).get("statistic", ""))] = value
    assert {k: recorded[k] for k in DEFAULTS} == DEFAULTS


def _binned(samples: list[float]) -> list[float]:
    counts = [0.0] * len(BOUNDS)
    for x in samples:
        counts[next(i for i, bound in enumerate(BOUNDS) if x <= bound)] += 1
    return counts


def test_the_tail_check_promotes_an_identical_canary_and_holds_a_slower_tail() -> None:
    # Backfilled ground truth: both tracks drawn from one distribution, 540 probes each (30 min
    # of three GPUs at 10 s): the old rule held it as marginal on a wide interval. Now a pass,
    # and a canary whose every probe is 1.7x slower (p99 ratio over 1.5) is not.
    rng = random.Random(7)
    draw = [rng.lognormvariate(math.log(0.004), 0.35) for _ in range(1080)]
    baseline, canary = _binned(draw[:540]), _binned(draw[540:])
    same = tail_check(BOUNDS, canary, baseline, LIMIT, 0.01, True, "", "q")
    assert same.verdict == "pass", same.reason
    slower = tail_check(
        BOUNDS, _binned([x * 1.7 for x in draw[540:]]), baseline, LIMIT, 0.01, True, "", "q"
    )
    assert slower.statistic["p99_ratio"] > LIMIT
    assert slower.verdict in ("fail", "marginal"), slower.reason


def test_the_tail_check_says_when_the_sample_cannot_show_a_tail() -> None:
    base = [0.0, 5.0, 40.0, 5.0, 0.0, 0.0, 0.0, 0.0]  # 50 probes: 0.5 expected beyond p99
    check = tail_check(BOUNDS, base, base, LIMIT, 0.01, True, "", "q")
    assert check.verdict == "pass"
    assert "too few probes to see a p99 tail: 50, need 500" in check.reason
    assert "p90 tail" not in check.reason
