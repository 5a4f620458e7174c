"""The worker process frame, driven through real spawned processes and the fault backend."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from conftest import FAULT_SPEC, Faults
from trt_heartbeat.domain import Target
from trt_heartbeat.errors import Reason
from trt_heartbeat.exporter.timed_probe import run_probe
from trt_heartbeat.exporter.worker import Worker, WorkerAborted, WorkerFailure, WorkerSpec


def always() -> bool:
    return True


@pytest.fixture
def worker(faults: Faults) -> Iterator[Worker]:
    w = Worker(WorkerSpec(FAULT_SPEC, Target("cpu"), "fp32"))
    yield w
    w.kill()


def ready(worker: Worker) -> None:
    worker.start()
    info, seconds = worker.wait_ready(20, always)
    assert info.backend == "fault" and seconds >= 0


def test_success(worker: Worker) -> None:
    ready(worker)
    outcome = run_probe(worker, "fp32", 5, always)
    assert outcome.record.result == "success"
    assert outcome.record.max_abs_error == 0.0
    assert set(outcome.record.phases) == {"total", "compute"}
    assert outcome.record.phases["total"] >= outcome.record.phases["compute"]
    assert outcome.restart_reason is None


def test_wrong_output_is_a_mismatch(worker: Worker, faults: Faults) -> None:
    ready(worker)
    faults.set(probe="wrong")
    outcome = run_probe(worker, "fp32", 5, always)
    assert outcome.record.result == "mismatch"
    assert outcome.record.reason is Reason.MISMATCH
    assert outcome.record.max_abs_error == pytest.approx(0.5)
    assert "128 of 128 outputs outside tolerance" in outcome.record.message
    assert outcome.restart_reason is None  # the worker stays; the numbers are what is wrong


def test_nan_output_is_a_mismatch(worker: Worker, faults: Faults) -> None:
    ready(worker)
    faults.set(probe="nan")
    outcome = run_probe(worker, "fp32", 5, always)
    assert outcome.record.result == "mismatch"
    assert outcome.record.message == "output contains NaN or Inf"


def test_transient_error_keeps_the_worker(worker: Worker, faults: Faults) -> None:
    ready(worker)
    pid = worker.pid
    faults.set(probe="raise")
    outcome = run_probe(worker, "fp32", 5, always)
    assert outcome.record.result == "error"
    assert outcome.record.reason is Reason.PROBE_ERROR
    assert outcome.record.message == "injected: transient probe error"
    assert outcome.restart_reason is None
    faults.set()
    assert run_probe(worker, "fp32", 5, always).record.result == "success"
    assert worker.pid == pid


@pytest.mark.parametrize(
    ("mode", "reason", "message"),
    [
        ("cuda", Reason.CUDA_ERROR, "injected: CUDA_ERROR_LAUNCH_FAILED"),
        ("fatal", Reason.PROBE_ERROR, "RuntimeError: injected: unexpected backend failure"),
    ],
)
def test_fatal_errors_ask_for_a_new_worker(
    worker: Worker, faults: Faults, mode: str, reason: Reason, message: str
) -> None:
    ready(worker)
    faults.set(probe=mode)
    outcome = run_probe(worker, "fp32", 5, always)
    assert outcome.record.result == "error"
    assert outcome.record.reason is reason
    assert outcome.record.message == message
    assert outcome.restart_reason == "error"


def test_hang_times_out_and_the_worker_is_killed(worker: Worker, faults: Faults) -> None:
    ready(worker)
    faults.set(probe="hang")
    outcome = run_probe(worker, "fp32", 0.5, always)
    assert outcome.record.result == "timeout"
    assert outcome.record.reason is Reason.TIMEOUT
    assert outcome.restart_reason == "timeout"
    assert outcome.record.phases["total"] >= 0.5
    assert worker.pid is None  # killed and reaped


def test_memory_is_read_after_the_answer_and_a_failed_reading_is_left_out(
    worker: Worker, faults: Faults
) -> None:
    ready(worker)
    faults.set(device_memory=[7 << 30, 80 << 30])
    record = run_probe(worker, "fp32", 5, always).record
    assert record.result == "success"
    assert (record.gpu_memory_bytes, record.device_memory) == (263 << 20, (7 << 30, 80 << 30))
    # A failing reading is left out; the probe that came before it passed, and the next one
    # finds the worker in step.
    faults.set(memory="raise")
    outcome = run_probe(worker, "fp32", 5, always)
    assert outcome.record.result == "success" and outcome.record.device_memory is None
    faults.set()
    assert run_probe(worker, "fp32", 5, always).record.device_memory is None
    assert run_probe(worker, "fp32", 5, always).restart_reason is None


def test_a_reading_that_hangs_times_the_probe_out(worker: Worker, faults: Faults) -> None:
    # The wedge shows after the answer (the device stops answering while its memory is read):
    # the probe's timeout covers the whole exchange.
    ready(worker)
    faults.set(memory="hang")
    outcome = run_probe(worker, "fp32", 0.5, always)
    assert (outcome.record.result, outcome.restart_reason) == ("timeout", "timeout")
    assert worker.pid is None


def test_segfault_is_a_crash(worker: Worker, faults: Faults) -> None:
    ready(worker)
    faults.set(probe="crash")
    outcome = run_probe(worker, "fp32", 10, always)
    assert outcome.record.result == "error"
    assert outcome.record.reason is Reason.WORKER_CRASH
    assert outcome.record.message == "worker killed by SIGSEGV"
    assert outcome.restart_reason == "crash"


def test_load_failure_reports_the_backend_reason(worker: Worker, faults: Faults) -> None:
    faults.set(load="fail")
    worker.start()
    with pytest.raises(WorkerFailure) as info:
        worker.wait_ready(20, always)
    assert info.value.reason is Reason.ENGINE_LOAD_FAILED
    assert info.value.restart_reason == "error"
    assert str(info.value) == "injected: engine build failed"


def test_load_crash(worker: Worker, faults: Faults) -> None:
    faults.set(load="crash")
    worker.start()
    with pytest.raises(WorkerFailure) as info:
        worker.wait_ready(20, always)
    assert info.value.reason is Reason.WORKER_CRASH


def test_load_hang_hits_the_startup_timeout(worker: Worker, faults: Faults) -> None:
    faults.set(load="hang")
    worker.start()
    with pytest.raises(WorkerFailure) as info:
        worker.wait_ready(1.0, always)
    assert info.value.reason is Reason.STARTUP_TIMEOUT
    assert worker.pid is None


def test_waiting_can_be_aborted(worker: Worker, faults: Faults) -> None:
    faults.set(load="hang")
    worker.start()
    with pytest.raises(WorkerAborted):
        worker.wait_ready(30, lambda: False)


def test_close_releases_the_worker(worker: Worker) -> None:
    ready(worker)
    process = worker._process
    assert process is not None
    worker.close()
    assert worker.pid is None
