"""canary-judge verdicts on observations built by hand (no Prometheus): edge cases of the data."""

from __future__ import annotations

import math

from trt_heartbeat.canary.judge.queries import Observations, Scope
from trt_heartbeat.canary.judge.thresholds import DEFAULTS
from trt_heartbeat.canary.judge.verdict import Thresholds, judge_probes

BOUNDS = [0.001, 0.0025, 0.005, math.inf]


def test_a_canary_whose_every_probe_timed_out_fails_instead_of_crashing() -> None:
    # Timed-out probes are counted but never observed in the latency histogram, so the canary
    # has probe counts and no latency buckets at all.
    obs = Observations(bounds=BOUNDS)
    obs.buckets[("H100", "stable")] = [0.0, 200.0, 0.0, 0.0]
    obs.results[("H100", "stable")] = {"success": 200, "error": 0, "timeout": 0, "mismatch": 0}
    obs.results[("H100", "canary")] = {"success": 0, "error": 0, "timeout": 200, "mismatch": 0}
    obs.promql = dict.fromkeys(
        ("latency", "probes", "output_deviation", "gpu_memory", "engine_load"), "q"
    )
    result = judge_probes(obs, Scope(1800, 0), Thresholds(), DEFAULTS)
    checks = {c.name: c for c in result.strata[0].checks}
    assert checks["latency"].verdict == "inconclusive"
    assert checks["latency"].canary["n"] == 0
    assert checks["latency_tail"].verdict == "inconclusive"
    assert checks["failures"].verdict == "fail"
    assert result.verdict == "fail"
