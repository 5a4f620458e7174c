#!/usr/bin/env python3
"""Soak and load: memory stays flat over many probes, /metrics under concurrent scrapers with
8 targets, exporter CPU and memory at a 1 s interval (reference backend, 8 targets).

    python bench/bench_soak.py [--probes 20000] [--scrapers 8] [--scrapes 2000]

Prints a table; the figures and command go to docs/performance.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from loadgen import cpu_seconds, start, wrk
from trt_heartbeat.exporter.app import Exporter


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def total_probes(exporter: Exporter) -> int:
    return sum(s.snapshot().probes_total["success"] for s in exporter.scheduler.states)


def soak(probes: int) -> list[tuple[str, str]]:
    exporter, server = start(0.02, 0.015, 1)
    try:
        while total_probes(exporter) < 500:
            time.sleep(0.1)
        worker = exporter.scheduler.loops[0].worker_pid or 0
        before = (rss_mib(os.getpid()), rss_mib(worker), total_probes(exporter))
        while total_probes(exporter) < before[2] + probes:
            time.sleep(0.5)
        after = (rss_mib(os.getpid()), rss_mib(worker), total_probes(exporter))
    finally:
        server.shutdown()
        exporter.stop()
    return [
        (
            f"soak: {after[2] - before[2]} probes, exporter RSS",
            f"{before[0]:.1f} -> {after[0]:.1f} MiB",
        ),
        ("soak: worker RSS", f"{before[1]:.1f} -> {after[1]:.1f} MiB"),
    ]


def load(scrapers: int, scrapes: int) -> list[tuple[str, str]]:
    exporter, server = start(1.0, 0.5, 8)
    url = f"http://127.0.0.1:{server.port}/metrics"
    try:
        while total_probes(exporter) < 16:
            time.sleep(0.1)
        # Idle cost: one minute of 8 targets probed every second, no scrapes.
        c0, t0 = cpu_seconds(), time.monotonic()
        time.sleep(60)
        idle_cpu = (cpu_seconds() - c0) / (time.monotonic() - t0)
        rss = rss_mib(os.getpid())
        with urllib.request.urlopen(url) as response:
            size = len(response.read())
        if shutil.which("wrk"):
            return [*rows(idle_cpu, rss), *wrk_load(url, scrapers, size)]
        latencies: list[float] = []
        lock = threading.Lock()

        def scrape(n: int) -> None:
            for _ in range(n):
                t = time.perf_counter()
                with urllib.request.urlopen(url, timeout=5) as response:
                    response.read()
                with lock:
                    latencies.append(time.perf_counter() - t)

        c0 = cpu_seconds()
        threads = [
            threading.Thread(target=scrape, args=(scrapes // scrapers,)) for _ in range(scrapers)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        cpu_per_scrape = (cpu_seconds() - c0) / len(latencies)
    finally:
        server.shutdown()
        exporter.stop()
    latencies.sort()
    p99 = latencies[int(0.99 * (len(latencies) - 1))]
    return [
        *rows(idle_cpu, rss),
        (
            f"/metrics, 8 targets ({size} B), {scrapers} scraper threads (no wrk)",
            f"p50 {statistics.median(latencies) * 1e3:.2f} ms, p99 {p99 * 1e3:.2f} ms",
        ),
        ("CPU per scrape (client threads included)", f"{cpu_per_scrape * 1e3:.2f} ms"),
    ]


def rows(idle_cpu: float, rss: float) -> list[tuple[str, str]]:
    return [
        ("8 targets, 1 s interval: exporter CPU", f"{idle_cpu * 100:.2f} % of one core"),
        ("8 targets, 1 s interval: exporter RSS", f"{rss:.1f} MiB"),
    ]


# Each wrk connection waits this long after a response: paced scrapers, not a saturating loop.
PACED_DELAY_MS = 50


def wrk_load(url: str, connections: int, size: int) -> list[tuple[str, str]]:
    """wrk (a separate process) against /metrics: latency percentiles and exporter CPU/scrape.

    Back-to-back connections measure throughput (latency there is connections / rate); paced
    ones measure what concurrent scrapers see while the exporter is not saturated.
    """
    rows = []
    with tempfile.NamedTemporaryFile("w", suffix=".lua") as script:
        script.write(f"function delay()\n  return {PACED_DELAY_MS}\nend\n")
        script.flush()
        for n, paced in ((1, False), (2, False), (connections, False), (connections, True)):
            run = wrk(url, n, 15, ["-s", script.name] if paced else [])
            how = f"each waiting {PACED_DELAY_MS} ms" if paced else "back to back"
            rows.append(
                (
                    f"/metrics, 8 targets ({size} B), wrk -c{n} ({how})",
                    f"p50 {run.p50}, p99 {run.p99}, {run.requests / 15:.0f} scrapes/s, "
                    f"exporter CPU {run.cpu / max(run.requests, 1) * 1e3:.2f} ms per scrape",
                )
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--probes", type=int, default=20000)
    parser.add_argument("--scrapers", type=int, default=8)
    parser.add_argument("--scrapes", type=int, default=2000)
    args = parser.parse_args()
    rows = soak(args.probes) + load(args.scrapers, args.scrapes)
    print("| measurement | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    main()
