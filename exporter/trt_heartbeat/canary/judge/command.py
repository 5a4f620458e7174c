"""`canary-judge`: the command line around the judge; the judging itself lives beside it."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from trt_heartbeat.canary.guard.source import DEFAULT as DEFAULT_SOURCE
from trt_heartbeat.canary.guard.source import SourceError, builtin
from trt_heartbeat.canary.guard.source import load as load_source
from trt_heartbeat.cliflags import BadInput, duration_flag, env_name, time_flag
from trt_heartbeat.domain import PHASES
from trt_heartbeat.errors import HeartbeatError


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
    type=click.Choice(PHASES),
    default="total",
    show_default=True,
    help="Probe phase whose latency is compared (a phase besides total needs the exporters' "
    "metrics.histogram_phases to include it).",
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
@click.option(
    "--checks",
    type=click.Choice(["probes", "service", "all"]),
    default=None,
    help="What to judge: the heartbeat probes, the service's own traffic, or both. "
    "[default: all with --service, else probes]",
)
@click.option(
    "--source",
    "source_name",
    default=DEFAULT_SOURCE,
    show_default=True,
    metavar="NAME|FILE",
    help=f"Where the service's request metrics live: {', '.join(builtin())}, or a source file.",
)
@click.option(
    "--service",
    default=None,
    metavar="NAME",
    help="The service to judge: the value of the source's service label "
    "(Istio: destination_canonical_service).",
)
@click.option(
    "--service-selector",
    default="",
    metavar="MATCHERS",
    help="More label matchers for the service's request metrics, e.g. "
    "'{destination_service_namespace=\"prod\"}'.",
)
@click.option(
    "--min-requests",
    type=click.IntRange(min=1),
    default=1000,
    show_default=True,
    help="Requests each version needs per route before the service is judged.",
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
    checks: str | None,
    source_name: str,
    service: str | None,
    service_selector: str,
    min_requests: int,
) -> None:
    """Compare the canary with the baseline over a window and give one verdict.

    Probes, per GPU model: a rank test with effect size on probe latency, p90/p99 ratios with
    intervals against the rule pack's threshold, a dispersion test, exact rate tests on failures
    and wrong outputs, and comparisons of output deviation, probe GPU memory and engine load time.
    With --service, the service's own traffic per route: the error ratio against the rule pack's
    bound and the baseline, request latency (rank test and tail ratios), prediction drift and
    GPU memory per version. Exit code: 0 pass, 1 marginal, 3 inconclusive (too few probes or
    requests, no baseline), 5 fail; 2 bad input only (bad flags, a source file that is not valid,
    a --service that matches nothing, a --phase the exporters do not export: one error line, no
    report), never a verdict; 4 when Prometheus cannot be asked or the plot cannot be written.
    """
    from trt_heartbeat.canary.judge import prometheus, queries, report, thresholds, traffic
    from trt_heartbeat.canary.judge.verdict import (
        Judgement,
        Part,
        Thresholds,
        judge_probes,
        limit_names,
    )

    window_s = duration_flag("--window", window)
    timeout_s = duration_flag("--timeout", http_timeout)
    at = time_flag(at_time)
    checks = checks or ("all" if service else "probes")
    if plot is not None and not plot.resolve().parent.is_dir():
        raise BadInput(f"--plot: directory {str(plot.parent)!r} does not exist")
    if checks != "probes" and not service:
        raise BadInput(f"--checks {checks}: name the service with --service")
    if plot is not None and checks == "service":
        raise BadInput("--plot draws the probes' latency: use it with --checks probes or all")
    try:
        scope = queries.Scope(
            window_s,
            at,
            queries.parse_selector(selector),
            queries.check_label_name("--track-label", track_label),
            canary,
            baseline,
            phase,
        )
        client = prometheus.PrometheusClient(prometheus_url, timeout_s)
        extra = queries.parse_selector(service_selector, "--service-selector")
    except HeartbeatError as exc:
        raise BadInput(str(exc)) from exc
    try:
        source = load_source(source_name)
    except SourceError as exc:
        raise BadInput(f"--source: {exc}") from exc
    if canary == baseline:
        raise BadInput("--canary and --baseline must name different tracks")
    ctx = click.get_current_context()
    # The service's roles come from the rule pack unless the versions were named.
    named = {
        p: ctx.get_parameter_source(p) == click.core.ParameterSource.COMMANDLINE
        for p in ("canary", "baseline")
    }
    try:
        limits, limits_from = thresholds.read(client, at)
        parts, obs = [], None
        if checks in ("probes", "all"):
            obs = queries.observe(client, scope)
            t = Thresholds(alpha=alpha, min_samples=min_samples)
            parts.append(judge_probes(obs, scope, t, limits))
        if checks in ("service", "all") and service:
            sscope = traffic.ServiceScope(
                source,
                service,
                window_s,
                at,
                extra,
                canary if named["canary"] else None,
                baseline if named["baseline"] else None,
                min_requests,
            )
            sobs = traffic.observe(client, sscope)
            strata, why = traffic.judge(sobs, sscope, limits, alpha)
            details = {
                "source": source.origin,
                "service": service,
                "canary": sobs.canary,
                "baseline": sobs.baseline,
                "roles_from": sobs.roles_from,
                "requests": sobs.traffic,
            }
            parts.append(Part("service", strata, why, [], details))
    except (traffic.NoServiceSeries, queries.PhaseNotExported) as exc:
        raise BadInput(str(exc)) from exc
    except HeartbeatError as exc:
        raise JudgeUnavailable(str(exc)) from exc
    judgement = Judgement(
        scope,
        Thresholds(alpha=alpha, min_samples=min_samples),
        parts,
        limit_names(limits),
        limits_from,
    )
    click.echo(report.to_json(judgement) if output == "json" else report.table(judgement))
    if plot is not None:
        from trt_heartbeat.canary.judge.plot import write_plot

        assert obs is not None  # --plot with --checks service was refused above
        try:
            write_plot(plot, judgement, obs, queries.timeline(client, scope))
        except HeartbeatError as exc:
            raise JudgeUnavailable(str(exc)) from exc
    sys.exit(judgement.exit_code)
