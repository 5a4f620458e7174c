"""`service-rules`: the rollout guard's rules for built-in or custom sources."""

from __future__ import annotations

import click

from trt_heartbeat.canary.guard import rules, source
from trt_heartbeat.cliflags import BadInput


@click.command("service-rules")
@click.option(
    "--source",
    "sources",
    multiple=True,
    metavar="NAME|FILE",
    help=f"Source to write normalising rules for: {', '.join(source.builtin())} or a source file; "
    "repeat for several. [default: every built-in source]",
)
@click.option(
    "--canary",
    "canary_rules",
    is_flag=True,
    help="Write the source-agnostic comparison and alert rules instead "
    "(rules/service-canary.rules.yml).",
)
def service_rules(sources: tuple[str, ...], canary_rules: bool) -> None:
    """Print Prometheus rules for the rollout guard on the service's own traffic.

    A custom source (a YAML file like the built-in ones, validated against its JSON Schema) gets
    its own rule file next to the rule pack; the pack's alerts then cover it too.
    """
    if canary_rules:
        if sources:
            raise BadInput("--canary writes the source-agnostic rules: leave out --source")
        click.echo(rules.canary_file(), nl=False)
        return
    try:
        loaded = [source.load(s) for s in sources or source.builtin()]
    except source.SourceError as exc:
        raise BadInput(f"--source: {exc}") from exc
    names = [s.name for s in loaded]
    twice = [n for n in names if names.count(n) > 1]
    if twice:
        raise BadInput(f"--source: two sources are named {twice[0]!r}; names must differ")
    click.echo(rules.sources_file(loaded), nl=False)
