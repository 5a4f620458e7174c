"""From observations to a verdict: one check per metric and GPU model, then the worst of them.

Verdicts, from worst: fail > marginal > inconclusive > pass. A check without data on both tracks
is skipped (a CPU backend has no GPU memory to compare); one with data on only one track, or
fewer probes than `min_samples`, is inconclusive — never a silent pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from trt_heartbeat.canary.judge import stats
from trt_heartbeat.canary.judge.queries import Observations, Scope
from trt_heartbeat.canary.judge.thresholds import Key

PASS, MARGINAL, FAIL, INCONCLUSIVE, SKIPPED = "pass", "marginal", "fail", "inconclusive", "skipped"
SEVERITY = {SKIPPED: -1, PASS: 0, INCONCLUSIVE: 1, MARGINAL: 2, FAIL: 3}
# 2 is bad input in every command (click's usage errors too); a verdict never exits 2, so a typo
# in a rollout hook is never taken for a failed canary. 4: Prometheus could not be asked.
EXIT_CODES = {PASS: 0, MARGINAL: 1, INCONCLUSIVE: 3, FAIL: 5}

FAILURE_RESULTS = ("error", "timeout")
TAIL_SEEN = 5  # observations expected beyond a quantile before the sample shows that tail
MiB = 1 << 20


@dataclass(frozen=True)
class Thresholds:
    alpha: float = 0.01  # significance for a fail, split across GPU models (Bonferroni)
    marginal_alpha: float = 0.1  # suggestive evidence for rates: marginal
    min_samples: int = 100  # probes per track and GPU model before anything is judged
    # Vargha-Delaney A (0.5 = no difference): 0.56 small, 0.64 medium, 0.71 large.
    latency_marginal: float = 0.56
    latency_fail: float = 0.64
    dispersion_marginal: float = 0.64
    dispersion_fail: float = 0.71
    deviation_marginal: float = 0.71
    memory_marginal: float = 1.2  # canary / baseline, median per target
    memory_fail: float = 1.5
    memory_floor: float = 32 * MiB  # smaller absolute differences are never judged
    load_marginal: float = 1.5
    load_fail: float = 3.0
    load_floor: float = 0.5  # seconds


@dataclass(frozen=True)
class Check:
    name: str
    test: str
    verdict: str
    reason: str
    canary: dict[str, Any]
    baseline: dict[str, Any]
    statistic: dict[str, Any]
    threshold: str
    promql: str


@dataclass(frozen=True)
class Stratum:
    gpu_model: str
    checks: list[Check]

    @property
    def verdict(self) -> str:
        return worst(c.verdict for c in self.checks)


@dataclass(frozen=True)
class Part:
    """One kind of evidence (the probes, or the service's traffic) and its strata."""

    name: str
    strata: list[Stratum]
    unjudged: str = ""  # why nothing could be compared, if so
    notes: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def verdict(self) -> str:
        if self.unjudged:
            return INCONCLUSIVE
        return worst(s.verdict for s in self.strata)


@dataclass(frozen=True)
class Judgement:
    scope: Scope
    thresholds: Thresholds
    parts: list[Part]
    limits: dict[str, float] = field(default_factory=dict)  # the rule pack's, by name
    limits_from: str = ""

    @property
    def verdict(self) -> str:
        return worst(p.verdict for p in self.parts)

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.verdict]


def limit_names(limits: dict[Key, float]) -> dict[str, float]:
    """`name` or `name{statistic="p99"}`, as the rule pack's series are written."""
    return {
        name + (f'{{statistic="{stat}"}}' if stat else ""): value
        for (name, stat), value in sorted(limits.items())
    }


def worst(verdicts: Any) -> str:
    found = [v for v in verdicts if v != SKIPPED]
    return max(found, key=SEVERITY.__getitem__) if found else INCONCLUSIVE


def judge_probes(
    obs: Observations, scope: Scope, thresholds: Thresholds, limits: dict[Key, float]
) -> Part:
    canary, baseline = scope.tracks
    models = sorted(obs.models())
    judged = [m for m in models if _has(obs, m, canary) and _has(obs, m, baseline)]
    notes = []
    for m in models:
        if not _has(obs, m, canary):
            notes.append(f"{m}: only the baseline runs on this GPU model; not compared")
    if not any(_has(obs, m, canary) for m in models):
        why = f"no probes of track {canary!r} matched the selector in the window"
        return Part("probes", [], why, notes)
    alpha = thresholds.alpha / max(1, len(judged))
    strata = []
    for m in models:
        if m in judged:
            strata.append(Stratum(m, _checks(obs, m, scope, thresholds, alpha, limits)))
        elif _has(obs, m, canary):
            strata.append(
                Stratum(
                    m,
                    [
                        Check(
                            "baseline",
                            "-",
                            INCONCLUSIVE,
                            f"no {baseline!r} probes on this GPU model to compare with",
                            {},
                            {},
                            {},
                            "a baseline on the same GPU model",
                            obs.promql.get("probes", ""),
                        )
                    ],
                )
            )
    return Part("probes", strata, "", notes)


def _has(obs: Observations, model: str, track: str) -> bool:
    return sum(obs.results.get((model, track), {}).values()) > 0


def _checks(
    obs: Observations,
    model: str,
    scope: Scope,
    t: Thresholds,
    alpha: float,
    limits: dict[Key, float],
) -> list[Check]:
    c, b = (model, scope.canary), (model, scope.baseline)
    n1, n2 = _latency_summary(obs, c)["n"], _latency_summary(obs, b)["n"]
    return [
        _latency(obs, c, b, t, alpha),
        tail_check(
            obs.bounds,
            obs.bins(c),
            obs.bins(b),
            limits[("canary_latency_ratio", "")],
            alpha,
            _enough(t, n1, n2),
            _too_few(t, n1, n2),
            obs.promql["latency"],
        ),
        _dispersion(obs, c, b, t, alpha),
        _rate(obs, c, b, t, alpha, "failures", FAILURE_RESULTS),
        _rate(obs, c, b, t, alpha, "mismatches", ("mismatch",)),
        _deviation(obs, c, b, t, alpha),
        ratio_check(
            obs.memory,
            c,
            b,
            "gpu_memory",
            t.memory_marginal,
            t.memory_fail,
            t.memory_floor,
            "bytes",
            obs.promql["gpu_memory"],
        ),
        ratio_check(
            obs.engine_load,
            c,
            b,
            "engine_load",
            t.load_marginal,
            t.load_fail,
            t.load_floor,
            "seconds",
            obs.promql["engine_load"],
        ),
    ]


def _latency_summary(obs: Observations, key: tuple[str, str]) -> dict[str, Any]:
    cumulative, running = [], 0.0
    for n in obs.bins(key):
        running += n
        cumulative.append(running)
    return {
        "n": int(running),
        "p50_seconds": stats.bucket_quantile(0.5, obs.bounds, cumulative),
        "p99_seconds": stats.bucket_quantile(0.99, obs.bounds, cumulative),
    }


def _enough(t: Thresholds, *counts: float) -> bool:
    return all(n >= t.min_samples for n in counts)


def graded(
    effect: float, p: float, alpha: float, marginal: float, fail: float, strict: bool = False
) -> str:
    """Significant and large: fail; significant and medium: marginal (strict: above, not at)."""
    if p >= alpha:
        return PASS
    if effect > fail or (not strict and effect == fail):
        return FAIL
    if effect > marginal or (not strict and effect == marginal):
        return MARGINAL
    return PASS


def _latency(
    obs: Observations, c: tuple[str, str], b: tuple[str, str], t: Thresholds, alpha: float
) -> Check:
    cs, bs = _latency_summary(obs, c), _latency_summary(obs, b)
    test = stats.rank_test_binned(obs.bins(c), obs.bins(b))
    rule = (
        f"fail if p < {alpha:.3g} and A >= {t.latency_fail}; marginal if p < {alpha:.3g} "
        f"and A >= {t.latency_marginal}"
    )
    if not _enough(t, cs["n"], bs["n"]):
        verdict, reason = INCONCLUSIVE, _too_few(t, cs["n"], bs["n"])
    else:
        verdict = graded(test.effect, test.p_value, alpha, t.latency_marginal, t.latency_fail)
        ratio = _ratio_text(cs["p50_seconds"], bs["p50_seconds"])
        reason = (
            f"canary slower than baseline in {test.effect:.0%} of probe pairs (p50 ratio {ratio})"
        )
    return Check(
        "latency",
        "Mann-Whitney U, one-sided, on histogram bins",
        verdict,
        reason,
        cs,
        bs,
        _rank_stats(test),
        rule,
        obs.promql["latency"],
    )


def _dispersion(
    obs: Observations, c: tuple[str, str], b: tuple[str, str], t: Thresholds, alpha: float
) -> Check:
    centres = stats.bin_centres(obs.bounds)
    cs, bs = _latency_summary(obs, c), _latency_summary(obs, b)
    test = stats.dispersion_test_binned(obs.bins(c), obs.bins(b), centres)
    for summary in (cs, bs):
        p50, p99 = summary["p50_seconds"], summary["p99_seconds"]
        summary["p99_over_p50"] = p99 / p50 if p50 and p50 > 0 else math.nan
    rule = (
        f"fail if p < {alpha:.3g} and A >= {t.dispersion_fail}; marginal if p < "
        f"{alpha:.3g} and A >= {t.dispersion_marginal}"
    )
    if not _enough(t, cs["n"], bs["n"]):
        verdict, reason = INCONCLUSIVE, _too_few(t, cs["n"], bs["n"])
    else:
        verdict = graded(test.effect, test.p_value, alpha, t.dispersion_marginal, t.dispersion_fail)
        reason = (
            f"canary latency further from its median than baseline's in {test.effect:.0%} "
            f"of pairs (p99/p50 {cs['p99_over_p50']:.2f} vs {bs['p99_over_p50']:.2f})"
        )
    test_name = "Mann-Whitney U on |log latency - median| (rank Brown-Forsythe), one-sided"
    return Check(
        "latency_dispersion",
        test_name,
        verdict,
        reason,
        cs,
        bs,
        _rank_stats(test),
        rule,
        obs.promql["latency"],
    )


def _rate(
    obs: Observations,
    c: tuple[str, str],
    b: tuple[str, str],
    t: Thresholds,
    alpha: float,
    name: str,
    results: tuple[str, ...],
) -> Check:
    counts = []
    for key in (c, b):
        by_result = obs.results.get(key, {})
        counts.append((sum(by_result.get(r, 0) for r in results), sum(by_result.values())))
    (k1, n1), (k2, n2) = counts
    test = stats.rate_test(k1, n1, k2, n2)
    strict = name == "mismatches"  # a wrong answer is never noise
    rule = f"fail if p < {alpha:.3g}; marginal if p < {t.marginal_alpha}"
    if strict:
        rule += " or the canary has any while the baseline has none"
    if not _enough(t, n1, n2):
        verdict, reason = INCONCLUSIVE, _too_few(t, n1, n2)
    else:
        if test.p_value < alpha:
            verdict = FAIL
        elif test.p_value < t.marginal_alpha or (strict and k1 > 0 and k2 == 0):
            verdict = MARGINAL
        else:
            verdict = PASS
        reason = (
            f"{k1} of {n1} canary probes ({test.canary_ratio:.2%}) vs {k2} of {n2} "
            f"baseline ({test.baseline_ratio:.2%})"
        )
    return Check(
        name,
        "conditional binomial test (exact), one-sided",
        verdict,
        reason,
        {"events": k1, "n": n1, "ratio": test.canary_ratio},
        {"events": k2, "n": n2, "ratio": test.baseline_ratio},
        {"p_value": test.p_value},
        rule,
        obs.promql["probes"],
    )


def _deviation(
    obs: Observations, c: tuple[str, str], b: tuple[str, str], t: Thresholds, alpha: float
) -> Check:
    cv, bv = obs.deviation.get(c, []), obs.deviation.get(b, [])
    test = stats.rank_test_samples(cv, bv)
    rule = (
        f"marginal if p < {alpha:.3g} and A >= {t.deviation_marginal} (outputs beyond "
        "tolerance are counted by the mismatches check)"
    )
    summary = [
        {"n": len(v), "median": stats.median(v), "max": max(v, default=math.nan)} for v in (cv, bv)
    ]
    if not cv and not bv:
        verdict, reason = SKIPPED, "no output deviation samples on either track"
    elif not cv or not bv:
        verdict, reason = INCONCLUSIVE, "output deviation samples on one track only"
    else:
        grew = test.p_value < alpha and test.effect >= t.deviation_marginal
        verdict = MARGINAL if grew else PASS
        reason = f"max abs error median {summary[0]['median']:.3g} vs {summary[1]['median']:.3g}"
    return Check(
        "output_deviation",
        "Mann-Whitney U, one-sided, on scraped samples",
        verdict,
        reason,
        summary[0],
        summary[1],
        _rank_stats(test),
        rule,
        obs.promql["output_deviation"],
    )


def ratio_check(
    values: dict[Any, list[float]],
    c: Any,
    b: Any,
    name: str,
    marginal: float,
    fail: float,
    floor: float,
    unit: str,
    promql: str,
) -> Check:
    cv, bv = values.get(c, []), values.get(b, [])
    cm, bm = stats.median(cv), stats.median(bv)
    rule = (
        f"fail if canary/baseline >= {fail} and the difference >= {floor:g} {unit}; "
        f"marginal if >= {marginal}"
    )
    summary = (
        {"targets": len(cv), f"median_{unit}": cm},
        {"targets": len(bv), f"median_{unit}": bm},
    )
    ratio = cm / bm if cv and bv and bm > 0 else math.nan
    if not cv and not bv:
        verdict, reason = SKIPPED, "not exported on either track"
    elif not cv or not bv:
        verdict, reason = INCONCLUSIVE, "exported on one track only"
    else:
        big = cm - bm >= floor
        if big and ratio >= fail:
            verdict = FAIL
        elif big and ratio >= marginal:
            verdict = MARGINAL
        else:
            verdict = PASS
        reason = f"median per target {_fmt(cm, unit)} vs {_fmt(bm, unit)} (ratio {ratio:.2f})"
    return Check(
        name,
        "ratio of medians per target",
        verdict,
        reason,
        summary[0],
        summary[1],
        {"ratio": ratio},
        rule,
        promql,
    )


def _rank_stats(test: stats.RankTest) -> dict[str, Any]:
    return {"u": test.u, "effect_a": test.effect, "p_value": test.p_value}


def _too_few(t: Thresholds, n1: float, n2: float) -> str:
    return (
        f"too few probes to judge: canary {int(n1)}, baseline {int(n2)} "
        f"(--min-samples {t.min_samples})"
    )


def _ratio_text(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b and b > 0 and math.isfinite(a) else "n/a"


def _fmt(value: float, unit: str) -> str:
    if unit == "bytes":
        return f"{value / MiB:.0f} MiB"
    return f"{value:.3g} s"


def tail_check(
    bounds: list[float],
    canary: list[float],
    baseline: list[float],
    limit: float,
    alpha: float,
    enough: bool,
    too_few: str,
    promql: str,
) -> Check:
    """p90 and p99 ratios with intervals against the rule pack's ratio limit.

    Decided on evidence: fail when the whole interval of a ratio lies above the limit; hold
    (marginal) when a point estimate is above it, the comparison the rule pack's alert makes, so
    a window the alert would fire on is never a pass; pass when every point estimate is at or
    under it. A quantile with fewer than TAIL_SEEN observations expected beyond it is a tail the
    sample cannot show: the reason says so, and it never fails on its own.
    """
    ratios = [stats.quantile_ratio(q, bounds, canary, baseline, alpha) for q in (0.9, 0.99)]
    side = {f"p{r.q * 100:g}_seconds": r.canary for r in ratios}
    base = {f"p{r.q * 100:g}_seconds": r.baseline for r in ratios}
    statistic: dict[str, Any] = {f"p{r.q * 100:g}_ratio": r.ratio for r in ratios}
    statistic |= {f"p{r.q * 100:g}_ratio_interval": [r.low, r.high] for r in ratios}
    n = min(sum(canary), sum(baseline))
    need = {r.q: math.ceil(round(TAIL_SEEN / (1 - r.q), 6)) for r in ratios}
    seen = {r.q: n >= need[r.q] for r in ratios}
    rule = (
        f"fail if a p90/p99 ratio's interval lies above {limit:g}; marginal if a ratio is "
        f"above {limit:g}; a quantile needs {TAIL_SEEN} observations beyond it to be judged "
        "alone"
    )
    if not enough:
        verdict, reason = INCONCLUSIVE, too_few
    elif any(math.isnan(r.ratio) for r in ratios):
        verdict, reason = INCONCLUSIVE, "no latency observed on one of the tracks"
    else:
        if any(seen[r.q] and r.low > limit for r in ratios):
            verdict = FAIL
        elif any(r.ratio > limit for r in ratios):
            verdict = MARGINAL
        else:
            verdict = PASS
        reason = "; ".join(
            f"p{r.q * 100:g} ratio {r.ratio:.2f} [{r.low:.2f}, {r.high:.2f}]"
            + (
                ""
                if seen[r.q]
                else f" (too few probes to see a p{r.q * 100:g} tail: {int(n)}, need {need[r.q]})"
            )
            for r in ratios
        )
    return Check(
        "latency_tail",
        "p90/p99 ratio with order-statistic intervals on the buckets",
        verdict,
        reason,
        side,
        base,
        statistic,
        rule,
        promql,
    )
