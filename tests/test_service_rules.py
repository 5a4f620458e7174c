"""The rollout guard's rules: generated from the sources and equal to what is committed; a custom
source gets working rules; bad sources are refused in one line."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, cli, require
from test_rules import RUNBOOK_BASE

RULES = ROOT / "rules"
TESTDATA = Path(__file__).parent / "testdata" / "sources"


@pytest.mark.parametrize(
    ("args", "committed"),
    [((), "service-sources.rules.yml"), (("--canary",), "service-canary.rules.yml")],
)
def test_generated_rules_equal_the_committed_files(args: tuple[str, ...], committed: str) -> None:
    result = cli("service-rules", *args)
    assert result.returncode == 0, result.stderr
    assert result.stdout == (RULES / committed).read_text(), (
        f"rules/{committed} is stale: run `make rules`"
    )


def test_every_builtin_source_is_in_the_pack() -> None:
    groups = yaml.safe_load((RULES / "service-sources.rules.yml").read_text())["groups"]
    names = {g["name"].removeprefix("trt-heartbeat-service-source-") for g in groups}
    assert names == {p.stem for p in (ROOT / "exporter/trt_heartbeat/service/sources").iterdir()}


# The procedure's own metrics: http_requests_total{code, version} and model_latency_seconds.
CUSTOM_TEST = """
rule_files: [{thresholds}, {custom}, {canary}]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'http_requests_total{{job="tf-serving",version="v1",code="200"}}'
        values: '0+11400x30'
      - series: 'http_requests_total{{job="tf-serving",version="v2",code="200"}}'
        values: '0+588x30'
      - series: 'http_requests_total{{job="tf-serving",version="v2",code="503"}}'
        values: '0+12x30'
      - series: 'model_latency_seconds_bucket{{job="tf-serving",version="v2",le="0.1"}}'
        values: '0+600x30'
      - series: 'model_latency_seconds_bucket{{job="tf-serving",version="v2",le="+Inf"}}'
        values: '0+600x30'
    alert_rule_test:
      - eval_time: 20m
        alertname: TrtHeartbeatServiceCanaryErrorRatioHigh
        exp_alerts:
          - exp_labels: {{severity: critical, role: canary, action: pause-rollout,
                         source: tf-serving, service: tf-serving, track: v2}}
            exp_annotations:
              summary: 'Pause the rollout: the canary fails too many requests.'
              description: 'tf-serving (tf-serving) track v2 failed 2% of its requests over 5m:
                pause the rollout and decide whether to roll back.'
              runbook_url: {runbook}trtheartbeatservicecanaryerrorratiohigh
    promql_expr_test:
      - expr: service_track_route:service_request_duration_seconds:p99_rate10m
        eval_time: 20m
        exp_samples:
          - labels: 'service_track_route:service_request_duration_seconds:p99_rate10m{{
              source="tf-serving",service="tf-serving",track="v2"}}'
            value: 0.099
"""


def test_a_custom_source_file_gets_working_rules(tmp_path: Path) -> None:
    result = cli("service-rules", "--source", str(TESTDATA / "tf-serving.yaml"))
    assert result.returncode == 0, result.stderr
    custom = tmp_path / "tf-serving.rules.yml"
    custom.write_text(result.stdout)
    promtool = require("promtool")
    check = subprocess.run([promtool, "check", "rules", str(custom)], capture_output=True,
                           text=True, timeout=60)  # fmt: skip
    assert check.returncode == 0 and "WARNING" not in check.stdout, check.stdout + check.stderr
    test = tmp_path / "custom.test.yml"
    test.write_text(CUSTOM_TEST.format(thresholds=RULES / "thresholds.rules.yml", custom=custom,
                                       canary=RULES / "service-canary.rules.yml",
                                       runbook=RUNBOOK_BASE))  # fmt: skip
    run = subprocess.run([promtool, "test", "rules", str(test)], capture_output=True, text=True,
                         timeout=60)  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr


INVALID = {
    "invalid-missing-metric.yaml": "requests.metric: required, but missing",
    "invalid-unknown-key.yaml": "errors.matcher: unknown key (expected one of: matchers, metric)",
    "invalid-metric-name.yaml":
        'requests.metric: expected a metric name or a list of metric names, '
        'got "http-requests-total"',
    "invalid-latency-both.yaml":
        "latency: expected either `histogram`, or both `sum` and `count`, got a mapping",
    "invalid-unit.yaml":
        'latency.unit: expected seconds, milliseconds or microseconds, got "ms"',
    "invalid-no-track.yaml": "labels.track: required, but missing",
    "invalid-matchers.yaml":
        "requests.matchers: 'job=tf-serving' is not a label matcher like name=\"value\"",
    "invalid-not-a-mapping.yaml": "expected a mapping of source keys at the top level, got a list",
}  # fmt: skip


def test_every_invalid_source_file_is_tested() -> None:
    assert {p.name for p in TESTDATA.glob("invalid-*.yaml")} == set(INVALID)


@pytest.mark.parametrize(("name", "message"), INVALID.items())
def test_an_invalid_source_file_is_one_line_and_exit_2(name: str, message: str) -> None:
    path = TESTDATA / name
    result = cli("service-rules", "--source", str(path))
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == f"Error: --source: {path}: {message}\n"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--source", "envoy"], "--source: unknown source 'envoy' (built in: istio, triton; "
                                "or the path of a source file)"),
        (["--source", "/nonexistent/source.yaml"],
         "--source: /nonexistent/source.yaml: cannot read source file: No such file or directory"),
        (["--source", "istio", "--source", "istio"],
         "--source: two sources are named 'istio'; names must differ"),
        (["--canary", "--source", "istio"],
         "--canary writes the source-agnostic rules: leave out --source"),
    ],
)  # fmt: skip
def test_bad_service_rules_flags(args: list[str], message: str) -> None:
    result = cli("service-rules", *args)
    assert (result.returncode, result.stdout, result.stderr) == (2, "", f"Error: {message}\n")
