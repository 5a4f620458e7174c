"""Renders /metrics as cached bytes: rebuilt only where the state changed since the last scrape.

Formatting the targets' histograms is nearly all of a scrape's CPU (docs/performance.md has the
figures), while a probe changes one target's share of them. So each versioned
collector (one per target, one for the node) is rendered on its own and kept until its version
changes, and the stitched body of all of them is kept, plain and compressed, until any changes.
A scrape between changes writes those bytes plus a short tail: the clock-derived families (the
heartbeat age, health), whose values are filled into a kept template on every scrape, and the
process metrics, read at most once per second.
"""

from __future__ import annotations

import re
import struct
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, cast

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.exposition import generate_latest as _generate_text
from prometheus_client.openmetrics.exposition import CONTENT_TYPE_LATEST as CONTENT_TYPE_OPENMETRICS
from prometheus_client.openmetrics.exposition import generate_latest as _generate_openmetrics
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

_go_float = cast(Callable[[float], str], floatToGoString)  # untyped in client_python

_EOF = b"# EOF\n"  # OpenMetrics: once, at the very end
_HELP = b"# HELP "

Encoder = Callable[[CollectorRegistry], bytes]


def _openmetrics_1_0_0(registry: CollectorRegistry) -> bytes:
    return cast(bytes, _generate_openmetrics(registry, version="1.0.0"))  # type: ignore[no-untyped-call]


# The only formats served, and so the only cache keys: the Prometheus text format 0.0.4 and
# OpenMetrics 1.0.0. Every metric and label name here is a legacy one, so escaping schemes and
# the text format 1.0.0 would render the same bytes; no part of the request is ever copied into
# the content type.
TEXT = CONTENT_TYPE_PLAIN_0_0_4
OPENMETRICS = CONTENT_TYPE_OPENMETRICS
_ENCODERS: dict[str, Encoder] = {
    TEXT: cast(Encoder, _generate_text),
    OPENMETRICS: _openmetrics_1_0_0,
}
_VERSION = re.compile(r"[0-9]{1,9}(?:\.[0-9]{1,9}){0,2}")


def negotiate(accept: str | None) -> str:
    """The served content type for an Accept header: OpenMetrics 1.0.0 where the first entry
    naming a served format asks for OpenMetrics (no version, or a version of 1 or later), the
    text format otherwise. Any header, however malformed, gets an answer."""
    for entry in (accept or "")[:4096].split(","):
        media, *params = entry.split(";")
        kind = media.strip().lower()
        if kind == "text/plain":
            return TEXT
        if kind != "application/openmetrics-text":
            continue
        version = ""
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "version":
                version = value.strip()
                break
        if not version:
            return OPENMETRICS
        if _VERSION.fullmatch(version) and int(version.split(".")[0]) >= 1:
            return OPENMETRICS
        # OpenMetrics 0.0.1 or a version that is not one: the next entry decides.
    return TEXT


# A rendered part: (family name, its # HELP/# TYPE/# UNIT lines, its sample lines), in order.
Fragments = list[tuple[bytes, bytes, bytes]]


class VersionedCollector(Collector, Protocol):
    def version(self) -> object:
        """Compares equal for as long as what `collect` yields is unchanged."""


class ValuedCollector(Collector, Protocol):
    def values(self) -> list[float]:
        """The values of the samples `collect` yields now, in the same order; the series
        themselves (names, labels) stay the same for as long as their number does."""


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


class _Template:
    """A collector's rendering with its sample values left out: a new render costs a few string
    joins, as long as the collector yields the same series in the same order."""

    def __init__(self, text: bytes) -> None:
        self.pieces: list[bytes] = []  # header lines, and sample lines up to their value
        self.samples = 0
        for line in text.splitlines(keepends=True):
            if line.startswith(b"#"):
                self.pieces.append(line)
            else:
                self.pieces.append(line.rsplit(b" ", 1)[0] + b" ")
                self.samples += 1

    def fill(self, values: Sequence[float]) -> bytes:
        out, it = [], iter(values)
        for piece in self.pieces:
            out.append(
                piece if piece.startswith(b"#") else piece + _go_float(next(it)).encode() + b"\n"
            )
        return b"".join(out)


# A gzip member's header: deflate, no name, no time, unknown OS (RFC 1952).
_GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"
_STORED_MAX = 0xFFFF  # bytes in one stored deflate block


class GzipMember:
    """One gzip member of `stable + tail` for any tail, at the cost of a CRC of the tail.

    The stable part is compressed once and ends on a byte boundary (a sync flush); each scrape's
    tail follows it in stored deflate blocks, with the member's CRC carried on from the stable
    part. Compressing the tail instead costs more CPU per scrape than the bytes it saves on the
    wire are worth (docs/performance.md).
    """

    def __init__(self, stable: bytes) -> None:
        stream = zlib.compressobj(1, zlib.DEFLATED, -zlib.MAX_WBITS)
        self.head = _GZIP_HEADER + stream.compress(stable) + stream.flush(zlib.Z_SYNC_FLUSH)
        self.crc, self.size = zlib.crc32(stable), len(stable)

    def member(self, tail: bytes) -> bytes:
        blocks = [self.head]
        for start in range(0, max(len(tail), 1), _STORED_MAX):
            chunk = tail[start : start + _STORED_MAX]
            final = start + _STORED_MAX >= len(tail)
            blocks += [struct.pack("<BHH", final, len(chunk), len(chunk) ^ 0xFFFF), chunk]
        crc, size = zlib.crc32(tail, self.crc), (self.size + len(tail)) & 0xFFFFFFFF
        blocks.append(struct.pack("<II", crc, size))
        return b"".join(blocks)


@dataclass
class _Body:
    versions: tuple[object, ...]
    stable: bytes
    gzip: GzipMember | None = None  # the stable part compressed, built at the first gzip scrape


class Exposition:
    def __init__(
        self,
        stable: Sequence[VersionedCollector],
        clock: ValuedCollector,
        slow: Sequence[Collector] = (),
        monotonic: Callable[[], float] = time.monotonic,
        slow_ttl: float = 1.0,
    ) -> None:
        self.collectors: tuple[Collector, ...] = (*stable, clock, *slow)
        self._stable = [(c.version, _registry(c)) for c in stable]
        self._clock, self._clock_registry = clock, _registry(clock)
        self._slow = CollectorRegistry(auto_describe=False)
        for collector in slow:
            self._slow.register(collector)
        self._monotonic, self._slow_ttl = monotonic, slow_ttl
        self._lock = threading.Lock()
        # Keyed by the served content type (TEXT or OPENMETRICS): bounded whatever clients send.
        # (content type, part index) -> (version, fragments)
        self._cache: dict[tuple[str, int], tuple[object, Fragments]] = {}
        self._bodies: dict[str, _Body] = {}
        self._templates: dict[str, _Template] = {}
        self._slow_cache: dict[str, tuple[float, bytes]] = {}
        self.renders = 0  # of stable parts, for tests and benchmarks

    def render(self, accept: str | None, gzip: bool = False) -> tuple[bytes, str]:
        """The body for a scrape with this Accept header, and its content type; gzip-compressed
        (one gzip member) when asked."""
        content_type = negotiate(accept)
        encoder = _ENCODERS[content_type]
        # One render at a time: concurrent scrapers would only contend for the GIL, and
        # waiting on a lock costs them less than a GIL convoy does.
        with self._lock:
            body = self._stable_body(encoder, content_type)
            tail = self._clock_part(encoder, content_type) + self._slow_part(encoder, content_type)
            if "openmetrics" in content_type:
                tail += _EOF
            if not gzip:
                return body.stable + tail, content_type
            if body.gzip is None:
                body.gzip = GzipMember(body.stable)
            return body.gzip.member(tail), content_type

    def _stable_body(
        self, encoder: Callable[[CollectorRegistry], bytes], content_type: str
    ) -> _Body:
        # Read the versions before rendering: a change during the render shows up next time.
        versions = tuple(version_of() for version_of, _ in self._stable)
        body = self._bodies.get(content_type)
        if body is None or body.versions != versions:
            families: dict[bytes, list[bytes]] = {}
            for index, version in enumerate(versions):
                for name, header, samples in self._part(encoder, content_type, index, version):
                    families.setdefault(name, [header]).append(samples)
            stitched = b"".join(b"".join(chunks) for chunks in families.values())
            body = self._bodies[content_type] = _Body(versions, stitched)
        return body

    def _part(
        self,
        encoder: Callable[[CollectorRegistry], bytes],
        content_type: str,
        index: int,
        version: object,
    ) -> Fragments:
        cached = self._cache.get((content_type, index))
        if cached is None or cached[0] != version:
            cached = (version, split_families(encoder(self._stable[index][1])))
            self._cache[(content_type, index)] = cached
            self.renders += 1
        return cached[1]

    def _clock_part(
        self, encoder: Callable[[CollectorRegistry], bytes], content_type: str
    ) -> bytes:
        values = self._clock.values()
        template = self._templates.get(content_type)
        if template is None or template.samples != len(values):
            text = encoder(self._clock_registry).removesuffix(_EOF)
            self._templates[content_type] = _Template(text)
            return text
        return template.fill(values)

    def _slow_part(self, encoder: Callable[[CollectorRegistry], bytes], content_type: str) -> bytes:
        now = self._monotonic()
        cached = self._slow_cache.get(content_type)
        if cached is None or now - cached[0] >= self._slow_ttl:
            cached = (now, encoder(self._slow).removesuffix(_EOF))
            self._slow_cache[content_type] = cached
        return cached[1]
