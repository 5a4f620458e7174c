#!/usr/bin/env python3
"""GPU benchmark: probe latency per phase and the probe worker's device memory, per host API.

    python bench/bench_gpu.py [--probes 3000] [--json FILE]

Runs on a machine with an NVIDIA GPU (see docs/gpu-validation.md). Each measurement runs in its
own spawned process, as the exporter's workers do, so memory figures are per process:
  - bare context, default limits / stack limit 0: the floor a probe process can reach;
  - cuda backend after N probes: what a worker really holds (measured after probes, since a
    launch that needs stack grows the reservation again);
  - bare loop: the same backend's run() timed in a loop in one process, the baseline of the
    overhead ratio (exporter round trip / bare loop);
  - exporter round trip: probe total as the exporter measures it, through the worker pipe;
  - both again after the GPU sat idle for 10 ms before each probe, as between production probes;
  - process boundary alone: a worker that answers at once, over the same channel and wake-up
    handshake, the floor of any isolated probe;
  - host calls: each CUDA call a probe makes, alone, so run() can be read as their sum;
  - GPU duty cycle: GPU phases per probe over the probe interval.
Run it twice: the bare loop and the round trip run in different processes, on whatever cores
the scheduler picks, and the ratio moves by ±0.3 between runs.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing
import os
import platform
import statistics
import time
from typing import Any

MIB = 1 << 20
IDLE, IDLE_PROBES = 0.01, 300  # probes after the GPU sat idle for 10 ms


def _process_memory(uuid: str) -> int | None:
    import pynvml

    pynvml.nvmlInit()
    handle = pynvml.nvmlDeviceGetHandleByUUID(uuid)
    for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
        if proc.pid == os.getpid():
            return int(proc.usedGpuMemory)
    return None


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _stats(values: list[float]) -> dict[str, float]:
    return {"median_us": statistics.median(values) * 1e6, "p99_us": _pct(values, 0.99) * 1e6}


def _per_call(call: Any, times: int) -> float:
    """Seconds per call of `call()`, over `times` calls in a row."""
    t0 = time.perf_counter()
    for _ in range(times):
        call()
    return (time.perf_counter() - t0) / times


def bare_context(uuid: str, stack_zero: bool) -> dict[str, Any]:
    os.environ["CUDA_VISIBLE_DEVICES"] = uuid
    from cuda.bindings import driver as cu

    cu.cuInit(0)
    _, dev = cu.cuDeviceGet(0)
    _, ctx = cu.cuDevicePrimaryCtxRetain(dev)
    cu.cuCtxSetCurrent(ctx)
    if stack_zero:
        cu.cuCtxSetLimit(cu.CUlimit.CU_LIMIT_STACK_SIZE, 0)
    cu.cuCtxSynchronize()
    return {"gpu_memory_mib": (_process_memory(uuid) or 0) / MIB}


def backend_probes(uuid: str, api: str, probes: int) -> dict[str, Any]:
    os.environ["CUDA_VISIBLE_DEVICES"] = uuid
    from trt_heartbeat.domain import Target
    from trt_heartbeat.exporter import canonical
    from trt_heartbeat.exporter.backends import BackendOptions
    from trt_heartbeat.exporter.backends.cuda import CudaBackend

    backend = CudaBackend(Target("0", uuid), "fp32", BackendOptions(cuda_api=api))
    info = backend.prepare()
    phases: dict[str, list[float]] = {"h2d": [], "compute": [], "d2h": []}
    walls: list[float] = []
    failed = 0
    for i in range(probes + 100):
        t0 = time.perf_counter()
        result = backend.run()
        wall = time.perf_counter() - t0
        failed += not canonical.check_output(result.output, "fp32").passed
        if i >= 100:  # warm-up
            walls.append(wall)
            for name, value in result.phases.items():
                phases[name].append(value)
    # After the GPU sat idle, as between production probes: the same run() costs more, in the
    # driver and on the device (it does after a busy-wait as well, so not the CPU's sleep).
    idle_walls, idle_gpu = [], []
    for _ in range(IDLE_PROBES):
        time.sleep(IDLE)
        t0 = time.perf_counter()
        result = backend.run()
        idle_walls.append(time.perf_counter() - t0)
        idle_gpu.append(sum(result.phases.values()))
        failed += not canonical.check_output(result.output, "fp32").passed
    reading = backend.memory()
    host, view, io = backend._host, backend._memory, backend._io
    assert host is not None and view is not None and io is not None
    # The reading after each probe (the worker takes it once the answer is sent), its
    # cuMemGetInfo alone, and NVML's per-process list, which gives the worker's footprint
    # (asked at most every 10 s).
    memory = _per_call(backend.memory, probes)
    memory_info = _per_call(host.memory_info, probes)
    nvml_process = _per_call(view._ask, probes)
    calls = host_calls(backend, host, io, probes)
    backend.close()
    return {
        "gpu": info.details.get("gpu_name"),
        "failed": failed,
        "phases": {k: _stats(v) for k, v in phases.items()},
        # The same backend in a bare loop in one process: the baseline of the overhead ratio.
        "bare_loop": _stats(walls),
        "gpu_time": _stats([sum(p) for p in zip(*phases.values(), strict=True)]),
        "bare_loop_after_idle": _stats(idle_walls),
        "gpu_time_after_idle": _stats(idle_gpu),
        "gpu_memory_mib": (reading.held_bytes or 0) / MIB,
        "gpu_memory_source": reading.held_source,
        "memory_reading_us": memory * 1e6,
        "memory_info_us": memory_info * 1e6,
        "nvml_process_list_us": nvml_process * 1e6,
        "device_memory_mib": [v / MIB for v in reading.device or ()],
        "host_calls_us": calls,
    }


def host_calls(backend: Any, host: Any, io: Any, probes: int) -> dict[str, float]:
    """Host time of each call a probe makes, alone, in µs: what run() is made of. Asynchronous
    calls are timed in batches of 100 with a synchronize after each batch (untimed), so the
    stream's queue never fills."""

    def batched(call: Any) -> float:
        total = 0.0
        for _ in range(max(1, probes // 100)):
            total += _per_call(call, 100)
            host.synchronize()
        return total / max(1, probes // 100) * 1e6

    # Events recorded on an idle, synchronized stream, as at the end of a probe.
    for i in range(4):
        host.record(i)
    host.synchronize()
    return {
        "record": batched(lambda: host.record(0)),
        "h2d": batched(lambda: host.h2d(io.dev_in, io.host_in)),
        "launch": batched(backend._compute),
        "d2h": batched(lambda: host.d2h(io.host_out, io.dev_out)),
        "synchronize (idle stream)": _per_call(host.synchronize, probes) * 1e6,
        "elapsed": _per_call(lambda: host.elapsed(0, 1), probes) * 1e6,
        "copy of the output": _per_call(io.host_out.copy, probes) * 1e6,
    }


def exporter_round_trip(uuid: str, index: str, api: str, probes: int) -> dict[str, Any]:
    from trt_heartbeat.domain import Target
    from trt_heartbeat.exporter.backends import BackendOptions, resolve_spec
    from trt_heartbeat.exporter.timed_probe import run_probe
    from trt_heartbeat.exporter.worker import Worker, WorkerSpec

    spec = WorkerSpec(
        resolve_spec("cuda"),
        Target(index, uuid),
        "fp32",
        BackendOptions(cuda_api=api),
        bind_gpu=True,
    )
    worker = Worker(spec)
    worker.start()
    _, load = worker.wait_ready(120, lambda: True)
    out: dict[str, Any] = {"engine_load_s": load}
    try:
        for name, count, idle in (("", probes + 100, 0.0), ("_after_idle", IDLE_PROBES, IDLE)):
            totals, overhead = [], []
            for i in range(count):
                time.sleep(idle)
                record = run_probe(worker, "fp32", 5, lambda: True).record
                assert record.result == "success", record
                if i >= count - probes:  # warm-up: the first 100 back to back
                    totals.append(record.phases["total"])
                    gpu = sum(record.phases[p] for p in ("h2d", "compute", "d2h"))
                    overhead.append(record.phases["total"] - gpu)
            out[f"total{name}"], out[f"host_overhead{name}"] = _stats(totals), _stats(overhead)
    finally:
        worker.close()
    return out


def _echo(conn: Any) -> None:
    """A worker that answers at once, over the same channel and wake-up handshake."""
    from trt_heartbeat.exporter.channel import Channel
    from trt_heartbeat.exporter.worker import _WAKE_SPIN

    channel = Channel(conn.fileno())
    answer = ("ok", bytes(512), "<f4", (8, 16), (("h2d", 0.0), ("compute", 0.0), ("d2h", 0.0)))
    while (command := channel.recv()) in ("wake", "probe"):
        if command == "wake":
            channel.send("awake")
            channel.spin(_WAKE_SPIN)
        else:
            channel.send(answer)
            channel.send(("memory", None))


def pipe_floor(probes: int) -> dict[str, float]:
    """What the process boundary alone costs per round trip, timed as the exporter times it."""
    from trt_heartbeat.exporter.channel import Channel
    from trt_heartbeat.exporter.worker import _SPIN

    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    process = ctx.Process(target=_echo, args=(child,), daemon=True)
    process.start()
    channel = Channel(parent.fileno())

    def receive() -> Any:
        if not channel.spin(_SPIN):
            channel.poll(1.0)
        return channel.recv()

    times = []
    for i in range(probes + 100):
        time.sleep(0.001)  # the worker is idle between probes
        channel.send("wake")
        receive()
        t0 = time.perf_counter()
        channel.send("probe")
        receive()
        if i >= 100:
            times.append(time.perf_counter() - t0)
        receive()
    channel.send("stop")
    process.join(5)
    return _stats(times)


def _in_child(fn: Any, *args: Any) -> Any:
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:
        return pool.apply_async(fn, args).get(timeout=600)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--probes", type=int, default=3000)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    from trt_heartbeat.exporter import gpus

    first = gpus.discover()[0]
    index, uuid = first.index, first.uuid
    apis = ["cuda-python"] + (["pycuda"] if importlib.util.find_spec("pycuda") else [])
    results: dict[str, Any] = {
        "python": platform.python_version(),
        "probes": args.probes,
        "bare_context_default": _in_child(bare_context, uuid, False),
        "bare_context_stack0": _in_child(bare_context, uuid, True),
        "pipe_floor": pipe_floor(args.probes),
    }
    for api in apis:
        results[f"cuda_backend[{api}]"] = _in_child(backend_probes, uuid, api, args.probes)
        results[f"round_trip[{api}]"] = exporter_round_trip(uuid, str(index), api, args.probes)
    text = json.dumps(results, indent=2)
    if args.json:
        with open(args.json, "w") as fh:
            fh.write(text)
    print(text)
    rows = [
        (
            "bare context, default limits",
            f"{results['bare_context_default']['gpu_memory_mib']:.0f} MiB",
        ),
        (
            "bare context, stack limit 0",
            f"{results['bare_context_stack0']['gpu_memory_mib']:.0f} MiB",
        ),
    ]
    for api in apis:
        b, r = results[f"cuda_backend[{api}]"], results[f"round_trip[{api}]"]
        memory = f"{b['gpu_memory_mib']:.0f} MiB ({b['gpu_memory_source']})"
        rows.append((f"cuda backend [{api}] after {args.probes} probes", memory))
        for phase, s in b["phases"].items():
            rows.append(
                (f"[{api}] {phase}", f"{s['median_us']:.1f} µs median, {s['p99_us']:.1f} µs p99")
            )
        total, bare, gpu = r["total"], b["bare_loop"], b["gpu_time"]
        rows.append(
            (
                f"[{api}] bare loop, one process (run() wall time)",
                f"{bare['median_us']:.0f} µs median, {bare['p99_us']:.0f} µs p99",
            )
        )
        rows.append(
            (
                f"[{api}] exporter round trip (`total`)",
                f"{total['median_us']:.0f} µs median, {total['p99_us']:.0f} µs p99",
            )
        )
        rows.append(
            (
                f"[{api}] after {IDLE * 1e3:g} ms idle: bare loop / round trip / GPU phases",
                f"{b['bare_loop_after_idle']['median_us']:.0f} / "
                f"{r['total_after_idle']['median_us']:.0f} / "
                f"{b['gpu_time_after_idle']['median_us']:.0f} µs median",
            )
        )
        rows.append(
            (
                f"[{api}] overhead ratio round trip / bare loop",
                f"{total['median_us'] / bare['median_us']:.2f}x "
                f"(+{total['median_us'] - bare['median_us']:.0f} µs per probe)",
            )
        )
        for interval in (10.0, 1.0):
            rows.append(
                (
                    f"[{api}] GPU duty cycle at a {interval:g} s interval",
                    f"{gpu['median_us'] * 1e-6 / interval:.2e} "
                    f"({gpu['median_us']:.0f} µs of GPU phases per probe)",
                )
            )
        rows.append((f"[{api}] failed probes", str(b["failed"])))
        rows.append(
            (
                f"[{api}] memory reading after the answer (not in run())",
                f"{b['memory_reading_us']:.1f} µs, of which cuMemGetInfo "
                f"{b['memory_info_us']:.1f} µs",
            )
        )
        for call, us in b["host_calls_us"].items():
            rows.append((f"[{api}] host call: {call}", f"{us:.1f} µs"))
    floor = results["pipe_floor"]
    rows.append(
        (
            "process boundary alone (echo worker round trip)",
            f"{floor['median_us']:.0f} µs median, {floor['p99_us']:.0f} µs p99",
        )
    )
    print("\n| measurement | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    main()
