#!/usr/bin/env python3
"""Benchmark: cost of worker isolation per probe, and /metrics latency (reference backend).

    python bench/bench_overhead.py [--probes 2000] [--scrapes 500] [--json]

Overhead is the exporter-measured round trip minus the compute time the backend measured inside
the worker: pipe transfer, pickling, scheduling and the golden check.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import statistics
import time

from trt_heartbeat import __version__
from trt_heartbeat.domain import Target
from trt_heartbeat.exporter import config
from trt_heartbeat.exporter.app import Exporter
from trt_heartbeat.exporter.backends import resolve_spec
from trt_heartbeat.exporter.timed_probe import run_probe
from trt_heartbeat.exporter.web.routes import Routes
from trt_heartbeat.exporter.web.server import ExporterHTTPServer
from trt_heartbeat.exporter.worker import Worker, WorkerSpec


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summary(values: list[float]) -> dict[str, float]:
    return {
        "median_us": statistics.median(values) * 1e6,
        "p99_us": pct(values, 0.99) * 1e6,
        "max_us": max(values) * 1e6,
    }


def bench_probes(n: int) -> dict[str, dict[str, float]]:
    worker = Worker(WorkerSpec(resolve_spec("reference"), Target("cpu"), "fp32"))
    worker.start()
    worker.wait_ready(60, lambda: True)
    totals, computes, overheads = [], [], []
    try:
        for _ in range(50):  # warm-up: page faults, first pickles
            run_probe(worker, "fp32", 5, lambda: True)
        for _ in range(n):
            record = run_probe(worker, "fp32", 5, lambda: True).record
            assert record.result == "success", record
            totals.append(record.phases["total"])
            computes.append(record.phases["compute"])
            overheads.append(record.phases["total"] - record.phases["compute"])
    finally:
        worker.close()
    return {"total": summary(totals), "compute": summary(computes), "overhead": summary(overheads)}


def bench_scrapes(n: int) -> dict[str, float | int]:
    settings = config.load(None, {"backend": "reference", "interval": 1, "timeout": 0.5})
    exporter = Exporter(settings, "reference")
    server = ExporterHTTPServer("127.0.0.1", 0, Routes(exporter))
    server.start_background()
    exporter.start()
    try:
        deadline = time.monotonic() + 30
        while exporter.scheduler.states[0].snapshot().probes_total["success"] < 1:
            if time.monotonic() > deadline:
                raise SystemExit("exporter never passed a probe")
            time.sleep(0.05)
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
        latencies, size = [], 0
        for i in range(n + 20):
            t0 = time.perf_counter()
            conn.request("GET", "/metrics")
            response = conn.getresponse()
            body = response.read()
            if i >= 20:  # warm-up
                latencies.append(time.perf_counter() - t0)
            size = len(body)
        conn.close()
    finally:
        server.shutdown()
        server.server_close()
        exporter.stop()
    return {**summary(latencies), "bytes": size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--probes", type=int, default=2000)
    parser.add_argument("--scrapes", type=int, default=500)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args()
    result = {
        "exporter": __version__,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "probes": args.probes,
        "scrapes": args.scrapes,
        "probe": bench_probes(args.probes),
        "metrics": bench_scrapes(args.scrapes),
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(
        f"trt-heartbeat-exporter {__version__}, Python {result['python']}, "
        f"{result['cpus']} CPUs, reference backend"
    )
    print("| measurement | median | p99 | max |")
    print("|---|---|---|---|")
    rows = [(f"probe {k} ({args.probes} probes)", v) for k, v in result["probe"].items()]
    rows.append((f"GET /metrics ({args.scrapes} scrapes)", result["metrics"]))
    for name, s in rows:
        print(f"| {name} | {s['median_us']:.0f} µs | {s['p99_us']:.0f} µs | {s['max_us']:.0f} µs |")
    print(f"/metrics body: {result['metrics']['bytes']} bytes")


if __name__ == "__main__":
    main()
