#!/usr/bin/env python3
"""Alertmanager webhook -> pause the rollout. Standard library only; runs as a small Deployment
(rules/rollouts/pause-webhook.yaml) with RBAC to patch Rollouts, or anywhere with kubectl.

For each firing alert labelled action="pause-rollout" it pauses the rollout named by the alert's
`service` label (or --name-label) in its `namespace` (or --namespace):
  --mode argo:     kubectl argo rollouts pause NAME -n NAMESPACE
  --mode flagger:  POST {"name", "namespace"} to the Flagger load tester's /gate/close, which
                   holds a Canary whose confirm-traffic-increase hook points at /gate/check.
Pausing is idempotent, so Alertmanager's repeats are harmless; an action that fails answers 500
so Alertmanager retries. Rolling back stays a human decision (the canary procedure).

    python3 pause_webhook.py --listen :8080 --mode argo
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

log = logging.getLogger("pause-webhook")


def targets(payload: dict[str, Any], name_label: str, namespace: str) -> list[tuple[str, str]]:
    """(name, namespace) of every rollout a notification asks to pause, once each."""
    found = []
    for alert in payload.get("alerts", []):
        labels = alert.get("labels", {})
        if alert.get("status") != "firing" or labels.get("action") != "pause-rollout":
            continue
        name = labels.get(name_label)
        if name and (name, labels.get("namespace", namespace)) not in found:
            found.append((name, labels.get("namespace", namespace)))
    return found


def pause(mode: str, name: str, namespace: str, kubectl: str, gate: str) -> None:
    if mode == "argo":
        subprocess.run(
            [kubectl, "argo", "rollouts", "pause", name, "-n", namespace],
            check=True,
            capture_output=True,
            text=True,
            timeout=30,
        )
    else:
        body = json.dumps({"name": name, "namespace": namespace}).encode()
        request = urllib.request.Request(
            gate.rstrip("/") + "/gate/close",
            data=body,
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30):
            pass


def serve(args: argparse.Namespace) -> None:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/-/healthy" else 404)
            self.end_headers()

        def do_POST(self) -> None:
            try:
                length = int(self.headers.get("Content-Length", "0"))
                payload = json.loads(self.rfile.read(min(length, 1 << 20)))
            except ValueError:
                self.send_response(400)
                self.end_headers()
                return
            status = 200
            for name, namespace in targets(payload, args.name_label, args.namespace):
                try:
                    pause(args.mode, name, namespace, args.kubectl, args.flagger_gate)
                    log.warning("paused rollout %s/%s (%s)", namespace, name, args.mode)
                except (OSError, subprocess.SubprocessError) as exc:
                    detail = getattr(exc, "stderr", "") or exc
                    log.error("could not pause %s/%s: %s", namespace, name, str(detail).strip())
                    status = 500
            self.send_response(status)
            self.end_headers()

        def log_message(self, *_: Any) -> None:
            pass

    host, _, port = args.listen.rpartition(":")
    server = ThreadingHTTPServer((host, int(port)), Handler)
    log.warning("listening on %s, mode %s", args.listen, args.mode)
    server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default=":8080")
    parser.add_argument("--mode", choices=["argo", "flagger"], default="argo")
    parser.add_argument("--kubectl", default="kubectl", help="kubectl with the argo plugin")
    parser.add_argument(
        "--flagger-gate",
        default="http://flagger-loadtester.test",
        help="base URL of the Flagger load tester",
    )
    parser.add_argument(
        "--name-label", default="service", help="alert label that names the Rollout or Canary"
    )
    parser.add_argument("--namespace", default="default", help="when the alert has none")
    args = parser.parse_args()
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s")
    serve(args)


if __name__ == "__main__":
    main()
