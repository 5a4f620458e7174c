"""The `probe` command's run: each target probed COUNT times by a worker of its own, once, and
the JSON report of what happened (the same probe records as /probes).

It shares the frame's probe (`timed_probe.run_probe`): a one-shot probe is judged exactly as
one of `serve`'s.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict
from typing import Any

from trt_heartbeat.exporter.backends import BackendOptions, resolve_spec
from trt_heartbeat.exporter.config import Settings
from trt_heartbeat.exporter.gpus import probes_gpus, targets_for
from trt_heartbeat.exporter.timed_probe import run_probe
from trt_heartbeat.exporter.web.routes import probe_record_json
from trt_heartbeat.exporter.worker import Worker, WorkerAborted, WorkerFailure, WorkerSpec


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _probe_target(worker: Worker, settings: Settings, count: int, entry: dict[str, Any]) -> bool:
    """Start the worker, probe it `count` times into `entry`; whether every probe passed."""
    worker.start()
    try:
        info, load_seconds = worker.wait_ready(settings.startup_timeout, lambda: True)
    except WorkerFailure as failure:
        entry["error"] = {"reason": str(failure.reason), "message": str(failure)}
        return False
    entry.update(engine=asdict(info), engine_load_seconds=round(load_seconds, 6))
    totals = []
    try:
        for _ in range(count):
            outcome = run_probe(worker, settings.precision, settings.timeout, lambda: True)
            record = outcome.record
            entry["probes"].append(probe_record_json(record))
            if record.result == "success":
                totals.append(record.phases["total"])
            if outcome.restart_reason is not None:
                break  # the worker is gone; the report says why
    except WorkerAborted:  # pragma: no cover - keep_waiting never aborts here
        pass
    finally:
        worker.close()
    passed = len(totals)
    entry["passed"], entry["failed"] = passed, count - passed
    if totals:
        entry["total_seconds"] = {
            "median": statistics.median(totals),
            "p99": _percentile(totals, 0.99),
        }
    return passed == count


def probe_targets(settings: Settings, backend: str, has_gpu: bool, count: int) -> dict[str, Any]:
    """Probe every target `count` times; the report, whose `passed` says if every probe did."""
    spec = resolve_spec(backend)
    report: dict[str, Any] = {"backend": backend, "precision": settings.precision, "targets": []}
    options = BackendOptions(settings.cuda_api, settings.engine_cache_dir)
    bind_gpu = probes_gpus(backend, settings, has_gpu)
    all_passed = True
    for target in targets_for(backend, settings, has_gpu):
        worker = Worker(WorkerSpec(spec, target, settings.precision, options, bind_gpu=bind_gpu))
        entry: dict[str, Any] = {"gpu": target.gpu, "uuid": target.uuid, "probes": []}
        report["targets"].append(entry)
        passed = _probe_target(worker, settings, count, entry)
        all_passed = all_passed and passed
    report["passed"] = all_passed
    return report


def summary_line(report: dict[str, Any]) -> str:
    """One line: what passed, or the first failure of each failing target."""
    problems = []
    for target in report["targets"]:
        failed = [p for p in target["probes"] if p["result"] != "success"]
        if "error" in target:
            problems.append(f"gpu {target['gpu']}: {target['error']['reason']}")
        elif failed or not target["probes"]:
            reason = failed[0]["reason"] if failed else "no probe ran"
            problems.append(f"gpu {target['gpu']}: {reason}")
    if problems:
        return "failed: " + "; ".join(problems)
    probes = sum(len(t["probes"]) for t in report["targets"])
    return f"ok: {probes} probes passed on {len(report['targets'])} target(s)"
