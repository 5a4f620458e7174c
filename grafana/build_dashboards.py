#!/usr/bin/env python3
"""Writes grafana/*.json from this file, so the two dashboards share one set of variables,
selectors and conventions. Edit here, then run `python grafana/build_dashboards.py`;
tests/test_dashboards.py fails when the JSON files and this script disagree.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
SCHEMA_VERSION = 39
DS = {"type": "prometheus", "uid": "${datasource}"}
# Every raw-metric query carries the dashboard's selection.
SEL = 'cluster=~"$cluster",job=~"$job",instance=~"$instance",gpu=~"$gpu",track=~"$track"'
INSTANCE_SEL = 'cluster=~"$cluster",job=~"$job",instance=~"$instance",track=~"$track"'
# The stacks in use, one row per combination: shared by both dashboards' version tables.
VERSIONS = (
    "count by (track, version, backend, driver_version, cuda_driver_version, tensorrt_version) "
    f"(trt_heartbeat_build_info{{{INSTANCE_SEL}}})"
)


def query_variable(name: str, label: str, metric: str, hide: int = 0) -> dict[str, Any]:
    """A multi-value variable over `label_values(metric, name)`, "All" by default."""
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DS,
        "query": {"query": f"label_values({metric}, {name})", "refId": name},
        "definition": f"label_values({metric}, {name})",
        "includeAll": True,
        "multi": True,
        "allValue": ".*",
        "refresh": 2,
        "sort": 1,
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "hide": hide,
    }


def variables() -> list[dict[str, Any]]:
    query = query_variable
    return [
        {
            "name": "datasource",
            "label": "Data source",
            "type": "datasource",
            "query": "prometheus",
            "current": {},
            "hide": 0,
        },
        query("cluster", "Cluster", "trt_heartbeat_build_info", hide=2),
        query("job", "Job", 'trt_heartbeat_build_info{cluster=~"$cluster"}'),
        query("instance", "Instance", 'trt_heartbeat_build_info{cluster=~"$cluster",job=~"$job"}'),
        query(
            "gpu", "GPU", 'trt_heartbeat_up{cluster=~"$cluster",job=~"$job",instance=~"$instance"}'
        ),
        query("track", "Track", 'trt_heartbeat_up{cluster=~"$cluster",job=~"$job"}'),
    ]


def service_variables() -> list[dict[str, Any]]:
    """Source and service of the rollout guard's rows (normalised series, any source)."""
    return [
        query_variable("source", "Service source", "service_version:service_requests:rate5m"),
        query_variable(
            "service", "Service", 'service_version:service_requests:rate5m{source=~"$source"}'
        ),
    ]


class Panels:
    def __init__(self) -> None:
        self.panels: list[dict[str, Any]] = []
        self.x = self.y = self.row_height = 0

    def add(
        self,
        kind: str,
        title: str,
        targets: list[tuple[str, str]],
        *,
        w: int = 12,
        h: int = 8,
        unit: str = "short",
        description: str = "",
        thresholds: Sequence[tuple[str, float | None]] | None = None,
        instant: bool = False,
        fmt: str = "time_series",
        options: dict[str, Any] | None = None,
    ) -> None:
        if self.x + w > 24:
            self.x, self.y = 0, self.y + self.row_height
            self.row_height = 0
        steps = [
            {"color": color, "value": value} for color, value in (thresholds or [("green", None)])
        ]
        panel: dict[str, Any] = {
            "id": len(self.panels) + 1,
            "type": kind,
            "title": title,
            "description": description,
            "datasource": DS,
            "gridPos": {"x": self.x, "y": self.y, "w": w, "h": h},
            "fieldConfig": {
                "defaults": {"unit": unit, "thresholds": {"mode": "absolute", "steps": steps}},
                "overrides": [],
            },
            "options": options or {},
            "targets": [
                {
                    "refId": chr(ord("A") + i),
                    "datasource": DS,
                    "expr": expr,
                    "legendFormat": legend,
                    "instant": instant,
                    "range": not instant,
                    "format": fmt,
                }
                for i, (expr, legend) in enumerate(targets)
            ],
        }
        if kind == "timeseries" and thresholds and len(thresholds) > 1:
            panel["fieldConfig"]["defaults"]["custom"] = {"thresholdsStyle": {"mode": "line"}}
        self.panels.append(panel)
        self.x += w
        self.row_height = max(self.row_height, h)

    def row(self, title: str) -> None:
        self.x, self.y = 0, self.y + self.row_height
        self.panels.append(
            {
                "id": len(self.panels) + 1,
                "type": "row",
                "title": title,
                "collapsed": False,
                "gridPos": {"x": 0, "y": self.y, "w": 24, "h": 1},
                "panels": [],
            }
        )
        self.y += 1
        self.row_height = 0


def dashboard(
    uid: str,
    title: str,
    description: str,
    panels: Panels,
    extra_variables: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": ["trt-heartbeat", "gpu", "inference"],
        "timezone": "utc",
        "schemaVersion": SCHEMA_VERSION,
        "version": 1,
        "editable": True,
        "time": {"from": "now-6h", "to": "now"},
        "refresh": "30s",
        "templating": {"list": variables() + (extra_variables or [])},
        "annotations": {"list": []},
        "links": [
            {
                "title": "Runbooks",
                "type": "link",
                "targetBlank": True,
                "url": "https://github.com/trt-heartbeat-exporter/trt-heartbeat-exporter/blob/main/docs/runbooks.md",
            }
        ],
        "panels": panels.panels,
    }


def fleet() -> dict[str, Any]:
    p = Panels()
    p.row("At a glance")
    # Counts that must always show a number: `or vector(0)` turns "none" into 0, not "No data".
    for title, expr, bad in (
        ("GPUs passing", f"count(trt_heartbeat_up{{{SEL}}} == 1)", None),
        (
            "GPUs stale",
            f"count(trt_heartbeat_age_seconds{{{SEL}}} > on (job, instance) group_left () trt_heartbeat_max_age_seconds)",
            "red",
        ),
        (
            "GPUs failing probes",
            f"count(instance_gpu:trt_heartbeat_probe_failure:ratio_rate5m{{{SEL}}} > 0)",
            "orange",
        ),
        # A target that cannot be scraped exports nothing else: count it from `up` of the
        # exporter's job (the one the rule pack selects on).
        ("Exporters down", f'count(up{{job="trt-heartbeat-exporter",{INSTANCE_SEL}}} == 0)', "red"),
    ):
        steps = [("red", None), ("green", 1)] if bad is None else [("green", None), (bad, 1)]
        p.add(
            "stat", title, [(f"{expr} or vector(0)", "")], w=6, h=4, instant=True, thresholds=steps
        )
    p.add(
        "table",
        "Heartbeat age, worst first (in intervals: 1 = on time, 3 = stale)",
        [
            (
                f"sort_desc(trt_heartbeat_age_seconds{{{SEL}}} / on (job, instance) group_left () "
                "trt_heartbeat_interval_seconds)",
                "",
            )
        ],
        w=12,
        h=8,
        instant=True,
        fmt="table",
        thresholds=[("green", None), ("orange", 1), ("red", 3)],
        description="Seconds since the last passing probe divided by the probe interval.",
    )
    p.add(
        "table",
        "Firing alerts of this pack",
        [('ALERTS{alertname=~"TrtHeartbeat.*",alertstate="firing"}', "")],
        w=12,
        h=8,
        instant=True,
        fmt="table",
    )
    p.row("Probes")
    p.add(
        "timeseries",
        "Probe results",
        [
            (
                f"sum by (result) (rate(trt_heartbeat_probes_total{{{SEL}}}[$__rate_interval]))",
                "{{result}}",
            )
        ],
        unit="ops",
    )
    p.add(
        "timeseries",
        "Probe latency p50 / p99 (total), and the p90 the alerts judge",
        [
            # Computed when the panel is drawn, for the selected GPUs only: recording a short
            # quantile for every GPU of a fleet costs the ruler more than this panel ever does.
            (
                f"histogram_quantile(0.5, sum without (phase) (rate("
                f'trt_heartbeat_probe_duration_seconds_bucket{{{SEL},phase="total"}}[$__rate_interval])))',
                "p50 {{instance}} gpu {{gpu}}",
            ),
            (
                f"histogram_quantile(0.99, sum without (phase) (rate("
                f'trt_heartbeat_probe_duration_seconds_bucket{{{SEL},phase="total"}}[$__rate_interval])))',
                "p99 {{instance}} gpu {{gpu}}",
            ),
            (
                f"instance_gpu:trt_heartbeat_probe_duration_seconds:p90_rate15m{{{SEL}}}",
                "p90 15m {{instance}} gpu {{gpu}}",
            ),
        ],
        unit="s",
    )
    p.add(
        "heatmap",
        "Probe latency distribution (total)",
        [
            (
                f'sum by (le) (rate(trt_heartbeat_probe_duration_seconds_bucket{{{SEL},phase="total"}}'
                "[$__rate_interval]))",
                "{{le}}",
            )
        ],
        fmt="heatmap",
        unit="s",
        options={"calculate": False, "yAxis": {"unit": "s"}},
    )
    # The phase gauge, not histograms: by default the exporter keeps a histogram of total only.
    last_phases = f"(trt_heartbeat_last_probe_duration_seconds{{{SEL}}})"
    p.add(
        "timeseries",
        "Phases of the last probe",
        [
            (f"avg by (phase) {last_phases}", "avg {{phase}}"),
            (f"max by (phase) {last_phases}", "max {{phase}}"),
        ],
        unit="s",
        description="Seconds each phase of each selected GPU's last timed probe took, average and "
        "maximum over the GPUs: total is the exporter's round trip, h2d/compute/d2h the backend's "
        "own timing. A timed-out probe has no timings; its GPU shows the probe before it.",
    )
    p.add(
        "timeseries",
        "Output deviation from golden",
        [(f"trt_heartbeat_output_max_abs_error{{{SEL}}}", "{{instance}} gpu {{gpu}}")],
    )
    p.add(
        "timeseries",
        "Worker restarts",
        [
            (
                "sum by (instance, gpu, reason) (increase(trt_heartbeat_worker_restarts_total"
                f"{{{SEL}}}[$__rate_interval]))",
                "{{instance}} gpu {{gpu}} {{reason}}",
            )
        ],
    )
    p.row("GPU memory")
    p.add(
        "timeseries",
        "GPU memory used",
        [(f"trt_heartbeat_gpu_memory_used_bytes{{{SEL}}}", "{{instance}} gpu {{gpu}}")],
        unit="bytes",
    )
    p.add(
        "timeseries",
        "GPU memory free, with the low-memory threshold",
        [
            (f"trt_heartbeat_gpu_memory_free_bytes{{{SEL}}}", "{{instance}} gpu {{gpu}}"),
            (f"max(trt_heartbeat_gpu_memory_low_threshold_bytes{{{INSTANCE_SEL}}})", "threshold"),
        ],
        unit="bytes",
    )
    p.add(
        "timeseries",
        "GPU memory held by the probe worker",
        [(f"trt_heartbeat_probe_gpu_memory_bytes{{{SEL}}}", "{{instance}} gpu {{gpu}}")],
        unit="bytes",
    )
    p.add(
        "stat",
        "NVML up",
        [(f"min(trt_heartbeat_nvml_up{{{INSTANCE_SEL}}})", "")],
        instant=True,
        thresholds=[("red", None), ("green", 1)],
    )
    p.row("Versions")
    p.add(
        "table",
        "Stack versions in the fleet",
        [(VERSIONS, "")],
        w=12,
        instant=True,
        fmt="table",
    )
    p.add(
        "table",
        "Probe engines",
        [
            (
                "count by (backend, model, precision, engine_sha256) "
                f"(trt_heartbeat_engine_info{{{SEL}}})",
                "",
            )
        ],
        w=12,
        instant=True,
        fmt="table",
    )
    return dashboard(
        "trt-heartbeat-fleet", "TRT heartbeat / Fleet", "Which GPU stopped answering, and why.", p
    )


def canary() -> dict[str, Any]:
    p = Panels()
    per_track = [
        ("Probe latency p99", "track:trt_heartbeat_probe_duration_seconds:p99_rate5m", "s"),
        ("Probe latency p50", "track:trt_heartbeat_probe_duration_seconds:p50_rate5m", "s"),
        ("Probe failure ratio", "track:trt_heartbeat_probe_failure:ratio_rate5m", "percentunit"),
        (
            "Output deviation from golden (max, 30m)",
            "pool_track:trt_heartbeat_output_max_abs_error:max30m",
            "short",
        ),
        ("Probe worker GPU memory", "pool_track:trt_heartbeat_probe_gpu_memory_bytes:avg", "bytes"),
        ("Engine load time", "pool_track:trt_heartbeat_engine_load_duration_seconds:avg", "s"),
    ]
    for title, series, unit in per_track:
        legend = "{{track}}" + (
            " {{service}} {{backend}} {{gpu_model}}" if series.startswith("pool_track") else ""
        )
        p.row(title)
        p.add(
            "timeseries",
            f"{title}: stable",
            [(f'{series}{{track="stable"}}', legend)],
            w=8,
            unit=unit,
        )
        p.add(
            "timeseries",
            f"{title}: canary",
            [(f'{series}{{track="canary"}}', legend)],
            w=8,
            unit=unit,
        )
        p.add(
            "timeseries",
            f"{title}: overlaid",
            [(f'{series}{{track=~"stable|canary"}}', legend)],
            w=8,
            unit=unit,
        )
    p.row("Canary against stable, per pool: service, backend, GPU model (alert thresholds drawn)")
    for title, series, threshold, unit in (
        (
            "p99 latency ratio",
            "pool:trt_heartbeat_probe_duration_seconds:p99_canary_over_stable",
            "canary_latency_ratio",
            "short",
        ),
        (
            "Failure ratio delta",
            "pool:trt_heartbeat_probe_failure:ratio_canary_minus_stable",
            "canary_failure_ratio_delta",
            "percentunit",
        ),
        (
            "Output deviation delta",
            "pool:trt_heartbeat_output_max_abs_error:canary_minus_stable",
            "canary_output_deviation_delta",
            "short",
        ),
        (
            "Probe GPU memory ratio",
            "pool:trt_heartbeat_probe_gpu_memory_bytes:canary_over_stable",
            "canary_gpu_memory_ratio",
            "short",
        ),
        (
            "Engine load time ratio",
            "pool:trt_heartbeat_engine_load_duration_seconds:canary_over_stable",
            "canary_engine_load_ratio",
            "short",
        ),
    ):
        p.add(
            "timeseries",
            title,
            [
                (series, "{{service}} {{backend}} {{gpu_model}}"),
                (f"trt_heartbeat:threshold:{threshold}", "alert threshold"),
            ],
            w=8,
            unit=unit,
        )
    p.add(
        "timeseries",
        "Verdict possible (1 = enough probes on both tracks)",
        [
            (
                "pool:trt_heartbeat_canary_comparison:sufficient",
                "{{service}} {{backend}} {{gpu_model}}",
            )
        ],
        w=8,
    )
    p.row("Samples and versions")
    p.add(
        "timeseries",
        "Probes per track in 30m (verdicts need the threshold on both)",
        [
            (
                "pool_track:trt_heartbeat_probes:increase30m",
                "{{track}} {{service}} {{backend}} {{gpu_model}}",
            ),
            ("trt_heartbeat:threshold:canary_min_probes", "minimum"),
        ],
        w=12,
        description="A missing line means no data for that track, not zero.",
    )
    p.add(
        "table",
        "Versions per track",
        [(VERSIONS, "")],
        w=12,
        instant=True,
        fmt="table",
    )
    service_rows(p)
    return dashboard(
        "trt-heartbeat-canary",
        "TRT heartbeat / Canary vs stable",
        "Is the canary runtime image worse than stable?",
        p,
        service_variables(),
    )


SVC = 'source=~"$source",service=~"$service"'
ROLES = 'service=~"$service"'  # roles belong to a version, whatever the source


def service_rows(p: Panels) -> None:
    """The rollout guard: the service's own requests per version (docs/service-canary.md)."""
    p.row("Service traffic: canary against baseline, per version (rollout guard)")
    p.add(
        "timeseries",
        "Traffic split per version",
        [
            (
                f"sum by (service, version) (service_version:service_requests:rate5m{{{SVC}}})",
                "{{service}} {{version}}",
            )
        ],
        w=8,
        unit="reqps",
        description="Requests per second per version; the baseline is the busiest.",
    )
    p.add(
        "timeseries",
        "Error ratio per version (5m) and the pause threshold",
        [
            (
                f"service_version:service_request_error:ratio_rate5m{{{SVC}}}",
                "{{service}} {{version}}",
            ),
            ("trt_heartbeat:threshold:service_canary_error_ratio", "pause above"),
        ],
        w=8,
        unit="percentunit",
        thresholds=[("green", None), ("red", 0.01)],
        description="A canary above the line for 5m (and 1m more) fires "
        "TrtHeartbeatServiceCanaryErrorRatioHigh, which pauses the rollout.",
    )
    p.add(
        "table",
        "Versions: role (track), where it comes from, and the baseline",
        [
            (f"service_version:service_track:info{{{ROLES}}}", "role"),
            (f"service_version:service_baseline:info{{{SVC}}}", "baseline"),
        ],
        w=8,
        instant=True,
        fmt="table",
    )
    p.add(
        "timeseries",
        "Request latency p50 and p99 per version (10m)",
        [
            (
                f"service_version_route:service_request_duration_seconds:p99_rate10m{{{SVC}}}",
                "p99 {{service}} {{version}}",
            ),
            (
                f"service_version_route:service_request_duration_seconds:p50_rate10m{{{SVC}}}",
                "p50 {{service}} {{version}}",
            ),
        ],
        w=8,
        unit="s",
    )
    p.add(
        "timeseries",
        "Canary / baseline latency, with the alert thresholds",
        [
            (
                f"service_version_route:service_request_duration_seconds:canary_over_baseline{{{SVC}}}",
                "{{service}} {{version}} {{statistic}}",
            ),
            ("trt_heartbeat:threshold:service_canary_latency_ratio", "threshold {{statistic}}"),
        ],
        w=8,
    )
    p.add(
        "timeseries",
        "Comparison possible (1 = enough requests on both versions)",
        [
            (
                f"service_version:service_canary_comparison:sufficient{{{SVC}}}",
                "{{service}} {{version}}",
            )
        ],
        w=8,
        description="No line: too few requests for latency, drift or memory verdicts.",
    )
    p.add(
        "timeseries",
        "GPU memory in use per version",
        [
            (
                f"service_version:service_gpu_memory_used_bytes:avg{{{SVC}}}",
                "{{service}} {{version}}",
            )
        ],
        w=12,
        unit="bytes",
    )
    p.add(
        "timeseries",
        "Prediction drift, canary against baseline (0 same, 1 disjoint)",
        [
            (
                f"service_version_route:model_prediction:drift_canary_vs_baseline{{{SVC}}}",
                "{{service}} {{version}} {{model}} {{statistic}}",
            ),
            ("trt_heartbeat:threshold:service_canary_prediction_drift", "threshold {{statistic}}"),
        ],
        w=12,
    )


DASHBOARDS = {"fleet.json": fleet, "canary.json": canary}


def render(name: str) -> str:
    return json.dumps(DASHBOARDS[name](), indent=2) + "\n"


def main() -> int:
    for name in DASHBOARDS:
        (HERE / name).write_text(render(name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
