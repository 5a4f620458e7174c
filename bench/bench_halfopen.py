#!/usr/bin/env python3
"""A scraper's view while an attacker holds hundreds of idle or half-open connections.

Starts the exporter (reference backend) as its own process; a thread keeps `--connections`
connections open to it, each either idle (connected, silent) or half-open (an unfinished request,
re-sent whenever the exporter cuts it), while one scraper fetches /metrics back to back.
    python bench/bench_halfopen.py [--connections 500] [--seconds 20] [--mode half-open|idle]
Prints scrape latency percentiles, non-200 answers and the exporter's RSS (docs/performance.md).
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

from loadgen import serve_process

HALF_OPEN = b"GET /metrics HTTP/1.1\r\nHost: x\r\n"  # never the blank line


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def attacker(port: int, count: int, mode: str, stop: threading.Event, reopened: list[int]) -> None:
    conns: list[socket.socket | None] = [None] * count
    while not stop.is_set():
        for i, sock in enumerate(conns):
            if sock is not None:
                try:  # a peek: the exporter hung up on this one?
                    sock.setblocking(False)
                    closed = sock.recv(1, socket.MSG_PEEK) == b""
                except BlockingIOError:
                    closed = False
                except OSError:
                    closed = True
                if not closed:
                    continue
                sock.close()
                reopened[0] += 1
            try:
                sock = socket.create_connection(("127.0.0.1", port), timeout=5)
                if mode == "half-open":
                    sock.sendall(HALF_OPEN)
                conns[i] = sock
            except OSError:
                conns[i] = None
        stop.wait(0.2)
    for sock in conns:
        if sock is not None:
            sock.close()


def scrape(port: int) -> tuple[int, float]:
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return int(data[9:12] or 0), time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--connections", type=int, default=500)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--mode", choices=["half-open", "idle"], default="half-open")
    args = parser.parse_args()
    log = Path("/tmp/bench_halfopen.log")
    process, port = serve_process(["--backend", "reference"], log)
    try:
        baseline = [scrape(port)[1] for _ in range(200)]
        stop, reopened = threading.Event(), [0]
        thread = threading.Thread(
            target=attacker, args=(port, args.connections, args.mode, stop, reopened), daemon=True
        )
        thread.start()
        time.sleep(2)
        results, rss = [], []
        deadline = time.monotonic() + args.seconds
        while time.monotonic() < deadline:
            results.append(scrape(port))
            if len(results) % 100 == 0:
                rss.append(rss_mib(process.pid))
        rss.append(rss_mib(process.pid))
        stop.set()
        thread.join(10)
    finally:
        process.terminate()
        process.wait(10)
    times = sorted(t for _, t in results)

    def q(values: list[float], p: float) -> float:
        return statistics.quantiles(values, n=100)[int(p) - 1] * 1e3

    bad = sum(1 for code, _ in results if code != 200)
    codes = sorted({code for code, _ in results if code != 200})
    print(
        f"exporter alone: /metrics p50 {q(sorted(baseline), 50):.2f} ms, "
        f"p99 {q(sorted(baseline), 99):.2f} ms"
    )
    print(
        f"{args.connections} {args.mode} connections held ({reopened[0]} re-opened after the "
        f"exporter cut them): {len(results)} scrapes, {bad} not 200 {codes or ''}, "
        f"p50 {q(times, 50):.2f} ms, p99 {q(times, 99):.2f} ms, max {times[-1] * 1e3:.1f} ms; "
        f"exporter RSS max {max(rss):.1f} MiB"
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
