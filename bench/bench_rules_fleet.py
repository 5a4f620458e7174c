#!/usr/bin/env python3
"""The rule pack's cost on a synthetic fleet: a real Prometheus scraping N GPUs, evaluating rules/.

One real exporter (the test backend reporting GPU phases, the stand-in NVML for GPU identity and
memory) is scraped once; its series for one GPU, and those it exports once per node, become the
template of every node of the fleet (8 GPUs each, counters and histograms growing with time). A
loopback server answers each node's scrape; Prometheus (Debian's, as `make test` uses) scrapes and
evaluates every 15 s with every file of rules/ unchanged. After `--minutes`, it reports head series
(per GPU), rule evaluation per round and per minute (each group at its own interval), the
costliest groups and rules, and Prometheus' RSS. Group durations are averaged over the last
`--average` minutes of the run. One node in ten carries `track="canary"`, the others
`track="stable"`, so the canary rules compare real pools. Windows longer than the run are only
partly filled: the pack reads per-GPU series over at most 15 minutes (docs/scaling.md), so runs
of 15 minutes or more show its steady cost; compare runs of the same length.

    python bench/bench_rules_fleet.py [--gpus 1000] [--minutes 4] [--average 2] [--json out.json]

Issue #26's goals: at most 1 s of rule evaluation per minute per 1,000 GPUs, at most 90 head
series per GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import yaml

from loadgen import serve_process

ROOT = Path(__file__).resolve().parent.parent
GPUS_PER_NODE, INTERVAL = 8, 15
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})? (\S+)$")
_GROWS = ("_total", "_count", "_bucket", "_sum")


def real_scrape(work: Path) -> str:
    """/metrics of a real exporter probing two (stand-in) GPUs, after a few probes."""
    control = work / "faults.json"
    control.write_text(json.dumps({"gpu_phases": True}))
    os.environ["TRT_HEARTBEAT_FAULT_FILE"] = str(control)
    tests = ROOT / "tests"
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(tests / "e2e" / "fake_pynvml"), str(tests), str(ROOT / "exporter")]
    )
    (work / "config.yaml").write_text("nvml: {enabled: true}\ninterval: 1s\ntimeout: 500ms\n")
    process, port = serve_process(
        [
            "--backend",
            "fault_backend:FaultBackend",
            "--gpus",
            "0,1",
            "--config",
            str(work / "config.yaml"),
        ],
        work / "exporter.log",
    )
    try:
        time.sleep(6)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            return str(r.read().decode())
    finally:
        process.terminate()
        process.wait(10)


def templates(text: str) -> tuple[list[tuple[str, str, float]], list[tuple[str, str, float]]]:
    """(name, labels, value) of one GPU's series (uuid GPU-fake-0) and of the per-node ones."""
    gpu, node = [], []
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if not match or line.startswith("#"):
            continue
        name, labels, value = match[1], match[2] or "", float(match[3])
        if 'uuid="GPU-fake-0"' in labels:
            gpu.append((name, labels, value))
        elif "uuid=" not in labels and 'gpu="' not in labels:
            node.append((name, labels, value))
    return gpu, node


def render(
    gpu: list[tuple[str, str, float]],
    node: list[tuple[str, str, float]],
    index: int,
    elapsed: float,
) -> bytes:
    grow = 1 + elapsed / 60
    lines = []
    for name, labels, value in node:
        v = value * grow if name.endswith(_GROWS) else value
        lines.append(f"{name}{labels} {v}")
    for g in range(GPUS_PER_NODE):
        for name, labels, value in gpu:
            relabeled = labels.replace('uuid="GPU-fake-0"', f'uuid="GPU-{index}-{g}"').replace(
                'gpu="0"', f'gpu="{g}"'
            )
            v = value * grow if name.endswith(_GROWS) else value
            lines.append(f"{name}{relabeled} {v}")
    return ("\n".join(lines) + "\n").encode()


def fleet_server(gpu: list[Any], node: list[Any], started: float) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            index = int(self.path.rsplit("/", 1)[-1])
            body = render(gpu, node, index, time.monotonic() - started)
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def query(url: str, promql: str) -> list[dict[str, Any]]:
    full = url + "/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(full, timeout=30) as r:
        result: list[dict[str, Any]] = json.load(r)["data"]["result"]
        return result


def rule_costs(url: str) -> dict[str, tuple[str, float, float]]:
    """Each rule's last evaluation: rule -> (when, seconds, evaluations a minute)."""
    with urllib.request.urlopen(url + "/api/v1/rules", timeout=30) as r:
        groups = json.load(r)["data"]["groups"]
    return {
        f"{group['name']}/{rule.get('name', '')}": (
            rule["lastEvaluation"],
            rule["evaluationTime"],
            60 / group["interval"],
        )
        for group in groups
        for rule in group["rules"]
    }


def costliest_rules(
    samples: list[dict[str, tuple[str, float, float]]], top: int = 10
) -> dict[str, float]:
    """The rules that cost most per minute: the mean of each rule's distinct evaluations seen
    (the rules API reports only the last one) times its group's evaluations a minute."""
    seen: dict[str, dict[str, float]] = {}
    per_minute: dict[str, float] = {}
    for sample in samples:
        for rule, (when, seconds, rate) in sample.items():
            seen.setdefault(rule, {})[when] = seconds
            per_minute[rule] = rate
    cost = {
        rule: sum(times.values()) / len(times) * per_minute[rule] for rule, times in seen.items()
    }
    ranked = sorted(cost.items(), key=lambda kv: -kv[1])[:top]
    return {name: round(seconds, 4) for name, seconds in ranked}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gpus", type=int, default=1000)
    parser.add_argument("--minutes", type=float, default=4.0)
    parser.add_argument(
        "--average",
        type=float,
        default=2.0,
        help="minutes at the end of the run that group durations are averaged over",
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        raise SystemExit("needs prometheus (Debian package prometheus)")
    work = Path(tempfile.mkdtemp(prefix="bench-rules-fleet-"))
    gpu, node = templates(real_scrape(work))
    nodes = max(1, args.gpus // GPUS_PER_NODE)
    server = fleet_server(gpu, node, time.monotonic())
    port = server.server_address[1]
    config = {
        "global": {
            "scrape_interval": f"{INTERVAL}s",
            "evaluation_interval": f"{INTERVAL}s",
            "scrape_timeout": "10s",
        },
        "rule_files": [str(p) for p in sorted((ROOT / "rules").glob("*.rules.yml"))],
        "scrape_configs": [
            {
                "job_name": "trt-heartbeat-exporter",
                "static_configs": [
                    {
                        "targets": [f"127.0.0.1:{port}"],
                        "labels": {
                            "__metrics_path__": f"/node/{i}",
                            "instance": f"node-{i}:9470",
                            "node": f"node-{i}",
                            "namespace": "gpu-system",
                            "track": "canary" if i % 10 == 0 else "stable",
                        },
                    }
                    for i in range(nodes)
                ],
            },
            {"job_name": "prometheus", "static_configs": [{"targets": ["127.0.0.1:19090"]}]},
        ],
    }
    (work / "prometheus.yml").write_text(yaml.safe_dump(config))
    with (work / "prometheus.log").open("w") as log:
        process = subprocess.Popen(
            [
                prometheus,
                f"--config.file={work / 'prometheus.yml'}",
                f"--storage.tsdb.path={work / 'data'}",
                "--web.listen-address=127.0.0.1:19090",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = "http://127.0.0.1:19090"
    try:
        # Every rule's evaluations over the averaging window, polled every 10 s.
        averaging_from = time.monotonic() + (args.minutes - args.average) * 60
        time.sleep(max(0.0, averaging_from - time.monotonic()))
        samples = []
        while time.monotonic() < averaging_from + args.average * 60:
            samples.append(rule_costs(url))
            time.sleep(10)
        window = f"{max(1, round(args.average * 60))}s"
        averaged = f"avg_over_time(prometheus_rule_group_last_duration_seconds[{window}])"
        groups = {
            r["metric"]["rule_group"].rsplit(";", 1)[-1]: float(r["value"][1])
            for r in query(url, averaged)
        }
        rules = costliest_rules(samples)
        intervals = {
            r["metric"]["rule_group"].rsplit(";", 1)[-1]: float(r["value"][1])
            for r in query(url, "prometheus_rule_group_interval_seconds")
        }
        head = float(query(url, "prometheus_tsdb_head_series")[0]["value"][1])
        rss = float(query(url, 'process_resident_memory_bytes{job="prometheus"}')[0]["value"][1])
        missed = sum(
            float(r["value"][1])
            for r in query(url, "prometheus_rule_group_iterations_missed_total")
        )
    finally:
        process.terminate()
        process.wait(30)
        server.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    gpus = nodes * GPUS_PER_NODE
    per_round = sum(groups.values())
    # Each group at its own interval (the latency group evaluates once a minute).
    per_minute = sum(d * 60 / intervals.get(g, INTERVAL) for g, d in groups.items())
    result = {
        "gpus": gpus,
        "exported_series_per_gpu": len(gpu),
        "per_node_series": len(node),
        "head_series": int(head),
        "head_series_per_gpu": round(head / gpus, 1),
        "rule_evaluation_per_round_s": round(per_round, 3),
        "rule_evaluation_per_minute_s": round(per_minute, 3),
        "per_minute_per_1000_gpus_s": round(per_minute * 1000 / gpus, 3),
        "missed_iterations": missed,
        "prometheus_rss_mib": round(rss / 2**20, 1),
        "groups_s": dict(sorted(groups.items(), key=lambda kv: -kv[1])),
        "costliest_rules_per_minute_s": rules,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
