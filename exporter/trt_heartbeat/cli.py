"""Command line: serve, probe, check-config. Click lives here and nowhere else.

Every flag is also an environment variable (TRT_HEARTBEAT_<FLAG>) and a config file key;
precedence is flag > environment > file > default.
"""

from __future__ import annotations

import functools
import json
import logging
import signal
import statistics
import sys
import threading
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click
import jsonschema
import yaml

from trt_heartbeat import __version__, documents
from trt_heartbeat.cliflags import BadInput, env_name
from trt_heartbeat.errors import HeartbeatError
from trt_heartbeat.exporter import config, logs
from trt_heartbeat.exporter.app import (
    Exporter,
    gpu_visible,
    make_telemetry,
    probe_record_json,
    probes_gpus,
    select_backend,
    targets_for,
)
from trt_heartbeat.exporter.backends import BackendOptions, resolve_spec
from trt_heartbeat.exporter.config import Settings
from trt_heartbeat.exporter.timed_probe import run_probe
from trt_heartbeat.exporter.web import config as web_config
from trt_heartbeat.exporter.web.server import ExporterHTTPServer
from trt_heartbeat.exporter.worker import Worker, WorkerAborted, WorkerFailure, WorkerSpec

log = logging.getLogger("trt_heartbeat")
F = TypeVar("F", bound=Callable[..., Any])


class ConfigValue(click.ParamType):  # type: ignore[type-arg]
    """A flag value checked against the same schema fragment as its config key."""

    def __init__(self, key: str, duration: bool = False) -> None:
        self.key, self.duration = key, duration
        node = config.schema()
        for part in key.split("."):
            node = node["properties"][part]
        if "$ref" in node:
            node = config.schema()["$defs"][node["$ref"].rsplit("/", 1)[-1]]
        self._schema = {**node, "$defs": config.schema()["$defs"]}  # for references inside
        self.name = "duration" if duration else key.rsplit(".", 1)[-1]
        self._expected = node.get("x-expected", "a valid value")

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if self.duration:
            try:
                seconds = documents.parse_duration(value)
            except ValueError:
                seconds = 0.0
            if seconds > 0:
                return seconds
            self.fail(f"expected {self._expected}, got {value!r}", param, ctx)
        try:
            jsonschema.validate(value, self._schema)
        except jsonschema.ValidationError:
            self.fail(f"expected {self._expected}, got {value!r}", param, ctx)
        return value


class GpuSelection(click.ParamType):  # type: ignore[type-arg]
    """`all`, or `0,1` / `GPU-…,GPU-…`: the flag form of the `gpus` list."""

    name = "gpus"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if not isinstance(value, str):
            return value
        if value.strip() == "all":
            return "all"
        items: list[int | str] = [int(v) if v.strip().isdigit() else v.strip()
                                  for v in value.split(",")]  # fmt: skip
        return ConfigValue("gpus").convert(items, param, ctx)


class ListValue(click.ParamType):  # type: ignore[type-arg]
    """A comma-separated flag for a config list; a single word the key also takes as a name
    (`--metrics.buckets coarse`) stays a word."""

    def __init__(self, key: str, words: tuple[str, ...] = ()) -> None:
        self.words, self._value = words, ConfigValue(key)
        self.name = key.rsplit(".", 1)[-1]

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if not isinstance(value, str):
            return value
        text = value.strip()
        items = text if text in self.words else [v.strip() for v in text.split(",")]
        return self._value.convert(items, param, ctx)


# (flag, config key, type, help)
_CONFIG_FLAGS: list[tuple[str, str, click.ParamType[Any], str]] = [
    ("--backend", "backend", ConfigValue("backend"),
     "Probe backend: auto, reference, or package.module:Class. [default: auto]"),
    ("--gpus", "gpus", GpuSelection(),
     "GPUs to probe: all, or a comma-separated list of indexes or UUIDs. [default: all]"),
    ("--precision", "precision", click.Choice(["fp64", "fp32", "fp16"]),
     "Precision of the probe network; sets the golden-output tolerance. [default: fp32]"),
    ("--interval", "interval", ConfigValue("interval", duration=True),
     "Time between probes of a target, e.g. 10s. [default: 10s]"),
    ("--timeout", "timeout", ConfigValue("timeout", duration=True),
     "Time a probe may take before its worker is replaced. [default: 5s]"),
    ("--web.listen-address", "web.listen_address", ConfigValue("web.listen_address"),
     "Address to serve HTTP on. [default: :9470]"),
    ("--web.telemetry-path", "web.telemetry_path", ConfigValue("web.telemetry_path"),
     "Path under which to expose metrics. [default: /metrics]"),
    ("--web.config.file", "web.config_file", ConfigValue("web.config_file"),
     "Web configuration file (exporter-toolkit format) enabling TLS and/or basic auth."),
    ("--web.max-requests", "web.max_requests", click.IntRange(min=0),
     "Requests served at once; more get 503 (0: unlimited). [default: 40]"),
    ("--metrics.histogram-phases", "metrics.histogram_phases",
     ListValue("metrics.histogram_phases"),
     "Probe phases with a latency histogram, comma-separated (of total,h2d,compute,d2h); "
     "must include total. [default: total]"),
    ("--metrics.buckets", "metrics.buckets", ListValue("metrics.buckets", ("default", "coarse")),
     "Latency histogram buckets: default, coarse, or comma-separated durations. "
     "[default: default]"),
    ("--log.level", "log.level", click.Choice(["debug", "info", "warning", "error"]),
     "Log level. [default: info]"),
    ("--log.format", "log.format", click.Choice(["text", "json"]),
     "Log format: text or JSON lines. [default: text]"),
]  # fmt: skip


def _param_name(key: str) -> str:
    return key.replace(".", "__")


def config_flags(func: F) -> F:
    """Add every config flag, each with its environment variable."""
    for flag, key, kind, text in reversed(_CONFIG_FLAGS):
        func = click.option(
            flag, _param_name(key), type=kind, default=None, envvar=env_name(flag),
            show_envvar=True, help=text,
        )(func)  # fmt: skip
    return func


def config_options(func: F) -> F:
    """Add --config and every config flag."""
    return click.option(
        "--config", "config_file", type=click.Path(dir_okay=False, path_type=Path),
        default=None, envvar=env_name("--config"), show_envvar=True,
        help="YAML or JSON configuration file.",
    )(config_flags(func))  # fmt: skip


def _overrides(params: dict[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for _, key, _, _ in _CONFIG_FLAGS:
        value = params.get(_param_name(key))
        if value is None:
            continue
        node = nested
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested


def load_settings(params: dict[str, Any], file: Path | None = None) -> Settings:
    try:
        return config.load(file or params.get("config_file"), _overrides(params))
    except HeartbeatError as exc:
        raise BadInput(str(exc)) from exc


def _select(settings: Settings) -> tuple[str, bool]:
    has_gpu = gpu_visible()
    try:
        return select_backend(settings.backend, has_gpu), has_gpu
    except HeartbeatError as exc:
        raise BadInput(str(exc)) from exc


def _with_errors(func: F) -> F:
    """Translate domain errors escaping a command into one clear line."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except HeartbeatError as exc:
            raise BadInput(str(exc)) from exc

    return wrapper  # type: ignore[return-value]


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "--version", prog_name="trt-heartbeat-exporter")
def cli() -> None:
    """Prometheus exporter that runs a canonical inference on every GPU on a timer, checks the
    answer against a golden output and exports the heartbeat."""


@cli.command()
@config_options
@_with_errors
def serve(**params: Any) -> None:
    """Run the exporter: probe every target on a timer and serve /metrics, /health, /ping."""
    settings = load_settings(params)
    logs.configure(settings.log_level, settings.log_format)
    backend, has_gpu = _select(settings)
    web = None
    if settings.web_config_file:
        try:
            web = web_config.load(Path(settings.web_config_file))
        except HeartbeatError as exc:
            raise BadInput(str(exc)) from exc
    exporter = Exporter(settings, backend, telemetry=make_telemetry(settings, has_gpu),
                        has_gpu=has_gpu)  # fmt: skip
    try:
        server = ExporterHTTPServer(
            settings.listen_host, settings.listen_port, exporter, web, settings.max_requests
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
        extra={"fields": {
            "address": settings.listen_address, "port": server.port, "backend": backend,
            "gpu_visible": has_gpu, "interval_seconds": settings.interval,
            "timeout_seconds": settings.timeout, "version": __version__,
            "config": settings.source, "tls": bool(web and web.tls),
            "basic_auth": bool(web and web.users),
        }},
    )  # fmt: skip
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


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


@cli.command()
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
@_with_errors
def probe(count: int, summary: bool, **params: Any) -> None:
    """Run COUNT probes once on each target and print a JSON report.

    Exits 0 only if every probe passed, 1 if any failed, 2 on bad input: usable as a Kubernetes
    exec probe, a CI step, or a node-problem-detector custom plugin (0 ok, 1 problem, 2 unknown).
    """
    settings = load_settings(params)
    logs.configure("error", settings.log_format)
    backend, has_gpu = _select(settings)
    spec = resolve_spec(backend)
    report: dict[str, Any] = {"backend": backend, "precision": settings.precision, "targets": []}
    all_passed = True
    options = BackendOptions(settings.cuda_api, settings.engine_cache_dir)
    bind_gpu = probes_gpus(backend, settings, has_gpu)
    for target in targets_for(backend, settings, has_gpu):
        worker = Worker(WorkerSpec(spec, target, settings.precision, options, bind_gpu=bind_gpu))
        entry: dict[str, Any] = {"gpu": target.gpu, "uuid": target.uuid, "probes": []}
        report["targets"].append(entry)
        worker.start()
        try:
            info, load_seconds = worker.wait_ready(settings.startup_timeout, lambda: True)
        except WorkerFailure as failure:
            entry["error"] = {"reason": str(failure.reason), "message": str(failure)}
            all_passed = False
            continue
        entry.update(engine=asdict(info), engine_load_seconds=round(load_seconds, 6))
        totals = []
        try:
            for _ in range(count):
                outcome = run_probe(worker, settings.precision, settings.timeout, lambda: True)
                record = outcome.record
                entry["probes"].append(probe_record_json(record))
                if record.result == "success":
                    totals.append(record.phases["total"])
                if outcome.restart_reason is not None:
                    break  # the worker is gone; the report says why
        except WorkerAborted:  # pragma: no cover - keep_waiting never aborts here
            pass
        finally:
            worker.close()
        passed = len(totals)
        entry["passed"], entry["failed"] = passed, count - passed
        if totals:
            entry["total_seconds"] = {
                "median": statistics.median(totals), "p99": _percentile(totals, 0.99),
            }  # fmt: skip
        all_passed = all_passed and passed == count
    report["passed"] = all_passed
    # Strict JSON (no NaN/Infinity): every float in the report is finite by construction.
    click.echo(_summary_line(report) if summary
               else json.dumps(report, indent=2, default=str, allow_nan=False))  # fmt: skip
    sys.exit(0 if all_passed else 1)


def _summary_line(report: dict[str, Any]) -> str:
    """One line: what passed, or the first failure of each failing target."""
    problems = []
    for target in report["targets"]:
        failed = [p for p in target["probes"] if p["result"] != "success"]
        if "error" in target:
            problems.append(f"gpu {target['gpu']}: {target['error']['reason']}")
        elif failed or not target["probes"]:
            reason = failed[0]["reason"] if failed else "no probe ran"
            problems.append(f"gpu {target['gpu']}: {reason}")
    if problems:
        return "failed: " + "; ".join(problems)
    probes = sum(len(t["probes"]) for t in report["targets"])
    return f"ok: {probes} probes passed on {len(report['targets'])} target(s)"


@cli.command("check-config")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@config_flags
def check_config(file: Path, **params: Any) -> None:
    """Validate FILE and print the effective configuration.

    Flags and TRT_HEARTBEAT_* environment variables are applied on top of FILE, and defaults
    filled in, exactly as `serve` would see them.
    """
    settings = load_settings(params, file)
    click.echo(yaml.safe_dump(settings.effective(), sort_keys=False), nl=False)


@cli.command("build-engine")
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
@click.option("--cuda-api", type=click.Choice(["cuda-python", "pycuda"]), default="cuda-python",
              show_default=True, help="CUDA host API.")  # fmt: skip
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
        manifest = build(precision, engine_cache_dir or default_cache_dir(), version_compatible,
                         hardware_compatible, cuda_api)  # fmt: skip
    except BackendError as exc:
        raise click.ClickException(f"{exc.reason}: {exc}") from exc
    except OSError as exc:
        raise click.ClickException(f"cannot write the engine cache: {exc}") from exc
    click.echo(json.dumps(asdict(manifest), indent=2))


def _register() -> None:
    # Commands with modules of their own; imported here so that `cli` lists them.
    from trt_heartbeat.canary.guard.command import service_rules
    from trt_heartbeat.canary.judge.command import canary_judge

    cli.add_command(canary_judge)
    cli.add_command(service_rules)


_register()


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
