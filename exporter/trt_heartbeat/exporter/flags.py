"""The exporter's config flags: the config keys that are also a flag and an environment variable
(TRT_HEARTBEAT_<FLAG>), each checked against the same schema fragment as its key, with the key's
default (the schema's, via config.DEFAULTS) in its help. Precedence is flag > environment >
file > default.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
import jsonschema

from trt_heartbeat import documents
from trt_heartbeat.cliflags import env_name
from trt_heartbeat.exporter import config
from trt_heartbeat.exporter.config import Settings

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
                return documents.positive_duration(value)
            except ValueError:
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
        items: list[int | str] = [
            int(v) if v.strip().isdigit() else v.strip() for v in value.split(",")
        ]
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


# (flag, config key, type, help). The help ends with the key's default, taken from
# config.DEFAULTS, read from the schema: the one home of every default.
_CONFIG_FLAGS: list[tuple[str, str, click.ParamType[Any], str]] = [
    (
        "--backend",
        "backend",
        ConfigValue("backend"),
        "Probe backend: auto, reference, or package.module:Class.",
    ),
    (
        "--gpus",
        "gpus",
        GpuSelection(),
        "GPUs to probe: all, or a comma-separated list of indexes or UUIDs.",
    ),
    (
        "--precision",
        "precision",
        click.Choice(["fp64", "fp32", "fp16"]),
        "Precision of the probe network; sets the golden-output tolerance.",
    ),
    (
        "--interval",
        "interval",
        ConfigValue("interval", duration=True),
        "Time between probes of a target, e.g. 10s.",
    ),
    (
        "--timeout",
        "timeout",
        ConfigValue("timeout", duration=True),
        "Time a probe may take before its worker is replaced.",
    ),
    (
        "--web.listen-address",
        "web.listen_address",
        ConfigValue("web.listen_address"),
        "Address to serve HTTP on.",
    ),
    (
        "--web.telemetry-path",
        "web.telemetry_path",
        ConfigValue("web.telemetry_path"),
        "Path under which to expose metrics.",
    ),
    (
        "--web.config.file",
        "web.config_file",
        ConfigValue("web.config_file"),
        "Web configuration file (exporter-toolkit format) enabling TLS and/or basic auth.",
    ),
    (
        "--web.max-requests",
        "web.max_requests",
        click.IntRange(min=0),
        "Requests served at once; more get 503 (0: unlimited).",
    ),
    (
        "--metrics.histogram-phases",
        "metrics.histogram_phases",
        ListValue("metrics.histogram_phases"),
        "Probe phases with a latency histogram, comma-separated (of total,h2d,compute,d2h); "
        "must include total.",
    ),
    (
        "--metrics.buckets",
        "metrics.buckets",
        ListValue("metrics.buckets", ("default", "coarse")),
        "Latency histogram buckets: default, coarse, or comma-separated durations.",
    ),
    ("--log.level", "log.level", click.Choice(["debug", "info", "warning", "error"]), "Log level."),
    (
        "--log.format",
        "log.format",
        click.Choice(["text", "json"]),
        "Log format: text or JSON lines.",
    ),
]


def default_text(key: str) -> str:
    """A config key's default as its flag takes it ("" where there is none)."""
    value: Any = config.DEFAULTS
    for part in key.split("."):
        value = value[part]
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return "" if value == "" else str(value)


def _help(key: str, text: str) -> str:
    default = default_text(key)
    return f"{text} [default: {default}]" if default else text


def _param_name(key: str) -> str:
    return key.replace(".", "__")


def config_flags(func: F) -> F:
    """Add every config flag, each with its environment variable."""
    for flag, key, kind, text in reversed(_CONFIG_FLAGS):
        func = click.option(
            flag,
            _param_name(key),
            type=kind,
            default=None,
            envvar=env_name(flag),
            show_envvar=True,
            help=_help(key, text),
        )(func)
    return func


def config_options(func: F) -> F:
    """Add --config and every config flag."""
    return click.option(
        "--config",
        "config_file",
        type=click.Path(dir_okay=False, path_type=Path),
        default=None,
        envvar=env_name("--config"),
        show_envvar=True,
        help="YAML or JSON configuration file.",
    )(config_flags(func))


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
    """Settings from --config (or `file`), the flags and their environment variables."""
    return config.load(file or params.get("config_file"), _overrides(params))
