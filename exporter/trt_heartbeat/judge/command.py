"""`canary-judge`: the command line around the judge; the judging itself lives beside it."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from ..clicommon import BadInput, duration_flag, env_name, time_flag
from ..errors import HeartbeatError


class JudgeUnavailable(click.ClickException):
    """canary-judge could not ask Prometheus or write its plot: exit 4, apart from verdicts."""

    exit_code = 4


@click.command("canary-judge")
@click.option(
    "--prometheus",
    "prometheus_url",
    required=True,
    metavar="URL",
    envvar=env_name("--prometheus"),
    show_envvar=True,
    help="Base URL of the Prometheus (or compatible API) that scrapes both tracks.",
)
@click.option(
    "--window",
    default="30m",
    show_default=True,
    metavar="DURATION",
    help="How far back from --at to compare.",
)
@click.option(
    "--at",
    "at_time",
    default=None,
    metavar="TIME",
    help="End of the window: RFC 3339 or Unix seconds. [default: now]",
)
@click.option(
    "--selector",
    default="",
    metavar="MATCHERS",
    help="Label matchers for the exporters to compare, e.g. '{namespace=\"infer\"}'.",
)
@click.option(
    "--track-label", default="track", show_default=True, help="Label that tells the tracks apart."
)
@click.option("--canary", default="canary", show_default=True, help="Track value of the canary.")
@click.option(
    "--baseline", default="stable", show_default=True, help="Track value of the baseline."
)
@click.option(
    "--phase",
    type=click.Choice(["total", "h2d", "compute", "d2h"]),
    default="total",
    show_default=True,
    help="Probe phase whose latency is compared.",
)
@click.option(
    "--min-samples",
    type=click.IntRange(min=1),
    default=100,
    show_default=True,
    help="Probes each track needs per GPU model before it is judged.",
)
@click.option(
    "--alpha",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    default=0.01,
    show_default=True,
    help="Significance for a fail, split across GPU models.",
)
@click.option(
    "--output",
    type=click.Choice(["table", "json"]),
    default="table",
    show_default=True,
    help="Report format on stdout.",
)
@click.option(
    "--plot",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    metavar="FILE.png",
    help="Also draw latency distributions and ratios to FILE.png.",
)
@click.option(
    "--timeout",
    "http_timeout",
    default="10s",
    show_default=True,
    metavar="DURATION",
    help="Time each Prometheus query may take.",
)
def canary_judge(
    prometheus_url: str,
    window: str,
    at_time: str | None,
    selector: str,
    track_label: str,
    canary: str,
    baseline: str,
    phase: str,
    min_samples: int,
    alpha: float,
    output: str,
    plot: Path | None,
    http_timeout: str,
) -> None:
    """Compare the canary track with the baseline over a window and give a verdict.

    Per GPU model: a rank test with effect size on probe latency, a dispersion test, exact rate
    tests on failures and wrong outputs, and comparisons of output deviation, probe GPU memory
    and engine load time. Exit code: 0 pass, 1 marginal, 2 fail, 3 inconclusive (too few probes
    or no baseline on a GPU model); 2 also for bad flags (with one error line, no report), 4 when
    Prometheus cannot be asked or the plot cannot be written.
    """
    from . import prometheus, queries, report
    from .verdict import Thresholds, judge

    window_s = duration_flag("--window", window)
    timeout_s = duration_flag("--timeout", http_timeout)
    at = time_flag(at_time)
    if plot is not None and not plot.resolve().parent.is_dir():
        raise BadInput(f"--plot: directory {str(plot.parent)!r} does not exist")
    try:
        scope = queries.Scope(
            window_s, at, queries.parse_selector(selector),
            queries.check_label_name("--track-label", track_label), canary, baseline, phase,
        )  # fmt: skip
        client = prometheus.PrometheusClient(prometheus_url, timeout_s)
    except HeartbeatError as exc:
        raise BadInput(str(exc)) from exc
    if canary == baseline:
        raise BadInput("--canary and --baseline must name different tracks")
    try:
        obs = queries.observe(client, scope)
    except HeartbeatError as exc:
        raise JudgeUnavailable(str(exc)) from exc
    judgement = judge(obs, scope, Thresholds(alpha=alpha, min_samples=min_samples))
    click.echo(report.to_json(judgement) if output == "json" else report.table(judgement))
    if plot is not None:
        from .plot import write_plot

        try:
            write_plot(plot, judgement, obs, queries.timeline(client, scope))
        except HeartbeatError as exc:
            raise JudgeUnavailable(str(exc)) from exc
    sys.exit(judgement.exit_code)
