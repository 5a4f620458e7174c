"""The statistics behind canary-judge, on the shapes Prometheus gives: binned counts and samples.

Pure functions, no I/O. Latency arrives as histogram bucket counts, so the rank test works on
ordered bins (observations in one bin are ties); gauges arrive as per-scrape samples.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class RankTest:
    """One-sided Mann-Whitney U: is the canary stochastically greater than the baseline?"""

    n_canary: float
    n_baseline: float
    u: float
    # Vargha-Delaney A: P(canary > baseline) + P(tie) / 2; 0.5 means no difference.
    effect: float
    p_value: float


def rank_test_binned(canary: Sequence[float], baseline: Sequence[float]) -> RankTest:
    """Mann-Whitney U over counts in the same ordered bins, ties corrected, normal approximation.

    With histogram buckets every observation is only known up to its bin, so observations sharing
    a bin are ties: the tie-corrected variance keeps the test honest when most of both tracks
    fall into one or two buckets.
    """
    if len(canary) != len(baseline):
        raise ValueError("both tracks must be binned alike")
    n1, n2 = float(sum(canary)), float(sum(baseline))
    if n1 <= 0 or n2 <= 0:
        return RankTest(n1, n2, 0.0, 0.5, 1.0)
    u, below = 0.0, 0.0
    ties = 0.0
    for c, b in zip(canary, baseline, strict=True):
        u += c * (below + b / 2)
        below += b
        t = c + b
        ties += t**3 - t
    n = n1 + n2
    mean = n1 * n2 / 2
    variance = n1 * n2 / 12 * ((n + 1) - ties / (n * (n - 1))) if n > 1 else 0.0
    if variance <= 0:  # everything in one bin: no evidence either way
        return RankTest(n1, n2, u, u / (n1 * n2), 1.0)
    z = (u - mean - 0.5) / math.sqrt(variance)  # continuity-corrected
    return RankTest(n1, n2, u, u / (n1 * n2), upper_normal_tail(z))


def rank_test_samples(canary: Sequence[float], baseline: Sequence[float]) -> RankTest:
    """The same test on raw samples: each distinct value becomes a bin."""
    values = sorted({*canary, *baseline})
    index = {v: i for i, v in enumerate(values)}
    c, b = [0.0] * len(values), [0.0] * len(values)
    for v in canary:
        c[index[v]] += 1
    for v in baseline:
        b[index[v]] += 1
    return rank_test_binned(c, b)


def dispersion_test_binned(
    canary: Sequence[float], baseline: Sequence[float], centres: Sequence[float]
) -> RankTest:
    """Is the canary more spread out? A rank test on absolute deviations from each track's median.

    The Brown-Forsythe idea with ranks instead of an F test: deviations are taken in log space,
    since latency buckets are logarithmic and a spread is multiplicative. A pure shift moves both
    the median and the samples, leaves deviations alike, and does not trigger this test.
    """
    logs = [math.log(c) for c in centres]
    deviations: list[dict[float, float]] = []
    for counts in (canary, baseline):
        median = logs[_weighted_median_index(counts)] if sum(counts) > 0 else 0.0
        by_value: dict[float, float] = {}
        for x, n in zip(logs, counts, strict=True):
            if n > 0:
                d = round(abs(x - median), 9)  # equal distances are ties, not float noise
                by_value[d] = by_value.get(d, 0.0) + n
        deviations.append(by_value)
    values = sorted({*deviations[0], *deviations[1]})
    return rank_test_binned(
        [deviations[0].get(v, 0.0) for v in values], [deviations[1].get(v, 0.0) for v in values]
    )


def _weighted_median_index(counts: Sequence[float]) -> int:
    half, running = sum(counts) / 2, 0.0
    for i, n in enumerate(counts):
        running += n
        if running >= half:
            return i
    return len(counts) - 1


@dataclass(frozen=True)
class RateTest:
    """One-sided exact test: does the canary fail more often than the baseline?"""

    canary_events: int
    canary_trials: int
    baseline_events: int
    baseline_trials: int
    p_value: float

    @property
    def canary_ratio(self) -> float:
        return self.canary_events / self.canary_trials if self.canary_trials else 0.0

    @property
    def baseline_ratio(self) -> float:
        return self.baseline_events / self.baseline_trials if self.baseline_trials else 0.0


def rate_test(k1: int, n1: int, k2: int, n2: int) -> RateTest:
    """Conditional binomial test for two rates of rare events.

    Given k = k1 + k2 events in all, under equal rates the canary's share follows
    Binomial(k, n1 / (n1 + n2)); the p-value is P(X >= k1). Exact, so it stays valid for the
    handful of failures a heartbeat sees, where a normal approximation would not.
    """
    k = k1 + k2
    if n1 <= 0 or n2 <= 0 or k1 == 0:
        return RateTest(k1, n1, k2, n2, 1.0)
    share = n1 / (n1 + n2)
    p = math.fsum(_binomial_pmf(i, k, share) for i in range(k1, k + 1))
    return RateTest(k1, n1, k2, n2, min(1.0, p))


def _binomial_pmf(i: int, n: int, p: float) -> float:
    if p >= 1.0:
        return 1.0 if i == n else 0.0
    log = (
        math.lgamma(n + 1)
        - math.lgamma(i + 1)
        - math.lgamma(n - i + 1)
        + i * math.log(p)
        + (n - i) * math.log1p(-p)
    )
    return math.exp(log)


def upper_normal_tail(z: float) -> float:
    return 0.5 * math.erfc(z / math.sqrt(2))


def bucket_quantile(q: float, bounds: Sequence[float], cumulative: Sequence[float]) -> float:
    """histogram_quantile() as Prometheus computes it, from cumulative bucket counts."""
    total = cumulative[-1] if cumulative else 0.0
    if total <= 0:
        return math.nan
    rank = q * total
    lower, below = 0.0, 0.0
    for bound, count in zip(bounds, cumulative, strict=True):
        if count >= rank:
            if math.isinf(bound):
                return lower  # the highest finite bound, as Prometheus does
            if count == below:
                return bound
            return lower + (bound - lower) * (rank - below) / (count - below)
        lower, below = bound, count
    return lower


def bin_centres(bounds: Sequence[float]) -> list[float]:
    """A representative value per bucket: the geometric middle of its bounds.

    The lowest bucket and +Inf have only one bound; they get the spacing of their neighbour, so
    a shift by one bucket is about the same step in log space at the edges as in the middle.
    """
    finite = [b for b in bounds if math.isfinite(b) and b > 0]
    centres = []
    for i, bound in enumerate(bounds):
        if math.isinf(bound):
            last = finite[-1] if finite else 1.0
            step = last / finite[-2] if len(finite) > 1 else 4.0
            centres.append(last * math.sqrt(step))
        elif i == 0 or bounds[i - 1] <= 0:
            step = (
                bounds[i + 1] / bound
                if i + 1 < len(bounds) and math.isfinite(bounds[i + 1])
                else 4.0
            )
            centres.append(bound / math.sqrt(step))
        else:
            centres.append(math.sqrt(bounds[i - 1] * bound))
    return centres


def median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    if not ordered:
        return math.nan
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def two_proportion_test(k1: int, n1: int, k2: int, n2: int) -> float:
    """One-sided p-value that the canary's rate (k1/n1) exceeds the baseline's (pooled z-test).

    Request counts are large where it matters; with no event at all there is no evidence.
    """
    if n1 <= 0 or n2 <= 0 or k1 + k2 == 0:
        return 1.0
    pooled = (k1 + k2) / (n1 + n2)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    if se == 0:
        return 1.0
    return upper_normal_tail((k1 / n1 - k2 / n2) / se)


@dataclass(frozen=True)
class HomogeneityTest:
    """Chi-square test that two tracks share one categorical distribution (classes or bins)."""

    statistic: float
    dof: int
    p_value: float
    tvd: float  # total variation distance between the two shares, 0..1
    psi: float  # population stability index: the symmetrised KL divergence, smoothed


def homogeneity_test(canary: Sequence[float], baseline: Sequence[float]) -> HomogeneityTest:
    n1, n2 = float(sum(canary)), float(sum(baseline))
    if n1 <= 0 or n2 <= 0:
        return HomogeneityTest(0.0, 0, 1.0, math.nan, math.nan)
    total, chi2, used = n1 + n2, 0.0, 0
    tvd = psi = 0.0
    for c, b in zip(canary, baseline, strict=True):
        column = c + b
        if column <= 0:
            continue
        used += 1
        for observed, row in ((c, n1), (b, n2)):
            expected = row * column / total
            chi2 += (observed - expected) ** 2 / expected
        pc, pb = c / n1, b / n2
        tvd += abs(pc - pb) / 2
        # Smoothing keeps a class one track never saw finite (and large), as PSI practice does.
        sc, sb = max(pc, 1e-4), max(pb, 1e-4)
        psi += (sc - sb) * math.log(sc / sb)
    dof = max(used - 1, 0)
    p = chi_square_sf(chi2, dof) if dof else 1.0
    return HomogeneityTest(chi2, dof, p, tvd, psi)


def chi_square_sf(x: float, dof: int) -> float:
    """P(X >= x) for a chi-square variable with `dof` degrees of freedom."""
    if x <= 0:
        return 1.0
    return _upper_regularized_gamma(dof / 2, x / 2)


def _upper_regularized_gamma(a: float, x: float) -> float:
    """Q(a, x): a series below a + 1, Lentz's continued fraction above."""
    log_front = a * math.log(x) - x - math.lgamma(a)
    if x < a + 1:
        term = total = 1.0 / a
        k = a
        for _ in range(1000):
            k += 1
            term *= x / k
            total += term
            if abs(term) < abs(total) * 1e-15:
                break
        return max(0.0, 1.0 - total * math.exp(log_front))
    tiny = 1e-300
    b = x + 1 - a
    c, d = 1 / tiny, 1 / b
    h = d
    for i in range(1, 1000):
        an = -i * (i - a)
        b += 2
        d = an * d + b
        d = tiny if abs(d) < tiny else d
        c = b + an / c
        c = tiny if abs(c) < tiny else c
        d = 1 / d
        h *= d * c
        if abs(d * c - 1) < 1e-15:
            break
    return min(1.0, math.exp(log_front) * h)


def normal_quantile(p: float) -> float:
    """z with P(Z >= z) = p, by bisection on the tail (precise enough for confidence bounds)."""
    lo, hi = -40.0, 40.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if upper_normal_tail(mid) > p:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


@dataclass(frozen=True)
class QuantileRatio:
    """Canary quantile / baseline quantile, with a distribution-free confidence interval."""

    q: float
    canary: float
    baseline: float
    ratio: float
    low: float
    high: float


def quantile_ratio(
    q: float,
    bounds: Sequence[float],
    canary: Sequence[float],
    baseline: Sequence[float],
    alpha: float,
) -> QuantileRatio:
    """The q-quantile ratio as histogram_quantile() gives it, and an interval around it.

    Each track's quantile gets an order-statistic interval: the true q-quantile lies between the
    sample quantiles at q -/+ z*sqrt(q(1-q)/n) (binomial count of observations below it), read
    from the buckets with Prometheus' interpolation. The ratio's interval combines the extremes,
    each side at alpha/2, so it is conservative; the point estimate always lies inside it.
    """
    z = normal_quantile(alpha / 4)
    values = []
    for bins in (canary, baseline):
        cumulative, running = [], 0.0
        for count in bins:
            running += count
            cumulative.append(running)
        n = running
        spread = z * math.sqrt(q * (1 - q) / n) if n > 0 else 0.0
        values.append(
            [
                bucket_quantile(min(max(p, 1e-9), 1.0), bounds, cumulative)
                for p in (q - spread, q, q + spread)
            ]
        )
    (c_lo, c, c_hi), (b_lo, b, b_hi) = values

    def div(a: float, b: float) -> float:
        if math.isnan(a) or math.isnan(b):
            return math.nan
        return a / b if b > 0 else math.inf

    return QuantileRatio(q, c, b, div(c, b), div(c_lo, b_hi), div(c_hi, b_lo))
