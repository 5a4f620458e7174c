"""What each path answers: /metrics, /health, /ping, /probes and the landing page.

The route table and the report bodies live here; the transport (`server`) frames requests,
checks method and credentials and writes whatever `Routes.answer` returns. Everything read here
is a snapshot, so no answer ever waits on a probe worker.
"""

from __future__ import annotations

import html
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

from trt_heartbeat import __version__
from trt_heartbeat.exporter.health import (
    device_memory,
    heartbeat_age,
    overall_health,
    target_healths,
)
from trt_heartbeat.exporter.state import ProbeRecord

if TYPE_CHECKING:
    from trt_heartbeat.exporter.app import Exporter


@dataclass(frozen=True)
class Reply:
    status: HTTPStatus
    body: bytes
    content_type: str
    gzipped: bool = False


def _text(status: HTTPStatus, text: str) -> Reply:
    return Reply(status, text.encode(), "text/plain")


def _json(status: HTTPStatus, document: dict[str, Any]) -> Reply:
    return Reply(status, (json.dumps(document, indent=2) + "\n").encode(), "application/json")


class Routes:
    """The exporter's endpoints by path; the metrics path is the configured one."""

    def __init__(self, exporter: Exporter) -> None:
        self.exporter = exporter
        self._table: dict[str, Callable[[], Reply]] = {
            "/health": self._health,
            "/ping": self._ping,
            "/probes": self._probes,
            "/": self._landing,
        }

    def answer(self, path: str, accept: str | None, gzip: bool) -> Reply:
        if path == self.exporter.telemetry_path:
            body, content_type = self.exporter.render_metrics(accept, gzip)
            return Reply(HTTPStatus.OK, body, content_type, gzipped=gzip)
        route = self._table.get(path)
        return route() if route else _text(HTTPStatus.NOT_FOUND, "not found\n")

    def _health(self) -> Reply:
        report, ready = health_report(self.exporter)
        return _json(HTTPStatus.OK if ready else HTTPStatus.SERVICE_UNAVAILABLE, report)

    def _ping(self) -> Reply:
        if self.exporter.alive():
            return _text(HTTPStatus.OK, "OK\n")
        return _text(HTTPStatus.SERVICE_UNAVAILABLE, "probe loop stalled\n")

    def _probes(self) -> Reply:
        return _json(HTTPStatus.OK, probe_report(self.exporter))

    def _landing(self) -> Reply:
        return Reply(HTTPStatus.OK, landing_page(self.exporter.telemetry_path), "text/html")


def landing_page(telemetry_path: str) -> bytes:
    links = [
        (telemetry_path, "Metrics"),
        ("/health", "Health (readiness, JSON)"),
        ("/ping", "Ping (liveness)"),
        ("/probes", "Last probes per target (debug, JSON)"),
    ]
    items = "".join(
        f'<li><a href="{html.escape(path)}">{html.escape(text)}</a></li>' for path, text in links
    )
    return (
        '<!DOCTYPE html><html><head><meta charset="utf-8"><title>trt-heartbeat-exporter</title>'
        "</head><body><h1>trt-heartbeat-exporter</h1>"
        f"<p>Version {html.escape(__version__)}. Runs a canonical inference on every GPU on a "
        f"timer and exports the heartbeat.</p><ul>{items}</ul></body></html>\n"
    ).encode()


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, timezone.utc).isoformat()


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def probe_record_json(r: ProbeRecord, hide_message: bool = False) -> dict[str, Any]:
    """One probe as JSON, the same in /probes and the `probe` command: strict JSON, with no
    NaN or Infinity (a NaN/Inf output reads null here and is said in the message)."""
    out: dict[str, Any] = {
        "time": _iso(r.timestamp),
        "result": r.result,
        "reason": str(r.reason) if r.reason else None,
        "phases_seconds": {k: _finite(round(v, 9)) for k, v in r.phases.items()},
        "max_abs_error": _finite(r.max_abs_error),
    }
    if not hide_message:
        out["message"] = r.message
    return out


def health_report(exporter: Exporter) -> tuple[dict[str, Any], bool]:
    """The /health body, and whether the exporter is ready (healthy or degraded)."""
    now = exporter.now()
    settings = exporter.settings
    hide = settings.hide_hardware_details
    telemetry = exporter.telemetry_state()
    snaps = exporter.snapshots()
    healths = target_healths(snaps, now, settings, telemetry)
    targets = []
    for snap, health in zip(snaps, healths, strict=True):
        gpu = telemetry.gpu(snap.target.uuid)
        last = snap.last_probe
        entry: dict[str, Any] = {
            "gpu": snap.target.gpu,
            "status": health.status,
            "reason": health.reason,
            "heartbeat_age_seconds": round(heartbeat_age(snap, now), 3),
            "last_result": last.result if last else None,
            "consecutive_failures": snap.consecutive_failures,
            "engine_loaded": snap.loaded,
        }
        if not hide:
            entry["uuid"] = snap.target.uuid
            if snap.engine is not None:
                entry["engine"] = {
                    "backend": snap.engine.backend,
                    "model": snap.engine.model,
                    "precision": snap.engine.precision,
                    "engine_sha256": snap.engine.engine_sha256,
                    "versions": dict(snap.engine.versions),
                    **dict(snap.engine.details),
                }
            if snap.gpu_memory is not None:
                entry["probe_gpu_memory_bytes"] = snap.gpu_memory[0]
                entry["probe_gpu_memory_source"] = snap.gpu_memory[1]
            memory = device_memory(snap, gpu, telemetry.last_success)
            if memory is not None:
                entry["gpu_memory"] = {
                    "free_mib": memory.free >> 20,
                    "total_mib": memory.total >> 20,
                    "source": memory.source,
                }
            if snap.last_failure is not None:
                entry["last_failure"] = {
                    "reason": str(snap.last_failure.reason),
                    "message": snap.last_failure.message,
                    "time": _iso(snap.last_failure.timestamp),
                }
        targets.append(entry)
    overall = overall_health(healths)
    report = {
        "status": overall.status,
        "reason": overall.reason,
        "version": __version__,
        "backend": exporter.backend,
        "targets": targets,
    }
    return report, overall.status != "unhealthy"


def probe_report(exporter: Exporter) -> dict[str, Any]:
    """The /probes body: the last few probes of each target, newest first."""
    hide = exporter.settings.hide_hardware_details
    return {
        "backend": exporter.backend,
        "pid": os.getpid(),
        "targets": [
            {
                "gpu": loop.target.gpu,
                **({} if hide else {"uuid": loop.target.uuid}),
                "worker_pid": loop.worker_pid,
                "probes": [
                    probe_record_json(r, hide_message=hide)
                    for r in reversed(loop.state.snapshot().history)
                ],
            }
            for loop in exporter.scheduler.loops
        ],
    }
