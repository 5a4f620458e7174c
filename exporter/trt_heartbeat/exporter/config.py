"""Configuration: YAML or JSON file, environment and flags, validated against a JSON Schema.

Precedence is flag > environment > file > default. Every error is one line that names the key
path (or file line) and what was expected; unknown keys are errors.
"""

from __future__ import annotations

import copy
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trt_heartbeat import documents
from trt_heartbeat.documents import (
    format_duration,
    format_size,
    kind_of,
    load_schema,
    parse_duration,
    parse_size,
    read_file,
    shown,
)
from trt_heartbeat.domain import BUCKET_SETS, HISTOGRAM_PHASES
from trt_heartbeat.errors import ConfigError, UnknownBackendError
from trt_heartbeat.exporter.backends import resolve_spec
from trt_heartbeat.exporter.engine_cache import default_cache_dir

# Labels the exporter sets itself (every label name in collector.py, and the histogram's and
# summary's own); a constant label of the same name would overwrite them.
RESERVED_LABELS = frozenset(
    {
        "gpu",
        "uuid",
        "result",
        "phase",
        "reason",
        "status",
        "backend",
        "model",
        "precision",
        "engine_sha256",
        "version",
        "python_version",
        "tensorrt_version",
        "cuda_driver_version",
        "driver_version",
        "le",
        "quantile",
        "source",
        "parent_gpu",
        "parent_uuid",
        "profile",
        "gpu_instance_id",
        "compute_instance_id",
        "type",
        "name",
        "pci_bus_id",
        "compute_capability",
    }
)
# Constant labels go on every series of every scrape: bounded, so a config cannot blow up
# /metrics (a 1 MiB label made a 69 MB scrape).
MAX_CONSTANT_LABELS = 32
MAX_LABEL_VALUE = 1024  # characters
MIN_TIMEOUT = 0.001  # seconds: the probe and NVML timers do not resolve less
RESERVED_PATHS = frozenset({"/", "/health", "/ping", "/probes"})


def schema() -> dict[str, Any]:
    return load_schema("trt_heartbeat.exporter", "config_schema.json")


def _defaults(node: dict[str, Any]) -> dict[str, Any]:
    """The `default` of every key in a schema's properties, nested as the document is."""
    out: dict[str, Any] = {}
    for key, child in node.get("properties", {}).items():
        if "properties" in child:
            out[key] = _defaults(child)
        elif "default" in child:
            out[key] = copy.deepcopy(child["default"])  # never the cached schema's own
    return out


# Every key's default, from the schema (its one home: editors show it, the flags' help shows
# it). Two are computed instead: max_age (three intervals) and engine_cache_dir (under
# $XDG_CACHE_HOME, which `check-config` prints).
DEFAULTS: dict[str, Any] = _defaults(schema())
DURATION_KEYS = ("interval", "timeout", "startup_timeout", "max_age", "latency_objective")


@dataclass(frozen=True)
class Settings:
    backend: str
    precision: str
    gpus: str | list[int | str]
    cuda_api: str
    engine_cache_dir: str  # "" means the default under $XDG_CACHE_HOME
    interval: float
    timeout: float
    startup_timeout: float
    max_age: float
    latency_objective: float
    jitter: float
    history: int
    listen_host: str
    listen_port: int
    telemetry_path: str
    hide_hardware_details: bool
    web_config_file: str  # "" for plain HTTP without authentication
    max_requests: int
    log_level: str
    log_format: str
    gpu_memory_low_threshold: int  # bytes
    nvml_enabled: str | bool  # "auto": only where a GPU is visible
    nvml_interval: float
    nvml_timeout: float
    histogram_phases: tuple[str, ...] = HISTOGRAM_PHASES  # phases with a duration histogram
    buckets: tuple[float, ...] = BUCKET_SETS["default"]
    bucket_set: str = "default"  # the name the buckets were chosen by, "" for an explicit list
    constant_labels: dict[str, str] = field(default_factory=dict)
    source: str = ""  # the config file, if any

    @property
    def listen_address(self) -> str:
        host = f"[{self.listen_host}]" if ":" in self.listen_host else self.listen_host
        return f"{host}:{self.listen_port}"

    def effective(self) -> dict[str, Any]:
        """The configuration as a document that loads back to these settings."""
        return {
            "backend": self.backend,
            "precision": self.precision,
            "gpus": self.gpus if isinstance(self.gpus, str) else list(self.gpus),
            "cuda_api": self.cuda_api,
            "engine_cache_dir": self.engine_cache_dir or default_cache_dir(),
            "interval": format_duration(self.interval),
            "timeout": format_duration(self.timeout),
            "startup_timeout": format_duration(self.startup_timeout),
            "max_age": format_duration(self.max_age),
            "latency_objective": format_duration(self.latency_objective),
            "gpu_memory_low_threshold": format_size(self.gpu_memory_low_threshold),
            "jitter": self.jitter,
            "history": self.history,
            "constant_labels": dict(self.constant_labels),
            "web": {
                "listen_address": self.listen_address,
                "telemetry_path": self.telemetry_path,
                "hide_hardware_details": self.hide_hardware_details,
                "config_file": self.web_config_file,
                "max_requests": self.max_requests,
            },
            "log": {"level": self.log_level, "format": self.log_format},
            "nvml": {
                "enabled": self.nvml_enabled,
                "interval": format_duration(self.nvml_interval),
                "timeout": format_duration(self.nvml_timeout),
            },
            "metrics": {
                "histogram_phases": list(self.histogram_phases),
                "buckets": self.bucket_set or [format_duration(b) for b in self.buckets],
            },
        }


def validate(document: dict[str, Any], source: str = "") -> None:
    """Validate a config document (or the flags' overrides); ConfigError names the first
    problem."""
    documents.validate(document, schema(), source)


def _merge(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _checked(parse: Any, value: Any, key: str, prefix: str) -> float:
    """A duration or size parsed, or the key's usual one-line error (out of range included)."""
    try:
        return float(parse(value))
    except ValueError:
        node = schema()["properties"].get(key) or schema()["$defs"]["duration"]
        expected = node.get("x-expected") or schema()["$defs"]["duration"]["x-expected"]
        raise ConfigError(f"{prefix}{key}: expected {expected}, got {shown(value)}") from None


def _metrics(
    section: dict[str, Any], prefix: str
) -> tuple[tuple[str, ...], tuple[float, ...], str]:
    """(histogram phases, bucket bounds, bucket set name) of a validated `metrics` section."""
    phases = tuple(section["histogram_phases"])
    if "total" not in phases:
        raise ConfigError(
            f"{prefix}metrics.histogram_phases: must include total (the latency "
            "alerts and canary-judge read it)"
        )
    chosen = section["buckets"]
    if isinstance(chosen, str):
        return phases, BUCKET_SETS[chosen], chosen
    bounds = tuple(
        _checked(parse_duration, b, f"metrics.buckets[{i}]", prefix) for i, b in enumerate(chosen)
    )
    if bounds[0] <= 0:
        expected = schema()["$defs"]["duration"]["x-expected"]
        got = shown(chosen[0])
        raise ConfigError(f"{prefix}metrics.buckets[0]: expected {expected}, got {got}")
    for i in range(1, len(bounds)):
        if bounds[i] <= bounds[i - 1]:
            raise ConfigError(
                f"{prefix}metrics.buckets[{i}]: must be greater than metrics.buckets[{i - 1}] "
                f"({format_duration(bounds[i])} <= {format_duration(bounds[i - 1])})"
            )
    return phases, bounds, ""


def _at_least_1ms(
    seconds: dict[str, float], section: dict[str, Any], key: str, prefix: str
) -> None:
    if seconds[key] < MIN_TIMEOUT:
        raise ConfigError(f"{prefix}{key}: must be at least 1ms, got {shown(section[key])}")


def _check_labels(labels: dict[str, str], prefix: str) -> None:
    """Constant labels: none the exporter sets, bounded in number and size, and values that
    are one line of text (the exposition would carry a raw CR as it is)."""
    clashes = sorted(RESERVED_LABELS & set(labels))
    if clashes:
        raise ConfigError(
            f"{prefix}constant_labels.{clashes[0]}: label is set by the exporter itself"
        )
    if len(labels) > MAX_CONSTANT_LABELS:
        raise ConfigError(
            f"{prefix}constant_labels: at most {MAX_CONSTANT_LABELS} labels, got {len(labels)}"
        )
    for name, value in labels.items():
        if len(value) > MAX_LABEL_VALUE:
            raise ConfigError(
                f"{prefix}constant_labels.{name}: value longer than "
                f"{MAX_LABEL_VALUE} characters ({len(value)})"
            )
        bad = next((c for c in value if unicodedata.category(c) in ("Cc", "Zl", "Zp")), None)
        if bad is not None:
            raise ConfigError(
                f"{prefix}constant_labels.{name}: control character U+{ord(bad):04X} in the "
                "value (expected one line of text)"
            )


def _listen(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def load(path: Path | None = None, overrides: dict[str, Any] | None = None) -> Settings:
    """Build Settings from an optional file and overrides (flags and environment, nested)."""
    source = str(path) if path else ""
    document = read_file(path) if path else {}
    validate(document, source)
    if overrides:
        validate(overrides, "flags")
        document = _merge(document, overrides)
    merged = _merge(DEFAULTS, document)
    prefix = f"{source}: " if source else ""

    seconds: dict[str, float] = {}
    for key in DURATION_KEYS:
        if key not in merged:
            continue
        value = _checked(parse_duration, merged[key], key, prefix)
        if value <= 0:
            expected = schema()["$defs"]["duration"]["x-expected"]
            raise ConfigError(f"{prefix}{key}: expected {expected}, got {kind_of(merged[key])}")
        seconds[key] = value
    seconds.setdefault("max_age", 3 * seconds["interval"])
    _at_least_1ms(seconds, merged, "timeout", prefix)

    if seconds["timeout"] >= seconds["interval"]:
        raise ConfigError(
            f"{prefix}timeout: must be shorter than interval ({format_duration(seconds['timeout'])}"
            f" >= {format_duration(seconds['interval'])})"
        )
    if seconds["max_age"] < seconds["interval"]:
        raise ConfigError(
            f"{prefix}max_age: must be at least one interval ({format_duration(seconds['max_age'])}"
            f" < {format_duration(seconds['interval'])})"
        )
    if merged["backend"] != "auto":
        try:
            resolve_spec(merged["backend"])
        except UnknownBackendError as exc:
            raise ConfigError(f"{prefix}backend: {exc}") from exc
    nvml = merged["nvml"]
    nvml_seconds = {
        key: _checked(parse_duration, nvml[key], f"nvml.{key}", prefix)
        for key in ("interval", "timeout")
    }
    for key, value in nvml_seconds.items():
        if value <= 0:
            expected = schema()["$defs"]["duration"]["x-expected"]
            raise ConfigError(f"{prefix}nvml.{key}: expected {expected}, got {kind_of(nvml[key])}")
    _at_least_1ms(nvml_seconds, nvml, "timeout", f"{prefix}nvml.")
    if nvml_seconds["timeout"] >= nvml_seconds["interval"]:
        raise ConfigError(
            f"{prefix}nvml.timeout: must be shorter than nvml.interval "
            f"({format_duration(nvml_seconds['timeout'])} >= "
            f"{format_duration(nvml_seconds['interval'])})"
        )
    _check_labels(merged["constant_labels"], prefix)
    web = merged["web"]
    host, port = _listen(web["listen_address"])
    if port > 65535:
        raise ConfigError(f"{prefix}web.listen_address: port {port} is out of range (0-65535)")
    if web["telemetry_path"] in RESERVED_PATHS:
        raise ConfigError(
            f"{prefix}web.telemetry_path: {web['telemetry_path']} is used by another endpoint"
        )
    phases, buckets, bucket_set = _metrics(merged["metrics"], prefix)
    return Settings(
        backend=merged["backend"],
        precision=merged["precision"],
        gpus=merged["gpus"],
        cuda_api=merged["cuda_api"],
        engine_cache_dir=merged.get("engine_cache_dir", ""),
        interval=seconds["interval"],
        timeout=seconds["timeout"],
        startup_timeout=seconds["startup_timeout"],
        max_age=seconds["max_age"],
        latency_objective=seconds["latency_objective"],
        jitter=float(merged["jitter"]),
        history=int(merged["history"]),
        listen_host=host,
        listen_port=port,
        telemetry_path=web["telemetry_path"],
        hide_hardware_details=bool(web["hide_hardware_details"]),
        web_config_file=web["config_file"],
        max_requests=int(web["max_requests"]),
        log_level=merged["log"]["level"],
        log_format=merged["log"]["format"],
        gpu_memory_low_threshold=int(
            _checked(
                parse_size, merged["gpu_memory_low_threshold"], "gpu_memory_low_threshold", prefix
            )
        ),
        nvml_enabled=nvml["enabled"],
        nvml_interval=nvml_seconds["interval"],
        nvml_timeout=nvml_seconds["timeout"],
        histogram_phases=phases,
        buckets=buckets,
        bucket_set=bucket_set,
        constant_labels=dict(merged["constant_labels"]),
        source=source,
    )
