"""The package boundary is the architecture: the device package never pulls in desktop code."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys

import edge_agent

FORBIDDEN = ("converters", "onnx", "tensorflow", "torch", "sklearn", "skl2onnx", "tf2onnx")


def _all_edge_agent_modules() -> list[str]:
    names = ["edge_agent"]
    for info in pkgutil.walk_packages(edge_agent.__path__, prefix="edge_agent."):
        names.append(info.name)
    return names


def test_every_edge_agent_module_imports_without_desktop_packages() -> None:
    modules = _all_edge_agent_modules()
    assert "edge_agent.model.bundle" in modules and "edge_agent.model.profiles" in modules
    code = (
        "import importlib, json, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    loaded = json.loads(out.stdout)
    bad = sorted(m for m in loaded if m.split(".")[0] in FORBIDDEN)
    assert bad == [], f"edge_agent imported desktop-only modules: {bad}"


def test_public_names_are_exported() -> None:
    from edge_agent import errors

    for name in errors.__all__:
        assert hasattr(errors, name), name
    assert issubclass(errors.AccuracyBudgetError, errors.EdgeError)
