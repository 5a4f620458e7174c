"""Command line: the exporter's commands and the canary tooling's under one program.

Click lives at this edge only: each product's commands sit in their own module
(`exporter.commands`, `canary.judge.command`, `canary.guard.command`); this module groups them
and turns click's errors into one line and exit code 2.
"""

from __future__ import annotations

import sys
from typing import NoReturn

import click

from trt_heartbeat import __version__
from trt_heartbeat.canary.guard.command import service_rules
from trt_heartbeat.canary.judge.command import canary_judge
from trt_heartbeat.exporter.commands import COMMANDS


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "--version", prog_name="trt-heartbeat-exporter")
def cli() -> None:
    """Prometheus exporter that runs a canonical inference on every GPU on a timer, checks the
    answer against a golden output and exports the heartbeat."""


for command in (*COMMANDS, canary_judge, service_rules):
    cli.add_command(command)


def main(argv: list[str] | None = None) -> NoReturn:
    """Entry point: click's errors become one line on stderr and exit code 2."""
    try:
        code = cli.main(args=argv, prog_name="trt-heartbeat-exporter", standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as exc:  # bare group: show help
        click.echo(exc.ctx.get_help() if exc.ctx else "", err=True)
        sys.exit(2)
    except click.UsageError as exc:
        command = exc.ctx.command_path if exc.ctx else "trt-heartbeat-exporter"
        click.echo(f"Error: {exc.format_message()} See '{command} --help'.", err=True)
        sys.exit(2)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)
