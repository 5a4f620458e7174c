"""What the /metrics benchmarks share: an in-process exporter on the reference backend, this
process's CPU time, and one wrk run against it (bench_soak.py, bench_scrape.py)."""

from __future__ import annotations

import re
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from trt_heartbeat.domain import Target
from trt_heartbeat.exporter import config
from trt_heartbeat.exporter.app import Exporter
from trt_heartbeat.exporter.web.routes import Routes
from trt_heartbeat.exporter.web.server import ExporterHTTPServer


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def start(
    interval: float, timeout: float, targets: int, max_requests: int = 40
) -> tuple[Exporter, ExporterHTTPServer]:
    """An exporter probing `targets` fake GPUs with the reference backend, and its HTTP server."""
    settings = config.load(
        None, {"backend": "reference", "interval": interval, "timeout": timeout, "jitter": 0.1}
    )
    exporter = Exporter(settings, "reference", [Target(str(i), f"GPU-{i}") for i in range(targets)])
    server = ExporterHTTPServer("127.0.0.1", 0, Routes(exporter), max_requests=max_requests)
    server.start_background()
    exporter.start()
    return exporter, server


@dataclass(frozen=True)
class WrkRun:
    p50: str  # as wrk prints them, e.g. "1.34ms"
    p99: str
    requests: int
    cpu: float  # this process's CPU seconds during the run: the exporter's, as it runs here
    errors: bool  # non-2xx answers or socket errors


def wrk(url: str, connections: int, seconds: int, extra: Sequence[str] = ()) -> WrkRun:
    """wrk (a separate process) against `url` with keep-alive connections, and its figures."""
    c0 = cpu_seconds()
    out = subprocess.run(
        [
            "wrk",
            f"-t{min(connections, 2)}",
            f"-c{connections}",
            f"-d{seconds}s",
            "--latency",
            *extra,
            url,
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
    ).stdout
    cpu = cpu_seconds() - c0
    pct = dict(re.findall(r"^\s+(50|99)%\s+(\S+)$", out, re.MULTILINE))
    found = re.search(r"(\d+) requests in", out)
    errors = "Non-2xx" in out or "Socket errors" in out
    return WrkRun(
        pct.get("50", "?"), pct.get("99", "?"), int(found[1]) if found else 0, cpu, errors
    )


def serve_process(args: Sequence[str], log: Path) -> tuple[subprocess.Popen[bytes], int]:
    """`serve` with these arguments in a process of its own, logging JSON to `log`; the
    process and the port it listens on, once it does."""
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "trt_heartbeat",
            "serve",
            "--web.listen-address",
            "127.0.0.1:0",
            "--log.format",
            "json",
            *args,
        ],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )
    while True:
        match = re.search(r'"port": (\d+)', log.read_text())
        if match:
            return process, int(match.group(1))
        if process.poll() is not None:
            raise SystemExit(f"serve exited with {process.returncode}: see {log}")
        time.sleep(0.2)
