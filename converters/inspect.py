"""``edge-convert inspect``: what a model file holds (inputs, outputs, opset, operators, size).

A bundle is shown from its manifest, marked unverified (use ``verify`` to check it)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.errors import ConfigError, ModelError


def describe(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise ConfigError(f"{path}: no such file or directory")
    if path.suffix == ".edgebundle":
        from edge_agent.model.bundle import read_manifest_unverified

        return {
            "kind": "bundle (UNVERIFIED: run edge-convert verify)",
            "path": str(path),
            "manifest": read_manifest_unverified(path),
        }
    import onnx

    from converters.canonical import tensor_spec

    if path.suffix != ".onnx":
        from converters.importers import import_model

        model = import_model(path)
    else:
        try:
            model = onnx.load_model(str(path), load_external_data=False)
        except Exception as exc:
            raise ModelError(f"{path}: not an ONNX model ({type(exc).__name__})") from exc
    ops = Counter(
        (n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}")
        for n in model.graph.node
    )
    params = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    return {
        "kind": "onnx",
        "path": str(path),
        "size_bytes": path.stat().st_size if path.is_file() else None,
        "ir_version": model.ir_version,
        "opsets": {imp.domain or "ai.onnx": imp.version for imp in model.opset_import},
        "producer": f"{model.producer_name} {model.producer_version}".strip() or None,
        "inputs": tensor_spec(model),
        "outputs": tensor_spec(model, outputs=True),
        "nodes": len(model.graph.node),
        "parameters": params,
        "op_histogram": dict(ops.most_common()),
    }


def render(info: dict[str, Any]) -> str:
    if "manifest" in info:
        m = info["manifest"]
        lines = [f"{info['path']}: {info['kind']}", f"  model {m.get('name')} {m.get('version')}"]
        for art in m.get("artifacts", []):
            lines.append(f"  artifact {art.get('path')}  {art.get('format')}  {art.get('size')} B")
        return "\n".join(lines)

    def spec(s: dict[str, Any]) -> str:
        shape = ["?" if d is None else str(d) for d in s["shape"]]
        return f"    {s['name']}: {s['dtype']}[{', '.join(shape)}]"

    lines = [
        f"{info['path']}: ONNX, IR {info['ir_version']}, opsets "
        + ", ".join(f"{k} {v}" for k, v in info["opsets"].items()),
        f"  size {info['size_bytes']} B, {info['parameters']:,} parameters, {info['nodes']} nodes"
        + (f", producer {info['producer']}" if info["producer"] else ""),
        "  inputs:",
        *(spec(s) for s in info["inputs"]),
        "  outputs:",
        *(spec(s) for s in info["outputs"]),
        "  operators:",
        *(f"    {op:<28} {n}" for op, n in info["op_histogram"].items()),
    ]
    return "\n".join(lines)
