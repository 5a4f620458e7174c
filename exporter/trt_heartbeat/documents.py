"""Reading the documents users write: strict, bounded YAML/JSON, durations and sizes, and
schema validation with one-line errors that name the key path.

A leaf shared by both products (the exporter's config and web config, the rollout guard's
sources): it imports nothing of the package but `errors`.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from trt_heartbeat.errors import ConfigError

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


def positive_duration(value: float | int | str) -> float:
    """parse_duration that also refuses zero and negative values (ValueError): what a flag
    naming a time span takes."""
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError(f"not a positive duration: {value!r}")
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
def load_schema(package: str, name: str) -> dict[str, Any]:
    """A JSON Schema shipped as package data."""
    loaded: dict[str, Any] = json.loads(resources.files(package).joinpath(name).read_text())
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
                raise _Refused(
                    None,
                    None,
                    f"expands to more than {MAX_NODES} values (aliases count at every use)",
                    node.start_mark,
                )
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
            f"{path}: expected a mapping of {keys} keys at the top level, got {kind_of(document)}"
        )
    return document


def kind_of(value: Any) -> str:
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return json.dumps(value, default=str)


def shown(value: Any) -> str:
    """A value as the user wrote it, if short; its kind otherwise."""
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else kind_of(value)


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
        return f"{_key_path(error.absolute_path)}: expected {expected}, got {shown(error.instance)}"
    return f"{_key_path(error.absolute_path)}: {error.message}"


def validate(document: dict[str, Any], against: dict[str, Any], source: str = "") -> None:
    """Validate against a JSON Schema; raise ConfigError naming the first problem."""
    prefix = f"{source}: " if source else ""
    for where, value in _numbers(document, []):
        if not math.isfinite(value):
            shown = {"nan": ".nan", "inf": ".inf", "-inf": "-.inf"}[str(value)]
            raise ConfigError(f"{prefix}{_key_path(where)}: expected a finite number, got {shown}")
    validator = jsonschema.Draft202012Validator(against)
    errors = sorted(
        validator.iter_errors(document),
        key=lambda e: ([str(p) for p in e.absolute_path], str(e.validator)),
    )
    if errors:
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        prefix = f"{source}: " if source else ""
        raise ConfigError(f"{prefix}{_describe(errors[0])}{more}")


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
