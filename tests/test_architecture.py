"""The package's shape: two products over shared leaves, and imports that keep it so.

`trt_heartbeat.exporter` is the daemon; `trt_heartbeat.canary` the one-shot canary tooling that
runs where no GPU is (an Argo Job, CI). Both stand on the shared leaves; the canary tooling
imports nothing of the daemon, and the daemon nothing of the canary tooling.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

PACKAGE = ROOT / "exporter" / "trt_heartbeat"
LEAVES = {"errors", "domain", "documents", "cliflags"}
# What each shared leaf may import of the package: the leaves sit below both products.
LEAF_IMPORTS = {
    "errors": set(),
    "domain": set(),
    "documents": {"errors"},
    "cliflags": {"documents", "errors"},
}


def _module(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(path: Path) -> set[str]:
    """Every module a file imports, at top level or inside functions (for `from m import n`,
    both m and m.n: n may be a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return found


def _imports(path: Path) -> set[str]:
    """The package modules a file imports."""
    return {m for m in _imported(path) if m.startswith("trt_heartbeat.") and _exists(m)}


def _exists(module: str) -> bool:
    path = PACKAGE.parent.joinpath(*module.split("."))
    return path.is_dir() or path.with_suffix(".py").exists()


def _files(under: str) -> list[Path]:
    files = sorted((PACKAGE / under).rglob("*.py"))
    assert files, f"no package trt_heartbeat.{under}"
    return files


def test_the_canary_tooling_imports_nothing_of_the_daemon() -> None:
    for path in _files("canary"):
        for module in _imports(path):
            top = module.split(".")[1]
            assert top == "canary" or top in LEAVES, f"{_module(path)} imports {module}"


def test_the_daemon_imports_nothing_of_the_canary_tooling() -> None:
    for path in _files("exporter"):
        for module in _imports(path):
            assert not module.startswith("trt_heartbeat.canary"), f"{_module(path)}: {module}"


@pytest.mark.parametrize("leaf", sorted(LEAVES))
def test_shared_leaves_stand_below_both_products(leaf: str) -> None:
    imported = {m.split(".")[1] for m in _imports(PACKAGE / f"{leaf}.py")}
    assert imported <= LEAF_IMPORTS[leaf], f"{leaf} imports {imported - LEAF_IMPORTS[leaf]}"


def test_the_canary_commands_load_no_daemon_module() -> None:
    """What `canary-judge` and `service-rules` load at run time, not only what they name."""
    code = (
        "import sys, trt_heartbeat.canary.judge.command, trt_heartbeat.canary.guard.command;"
        "print('\\n'.join(m for m in sys.modules if m.startswith('trt_heartbeat.')))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert any(m.startswith("trt_heartbeat.canary.judge") for m in loaded)
    assert not [m for m in loaded if m.startswith("trt_heartbeat.exporter")]


CLICK_MODULES = {
    "trt_heartbeat.cli",
    "trt_heartbeat.cliflags",
    "trt_heartbeat.exporter.commands",
    "trt_heartbeat.exporter.flags",
    "trt_heartbeat.canary.judge.command",
    "trt_heartbeat.canary.guard.command",
}


def test_click_only_at_the_edge() -> None:
    """Library code raises domain errors; only the command modules speak click."""
    users = {
        _module(p)
        for p in PACKAGE.rglob("*.py")
        if "click" in {m.split(".")[0] for m in _imported(p)}
    }
    assert users == CLICK_MODULES


def test_the_exporter_process_loads_no_backend_nor_driver_library() -> None:
    """Serving composes everything but never imports a backend, CUDA, TensorRT or NVML: those
    load only in worker and child processes, so they cannot wedge or crash the HTTP server."""
    code = (
        "import sys\n"
        "from trt_heartbeat.cli import cli\n"
        "from trt_heartbeat.exporter.app import Exporter\n"
        "from trt_heartbeat.exporter.config import load\n"
        "settings = load(None, {'backend': 'reference'})\n"
        "Exporter(settings, 'tensorrt', has_gpu=True)\n"
        "Exporter(settings, 'cuda', has_gpu=True)\n"
        "print('\\n'.join(sys.modules))\n"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert "trt_heartbeat.exporter.app" in loaded
    # The backends' interface (`backends.base`) and NVML's data types (`nvml`) load; no backend
    # implementation and no driver binding does.
    implementations = [
        f"trt_heartbeat.exporter.backends.{name}"
        for name in ("reference", "cuda", "tensorrt", "gpu_backend")
    ]
    forbidden = [
        m
        for m in loaded
        if m in implementations
        or m.split(".")[0] in ("cuda", "pycuda", "tensorrt", "tensorrt_lean", "pynvml")
    ]
    assert forbidden == []
