"""A stand-in inference service for the end-to-end tests: pods that serve no real requests but
export what Istio's sidecar and the service itself would, with prometheus_client.

Each pod simulates Poisson request arrivals at `rps` (or by `schedule`: [[seconds after start,
rps], ...], a rollout's weight steps), fails each with probability `errors` (`errors_after`
replaces it `step_after` seconds after start; the step's Unix time is written to `<pod>.step`),
draws latencies from a log-normal and predicts classes with fixed shares. `kind: triton` pods
export what Triton does instead of Istio's metrics (success and failure counters without a
`reason` label, latency as a sum). Usage:
    python fake_service.py CONFIG.json    # {"pods": [{...}, ...], "dir": "..."}
"""

from __future__ import annotations

import json
import math
import random
import sys
import threading
import time
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

TICK = 0.1
MS_BUCKETS = (1, 2, 5, 10, 20, 30, 50, 75, 100, 150, 250, 500, 1000, 2500, 5000, 10000)
SCORE_BUCKETS = tuple(i / 10 for i in range(1, 11))


class Pod:
    def __init__(self, spec: dict[str, Any], directory: Path) -> None:
        self.spec, self.dir = spec, directory
        self.rng = random.Random(spec.get("seed", spec["port"]))
        registry = CollectorRegistry(auto_describe=False)
        self.triton = spec.get("kind") == "triton"
        if self.triton:
            # Triton's own labels only: service, version and role come from the pod (relabeling).
            self.labels = {"model": "resnet", "version": "1"}
            names = list(self.labels)
            # Triton's counters carry no `_total` suffix, which prometheus_client adds to every
            # Counter: exported as gauges, the names and values are Triton's own.
            self.success, self.failure, self.count, self.duration = (
                Gauge(name, help_, names, registry=registry)
                for name, help_ in (
                    ("nv_inference_request_success", "OK."),
                    ("nv_inference_request_failure", "Failed."),
                    ("nv_inference_count", "Inferences."),
                    ("nv_inference_request_duration_us", "Latency sum."),
                )
            )
            for gauge in (self.success, self.failure, self.count, self.duration):
                gauge.labels(*self.labels.values())
        else:
            dest = {
                "reporter": "destination",
                "destination_canonical_service": spec["service"],
                "destination_canonical_revision": spec["version"],
                "destination_service_namespace": spec.get("namespace", "prod"),
                "destination_workload": f"{spec['service']}-{spec['version']}",
            }
            self.labels = dest
            self.requests = Counter(
                "istio_requests_total", "Requests.", [*dest, "response_code"], registry=registry
            )
            self.latency = Histogram(
                "istio_request_duration_milliseconds",
                "Latency.",
                list(dest),
                buckets=MS_BUCKETS,
                registry=registry,
            )
            for code in ("200", "503"):
                self.requests.labels(*dest.values(), code)
        # The drift contract (docs/service-canary.md), as the service itself would export it.
        self.classes = Counter(
            "model_predictions", "Predictions per class.", ["model", "class"], registry=registry
        )
        self.scores = Histogram(
            "model_prediction_score",
            "Output score.",
            ["model"],
            buckets=SCORE_BUCKETS,
            registry=registry,
        )
        for name in spec.get("classes", {}):
            self.classes.labels("resnet", name)
        start_http_server(spec["port"], "127.0.0.1", registry=registry)

    def rps(self, elapsed: float) -> float:
        steps = self.spec.get("schedule") or [[0, self.spec["rps"]]]
        return float([rps for after, rps in steps if elapsed >= after][-1])

    def run(self, started: float) -> None:
        spec, stepped = self.spec, False
        while True:
            elapsed = time.monotonic() - started
            errors = spec.get("errors", 0.0)
            if "step_after" in spec and elapsed >= spec["step_after"]:
                errors = spec["errors_after"]
                if not stepped:
                    (self.dir / f"{spec['name']}.step").write_text(f"{time.time():.3f}")
                    stepped = True
            for _ in range(_poisson(self.rng, self.rps(elapsed) * TICK)):
                failed = self.rng.random() < errors
                median, sigma = spec.get("latency_ms", 20.0), spec.get("sigma", 0.3)
                latency_ms = median * math.exp(self.rng.gauss(0, sigma))
                self.serve(failed, latency_ms)
                if not failed and spec.get("classes"):
                    names, weights = zip(*spec["classes"].items(), strict=True)
                    self.classes.labels("resnet", self.rng.choices(names, weights)[0]).inc()
                    self.scores.labels("resnet").observe(self.rng.betavariate(2, 5))
            time.sleep(TICK)

    def serve(self, failed: bool, latency_ms: float) -> None:
        labels = self.labels.values()
        if self.triton:
            (self.failure if failed else self.success).labels(*labels).inc()
            if not failed:
                self.count.labels(*labels).inc()
                self.duration.labels(*labels).inc(latency_ms * 1e3)
            return
        self.requests.labels(*labels, "503" if failed else "200").inc()
        self.latency.labels(*labels).observe(latency_ms)


def _poisson(rng: random.Random, mean: float) -> int:
    if mean > 30:  # normal approximation, rounded
        return max(0, round(rng.gauss(mean, math.sqrt(mean))))
    limit, k, p = math.exp(-mean), 0, rng.random()
    while p > limit:
        k += 1
        p *= rng.random()
    return k


def main() -> None:
    config = json.loads(Path(sys.argv[1]).read_text())
    directory = Path(config["dir"])
    started = time.monotonic()
    pods = [Pod(spec, directory) for spec in config["pods"]]
    for pod in pods:
        threading.Thread(target=pod.run, args=(started,), daemon=True).start()
    (directory / "fake-service.ready").write_text("ready")
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
