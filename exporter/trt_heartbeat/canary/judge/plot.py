"""--plot: the picture for the release ticket.

Top: each track's probe latency distribution over the window (share of probes per histogram
bucket, per GPU model). Bottom: p50 and p99 per track across the window, and canary/baseline p50
ratio on the right axis. Needs matplotlib (`pip install 'trt-heartbeat-exporter[plot]'`).
"""

from __future__ import annotations

import math
from datetime import datetime, timezone
from pathlib import Path

from trt_heartbeat.canary.judge.queries import Observations, Timeline
from trt_heartbeat.canary.judge.report import duration_text, when
from trt_heartbeat.canary.judge.verdict import Judgement
from trt_heartbeat.errors import HeartbeatError


class PlotError(HeartbeatError):
    pass


def write_plot(path: Path, j: Judgement, obs: Observations, tl: Timeline) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only; never a display
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotError(
            "--plot needs matplotlib: pip install 'trt-heartbeat-exporter[plot]'"
        ) from None
    s = j.scope
    fig, (dist, time_ax) = plt.subplots(2, 1, figsize=(10, 8), constrained_layout=True)
    window = f"window {duration_text(s.window)} ending {when(s.at)}"
    fig.suptitle(
        f"canary-judge: {j.verdict.upper()}  ({s.track_label}={s.canary} vs {s.baseline}, {window})"
    )

    colour = {s.canary: "tab:red", s.baseline: "tab:blue"}
    series = sorted(obs.buckets)
    # Only the buckets that hold probes, plus one on each side for context.
    used = [i for i, _ in enumerate(obs.bounds) if any(obs.buckets[k][i] for k in series)]
    lo, hi = (max(0, used[0] - 1), min(len(obs.bounds), used[-1] + 2)) if used else (0, 0)
    labels = [_bound(b) for b in obs.bounds[lo:hi]]
    positions = list(range(len(labels)))
    width = 0.8 / max(1, len(series))
    for i, key in enumerate(series):
        model, track = key
        counts = obs.buckets[key]
        total = sum(counts) or 1.0
        offset = (i - (len(series) - 1) / 2) * width
        dist.bar(
            [p + offset for p in positions],
            [c / total for c in counts[lo:hi]],
            width,
            label=f"{track} · {model} (n={int(sum(counts))})",
            color=colour.get(track),
            alpha=0.4 + 0.6 * (i + 1) / len(series),
            hatch="//" if track == s.canary else None,
        )
    dist.set_xticks(positions, labels, rotation=45, ha="right", fontsize=8)
    dist.set_xlabel("probe latency bucket (upper bound)")
    dist.set_ylabel("share of probes")
    dist.legend(fontsize=8)

    ratio_ax = time_ax.twinx()
    for (track, q), points in sorted(tl.quantiles.items()):
        if not points:
            continue
        times = [datetime.fromtimestamp(t, timezone.utc) for t, _ in points]
        time_ax.plot(
            times,
            [v * 1e3 for _, v in points],
            label=f"{track} p{q * 100:g}",
            color=colour.get(track),
            linestyle="-" if q == 0.5 else "--",
        )
    canary = dict(tl.quantiles.get((s.canary, 0.5), []))
    baseline = dict(tl.quantiles.get((s.baseline, 0.5), []))
    common = sorted(t for t in canary if t in baseline and baseline[t] > 0)
    if common:
        ratio_ax.plot(
            [datetime.fromtimestamp(t, timezone.utc) for t in common],
            [canary[t] / baseline[t] for t in common],
            color="black",
            alpha=0.5,
            label="p50 ratio canary/baseline",
        )
        ratio_ax.axhline(1.0, color="grey", linewidth=0.5)
        ratio_ax.set_ylabel("p50 ratio")
        ratio_ax.legend(loc="upper right", fontsize=8)
    time_ax.set_ylabel("latency (ms)")
    time_ax.set_xlabel("time (UTC)")
    time_ax.legend(loc="upper left", fontsize=8)
    try:
        fig.savefig(path, dpi=100)
    except OSError as exc:
        raise PlotError(f"--plot: cannot write {path}: {exc.strerror or exc}") from None
    finally:
        plt.close(fig)


def _bound(value: float) -> str:
    if math.isinf(value):
        return "+Inf"
    if value < 1e-3:
        return f"{value * 1e6:g} µs"
    if value < 1:
        return f"{value * 1e3:g} ms"
    return f"{value:g} s"
