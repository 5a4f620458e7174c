"""The rule pack: promtool checks and unit tests, conventions, runbooks, Alertmanager routing and
inhibitions against a real Alertmanager."""

from __future__ import annotations

import json
import re
import subprocess
import urllib.request
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import ROOT, daemon, free_port, promql_on_scenario, require, wait_for

RULES = ROOT / "rules"
RULE_FILES = sorted(RULES.glob("*.rules.yml"))
TEST_FILES = sorted((RULES / "tests").glob("*.test.yml"))
AM_CONFIG = RULES / "alertmanager" / "alertmanager.yml"
RUNBOOK_BASE = (
    "https://github.com/trt-heartbeat-exporter/trt-heartbeat-exporter/blob/main/docs/runbooks.md#"
)


def rules() -> list[dict[str, Any]]:
    out = []
    for path in RULE_FILES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            out.extend(group["rules"])
    return out


ALERTS = [r for r in rules() if "alert" in r]
RECORDS = [r for r in rules() if "record" in r]


def test_promtool_check_rules_is_clean() -> None:
    result = subprocess.run(
        [require("promtool"), "check", "rules", *map(str, RULE_FILES)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "WARNING" not in result.stdout + result.stderr


@pytest.mark.parametrize("test_file", TEST_FILES, ids=lambda p: p.name)
def test_promtool_unit_tests(test_file: Path) -> None:
    result = subprocess.run(
        [require("promtool"), "test", "rules", str(test_file)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("rule", ALERTS, ids=lambda r: r["alert"])
def test_alert_conventions(rule: dict[str, Any]) -> None:
    name = rule["alert"]
    assert re.fullmatch(r"TrtHeartbeat[A-Z][A-Za-z]+", name)
    assert rule["labels"]["severity"] in ("critical", "warning", "info")
    assert set(rule["annotations"]) == {"summary", "description", "runbook_url"}
    assert rule["annotations"]["runbook_url"] == RUNBOOK_BASE + name.lower()


@pytest.mark.parametrize("rule", RECORDS, ids=lambda r: r["record"])
def test_recording_rule_names(rule: dict[str, Any]) -> None:
    assert re.fullmatch(r"[a-z_]+:[a-z0-9_]+:[a-z0-9_]+", rule["record"]), rule["record"]


def _cases() -> tuple[set[str], set[str]]:
    firing: set[str] = set()
    quiet: set[str] = set()
    for path in TEST_FILES:
        for test in yaml.safe_load(path.read_text())["tests"]:
            for case in test.get("alert_rule_test", []):
                (firing if case["exp_alerts"] else quiet).add(case["alertname"])
    return firing, quiet


def test_every_alert_has_a_runbook_and_firing_and_quiet_cases() -> None:
    runbooks = (ROOT / "docs" / "runbooks.md").read_text()
    headings = {h.lower() for h in re.findall(r"^### (\w+)$", runbooks, re.MULTILINE)}
    firing, quiet = _cases()
    for rule in ALERTS:
        name = rule["alert"]
        assert name.lower() in headings, f"runbook section for {name}"
        assert name in firing, f"a promtool case where {name} fires"
        assert name in quiet, f"a promtool case where {name} does not fire"


def test_every_rule_file_is_tested() -> None:
    tested = set()
    for path in TEST_FILES:
        tested |= {
            (path.parent / f).resolve() for f in yaml.safe_load(path.read_text())["rule_files"]
        }
    pack = {p.resolve() for p in RULE_FILES}
    examples = {p.resolve() for p in (RULES / "rollouts").glob("*.rules.yml")}
    assert pack <= tested and tested - pack == examples


def test_the_threshold_guard_covers_every_threshold_the_pack_uses() -> None:
    # TrtHeartbeatThresholdMissing lists each threshold series (with its statistic) by hand;
    # it must name exactly those thresholds.rules.yml defines, and those must be all the rules use.
    defined = {
        (r["record"], (r.get("labels") or {}).get("statistic", ""))
        for r in RECORDS
        if r["record"].startswith("trt_heartbeat:threshold:")
    }
    guard = next(r for r in ALERTS if r["alert"] == "TrtHeartbeatThresholdMissing")["expr"]
    absent = r'absent\((trt_heartbeat:threshold:\w+)(?:\{statistic="(\w+)"\})?\)'
    listed = set(re.findall(absent, guard))
    assert listed == defined
    prefixes = ("trt_heartbeat:threshold:", "TrtHeartbeatThreshold")
    consumers = [r for r in rules() if not str(r.get("record") or r["alert"]).startswith(prefixes)]
    used = {m for r in consumers for m in re.findall(r"trt_heartbeat:threshold:\w+", r["expr"])}
    assert used == {name for name, _ in defined}


def test_amtool_check_config() -> None:
    result = subprocess.run(
        [require("amtool"), "check-config", str(AM_CONFIG)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0 and "SUCCESS" in result.stdout, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("labels", "receivers"),
    [
        ({"alertname": "TrtHeartbeatStale", "severity": "critical"}, "pager"),
        ({"alertname": "TrtHeartbeatLatencyHigh", "severity": "warning"}, "tickets"),
        (
            {
                "alertname": "TrtHeartbeatCanaryInsufficientData",
                "severity": "info",
                "track": "canary",
            },
            "null",
        ),
        (
            {
                "alertname": "TrtHeartbeatCanaryLatencyRegression",
                "severity": "warning",
                "track": "canary",
            },
            "release",
        ),
        (
            {"alertname": "TrtHeartbeatStale", "severity": "critical", "track": "canary"},
            "release,pager",
        ),
        (
            {"alertname": "TrtHeartbeatGpuMemoryLow", "severity": "warning", "track": "canary"},
            "release,tickets",
        ),
        ({"alertname": "TrtHeartbeatStale", "severity": "critical", "track": "stable"}, "pager"),
        ({"alertname": "SomethingElse"}, "tickets"),
        (
            {
                "alertname": "TrtHeartbeatServiceCanaryErrorRatioHigh",
                "severity": "critical",
                "action": "pause-rollout",
                "track": "canary",
                "service": "inference",
                "version": "v2",
            },
            "rollout-pause,release,pager",
        ),
        (
            {
                "alertname": "TrtHeartbeatServiceCanaryLatencyHigher",
                "severity": "warning",
                "track": "canary",
            },
            "release",
        ),
        (
            {
                "alertname": "TrtHeartbeatServiceCanaryInsufficientTraffic",
                "severity": "info",
                "track": "canary",
            },
            "null",
        ),
        ({"alertname": "TrtHeartbeatServiceRolesFromTraffic", "severity": "info"}, "null"),
        ({"alertname": "TrtHeartbeatModelNotLoaded", "severity": "critical"}, "pager"),
        ({"alertname": "TrtHeartbeatNodeMaintenance", "severity": "info", "node": "gpu-7"}, "null"),
        ({"alertname": "TrtHeartbeatGpuMissing", "severity": "warning"}, "tickets"),
        ({"alertname": "TrtHeartbeatThresholdMissing", "severity": "warning"}, "tickets"),
    ],
)
def test_routes(labels: dict[str, str], receivers: str) -> None:
    result = subprocess.run(
        [
            require("amtool"),
            "config",
            "routes",
            "test",
            f"--config.file={AM_CONFIG}",
            f"--verify.receivers={receivers}",
            *(f"{k}={v}" for k, v in labels.items()),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == receivers


@pytest.fixture(scope="module")
def alertmanager(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    binary = require("prometheus-alertmanager")
    work = tmp_path_factory.mktemp("alertmanager")
    port = free_port()
    # Receivers point nowhere reachable: this checks inhibition, not delivery.
    config = AM_CONFIG.read_text().replace(
        "http://alert-router.monitoring.svc:8080", "http://127.0.0.1:9"
    )
    (work / "am.yml").write_text(config)
    args = [
        binary,
        f"--config.file={work / 'am.yml'}",
        f"--storage.path={work / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--cluster.listen-address=",
    ]
    with daemon(args, port, work / "am.log", "alertmanager") as url:
        yield url


def _post(url: str, alerts: list[dict[str, str]]) -> None:
    now = datetime.now(timezone.utc)
    body = [
        {"labels": a, "startsAt": now.isoformat(), "endsAt": (now + timedelta(hours=1)).isoformat()}
        for a in alerts
    ]
    request = urllib.request.Request(
        url + "/api/v2/alerts",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        assert response.status == 200


def _states(url: str, case: str) -> dict[str, str]:
    with urllib.request.urlopen(url + f'/api/v2/alerts?filter=case="{case}"', timeout=5) as r:
        alerts = json.load(r)
    return {
        a["labels"]["alertname"] + "/" + a["labels"].get("gpu", "-"): a["status"]["state"]
        for a in alerts
    }


INSTANCE = {"job": "trt-heartbeat-exporter", "instance": "node1:9470"}


@pytest.mark.parametrize(
    ("case", "alerts", "expected"),
    [
        (
            "exporter-down",
            [
                {"alertname": "TrtHeartbeatExporterDown", "severity": "critical", **INSTANCE},
                {"alertname": "TrtHeartbeatStale", "severity": "critical", "gpu": "0", **INSTANCE},
                {
                    "alertname": "TrtHeartbeatGpuMemoryLow",
                    "severity": "warning",
                    "gpu": "0",
                    **INSTANCE,
                },
                {
                    "alertname": "TrtHeartbeatStale",
                    "severity": "critical",
                    "gpu": "0",
                    "job": "trt-heartbeat-exporter",
                    "instance": "node2:9470",
                },
            ],
            {
                "TrtHeartbeatExporterDown/-": "active",
                "TrtHeartbeatStale/0": "suppressed",
                "TrtHeartbeatGpuMemoryLow/0": "suppressed",
            },
        ),
        (
            "stale-covers-latency",
            [
                {
                    "alertname": "TrtHeartbeatStale",
                    "severity": "critical",
                    "gpu": "0",
                    "uuid": "GPU-a",
                    **INSTANCE,
                },
                {
                    "alertname": "TrtHeartbeatLatencyHigh",
                    "severity": "warning",
                    "gpu": "0",
                    "uuid": "GPU-a",
                    **INSTANCE,
                },
                {
                    "alertname": "TrtHeartbeatLatencyHigh",
                    "severity": "warning",
                    "gpu": "1",
                    "uuid": "GPU-b",
                    **INSTANCE,
                },
            ],
            {
                "TrtHeartbeatStale/0": "active",
                "TrtHeartbeatLatencyHigh/0": "suppressed",
                "TrtHeartbeatLatencyHigh/1": "active",
            },
        ),
        (
            "critical-covers-warning-of-its-gpu",
            [
                {
                    "alertname": "TrtHeartbeatOutputMismatch",
                    "severity": "critical",
                    "gpu": "0",
                    "uuid": "GPU-a",
                    **INSTANCE,
                },
                {
                    "alertname": "TrtHeartbeatWorkerRestarting",
                    "severity": "warning",
                    "gpu": "0",
                    "uuid": "GPU-a",
                    **INSTANCE,
                },
                {
                    "alertname": "TrtHeartbeatWorkerRestarting",
                    "severity": "warning",
                    "gpu": "1",
                    "uuid": "GPU-b",
                    **INSTANCE,
                },
            ],
            {
                "TrtHeartbeatOutputMismatch/0": "active",
                "TrtHeartbeatWorkerRestarting/0": "suppressed",
                "TrtHeartbeatWorkerRestarting/1": "active",
            },
        ),
        # The device is the uuid: after a reboot renumbered the GPUs, index 0 is another GPU,
        # and a critical alert of the old GPU-a (gpu 0, still pending resolution) must not
        # silence the warning of GPU-c, the new gpu 0; GPU-a's own warning (now gpu 2) it covers.
        (
            "inhibition-follows-the-device",
            [
                {
                    "alertname": "TrtHeartbeatStale",
                    "severity": "critical",
                    "gpu": "0",
                    "uuid": "GPU-a",
                    **INSTANCE,
                },
                {
                    "alertname": "TrtHeartbeatGpuMemoryLow",
                    "severity": "warning",
                    "gpu": "0",
                    "uuid": "GPU-c",
                    **INSTANCE,
                },
                {
                    "alertname": "TrtHeartbeatWorkerRestarting",
                    "severity": "warning",
                    "gpu": "2",
                    "uuid": "GPU-a",
                    **INSTANCE,
                },
            ],
            {
                "TrtHeartbeatStale/0": "active",
                "TrtHeartbeatGpuMemoryLow/0": "active",
                "TrtHeartbeatWorkerRestarting/2": "suppressed",
            },
        ),
        # The host target of a CPU backend has no uuid: its gpu ("cpu") names it.
        (
            "cpu-target",
            [
                {
                    "alertname": "TrtHeartbeatStale",
                    "severity": "critical",
                    "gpu": "cpu",
                    **INSTANCE,
                },
                {
                    "alertname": "TrtHeartbeatWorkerRestarting",
                    "severity": "warning",
                    "gpu": "cpu",
                    **INSTANCE,
                },
            ],
            {"TrtHeartbeatStale/cpu": "active", "TrtHeartbeatWorkerRestarting/cpu": "suppressed"},
        ),
        # Node gpu-7 is cordoned for maintenance: its exporter down and its GPUs stale wait, a
        # wrong answer of a GPU still serving there does not; gpu-8, serving, pages, and so does
        # node gpu-7 of another cluster.
        (
            "node-maintenance",
            [
                {"alertname": "TrtHeartbeatNodeMaintenance", "severity": "info", "node": "gpu-7"},
                {
                    "alertname": "TrtHeartbeatExporterDown",
                    "severity": "critical",
                    "node": "gpu-7",
                    **INSTANCE,
                },
                {
                    "alertname": "TrtHeartbeatModelNotLoaded",
                    "severity": "critical",
                    "node": "gpu-7",
                    "gpu": "1",
                    "uuid": "GPU-71",
                    **INSTANCE,
                },
                {
                    "alertname": "TrtHeartbeatOutputMismatch",
                    "severity": "critical",
                    "node": "gpu-7",
                    "gpu": "2",
                    "uuid": "GPU-72",
                    **INSTANCE,
                },
                {
                    "alertname": "TrtHeartbeatStale",
                    "severity": "critical",
                    "node": "gpu-8",
                    "gpu": "0",
                    "uuid": "GPU-80",
                    "job": "trt-heartbeat-exporter",
                    "instance": "node8:9470",
                },
                {
                    "alertname": "TrtHeartbeatStale",
                    "severity": "critical",
                    "node": "gpu-7",
                    "cluster": "b",
                    "gpu": "3",
                    "uuid": "GPU-b73",
                    "job": "trt-heartbeat-exporter",
                    "instance": "b-node7:9470",
                },
            ],
            {
                "TrtHeartbeatNodeMaintenance/-": "active",
                "TrtHeartbeatExporterDown/-": "suppressed",
                "TrtHeartbeatModelNotLoaded/1": "suppressed",
                "TrtHeartbeatOutputMismatch/2": "active",
                "TrtHeartbeatStale/0": "active",
                "TrtHeartbeatStale/3": "active",
            },
        ),
        # The pitfall: labels missing on both sides count as equal. A critical alert without a
        # gpu label must not silence warnings that have none either.
        (
            "missing-labels-do-not-inhibit",
            [
                {"alertname": "TrtHeartbeatExporterDown", "severity": "critical", **INSTANCE},
                {
                    "alertname": "TrtHeartbeatNvmlDown",
                    "severity": "warning",
                    "job": "other",
                    "instance": "node9:9470",
                },
                {"alertname": "TrtHeartbeatVersionSkew", "severity": "warning", "track": "stable"},
                {
                    "alertname": "TrtHeartbeatCanaryLatencyRegression",
                    "severity": "warning",
                    "track": "canary",
                    "gpu_model": "NVIDIA H200",
                },
            ],
            {
                "TrtHeartbeatExporterDown/-": "active",
                "TrtHeartbeatNvmlDown/-": "active",
                "TrtHeartbeatVersionSkew/-": "active",
                "TrtHeartbeatCanaryLatencyRegression/-": "active",
            },
        ),
    ],
)
def test_inhibitions_in_a_real_alertmanager(
    alertmanager: str, case: str, alerts: list[dict[str, str]], expected: dict[str, str]
) -> None:
    # Alerts of earlier cases stay active in the shared Alertmanager: give each case its own
    # instances so they cannot inhibit across cases.
    _post(
        alertmanager,
        [
            {
                **a,
                "case": case,
                **({"instance": f"{case}/{a['instance']}"} if "instance" in a else {}),
            }
            for a in alerts
        ],
    )

    def settled() -> dict[str, str] | None:
        states = _states(alertmanager, case)
        return states if all(states.get(k) == v for k, v in expected.items()) else None

    try:
        wait_for(settled, timeout=20)
    except AssertionError:
        assert _states(alertmanager, case) == expected
    states = _states(alertmanager, case)
    for key, value in expected.items():
        assert states[key] == value, (key, states)


def test_pages_group_per_node_not_per_gpu(alertmanager: str) -> None:
    # A node whose eight GPUs all go stale is one cause: one page listing eight alerts. Another
    # node's page is its own.
    node = {"job": "trt-heartbeat-exporter", "instance": "10.1.0.1:9470", "node": "gpu-21"}
    stale = [
        {
            "alertname": "TrtHeartbeatStale",
            "severity": "critical",
            "case": "grouping",
            "gpu": str(g),
            "uuid": f"GPU-21{g}",
            **node,
        }
        for g in range(8)
    ]
    other = {
        "alertname": "TrtHeartbeatModelNotLoaded",
        "severity": "critical",
        "case": "grouping",
        "gpu": "0",
        "uuid": "GPU-220",
        "job": "trt-heartbeat-exporter",
        "instance": "10.1.0.2:9470",
        "node": "gpu-22",
    }
    # Without Kubernetes (no node): per exporter instance.
    bare = [
        {
            "alertname": "TrtHeartbeatStale",
            "severity": "critical",
            "case": "grouping",
            "gpu": str(g),
            "uuid": f"GPU-23{g}",
            "job": "trt-heartbeat-exporter",
            "instance": "host23:9470",
        }
        for g in range(2)
    ]
    # Sidecars: one exporter per pod, several pods on node gpu-24; the node is the cause.
    sidecars = [
        {
            "alertname": "TrtHeartbeatStale",
            "severity": "critical",
            "case": "grouping",
            "gpu": "0",
            "uuid": f"GPU-24{p}",
            "job": "trt-heartbeat-exporter",
            "instance": f"10.1.4.{p}:9471",
            "node": "gpu-24",
        }
        for p in range(3)
    ]
    _post(alertmanager, [*stale, other, *bare, *sidecars])

    def pager_groups() -> list[list[str]] | None:
        with urllib.request.urlopen(alertmanager + "/api/v2/alerts/groups", timeout=5) as r:
            groups = json.load(r)
        found = [
            sorted(
                a["labels"]["uuid"] for a in g["alerts"] if a["labels"].get("case") == "grouping"
            )
            for g in groups
            if g["receiver"]["name"] == "pager"
        ]
        found = sorted(f for f in found if f)
        return found if sum(map(len, found)) == 14 else None

    assert wait_for(pager_groups, timeout=20) == [
        ["GPU-210", "GPU-211", "GPU-212", "GPU-213", "GPU-214", "GPU-215", "GPU-216", "GPU-217"],
        ["GPU-220"],
        ["GPU-230", "GPU-231"],
        ["GPU-240", "GPU-241", "GPU-242"],
    ]


def _rollout_queries() -> list[str]:
    queries = []
    argo = yaml.safe_load((RULES / "rollouts" / "argo-analysistemplate.yaml").read_text())
    queries += [m["provider"]["prometheus"]["query"] for m in argo["spec"]["metrics"]]
    for doc in yaml.safe_load_all(
        (RULES / "rollouts" / "flagger-metrictemplates.yaml").read_text()
    ):
        queries.append(doc["spec"]["query"])
    return queries


def test_rollout_queries_run_on_recorded_series(tmp_path: Path) -> None:
    # Run the controllers' queries, as promtool expressions, on the slower-canary scenario of
    # rules/tests/canary.test.yml: latency ratio 2, failure-ratio delta 0.
    expected = {"p99_canary_over_stable": 2, "ratio_canary_minus_stable": 0}
    promql_on_scenario(
        tmp_path,
        "canary.test.yml",
        0,
        "50m",
        {q: next(v for k, v in expected.items() if k in q) for q in _rollout_queries()},
    )
    assert len(_rollout_queries()) == 4
