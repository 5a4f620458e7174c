"""The rollout guard's Prometheus rules, generated from sources so that each source is one file.

Two layers, kubernetes-mixin style:
- per source, recording rules that turn its metrics into one normalised set of series, labelled
  `source`, `namespace`, `service`, `version` (the release) and the source's `by` labels (model,
  route), plus the roles a source declares (`service_version:service_track:declared`, from pod
  labels or from the request series' own labels);
- once, source-agnostic rules on those series: the role (`track`: stable or canary) each version
  holds, the baseline (the busiest stable version) and canaries, their ratios, and the alerts.

Roles come from what the rollout declares, never from traffic share, so a canary at 60% is still
the canary; a service that declares nothing falls back to "the busiest version is stable", and
says so (`roles_from="traffic"`, TrtHeartbeatServiceRolesFromTraffic).

`rules/service-sources.rules.yml` (istio, triton) and `rules/service-canary.rules.yml` are this
module's output, kept equal by tests; `trt-heartbeat-exporter service-rules --source FILE` writes
the first layer for a custom source. Thresholds are series in rules/thresholds.rules.yml.
"""

from __future__ import annotations

from typing import Any

import yaml

from trt_heartbeat.canary.guard.source import Counter, Labels, Roles, Source, selector
from trt_heartbeat.canary.promql import quote

ERROR_WINDOW, ERROR_WINDOW_S = "5m", 300  # the pause decision: errors / requests over 5m
COMPARE_WINDOW = "10m"  # latency, drift, traffic guards: enough requests for tails
# `cluster` leads every grouping and join: absent in one Prometheus it matches as empty, and in
# a global ruler over many clusters (Thanos, Mimir, vmalert) it keeps their services apart.
SERVICE = "cluster, source, namespace, service, version"
ON_VERSION = f"on ({SERVICE})"
ON_SERVICE = "on (cluster, source, namespace, service)"
VERSION = "cluster, namespace, service, version"  # what a role belongs to, whatever the source
RUNBOOK = (
    "https://github.com/trt-heartbeat-exporter/trt-heartbeat-exporter/blob/main/docs/runbooks.md#"
)
LATENCY_STATISTICS = ("p50", "p99", "mean")
TRACKS = "stable|canary"
DECLARED = "service_version:service_track:declared"
ROUTE = "service_version_route"


def _relabel(expr: str, labels: Labels) -> str:
    for target, origin in labels.renames().items():
        regex = quote(origin.regex or "(.*)")
        expr = f'label_replace({expr}, "{target}", "$1", "{origin.label}", {regex})'
    return expr


def _roles(expr: str, roles: Roles) -> str:
    """`track` set from the roles' label: canary where it matches `canary`, then stable."""
    for track in ("canary", "stable"):
        regex = quote(getattr(roles, track))
        expr = f'label_replace({expr}, "track", "{track}", "{roles.label}", {regex})'
    return expr


def _sum(expr: str, labels: Labels, *extra: str, op: str = "sum") -> str:
    return f"{op} by ({', '.join([*labels.keys, *extra])}) ({_relabel(expr, labels)})"


def _each(counter: Counter, labels: Labels, fn: str = "", window: str = "") -> str:
    """Every part of a counter (metric names x matcher sets), each under `fn`, as one vector.

    Parts are told apart by a `part` label until they are summed: two names whose other labels
    are equal would otherwise collide once `rate` drops the name (Triton's success and failure
    counters where the failure has no `reason` label).
    """
    parts = []
    for i, series in enumerate(counter.selectors(*labels.present())):
        part = f"{fn}({series}[{window}])" if fn else series
        parts.append(part if i == 0 else f'label_replace({part}, "part", "{i}", "", "")')
    return parts[0] if len(parts) == 1 else "(\n  " + "\n  or\n  ".join(parts) + "\n)"


def _scaled(expr: str, scale: float) -> str:
    return expr if scale == 1 else f"{expr} * {scale:g}"


def _declared(expr: str, labels: Labels) -> str:
    keys = ("cluster",) + ("namespace",) * bool(labels.namespace) + ("service", "version", "track")
    return f"count by ({', '.join(keys)}) ({_relabel(expr, labels)}) * 0 + 1"


def source_rules(src: Source) -> list[dict[str, Any]]:
    """Recording rules that normalise one source's metrics."""
    lab, w, cw = src.labels, ERROR_WINDOW, COMPARE_WINDOW
    requests = _each(src.requests, lab, "rate", w)
    rules = [
        (f"{ROUTE}:service_requests:rate{w}", _sum(requests, lab)),
        # Without the fallback a version that never failed would have no error series at all.
        (
            f"{ROUTE}:service_request_errors:rate{w}",
            f"{_sum(_each(src.errors, lab, 'rate', w), lab)}\nor\n{_sum(requests, lab)} * 0",
        ),
        (
            f"{ROUTE}:service_requests:increase{cw}",
            _sum(_each(src.requests, lab, "increase", cw), lab),
        ),
    ]
    lat = src.latency
    prefix = f"{ROUTE}:service_request_duration_seconds"
    if lat.histogram:
        buckets = selector(lat.histogram + "_bucket", lat.matchers, *lab.present())
        per_le = _sum(f"rate({buckets}[{cw}])", lab, "le")
        for name, q in (("p50", 0.5), ("p99", 0.99)):
            rules.append(
                (
                    f"{prefix}:{name}_rate{cw}",
                    _scaled(f"histogram_quantile({q}, {per_le})", lat.scale),
                )
            )
        total, count = lat.histogram + "_sum", lat.histogram + "_count"
    else:
        total, count = lat.sum, lat.count
    total_rate, count_rate = (
        f"rate({selector(m, lat.matchers, *lab.present())}[{cw}])" for m in (total, count)
    )
    mean = f"{_sum(total_rate, lab)}\n/\n{_sum(count_rate, lab)}"
    rules.append((f"{prefix}:mean_rate{cw}", _scaled(mean, lat.scale)))
    if isinstance(lab.track, Roles):
        # The request series name the role themselves (Flagger's -primary workload, Argo's
        # stable and canary Services).
        rules.append((DECLARED, _declared(_roles(_each(src.requests, lab), lab.track), lab)))

    pods = src.pods
    if pods is not None:
        pl = pods.labels
        if pods.presence:
            present = selector(pods.presence, *pl.present())
            rules.append(("service_version:service_pods:count", _sum(present, pl, op="count")))
            if isinstance(pl.track, str):
                # Pods say which role their version holds: Argo Rollouts' canaryMetadata and
                # stableMetadata labels, or a label on each Deployment (plain Istio).
                declared = selector(pods.presence, *pl.present(), f'{pl.track}=~"{TRACKS}"')
                rules.append((DECLARED, _declared(declared, pl)))
        if pods.gpu_memory:
            memory = selector(pods.gpu_memory, *pl.present())
            rules.append(
                ("service_version:service_gpu_memory_used_bytes:avg", _sum(memory, pl, op="avg"))
            )
    if src.drift is not None and pods is not None:
        dl = Labels(pods.labels.service, pods.labels.version, pods.labels.namespace, src.drift.by)
        if src.drift.classes:
            rate = f"rate({selector(src.drift.classes, *dl.present())}[{cw}])"
            rules.append(
                (
                    f"{ROUTE}:model_prediction_classes:share_rate{cw}",
                    f"{_sum(rate, dl, 'class')}\n/ ignoring (class) group_left ()\n"
                    f"{_sum(rate, dl)}",
                )
            )
        if src.drift.scores:
            buckets = selector(src.drift.scores + "_bucket", *dl.present())
            everything = selector(src.drift.scores + "_bucket", *dl.present(), 'le="+Inf"')
            rules.append(
                (
                    f"{ROUTE}:model_prediction_score_bucket:share_rate{cw}",
                    f"{_sum(f'rate({buckets}[{cw}])', dl, 'le')}\n"
                    f"/ ignoring (le) group_left ()\n"
                    f"{_sum(f'rate({everything}[{cw}])', dl)}",
                )
            )
    return [{"record": name, "expr": expr, "labels": {"source": src.name}} for name, expr in rules]


def source_group(src: Source) -> dict[str, Any]:
    return {"name": f"trt-heartbeat-service-source-{src.name}", "rules": source_rules(src)}


def _threshold(name: str, by: str = "") -> str:
    on = f"on ({by})" if by else "on ()"
    return f"{on} group_left () trt_heartbeat:threshold:{name}"


def _role(series: str, role: str) -> str:
    return f"({series} and {ON_VERSION} service_version:service_{role}:info)"


def _canary_over_baseline(series: str, op: str = "/") -> str:
    return (
        f"{_role(series, 'canary')}\n{op} ignoring (version) group_left ()\n"
        f"{_role(series, 'baseline')}"
    )


def _sufficient(series: str) -> str:
    least = _threshold(f"service_canary_min_requests_{COMPARE_WINDOW}")
    return (
        f"(\n  {_role(series, 'canary')} >= {least}\n"
        f"  and ignoring (version)\n  {_role(series, 'baseline')} >= {least}\n) * 0 + 1"
    )


def _as(expr: str, **labels: str) -> str:
    """`expr` with constant labels set, one label_replace each."""
    head = "label_replace(" * len(labels)
    tail = "".join(f', "{name}", "{value}", "", "")' for name, value in labels.items())
    return f"{head}\n{_indent(expr)},\n{tail.removeprefix(', ')}" if labels else expr


def _indent(text: str) -> str:
    return "\n".join("  " + line for line in text.splitlines())


def _tracks() -> str:
    """service_version:service_track:info: the role (`track`) of every version of a service.

    Declared roles first (a version declared both ways is a canary: never hide one). In a service
    that declares roles, an undeclared version takes the role nobody declared for it: stable
    where a canary is declared (plain Istio: the operator names the canary), canary where only
    stable is. A service that declares nothing falls back to traffic: its busiest version is
    stable, the others canaries.
    """
    or_ = f"\nor on ({VERSION})\n"
    on_service = "on (cluster, namespace, service)"
    versions = (
        f"max by ({VERSION}) (\n  service_version:service_requests:increase{COMPARE_WINDOW}"
        "\n  or service_version:service_pods:count\n)"
    )
    traffic = f"sum by ({VERSION}) (service_version:service_requests:increase{COMPARE_WINDOW})"
    undeclared = f"(\n{_indent(versions)}\n  unless on ({VERSION}) {DECLARED}\n)"
    declared = or_.join(
        [
            f'max by ({VERSION}, track) ({DECLARED}{{track="canary"}})',
            f'max by ({VERSION}, track) ({DECLARED}{{track="stable"}})',
            _as(f'{undeclared}\nand {on_service} {DECLARED}{{track="canary"}}', track="stable"),
            _as(f"{undeclared}\nand {on_service} {DECLARED}", track="canary"),
        ]
    )
    roles = or_.join(
        [
            _as(declared, roles_from="declaration"),
            _as(
                f"topk by (cluster, namespace, service) (1,\n  {traffic}\n"
                f"  unless {on_service} {DECLARED}\n)",
                track="stable",
                roles_from="traffic",
            ),
            _as(
                f"{versions}\nunless {on_service} {DECLARED}", track="canary", roles_from="traffic"
            ),
        ]
    )
    return f"(\n{_indent(roles)}\n) * 0 + 1"


def canary_recording_rules() -> list[dict[str, Any]]:
    w, cw, route = ERROR_WINDOW, COMPARE_WINDOW, ROUTE
    rules: list[dict[str, Any]] = []

    def record(name: str, expr: str, **labels: str) -> None:
        rules.append({"record": name, "expr": expr, **({"labels": labels} if labels else {})})

    for name in (
        f"service_requests:rate{w}",
        f"service_request_errors:rate{w}",
        f"service_requests:increase{cw}",
    ):
        record(f"service_version:{name}", f"sum by ({SERVICE}) ({route}:{name})")
    record(
        f"service_version:service_request_error:ratio_rate{w}",
        f"service_version:service_request_errors:rate{w}\n/\n"
        f"service_version:service_requests:rate{w}",
    )
    record(
        f"service_version:service_requests:increase{w}",
        f"service_version:service_requests:rate{w} * {ERROR_WINDOW_S}",
    )
    record("service_version:service_track:info", _tracks())
    # The baseline is the busiest stable version (there is one but while an old one drains);
    # every canary version with requests or pods is compared with it.
    record(
        "service_version:service_baseline:info",
        f"topk by (cluster, source, namespace, service) (1,\n"
        f"  service_version:service_requests:increase{cw}\n"
        f'  and on ({VERSION}) service_version:service_track:info{{track="stable"}}\n) * 0 + 1',
    )
    record(
        "service_version:service_canary:info",
        f"(\n  (service_version:service_requests:increase{cw}"
        " or service_version:service_pods:count)\n"
        f'  and on ({VERSION}) service_version:service_track:info{{track="canary"}}\n) * 0 + 1',
    )
    record(
        f"{route}:service_canary_comparison:sufficient",
        _sufficient(f"{route}:service_requests:increase{cw}"),
    )
    record(
        "service_version:service_canary_comparison:sufficient",
        _sufficient(f"service_version:service_requests:increase{cw}"),
    )
    for stat in LATENCY_STATISTICS:
        record(
            f"{route}:service_request_duration_seconds:canary_over_baseline",
            _canary_over_baseline(f"{route}:service_request_duration_seconds:{stat}_rate{cw}"),
            statistic=stat,
        )
    record(
        "service_version:service_gpu_memory_used_bytes:canary_over_baseline",
        _canary_over_baseline("service_version:service_gpu_memory_used_bytes:avg"),
    )
    # Drift, 0 (same distribution) to 1 (disjoint): total variation distance between the class
    # shares (a class one version never predicts counts fully), and the largest gap between the
    # score CDFs (Kolmogorov-Smirnov distance on the buckets).
    classes = f"{route}:model_prediction_classes:share_rate{cw}"
    canary = _role(classes, "canary")
    overlap = (
        f"sum without (class) (\n  {canary}\n  - clamp_min(\n    {canary}\n"
        f"    - ignoring (version) group_left ()\n    {_role(classes, 'baseline')},\n"
        f"  0)\n)"
    )
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


def _alert(
    name: str, expr: str, for_: str, severity: str, summary: str, description: str, **labels: str
) -> dict[str, Any]:
    return {
        "alert": name,
        "expr": expr,
        "for": for_,
        "labels": {
            k: v for k, v in {"severity": severity, "track": "canary", **labels}.items() if v
        },
        "annotations": {
            "summary": summary,
            "description": description,
            "runbook_url": RUNBOOK + name.lower(),
        },
    }


WHO = "{{ $labels.service }} ({{ $labels.source }}) version {{ $labels.version }}"


def canary_alerts() -> list[dict[str, Any]]:
    w, cw, route = ERROR_WINDOW, COMPARE_WINDOW, ROUTE
    canary = f"and {ON_VERSION} service_version:service_canary:info"
    baseline = f"and {ON_SERVICE} service_version:service_baseline:info"
    per_service = "cluster, source, namespace, service"
    return [
        # 1% over the last 5 minutes, held for one more minute: the pause. A ratio over 5m
        # rather than `for: 5m` on a short window, so that Poisson noise at canary volumes
        # (10 req/s: 1.5% errors is 9 a minute) cannot reset the clock (docs/rules.md).
        _alert(
            "TrtHeartbeatServiceCanaryErrorRatioHigh",
            f"service_version:service_request_error:ratio_rate{w}\n"
            f"  > {_threshold('service_canary_error_ratio')}\n{canary}\n"
            f"and {ON_VERSION}\n  service_version:service_requests:increase{w}\n"
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
            "service_version:service_gpu_memory_used_bytes:canary_over_baseline\n"
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
            f"and {ON_VERSION} service_version:service_canary_comparison:sufficient",
            "10m",
            "warning",
            "The canary's predictions are distributed differently.",
            f"{WHO}, model {{{{ $labels.model }}}}: prediction drift "
            f'({{{{ $labels.statistic }}}}) {{{{ printf "%.2f" $value }}}} over {cw}.',
        ),
        # A canary's pods, no requests, while the service has traffic: a weight or subset that
        # routes nothing to the canary. Nothing is being tested, whatever the other alerts say.
        # Stable pods without traffic are normal (after the promotion, before the scale-down).
        _alert(
            "TrtHeartbeatServiceCanaryNoTraffic",
            f"service_version:service_pods:count\n{canary}\n"
            f"unless {ON_VERSION} (service_version:service_requests:rate{w} > 0)\n"
            f"and {ON_SERVICE}\n  (sum by ({per_service}) "
            f"(service_version:service_requests:rate{w}) > 0)",
            "10m",
            "warning",
            "A canary version has pods but receives no requests.",
            f"{WHO} has {{{{ $value }}}} pods and no requests in {w}, while the service has "
            "traffic: check the traffic split.",
        ),
        # Said out loud, never a silent pass and never a page. Without a baseline (the stable
        # version is gone: the rollout is complete) there is nothing to compare.
        _alert(
            "TrtHeartbeatServiceCanaryInsufficientTraffic",
            f"service_version:service_requests:increase{cw} > 0\n{canary}\n{baseline}\n"
            f"unless {ON_VERSION} service_version:service_canary_comparison:sufficient",
            "10m",
            "info",
            "Too few requests to compare the canary with the baseline.",
            f"{WHO} served {{{{ $value | humanize }}}} requests in {cw}: too few to compare "
            "latency, drift or GPU memory with the baseline.",
        ),
        # Nothing declares the roles and the busiest version carries under 60%: the roles by
        # traffic may swap with the next weight step (docs/service-canary.md, "Roles").
        _alert(
            "TrtHeartbeatServiceRolesFromTraffic",
            f"max by ({per_service}) (\n  service_version:service_requests:increase{cw}\n"
            f'  and on ({VERSION}) service_version:service_track:info{{roles_from="traffic", '
            'track="stable"}\n)\n'
            f"/ {ON_SERVICE}\n  sum by ({per_service}) "
            f"(service_version:service_requests:increase{cw})\n"
            f"  < {_threshold('service_roles_from_traffic_share')}",
            "5m",
            "info",
            "Nothing declares which version is the canary, and the traffic split is near even.",
            "{{ $labels.service }} ({{ $labels.source }}): the busiest version carries "
            "{{ $value | humanizePercentage }} of the requests and no rollout declares the "
            "roles, so stable and canary are guessed from traffic and may swap: declare them.",
            track="",
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
    header = (
        "# Generated by `trt-heartbeat-exporter service-rules` from the sources "
        f"({', '.join(s.origin for s in sources)}); do not edit.\n"
        "# Normalises each source's request, latency, GPU memory and drift metrics for "
        "service-canary.rules.yml.\n"
    )
    return _dump([source_group(s) for s in sources], header)


def canary_file() -> str:
    header = (
        "# Generated by `trt-heartbeat-exporter service-rules --canary` "
        "(exporter/trt_heartbeat/canary/guard/rules.py); do not edit.\n"
        "# The rollout guard on the service's own traffic, whatever the source "
        "(docs/service-canary.md).\n"
    )
    return _dump(
        [
            {"name": "trt-heartbeat-service-canary.rules", "rules": canary_recording_rules()},
            {"name": "trt-heartbeat-service-canary.alerts", "rules": canary_alerts()},
        ],
        header,
    )
