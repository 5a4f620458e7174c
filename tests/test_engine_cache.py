"""Engine cache: keys, manifests, and every way a cached plan can be wrong."""

from __future__ import annotations

import errno
import hashlib
import json
from pathlib import Path

import jsonschema
import pytest

from trt_heartbeat.exporter import canonical
from trt_heartbeat.exporter.engine_cache import (
    EngineCache,
    PlanRequest,
    manifest_schema,
    plan_header_version,
    plan_key,
)

H200 = PlanRequest("11.4.0.106", "NVIDIA H200", "9.0", canonical.model_digest(), "fp32")


def plan(version: tuple[int, int, int, int] = (11, 4, 0, 106), size: int = 4096) -> bytes:
    """Bytes shaped like a serialized plan: magic, then the version at bytes 24-27."""
    body = bytes((i * 7) % 251 for i in range(size - 28))
    return b"ftrt" + bytes(20) + bytes(version) + body


def request(**changes: str) -> PlanRequest:
    return PlanRequest(**{**H200.__dict__, **changes})


def test_store_then_lookup(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path)
    manifest = cache.store(plan(), H200)
    found, problems = cache.lookup(H200)
    assert problems == [] and found is not None
    assert found.plan == plan() and found.manifest == manifest
    document = json.loads((tmp_path / manifest.plan_file.replace(".plan", ".json")).read_text())
    jsonschema.validate(document, manifest_schema())
    assert document["compute_capability"] == "9.0" and document["precision"] == "fp32"
    assert not list(tmp_path.glob(".*.tmp")), "atomic writes leave no temporary files"


def test_keys_name_what_the_plan_is_for() -> None:
    assert plan_key(H200, False, "none") == (
        f"{canonical.model_digest()[:16]}-fp32-sm90-nvidia_h200-trt11.4.0.106"
    )
    assert plan_key(H200, True, "ampere_plus").endswith("-fp32-ampere_plus-trt11-vc")
    long_name = request(gpu_name="X" * 300)
    assert len(plan_key(long_name, False, "none")) < 120


def test_header_version() -> None:
    assert plan_header_version(plan((10, 3, 0, 26))) == (10, 3, 0)
    assert plan_header_version(b"\x7fELF" + bytes(40)) is None
    assert plan_header_version(b"ftrt") is None


@pytest.mark.parametrize(
    "other",
    [
        request(tensorrt_version="11.5.0.1"),
        request(precision="fp16"),
        request(compute_capability="8.0", gpu_name="NVIDIA A100-SXM4-80GB"),
        request(gpu_name="NVIDIA H100 80GB HBM3"),
        request(model_digest="0" * 64),
    ],
)
def test_a_plan_for_something_else_does_not_fit(tmp_path: Path, other: PlanRequest) -> None:
    cache = EngineCache(tmp_path)
    cache.store(plan(), H200)
    assert cache.lookup(other) == (None, [])


def test_version_compatible_plans_serve_newer_runtimes_of_the_same_major(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path)
    cache.store(plan(), H200, version_compatible=True)
    assert cache.lookup(request(tensorrt_version="11.6.1.2"))[0] is not None
    assert cache.lookup(request(tensorrt_version="11.3.0.1"))[0] is None  # older runtime
    assert cache.lookup(request(tensorrt_version="12.0.0.1"))[0] is None  # next major


def test_hardware_compatible_plans_serve_ampere_and_newer(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path)
    cache.store(plan(), H200, hardware="ampere_plus")
    assert cache.lookup(request(compute_capability="8.0", gpu_name="NVIDIA A100"))[0] is not None
    assert cache.lookup(request(compute_capability="7.5", gpu_name="Tesla T4"))[0] is None


def test_exact_plans_are_preferred_over_portable_ones(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path)
    cache.store(plan(size=5000), H200, version_compatible=True, hardware="ampere_plus")
    exact = cache.store(plan(size=6000), H200)
    found, _ = cache.lookup(H200)
    assert found is not None and found.manifest == exact


def _corrupt(tmp_path: Path, how: str) -> str:
    cache = EngineCache(tmp_path)
    manifest = cache.store(plan(), H200)
    plan_path = tmp_path / manifest.plan_file
    manifest_path = plan_path.with_suffix(".json")
    data = plan_path.read_bytes()
    if how == "truncated":
        plan_path.write_bytes(data[:1000])
    elif how == "bit-flip":
        plan_path.write_bytes(data[:2000] + bytes([data[2000] ^ 1]) + data[2001:])
    elif how == "missing":
        plan_path.unlink()
    elif how == "unreadable":  # root reads through chmod 000; a directory cannot be read as one
        plan_path.unlink()
        plan_path.mkdir()
    elif how in ("bad-magic", "other-version"):
        bad = (
            b"xxxx" + data[4:]
            if how == "bad-magic"
            else data[:24] + bytes([10, 3, 0, 26]) + data[28:]
        )
        plan_path.write_bytes(bad)
        document = json.loads(manifest_path.read_text())
        document["plan_sha256"] = hashlib.sha256(bad).hexdigest()
        manifest_path.write_text(json.dumps(document))
    elif how == "garbage-manifest":
        manifest_path.write_text("{not json")
    elif how == "unknown-key":
        document = json.loads(manifest_path.read_text())
        document["colour"] = "blue"
        manifest_path.write_text(json.dumps(document))
    return manifest.plan_file


@pytest.mark.parametrize(
    ("how", "problem"),
    [
        ("truncated", "{plan}: truncated plan (1000 of 4096 bytes)"),
        ("bit-flip", "{plan}: checksum mismatch (corrupted plan)"),
        ("missing", "{plan}: unreadable plan (No such file or directory)"),
        ("unreadable", "{plan}: unreadable plan (Is a directory)"),
        ("bad-magic", "{plan}: not a TensorRT plan (bad magic)"),
        ("other-version", "{plan}: plan header says TensorRT 10.3.0, manifest says 11.4.0.106"),
        (
            "garbage-manifest",
            "{json}: unreadable manifest (Expecting property name enclosed in "
            "double quotes: line 1 column 2 (char 1))",
        ),
        (
            "unknown-key",
            "{json}: invalid manifest at (top level): Additional properties are not "
            "allowed ('colour' was unexpected)",
        ),
    ],
)
def test_corrupted_cache_entries_are_named(tmp_path: Path, how: str, problem: str) -> None:
    plan_file = _corrupt(tmp_path, how)
    found, problems = EngineCache(tmp_path).lookup(H200)
    assert found is None
    assert problems == [problem.format(plan=plan_file, json=plan_file.replace(".plan", ".json"))]


def test_a_good_plan_is_found_beside_a_broken_one(tmp_path: Path) -> None:
    _corrupt(tmp_path, "bit-flip")
    cache = EngineCache(tmp_path)
    cache.store(plan(size=5000), H200, version_compatible=True)
    found, problems = cache.lookup(H200)
    assert found is not None and found.manifest.version_compatible
    assert len(problems) == 1 and "checksum mismatch" in problems[0]


def test_unwritable_cache_raises_oserror(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(OSError):
        EngineCache(blocker / "engines").store(plan(), H200)


def test_missing_cache_dir_is_an_empty_cache(tmp_path: Path) -> None:
    assert EngineCache(tmp_path / "nope").lookup(H200) == (None, [])


def test_a_full_disk_leaves_the_cache_as_it_was(full_disk: Path) -> None:
    cache = EngineCache(full_disk / "engines")
    (full_disk / "filler").write_bytes(b"")  # room for one small plan ...
    cache.store(plan(size=4096), H200)
    (full_disk / "filler").write_bytes(b"\0" * 40_000)  # ... then almost none
    before = sorted(p.name for p in cache.directory.iterdir())
    with pytest.raises(OSError) as info:
        cache.store(plan(size=32_768), H200, version_compatible=True)
    assert info.value.errno == errno.ENOSPC
    # No half-written plan or temp file, and the plan stored before is still served.
    assert sorted(p.name for p in cache.directory.iterdir()) == before
    found, problems = cache.lookup(H200)
    assert found is not None and found.manifest.plan_bytes == 4096 and problems == []
