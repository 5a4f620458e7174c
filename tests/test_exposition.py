"""/metrics rendering: parts re-rendered only when their state changes, stitched into one valid
exposition in both formats, with the clock-derived families fresh on every scrape."""

from __future__ import annotations

import gzip
import subprocess
import zlib

import pytest
from hypothesis import given
from hypothesis import settings as settings_
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest
from prometheus_client.openmetrics import parser as om_parser
from prometheus_client.parser import text_string_to_metric_families

from conftest import require, settings
from trt_heartbeat.domain import EngineInfo, Target
from trt_heartbeat.exporter.app import Exporter
from trt_heartbeat.exporter.state import ProbeRecord
from trt_heartbeat.exporter.web.exposition import GzipMember, split_families

OPENMETRICS = "application/openmetrics-text; version=1.0.0"


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def exporter(targets: int = 3) -> tuple[Exporter, Clock]:
    clock = Clock()
    s = settings(backend="reference", interval=10, timeout=5)
    ex = Exporter(
        s, "reference", [Target(str(i), f"GPU-{i}") for i in range(targets)], wall_clock=clock
    )
    for state in ex.scheduler.states:
        state.engine_loaded(EngineInfo("reference", "fp32", "canonical-mlp-v1@x"), 0.01)
    return ex, clock


def probe(ex: Exporter, target: int, at: float, total: float = 0.002) -> None:
    ex.scheduler.states[target].record(
        ProbeRecord(at, "success", {"total": total, "compute": total / 2}, max_abs_error=0.0)
    )


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(body: bytes, openmetrics: bool = False) -> Samples:
    parse = (
        om_parser.text_string_to_metric_families if openmetrics else text_string_to_metric_families
    )
    out = {}
    for family in parse(body.decode()):
        for s in family.samples:
            if not s.name.startswith("process_"):  # they move on their own between renders
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_every_family_appears_once_in_both_formats() -> None:
    ex, clock = exporter()
    for i in range(3):
        probe(ex, i, clock.now - 1)
    for accept, om in ((None, False), (OPENMETRICS, True)):
        body, content_type = ex.render_metrics(accept)
        assert ("openmetrics" in content_type) is om
        names = [name for name, _, _ in split_families(body)]
        assert len(names) == len(set(names)), "a family was split across the body"
        # The strict OpenMetrics parser rejects interleaved families and a misplaced EOF.
        assert samples(body, openmetrics=om)
        assert body.count(b"# EOF") == (1 if om else 0)
        assert not om or body.endswith(b"# EOF\n")


def test_stitched_body_holds_exactly_the_samples_of_its_parts() -> None:
    ex, clock = exporter()
    for i in range(3):
        probe(ex, i, clock.now - 1)
    body, _ = ex.render_metrics(None)
    expected: Samples = {}
    for collector in ex.exposition.collectors:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(collector)
        expected.update(samples(generate_latest(registry)))
    assert samples(body) == expected
    count = (
        "trt_heartbeat_probe_duration_seconds_count",
        (("gpu", "1"), ("phase", "total"), ("uuid", "GPU-1")),
    )
    assert samples(body)[count] == 1


def test_only_the_part_that_changed_is_rendered_again() -> None:
    ex, clock = exporter(targets=4)
    ex.render_metrics(None)
    first = ex.exposition.renders
    assert first == 5  # the node and four targets
    ex.render_metrics(None)
    assert ex.exposition.renders == first
    probe(ex, 2, clock.now)
    body, _ = ex.render_metrics(None)
    assert ex.exposition.renders == first + 1
    key = ("trt_heartbeat_probes_total", (("gpu", "2"), ("result", "success"), ("uuid", "GPU-2")))
    assert samples(body)[key] == 1
    # Each format keeps its own rendering.
    ex.render_metrics(OPENMETRICS)
    assert ex.exposition.renders == 2 * first + 1


def test_worker_reload_refreshes_the_node_part() -> None:
    ex, _ = exporter(targets=1)
    ex.render_metrics(None)
    renders = ex.exposition.renders
    engine = EngineInfo(
        "reference", "fp32", "canonical-mlp-v1@x", versions={"tensorrt_version": "11.4.0"}
    )
    ex.scheduler.states[0].engine_loaded(engine, 0.02)
    body, _ = ex.render_metrics(None)
    assert ex.exposition.renders == renders + 2  # the target and the node (build_info)
    info = [k for k in samples(body) if k[0] == "trt_heartbeat_build_info"]
    assert dict(info[0][1])["tensorrt_version"] == "11.4.0"


def test_heartbeat_age_and_health_follow_the_clock_without_a_new_probe() -> None:
    ex, clock = exporter(targets=1)
    probe(ex, 0, clock.now - 0.002)
    age = ("trt_heartbeat_age_seconds", (("gpu", "0"), ("uuid", "GPU-0")))
    healthy = ("trt_heartbeat_health_status", (("status", "healthy"),))
    body, _ = ex.render_metrics(None)
    assert samples(body)[age] == 0.0 and samples(body)[healthy] == 1
    renders = ex.exposition.renders
    clock.now += 45  # past max_age: the target is stale though no state changed
    body, _ = ex.render_metrics(None)
    assert ex.exposition.renders == renders
    assert samples(body)[age] == 45.0
    assert samples(body)[healthy] == 0


def _fresh(ex: Exporter) -> Samples:
    """What every collector yields right now, rendered from scratch by client_python."""
    expected: Samples = {}
    for collector in ex.exposition.collectors:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(collector)
        expected.update(samples(generate_latest(registry)))
    return expected


def _variants(ex: Exporter) -> dict[str, bytes]:
    plain, _ = ex.render_metrics(None)
    gz, _ = ex.render_metrics(None, gzip=True)
    om, _ = ex.render_metrics(OPENMETRICS)
    om_gz, _ = ex.render_metrics(OPENMETRICS, gzip=True)
    for packed in (gz, om_gz):  # one gzip member, as every client can read
        stream = zlib.decompressobj(31)
        stream.decompress(packed)
        assert stream.eof and stream.unused_data == b""
    return {
        "text": plain,
        "text+gzip": gzip.decompress(gz),
        "openmetrics": om,
        "openmetrics+gzip": gzip.decompress(om_gz),
    }


CHANGES = st.sampled_from(["probe", "fail", "mismatch", "load", "clock", "memory"])


@settings_(max_examples=60, deadline=None)
@given(st.lists(st.tuples(CHANGES, st.integers(0, 2)), max_size=12))
def test_a_scrape_after_any_change_shows_it(changes: list[tuple[str, int]]) -> None:
    """Cached bytes are never stale: after every change, each variant (text, OpenMetrics, each
    plain and gzip) holds exactly what the collectors yield now."""
    ex, clock = exporter()
    for kind, target in changes:
        state = ex.scheduler.states[target]
        clock.now += 3
        if kind in ("probe", "fail", "mismatch"):
            result = {"probe": "success", "fail": "error", "mismatch": "mismatch"}[kind]
            error = 0.0 if result == "success" else 1.0
            state.record(
                ProbeRecord(clock.now, result, {"total": 0.002 * (target + 1)}, max_abs_error=error)
            )
        elif kind == "load":
            state.engine_loaded(EngineInfo("reference", "fp32", f"m@{clock.now}"), 0.01)
        elif kind == "memory":
            state.record(
                ProbeRecord(
                    clock.now,
                    "success",
                    {"total": 0.001},
                    device_memory=(int(clock.now) << 20, 80 << 30),
                )
            )
        expected = _fresh(ex)
        for name, body in _variants(ex).items():
            assert samples(body, openmetrics=name.startswith("openmetrics")) == expected, name


def test_every_variant_passes_promtool_and_the_openmetrics_parser() -> None:
    ex, clock = exporter()
    for i in range(3):
        probe(ex, i, clock.now - 1)
    ex.scheduler.states[1].record(ProbeRecord(clock.now, "error", {"total": 0.1}))
    for name, body in _variants(ex).items():
        if name.startswith("openmetrics"):
            assert samples(body, openmetrics=True)  # the strict parser: EOF, family order
            continue
        check = subprocess.run(
            [require("promtool"), "check", "metrics"], input=body, capture_output=True, timeout=30
        )
        assert check.returncode == 0 and check.stdout == b"" and check.stderr == b"", name


def test_a_scrape_between_changes_writes_cached_bytes() -> None:
    ex, clock = exporter(targets=8)
    for i in range(8):
        probe(ex, i, clock.now - 1)
    first, _ = ex.render_metrics(None, gzip=True)
    renders = ex.exposition.renders
    clock.now += 1  # only the age moves
    again, _ = ex.render_metrics(None, gzip=True)
    assert ex.exposition.renders == renders
    age = ("trt_heartbeat_age_seconds", (("gpu", "0"), ("uuid", "GPU-0")))
    assert samples(gzip.decompress(again))[age] == samples(gzip.decompress(first))[age] + 1


@settings_(max_examples=30, deadline=None)
@given(st.binary(max_size=2000), st.sampled_from([0, 1, 100, 0xFFFF, 0x10000, 3 * 0xFFFF + 7]))
def test_a_gzip_member_holds_any_tail_after_the_compressed_stable_part(
    stable: bytes, tail_size: int
) -> None:
    # Tails at and past a stored block's 65535 bytes, and none at all.
    tail = bytes(i % 251 for i in range(tail_size))
    packed = GzipMember(stable).member(tail)
    stream = zlib.decompressobj(31)
    assert stream.decompress(packed) == stable + tail
    assert stream.eof and stream.unused_data == b"", "one gzip member, nothing after it"
    assert gzip.decompress(packed) == stable + tail  # CRC and size checked


def test_distinct_accept_versions_keep_the_caches_bounded() -> None:
    # #25 (1): the caches were keyed by the content type echoing the client's version=, so a
    # new version per request grew them (and the process) without bound.
    ex, clock = exporter()
    for i in range(3):
        probe(ex, i, clock.now - 1)
    for i in range(200):
        for accept in (
            f"application/openmetrics-text; version=2.{i}",
            f"text/plain; version=1.{i}; escaping=dots",
        ):
            ex.render_metrics(accept)
    exp = ex.exposition
    formats = {
        "text/plain; version=0.0.4; charset=utf-8",
        "application/openmetrics-text; version=1.0.0; charset=utf-8",
    }
    assert {key for key, _ in exp._cache} <= formats
    assert set(exp._bodies) <= formats and set(exp._templates) <= formats
    assert set(exp._slow_cache) <= formats
    assert len(exp._cache) <= 2 * len(exp._stable)


@pytest.mark.parametrize(
    "accept",
    [
        "text/plain; version=foo",
        "text/plain; version=1.x",
        "application/openmetrics-text; version=foo",
        "application/openmetrics-text; version=1.x",
        "application/openmetrics-text; version=1.0.0\r",
        "application/openmetrics-text; version=2.0\rX-Evil: 1",
        "text/plain; version=1.0.0\r\n",
        "application/openmetrics-text; version=",
        "application/openmetrics-text;;version=;=;",
        ";;,,",
        "\x00\xff",
        "application/openmetrics-text; version=99999999999999999999",
    ],
)
def test_any_accept_header_gets_a_served_format(accept: str) -> None:
    # #25 (5, 12): a version prometheus_client cannot parse raised (500 and a traceback), and the
    # client's version= text, bare CR included, was copied into the Content-Type.
    ex, clock = exporter(1)
    probe(ex, 0, clock.now - 1)
    body, content_type = ex.render_metrics(accept)
    assert content_type in (
        "text/plain; version=0.0.4; charset=utf-8",
        "application/openmetrics-text; version=1.0.0; charset=utf-8",
    )
    assert samples(body, openmetrics="openmetrics" in content_type)


@pytest.mark.parametrize(
    ("accept", "openmetrics"),
    [
        (None, False),
        ("", False),
        ("*/*", False),
        ("text/plain", False),
        ("text/plain; version=1.0.0; escaping=allow-utf-8", False),
        ("application/openmetrics-text", True),
        ("application/openmetrics-text; version=1.0.0", True),
        ("application/openmetrics-text; version=2.0.0", True),
        ("application/openmetrics-text; version=0.0.1, text/plain", False),
        (
            "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.6,"
            "application/openmetrics-text;version=0.0.1;q=0.5,text/plain;version=1.0.0;"
            "escaping=allow-utf-8;q=0.4,text/plain;version=0.0.4;q=0.3,*/*;q=0.2",
            True,
        ),
    ],
)
def test_accept_negotiation_picks_a_served_format(accept: str | None, openmetrics: bool) -> None:
    from trt_heartbeat.exporter.web.exposition import OPENMETRICS as OM
    from trt_heartbeat.exporter.web.exposition import TEXT, negotiate

    assert negotiate(accept) == (OM if openmetrics else TEXT)
