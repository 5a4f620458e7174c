"""Container image and Kubernetes manifests: schemas, probes and ports, generated resources,
relabeling, and the node-problem-detector plugin contract."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import tomllib
import yaml

from conftest import ROOT, cli_env, require
from trt_heartbeat.exporter import config

DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
BUILT_IN = {"ConfigMap", "DaemonSet", "Deployment", "Service"}


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def manifests() -> list[tuple[Path, dict[str, Any]]]:
    files = [
        p
        for p in sorted(K8S.rglob("*.yaml"))
        if p.parent.name != "options" and p.name != "kustomization.yaml"
    ]
    return [(p, d) for p in files for d in documents(p)]


def find(kind: str, name: str | None = None) -> dict[str, Any]:
    return next(
        d
        for _, d in manifests()
        if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    )


@pytest.mark.parametrize(
    ("path", "doc"),
    [m for m in manifests() if m[1]["kind"] in BUILT_IN],
    ids=lambda v: v.name if isinstance(v, Path) else v["kind"],
)
def test_built_in_resources_validate_strictly(path: Path, doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


def test_every_resource_kind_is_checked() -> None:
    kinds = {d["kind"] for _, d in manifests()}
    assert kinds == BUILT_IN | {"ServiceMonitor", "PodMonitor", "PrometheusRule"}


def test_kustomization_lists_existing_files() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    for resource in kustomization["resources"]:
        assert (K8S / resource).exists(), resource


def test_build_engine_init_patch_makes_a_valid_daemonset() -> None:
    daemonset = copy.deepcopy(find("DaemonSet"))
    patch = yaml.safe_load((K8S / "options" / "build-engine-init.yaml").read_text())
    daemonset["spec"]["template"]["spec"]["initContainers"] = patch["spec"]["template"]["spec"][
        "initContainers"
    ]
    kubernetes_validate.validate(daemonset, kubernetes_validate.latest_version(), strict=True)
    init = daemonset["spec"]["template"]["spec"]["initContainers"][0]
    volumes = {v["name"] for v in daemonset["spec"]["template"]["spec"]["volumes"]}
    assert {m["name"] for m in init["volumeMounts"]} <= volumes
    assert init["args"][0] == "build-engine" and "--version-compatible" in init["args"]


def test_daemonset_probes_every_gpu_without_allocating_one() -> None:
    spec = find("DaemonSet")["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    assert "nvidia.com/gpu" not in json.dumps(container["resources"])
    assert spec["runtimeClassName"] == "nvidia"
    assert {"name": "NVIDIA_VISIBLE_DEVICES", "value": "all"} in container["env"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"]
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert container["resources"]["limits"]["memory"] and container["resources"]["requests"]


def _default_port() -> int:
    from trt_heartbeat.exporter import config

    return config.load().listen_port


@pytest.mark.parametrize(
    ("kind", "name"),
    [("DaemonSet", None), ("Deployment", "inference-stable"), ("Deployment", "inference-canary")],
)
def test_probes_hit_the_exporters_endpoints(kind: str, name: str | None) -> None:
    spec = find(kind, name)["spec"]["template"]["spec"]
    container = next(c for c in spec["containers"] if "serve" in c.get("args", []))
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert list(ports.values()) == [_default_port()]
    for probe, path in (
        ("startupProbe", "/ping"),
        ("livenessProbe", "/ping"),
        ("readinessProbe", "/health"),
    ):
        if probe not in container:
            assert kind == "Deployment" and probe == "readinessProbe"  # documented choice
            continue
        get = container[probe]["httpGet"]
        assert (get["path"], get["port"]) == (path, next(iter(ports)))
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300, "5 min engine build"


def test_exporter_config_in_the_configmap_is_valid(tmp_path: Path) -> None:
    from trt_heartbeat.exporter import config

    path = tmp_path / "config.yaml"
    path.write_text(find("ConfigMap", "trt-heartbeat-exporter")["data"]["config.yaml"])
    settings = config.load(path)
    mounts = find("DaemonSet")["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
    assert any(settings.engine_cache_dir.startswith(m["mountPath"]) for m in mounts)


def test_service_monitor_matches_the_service() -> None:
    service, monitor = find("Service"), find("ServiceMonitor")
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    ports = {p["name"] for p in service["spec"]["ports"]}
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= ports


def test_pod_monitor_matches_the_sidecars() -> None:
    monitor = find("PodMonitor")
    for name in ("inference-stable", "inference-canary"):
        template = find("Deployment", name)["spec"]["template"]
        assert (
            monitor["spec"]["selector"]["matchLabels"].items()
            <= template["metadata"]["labels"].items()
        )
        ports = {p["name"] for c in template["spec"]["containers"] for p in c.get("ports", [])}
        assert {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]} <= ports


def _relabel(rule: dict[str, Any], values: list[str]) -> str | None:
    """Prometheus relabeling: the joined source labels must match the anchored regex."""
    match = re.fullmatch(rule.get("regex", "(.*)"), rule.get("separator", ";").join(values))
    if not match:
        return None
    return re.sub(
        r"\$(\d)", lambda m: match.group(int(m.group(1))) or "", rule.get("replacement", "$1")
    )


def _relabeling(kind: str, target: str) -> dict[str, Any]:
    monitor = find(kind)
    endpoints = monitor["spec"].get("endpoints") or monitor["spec"]["podMetricsEndpoints"]
    rules: list[dict[str, Any]] = endpoints[0]["relabelings"]
    return next(r for r in rules if r.get("targetLabel") == target)


@pytest.mark.parametrize("kind", ["ServiceMonitor", "PodMonitor"])
@pytest.mark.parametrize(
    ("track", "role", "expected"),
    [
        ("canary", "", "canary"),
        ("", "stable", "stable"),
        ("stable", "canary", "stable"),
        ("", "", None),
    ],
)
def test_relabeling_sets_track_from_the_role_only(
    kind: str, track: str, role: str, expected: str | None
) -> None:
    # `track` is the role (stable/canary); the release (`version`) never lands there.
    rule = _relabeling(kind, "track")
    assert rule["sourceLabels"] == [
        "__meta_kubernetes_pod_label_track",
        "__meta_kubernetes_pod_label_role",
    ]
    assert _relabel(rule, [track, role]) == expected
    assert _relabeling(kind, "job")["replacement"] == "trt-heartbeat-exporter"


@pytest.mark.parametrize(
    ("version", "app_version", "expected"),
    [("v2", "", "v2"), ("", "2.14.0", "2.14.0"), ("v1", "2.13.0", "v1"), ("", "", None)],
)
def test_pod_monitor_sets_the_release_apart_from_the_exporters_version(
    version: str, app_version: str, expected: str | None
) -> None:
    rule = _relabeling("PodMonitor", "service_version")
    assert _relabel(rule, [version, app_version]) == expected


def test_sidecar_example_pods_carry_role_and_release() -> None:
    labels = {
        name: find("Deployment", name)["spec"]["template"]["metadata"]["labels"]
        for name in ("inference-stable", "inference-canary")
    }
    assert {n: (lab["track"], lab["version"]) for n, lab in labels.items()} == {
        "inference-stable": ("stable", "v1"),
        "inference-canary": ("canary", "v2"),
    }


def test_generated_resources_are_in_sync() -> None:
    sys.path.insert(0, str(DEPLOY))
    try:
        import generate
    finally:
        sys.path.remove(str(DEPLOY))
    for name, text in generate.render().items():
        assert (K8S / name).read_text() == text, f"run python deploy/generate.py ({name})"


def test_prometheus_rule_is_a_valid_rule_file(tmp_path: Path) -> None:
    rule = find("PrometheusRule")
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    result = subprocess.run(
        [require("promtool"), "check", "rules", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboards_configmap_has_the_sidecar_label() -> None:
    configmap = find("ConfigMap", "trt-heartbeat-dashboards")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert {json.loads(v)["uid"] for v in configmap["data"].values()} == {
        "trt-heartbeat-fleet",
        "trt-heartbeat-canary",
    }


def test_dockerfile_targets() -> None:
    text = (ROOT / "Dockerfile").read_text()
    stages = re.findall(r"^FROM \S+ AS (\w+)$", text, re.MULTILINE)
    assert stages == ["base", "reference", "full", "jetson", "lean"], "lean is the default (last)"
    # arm64: no TensorRT lean wheels on PyPI, so that image installs the cuda backend alone.
    assert 'if [ "$TARGETARCH" = "arm64" ]; then pip install ".[gpu]"' in text
    jetson = text.split("AS jetson\n")[1].split("\nFROM ")[0]
    edge = ROOT / "deploy" / "edge" / "edge.yaml"
    assert f"COPY {edge.relative_to(ROOT)} /etc/trt-heartbeat/edge.yaml" in jetson
    assert config.load(edge).nvml_enabled is False and config.load(edge).backend == "cuda"
    extras = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    )
    for requested in re.findall(r'pip install "?\.\[([^\]]+)\]', text):
        assert set(requested.split(",")) <= extras, requested
    for stage in text.split("\nFROM ")[2:]:
        assert "\nUSER 65532:65532" in stage
    port = _default_port()
    assert f"EXPOSE {port}" in text and f"127.0.0.1:{port}/ping" in text
    assert 'ENTRYPOINT ["trt-heartbeat-exporter"]' in text


def test_npd_plugin_config() -> None:
    monitor = json.loads(
        (DEPLOY / "node-problem-detector" / "gpu-inference-monitor.json").read_text()
    )
    assert monitor["plugin"] == "custom"
    (condition,) = monitor["conditions"]
    assert condition["type"] == "GPUInferenceUnhealthy"
    (rule,) = monitor["rules"]
    assert rule["condition"] == condition["type"] and rule["type"] == "permanent"
    assert Path(rule["path"]).name == "check-gpu-inference.sh"
    assert (DEPLOY / "node-problem-detector" / Path(rule["path"]).name).exists()


def _plugin(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environment = cli_env(**env)
    environment["PATH"] = os.path.dirname(sys.executable) + os.pathsep + environment["PATH"]
    script = DEPLOY / "node-problem-detector" / "check-gpu-inference.sh"
    return subprocess.run(
        ["sh", str(script), *args], capture_output=True, text=True, timeout=60, env=environment
    )


def test_npd_plugin_exit_codes(tmp_path: Path) -> None:
    ok = _plugin("--backend", "reference")
    assert (ok.returncode, ok.stdout) == (0, "ok: 3 probes passed on 1 target(s)\n")
    faults = tmp_path / "f.json"
    faults.write_text('{"probe": "hang"}')
    bad = _plugin("--backend", "fault_backend:FaultBackend", TRT_HEARTBEAT_FAULT_FILE=str(faults))
    assert (bad.returncode, bad.stdout) == (1, "failed: gpu cpu: timeout\n")
    unknown = _plugin("--count", "many")
    assert unknown.returncode == 2 and unknown.stdout == ""


def test_make_run_installs_what_running_needs(tmp_path: Path) -> None:
    """`make run` installs the base package (with the gpu extra where a GPU is visible), never
    the test, lint or TensorRT extras: a fresh clone serves /metrics in seconds."""
    from trt_heartbeat.exporter.devices import gpu_visible

    venv = tmp_path / "venv"
    # Not as a sub-make of `make test`: no inherited flags, no "Entering directory" lines.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    command = ["make", "--no-print-directory", "-n", "run", f"VENV={venv}"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 0, result.stderr
    (install,) = [line for line in result.stdout.splitlines() if "pip install" in line]
    extras = "[gpu]" if gpu_visible() else ""
    assert install.endswith(f"pip install -q -e '.{extras}'"), install
    serve = result.stdout.splitlines()[-1]
    assert serve.split()[:2] == [f"{venv}/bin/trt-heartbeat-exporter", "serve"]
    assert ("--backend cuda" in serve) == gpu_visible()
    (said,) = [line for line in result.stdout.splitlines() if line.startswith("echo")]
    assert ("no GPU visible" not in said) == gpu_visible()
