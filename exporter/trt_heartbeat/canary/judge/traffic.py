"""canary-judge on the service's own traffic: requests, errors, latency, prediction drift and GPU
memory per version, read through a source (guard/source.py), compared per route (the
source's `by` labels, e.g. Triton's model).

Roles come from the rule pack, as the alerts see them: `service_version:service_track:info` says
which version is the canary and which are stable (declared by the rollout, or by traffic where
nothing declares them); the baseline is the busiest stable version. Without those series (the
pack is not loaded) the busiest version is the baseline and the report says so. --canary and
--baseline name the versions outright.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from trt_heartbeat.canary.guard.source import Counter, Source
from trt_heartbeat.canary.judge import stats
from trt_heartbeat.canary.judge.prometheus import PrometheusClient
from trt_heartbeat.canary.judge.queries import bins, duration
from trt_heartbeat.canary.judge.thresholds import Key
from trt_heartbeat.canary.judge.verdict import (
    FAIL,
    INCONCLUSIVE,
    MARGINAL,
    PASS,
    Check,
    Stratum,
    graded,
    tail_check,
)
from trt_heartbeat.canary.judge.verdict import ratio_check as ratio_of_medians
from trt_heartbeat.canary.promql import quote
from trt_heartbeat.errors import HeartbeatError

ALL = "all requests"


class NoServiceSeries(HeartbeatError):
    """The service selector matched no request series: a typo, not a verdict."""


@dataclass(frozen=True)
class ServiceScope:
    source: Source
    service: str
    window: float
    at: float
    selector: str = ""  # extra matchers for the source's request metrics
    canary: str | None = None
    baseline: str | None = None
    min_requests: int = 1000

    def requests(self, selector: str, *extra: str) -> str:
        """`selector` narrowed to this service, the user's matchers and `extra`."""
        parts = [
            selector.rstrip("}"),
            f"{self.source.labels.service.label}={quote(self.service)}",
            self.selector,
            *extra,
        ]
        head, _, first = parts[0].partition("{")
        body = ", ".join(p for p in [first, *parts[1:]] if p)
        return f"{head}{{{body}}}"

    @property
    def range(self) -> str:
        return f"[{duration(self.window)}]"


Route = str  # "model=resnet" or ALL


@dataclass
class ServiceObservations:
    canary: str = ""
    baseline: str = ""
    roles_from: str = ""  # declaration, traffic, the command line, or traffic without the pack
    traffic: dict[str, float] = field(default_factory=dict)  # version -> requests
    requests: dict[tuple[Route, str], float] = field(default_factory=dict)
    errors: dict[tuple[Route, str], float] = field(default_factory=dict)
    bounds: list[float] = field(default_factory=list)
    buckets: dict[tuple[Route, str], list[float]] = field(default_factory=dict)
    mean: dict[tuple[Route, str], float] = field(default_factory=dict)  # seconds
    drift: dict[tuple[Route, str], dict[str, float]] = field(default_factory=dict)
    drift_kind: str = ""  # "classes" or "scores"
    memory: dict[tuple[str, str], list[float]] = field(default_factory=dict)
    promql: dict[str, str] = field(default_factory=dict)

    def routes(self) -> list[Route]:
        return sorted({route for route, _ in self.requests})


def _route(labels: dict[str, str], by: tuple[str, ...]) -> Route:
    return ", ".join(f"{k}={labels.get(k, '')}" for k in by) if by else ALL


def _increase(
    client: PrometheusClient, scope: ServiceScope, selector: str, by: str, at: float
) -> list[Any]:
    return client.query(f"sum by ({by}) (increase({selector}{scope.range}))", at)


def _counter(
    client: PrometheusClient, scope: ServiceScope, counter: Counter, by: str, version: str
) -> tuple[dict[tuple[Route, str], float], str]:
    """A counter's increase per (route, version), its parts (names x matcher sets) added up."""
    by_route = scope.source.labels.by
    totals: dict[tuple[Route, str], float] = defaultdict(float)
    selectors = [scope.requests(sel, f'{version}!=""') for sel in counter.selectors()]
    for selector in selectors:
        for s in _increase(client, scope, selector, by, scope.at):
            totals[(_route(s.labels, by_route), s.labels[version])] += s.values[0][1]
    promql = " + ".join(f"sum by ({by}) (increase({sel}{scope.range}))" for sel in selectors)
    return dict(totals), promql


def _roles(client: PrometheusClient, scope: ServiceScope) -> dict[str, tuple[str, str]]:
    """version -> (track, where the role comes from), as the rule pack records them."""
    expr = f"service_version:service_track:info{{service={quote(scope.service)}}}"
    return {
        s.labels["version"]: (s.labels.get("track", ""), s.labels.get("roles_from", ""))
        for s in client.query(expr, scope.at)
    }


def observe(client: PrometheusClient, scope: ServiceScope) -> ServiceObservations:
    src, lab, obs = scope.source, scope.source.labels, ServiceObservations()
    if lab.service.regex or lab.version.regex:
        raise NoServiceSeries(
            f"--source: {src.origin} derives its service or version label with a regex, which "
            "canary-judge does not read; judge it from the rule pack's recorded series "
            "(docs/service-canary.md)"
        )
    version = lab.version.label
    by = ", ".join([version, *lab.by])
    obs.requests, obs.promql["requests"] = _counter(client, scope, src.requests, by, version)
    for (_, v), n in obs.requests.items():
        obs.traffic[v] = obs.traffic.get(v, 0.0) + n
    if not obs.traffic:
        raise NoServiceSeries(
            f"--service: no {' or '.join(src.requests.metrics)} series of service "
            f"{scope.service!r} ({lab.service.label}) with a {version} label in the "
            f"{duration(scope.window)} before the window's end (source {src.origin})"
        )
    busiest = sorted(obs.traffic, key=lambda v: -obs.traffic[v])
    roles = _roles(client, scope)
    stable = [v for v in busiest if roles.get(v, ("",))[0] == "stable"]
    canaries = [v for v in busiest if roles.get(v, ("",))[0] == "canary"]
    if scope.canary or scope.baseline:
        obs.roles_from = "the command line"
    elif stable and canaries:
        obs.roles_from = roles[canaries[0]][1]
    else:
        obs.roles_from = "traffic (no service_version:service_track:info series: rule pack?)"
        stable, canaries = busiest[:1], busiest[1:]
    obs.baseline = scope.baseline or (stable or busiest)[0]
    others = [v for v in canaries or busiest if v != obs.baseline]
    obs.canary = scope.canary or (others[0] if others else "")

    obs.errors, obs.promql["errors"] = _counter(client, scope, src.errors, by, version)

    lat = src.latency
    if lat.histogram:
        buckets = scope.requests(f"{lat.histogram}_bucket{{{lat.matchers}}}")
        obs.promql["latency"] = f"sum by ({by}, le) (increase({buckets}{scope.range}))"
        cumulative: dict[tuple[Route, str], dict[float, float]] = defaultdict(dict)
        for s in _increase(client, scope, buckets, f"{by}, le", scope.at):
            key = (_route(s.labels, lab.by), s.labels[version])
            cumulative[key][float(s.labels["le"]) * lat.scale] = s.values[0][1]
        obs.bounds, obs.buckets = bins(cumulative)
    else:
        per: dict[str, dict[tuple[Route, str], float]] = {}
        for name, metric in (("sum", lat.sum), ("count", lat.count)):
            selector = scope.requests(f"{metric}{{{lat.matchers}}}")
            obs.promql[f"latency_{name}"] = f"sum by ({by}) (increase({selector}{scope.range}))"
            per[name] = {
                (_route(s.labels, lab.by), s.labels[version]): s.values[0][1]
                for s in _increase(client, scope, selector, by, scope.at)
            }
        obs.mean = {
            k: v * lat.scale / per["count"][k]
            for k, v in per["sum"].items()
            if per["count"].get(k, 0) > 0
        }
    _observe_pods(client, scope, obs)
    return obs


def _observe_pods(client: PrometheusClient, scope: ServiceScope, obs: ServiceObservations) -> None:
    src, pods = scope.source, scope.source.pods
    if pods is None:
        return
    pl = pods.labels
    version = pl.version.label
    in_service = f'{pl.service.label}={quote(scope.service)}, {version}!=""'
    drift = src.drift
    if drift is not None:
        by = ", ".join([version, *drift.by])
        if drift.classes:
            obs.drift_kind, selector, label = "classes", f"{drift.classes}{{{in_service}}}", "class"
        else:
            selector, label = f"{drift.scores}_bucket{{{in_service}}}", "le"
            obs.drift_kind = "scores"
        obs.promql["drift"] = f"sum by ({by}, {label}) (increase({selector}{scope.range}))"
        for s in _increase(client, scope, selector, f"{by}, {label}", scope.at):
            key = (_route(s.labels, drift.by), s.labels[version])
            obs.drift.setdefault(key, {})[s.labels.get(label, "")] = s.values[0][1]
    if pods.gpu_memory:
        expr = f"max_over_time({pods.gpu_memory}{{{in_service}}}{scope.range})"
        obs.promql["gpu_memory"] = expr
        for s in client.query(expr, scope.at):
            obs.memory.setdefault((ALL, s.labels[version]), []).append(s.values[0][1])


# --- checks -----------------------------------------------------------------------------------


def judge(
    obs: ServiceObservations, scope: ServiceScope, limits: dict[Key, float], alpha: float
) -> tuple[list[Stratum], str]:
    """Strata per route (and one for the pods' GPU memory), or why nothing could be compared."""
    if not obs.canary:
        return [], (
            f"service {scope.service!r} has one version only ({obs.baseline}): no canary to compare"
        )
    if obs.traffic.get(obs.canary, 0) <= 0:
        return [], f"version {obs.canary!r} of service {scope.service!r} served no requests"
    routes = obs.routes()
    alpha = alpha / max(1, len(routes))
    strata = []
    for route in routes:
        c, b = (route, obs.canary), (route, obs.baseline)
        n1, n2 = obs.requests.get(c, 0.0), obs.requests.get(b, 0.0)
        enough = min(n1, n2) >= scope.min_requests
        checks = [_errors(obs, c, b, limits, alpha, scope.min_requests)]
        checks += _latency(obs, c, b, limits, alpha, enough, scope.min_requests)
        strata.append(Stratum(f"{scope.service}: {route}", checks))
    # Predictions are grouped by the drift contract's labels (model), not the request routes.
    for route in sorted({r for r, _ in obs.drift}):
        check = _drift(obs, (route, obs.canary), (route, obs.baseline), limits, alpha, scope)
        strata.append(Stratum(f"{scope.service}: predictions {route}", [check]))
    if obs.memory:
        strata.append(
            Stratum(
                f"{scope.service}: GPUs",
                [
                    ratio_of_medians(
                        obs.memory,
                        (ALL, obs.canary),
                        (ALL, obs.baseline),
                        "gpu_memory",
                        limits[("service_canary_gpu_memory_ratio", "")],
                        1.5,
                        32 * 2**20,
                        "bytes",
                        obs.promql.get("gpu_memory", ""),
                    )
                ],
            )
        )
    return strata, ""


def _too_few(n1: float, n2: float, least: int) -> str:
    return (
        f"too few requests to judge: canary {int(n1)}, baseline {int(n2)} (--min-requests {least})"
    )


def _errors(
    obs: ServiceObservations, c: Any, b: Any, limits: dict[Key, float], alpha: float, least: int
) -> Check:
    n1, n2 = round(obs.requests.get(c, 0.0)), round(obs.requests.get(b, 0.0))
    k1, k2 = round(obs.errors.get(c, 0.0)), round(obs.errors.get(b, 0.0))
    bound = limits[("service_canary_error_ratio", "")]
    p = stats.two_proportion_test(k1, n1, k2, n2)
    r1, r2 = (k1 / n1 if n1 else math.nan), (k2 / n2 if n2 else math.nan)
    rule = (
        f"fail if the canary's error ratio > {bound:g} (whatever the baseline's); "
        f"marginal if higher than the baseline's with p < {alpha:.3g}"
    )
    if n1 < least or n2 < least:
        verdict, reason = INCONCLUSIVE, _too_few(n1, n2, least)
    else:
        verdict = FAIL if r1 > bound else MARGINAL if p < alpha else PASS
        reason = f"{k1} of {n1} canary requests failed ({r1:.2%}) vs {k2} of {n2} ({r2:.2%})"
    return Check(
        "errors",
        "error ratio bound, and two-proportion z-test (one-sided)",
        verdict,
        reason,
        {"errors": k1, "n": n1, "ratio": r1},
        {"errors": k2, "n": n2, "ratio": r2},
        {"p_value": p, "bound": bound},
        rule,
        obs.promql["errors"],
    )


def _latency(
    obs: ServiceObservations,
    c: Any,
    b: Any,
    limits: dict[Key, float],
    alpha: float,
    enough: bool,
    least: int,
) -> list[Check]:
    n1, n2 = obs.requests.get(c, 0.0), obs.requests.get(b, 0.0)
    if not obs.bounds:  # a sum/count source: the mean is all there is
        cm, bm = obs.mean.get(c, math.nan), obs.mean.get(b, math.nan)
        limit = limits[("service_canary_latency_ratio", "mean")]
        ratio = cm / bm if bm > 0 else math.nan
        if not enough:
            verdict, reason = INCONCLUSIVE, _too_few(n1, n2, least)
        else:
            verdict = FAIL if ratio > limit else PASS
            reason = f"mean {cm * 1e3:.3g} ms vs {bm * 1e3:.3g} ms (ratio {ratio:.2f})"
        return [
            Check(
                "latency",
                "ratio of mean latencies (the source has no histogram)",
                verdict,
                reason,
                {"mean_seconds": cm},
                {"mean_seconds": bm},
                {"ratio": ratio},
                f"fail if canary/baseline mean > {limit:g}",
                obs.promql.get("latency_sum", ""),
            )
        ]
    zero = [0.0] * len(obs.bounds)
    cb, bb = obs.buckets.get(c, zero), obs.buckets.get(b, zero)
    test = stats.rank_test_binned(cb, bb)
    p50 = stats.quantile_ratio(0.5, obs.bounds, cb, bb, alpha)
    a_marginal, a_fail = 0.56, 0.64
    rule = (
        f"fail if p < {alpha:.3g} and A >= {a_fail}; marginal if p < {alpha:.3g} and "
        f"A >= {a_marginal}"
    )
    if not enough:
        verdict, reason = INCONCLUSIVE, _too_few(n1, n2, least)
    else:
        verdict = graded(test.effect, test.p_value, alpha, a_marginal, a_fail)
        reason = (
            f"canary slower than baseline in {test.effect:.0%} of request pairs "
            f"(p50 ratio {p50.ratio:.2f})"
        )
    rank = Check(
        "latency",
        "Mann-Whitney U, one-sided, on histogram bins",
        verdict,
        reason,
        {"n": int(n1), "p50_seconds": p50.canary},
        {"n": int(n2), "p50_seconds": p50.baseline},
        {"u": test.u, "effect_a": test.effect, "p_value": test.p_value},
        rule,
        obs.promql["latency"],
    )
    limit = limits[("service_canary_latency_ratio", "p99")]
    tail = tail_check(
        obs.bounds, cb, bb, limit, alpha, enough, _too_few(n1, n2, least), obs.promql["latency"]
    )
    return [rank, tail]


def _drift(
    obs: ServiceObservations,
    c: Any,
    b: Any,
    limits: dict[Key, float],
    alpha: float,
    scope: ServiceScope,
) -> Check:
    cd, bd = obs.drift.get(c, {}), obs.drift.get(b, {})
    promql = obs.promql.get("drift", "")
    if obs.drift_kind == "scores":
        keys = sorted({*cd, *bd}, key=float)
        cc, bc = bins(
            {
                0: {float(k): cd.get(k, 0.0) for k in keys},
                1: {float(k): bd.get(k, 0.0) for k in keys},
            }
        )[1].values()
        statistic_name = "ks"
    else:
        keys = sorted({*cd, *bd})
        cc, bc = [cd.get(k, 0.0) for k in keys], [bd.get(k, 0.0) for k in keys]
        statistic_name = "tvd"
    test = stats.homogeneity_test(cc, bc)
    effect = _ks(cc, bc) if statistic_name == "ks" else test.tvd
    limit = limits[("service_canary_prediction_drift", statistic_name)]
    rule = (
        f"fail if p < {alpha:.3g} and {statistic_name} > {limit:g}; marginal if p < "
        f"{alpha:.3g} and {statistic_name} > {limit / 2:g}"
    )
    n1, n2 = sum(cc), sum(bc)
    if min(n1, n2) < scope.min_requests:
        verdict, reason = (
            INCONCLUSIVE,
            _too_few(n1, n2, scope.min_requests).replace("requests", "predictions", 1),
        )
    else:
        verdict = graded(effect, test.p_value, alpha, limit / 2, limit, strict=True)
        reason = f"{statistic_name} {effect:.3f}, PSI {test.psi:.3f} over {len(keys)} " + (
            "score buckets" if statistic_name == "ks" else "classes"
        )
    return Check(
        "prediction_drift",
        "chi-square homogeneity test on the counts",
        verdict,
        reason,
        {"n": int(n1)},
        {"n": int(n2)},
        {
            statistic_name: effect,
            "psi": test.psi,
            "chi2": test.statistic,
            "dof": test.dof,
            "p_value": test.p_value,
        },
        rule,
        promql,
    )


def _ks(canary: list[float], baseline: list[float]) -> float:
    n1, n2 = sum(canary) or 1.0, sum(baseline) or 1.0
    gap = running_c = running_b = 0.0
    for c, b in zip(canary, baseline, strict=True):
        running_c += c
        running_b += b
        gap = max(gap, abs(running_c / n1 - running_b / n2))
    return gap
