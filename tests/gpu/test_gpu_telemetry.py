"""NVML telemetry on a real GPU, against nvidia-smi read in the same run."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import cli_env, wait_for

pytestmark = pytest.mark.gpu
QUERY = (
    "index,uuid,name,pci.bus_id,compute_cap,memory.total,memory.used,memory.free,"
    "utilization.gpu,temperature.gpu,power.draw"
)


def smi() -> dict[str, str]:
    command = ["nvidia-smi", f"--query-gpu={QUERY}", "--format=csv,noheader,nounits", "-i", "0"]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return dict(zip(QUERY.split(","), (v.strip() for v in out.split(",")), strict=True))


def test_nvml_values_match_nvidia_smi(tmp_path: Path) -> None:
    log = tmp_path / "serve.log"
    with log.open("w") as sink:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "trt_heartbeat",
                "serve",
                "--backend",
                "cuda",
                "--gpus",
                "0",
                "--web.listen-address",
                "127.0.0.1:0",
                "--log.format",
                "json",
                "--interval",
                "1s",
                "--timeout",
                "900ms",
            ],
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=cli_env(),
        )
    try:
        port = wait_for(
            lambda: (m := re.search(r'"port": (\d+)', log.read_text())) and int(m.group(1)),
            timeout=60,
        )
        url = f"http://127.0.0.1:{port}/metrics"

        def scrape() -> dict[str, tuple[dict[str, str], float]]:
            with urllib.request.urlopen(url, timeout=5) as response:
                text = response.read().decode()
            return {
                s.name: (s.labels, s.value)
                for f in text_string_to_metric_families(text)
                for s in f.samples
                if s.labels.get("gpu", "0") == "0"
            }

        wait_for(
            lambda: (
                scrape().get("trt_heartbeat_nvml_up", ({}, 0))[1] == 1
                and scrape().get("trt_heartbeat_up", ({}, 0))[1] == 1
            ),
            timeout=90,
        )
        # Compare a reading taken after the probe worker holds its context, not one from before.
        probing = time.time()
        wait_for(
            lambda: scrape()["trt_heartbeat_nvml_last_success_timestamp_seconds"][1] > probing,
            timeout=30,
        )
        ours, theirs = scrape(), smi()
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=20)
    mib = 1 << 20
    info = ours["trt_heartbeat_gpu_info"][0]
    assert info["uuid"] == theirs["uuid"] and info["name"] == theirs["name"]
    assert info["pci_bus_id"].lower() == theirs["pci.bus_id"].lower()
    assert info["compute_capability"] == theirs["compute_cap"]
    assert ours["trt_heartbeat_gpu_memory_total_bytes"][1] // mib == int(theirs["memory.total"])
    # Used memory moves between the two reads (probe workers, other tenants): a small window.
    used = ours["trt_heartbeat_gpu_memory_used_bytes"][1] / mib
    assert abs(used - float(theirs["memory.used"])) <= 64, (used, theirs["memory.used"])
    assert (
        abs(ours["trt_heartbeat_gpu_temperature_celsius"][1] - float(theirs["temperature.gpu"]))
        <= 5
    )
    build = ours["trt_heartbeat_build_info"][0]
    assert build["driver_version"] and build["cuda_driver_version"]
    probe_memory = ours["trt_heartbeat_probe_gpu_memory_bytes"][1]
    assert 0 < probe_memory <= 300 * mib
    out = os.environ.get("OUT")
    if out:
        record = {
            "exporter": {k: v[1] for k, v in ours.items() if k.startswith("trt_heartbeat_gpu_")},
            "gpu_info": info,
            "build_info": build,
            "probe_gpu_memory_bytes": probe_memory,
            "nvidia_smi": theirs,
        }
        Path(out, "nvml-vs-smi.json").write_text(json.dumps(record, indent=2))
