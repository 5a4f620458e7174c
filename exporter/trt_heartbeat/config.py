"""Configuration: YAML or JSON file, environment and flags, validated against a JSON Schema.

Precedence is flag > environment > file > default. Every error is one line that names the key
path (or file line) and what was expected; unknown keys are errors.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
import unicodedata
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from .backends import resolve_spec
from .engine_cache import default_cache_dir
from .errors import ConfigError, UnknownBackendError
from .state import BUCKET_SETS, HISTOGRAM_PHASES

# Labels the exporter sets itself (every label name in collector.py, and the histogram's and
# summary's own); a constant label of the same name would overwrite them.
RESERVED_LABELS = frozenset(
    {"gpu", "uuid", "result", "phase", "reason", "status", "backend", "model", "precision",
     "engine_sha256", "version", "python_version", "tensorrt_version", "cuda_driver_version",
     "driver_version", "le", "quantile", "source", "parent_gpu", "parent_uuid", "profile",
     "gpu_instance_id", "compute_instance_id", "type", "name", "pci_bus_id",
     "compute_capability"}
)  # fmt: skip
# Constant labels go on every series of every scrape: bounded, so a config cannot blow up
# /metrics (a 1 MiB label made a 69 MB scrape).
MAX_CONSTANT_LABELS = 32
MAX_LABEL_VALUE = 1024  # characters
MIN_TIMEOUT = 0.001  # seconds: the probe and NVML timers do not resolve less
RESERVED_PATHS = frozenset({"/", "/health", "/ping", "/probes"})

DEFAULTS: dict[str, Any] = {
    "backend": "auto",
    "precision": "fp32",
    "gpus": "all",
    "cuda_api": "cuda-python",
    "engine_cache_dir": "",
    "interval": "10s",
    "timeout": "5s",
    "startup_timeout": "5m",
    "latency_objective": "100ms",
    "gpu_memory_low_threshold": "512MiB",
    "jitter": 0.1,
    "history": 20,
    "constant_labels": {},
    "web": {
        "listen_address": ":9470",
        "telemetry_path": "/metrics",
        "hide_hardware_details": False,
        "config_file": "",
        "max_requests": 40,
    },
    "log": {"level": "info", "format": "text"},
    "nvml": {"enabled": "auto", "interval": "5s", "timeout": "2s"},
    "metrics": {"histogram_phases": list(HISTOGRAM_PHASES), "buckets": "default"},
}
DURATION_KEYS = ("interval", "timeout", "startup_timeout", "max_age", "latency_objective")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_SIZES = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}
_SIZE = re.compile(r"([0-9]+(?:\.[0-9]+)?)(B|KiB|MiB|GiB|TiB)")
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h)")
_SECONDS = re.compile(r"[0-9]+(?:\.[0-9]+)?")  # a plain number of seconds, as in a file
# Bounds that keep every number finite and meaningful: no timer runs for more than a year, no
# GPU has a pebibyte. Files larger, deeper or expanding further than these are refused unread.
MAX_SECONDS = 366 * 86400.0
MAX_BYTES = 1 << 50
MAX_FILE_BYTES = 1 << 20
MAX_DEPTH = 32
MAX_NODES = 10_000


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


def parse_duration(value: float | int | str) -> float:
    """Seconds from a number, a number written as text (a flag, an environment variable) or a
    Prometheus-style duration ("1m30s", "250ms"); finite and at most MAX_SECONDS."""
    try:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            seconds = float(value)
        else:
            text = str(value).strip()
            parts = _DURATION_PART.findall(text)
            if _SECONDS.fullmatch(text):
                seconds = float(text)
            elif parts and "".join(n + u for n, u in parts) == text:
                seconds = sum(float(n) * _UNITS[u] for n, u in parts)
            else:
                raise ValueError(f"invalid duration {value!r}")
    except OverflowError:
        raise ValueError(f"duration out of range: {value!r}") from None
    if not math.isfinite(seconds) or seconds > MAX_SECONDS:
        raise ValueError(f"duration out of range: {value!r}")
    return seconds


def parse_size(value: int | str) -> int:
    """Bytes from a number or a size with a binary unit ("512MiB"); at most MAX_BYTES."""
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    else:
        match = _SIZE.fullmatch(str(value).strip())
        if not match:
            raise ValueError(f"invalid size {value!r}")
        number = float(match.group(1))  # finite: the pattern has no exponent
        size = int(number * _SIZES[match.group(2)]) if number < MAX_BYTES else MAX_BYTES + 1
    if size > MAX_BYTES:
        raise ValueError(f"size out of range: {value!r}")
    return size


def format_size(size: int) -> str:
    for unit in ("TiB", "GiB", "MiB", "KiB"):
        if size and size % _SIZES[unit] == 0:
            return f"{size // _SIZES[unit]}{unit}"
    return str(size)


def format_duration(seconds: float) -> str:
    if seconds < 1 and (seconds * 1000).is_integer():
        return f"{int(seconds * 1000)}ms"
    for unit, size in (("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


@cache
def schema() -> dict[str, Any]:
    text = resources.files("trt_heartbeat").joinpath("config_schema.json").read_text()
    loaded: dict[str, Any] = json.loads(text)
    return loaded


class _Refused(yaml.MarkedYAMLError):
    """A document that is well-formed YAML but too deep or expanding too far to load."""


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys instead of silently keeping the last one, and
    documents nested deeper than MAX_DEPTH or expanding (aliases counted at every use: the
    "billion laughs") to more than MAX_NODES nodes, before anything is built from them."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._weight: dict[int, int] = {}

    def compose_node(self, parent: Any, index: Any) -> Any:
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                mark = self.peek_event().start_mark  # type: ignore[no-untyped-call]
                raise _Refused(None, None, f"nests deeper than {MAX_DEPTH} levels", mark)
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        if node is not None and id(node) not in self._weight:
            children: list[Any] = []
            if isinstance(node, yaml.SequenceNode):
                children = node.value
            elif isinstance(node, yaml.MappingNode):
                children = [n for pair in node.value for n in pair]
            weight = 1 + sum(self._weight.get(id(c), 1) for c in children)
            if weight > MAX_NODES:
                raise _Refused(None, None, f"expands to more than {MAX_NODES} values "
                               "(aliases count at every use)", node.start_mark)  # fmt: skip
            self._weight[id(node)] = weight
        return node


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def parse_yaml(text: str) -> Any:
    """YAML (or JSON) through the strict, bounded loader; yaml.YAMLError on any problem."""
    return yaml.load(text, Loader=_StrictLoader)


class NotRegularFileError(OSError):
    """A path that is a FIFO, a device, a socket or a directory: reading it could block for good."""


class FileTooLargeError(OSError):
    """A file larger than the reader takes."""


def read_regular(path: Path | str, limit: int = MAX_FILE_BYTES) -> bytes:
    """The contents of a regular file of at most `limit` bytes (FileTooLargeError past it).

    Opened without blocking and checked on the open descriptor, so a FIFO (or a path swapped
    for one after a check) is refused instead of hanging the reader: NotRegularFileError.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | getattr(os, "O_CLOEXEC", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotRegularFileError(f"not a regular file: {path}")
        os.set_blocking(fd, True)
        chunks, size = [], 0
        while size <= limit:
            chunk = os.read(fd, limit + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > limit:
            raise FileTooLargeError(f"{path}: larger than {limit >> 20} MiB")
        return b"".join(chunks)
    finally:
        os.close(fd)


def read_file(path: Path, what: str = "config file", keys: str = "configuration") -> dict[str, Any]:
    """Parse a YAML or JSON file into a mapping; errors call it `what`, its keys `keys`."""
    try:
        raw = read_regular(path)
    except NotRegularFileError as exc:
        raise ConfigError(f"{path}: cannot read {what}: not a regular file") from exc
    except FileTooLargeError as exc:
        raise ConfigError(f"{path}: {what} is larger than {MAX_FILE_BYTES >> 20} MiB") from exc
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read {what}: {exc.strerror or exc}") from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: {what} is not UTF-8 text") from exc
    try:
        document = parse_yaml(text)
    except _Refused as exc:
        where = f"line {exc.problem_mark.line + 1}: " if exc.problem_mark else ""
        raise ConfigError(f"{path}: {where}{what} {exc.problem}") from exc
    except yaml.MarkedYAMLError as exc:
        # Report where the construct began (an unclosed quote) when it differs from where the
        # parser gave up (the end of the file).
        mark = exc.context_mark or exc.problem_mark
        where = f"line {mark.line + 1}: " if mark else ""
        problem = " ".join(p for p in (exc.context, exc.problem) if p) or "syntax error"
        raise ConfigError(f"{path}: {where}invalid YAML: {problem}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from exc
    if document is None:
        return {}
    if not isinstance(document, dict):
        raise ConfigError(
            f"{path}: expected a mapping of {keys} keys at the top level, got {_kind(document)}"
        )
    return document


def _kind(value: Any) -> str:
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return json.dumps(value, default=str)


def _shown(value: Any) -> str:
    """A value as the user wrote it, if short; its kind otherwise."""
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else _kind(value)


def _key_path(path: Any) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _describe(error: jsonschema.ValidationError) -> str:
    node: dict[str, Any] = error.schema if isinstance(error.schema, dict) else {}
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        known = set(node.get("properties", {}))
        unknown = sorted(str(k) for k in error.instance if k not in known)
        path = [*error.absolute_path, unknown[0]] if unknown else list(error.absolute_path)
        hint = f" (expected one of: {', '.join(sorted(known))})" if known else ""
        return f"{_key_path(path)}: unknown key{hint}"
    if error.validator == "required" and isinstance(error.instance, dict):
        required: list[str] = list(node.get("required", []))
        missing = [k for k in required if k not in error.instance]
        return f"{_key_path([*error.absolute_path, missing[0]])}: required, but missing"
    if "propertyNames" in error.schema_path:
        expected = node.get("x-expected", "a valid key")
        return f"{_key_path([*error.absolute_path, error.instance])}: expected {expected}"
    expected = node.get("x-expected")
    if expected:
        return (
            f"{_key_path(error.absolute_path)}: expected {expected}, got {_shown(error.instance)}"
        )
    return f"{_key_path(error.absolute_path)}: {error.message}"


def _merge(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def validate(
    document: dict[str, Any], source: str = "", against: dict[str, Any] | None = None
) -> None:
    """Validate against the schema (the config's unless given); raise ConfigError naming the
    first problem."""
    prefix = f"{source}: " if source else ""
    for where, value in _numbers(document, []):
        if not math.isfinite(value):
            shown = {"nan": ".nan", "inf": ".inf", "-inf": "-.inf"}[str(value)]
            raise ConfigError(f"{prefix}{_key_path(where)}: expected a finite number, got {shown}")
    validator = jsonschema.Draft202012Validator(against or schema())
    errors = sorted(
        validator.iter_errors(document),
        key=lambda e: ([str(p) for p in e.absolute_path], str(e.validator)),
    )
    if errors:
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        prefix = f"{source}: " if source else ""
        raise ConfigError(f"{prefix}{_describe(errors[0])}{more}")


def _checked(parse: Any, value: Any, key: str, prefix: str) -> float:
    """A duration or size parsed, or the key's usual one-line error (out of range included)."""
    try:
        return float(parse(value))
    except ValueError:
        node = schema()["properties"].get(key) or schema()["$defs"]["duration"]
        expected = node.get("x-expected") or schema()["$defs"]["duration"]["x-expected"]
        raise ConfigError(f"{prefix}{key}: expected {expected}, got {_shown(value)}") from None


def _numbers(node: Any, where: list[Any]) -> Any:
    """(key path, value) of every float in a document."""
    if isinstance(node, float):
        yield where, node
    elif isinstance(node, dict):
        for key, value in node.items():
            yield from _numbers(value, [*where, key])
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _numbers(value, [*where, i])


def _metrics(
    section: dict[str, Any], prefix: str
) -> tuple[tuple[str, ...], tuple[float, ...], str]:
    """(histogram phases, bucket bounds, bucket set name) of a validated `metrics` section."""
    phases = tuple(section["histogram_phases"])
    if "total" not in phases:
        raise ConfigError(f"{prefix}metrics.histogram_phases: must include total (the latency "
                          "alerts and canary-judge read it)")  # fmt: skip
    chosen = section["buckets"]
    if isinstance(chosen, str):
        return phases, BUCKET_SETS[chosen], chosen
    bounds = tuple(_checked(parse_duration, b, f"metrics.buckets[{i}]", prefix)
                   for i, b in enumerate(chosen))  # fmt: skip
    if bounds[0] <= 0:
        expected = schema()["$defs"]["duration"]["x-expected"]
        shown = _shown(chosen[0])
        raise ConfigError(f"{prefix}metrics.buckets[0]: expected {expected}, got {shown}")
    for i in range(1, len(bounds)):
        if bounds[i] <= bounds[i - 1]:
            raise ConfigError(
                f"{prefix}metrics.buckets[{i}]: must be greater than metrics.buckets[{i - 1}] "
                f"({format_duration(bounds[i])} <= {format_duration(bounds[i - 1])})"
            )
    return phases, bounds, ""


def _at_least_1ms(seconds: dict[str, float], section: dict[str, Any], key: str,
                  prefix: str) -> None:  # fmt: skip
    if seconds[key] < MIN_TIMEOUT:
        raise ConfigError(f"{prefix}{key}: must be at least 1ms, got {_shown(section[key])}")


def _check_labels(labels: dict[str, str], prefix: str) -> None:
    """Constant labels: none the exporter sets, bounded in number and size, and values that
    are one line of text (the exposition would carry a raw CR as it is)."""
    clashes = sorted(RESERVED_LABELS & set(labels))
    if clashes:
        raise ConfigError(
            f"{prefix}constant_labels.{clashes[0]}: label is set by the exporter itself"
        )
    if len(labels) > MAX_CONSTANT_LABELS:
        raise ConfigError(f"{prefix}constant_labels: at most {MAX_CONSTANT_LABELS} labels, "
                          f"got {len(labels)}")  # fmt: skip
    for name, value in labels.items():
        if len(value) > MAX_LABEL_VALUE:
            raise ConfigError(f"{prefix}constant_labels.{name}: value longer than "
                              f"{MAX_LABEL_VALUE} characters ({len(value)})")  # fmt: skip
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
            raise ConfigError(f"{prefix}{key}: expected {expected}, got {_kind(merged[key])}")
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
    nvml_seconds = {key: _checked(parse_duration, nvml[key], f"nvml.{key}", prefix)
                    for key in ("interval", "timeout")}  # fmt: skip
    for key, value in nvml_seconds.items():
        if value <= 0:
            expected = schema()["$defs"]["duration"]["x-expected"]
            raise ConfigError(f"{prefix}nvml.{key}: expected {expected}, got {_kind(nvml[key])}")
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
        engine_cache_dir=merged["engine_cache_dir"],
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
