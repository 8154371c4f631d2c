"""The package boundary is the architecture: the device package never pulls in desktop code."""

from __future__ import annotations

import ast
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import edge_agent
from tests.importgraph import cycles, import_graph

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


# --- the import graph, from the AST ------------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]
OURS = ("edge_agent", "edgectl", "converters")
#: What the device package may import besides the standard library: its declared dependencies.
DEVICE_DEPENDENCIES = frozenset(
    {
        "numpy",
        "onnxruntime",
        "ai_edge_litert",
        "tflite_runtime",
        "paho",
        "cv2",
        "psutil",
        "cryptography",
        "prometheus_client",
        "tomli",
        "picamera2",  # optional: Raspberry Pi OS's own package, imported only by picamera2: sources
        "flatbuffers",  # ai-edge-litert's own; read by edge_agent.model.tflite_metadata
    }
)
#: The device's loop: what the operator's wing must not import.
DEVICE_LOOP = ("edge_agent.pipeline", "edge_agent.service", "edge_agent.cli", "edge_agent.bench",
               "edge_agent.rest", "edge_agent.notify", "edge_agent.io",
               "edge_agent.shadow")  # fmt: skip
#: What is built on the loop: the pipeline imports none of it.
FEATURES = ("edge_agent.rest", "edge_agent.service", "edge_agent.cli", "edge_agent.bench",
            "edge_agent.shadow")  # fmt: skip
#: Layers of edge_agent, bottom up: a module imports only from its own layer or below.
LAYERS = (
    ("edge_agent", "edge_agent.errors", "edge_agent.stats", "edge_agent.niceness",
     "edge_agent.common"),
    ("edge_agent.model",),
    ("edge_agent.fleet",),
    ("edge_agent.io",),
    ("edge_agent.config", "edge_agent.pipeline", "edge_agent.tune", "edge_agent.rest",
     "edge_agent.notify", "edge_agent.service", "edge_agent.bench", "edge_agent.cli",
     "edge_agent.shadow"),
)  # fmt: skip


def _within(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def _layer(module: str) -> int:
    best, rank = -1, -1
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, rank = len(p), i
    return rank


def boundary_problems(root: Path) -> list[str]:
    """Every import that breaks the architecture, one line each (empty when the house is in
    order): circles anywhere in our packages; edge_agent importing converters, desktop
    packages, edgectl, anything but the standard library and its dependencies, or a module of a
    layer above its own; the loop importing a feature built on it; edgectl importing the
    device's loop."""
    graph = import_graph(root, OURS)
    problems = [f"import circle: {' <-> '.join(group)}" for group in cycles(graph)]
    stdlib = set(sys.stdlib_module_names)
    for module, edges in sorted(graph.items()):
        where = module.replace(".", "/")
        for target, line in sorted(edges.items()):
            top = target.split(".")[0]
            if module.startswith("edge_agent"):
                if top in FORBIDDEN or top == "edgectl":
                    problems.append(f"{where}:{line}: edge_agent imports {target}")
                elif top != "edge_agent" and top not in stdlib | DEVICE_DEPENDENCIES:
                    problems.append(f"{where}:{line}: {target} is not a device dependency")
                elif top == "edge_agent" and _layer(target) > _layer(module) >= 0:
                    problems.append(f"{where}:{line}: {module} imports {target}, a layer above")
            if module == "edge_agent.pipeline" and _within(target, FEATURES):
                problems.append(f"{where}:{line}: the loop imports {target}, a feature above it")
            if module.startswith("edgectl") and _within(target, DEVICE_LOOP):
                problems.append(f"{where}:{line}: edgectl imports the device's loop ({target})")
    return problems


def test_the_import_graph_has_no_circles_and_its_arrows_point_down() -> None:
    graph = import_graph(REPO, OURS)
    assert "edge_agent.fleet.protocol" in graph["edgectl.cli"]  # the walk sees function bodies too
    assert all(_layer(m) >= 0 for m in graph if m.startswith("edge_agent")), [
        m for m in graph if m.startswith("edge_agent") and _layer(m) < 0
    ]
    assert boundary_problems(REPO) == []


def test_the_boundary_check_finds_what_it_forbids(tmp_path: Path) -> None:
    def write(name: str, text: str) -> None:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")

    write("edge_agent/__init__.py", "")
    write("edge_agent/errors.py", "")
    write("edge_agent/model/__init__.py", "")
    write("edge_agent/model/a.py", "from . import b\n")
    write("edge_agent/model/b.py", "def late():\n    from edge_agent.model import a\n")
    write("edge_agent/model/c.py", "def f():\n    import torch.nn\n    import requests\n")
    write("edge_agent/model/d.py", "from edge_agent.pipeline import Pipeline\n")
    write("edge_agent/pipeline.py", "import edgectl.cli\nfrom edge_agent.rest import infer_lock\n")
    write("edgectl/__init__.py", "")
    write("edgectl/cli.py", "from edge_agent.io.source import Source\n")
    write("converters/__init__.py", "")
    problems = boundary_problems(tmp_path)
    assert "import circle: edge_agent.model.a <-> edge_agent.model.b" in problems
    assert "edge_agent/model/c:2: edge_agent imports torch" in problems
    assert "edge_agent/model/c:3: requests is not a device dependency" in problems
    assert any(
        "edge_agent.model.d imports edge_agent.pipeline, a layer above" in p for p in problems
    )
    assert "edge_agent/pipeline:1: edge_agent imports edgectl.cli" in problems
    assert any("edgectl imports the device's loop (edge_agent.io.source)" in p for p in problems)
    assert "edge_agent/pipeline:2: the loop imports edge_agent.rest, a feature above it" in problems
    assert len(problems) == 7, problems


def _paho_client_calls(root: Path, packages: tuple[str, ...]) -> list[str]:
    """``path:line`` of every ``paho.mqtt.client.Client(...)`` call (as ``mqtt.Client(`` or an
    imported ``Client(``) in ``packages``."""
    found = []
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            aliases = {a.asname or a.name for node in ast.walk(tree)
                       if isinstance(node, ast.Import) for a in node.names
                       if a.name == "paho.mqtt.client"}  # fmt: skip
            names = {a.asname or a.name for node in ast.walk(tree)
                     if isinstance(node, ast.ImportFrom) and node.module == "paho.mqtt.client"
                     for a in node.names if a.name == "Client"}  # fmt: skip
            for node in ast.walk(tree):
                if not isinstance(node, ast.Call):
                    continue
                f = node.func
                by_module = isinstance(f, ast.Attribute) and f.attr == "Client"
                if (by_module and ast.unparse(f.value) in aliases) or ast.unparse(f) in names:
                    found.append(f"{path.relative_to(root)}:{node.lineno}")
    return found


def test_one_place_sets_up_a_paho_client() -> None:
    """Client id, protocol, credentials, TLS and reconnect settings are written once
    (``BrokerSettings.new_client``): the agent's link and edgectl's client, collector and
    simulator all build their clients through it."""
    calls = _paho_client_calls(REPO, ("edge_agent", "edgectl"))
    assert [c.rsplit(":", 1)[0] for c in calls] == ["edge_agent/fleet/mqtt.py"], calls
