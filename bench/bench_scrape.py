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
import re
import resource
import shutil
import subprocess
import time
import urllib.request

from trt_heartbeat import config
from trt_heartbeat.app import Exporter
from trt_heartbeat.backends import Target
from trt_heartbeat.http_server import ExporterHTTPServer


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", type=int, default=8)
    parser.add_argument("--interval", type=float, default=10.0)
    parser.add_argument("--seconds", type=int, default=30)
    args = parser.parse_args()
    wrk = shutil.which("wrk")
    if wrk is None:
        raise SystemExit("bench_scrape.py needs wrk (apt-get install wrk)")
    settings = config.load(None, {"backend": "reference", "interval": args.interval,
                                  "timeout": min(5.0, args.interval / 2)})  # fmt: skip
    targets = [Target(str(i), f"GPU-{i}") for i in range(args.targets)]
    exporter = Exporter(settings, "reference", targets)
    server = ExporterHTTPServer("127.0.0.1", 0, exporter, max_requests=0)
    server.start_background()
    exporter.start()
    url = f"http://127.0.0.1:{server.port}/metrics"
    try:
        while any(s.snapshot().last_success is None for s in exporter.scheduler.states):
            time.sleep(0.1)
        with urllib.request.urlopen(url) as response:
            size = len(response.read())
        print(f"| /metrics, {args.targets} targets ({size} B), probe interval "
              f"{args.interval:g} s, wrk {args.seconds} s | p50 | p99 | scrapes/s | "
              "exporter CPU per scrape |\n|---|---|---|---|---|")  # fmt: skip
        for connections in (8, 32):
            for encoding in ("plain", "gzip"):
                header = ["-H", "Accept-Encoding: gzip"] if encoding == "gzip" else []
                c0 = cpu_seconds()
                out = subprocess.run(
                    [wrk, "-t2", f"-c{connections}", f"-d{args.seconds}s", "--latency",
                     *header, url], capture_output=True, text=True, timeout=args.seconds + 60,
                ).stdout  # fmt: skip
                cpu = cpu_seconds() - c0
                pct = dict(re.findall(r"^\s+(50|99)%\s+(\S+)$", out, re.MULTILINE))
                found = re.search(r"(\d+) requests in", out)
                requests = int(found.group(1)) if found else 0
                errors = "Non-2xx" in out or "Socket errors" in out
                print(f"| {connections} connections, {encoding}{' (errors!)' if errors else ''}"
                      f" | {pct.get('50')} | {pct.get('99')} | {requests / args.seconds:.0f} | "
                      f"{cpu / max(requests, 1) * 1e3:.3f} ms |")  # fmt: skip
    finally:
        server.shutdown()
        exporter.stop()


if __name__ == "__main__":
    main()
