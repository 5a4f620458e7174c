"""`serve` as users run it, on a real GPU, for the GPU tests: a fixture and its handle."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import cli_env, wait_for


class Served:
    def __init__(self, process: subprocess.Popen[str], port: int, log: Path) -> None:
        self.process, self.log = process, log
        self.url = f"http://127.0.0.1:{port}"

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=5) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as err:
            return err.code, err.read()

    def samples(self) -> dict[str, list[tuple[dict[str, str], float]]]:
        out: dict[str, list[tuple[dict[str, str], float]]] = {}
        for family in text_string_to_metric_families(self.get("/metrics")[1].decode()):
            for s in family.samples:
                out.setdefault(s.name, []).append((s.labels, s.value))
        return out


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., Served]]:
    processes: list[subprocess.Popen[str]] = []

    def start(*args: str) -> Served:
        log = tmp_path / f"serve{len(processes)}.log"
        with log.open("w") as sink:
            process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "trt_heartbeat",
                    "serve",
                    "--web.listen-address",
                    "127.0.0.1:0",
                    "--log.format",
                    "json",
                    *args,
                ],
                stdout=sink,
                stderr=subprocess.STDOUT,
                text=True,
                env=cli_env(),
            )
        processes.append(process)

        def port() -> int | None:
            match = re.search(r'"msg": "listening".*"port": (\d+)', log.read_text())
            assert process.poll() is None, log.read_text()
            return int(match.group(1)) if match else None

        return Served(process, wait_for(port, timeout=60, what="listening"), log)

    yield start
    for process in processes:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()


# Run as `python -c HOG <bytes>` on a GPU: holds all of GPU 0's memory but <bytes> (another
# tenant of the GPU), prints what is left free, and sleeps until killed.
HOG = r"""
import sys, time
from cuda.bindings import driver as cu
leave = int(sys.argv[1])
cu.cuInit(0); _, dev = cu.cuDeviceGet(0); _, ctx = cu.cuDevicePrimaryCtxRetain(dev)
cu.cuCtxSetCurrent(ctx)
held = []
while True:
    _, free, total = cu.cuMemGetInfo()
    want = free - leave
    if want < (1 << 20):
        break
    err, ptr = cu.cuMemAlloc(min(want, 1 << 30))
    if err != cu.CUresult.CUDA_SUCCESS:
        break
    held.append(ptr)
_, free, _ = cu.cuMemGetInfo()
print(free, flush=True)
time.sleep(3600)
"""
