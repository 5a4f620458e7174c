"""The rule pack's thresholds, read where the alerts read them, so the judge and the alerts
cannot drift apart.

rules/thresholds.rules.yml records every tunable threshold as a `trt_heartbeat:threshold:*`
series. The judge asks Prometheus for them at the end of its window; where the rule pack is not
installed it uses DEFAULTS, which a test keeps equal to that file.
"""

from __future__ import annotations

from trt_heartbeat.canary.judge.prometheus import PrometheusClient

Key = tuple[str, str]  # (threshold name, statistic label or "")

DEFAULTS: dict[Key, float] = {
    ("canary_latency_ratio", ""): 1.5,
    ("service_canary_error_ratio", ""): 0.01,
    ("service_canary_latency_ratio", "p50"): 1.2,
    ("service_canary_latency_ratio", "p99"): 1.5,
    ("service_canary_latency_ratio", "mean"): 1.2,
    ("service_canary_gpu_memory_ratio", ""): 1.2,
    ("service_canary_prediction_drift", "tvd"): 0.1,
    ("service_canary_prediction_drift", "ks"): 0.1,
}
PREFIX = "trt_heartbeat:threshold:"


def read(client: PrometheusClient, at: float) -> tuple[dict[Key, float], str]:
    """Thresholds in force at `at`, and where they came from (for the report)."""
    names = "|".join(sorted({PREFIX + name for name, _ in DEFAULTS}))
    found = {}
    for series in client.query(f'{{__name__=~"{names}"}}', at):
        key = (series.labels["__name__"].removeprefix(PREFIX), series.labels.get("statistic", ""))
        if key in DEFAULTS:
            found[key] = series.values[0][1]
    if not found:
        return dict(DEFAULTS), "built-in defaults (no trt_heartbeat:threshold:* series)"
    return {**DEFAULTS, **found}, "the rule pack's trt_heartbeat:threshold:* series"
