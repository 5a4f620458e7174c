"""Tests that keep the docs true: the metric contract, reason codes, runbooks, CLI docs."""

from __future__ import annotations

import json
import re
import urllib.request
from collections.abc import Callable
from functools import partial
from typing import Any

import click
import yaml
from prometheus_client.parser import text_string_to_metric_families

import fake_nvml as fake_nvml_stub
from conftest import ROOT, Faults, Running, fake_telemetry, wait_for
from trt_heartbeat.cli import cli
from trt_heartbeat.domain import MigInstance, Target
from trt_heartbeat.errors import Reason
from trt_heartbeat.exporter.health import (
    AWAITING_FIRST_PROBE,
    GPU_MEMORY_LOW,
    OK,
    SLOW,
    STALE,
    STARTING,
)

DOCS = ROOT / "docs"
ROW = re.compile(r"^\| `(trt_heartbeat_\w+)` \| (\w+) \|([^|]*)\|")


def documented_metrics() -> dict[str, tuple[str, frozenset[str]]]:
    table = {}
    for line in (DOCS / "metrics.md").read_text().splitlines():
        match = ROW.match(line)
        if match:
            name, kind, labels = match.groups()
            table[name] = (kind, frozenset(re.findall(r"`(\w+)`", labels)))
    return table


def scraped_metrics(url: str) -> dict[str, tuple[str, frozenset[str]]]:
    with urllib.request.urlopen(url + "/metrics", timeout=5) as response:
        text = response.read().decode()
    found = {}
    for family in text_string_to_metric_families(text):
        if not family.name.startswith("trt_heartbeat_"):
            continue
        name = family.name + ("_total" if family.type == "counter" else "")
        labels: set[str] = set()
        for sample in family.samples:
            labels |= set(sample.labels) - {"le"}
        found[name] = (family.type, frozenset(labels))
    return found


def test_metrics_doc_equals_real_output(
    run_exporter: Callable[..., Running], faults: Faults, fake_nvml: Faults
) -> None:
    # A whole GPU and a MIG instance of another, so that the MIG families have series too.
    fake_nvml.set(mode="ok", mig={"0": ["1g.10gb"]})
    mig = Target(
        "0/1/0", fake_nvml_stub.mig_uuid(0, 0), MigInstance("0", "GPU-fake-0", "1g.10gb", 1, 0)
    )
    r = run_exporter(targets=[Target("1", "GPU-fake-1"), mig], telemetry=fake_telemetry())
    wait_for(lambda: r.exporter.telemetry_state().up)
    # Visit every state once so that every family has series: pass, fail, pass.
    wait_for(lambda: r.snapshot().probes_total["success"] >= 1)
    faults.set(probe="raise")
    wait_for(lambda: r.snapshot().probes_total["error"] >= 1)
    faults.set()
    wait_for(lambda: r.snapshot().last_probe.result == "success")
    assert scraped_metrics(r.url) == documented_metrics()


SERIES_ROW = re.compile(r"^\| `(\{.*\})` \| (\d+) \|", re.MULTILINE)


def _probed_with_telemetry(r: Running) -> bool:
    return r.exporter.telemetry_state().up and r.snapshot().probes_total["success"] >= 1


def test_series_per_gpu_doc_equals_a_real_scrape(
    run_exporter: Callable[..., Running], faults: Faults, fake_nvml: Faults
) -> None:
    """docs/metrics.md's series budget: every series carrying one GPU's UUID, in a steady
    state (probes passing, NVML up), for each documented `metrics` setting."""
    documented = SERIES_ROW.findall((DOCS / "metrics.md").read_text())
    assert len(documented) >= 4
    faults.set(gpu_phases=True)
    for setting, count in documented:
        r = run_exporter(
            targets=[Target("0", "GPU-fake-0")],
            telemetry=fake_telemetry(),
            metrics=json.loads(setting),
        )
        wait_for(partial(_probed_with_telemetry, r))
        with urllib.request.urlopen(r.url + "/metrics", timeout=5) as response:
            text = response.read().decode()
        series = [
            s
            for f in text_string_to_metric_families(text)
            for s in f.samples
            if s.labels.get("uuid") == "GPU-fake-0"
        ]
        assert len(series) == int(count), setting
    # The default comes first and keeps issue #26's budget; the table says so.
    assert documented[0][0] == "{}" and int(documented[0][1]) <= 60
    assert "at or under **60**" in (DOCS / "metrics.md").read_text()


def test_reason_codes_are_documented_with_runbooks() -> None:
    metrics = (DOCS / "metrics.md").read_text()
    runbooks = (DOCS / "runbooks.md").read_text()
    headings = set(re.findall(r"^### (\w+)$", runbooks, re.MULTILINE))
    for reason in Reason:
        assert f"| `{reason.value}` |" in metrics, reason
        assert reason.value in headings, f"runbook section for {reason.value}"
    for state in (STARTING, AWAITING_FIRST_PROBE, STALE, SLOW, GPU_MEMORY_LOW, "no_targets"):
        assert state in headings, f"runbook section for {state}"
    assert OK not in headings


def test_readme_documents_every_command_and_flag() -> None:
    readme = (ROOT / "README.md").read_text()
    for name, command in cli.commands.items():
        assert f"trt-heartbeat-exporter {name}" in readme, name
        assert command.help, f"{name} has help"
        for param in command.params:
            for opt in param.opts:
                if opt.startswith("--") and opt != "--help":
                    assert f"`{opt}`" in readme, f"{name} {opt} in README"


def test_readme_quick_start_matches_ci() -> None:
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in readme and "make test" in ci


def test_changelog_names_the_current_version() -> None:
    from trt_heartbeat import __version__

    assert f"## {__version__}" in (ROOT / "CHANGELOG.md").read_text()


def test_every_doc_link_resolves() -> None:
    for doc in [ROOT / "README.md", *DOCS.glob("*.md")]:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", doc.read_text()):
            assert (doc.parent / target).exists(), f"{doc.name} links to missing {target}"


def test_config_schema_keys_are_documented() -> None:
    from trt_heartbeat.exporter import config

    readme = (ROOT / "README.md").read_text()
    for key, node in config.schema()["properties"].items():
        subkeys = node.get("properties", {})
        for sub in subkeys:
            assert f"`{key}.{sub}`" in readme, f"{key}.{sub}"
        if not subkeys:
            assert f"`{key}`" in readme, key


def _schema_keys(node: dict[str, Any], prefix: str = "") -> list[str]:
    """Every key path of a schema's objects with declared properties (free-form maps: one)."""
    keys = []
    for key, child in node.get("properties", {}).items():
        path = f"{prefix}{key}"
        keys += _schema_keys(child, path + ".") if "properties" in child else [path]
    return keys


def test_the_full_example_sets_every_config_key() -> None:
    """README calls tests/testdata/valid-full.yaml an example with every key: keep it so."""
    from trt_heartbeat.exporter import config

    document = yaml.safe_load((ROOT / "tests" / "testdata" / "valid-full.yaml").read_text())
    for key in _schema_keys(config.schema()):
        node = document
        for part in key.split("."):
            assert isinstance(node, dict) and part in node, f"valid-full.yaml lacks {key}"
            node = node[part]


def test_flag_help_shows_the_real_defaults() -> None:
    """Every config flag's `[default: …]` is the default `check-config` reports for its key."""
    from trt_heartbeat.exporter import config

    effective = config.load().effective()
    serve = cli.commands["serve"]
    flags = [p for p in serve.params if p.name and p.name not in ("config_file", "help")]
    assert len(flags) >= 13
    for param in flags:
        assert isinstance(param, click.Option)
        key = str(param.name).replace("__", ".")
        value: Any = effective
        for part in key.split("."):
            value = value[part]
        if key == "engine_cache_dir":
            continue  # not a flag
        shown = ",".join(value) if isinstance(value, list) else str(value)
        found = re.search(r"\[default: ([^\]]+)\]", param.help or "")
        if value in ("", None):
            assert found is None, f"{param.opts[0]} shows a default it does not have"
        else:
            assert found, f"{param.opts[0]} does not show its default ({shown})"
            assert found.group(1) == shown, f"{param.opts[0]}: help {found.group(1)} != {shown}"
