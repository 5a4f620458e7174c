"""The exporter's commands: serve, probe, check-config and build-engine.

Each is a thin layer: settings from the flags (`flags`), then the library (`app`, `one_shot`,
`backends.tensorrt`); domain errors become one line and exit code 2.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
from dataclasses import asdict
from pathlib import Path
from typing import Any

import click
import yaml

from trt_heartbeat import __version__
from trt_heartbeat.cliflags import domain_errors_as_bad_input, env_name
from trt_heartbeat.exporter import logs
from trt_heartbeat.exporter.app import Exporter, make_telemetry
from trt_heartbeat.exporter.devices import gpu_visible
from trt_heartbeat.exporter.flags import config_flags, config_options, load_settings
from trt_heartbeat.exporter.gpus import select_backend
from trt_heartbeat.exporter.one_shot import probe_targets, summary_line
from trt_heartbeat.exporter.web import config as web_config
from trt_heartbeat.exporter.web.routes import Routes
from trt_heartbeat.exporter.web.server import ExporterHTTPServer

log = logging.getLogger("trt_heartbeat")


@click.command()
@config_options
@domain_errors_as_bad_input
def serve(**params: Any) -> None:
    """Run the exporter: probe every target on a timer and serve /metrics, /health, /ping."""
    settings = load_settings(params)
    logs.configure(settings.log_level, settings.log_format)
    has_gpu = gpu_visible()
    backend = select_backend(settings.backend, has_gpu)
    web = web_config.load(Path(settings.web_config_file)) if settings.web_config_file else None
    exporter = Exporter(
        settings, backend, telemetry=make_telemetry(settings, has_gpu), has_gpu=has_gpu
    )
    try:
        server = ExporterHTTPServer(
            settings.listen_host, settings.listen_port, Routes(exporter), web, settings.max_requests
        )
    except OSError as exc:
        raise click.ClickException(
            f"cannot listen on {settings.listen_address}: {exc.strerror or exc}"
        ) from exc
    if backend == "reference" and settings.backend == "auto":
        log.warning(
            "no GPU visible: probing the CPU with the reference backend; "
            'build_info{backend="reference"} says so',
            extra={"fields": {"backend": backend}},
        )
    log.info(
        "listening",
        extra={
            "fields": {
                "address": settings.listen_address,
                "port": server.port,
                "backend": backend,
                "gpu_visible": has_gpu,
                "interval_seconds": settings.interval,
                "timeout_seconds": settings.timeout,
                "version": __version__,
                "config": settings.source,
                "tls": bool(web and web.tls),
                "basic_auth": bool(web and web.users),
            }
        },
    )
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("shutting down", extra={"fields": {"signal": signal.Signals(signum).name}})
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server.start_background()
    exporter.start()
    try:
        while not stop.wait(1.0):
            pass
    finally:
        server.shutdown()
        server.server_close()
        exporter.stop()


@click.command()
@config_options
@click.option(
    "--count",
    "-n",
    type=click.IntRange(1, 100000),
    default=3,
    show_default=True,
    help="Number of probes per target.",
)
@click.option(
    "--summary",
    is_flag=True,
    help="Print one line instead of the JSON report (node-problem-detector plugins).",
)
@domain_errors_as_bad_input
def probe(count: int, summary: bool, **params: Any) -> None:
    """Run COUNT probes once on each target and print a JSON report.

    Exits 0 only if every probe passed, 1 if any failed, 2 on bad input: usable as a Kubernetes
    exec probe, a CI step, or a node-problem-detector custom plugin (0 ok, 1 problem, 2 unknown).
    """
    settings = load_settings(params)
    logs.configure("error", settings.log_format)
    has_gpu = gpu_visible()
    report = probe_targets(settings, select_backend(settings.backend, has_gpu), has_gpu, count)
    # Strict JSON (no NaN/Infinity): every float in the report is finite by construction.
    click.echo(
        summary_line(report)
        if summary
        else json.dumps(report, indent=2, default=str, allow_nan=False)
    )
    sys.exit(0 if report["passed"] else 1)


@click.command("check-config")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@config_flags
@domain_errors_as_bad_input
def check_config(file: Path, **params: Any) -> None:
    """Validate FILE and print the effective configuration.

    Flags and TRT_HEARTBEAT_* environment variables are applied on top of FILE, and defaults
    filled in, exactly as `serve` would see them.
    """
    settings = load_settings(params, file)
    click.echo(yaml.safe_dump(settings.effective(), sort_keys=False), nl=False)


@click.command("build-engine")
@click.option(
    "--precision",
    type=click.Choice(["fp32", "fp16"]),
    default="fp32",
    show_default=True,
    help="Precision of the engine.",
)
@click.option(
    "--gpu",
    default="0",
    show_default=True,
    envvar=env_name("--gpu"),
    show_envvar=True,
    help="GPU index or UUID to build on.",
)
@click.option(
    "--engine-cache-dir",
    type=click.Path(file_okay=False),
    default=None,
    envvar=env_name("--engine-cache-dir"),
    show_envvar=True,
    help="Cache directory to write the plan and its manifest to. "
    "[default: $XDG_CACHE_HOME/trt-heartbeat-exporter/engines]",
)
@click.option(
    "--version-compatible",
    is_flag=True,
    help="Build a plan that newer TensorRT runtimes of the same major version load.",
)
@click.option(
    "--hardware-compatible",
    is_flag=True,
    help="Build a plan that runs on any Ampere or newer GPU (may be slower).",
)
@click.option(
    "--cuda-api",
    type=click.Choice(["cuda-python", "pycuda"]),
    default="cuda-python",
    show_default=True,
    help="CUDA host API.",
)
def build_engine(
    precision: str,
    gpu: str,
    engine_cache_dir: str | None,
    version_compatible: bool,
    hardware_compatible: bool,
    cuda_api: str,
) -> None:
    """Build the canonical TensorRT plan ahead of time and store it in the engine cache.

    Run it where the full TensorRT is installed (an init container, a CI job) so that the probe
    itself can run on the lean runtime. Prints the plan's manifest as JSON.
    """
    import os

    os.environ["CUDA_VISIBLE_DEVICES"] = gpu  # before any CUDA library loads
    from trt_heartbeat.errors import BackendError
    from trt_heartbeat.exporter.backends.tensorrt import build_engine as build
    from trt_heartbeat.exporter.engine_cache import default_cache_dir

    try:
        manifest = build(
            precision,
            engine_cache_dir or default_cache_dir(),
            version_compatible,
            hardware_compatible,
            cuda_api,
        )
    except BackendError as exc:
        raise click.ClickException(f"{exc.reason}: {exc}") from exc
    except OSError as exc:
        raise click.ClickException(f"cannot write the engine cache: {exc}") from exc
    click.echo(json.dumps(asdict(manifest), indent=2))


COMMANDS = (serve, probe, check_config, build_engine)
