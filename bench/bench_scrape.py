#!/usr/bin/env python3
"""/metrics under concurrent keep-alive scrapers: 8 targets, wrk as the load (a separate process).

    python bench/bench_scrape.py [--targets 8] [--interval 10] [--seconds 30]

The exporter runs in this process with the reference backend, probing every target on its
interval (so cached bytes are rebuilt as probes land, as in production). For 8 and 32
connections, back to back, plain and gzip (what Prometheus asks for): p50/p99 latency, scrapes
per second, and the exporter's CPU per scrape. Needs `wrk` (Debian package `wrk`).
"""

from __future__ import annotations

import argparse
import shutil
import time
import urllib.request

from loadgen import start, wrk


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", type=int, default=8)
    parser.add_argument("--interval", type=float, default=10.0)
    parser.add_argument("--seconds", type=int, default=30)
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("bench_scrape.py needs wrk (apt-get install wrk)")
    exporter, server = start(
        args.interval, min(5.0, args.interval / 2), args.targets, max_requests=0
    )
    url = f"http://127.0.0.1:{server.port}/metrics"
    try:
        while any(s.snapshot().last_success is None for s in exporter.scheduler.states):
            time.sleep(0.1)
        with urllib.request.urlopen(url) as response:
            size = len(response.read())
        print(
            f"| /metrics, {args.targets} targets ({size} B), probe interval "
            f"{args.interval:g} s, wrk {args.seconds} s | p50 | p99 | scrapes/s | "
            "exporter CPU per scrape |\n|---|---|---|---|---|"
        )
        for connections in (8, 32):
            for encoding in ("plain", "gzip"):
                header = ["-H", "Accept-Encoding: gzip"] if encoding == "gzip" else []
                run = wrk(url, connections, args.seconds, header)
                print(
                    f"| {connections} connections, {encoding}"
                    f"{' (errors!)' if run.errors else ''} | {run.p50} | {run.p99} | "
                    f"{run.requests / args.seconds:.0f} | "
                    f"{run.cpu / max(run.requests, 1) * 1e3:.3f} ms |"
                )
    finally:
        server.shutdown()
        exporter.stop()


if __name__ == "__main__":
    main()
