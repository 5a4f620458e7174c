"""Service-traffic sources as data: one YAML file each, validated by source_schema.json.

Built-in sources are the files in `sources/`; a path names a custom source of the same shape.
Everything else (rules, dashboards, the judge) reads a `Source`, never a source's name.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from trt_heartbeat import documents
from trt_heartbeat.canary.promql import bad_matcher
from trt_heartbeat.errors import ConfigError

SOURCES = resources.files("trt_heartbeat.canary.guard").joinpath("sources")
DEFAULT = "istio"
SCALE = {"seconds": 1.0, "milliseconds": 1e-3, "microseconds": 1e-6}


class SourceError(ConfigError):
    """An unknown source name, or a source file that is not a valid source."""


@dataclass(frozen=True)
class Counter:
    metrics: tuple[str, ...]
    matchers: tuple[str, ...] = ("",)  # several sets: each counted once, never overlapping

    def selectors(self, *extra: str) -> list[str]:
        """One selector per metric name and matcher set, with the given extra matchers."""
        return [selector(m, matchers, *extra) for m in self.metrics for matchers in self.matchers]


def selector(metric: str, *matchers: str) -> str:
    """`metric{matchers...}`, empty matcher sets left out."""
    return metric + "{" + ", ".join(m for m in matchers if m) + "}"


@dataclass(frozen=True)
class FromLabel:
    """A normalised label taken from a source label, whole or through an anchored RE2 regex
    whose first group is the value (Flagger: `(.+?)(?:-primary)?` strips the primary suffix)."""

    label: str
    regex: str = ""


@dataclass(frozen=True)
class Roles:
    """The role a series' version holds, read from one of its labels: values matching `stable`
    are the stable role, the others matching `canary` the canary."""

    label: str
    stable: str
    canary: str


@dataclass(frozen=True)
class Labels:
    service: FromLabel
    version: FromLabel
    namespace: FromLabel | None = None
    by: tuple[str, ...] = ()
    track: Roles | str | None = None  # Roles on request series; a label name on pods

    def renames(self) -> dict[str, FromLabel]:
        """Normalised label -> where it comes from, where that is not the label itself."""
        pairs = {
            "service": self.service,
            "version": self.version,
            "namespace": self.namespace,
            "track": FromLabel(self.track) if isinstance(self.track, str) else None,
        }
        return {k: v for k, v in pairs.items() if v and (k != v.label or v.regex)}

    def present(self) -> tuple[str, ...]:
        """Matchers that keep only series that say which service and version they belong to."""
        return (f'{self.service.label}!=""', f'{self.version.label}!=""')

    @property
    def keys(self) -> tuple[str, ...]:
        """The normalised labels series are aggregated to."""
        return (
            ("cluster",) + ("namespace",) * bool(self.namespace) + ("service", "version", *self.by)
        )


@dataclass(frozen=True)
class Latency:
    unit: str
    histogram: str = ""
    sum: str = ""
    count: str = ""
    matchers: str = ""

    @property
    def scale(self) -> float:
        return SCALE[self.unit]


@dataclass(frozen=True)
class Drift:
    classes: str = ""
    scores: str = ""
    by: tuple[str, ...] = ()


@dataclass(frozen=True)
class Pods:
    labels: Labels
    presence: str = ""
    gpu_memory: str = ""


@dataclass(frozen=True)
class Source:
    name: str
    description: str
    requests: Counter
    errors: Counter
    latency: Latency
    labels: Labels
    pods: Pods | None = None
    drift: Drift | None = None
    origin: str = ""  # built-in name or file path, for messages


def schema() -> dict[str, Any]:
    return documents.load_schema("trt_heartbeat.canary.guard", "source_schema.json")


def builtin() -> list[str]:
    return sorted(
        p.name.removesuffix(".yaml") for p in SOURCES.iterdir() if p.name.endswith(".yaml")
    )


def load(name_or_path: str) -> Source:
    """A built-in source by name, or a source file by path; one-line SourceError otherwise."""
    if name_or_path in builtin():
        path = Path(str(SOURCES.joinpath(name_or_path + ".yaml")))
    elif name_or_path.endswith((".yaml", ".yml", ".json")) or "/" in name_or_path:
        path = Path(name_or_path)
    else:
        raise SourceError(
            f"unknown source {name_or_path!r} (built in: {', '.join(builtin())}; "
            "or the path of a source file)"
        )
    try:
        document = documents.read_file(path, what="source file", keys="source")
        documents.validate(document, schema(), str(path))
    except ConfigError as exc:
        raise SourceError(str(exc)) from None
    for key, node in document.items():
        sets = _tuple(node.get("matchers", "")) if isinstance(node, dict) else ()
        bad = next((b for b in map(bad_matcher, sets) if b is not None), None)
        if bad is not None:
            raise SourceError(
                f'{path}: {key}.matchers: {bad!r} is not a label matcher like name="value"'
            )
    for key, regex in _regexes(document):
        try:
            re.compile(regex)
        except re.error as exc:
            raise SourceError(
                f"{path}: {key}: {regex!r} is not a regular expression ({exc})"
            ) from None
    return parse(document, name_or_path)


def _regexes(document: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(key path, regex) of every regular expression in a validated source document."""
    for block in ("labels", "pods"):
        for name, node in document.get(block, {}).items():
            if isinstance(node, dict):
                for field in ("regex", "stable", "canary"):
                    if field in node:
                        yield f"{block}.{name}.{field}", node[field]


def _tuple(value: str | list[str]) -> tuple[str, ...]:
    return (value,) if isinstance(value, str) else tuple(value)


def parse(doc: dict[str, Any], origin: str = "") -> Source:
    def counter(node: dict[str, Any]) -> Counter:
        return Counter(_tuple(node["metric"]), _tuple(node.get("matchers", "")))

    def label(node: str | dict[str, str]) -> FromLabel:
        return FromLabel(node) if isinstance(node, str) else FromLabel(**node)

    def labels(node: dict[str, Any]) -> Labels:
        track = node.get("track")
        return Labels(
            service=label(node["service"]),
            version=label(node["version"]),
            namespace=label(node["namespace"]) if "namespace" in node else None,
            by=tuple(node.get("by", ())),
            track=Roles(**track) if isinstance(track, dict) else track,
        )

    pods = doc.get("pods")
    drift = doc.get("drift")
    return Source(
        name=doc["name"],
        description=doc.get("description", ""),
        requests=counter(doc["requests"]),
        errors=counter(doc["errors"]),
        latency=Latency(**doc["latency"]),
        labels=labels(doc["labels"]),
        pods=Pods(labels(pods), pods.get("presence", ""), pods.get("gpu_memory", ""))
        if pods
        else None,
        drift=Drift(drift.get("classes", ""), drift.get("scores", ""), tuple(drift.get("by", ())))
        if drift
        else None,
        origin=origin or doc["name"],
    )
