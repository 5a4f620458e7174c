#!/usr/bin/env python3
"""Multi-GPU benchmark: start-up to all healthy, worker binding, /metrics with every GPU probed.

    python bench/bench_fleet.py [--scrapes 500] [--json FILE]

Runs on a machine with several NVIDIA GPUs (see docs/gpu-validation.md). Starts `serve` with the
cuda backend on every GPU at 1 s / 900 ms and measures:
  - seconds from process start to /health healthy with every target healthy;
  - binding: NVML's per-process lists, each worker PID on its own GPU and on no other;
  - /metrics over one keep-alive connection (the way Prometheus scrapes): p50/p99 and size.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _get(conn: http.client.HTTPConnection, path: str) -> tuple[int, bytes]:
    conn.request("GET", path)
    response = conn.getresponse()
    return response.status, response.read()


def _binding(workers: dict[str, int]) -> dict[str, list[str]]:
    """Worker PID -> the GPUs (UUIDs) NVML lists it on."""
    import pynvml

    pynvml.nvmlInit()
    try:
        seen: dict[str, list[str]] = {gpu: [] for gpu in workers}
        pids = {pid: gpu for gpu, pid in workers.items()}
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            uuid = pynvml.nvmlDeviceGetUUID(handle)
            for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                if proc.pid in pids:
                    seen[pids[proc.pid]].append(str(uuid))
        return seen
    finally:
        pynvml.nvmlShutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scrapes", type=int, default=500)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    log = Path(tempfile.mkdtemp()) / "serve.log"
    started = time.monotonic()
    with log.open("w") as sink:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "trt_heartbeat",
                "serve",
                "--backend",
                "cuda",
                "--interval",
                "1s",
                "--timeout",
                "900ms",
                "--web.listen-address",
                "127.0.0.1:0",
                "--log.format",
                "json",
            ],
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    try:
        port = None
        while port is None:
            match = re.search(r'"msg": "listening".*"port": (\d+)', log.read_text())
            port = int(match.group(1)) if match else None
            if process.poll() is not None:
                raise SystemExit(log.read_text())
            time.sleep(0.02)
        listening = time.monotonic() - started
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        while True:
            status, body = _get(conn, "/health")
            report = json.loads(body)
            if report["status"] == "healthy" and all(
                t["status"] == "healthy" for t in report["targets"]
            ):
                break
            time.sleep(0.05)
        healthy = time.monotonic() - started
        targets = [t["gpu"] for t in report["targets"]]
        workers = {
            t["gpu"]: int(t["worker_pid"]) for t in json.loads(_get(conn, "/probes")[1])["targets"]
        }
        binding = _binding(workers)
        times, size = [], 0
        for _ in range(args.scrapes):
            t0 = time.perf_counter()
            status, body = _get(conn, "/metrics")
            times.append(time.perf_counter() - t0)
            assert status == 200
            size = len(body)
        series = sum(1 for line in body.decode().splitlines() if line and line[0] != "#")
        results: dict[str, Any] = {
            "gpus": targets,
            "seconds_to_listening": round(listening, 2),
            "seconds_to_all_healthy": round(healthy, 2),
            "binding": binding,
            "each_worker_on_exactly_its_own_gpu": all(len(v) == 1 for v in binding.values())
            and len({v[0] for v in binding.values()}) == len(binding),
            "metrics_p50_ms": round(statistics.median(times) * 1e3, 3),
            "metrics_p99_ms": round(_pct(times, 0.99) * 1e3, 3),
            "metrics_bytes": size,
            "metrics_series": series,
            "cpus": os.cpu_count(),
        }
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
    text = json.dumps(results, indent=2)
    if args.json:
        Path(args.json).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
