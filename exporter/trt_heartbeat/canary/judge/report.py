"""canary-judge output: a table for people, JSON for pipelines."""

from __future__ import annotations

import dataclasses
import json
import math
from datetime import datetime, timezone
from typing import Any

from trt_heartbeat.canary.judge.verdict import Check, Judgement, Part

WHAT_NEXT = {
    "pass": "promote",
    "marginal": "hold: look at the marginal checks before promoting",
    "fail": "roll back",
    "inconclusive": "hold: not enough data to judge; wait or widen the window",
}


def when(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def duration_text(seconds: float) -> str:
    """1800 -> 30m, 5400 -> 1h30m, 90 -> 1m30s."""
    out, rest = "", round(seconds)
    for unit, size in (("h", 3600), ("m", 60), ("s", 1)):
        if rest >= size:
            out += f"{rest // size}{unit}"
            rest %= size
    return out or f"{seconds:g}s"


def _num(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        if value == 0 or 1e-3 <= abs(value) < 1e4:
            return f"{value:.3g}"
        return f"{value:.2e}"
    return str(value)


def _side(values: dict[str, Any]) -> str:
    parts = []
    for key, value in values.items():
        if key.endswith("_seconds") and isinstance(value, float) and math.isfinite(value):
            shown = f"{value:.3g}s" if value >= 1 else f"{value * 1e3:.3g}ms"
            parts.append(f"{key.removesuffix('_seconds')}={shown}")
        elif key.endswith("_bytes") and isinstance(value, float) and math.isfinite(value):
            parts.append(f"{key.removesuffix('_bytes')}={value / 2**20:.0f}MiB")
        else:
            parts.append(f"{key}={_num(value)}")
    return " ".join(parts) or "-"


def _stat(check: Check) -> str:
    s = check.statistic
    parts = []
    if "effect_a" in s:
        parts.append(f"A={s['effect_a']:.2f}")
    if "ratio" in s:
        parts.append(f"ratio={_num(s['ratio'])}")
    if "p99_ratio" in s:
        parts.append(f"p99_ratio={_num(s['p99_ratio'])}")
    if "p_value" in s:
        parts.append(f"p={_num(s['p_value'])}")
    return " ".join(parts) or "-"


def table(j: Judgement) -> str:
    s = j.scope
    lines = [
        f"canary-judge: {j.verdict.upper()} ({WHAT_NEXT[j.verdict]})",
        f"  window {duration_text(s.window)} ending {when(s.at)}; thresholds: {j.limits_from}",
    ]
    header = ("stratum", "check", "verdict", "canary", "baseline", "statistic", "why")
    rows = []
    for part in j.parts:
        lines.append(f"  {part.name}: {_part_scope(part, j)}")
        if part.unjudged:
            lines.append(f"  {part.name}: {part.unjudged}")
        rows += [
            (
                st.gpu_model,
                c.name,
                c.verdict,
                _side(c.canary),
                _side(c.baseline),
                _stat(c),
                c.reason,
            )
            for st in part.strata
            for c in st.checks
        ]
    if rows:
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]
        lines.append("")
        for row in [header, *rows]:
            cells = [cell.ljust(w) for cell, w in zip(row, widths, strict=False)]
            lines.append("  ".join([*cells, row[-1]]).rstrip())
    for part in j.parts:
        lines.extend(f"note: {note}" for note in part.notes)
    lines.append("")
    lines.append("Thresholds and PromQL of every check: --output json.")
    return "\n".join(lines)


def _part_scope(part: Part, j: Judgement) -> str:
    s = j.scope
    if part.name == "probes":
        return (
            f"{s.track_label}={s.canary!r} against {s.track_label}={s.baseline!r}, "
            f"selector {{{s.selector}}}"
        )
    d = part.details
    return (
        f"service {d.get('service')!r} ({d.get('source')}): version "
        f"{d.get('canary') or '-'!r} against {d.get('baseline')!r} (roles from "
        f"{d.get('roles_from')})"
    )


def _strata(part: Part, key: str) -> list[dict[str, Any]]:
    return [
        {
            key: st.gpu_model,
            "verdict": st.verdict,
            "checks": [dataclasses.asdict(c) for c in st.checks],
        }
        for st in part.strata
    ]


def document(j: Judgement) -> dict[str, Any]:
    s = j.scope
    parts = {p.name: p for p in j.parts}
    probes = parts.get("probes")
    out: dict[str, Any] = {
        "verdict": j.verdict,
        "exit_code": j.exit_code,
        "next": WHAT_NEXT[j.verdict],
        "window_seconds": s.window,
        "end": when(s.at),
        "selector": s.selector,
        "track_label": s.track_label,
        "canary": s.canary,
        "baseline": s.baseline,
        "thresholds": dataclasses.asdict(j.thresholds),
        "rule_pack_thresholds": j.limits,
        "rule_pack_thresholds_from": j.limits_from,
        "unjudged": (probes.unjudged or None) if probes else "probes not judged (--checks)",
        "notes": probes.notes if probes else [],
        "strata": _strata(probes, "gpu_model") if probes else [],
    }
    service = parts.get("service")
    if service is not None:
        out["service"] = {
            **service.details,
            "verdict": service.verdict,
            "unjudged": service.unjudged or None,
            "notes": service.notes,
            "strata": _strata(service, "route"),
        }
    return out


def to_json(j: Judgement) -> str:
    # NaN is not JSON: null where a number could not be computed.
    return json.dumps(_clean(document(j)), indent=2)


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value
