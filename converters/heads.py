"""Where int8 hurts a model's job most, found from the graph and its calibrated ranges: no
model-specific ignore lists.

- :func:`mixed_range_outputs`: an output made by a Concat (through reshapes and transposes
  only) of parts whose ranges differ in magnitude (a detector's pixel boxes beside its [0, 1]
  scores) cannot share one int8 scale: the small part rounds to zero. Those nodes are kept in
  float, always.
- :func:`decode_tail`: the fixed arithmetic after the last learned layer (a YOLO head's DFL
  softmax and its fixed-weight 1x1 conv, the anchor and stride Mul/Add, sigmoids on the score
  branches, a classifier's softmax): tried in float as one block when int8 misses the budget.
- :func:`blocks`: attention (MatMul → [Mul/Div] → [Add] → Softmax → MatMul) and layer
  normalisation (LayerNormalization, or the ReduceMean … Div pattern older exporters write):
  the float fallback keeps such a block in float as a whole or not at all.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx

#: ops that move values without computing: a tensor keeps its range through them
SHAPE_OPS = frozenset(
    {"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Expand"}
)
#: ops whose weights are learned (a conv with at most SMALL_WEIGHT weights is fixed arithmetic,
#: such as the DFL's arange 1x1 conv)
WEIGHTED = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
SMALL_WEIGHT = 64
#: parts of one Concat whose magnitudes differ by this factor or more do not share a scale
MIXED_RANGE_RATIO = 16.0


def _producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in model.graph.node for o in n.output if o}


def consumers(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    out: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            if i:
                out.setdefault(i, []).append(n)
    return out


def _magnitude(r: tuple[float, float] | None) -> float:
    return 0.0 if r is None else max(abs(r[0]), abs(r[1]))


def mixed_range_outputs(
    model: onnx.ModelProto,
    ranges: Mapping[str, tuple[float, float]],
    *,
    ratio: float = MIXED_RANGE_RATIO,
) -> list[dict[str, Any]]:
    """Nodes to keep in float so that an output's parts keep their own precision: each a
    ``{"node", "op_type", "reason"}``."""
    prod = _producers(model)
    inits = {i.name for i in model.graph.initializer}
    found: list[dict[str, Any]] = []
    seen: set[str] = set()
    for out in model.graph.output:
        chain: list[onnx.NodeProto] = []
        node = prod.get(out.name)
        while node is not None and node.op_type in SHAPE_OPS:
            chain.append(node)
            node = prod.get(node.input[0])
        if node is None or node.op_type != "Concat":
            continue
        parts = [i for i in node.input if i and i not in inits]
        mags = [_magnitude(ranges.get(i)) for i in parts]
        positive = [m for m in mags if m > 0]
        if len(positive) < 2 or max(positive) < ratio * min(positive):
            continue
        big, small = max(positive), min(positive)
        why = (
            f"output '{out.name}' concatenates parts of magnitude {small:.3g} and {big:.3g}: one "
            "int8 scale would round the small part away"
        )
        for n in [node, *chain]:
            if n.name not in seen:
                seen.add(n.name)
                found.append({"node": n.name, "op_type": n.op_type, "reason": why})
    return found


def _learned(node: onnx.NodeProto, inits: Mapping[str, onnx.TensorProto]) -> bool:
    if node.op_type not in WEIGHTED:
        return False
    weights = [inits[i] for i in node.input[1:2] if i in inits]
    if not weights:  # activation x activation (attention): computed, not learned here
        return node.op_type != "MatMul"
    return int(np.prod(weights[0].dims)) > SMALL_WEIGHT


def decode_tail(model: onnx.ModelProto) -> list[str]:
    """The nodes between the last learned layer and the outputs, in graph order: walking back
    from each output, every node until a learned Conv/ConvTranspose/Gemm/MatMul."""
    prod = _producers(model)
    inits = {i.name: i for i in model.graph.initializer}
    tail: set[str] = set()
    stack = [o.name for o in model.graph.output]
    visited: set[str] = set()
    while stack:
        t = stack.pop()
        node = prod.get(t)
        if node is None or node.name in visited:
            continue
        visited.add(node.name)
        if _learned(node, inits):
            continue
        tail.add(node.name)
        stack.extend(i for i in node.input if i and i not in inits)
    if not tail:
        return []
    # a tail that reaches the graph inputs is the whole model (no learned layer): no block
    inputs = {i.name for i in model.graph.input}
    if any(i in inputs for n in model.graph.node if n.name in tail for i in n.input):
        return []
    return [n.name for n in model.graph.node if n.name in tail]


def blocks(model: onnx.ModelProto) -> list[dict[str, Any]]:
    """Attention and layer-norm blocks: ``{"kind", "nodes": [names in graph order]}``."""
    prod = _producers(model)
    cons = consumers(model)
    inits = {i.name for i in model.graph.initializer}
    order = {n.name: k for k, n in enumerate(model.graph.node)}
    found: list[dict[str, Any]] = []
    used: set[str] = set()

    def add(kind: str, nodes: Sequence[onnx.NodeProto]) -> None:
        names = sorted({n.name for n in nodes}, key=order.__getitem__)
        if len(names) > 1 and not used.intersection(names):
            used.update(names)
            found.append({"kind": kind, "nodes": names})

    for sm in model.graph.node:
        if sm.op_type != "Softmax":
            continue
        back: list[onnx.NodeProto] = [sm]
        node = prod.get(sm.input[0])
        while node is not None and node.op_type in ("Mul", "Div", "Add", "Where", *SHAPE_OPS):
            back.append(node)
            node = prod.get(node.input[0])
        if node is None or node.op_type != "MatMul" or all(i in inits for i in node.input[1:]):
            continue
        nexts = [c for c in cons.get(sm.output[0], []) if c.op_type == "MatMul"]
        if not nexts:
            continue
        add("attention", [node, *back, *nexts])
    for n in model.graph.node:
        if n.op_type == "LayerNormalization":
            add("layernorm", [n])
            continue
        if n.op_type != "ReduceMean":
            continue
        # x - mean(x) -> pow 2 -> mean -> + eps -> sqrt -> (x - mean) / sqrt [-> * g -> + b]
        subs = [c for c in cons.get(n.output[0], []) if c.op_type == "Sub"]
        for sub in subs:
            group: list[onnx.NodeProto] = [n, sub]
            div = None
            for c in cons.get(sub.output[0], []):
                if c.op_type in ("Pow", "Mul"):
                    group.append(c)
                    red = next(
                        (x for x in cons.get(c.output[0], []) if x.op_type == "ReduceMean"), None
                    )
                    while red is not None and red.op_type in ("ReduceMean", "Add", "Sqrt"):
                        group.append(red)
                        red = next(iter(cons.get(red.output[0], [])), None)
                    if red is not None and red.op_type == "Div":
                        div = red
                elif c.op_type == "Div":
                    div = c
            if div is None:
                continue
            group.append(div)
            tail = next(iter(cons.get(div.output[0], [])), None)
            for op in ("Mul", "Add"):
                if tail is not None and tail.op_type == op and any(i in inits for i in tail.input):
                    group.append(tail)
                    tail = next(iter(cons.get(tail.output[0], [])), None)
            add("layernorm", group)
    return found
