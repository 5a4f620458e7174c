from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import cli
from trt_heartbeat import documents
from trt_heartbeat.cli import cli as cli_group
from trt_heartbeat.cli import main
from trt_heartbeat.domain import BUCKET_SETS, HISTOGRAM_PHASES
from trt_heartbeat.errors import ConfigError
from trt_heartbeat.exporter import config

DATA = Path(__file__).parent / "testdata"
DURATION = "a positive duration such as 10s, 500ms, 1m30s or a number of seconds"

LISTEN = "host:port such as :9470, 127.0.0.1:9470 or [::1]:9470 (an ASCII host name or IP address)"
PATH = (
    "a URL path starting with / (ASCII letters, digits and -._~!$&'()*+,;=:@; no empty, . or "
    ".. segments)"
)
GPUS = (
    "all, or a list of GPU indexes (0, 1, ...), GPU UUIDs (GPU-...) or MIG instance UUIDs (MIG-...)"
)
# One file per error case; the message must name the key path and what was expected.
INVALID = {
    "unknown-key": "intervall: unknown key (expected one of: backend, constant_labels, cuda_api, "
    "engine_cache_dir, gpu_memory_low_threshold, gpus, history, interval, jitter, "
    "latency_objective, log, max_age, metrics, nvml, precision, startup_timeout, timeout, web)",
    "nvml-enabled": 'nvml.enabled: expected auto, true or false, got "sometimes"',
    "nvml-timeout": "nvml.timeout: must be shorter than nvml.interval (5s >= 5s)",
    "memory-threshold": "gpu_memory_low_threshold: expected a size such as 512MiB, 2GiB or a "
    'number of bytes, got "512MB"',
    "unknown-nested-key": "web.listen: unknown key (expected one of: config_file, "
    "hide_hardware_details, listen_address, max_requests, telemetry_path)",
    "interval-not-duration": f'interval: expected {DURATION}, got "ten seconds"',
    "interval-negative": f"interval: expected {DURATION}, got -5",
    "interval-zero": f'interval: expected {DURATION}, got "0s"',
    "timeout-not-shorter": "timeout: must be shorter than interval (10s >= 5s)",
    "max-age-below-interval": "max_age: must be at least one interval (1s < 10s)",
    "precision": 'precision: expected one of fp64, fp32, fp16, got "int8"',
    "listen-address": f'web.listen_address: expected {LISTEN}, got "localhost"',
    "listen-host-non-ascii": f'web.listen_address: expected {LISTEN}, got "\\u00fcn\\u00ef:9470"',
    "listen-port": "web.listen_address: port 99999 is out of range (0-65535)",
    "telemetry-path": f'web.telemetry_path: expected {PATH}, got "metrics"',
    "telemetry-path-double-slash": f'web.telemetry_path: expected {PATH}, got "//metrics"',
    "telemetry-path-non-ascii": f'web.telemetry_path: expected {PATH}, got "/m\\u00e9trics"',
    "telemetry-path-space": f'web.telemetry_path: expected {PATH}, got "/my metrics"',
    "telemetry-path-dot-segment": f'web.telemetry_path: expected {PATH}, got "/x/../metrics"',
    "telemetry-path-taken": "web.telemetry_path: /health is used by another endpoint",
    "label-name": "constant_labels.bad-name: expected a Prometheus label name "
    "([a-zA-Z_][a-zA-Z0-9_]*, not starting with __)",
    "label-reserved": "constant_labels.gpu: label is set by the exporter itself",
    "label-reserved-type": "constant_labels.type: label is set by the exporter itself",
    "label-control-character": "constant_labels.track: control character U+000D in the value "
    "(expected one line of text)",
    "label-too-many": "constant_labels: at most 32 labels, got 33",
    "label-value-too-long": "constant_labels.track: value longer than 1024 characters (1025)",
    "timeout-under-1ms": 'timeout: must be at least 1ms, got "0.5ms"',
    "nvml-timeout-under-1ms": 'nvml.timeout: must be at least 1ms, got "0.9ms"',
    "label-value": "constant_labels.track: expected a string label value, got 3",
    "yaml-syntax": "line 3: invalid YAML: while scanning a quoted scalar found unexpected end "
    "of stream",
    "duplicate-key": "line 3: invalid YAML: duplicate key 'interval'",
    "top-level-list": "expected a mapping of configuration keys at the top level, got a list",
    "log-format": 'log.format: expected one of text, json, got "xml"',
    "hide-not-bool": 'web.hide_hardware_details: expected true or false, got "maybe"',
    "jitter": "jitter: expected a fraction of the interval between 0 and 0.5, got 2",
    "history": "history: expected a whole number of probes between 1 and 1000, got 2.5",
    "backend-empty": "backend: expected a backend name (auto, reference, cuda, tensorrt) or a "
    "'package.module:Class' spec, got \"\"",
    "backend-unknown": "backend: unknown backend 'tensorrtt': expected auto, cuda, reference, "
    "tensorrt or a 'package.module:Class' spec",
    "gpus": f'gpus: expected {GPUS}, got [0, "first"]',
    "gpus-mig-uuid": f'gpus: expected {GPUS}, got [0, "MIG-1234"]',
    "metrics-phases-without-total": "metrics.histogram_phases: must include total (the latency "
    "alerts and canary-judge read it)",
    "metrics-buckets-not-increasing": "metrics.buckets[2]: must be greater than "
    "metrics.buckets[1] (5ms <= 10ms)",
    "metrics-bucket-zero": f'metrics.buckets[0]: expected {DURATION}, got "0s"',
    "metrics-buckets": "metrics.buckets: expected default, coarse, or a list of up to 40 "
    'increasing durations such as [1ms, 10ms, 100ms], got "fine"',
    "cuda-api": 'cuda_api: expected one of cuda-python, pycuda, got "cupy"',
    "web-not-mapping": 'web: expected a mapping, got ":9470"',
    "interval-nan": "interval: expected a finite number, got .nan",
    "jitter-infinite": "jitter: expected a finite number, got .inf",
    "duration-overflow": "startup_timeout: expected a finite number, got .inf",
    "duration-too-long": f'startup_timeout: expected {DURATION}, got "9999999h"',
    "memory-threshold-too-large": "gpu_memory_low_threshold: expected a size such as 512MiB, "
    '2GiB or a number of bytes, got "99999999999TiB"',
    "nesting": "line 2: config file nests deeper than 32 levels",
    "alias-bomb": "line 6: config file expands to more than 10000 values (aliases count at "
    "every use)",
}


def test_every_invalid_file_has_an_expected_message() -> None:
    files = {p.name.removeprefix("invalid-").removesuffix(".yaml") for p in DATA.glob("invalid-*")}
    assert files == set(INVALID)


@pytest.mark.parametrize("case", sorted(INVALID))
def test_invalid_config_message(case: str) -> None:
    path = DATA / f"invalid-{case}.yaml"
    with pytest.raises(ConfigError) as info:
        config.load(path)
    assert str(info.value) == f"{path}: {INVALID[case]}"


@pytest.mark.parametrize("case", sorted(INVALID))
def test_invalid_config_exits_2_with_one_line(
    case: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = DATA / f"invalid-{case}.yaml"
    with pytest.raises(SystemExit) as info:
        main(["check-config", str(path)])
    assert info.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == f"Error: {path}: {INVALID[case]}\n"


def test_serve_refuses_invalid_config_without_traceback() -> None:
    path = DATA / "invalid-timeout-not-shorter.yaml"
    result = cli("serve", "--config", str(path))
    assert result.returncode == 2
    assert result.stderr == f"Error: {path}: {INVALID['timeout-not-shorter']}\n"
    assert result.stdout == ""


def test_missing_config_file() -> None:
    result = cli("serve", "--config", "/nonexistent/heartbeat.yaml")
    assert result.returncode == 2
    assert result.stderr == (
        "Error: /nonexistent/heartbeat.yaml: cannot read config file: No such file or directory\n"
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--interval", "soon"],
            "Invalid value for '--interval' (env var: "
            f"'TRT_HEARTBEAT_INTERVAL'): expected {DURATION}, got 'soon'",
        ),
        (
            ["--timeout", "-1"],
            "Invalid value for '--timeout' (env var: 'TRT_HEARTBEAT_TIMEOUT'): "
            f"expected {DURATION}, got '-1'",
        ),
        (
            ["--web.listen-address", "9470"],
            "Invalid value for '--web.listen-address' (env var: "
            f"'TRT_HEARTBEAT_WEB_LISTEN_ADDRESS'): expected {LISTEN}, got '9470'",
        ),
        (
            ["--precision", "int4"],
            "Invalid value for '--precision' (env var: "
            "'TRT_HEARTBEAT_PRECISION'): 'int4' is not one of 'fp64', 'fp32', 'fp16'.",
        ),
        (
            ["--backend", "nope"],
            "unknown backend 'nope': expected auto, cuda, reference, "
            "tensorrt or a 'package.module:Class' spec",
        ),
        (
            ["--interval", "1s", "--timeout", "2s"],
            "timeout: must be shorter than interval (2s >= 1s)",
        ),
        (
            ["--no-such-flag"],
            "No such option '--no-such-flag'. See 'trt-heartbeat-exporter serve --help'.",
        ),
    ],
)
def test_bad_flags_exit_2_with_one_line(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main(["serve", *args])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert message in err


def test_bad_environment_value_names_the_variable() -> None:
    result = cli("serve", TRT_HEARTBEAT_INTERVAL="never")
    assert result.returncode == 2
    assert "TRT_HEARTBEAT_INTERVAL" in result.stderr and "'never'" in result.stderr
    assert result.stderr.count("\n") == 1


def test_yaml_and_json_files_give_the_same_settings() -> None:
    from_yaml = config.load(DATA / "valid-full.yaml")
    from_json = config.load(DATA / "valid-full.json")
    assert {**from_yaml.__dict__, "source": ""} == {**from_json.__dict__, "source": ""}
    assert from_yaml.listen_host == "::1" and from_yaml.listen_port == 9471
    assert from_yaml.interval == 30 and from_yaml.max_age == 120
    assert from_yaml.latency_objective == 0.25
    assert from_yaml.constant_labels == {"track": "canary", "release": "2.13.0"}


def test_defaults() -> None:
    s = config.load()
    assert (s.backend, s.precision, s.interval, s.timeout) == ("auto", "fp32", 10, 5)
    assert s.max_age == 30, "max_age defaults to three intervals"
    assert (s.listen_host, s.listen_port, s.telemetry_path) == ("", 9470, "/metrics")


def test_effective_config_round_trips(tmp_path: Path) -> None:
    settings = config.load(DATA / "valid-full.yaml")
    dumped = tmp_path / "effective.yaml"
    dumped.write_text(yaml.safe_dump(settings.effective()))
    again = config.load(dumped)
    assert {**again.__dict__, "source": ""} == {**settings.__dict__, "source": ""}


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("10s", 10), ("500ms", 0.5), ("1m30s", 90), ("2h", 7200), ("1.5s", 1.5), (3, 3)],
)
def test_durations(text: str | int, seconds: float) -> None:
    assert documents.parse_duration(text) == seconds
    assert documents.parse_duration(documents.format_duration(seconds)) == seconds


def test_precedence_flag_over_env_over_file_over_default(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("interval: 30s\ntimeout: 3s\nlatency_objective: 200ms\n")
    runner = CliRunner()
    env = {"TRT_HEARTBEAT_INTERVAL": "20s", "TRT_HEARTBEAT_TIMEOUT": "4s"}
    result = runner.invoke(cli_group, ["check-config", str(path), "--interval", "15s"], env=env)
    assert result.exit_code == 0, result.output
    effective = yaml.safe_load(result.output)
    assert effective["interval"] == "15s"  # flag beats env and file
    assert effective["timeout"] == "4s"  # env beats file
    assert effective["latency_objective"] == "200ms"  # file beats default
    assert effective["precision"] == "fp32"  # default
    assert json.dumps(effective)  # printable, plain data


def test_a_file_over_1_mib_is_refused_unread(tmp_path: Path) -> None:
    path = tmp_path / "huge.yaml"
    path.write_text("# padding\n" * 120_000)
    with pytest.raises(ConfigError, match=r"huge.yaml: config file is larger than 1 MiB$"):
        config.load(path)


# The same text means the same duration in a file, a flag and an environment variable.
SAME_EVERYWHERE = [("2", 2.0), ("1.5", 1.5), ("2s", 2.0), ("1500ms", 1.5), ("1m30s", 90.0)]


@pytest.mark.parametrize(("text", "seconds"), SAME_EVERYWHERE)
@pytest.mark.parametrize("where", ["file", "flag", "environment"])
def test_a_duration_means_the_same_in_file_flag_and_environment(
    tmp_path: Path, where: str, text: str, seconds: float
) -> None:
    path = tmp_path / "c.yaml"
    # In a file a bare number is a YAML number; quoted, it is the text a flag would carry.
    path.write_text(f"interval: {text}\n" if where == "file" else "")
    args = ["check-config", str(path), "--timeout", "100ms"]
    env = {"TRT_HEARTBEAT_INTERVAL": text} if where == "environment" else {}
    if where == "flag":
        args += ["--interval", text]
    result = CliRunner().invoke(cli_group, args, env=env)
    assert result.exit_code == 0, result.output
    assert documents.parse_duration(yaml.safe_load(result.output)["interval"]) == seconds
    quoted = tmp_path / "q.yaml"
    quoted.write_text(f'interval: "{text}"\ntimeout: 100ms\n')
    assert config.load(quoted).interval == seconds


@pytest.mark.parametrize("text", ["nan", "inf", "-1", "1e400", "٣s", "2 s", "0x10", "1e3"])
@pytest.mark.parametrize("where", ["file", "flag", "environment"])
def test_a_bad_duration_is_refused_alike_everywhere(tmp_path: Path, where: str, text: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(f'interval: "{text}"\n' if where == "file" else "")
    args = ["serve", "--config", str(path)] + (["--interval", text] if where == "flag" else [])
    env = {"TRT_HEARTBEAT_INTERVAL": text} if where == "environment" else {}
    result = CliRunner().invoke(cli_group, args, env=env)
    assert result.exit_code == 2, result.output
    assert f"expected {DURATION}" in result.output


KEYS = [*config.schema()["properties"], "nvml", "web"]
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**30), 10**400),
    st.floats(allow_nan=True),
    st.text(alphabet=st.characters(codec="utf-8"), max_size=12),
    st.sampled_from(["10s", "٣s", "1e400", "+Inf", "-5", "0", "512MiB", ".nan", "all", "::1"]),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from([*KEYS, "x"]), inner, max_size=4)
    ),
    max_leaves=20,
)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.dictionaries(st.sampled_from(KEYS), VALUES, max_size=6), st.integers(0, 3))
def test_any_document_loads_or_is_one_clear_error(
    tmp_path: Path, document: dict[str, Any], aliases: int
) -> None:
    text = yaml.safe_dump(document, allow_unicode=True)
    if aliases:  # anchors and aliases, nested once per level
        text += "".join(
            f"z{i}: &z{i} [*z{i - 1}, *z{i - 1}]\n" if i else "z0: &z0 [1, 2]\n"
            for i in range(aliases)
        )
    path = tmp_path / "fuzz.yaml"
    path.write_text(text)
    try:
        config.load(path)
    except ConfigError as exc:
        message = str(exc)
        assert (
            message.startswith(f"{path}: ") and "\n" not in message and "Traceback" not in message
        )


# The same list means the same in a file (YAML), a flag and an environment variable (commas).
SAME_LISTS = [
    ("histogram_phases", "total,compute", "[total, compute]", ["total", "compute"]),
    ("buckets", "coarse", "coarse", "coarse"),
    ("buckets", "1ms,0.01,250ms", "[1ms, 0.01, 250ms]", ["1ms", "10ms", "250ms"]),
]


@pytest.mark.parametrize(("key", "text", "in_file", "effective"), SAME_LISTS)
@pytest.mark.parametrize("where", ["file", "flag", "environment"])
def test_a_metrics_list_means_the_same_in_file_flag_and_environment(
    tmp_path: Path, where: str, key: str, text: str, in_file: str, effective: Any
) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(f"metrics:\n  {key}: {in_file}\n" if where == "file" else "")
    flag = f"--metrics.{key.replace('_', '-')}"
    args = ["check-config", str(path)] + ([flag, text] if where == "flag" else [])
    env = {f"TRT_HEARTBEAT_METRICS_{key.upper()}": text} if where == "environment" else {}
    result = CliRunner().invoke(cli_group, args, env=env)
    assert result.exit_code == 0, result.output
    assert yaml.safe_load(result.output)["metrics"][key] == effective


# #25 (14): each refused alike as a file key, a flag and an environment variable: one line, exit 2.
SAME_REFUSAL = [
    (
        "web.listen_address",
        "--web.listen-address",
        "TRT_HEARTBEAT_WEB_LISTEN_ADDRESS",
        "ünï:9470",
        LISTEN,
    ),
    (
        "web.listen_address",
        "--web.listen-address",
        "TRT_HEARTBEAT_WEB_LISTEN_ADDRESS",
        "ü" * 70 + ":9470",
        LISTEN,
    ),
    (
        "web.telemetry_path",
        "--web.telemetry-path",
        "TRT_HEARTBEAT_WEB_TELEMETRY_PATH",
        "//metrics",
        PATH,
    ),
    (
        "web.telemetry_path",
        "--web.telemetry-path",
        "TRT_HEARTBEAT_WEB_TELEMETRY_PATH",
        "/métrics",
        PATH,
    ),
    (
        "web.telemetry_path",
        "--web.telemetry-path",
        "TRT_HEARTBEAT_WEB_TELEMETRY_PATH",
        "/my metrics",
        PATH,
    ),
    ("timeout", "--timeout", "TRT_HEARTBEAT_TIMEOUT", "0.5ms", "must be at least 1ms"),
    ("timeout", "--timeout", "TRT_HEARTBEAT_TIMEOUT", "0.0001", "must be at least 1ms"),
]


@pytest.mark.parametrize(("key", "flag", "env", "value", "message"), SAME_REFUSAL)
@pytest.mark.parametrize("where", ["file", "flag", "environment"])
def test_a_bad_value_is_refused_alike_everywhere(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    where: str,
    key: str,
    flag: str,
    env: str,
    value: str,
    message: str,
) -> None:
    path = tmp_path / "c.yaml"
    section, _, leaf = key.rpartition(".")
    document: dict[str, Any] = {leaf: value}
    if section:
        document = {section: document}
    path.write_text(yaml.safe_dump(document, allow_unicode=True) if where == "file" else "")
    if where == "environment":
        monkeypatch.setenv(env, value)
    with pytest.raises(SystemExit) as info:
        main(["check-config", str(path), *([flag, value] if where == "flag" else [])])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert err.count("\n") == 1


def test_a_non_ascii_listen_host_exits_2_with_one_line() -> None:
    # It ended in a traceback from socket.bind, exit 1.
    result = cli("serve", "--web.listen-address", "ü" * 70 + ":9470", "--backend", "reference")
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


@pytest.mark.parametrize("name", sorted(config.RESERVED_LABELS))
def test_every_label_the_exporter_sets_is_refused_as_a_constant_label(name: str) -> None:
    with pytest.raises(ConfigError, match=f"constant_labels.{name}: label is set by the exporter"):
        config.load(None, {"constant_labels": {name: "x"}})


def test_every_label_name_the_collectors_use_is_reserved() -> None:
    # `type`, `name`, `pci_bus_id` and `compute_capability` (gpu_info, gpu_ecc_errors) were
    # missing: a constant label of that name silently overwrote the GPU's. Every list or tuple
    # of label names in collector.py counts.
    import ast
    import re

    source = (Path(config.__file__).parent / "collector.py").read_text()
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if (
            isinstance(node, (ast.List, ast.Tuple))
            and node.elts
            and all(
                isinstance(e, ast.Starred)
                or (isinstance(e, ast.Constant) and isinstance(e.value, str))
                for e in node.elts
            )
        ):
            names |= {str(e.value) for e in node.elts if isinstance(e, ast.Constant)}
    labels = {n for n in names if re.fullmatch(r"[a-z_]+", n)}
    assert {"gpu", "uuid", "type", "name", "pci_bus_id", "compute_capability"} <= labels
    assert labels <= config.RESERVED_LABELS


@pytest.mark.parametrize("value", ["a\nb", "a\tb", "a\x00b", "a\x7fb", "a\u2028b", "a\x85b"])
def test_a_control_character_in_a_label_value_is_refused(value: str) -> None:
    with pytest.raises(ConfigError, match=r"constant_labels\.track: control character"):
        config.load(None, {"constant_labels": {"track": value}})


def test_label_bounds_are_inclusive() -> None:
    labels = {f"l{i}": "v" * 1024 for i in range(32)}
    assert config.load(None, {"constant_labels": labels}).constant_labels == labels


@pytest.mark.parametrize("path", ["/metrics", "/metrics/", "/a/b-c_d.e~", "/x:y@z", "/probe;v=1"])
def test_reachable_telemetry_paths_are_accepted(path: str) -> None:
    assert config.load(None, {"web": {"telemetry_path": path}}).telemetry_path == path


def test_a_1ms_timeout_is_accepted() -> None:
    assert config.load(None, {"timeout": "1ms", "nvml": {"timeout": "1ms"}}).timeout == 0.001


def test_every_default_lives_in_the_schema() -> None:
    """The schema is the one home of the defaults; the code's own (Settings' field defaults,
    the state's histogram phases) agree with it."""
    schema = config.schema()
    missing = []
    for key, node in schema["properties"].items():
        children = node.get("properties")
        for sub, child in (children or {key: node}).items():
            if "default" not in child and key not in ("max_age", "engine_cache_dir"):
                missing.append(f"{key}.{sub}" if children else key)
    assert missing == []
    # A default is a value the file itself accepts (an editor may write it in).
    config.validate(config.DEFAULTS)
    loaded = config.load()
    assert loaded.histogram_phases == HISTOGRAM_PHASES == config.Settings.histogram_phases
    assert loaded.buckets == BUCKET_SETS["default"] == config.Settings.buckets
