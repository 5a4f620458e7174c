"""Dashboards: structure, conventions, and agreement with the rule pack and their generator.
Every query is executed against a real Prometheus in tests/e2e/test_fleet.py."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from conftest import ROOT

GRAFANA = ROOT / "grafana"
DASHBOARDS = sorted(GRAFANA.glob("*.json"))
DASHBOARD_FILES = [p for p in DASHBOARDS if p.name != "dashboard.schema.json"]
UIDS = {"fleet.json": "trt-heartbeat-fleet", "canary.json": "trt-heartbeat-canary"}


def load(path: Path) -> dict[str, Any]:
    document: dict[str, Any] = json.loads(path.read_text())
    return document


def exprs(dashboard: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def recorded_names() -> set[str]:
    names = set()
    for path in (ROOT / "rules").glob("*.rules.yml"):
        for group in yaml.safe_load(path.read_text())["groups"]:
            names |= {r["record"] for r in group["rules"] if "record" in r}
    return names


def test_both_dashboards_exist_with_stable_uids() -> None:
    assert {p.name: load(p)["uid"] for p in DASHBOARD_FILES} == UIDS


@pytest.mark.parametrize("path", DASHBOARD_FILES, ids=lambda p: p.name)
def test_schema(path: Path) -> None:
    jsonschema.validate(load(path), load(GRAFANA / "dashboard.schema.json"))


@pytest.mark.parametrize("path", DASHBOARD_FILES, ids=lambda p: p.name)
def test_conventions(path: Path) -> None:
    dashboard = load(path)
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    names = {v["name"]: v for v in dashboard["templating"]["list"]}
    common = {"datasource", "cluster", "job", "instance", "gpu", "track"}
    # The canary dashboard's rollout-guard rows select a service of a source.
    service = {"source", "service"} if path.name == "canary.json" else set()
    assert set(names) == common | service
    assert names["cluster"]["hide"] == 2 and names["datasource"]["query"] == "prometheus"
    for expr in exprs(dashboard):
        for window in re.findall(r"\[([^\]]+)\]", expr):
            assert window == "$__rate_interval", expr
    # Panels use the recording rules where they exist instead of repeating their expressions.
    used = {
        n for e in exprs(dashboard) for n in re.findall(r"\b[a-z_]+:[a-z0-9_]+:[a-z0-9_]+\b", e)
    }
    assert used and used <= recorded_names(), used - recorded_names()


def test_json_matches_its_generator(tmp_path: Path) -> None:
    sys.path.insert(0, str(GRAFANA))
    try:
        import build_dashboards
    finally:
        sys.path.remove(str(GRAFANA))
    for name in build_dashboards.DASHBOARDS:
        assert build_dashboards.render(name) == (GRAFANA / name).read_text(), (
            f"grafana/{name} differs from grafana/build_dashboards.py: run it"
        )
