"""Service-traffic sources as data: one YAML file each, validated by source_schema.json.

Built-in sources are the files in `sources/`; a path names a custom source of the same shape.
Everything else (rules, dashboards, the judge) reads a `Source`, never a source's name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from .. import config
from ..errors import ConfigError
from ..promql import bad_matcher

SOURCES = resources.files("trt_heartbeat.service").joinpath("sources")
DEFAULT = "istio"
SCALE = {"seconds": 1.0, "milliseconds": 1e-3, "microseconds": 1e-6}


class SourceError(ConfigError):
    """An unknown source name, or a source file that is not a valid source."""


@dataclass(frozen=True)
class Counter:
    metrics: tuple[str, ...]
    matchers: str = ""

    def selector(self, *extra: str) -> str:
        """A series selector for all the counter's names, with the given extra matchers."""
        parts = [p for p in (self.matchers, *extra) if p]
        if len(self.metrics) == 1:
            return self.metrics[0] + "{" + ", ".join(parts) + "}"
        names = "|".join(self.metrics)
        return "{" + ", ".join([f'__name__=~"{names}"', *parts]) + "}"


@dataclass(frozen=True)
class Labels:
    service: str
    track: str
    namespace: str = ""
    by: tuple[str, ...] = ()

    def renames(self) -> dict[str, str]:
        """Normalised label -> the source's label, where they differ."""
        pairs = {"service": self.service, "track": self.track, "namespace": self.namespace}
        return {k: v for k, v in pairs.items() if v and k != v}

    def present(self) -> tuple[str, ...]:
        """Matchers that keep only series that say which service and track they belong to."""
        return (f'{self.service}!=""', f'{self.track}!=""')

    @property
    def keys(self) -> tuple[str, ...]:
        """The normalised labels series are aggregated to."""
        return ("namespace",) * bool(self.namespace) + ("service", "track", *self.by)


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


@cache
def schema() -> dict[str, Any]:
    text = resources.files("trt_heartbeat.service").joinpath("source_schema.json").read_text()
    loaded: dict[str, Any] = json.loads(text)
    return loaded


def builtin() -> list[str]:
    return sorted(p.name.removesuffix(".yaml") for p in SOURCES.iterdir()
                  if p.name.endswith(".yaml"))  # fmt: skip


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
        document = config.read_file(path, what="source file", keys="source")
        config.validate(document, str(path), against=schema())
    except ConfigError as exc:
        raise SourceError(str(exc)) from None
    for key, node in document.items():
        bad = bad_matcher(node.get("matchers", "")) if isinstance(node, dict) else None
        if bad is not None:
            raise SourceError(f'{path}: {key}.matchers: {bad!r} is not a label matcher like '
                              'name="value"')  # fmt: skip
    return parse(document, name_or_path)


def parse(doc: dict[str, Any], origin: str = "") -> Source:
    def counter(node: dict[str, Any]) -> Counter:
        metric = node["metric"]
        names = (metric,) if isinstance(metric, str) else tuple(metric)
        return Counter(names, node.get("matchers", ""))

    def labels(node: dict[str, Any]) -> Labels:
        return Labels(node["service"], node["track"], node.get("namespace", ""),
                      tuple(node.get("by", ())))  # fmt: skip

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
        if pods else None,
        drift=Drift(drift.get("classes", ""), drift.get("scores", ""), tuple(drift.get("by", ())))
        if drift else None,
        origin=origin or doc["name"],
    )  # fmt: skip
