"""Engine cache: serialized TensorRT plans with a JSON manifest each.

A plan is only valid for the TensorRT version that built it and the GPU model it was built on,
unless it was built version- or hardware-compatible. The manifest records what the plan is for;
the plan's own header (magic `ftrt`, TensorRT version in bytes 24-27) and its sha256 are checked
before TensorRT ever sees it, so a truncated, corrupted or foreign plan is a clear message and a
rebuild, never a crash loop.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema

from trt_heartbeat import __version__

PLAN_MAGIC = b"ftrt"
SCHEMA_VERSION = 1


@dataclass(frozen=True)
class PlanRequest:
    """What the probe needs: this model, at this precision, for this runtime and GPU."""

    tensorrt_version: str
    gpu_name: str
    compute_capability: str  # "9.0"
    model_digest: str
    precision: str


@dataclass(frozen=True)
class Manifest:
    schema_version: int
    tensorrt_version: str
    gpu_name: str
    compute_capability: str
    model_digest: str
    precision: str
    plan_file: str
    plan_sha256: str
    plan_bytes: int
    built_at: str
    version_compatible: bool
    hardware_compatibility: str  # "none" or "ampere_plus"
    exporter_version: str


@dataclass(frozen=True)
class CachedPlan:
    plan: bytes
    manifest: Manifest
    path: Path


@cache
def manifest_schema() -> dict[str, Any]:
    text = (
        resources.files("trt_heartbeat.exporter")
        .joinpath("engine_manifest_schema.json")
        .read_text()
    )
    loaded: dict[str, Any] = json.loads(text)
    return loaded


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


def plan_header_version(plan: bytes) -> tuple[int, int, int] | None:
    """TensorRT version (major, minor, patch) from a plan's header; None if not a plan."""
    if len(plan) < 28 or plan[:4] != PLAN_MAGIC:
        return None
    return plan[24], plan[25], plan[26]


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "trt-heartbeat-exporter", "engines")


def plan_key(request: PlanRequest, version_compatible: bool, hardware: str) -> str:
    gpu = (
        "ampere_plus"
        if hardware == "ampere_plus"
        else (
            "sm"
            + request.compute_capability.replace(".", "")
            + "-"
            + "".join(c if c.isalnum() else "_" for c in request.gpu_name.lower())[:40]
        )
    )
    runtime = "trt" + (
        request.tensorrt_version.split(".")[0] + "-vc"
        if version_compatible
        else request.tensorrt_version
    )
    return f"{request.model_digest[:16]}-{request.precision}-{gpu}-{runtime}"


def _fits(manifest: Manifest, request: PlanRequest) -> bool:
    if (manifest.model_digest, manifest.precision) != (request.model_digest, request.precision):
        return False
    ours, theirs = (
        _version_tuple(request.tensorrt_version),
        _version_tuple(manifest.tensorrt_version),
    )
    if manifest.version_compatible:
        # Newer runtimes of the same major version load version-compatible plans.
        if theirs[0] != ours[0] or theirs > ours:
            return False
    elif theirs[:3] != ours[:3]:
        return False
    if manifest.hardware_compatibility == "ampere_plus":
        return _version_tuple(request.compute_capability) >= (8, 0)
    return (manifest.compute_capability, manifest.gpu_name) == (
        request.compute_capability,
        request.gpu_name,
    )


class EngineCache:
    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    def _manifests(self, problems: list[str]) -> list[tuple[Path, Manifest]]:
        found = []
        try:
            paths = sorted(self.directory.glob("*.json"))
        except OSError as exc:
            problems.append(f"cannot list {self.directory}: {exc.strerror or exc}")
            return []
        validator = jsonschema.Draft202012Validator(manifest_schema())
        for path in paths:
            try:
                document = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                problems.append(f"{path.name}: unreadable manifest ({exc})")
                continue
            error = jsonschema.exceptions.best_match(validator.iter_errors(document))
            if error is not None:
                where = ".".join(str(p) for p in error.absolute_path) or "(top level)"
                problems.append(f"{path.name}: invalid manifest at {where}: {error.message}")
                continue
            found.append((path, Manifest(**document)))
        return found

    def _read_plan(self, path: Path, manifest: Manifest) -> tuple[bytes | None, str]:
        plan_path = self.directory / manifest.plan_file
        try:
            plan = plan_path.read_bytes()
        except OSError as exc:
            return None, f"{manifest.plan_file}: unreadable plan ({exc.strerror or exc})"
        if len(plan) != manifest.plan_bytes:
            return None, (
                f"{manifest.plan_file}: truncated plan ({len(plan)} of {manifest.plan_bytes} bytes)"
            )
        if hashlib.sha256(plan).hexdigest() != manifest.plan_sha256:
            return None, f"{manifest.plan_file}: checksum mismatch (corrupted plan)"
        header = plan_header_version(plan)
        if header is None:
            return None, f"{manifest.plan_file}: not a TensorRT plan (bad magic)"
        if header != _version_tuple(manifest.tensorrt_version)[:3]:
            return None, (
                f"{manifest.plan_file}: plan header says TensorRT "
                f"{'.'.join(map(str, header))}, manifest says {manifest.tensorrt_version}"
            )
        return plan, ""

    def lookup(self, request: PlanRequest) -> tuple[CachedPlan | None, list[str]]:
        """The best valid plan for `request`, and the problems met on the way."""
        problems: list[str] = []
        candidates = [(p, m) for p, m in self._manifests(problems) if _fits(m, request)]
        # Prefer a plan built for exactly this runtime and GPU: portable plans may be slower.
        candidates.sort(
            key=lambda pm: (pm[1].version_compatible, pm[1].hardware_compatibility != "none")
        )
        for path, manifest in candidates:
            plan, problem = self._read_plan(path, manifest)
            if plan is not None:
                return CachedPlan(plan, manifest, self.directory / manifest.plan_file), problems
            problems.append(problem)
        return None, problems

    def store(
        self,
        plan: bytes,
        request: PlanRequest,
        version_compatible: bool = False,
        hardware: str = "none",
    ) -> Manifest:
        """Write plan and manifest atomically (temp file + rename), plan first."""
        key = plan_key(request, version_compatible, hardware)
        manifest = Manifest(
            schema_version=SCHEMA_VERSION,
            tensorrt_version=request.tensorrt_version,
            gpu_name=request.gpu_name,
            compute_capability=request.compute_capability,
            model_digest=request.model_digest,
            precision=request.precision,
            plan_file=f"{key}.plan",
            plan_sha256=hashlib.sha256(plan).hexdigest(),
            plan_bytes=len(plan),
            built_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            version_compatible=version_compatible,
            hardware_compatibility=hardware,
            exporter_version=__version__,
        )
        self.directory.mkdir(parents=True, exist_ok=True)
        _atomic_write(self.directory / manifest.plan_file, plan)
        document = json.dumps(asdict(manifest), indent=2) + "\n"
        _atomic_write(self.directory / f"{key}.json", document.encode())
        return manifest


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
