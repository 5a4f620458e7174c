#!/usr/bin/env python3
"""Hostile clients against `serve`, with a normal scraper alongside (docs/security.md).

Starts the exporter (reference backend, basic auth on, as a hardened deployment runs it) as its
own process. Each attack class of issue #25 then runs alone for `--seconds`, and finally all of
them at once, while a scraper with the right password fetches /metrics every 100 ms and a
liveness prober fetches /ping. Per phase it reports the scrapes answered 200 within 1 s, the
exporter's peak RSS and the tracebacks in its log.

    python bench/bench_hostile.py [--seconds 10] [--only ATTACK...] [--json out.json]

Exit status 1 when a phase misses the bar: fewer than 99% of scrapes answered 200 within 1 s, an
RSS peak over 150 MiB, or any traceback. Start-up and reload attacks (a FIFO as a TLS file or
config) and bad configuration are not request attacks: the unit tests cover them.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import multiprocessing
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import bcrypt

from loadgen import serve_process

USER, PASSWORD = "prometheus", "scrape-secret"
AUTH = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
RSS_LIMIT_MIB, ANSWERED_WITHIN, SHARE = 150.0, 1.0, 0.99


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def request(port: int, raw: bytes, timeout: float = 5.0, read: bool = True) -> bytes:
    """Send raw bytes on a fresh connection; what came back until the server closed (or timeout)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(raw)
        if not read:
            return b""
        data = b""
        try:
            while chunk := sock.recv(65536):
                data += chunk
        except OSError:
            pass
        return data


def get(path: str, *headers: str, method: str = "GET") -> bytes:
    head = [f"{method} {path} HTTP/1.1", "Host: bench", "Connection: close", *headers]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1")


# Each attack: one round, repeated by its thread until the phase ends.
def accept_versions(port: int, i: int) -> None:  # 1: a new Accept version per request
    request(
        port,
        get(
            "/metrics",
            f"Authorization: {AUTH}",
            f"Accept: application/openmetrics-text; version=2.{i}",
        ),
    )


def never_read(port: int, i: int) -> None:  # 2: pipelined scrapes on sockets that never read
    socks = []
    try:
        for _ in range(40):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
            sock.settimeout(2)
            sock.connect(("127.0.0.1", port))
            one = f"GET /metrics HTTP/1.1\r\nHost: bench\r\nAuthorization: {AUTH}\r\n\r\n"
            with contextlib.suppress(OSError):
                sock.sendall(one.encode() * 150)
            socks.append(sock)
        time.sleep(3)
    finally:
        for sock in socks:
            sock.close()


def big_head(port: int, i: int) -> None:  # 3: 100 headers of 64 KiB, never finished
    socks = []
    try:
        for _ in range(20):
            sock = socket.create_connection(("127.0.0.1", port), timeout=2)
            try:
                sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: bench\r\n")
                for n in range(100):
                    sock.sendall(f"X-Pad-{n}: ".encode() + b"a" * 65000 + b"\r\n")
            except OSError:
                pass
            socks.append(sock)
        time.sleep(1)
    finally:
        for sock in socks:
            sock.close()


def malformed_target(port: int, i: int) -> None:  # 4
    request(port, b"GET http://[::1/x HTTP/1.1\r\nHost: bench\r\n\r\n")


def bad_accept(port: int, i: int) -> None:  # 5, 12
    version = ("foo", "1.x", "0.0.4\rX-Injected: 1")[i % 3]
    request(
        port, get("/metrics", f"Authorization: {AUTH}", f"Accept: text/plain; version={version}")
    )


def auth_flood(port: int, i: int) -> None:  # 6: wrong passwords, unknown users, > 72 bytes
    user, password = ((USER, f"wrong{i}"), (f"nobody{i}", "x"), (USER, "p" * 100))[i % 3]
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    request(port, get("/metrics", f"Authorization: Basic {token}"))


def smuggle(port: int, i: int) -> None:  # 7: two differing Content-Lengths
    hidden = get("/metrics")
    request(
        port,
        b"GET /ping HTTP/1.1\r\nHost: bench\r\nContent-Length: 0\r\n"
        b"Content-Length: %d\r\n\r\n" % len(hidden) + hidden,
    )


def framing(port: int, i: int) -> None:  # 9, 10, 11, 13
    shapes = [
        get("/metrics", method="HEAD"),  # HEAD answered 401
        b"GET /ping HTTP/1.1\r\nHost: bench\r\nX-A: a\rb\r\n\r\n",  # bare CR
        b"GET /ping HTTP/1.1\r\nHost: bench\r\nX-A: a\x00b\r\n\r\n",  # NUL
        "GET\u00a0/ping HTTP/1.1\r\nHost: bench\r\n\r\n".encode(),  # NBSP in the request line
        b"GET /ping HTTP/1.1\r\n\r\n",  # no Host
        b"GET /ping HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",  # two Hosts
        get("/metrics", f"Authorization: {AUTH}", "Accept-Encoding: gzip;q=0"),
        b"GET /ping HTTP/1.1\r\nHost: bench\r\nConnection: close, TE\r\n\r\n",
        b"GET /ping HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
    ]
    request(port, shapes[i % len(shapes)], timeout=2)


ATTACKS: dict[str, Callable[[int, int], None]] = {
    "accept-version": accept_versions,
    "never-read": never_read,
    "big-head": big_head,
    "malformed-target": malformed_target,
    "bad-accept": bad_accept,
    "auth-flood": auth_flood,
    "smuggle": smuggle,
    "framing": framing,
}


def attacker(name: str, port: int, stop: Any) -> None:
    """One attack class in a process of its own (two connections' worth of threads): the
    attacker is another machine, and its threads must not share the scraper's GIL."""

    def loop() -> None:
        i = 0
        while not stop.is_set():
            with contextlib.suppress(OSError):
                ATTACKS[name](port, i)
            i += 1

    threads = [threading.Thread(target=loop, daemon=True) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def scraper(port: int, path: str, stop: threading.Event, out: list[tuple[int, float]]) -> None:
    raw = get(path, f"Authorization: {AUTH}")
    while not stop.is_set():
        start = time.monotonic()
        try:
            data = request(port, raw, timeout=ANSWERED_WITHIN * 5)
            code = int(data[9:12]) if data[:5] == b"HTTP/" else 0
        except (OSError, ValueError):
            code = 0
        out.append((code, time.monotonic() - start))
        stop.wait(0.1)


def phase(port: int, pid: int, names: list[str], seconds: float, log: Path) -> dict[str, object]:
    stop = threading.Event()
    scrapes: list[tuple[int, float]] = []
    pings: list[tuple[int, float]] = []
    tracebacks_before = log.read_text(errors="replace").count("Traceback")
    halt = multiprocessing.get_context("fork").Event()
    attackers = [
        multiprocessing.get_context("fork").Process(
            target=attacker, args=(n, port, halt), daemon=True
        )
        for n in names
    ]
    threads = [
        threading.Thread(target=scraper, args=(port, "/metrics", stop, scrapes), daemon=True),
        threading.Thread(target=scraper, args=(port, "/ping", stop, pings), daemon=True),
    ]
    for p in attackers:
        p.start()
    for t in threads:
        t.start()
    rss, deadline = [], time.monotonic() + seconds
    while time.monotonic() < deadline:
        rss.append(rss_mib(pid))
        time.sleep(0.1)
    stop.set()
    halt.set()
    for t in threads:
        t.join(15)
    for p in attackers:
        p.join(15)
        if p.is_alive():
            p.kill()
    time.sleep(0.5)

    def share(results: list[tuple[int, float]]) -> float:
        good = sum(1 for code, t in results if code == 200 and t <= ANSWERED_WITHIN)
        return good / len(results) if results else 0.0

    def misses(results: list[tuple[int, float]]) -> list[tuple[int, float]]:
        return sorted(
            {(code, round(t, 2)) for code, t in results if code != 200 or t > ANSWERED_WITHIN}
        )[:10]

    return {
        "attacks": names,
        "scrape_misses": misses(scrapes),
        "ping_misses": misses(pings),
        "scrapes": len(scrapes),
        "scrapes_200_within_1s": round(share(scrapes), 4),
        "pings_200_within_1s": round(share(pings), 4),
        "rss_peak_mib": round(max(rss), 1),
        "tracebacks": log.read_text(errors="replace").count("Traceback") - tracebacks_before,
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--only", nargs="*", choices=list(ATTACKS), help="these attacks alone")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-hostile-"))
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(10)).decode()
    (work / "web.yml").write_text(f"basic_auth_users:\n  {USER}: '{hashed}'\n")
    log = work / "exporter.log"
    process, port = serve_process(
        ["--backend", "reference", "--web.config.file", str(work / "web.yml")], log
    )
    results: list[dict[str, Any]] = []
    try:
        for name in args.only or ATTACKS:
            results.append(phase(port, process.pid, [name], args.seconds, log))
        if not args.only:
            results.append(phase(port, process.pid, list(ATTACKS), args.seconds * 2, log))
    finally:
        process.terminate()
        process.wait(10)
    failed = False
    print(
        f"{'attack':18s} {'scrapes':>7s} {'200<1s':>7s} {'ping':>7s} {'RSS MiB':>8s} "
        f"{'tracebacks':>10s}"
    )
    for r in results:
        names = r["attacks"]
        label = "all at once" if len(names) > 1 else names[0]
        bad = (
            r["scrapes_200_within_1s"] < SHARE
            or r["rss_peak_mib"] > RSS_LIMIT_MIB
            or r["tracebacks"] != 0
        )
        failed |= bad
        print(
            f"{label:18s} {r['scrapes']:7d} {r['scrapes_200_within_1s']:7.2%} "
            f"{r['pings_200_within_1s']:7.2%} {r['rss_peak_mib']:8.1f} {r['tracebacks']:10d}"
            f"{'  MISSED' if bad else ''}"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
