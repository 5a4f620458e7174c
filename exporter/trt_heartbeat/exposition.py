"""Renders /metrics, re-rendering only the parts whose state changed since the last scrape.

Formatting the targets' histograms is nearly all of a scrape's CPU (about 6 ms in client_python for
8 targets' 550 lines), while a probe changes one target's share of them. So each versioned
collector (one per target, one for the node) is rendered on its own and kept until its version
changes, the clock-derived families are rendered on every scrape, and the pieces are stitched into
one exposition with each metric family exactly once.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Protocol

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

_EOF = b"# EOF\n"  # OpenMetrics: once, at the very end
_HELP = b"# HELP "

# A rendered part: (family name, its # HELP/# TYPE/# UNIT lines, its sample lines), in order.
Fragments = list[tuple[bytes, bytes, bytes]]


class VersionedCollector(Collector, Protocol):
    def version(self) -> object:
        """Compares equal for as long as what `collect` yields is unchanged."""


def split_families(text: bytes) -> Fragments:
    """Cut a rendered exposition into its metric families.

    Both text formats start every family with its `# HELP` line and escape newlines inside HELP
    texts and label values, so a family is the run of lines from one `# HELP` to the next.
    """
    fragments: Fragments = []
    lines = text.removesuffix(_EOF).splitlines(keepends=True)
    i = 0
    while i < len(lines):
        name = lines[i][len(_HELP) :].split(b" ", 1)[0]
        j = i + 1
        while j < len(lines) and lines[j].startswith(b"# ") and not lines[j].startswith(_HELP):
            j += 1
        header_end = j
        while j < len(lines) and not lines[j].startswith(_HELP):
            j += 1
        fragments.append((name, b"".join(lines[i:header_end]), b"".join(lines[header_end:j])))
        i = j
    return fragments


def _registry(collector: Collector) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry


class Exposition:
    def __init__(self, stable: Sequence[VersionedCollector], live: Sequence[Collector]) -> None:
        self.collectors: tuple[Collector, ...] = (*stable, *live)
        self._stable = [(c.version, _registry(c)) for c in stable]
        self._live = CollectorRegistry(auto_describe=False)
        for collector in live:
            self._live.register(collector)
        self._lock = threading.Lock()
        # (content type, part index) -> (version, fragments)
        self._cache: dict[tuple[str, int], tuple[object, Fragments]] = {}
        self.renders = 0  # of stable parts, for tests and benchmarks

    def render(self, accept: str | None) -> tuple[bytes, str]:
        """The body for a scrape with this Accept header, and its content type."""
        encoder, content_type = choose_encoder(accept or "")
        # One render at a time: concurrent scrapers would only contend for the GIL, and
        # waiting on a lock costs them less than a GIL convoy does.
        with self._lock:
            parts = [self._part(encoder, content_type, i) for i in range(len(self._stable))]
            parts.append(split_families(encoder(self._live)))
            families: dict[bytes, list[bytes]] = {}
            for fragments in parts:
                for name, header, samples in fragments:
                    families.setdefault(name, [header]).append(samples)
            body = b"".join(b"".join(chunks) for chunks in families.values())
        return (body + _EOF if "openmetrics" in content_type else body), content_type

    def _part(self, encoder: Callable[[CollectorRegistry], bytes], content_type: str,
              index: int) -> Fragments:  # fmt: skip
        version_of, registry = self._stable[index]
        # Read the version before rendering: a change during the render shows up next time.
        version = version_of()
        cached = self._cache.get((content_type, index))
        if cached is None or cached[0] != version:
            cached = (version, split_families(encoder(registry)))
            self._cache[(content_type, index)] = cached
            self.renders += 1
        return cached[1]
