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
    assert names == {
        p.stem for p in (ROOT / "exporter/trt_heartbeat/canary/guard/sources").iterdir()
    }


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
          - exp_labels: {{severity: critical, track: canary, action: pause-rollout,
                         source: tf-serving, service: tf-serving, version: v2}}
            exp_annotations:
              summary: 'Pause the rollout: the canary fails too many requests.'
              description: 'tf-serving (tf-serving) version v2 failed 2% of its requests over 5m:
                pause the rollout and decide whether to roll back.'
              runbook_url: {runbook}trtheartbeatservicecanaryerrorratiohigh
    promql_expr_test:
      - expr: service_version_route:service_request_duration_seconds:p99_rate10m
        eval_time: 20m
        exp_samples:
          - labels: 'service_version_route:service_request_duration_seconds:p99_rate10m{{
              source="tf-serving",service="tf-serving",version="v2"}}'
            value: 0.099
"""


def test_a_custom_source_file_gets_working_rules(tmp_path: Path) -> None:
    result = cli("service-rules", "--source", str(TESTDATA / "tf-serving.yaml"))
    assert result.returncode == 0, result.stderr
    custom = tmp_path / "tf-serving.rules.yml"
    custom.write_text(result.stdout)
    promtool = require("promtool")
    check = subprocess.run(
        [promtool, "check", "rules", str(custom)], capture_output=True, text=True, timeout=60
    )
    assert check.returncode == 0 and "WARNING" not in check.stdout, check.stdout + check.stderr
    test = tmp_path / "custom.test.yml"
    test.write_text(
        CUSTOM_TEST.format(
            thresholds=RULES / "thresholds.rules.yml",
            custom=custom,
            canary=RULES / "service-canary.rules.yml",
            runbook=RUNBOOK_BASE,
        )
    )
    run = subprocess.run(
        [promtool, "test", "rules", str(test)], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stdout + run.stderr


INVALID = {
    "invalid-missing-metric.yaml": "requests.metric: required, but missing",
    "invalid-unknown-key.yaml": "errors.matcher: unknown key (expected one of: matchers, metric)",
    "invalid-metric-name.yaml": (
        "requests.metric: expected a metric name or a list of metric names, "
        'got "http-requests-total"'
    ),
    "invalid-latency-both.yaml": (
        "latency: expected either `histogram`, or both `sum` and `count`, got a mapping"
    ),
    "invalid-unit.yaml": 'latency.unit: expected seconds, milliseconds or microseconds, got "ms"',
    "invalid-no-version.yaml": "labels.version: required, but missing",
    "invalid-track-is-a-label.yaml": (
        "labels.track: expected {label, stable, canary}: the role from a label's value "
        '(the release label goes under `version`), got "version"'
    ),
    "invalid-roles-regex.yaml": (
        "labels.track.stable: '.+-primary(' is not a regular expression "
        "(missing ), unterminated subpattern at position 10)"
    ),
    "invalid-matchers.yaml": (
        "requests.matchers: 'job=tf-serving' is not a label matcher like name=\"value\""
    ),
    "invalid-not-a-mapping.yaml": "expected a mapping of source keys at the top level, got a list",
}


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
        (
            ["--source", "envoy"],
            "--source: unknown source 'envoy' (built in: istio, triton; "
            "or the path of a source file)",
        ),
        (
            ["--source", "/nonexistent/source.yaml"],
            "--source: /nonexistent/source.yaml: cannot read source file: "
            "No such file or directory",
        ),
        (
            ["--source", "istio", "--source", "istio"],
            "--source: two sources are named 'istio'; names must differ",
        ),
        (
            ["--canary", "--source", "istio"],
            "--canary writes the source-agnostic rules: leave out --source",
        ),
    ],
)
def test_bad_service_rules_flags(args: list[str], message: str) -> None:
    result = cli("service-rules", *args)
    assert (result.returncode, result.stdout, result.stderr) == (2, "", f"Error: {message}\n")


# A rollout at 60%, its canary failing 5% of its requests from minute 10, as each controller's
# source sees it: the canary carries most of the traffic and is still the one paused.
CONTROLLER_TEST = """
rule_files: [{thresholds}, {rules}, {canary_rules}]
evaluation_interval: 1m
group_eval_order: [trt-heartbeat-thresholds, trt-heartbeat-service-source-{name},
                   trt-heartbeat-service-canary.rules, trt-heartbeat-service-canary.alerts]
tests:
  - interval: 1m
    input_series:
      - series: 'istio_requests_total{{reporter="destination",{label}="{stable}",{ns}="prod",
          response_code="200"}}'
        values: '0+4800x20'
      - series: 'istio_requests_total{{reporter="destination",{label}="{canary}",{ns}="prod",
          response_code="200"}}'
        values: '0+7200x9 72000+6840x10'
      - series: 'istio_requests_total{{reporter="destination",{label}="{canary}",{ns}="prod",
          response_code="503"}}'
        values: '0x9 360+360x10'
    alert_rule_test:
      - {{eval_time: 9m, alertname: TrtHeartbeatServiceCanaryErrorRatioHigh, exp_alerts: []}}
      - {{eval_time: 9m, alertname: TrtHeartbeatServiceRolesFromTraffic, exp_alerts: []}}
      - eval_time: 13m
        alertname: TrtHeartbeatServiceCanaryErrorRatioHigh
        exp_alerts:
          - exp_labels: {{severity: critical, track: canary, action: pause-rollout,
                         source: {name}, namespace: prod, service: inference, version: {canary}}}
            exp_annotations:
              summary: 'Pause the rollout: the canary fails too many requests.'
              description: 'inference ({name}) version {canary} failed 3.96% of its requests over
                5m: pause the rollout and decide whether to roll back.'
              runbook_url: {runbook}trtheartbeatservicecanaryerrorratiohigh
    promql_expr_test:
      - expr: service_version:service_track:info
        eval_time: 9m
        exp_samples:
          - labels: 'service_version:service_track:info{{namespace="prod",service="inference",
              version="{stable}",track="stable",roles_from="declaration"}}'
            value: 1
          - labels: 'service_version:service_track:info{{namespace="prod",service="inference",
              version="{canary}",track="canary",roles_from="declaration"}}'
            value: 1
"""
CONTROLLERS = {
    "flagger-istio": (
        "destination_workload",
        "destination_workload_namespace",
        "inference-primary",
        "inference",
    ),
    "argo-istio-services": (
        "destination_service_name",
        "destination_service_namespace",
        "inference-stable",
        "inference-canary",
    ),
}


@pytest.mark.parametrize("name", CONTROLLERS)
def test_a_controllers_source_declares_the_roles_past_half_the_traffic(
    name: str, tmp_path: Path
) -> None:
    path = RULES / "rollouts" / "sources" / f"{name}.yaml"
    result = cli("service-rules", "--source", str(path))
    assert result.returncode == 0, result.stderr
    generated = tmp_path / f"{name}.rules.yml"
    generated.write_text(result.stdout)
    label, ns, stable, canary = CONTROLLERS[name]
    test = tmp_path / "controller.test.yml"
    test.write_text(
        CONTROLLER_TEST.format(
            thresholds=RULES / "thresholds.rules.yml",
            rules=generated,
            name=name,
            canary_rules=RULES / "service-canary.rules.yml",
            label=label,
            ns=ns,
            stable=stable,
            canary=canary,
            runbook=RUNBOOK_BASE,
        )
    )
    run = subprocess.run(
        [require("promtool"), "test", "rules", str(test)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stdout + run.stderr
