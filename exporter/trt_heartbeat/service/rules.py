"""The rollout guard's Prometheus rules, generated from sources so that each source is one file.

Two layers, kubernetes-mixin style:
- per source, recording rules that turn its metrics into one normalised set of series, labelled
  `source`, `namespace`, `service`, `track` and the source's `by` labels (model, route);
- once, source-agnostic rules on those series: which track is the baseline (the one with the most
  requests) and which are canaries, their ratios, and the alerts.

`rules/service-sources.rules.yml` (istio, triton) and `rules/service-canary.rules.yml` are this
module's output, kept equal by tests; `trt-heartbeat-exporter service-rules --source FILE` writes
the first layer for a custom source. Thresholds are series in rules/thresholds.rules.yml.
"""

from __future__ import annotations

from typing import Any

import yaml

from .source import Labels, Source

ERROR_WINDOW, ERROR_WINDOW_S = "5m", 300  # the pause decision: errors / requests over 5m
COMPARE_WINDOW = "10m"  # latency, drift, traffic guards: enough requests for tails
SERVICE = "source, namespace, service, track"
ON_TRACK = f"on ({SERVICE})"
ON_SERVICE = "on (source, namespace, service)"
RUNBOOK = (
    "https://github.com/trt-heartbeat-exporter/trt-heartbeat-exporter/blob/main/docs/runbooks.md#"
)
LATENCY_STATISTICS = ("p50", "p99", "mean")


def _relabel(expr: str, labels: Labels) -> str:
    for target, source_label in labels.renames().items():
        expr = f'label_replace({expr}, "{target}", "$1", "{source_label}", "(.*)")'
    return expr


def _sum(expr: str, labels: Labels, *extra: str, op: str = "sum") -> str:
    return f"{op} by ({', '.join([*labels.keys, *extra])}) ({_relabel(expr, labels)})"


def _metric(name: str, *matchers: str) -> str:
    return name + "{" + ", ".join(m for m in matchers if m) + "}"


def _scaled(expr: str, scale: float) -> str:
    return expr if scale == 1 else f"{expr} * {scale:g}"


def source_rules(src: Source) -> list[dict[str, Any]]:
    """Recording rules that normalise one source's metrics."""
    lab, w, cw = src.labels, ERROR_WINDOW, COMPARE_WINDOW
    requests = src.requests.selector(*lab.present())
    errors = src.errors.selector(*lab.present())
    route = "service_track_route"
    rules = [
        (f"{route}:service_requests:rate{w}", _sum(f"rate({requests}[{w}])", lab)),
        # Without the fallback a track that never failed would have no error series at all.
        (f"{route}:service_request_errors:rate{w}",
         f"{_sum(f'rate({errors}[{w}])', lab)}\nor\n{_sum(f'rate({requests}[{w}])', lab)} * 0"),
        (f"{route}:service_requests:increase{cw}", _sum(f"increase({requests}[{cw}])", lab)),
    ]  # fmt: skip
    lat = src.latency
    prefix = f"{route}:service_request_duration_seconds"
    if lat.histogram:
        buckets = _metric(lat.histogram + "_bucket", lat.matchers, *lab.present())
        per_le = _sum(f"rate({buckets}[{cw}])", lab, "le")
        for name, q in (("p50", 0.5), ("p99", 0.99)):
            rules.append((f"{prefix}:{name}_rate{cw}",
                          _scaled(f"histogram_quantile({q}, {per_le})", lat.scale)))  # fmt: skip
        total, count = lat.histogram + "_sum", lat.histogram + "_count"
    else:
        total, count = lat.sum, lat.count
    total_rate, count_rate = (f"rate({_metric(m, lat.matchers, *lab.present())}[{cw}])"
                              for m in (total, count))  # fmt: skip
    mean = f"{_sum(total_rate, lab)}\n/\n{_sum(count_rate, lab)}"
    rules.append((f"{prefix}:mean_rate{cw}", _scaled(mean, lat.scale)))

    pods = src.pods
    if pods is not None:
        pl = pods.labels
        if pods.presence:
            rules.append(("service_track:service_pods:count",
                          _sum(_metric(pods.presence, *pl.present()), pl, op="count")))  # fmt: skip
        if pods.gpu_memory:
            rules.append(("service_track:service_gpu_memory_used_bytes:avg",
                          _sum(_metric(pods.gpu_memory, *pl.present()), pl, op="avg")))  # fmt: skip
    if src.drift is not None and pods is not None:
        dl = Labels(pods.labels.service, pods.labels.track, pods.labels.namespace, src.drift.by)
        if src.drift.classes:
            rate = f"rate({_metric(src.drift.classes, *dl.present())}[{cw}])"
            rules.append((f"{route}:model_prediction_classes:share_rate{cw}",
                          f"{_sum(rate, dl, 'class')}\n/ ignoring (class) group_left ()\n"
                          f"{_sum(rate, dl)}"))  # fmt: skip
        if src.drift.scores:
            buckets = _metric(src.drift.scores + "_bucket", *dl.present())
            everything = _metric(src.drift.scores + "_bucket", *dl.present(), 'le="+Inf"')
            rules.append((f"{route}:model_prediction_score_bucket:share_rate{cw}",
                          f"{_sum(f'rate({buckets}[{cw}])', dl, 'le')}\n"
                          f"/ ignoring (le) group_left ()\n"
                          f"{_sum(f'rate({everything}[{cw}])', dl)}"))  # fmt: skip
    return [{"record": name, "expr": expr, "labels": {"source": src.name}}
            for name, expr in rules]  # fmt: skip


def source_group(src: Source) -> dict[str, Any]:
    return {"name": f"trt-heartbeat-service-source-{src.name}", "rules": source_rules(src)}


def _threshold(name: str, by: str = "") -> str:
    on = f"on ({by})" if by else "on ()"
    return f"{on} group_left () trt_heartbeat:threshold:{name}"


def _role(series: str, role: str) -> str:
    return f"({series} and {ON_TRACK} service_track:service_{role}:info)"


def _canary_over_baseline(series: str, op: str = "/") -> str:
    return (f"{_role(series, 'canary')}\n{op} ignoring (track) group_left ()\n"
            f"{_role(series, 'baseline')}")  # fmt: skip


def _sufficient(series: str) -> str:
    least = _threshold(f"service_canary_min_requests_{COMPARE_WINDOW}")
    return (
        f"(\n  {_role(series, 'canary')} >= {least}\n"
        f"  and ignoring (track)\n  {_role(series, 'baseline')} >= {least}\n) * 0 + 1"
    )


def canary_recording_rules() -> list[dict[str, Any]]:
    w, cw, route = ERROR_WINDOW, COMPARE_WINDOW, "service_track_route"
    rules: list[dict[str, Any]] = []

    def record(name: str, expr: str, **labels: str) -> None:
        rules.append({"record": name, "expr": expr, **({"labels": labels} if labels else {})})

    for name in (f"service_requests:rate{w}", f"service_request_errors:rate{w}",
                 f"service_requests:increase{cw}"):  # fmt: skip
        record(f"service_track:{name}", f"sum by ({SERVICE}) ({route}:{name})")
    record(
        f"service_track:service_request_error:ratio_rate{w}",
        f"service_track:service_request_errors:rate{w}\n/\nservice_track:service_requests:rate{w}",
    )
    record(
        f"service_track:service_requests:increase{w}",
        f"service_track:service_requests:rate{w} * {ERROR_WINDOW_S}",
    )
    # The baseline is the track that carries most of the service's requests; every other track
    # with requests or pods is a canary.
    record(
        "service_track:service_baseline:info",
        f"topk by (source, namespace, service) (1, service_track:service_requests:increase{cw})"
        " * 0 + 1",
    )
    record(
        "service_track:service_canary:info",
        f"(\n  (service_track:service_requests:increase{cw}"
        " or service_track:service_pods:count)\n"
        f"  unless {ON_TRACK} service_track:service_baseline:info\n"
        f"  and {ON_SERVICE} service_track:service_baseline:info\n) * 0 + 1",
    )
    record(
        f"{route}:service_canary_comparison:sufficient",
        _sufficient(f"{route}:service_requests:increase{cw}"),
    )
    record(
        "service_track:service_canary_comparison:sufficient",
        _sufficient(f"service_track:service_requests:increase{cw}"),
    )
    for stat in LATENCY_STATISTICS:
        record(f"{route}:service_request_duration_seconds:canary_over_baseline",
               _canary_over_baseline(f"{route}:service_request_duration_seconds:{stat}_rate{cw}"),
               statistic=stat)  # fmt: skip
    record(
        "service_track:service_gpu_memory_used_bytes:canary_over_baseline",
        _canary_over_baseline("service_track:service_gpu_memory_used_bytes:avg"),
    )
    # Drift, 0 (same distribution) to 1 (disjoint): total variation distance between the class
    # shares (a class one track never predicts counts fully), and the largest gap between the
    # score CDFs (Kolmogorov-Smirnov distance on the buckets).
    classes = f"{route}:model_prediction_classes:share_rate{cw}"
    canary = _role(classes, "canary")
    overlap = (f"sum without (class) (\n  {canary}\n  - clamp_min(\n    {canary}\n"
               f"    - ignoring (track) group_left ()\n    {_role(classes, 'baseline')},\n"
               f"  0)\n)")  # fmt: skip
    record(
        f"{route}:model_prediction:drift_canary_vs_baseline",
        f"1 - {overlap}\nor\nsum without (class) ({canary}) * 0 + 1",
        statistic="tvd",
    )
    scores = f"{route}:model_prediction_score_bucket:share_rate{cw}"
    record(
        f"{route}:model_prediction:drift_canary_vs_baseline",
        f"max without (le) (abs(\n{_canary_over_baseline(scores, '-')}\n))",
        statistic="ks",
    )
    return rules


def _alert(name: str, expr: str, for_: str, severity: str, summary: str, description: str,
           **labels: str) -> dict[str, Any]:  # fmt: skip
    return {
        "alert": name, "expr": expr, "for": for_,
        "labels": {"severity": severity, "role": "canary", **labels},
        "annotations": {"summary": summary, "description": description,
                        "runbook_url": RUNBOOK + name.lower()},
    }  # fmt: skip


WHO = "{{ $labels.service }} ({{ $labels.source }}) track {{ $labels.track }}"


def canary_alerts() -> list[dict[str, Any]]:
    w, cw, route = ERROR_WINDOW, COMPARE_WINDOW, "service_track_route"
    canary = f"and {ON_TRACK} service_track:service_canary:info"
    return [
        # 1% over the last 5 minutes, held for one more minute: the pause. A ratio over 5m
        # rather than `for: 5m` on a short window, so that Poisson noise at canary volumes
        # (10 req/s: 1.5% errors is 9 a minute) cannot reset the clock (docs/rules.md).
        _alert(
            "TrtHeartbeatServiceCanaryErrorRatioHigh",
            f"service_track:service_request_error:ratio_rate{w}\n"
            f"  > {_threshold('service_canary_error_ratio')}\n{canary}\n"
            f"and {ON_TRACK}\n  service_track:service_requests:increase{w}\n"
            f"    >= {_threshold(f'service_canary_min_requests_{w}')}",
            "1m",
            "critical",
            "Pause the rollout: the canary fails too many requests.",
            f"{WHO} failed {{{{ $value | humanizePercentage }}}} of its requests over {w}: "
            "pause the rollout and decide whether to roll back.",
            action="pause-rollout",
        ),
        _alert(
            "TrtHeartbeatServiceCanaryLatencyHigher",
            f"{route}:service_request_duration_seconds:canary_over_baseline\n"
            f"  > {_threshold('service_canary_latency_ratio', 'statistic')}\n"
            f"and ignoring (statistic) {route}:service_canary_comparison:sufficient",
            "10m",
            "warning",
            "The canary serves requests slower than the baseline.",
            f"{WHO}: request latency {{{{ $labels.statistic }}}} is {{{{ $value | humanize }}}}x "
            f"the baseline's over {cw}.",
        ),
        _alert(
            "TrtHeartbeatServiceCanaryGpuMemoryHigher",
            "service_track:service_gpu_memory_used_bytes:canary_over_baseline\n"
            f"  > {_threshold('service_canary_gpu_memory_ratio')}",
            "10m",
            "warning",
            "The canary's GPUs hold more memory than the baseline's.",
            f"{WHO}: GPU memory in use is {{{{ $value | humanize }}}}x the baseline's.",
        ),
        _alert(
            "TrtHeartbeatServiceCanaryPredictionDrift",
            f"{route}:model_prediction:drift_canary_vs_baseline\n"
            f"  > {_threshold('service_canary_prediction_drift', 'statistic')}\n"
            f"and {ON_TRACK} service_track:service_canary_comparison:sufficient",
            "10m",
            "warning",
            "The canary's predictions are distributed differently.",
            f"{WHO}, model {{{{ $labels.model }}}}: prediction drift "
            f'({{{{ $labels.statistic }}}}) {{{{ printf "%.2f" $value }}}} over {cw}.',
        ),
        # Pods of a track, no requests, while the service has traffic: a weight or subset that
        # routes nothing to the canary. Nothing is being tested, whatever the other alerts say.
        _alert(
            "TrtHeartbeatServiceCanaryNoTraffic",
            f"service_track:service_pods:count\n"
            f"unless {ON_TRACK} (service_track:service_requests:rate{w} > 0)\n"
            f"and {ON_SERVICE}\n  (sum by (source, namespace, service) "
            f"(service_track:service_requests:rate{w}) > 0)",
            "10m",
            "warning",
            "A canary track has pods but receives no requests.",
            f"{WHO} has {{{{ $value }}}} pods and no requests in {w}, while the service has "
            "traffic: check the traffic split.",
        ),
        # Said out loud, never a silent pass and never a page.
        _alert(
            "TrtHeartbeatServiceCanaryInsufficientTraffic",
            f"service_track:service_requests:increase{cw} > 0\n{canary}\n"
            f"unless {ON_TRACK} service_track:service_canary_comparison:sufficient",
            "10m",
            "info",
            "Too few requests to compare the canary with the baseline.",
            f"{WHO} served {{{{ $value | humanize }}}} requests in {cw}: too few to compare "
            "latency, drift or GPU memory with the baseline.",
        ),
    ]


def _dump(groups: list[dict[str, Any]], header: str) -> str:
    class Dumper(yaml.SafeDumper):
        pass

    def text(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
        style = "|" if "\n" in value else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)

    Dumper.add_representer(str, text)
    body = yaml.dump({"groups": groups}, Dumper=Dumper, sort_keys=False, width=1 << 16)
    return header + body


def sources_file(sources: list[Source]) -> str:
    header = ("# Generated by `trt-heartbeat-exporter service-rules` from the sources "
              f"({', '.join(s.origin for s in sources)}); do not edit.\n"
              "# Normalises each source's request, latency, GPU memory and drift metrics for "
              "service-canary.rules.yml.\n")  # fmt: skip
    return _dump([source_group(s) for s in sources], header)


def canary_file() -> str:
    header = ("# Generated by `trt-heartbeat-exporter service-rules --canary` "
              "(exporter/trt_heartbeat/service/rules.py); do not edit.\n"
              "# The rollout guard on the service's own traffic, whatever the source "
              "(docs/service-canary.md).\n")  # fmt: skip
    return _dump([
        {"name": "trt-heartbeat-service-canary.rules", "rules": canary_recording_rules()},
        {"name": "trt-heartbeat-service-canary.alerts", "rules": canary_alerts()},
    ], header)  # fmt: skip
