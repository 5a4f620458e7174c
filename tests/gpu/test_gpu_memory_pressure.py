"""A probe worker SIGKILLed while another process leaves 400 MiB free (issue #24, item 7).

From the kill until 15 s after the new worker's first passing probe, /health must never answer
`healthy`, and it ends `degraded`/`gpu_memory_low`. The first two kills are timed so that NVML's
next read falls between the kill and the exporter's next probe (the sequence seen on an H200);
the third is not timed. The whole sequence is recorded under $OUT (docs/gpu-validation.md): /health
every 50 ms, every NVML reading the exporter published, the GPU's free memory read here every few
ms, the worker's exit, and the exporter's log.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from served import HOG, Served, serve  # noqa: F401 (a fixture)

from conftest import wait_for

pytestmark = pytest.mark.gpu
MIB = 1 << 20
LEAVE = 400 * MIB
INTERVAL = 2.0
AFTER_BACK = 15.0
LOGGED = (
    "target health changed",
    "worker replaced",
    "probe failing",
    "probe model loaded",
    "probe passing",
    "first probe passed",
    "NVML read failed",
)


def _smi(query: str) -> list[list[str]]:
    command = ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader,nounits"]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return [[v.strip() for v in line.split(",")] for line in out.splitlines() if line.strip()]


@pytest.fixture
def hog() -> Iterator[Callable[[int], int]]:
    """Another process on GPU 0 that takes all but `leave` bytes of its free memory."""
    started: list[subprocess.Popen[str]] = []

    def start(leave: int) -> int:
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": _smi("uuid")[0][0]}
        process = subprocess.Popen(
            [sys.executable, "-c", HOG, str(leave)], env=env, stdout=subprocess.PIPE, text=True
        )
        started.append(process)
        assert process.stdout is not None
        return int(process.stdout.readline())

    yield start
    for process in started:
        process.kill()
        process.wait()


def _epoch(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


class Recorder:
    """Pollers on their own threads; every list holds (wall-clock time, ...) changes only."""

    def __init__(self, s: Served) -> None:
        self.s = s
        self.stop = threading.Event()
        self.health: list[dict[str, Any]] = []  # /health, each change of status/reason/free
        self.health_polls = 0
        self.nvml_reads: list[dict[str, Any]] = []  # each NVML reading the exporter published
        self.local: list[tuple[float, float]] = []  # (t, free MiB) read here, on each change
        pollers = (self._poll_health, self._poll_metrics, self._poll_local)
        self._threads = [threading.Thread(target=f, daemon=True) for f in pollers]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def close(self) -> None:
        self.stop.set()
        for thread in self._threads:
            thread.join(10)

    def _poll_health(self) -> None:
        last: tuple[Any, ...] = ()
        while not self.stop.is_set():
            t = time.time()
            report = json.loads(self.s.get("/health")[1])
            target = report["targets"][0]
            key = (report["status"], report["reason"], target.get("gpu_memory", {}).get("free_mib"))
            self.health_polls += 1
            if key != last:
                self.health.append(
                    {
                        "t": t,
                        "status": key[0],
                        "reason": key[1],
                        "free_mib": key[2],
                        "loaded": target["engine_loaded"],
                    }
                )
                last = key
            self.stop.wait(0.05)

    def _poll_metrics(self) -> None:
        seen = None
        while not self.stop.is_set():
            t = time.time()
            samples = self.s.samples()
            read = samples.get("trt_heartbeat_nvml_last_success_timestamp_seconds")
            at = read[0][1] if read else None
            if at is not None and at != seen:
                free = [
                    v
                    for labels, v in samples.get("trt_heartbeat_gpu_memory_free_bytes", [])
                    if labels["gpu"] == "0" and labels["source"] == "nvml"
                ]
                self.nvml_reads.append(
                    {"read_at": at, "seen_at": t, "free_mib": free[0] / MIB if free else None}
                )
                seen = at
            self.stop.wait(0.1)

    def _poll_local(self) -> None:
        import pynvml

        pynvml.nvmlInit()
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            version = getattr(pynvml, "nvmlMemory_v2", None)
            last = -1.0
            while not self.stop.is_set():
                if version is not None:
                    info = pynvml.nvmlDeviceGetMemoryInfo(handle, version=version)
                else:
                    info = pynvml.nvmlDeviceGetMemoryInfo(handle)
                t, free = time.time(), info.free / MIB
                if abs(free - last) >= 1:
                    self.local.append((t, free))
                    last = free
                time.sleep(0.003)
        finally:
            pynvml.nvmlShutdown()


def _probes(s: Served) -> dict[str, Any]:
    target: dict[str, Any] = json.loads(s.get("/probes")[1])["targets"][0]
    return target


def _moment(s: Served, rec: Recorder, lead: tuple[float, float] | None) -> dict[str, Any]:
    """Wait for the moment to kill: with `lead`, when NVML's next read is due within that many
    seconds and no probe is due until at least 0.5 s after it; else right after a probe."""
    deadline = time.time() + 40
    while time.time() < deadline:
        target = _probes(s)
        now = time.time()
        last_probe = _epoch(target["probes"][0]["time"]) if target["probes"] else 0.0
        if now - last_probe < 0.1:
            time.sleep(0.01)
            continue
        if lead is None:
            return {"targeted": False, "last_probe": last_probe}
        reads = [r["read_at"] for r in rec.nvml_reads]
        if len(reads) >= 2:
            due = reads[-1] + (reads[-1] - reads[-2])
            next_probe = last_probe + INTERVAL * 0.9  # the earliest, with 10 % jitter
            if lead[0] <= due - now <= lead[1] and next_probe - due >= 0.5:
                return {"targeted": True, "last_probe": last_probe, "nvml_read_due": due}
        time.sleep(0.01)
    return {"targeted": False, "last_probe": None, "note": "no moment found in 40 s"}


def _back(s: Served, kill: dict[str, Any]) -> float | None:
    """When the worker that replaced the killed one first passed a probe; None until then."""
    target = _probes(s)
    if target["worker_pid"] in (None, kill["pid"]):
        return None
    passed = [
        _epoch(p["time"])
        for p in target["probes"]
        if p["result"] == "success" and _epoch(p["time"]) > kill["t_kill"]
    ]
    return min(passed) if passed else None


def _watch_exit(pid: int, limit: float = 5.0) -> float | None:
    """When the killed worker has exited (zombie or reaped), as seen from /proc."""
    end = time.time() + limit
    while time.time() < end:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError, IndexError):
            return time.time()
        if state in ("Z", "X"):
            return time.time()
        time.sleep(0.0005)
    return None


def _log_events(log: Path) -> list[dict[str, Any]]:
    events = []
    for line in log.read_text().splitlines():
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if doc.get("msg") in LOGGED:
            events.append({"t": _epoch(doc["ts"]), **{k: v for k, v in doc.items() if k != "ts"}})
    return events


def _relative(kill: dict[str, Any], rec: Recorder, events: list[dict[str, Any]]) -> None:
    """The sequence of one kill, in seconds from the kill, from the kill to the observation's
    end: what each source saw and when."""
    t0, end = float(kill["t_kill"]), float(kill["t_end"])

    def r(t: float) -> float:
        return round(t - t0, 4)

    def within(t: float) -> bool:
        return t0 - 2.5 <= t <= end

    kill["health"] = [{**h, "t": r(h["t"])} for h in rec.health if within(h["t"])]
    kill["nvml_reads"] = [
        {**n, "read_at": r(n["read_at"]), "seen_at": r(n["seen_at"])}
        for n in rec.nvml_reads
        if within(n["read_at"])
    ]
    kill["local_free_mib"] = [(r(t), round(f, 1)) for t, f in rec.local if within(t)]
    kill["log"] = [{**e, "t": r(e["t"])} for e in events if within(e["t"])]
    for key in ("t_exit", "t_back"):
        if kill.get(key) is not None:
            kill[key.replace("t_", "") + "_after_s"] = r(kill[key])
    freed = [t for t, f in rec.local if t >= t0 and f >= kill["free_before_mib"] + 100]
    kill["driver_freed_after_s"] = r(freed[0]) if freed else None
    windows, opened = [], None
    after = [h for h in rec.health if t0 <= h["t"] <= end]
    before = [h for h in rec.health if h["t"] < t0]
    if before and before[-1]["status"] == "healthy":
        opened = t0
    for h in after:
        if h["status"] == "healthy" and opened is None:
            opened = h["t"]
        elif h["status"] != "healthy" and opened is not None:
            windows.append((r(opened), r(h["t"])))
            opened = None
    if opened is not None:
        windows.append((r(opened), r(end)))
    kill["healthy_windows_s"] = windows


def test_worker_killed_with_400_mib_free_never_reports_healthy(
    serve: Callable[..., Served],
    hog: Callable[[int], int],
    tmp_path: Path,
) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("gpus: [0]\n")  # NVML on (auto), read every 5 s as by default
    s = serve("--config", str(config), "--backend", "cuda", "--interval", "2s", "--timeout", "1s")
    wait_for(
        lambda: json.loads(s.get("/health")[1])["status"] == "healthy", timeout=120, what="healthy"
    )
    rec = Recorder(s)
    rec.start()
    left = hog(LEAVE)
    record: dict[str, Any] = {
        "gpu": _smi("name,driver_version,memory.total")[0],
        "hog_left_free_mib": left / MIB,
        "interval_s": INTERVAL,
        "nvml_interval_s": 5.0,
        "threshold_mib": 512,
        "kills": [],
    }
    kills: list[dict[str, Any]] = record["kills"]
    try:
        wait_for(
            lambda: json.loads(s.get("/health")[1])["reason"] == "gpu_memory_low",
            timeout=30,
            what="gpu_memory_low before the kill",
        )
        for lead in ((0.25, 0.45), (0.25, 0.45), None):
            moment = _moment(s, rec, lead)
            pid = _probes(s)["worker_pid"]
            free_before = rec.local[-1][1]
            t_kill = time.time()
            os.kill(pid, signal.SIGKILL)
            kill: dict[str, Any] = {
                "pid": pid,
                "t_kill": t_kill,
                "free_before_mib": free_before,
                **moment,
            }
            kills.append(kill)
            kill["t_exit"] = _watch_exit(pid)
            kill["t_back"] = wait_for(
                functools.partial(_back, s, kill), timeout=60, what="a new worker's passing probe"
            )
            time.sleep(max(0.0, kill["t_back"] + AFTER_BACK - time.time()))
            kill["t_end"] = time.time()
            kill["final"] = json.loads(s.get("/health")[1])["targets"][0]
    finally:
        rec.close()
        events = _log_events(s.log)
        for kill in kills:
            if "t_end" in kill:
                _relative(kill, rec, events)
        record["health_polls"] = rec.health_polls
        out = os.environ.get("OUT")
        if out:
            Path(out, "memory-pressure.json").write_text(json.dumps(record, indent=1))
    for kill in kills:
        assert kill["healthy_windows_s"] == [], kill
        assert (kill["final"]["status"], kill["final"]["reason"]) == (
            "degraded",
            "gpu_memory_low",
        ), kill
