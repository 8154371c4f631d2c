"""Pruning on the canonical ONNX model: structured channel pruning over dependency groups,
unstructured magnitude pruning, and training-free recovery.

**Structured.** Every tensor's channel axis (axis 1: NCHW, NCL, or the features of an [N, F]
matrix) is described by a *view*: the channel spaces it is made of, in order (one space; several
after a Concat). A space is a set of channels that must be pruned together:

- a Conv (group 1) or Gemm/MatMul with constant weights *produces* a new space (its output
  channels);
- activations, BatchNormalization, pooling, Resize, spatial Pad, a depthwise Conv (multiplier 1)
  and a Flatten into a Gemm *carry* their input's view;
- a binary op of two activations *ties* their spaces (the residual Adds, the Mul of a
  squeeze-excitation block), so they prune as one; a per-channel constant operand is sliced;
- a Conv (group 1) or Gemm *consumes* a view: its weights lose the matching input channels;
- a Concat along channels concatenates its inputs' views.

Anything else that touches a channel axis (a Reshape, a Split, a grouped conv, a graph output...)
*freezes* the spaces it sees: they are not pruned, and the report names the node. Channels are
scored by the L1 norm of their filters (summed over a space's producers, each normalised), the
lowest removed; every affected initializer is rewritten and shapes re-inferred, and the result
must pass ``onnx.checker`` and keep its output shapes.

**Recovery (no training).** After pruning, layer by layer in graph order, each Conv and Gemm
is refitted by least squares on the calibration samples: the weights and bias that best
reproduce the original model's output of that layer from what the pruned model now feeds it
(the removed channels' contribution folded into the kept ones and the bias, and whatever the
layers before it changed).

**Unstructured.** ``w = 0`` where ``|w| < θ`` on Conv/Gemm/MatMul weights, with θ global or per
layer; the first and last weighted layers are skipped by default. Dense runtimes gain no speed
from zeros: the gain is in the compressed bundle.
"""

from __future__ import annotations

import gzip
import io
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edge_agent.errors import ConfigError, ConversionError

__all__ = [
    "Analysis",
    "Pruned",
    "analyse",
    "compressed_size",
    "magnitude_prune",
    "param_count",
    "prune_channels",
    "recover",
    "weighted_layers",
]

_CARRY = {
    "Relu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "LeakyRelu", "Tanh", "Identity",
    "Elu", "Selu", "Softplus", "Dropout", "MaxPool", "AveragePool", "GlobalAveragePool",
    "GlobalMaxPool", "Resize", "Upsample", "BatchNormalization", "PRelu",
}  # fmt: skip
_BINARY = {"Add", "Sub", "Mul", "Div", "Max", "Min"}
WEIGHTED = ("Conv", "Gemm", "MatMul")


@dataclass
class _Space:
    size: int
    producers: list[str] = field(default_factory=list)  # node names
    frozen: list[str] = field(default_factory=list)  # why it cannot be pruned


@dataclass
class Analysis:
    """The channel spaces of a model and every node that touches them."""

    model: onnx.ModelProto
    spaces: list[_Space]
    parent: list[int]
    views: dict[str, list[int]]  # tensor -> space ids along its channel axis
    flatten: dict[str, int]  # Flatten output -> the spatial size folded into each channel

    def root(self, s: int) -> int:
        while self.parent[s] != s:
            self.parent[s] = self.parent[self.parent[s]]
            s = self.parent[s]
        return s

    def groups(self) -> dict[int, _Space]:
        """Root space id -> the merged space."""
        return {i: self.spaces[i] for i in range(len(self.spaces)) if self.root(i) == i}

    def prunable(self) -> dict[int, _Space]:
        return {i: s for i, s in self.groups().items() if not s.frozen and s.producers}

    def frozen(self) -> list[dict[str, Any]]:
        return [
            {"channels": s.size, "producers": s.producers, "reasons": sorted(set(s.frozen))}
            for s in self.groups().values()
            if s.frozen and s.producers
        ]


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _shapes(model: onnx.ModelProto) -> dict[str, list[int]]:
    out = {}
    for vi in [*model.graph.input, *model.graph.value_info, *model.graph.output]:
        tt = vi.type.tensor_type
        if tt.HasField("shape"):
            out[vi.name] = [
                int(d.dim_value) if d.HasField("dim_value") else 0 for d in tt.shape.dim
            ]
    return out


def _name(node: onnx.NodeProto) -> str:
    return node.name or node.output[0]


def analyse(model: onnx.ModelProto) -> Analysis:
    """Find the channel spaces of a canonical (shape-inferred) model."""
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    shapes = _shapes(model)
    for k, v in inits.items():
        shapes[k] = list(v.shape)
    a = Analysis(model, [], [], {}, {})

    def new(size: int, producer: str | None = None, frozen: str | None = None) -> int:
        a.spaces.append(_Space(size, [producer] if producer else [], [frozen] if frozen else []))
        a.parent.append(len(a.spaces) - 1)
        return len(a.spaces) - 1

    def freeze(view: Iterable[int], why: str) -> None:
        for s in view:
            a.spaces[a.root(s)].frozen.append(why)

    def union(x: int, y: int, why: str) -> None:
        rx, ry = a.root(x), a.root(y)
        if rx == ry:
            return
        sx, sy = a.spaces[rx], a.spaces[ry]
        if sx.size != sy.size:
            freeze([rx, ry], why)
            return
        a.parent[ry] = rx
        sx.producers += sy.producers
        sx.frozen += sy.frozen

    def channels(name: str) -> int | None:
        shp = shapes.get(name)
        return shp[1] if shp and len(shp) >= 2 and shp[1] > 0 else None

    for vi in model.graph.input:
        if vi.name not in inits and (c := channels(vi.name)):
            a.views[vi.name] = [new(c, frozen="graph input")]

    for node in model.graph.node:
        op, nm = node.op_type, _name(node)
        why = f"{op} (node {nm})"
        acts = [i for i in node.input if i and i not in inits]
        seen = [i for i in acts if i in a.views]
        out = node.output[0] if node.output else ""
        at = _attrs(node)
        c_out = channels(out) if out else None

        def fresh(frozen: str | None = None, out: str = out, c_out: int | None = c_out) -> None:
            if c_out:
                a.views[out] = [new(c_out, frozen=frozen)]

        if op == "Conv" and node.input[1] in inits and len(acts) == 1:
            w = inits[node.input[1]]
            group = int(at.get("group", 1))
            x = node.input[0]
            if group == 1:
                a.views.setdefault(x, [new(w.shape[1], frozen="no channel view")])
                a.views[out] = [new(w.shape[0], producer=nm)]
            elif x in a.views and group == w.shape[0] == sum(a.spaces[s].size for s in a.views[x]):
                a.views[out] = list(a.views[x])  # depthwise, multiplier 1: carries
            else:
                freeze(a.views.get(x, []), f"{why}: grouped convolution")
                fresh(f"{why}: grouped convolution")
        elif op in ("Gemm", "MatMul") and len(node.input) > 1 and node.input[1] in inits:
            w = inits[node.input[1]]
            x = node.input[0]
            if w.ndim != 2 or at.get("transA", 0) or len(shapes.get(x, [])) != 2:
                freeze(a.views.get(x, []), f"{why}: not a plain [N, F] x [F, out] layer")
                fresh(f"{why}: not a plain layer")
            else:
                trans_b = op == "Gemm" and at.get("transB", 0)
                a.views.setdefault(x, [new(w.shape[1] if trans_b else w.shape[0], frozen="input")])
                a.views[out] = [new(w.shape[0] if trans_b else w.shape[1], producer=nm)]
        elif op == "Flatten" and seen and int(at.get("axis", 1)) == 1:
            shp = shapes.get(node.input[0], [])
            if len(shp) >= 2 and all(d > 0 for d in shp[2:]):
                a.views[out] = list(a.views[node.input[0]])
                a.flatten[out] = int(np.prod(shp[2:])) * a.flatten.get(node.input[0], 1)
            else:
                freeze(a.views[node.input[0]], f"{why}: unknown spatial size")
                fresh(why)
        elif op in _CARRY and seen:
            a.views[out] = list(a.views[node.input[0]])
        elif op == "Pad" and seen:
            pads = inits.get(node.input[1]) if len(node.input) > 1 else at.get("pads")
            p = np.asarray(pads if pads is not None else [1]).reshape(-1)
            rank = len(p) // 2
            if pads is not None and rank >= 2 and p[1] == 0 and p[1 + rank] == 0:
                a.views[out] = list(a.views[node.input[0]])
            else:
                freeze(a.views[node.input[0]], f"{why}: pads the channel axis")
                fresh(why)
        elif op == "ReduceMean" and seen:
            axes = at.get("axes")
            if len(node.input) > 1 and node.input[1] in inits:
                axes = inits[node.input[1]].tolist()
            rank = len(shapes.get(node.input[0], []))
            if axes is not None and 1 % max(rank, 1) not in [int(v) % rank for v in axes]:
                a.views[out] = list(a.views[node.input[0]]) if at.get("keepdims", 1) else []
                if not a.views[out]:
                    freeze(a.views[node.input[0]], f"{why}: drops axes without keepdims")
                    del a.views[out]
            else:
                freeze(a.views[node.input[0]], f"{why}: reduces the channel axis")
                fresh(why)
        elif op in _BINARY and seen:
            chans = [channels(i) if i not in inits else _const_channels(inits[i], shapes, out)
                     for i in node.input[:2]]  # fmt: skip
            act_views = [a.views[i] for i in node.input[:2] if i in a.views]
            if len(act_views) == 2 and all(c and c > 1 for c in chans):
                v1, v2 = act_views
                if len(v1) != len(v2):
                    freeze([*v1, *v2], f"{why}: joins differently concatenated tensors")
                    fresh(why)
                    continue
                for s1, s2 in zip(v1, v2):
                    union(s1, s2, f"{why}: joins channel groups of different sizes")
                a.views[out] = list(v1)
            else:
                # one channel-carrying activation; the other broadcasts (channel dim 1) or is a
                # per-channel constant (sliced)
                full = [i for i, c in zip(node.input[:2], chans) if i in a.views and c and c > 1]
                src = full[0] if full else seen[0]
                a.views[out] = list(a.views[src])
        elif (
            op == "Concat"
            and seen
            and int(at.get("axis", 0)) % max(len(shapes.get(out, [1, 1])), 1) == 1
        ):
            if len(seen) != len(node.input):
                for i in seen:
                    freeze(a.views[i], f"{why}: concatenates a constant")
                fresh(why)
            else:
                a.views[out] = [s for i in node.input for s in a.views[i]]
        else:
            for i in seen:
                freeze(a.views[i], why)
            fresh(why)
    for o in model.graph.output:
        freeze(a.views.get(o.name, []), f"graph output {o.name}")
    return a


def _const_channels(c: np.ndarray, shapes: Mapping[str, list[int]], out: str) -> int | None:
    """The channel-axis size of a constant operand, aligned to the output's rank."""
    rank = len(shapes.get(out, []))
    if c.ndim == 0 or rank < 2:
        return 1
    full = [1] * (rank - c.ndim) + list(c.shape)
    return int(full[1])


# -- rewriting -----------------------------------------------------------------------------
def _scores(
    model: onnx.ModelProto, producers: Sequence[str], size: int, score: str = "l1"
) -> np.ndarray:
    nodes = {_name(n): n for n in model.graph.node}
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    total = np.zeros(size, np.float64)
    for p in producers:
        n = nodes[p]
        w = inits[n.input[1]].astype(np.float64)
        w = np.abs(w) if score == "l1" else w * w  # summed: the L1 norm, or the squared L2
        if n.op_type == "Conv":
            norms = w.reshape(w.shape[0], -1).sum(axis=1)
        elif n.op_type == "Gemm" and _attrs(n).get("transB", 0):
            norms = w.sum(axis=1)
        else:
            norms = w.sum(axis=0)
        norms = norms if score == "l1" else np.sqrt(norms)
        total += norms / max(float(norms.mean()), 1e-12)
    return total


def _keep_count(size: int, ratio: float, multiple: int) -> int:
    if ratio <= 0:
        return size  # not pruned, whatever its size
    k = max(1, round(size * (1 - ratio)))
    if multiple > 1 and size >= 2 * multiple:
        k = max(multiple, round(k / multiple) * multiple)
    return min(size, k)


@dataclass
class Pruned:
    model: onnx.ModelProto
    groups: list[dict[str, Any]]  # per pruned space: producers, channels, kept, ratio
    frozen: list[dict[str, Any]]  # spaces that could not be pruned, and why
    keep_of: dict[str, np.ndarray]  # tensor -> the original channels it kept


def prune_channels(
    model: onnx.ModelProto,
    ratios: Mapping[int, float] | float,
    *,
    analysis: Analysis | None = None,
    multiple: int = 8,
    score: str = "l1",
) -> Pruned:
    """Remove the lowest-scoring ``ratio`` of channels of every prunable space (or per space id
    in ``ratios``); kept counts are rounded to a multiple of ``multiple`` for spaces of at least
    twice that."""
    a = analysis or analyse(model)
    prunable = a.prunable()
    per = {s: float(ratios) for s in prunable} if isinstance(ratios, (int, float)) else dict(ratios)
    keep: dict[int, np.ndarray] = {}
    summary = []
    for sid, sp in prunable.items():
        r = per.get(sid, 0.0)
        if not 0 <= r < 1:
            raise ConfigError(f"pruning ratio {r}: must be in [0, 1)")
        k = _keep_count(sp.size, r, multiple)
        scores = _scores(a.model, sp.producers, sp.size, score)
        idx = np.sort(np.argsort(-scores, kind="stable")[:k])
        keep[sid] = idx
        summary.append({"space": sid, "producers": sp.producers, "channels": sp.size,
                        "kept": int(k), "ratio": round(1 - k / sp.size, 4)})  # fmt: skip
    m = onnx.ModelProto.FromString(model.SerializeToString())
    _rewrite(m, a, keep)
    keep_of = {
        t: _indices(a, v, keep) for t, v in a.views.items() if any(a.root(x) in keep for x in v)
    }
    return Pruned(m, summary, a.frozen(), keep_of)


def _indices(a: Analysis, view: Sequence[int], keep: Mapping[int, np.ndarray]) -> np.ndarray:
    """Kept channel indices of a tensor with ``view``, in its original numbering."""
    parts, offset = [], 0
    for s in view:
        r = a.root(s)
        size = a.spaces[r].size
        parts.append(offset + (keep[r] if r in keep else np.arange(size)))
        offset += size
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def _rewrite(m: onnx.ModelProto, a: Analysis, keep: Mapping[int, np.ndarray]) -> None:
    g = m.graph
    inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    uses: dict[str, int] = {}
    for n in g.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    new_inits: dict[str, np.ndarray] = {}

    def put(node: onnx.NodeProto, pos: int, arr: np.ndarray) -> None:
        name = node.input[pos]
        if uses.get(name, 0) > 1 or name in new_inits:  # shared: give this node its own copy
            name = f"{name}__pruned_{_name(node)}_{pos}"
            node.input[pos] = name
        new_inits[name] = arr

    def cur(node: onnx.NodeProto, pos: int) -> np.ndarray:
        name = node.input[pos]
        return new_inits.get(name, inits[name])

    shapes = _shapes(m)

    def rank(tensor: str) -> int:
        return len(shapes.get(tensor, []))

    def idx(tensor: str) -> np.ndarray | None:
        view = a.views.get(tensor)
        if not view or not any(a.root(s) in keep for s in view):
            return None
        return _indices(a, view, keep)

    for n in g.node:
        op = n.op_type
        out_idx = idx(n.output[0]) if n.output else None
        in_idx = idx(n.input[0]) if n.input else None
        at = _attrs(n)
        if op == "Conv" and n.input[1] in inits:
            group = int(at.get("group", 1))
            w = cur(n, 1)
            if group == 1:
                if in_idx is not None:
                    w = w[:, in_idx]
                if out_idx is not None:
                    w = w[out_idx]
                    if len(n.input) > 2 and n.input[2]:
                        put(n, 2, cur(n, 2)[out_idx])
                put(n, 1, w)
            elif in_idx is not None:  # depthwise carrier
                put(n, 1, w[in_idx])
                if len(n.input) > 2 and n.input[2]:
                    put(n, 2, cur(n, 2)[in_idx])
                for attr in n.attribute:
                    if attr.name == "group":
                        attr.i = len(in_idx)
        elif op in ("Gemm", "MatMul") and len(n.input) > 1 and n.input[1] in inits:
            trans_b = op == "Gemm" and at.get("transB", 0)
            w = cur(n, 1)
            if in_idx is not None:
                f = a.flatten.get(n.input[0], 1)
                cols = (in_idx[:, None] * f + np.arange(f)[None, :]).reshape(-1)
                w = w[:, cols] if trans_b else w[cols]
            if out_idx is not None:
                w = w[out_idx] if trans_b else w[:, out_idx]
                if len(n.input) > 2 and n.input[2] and cur(n, 2).size > 1:
                    put(n, 2, cur(n, 2).reshape(-1)[out_idx])
            put(n, 1, w)
        elif op == "BatchNormalization" and in_idx is not None:
            for pos in range(1, 5):
                put(n, pos, cur(n, pos)[in_idx])
        elif op == "PRelu" and in_idx is not None and cur(n, 1).size > 1:
            _slice_const(n, 1, in_idx, cur, put, rank(n.input[0]))
        elif op in _BINARY and out_idx is not None:
            for pos in (0, 1):
                if n.input[pos] in inits:
                    _slice_const(n, pos, out_idx, cur, put, rank(n.output[0]))
    keep_names = {i for n in g.node for i in n.input}
    old = list(g.initializer)
    del g.initializer[:]
    for init in old:
        if init.name in keep_names and init.name not in new_inits:
            g.initializer.append(init)
    for name, arr in new_inits.items():
        g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(arr), name))
    del g.value_info[:]
    outs = {o.name: list(o.type.tensor_type.shape.dim) for o in g.output}
    try:
        inferred = onnx.shape_inference.infer_shapes(m, strict_mode=True)
    except Exception as exc:
        raise ConversionError(f"pruned model fails shape inference: {exc}") from exc
    m.CopyFrom(inferred)
    onnx.checker.check_model(m)
    for o in m.graph.output:
        dims = [d.dim_value for d in o.type.tensor_type.shape.dim]
        want = [d.dim_value for d in outs[o.name]]
        if dims != want:
            raise ConversionError(f"pruning changed output {o.name}'s shape: {want} -> {dims}")


def _slice_const(
    node: onnx.NodeProto, pos: int, keep: np.ndarray, cur: Any, put: Any, rank: int
) -> None:
    """Slice a constant operand along the activation's channel axis (axis 1), broadcasting
    from the right as ONNX does; a constant with no channel axis or size 1 there is kept."""
    c = cur(node, pos)
    axis = 1 - (rank - c.ndim)
    if c.ndim and axis >= 0 and c.shape[axis] > 1:
        put(node, pos, np.take(c, keep, axis=axis))


# -- recovery ------------------------------------------------------------------------------
def _consumers(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n, _ in weighted_layers(model) if int(_attrs(n).get("group", 1)) == 1]


def _outputs(
    model: onnx.ModelProto, names: Sequence[str], feeds: Sequence[Mapping[str, np.ndarray]]
) -> list[np.ndarray]:
    """``names``' values over all ``feeds``, concatenated along the batch."""
    import onnxruntime as ort

    from converters.quantize import _with_outputs

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(_with_outputs(model, names), so, providers=["CPUExecutionProvider"])
    got = [sess.run(list(names), dict(f)) for f in feeds]
    return [np.concatenate([g[i] for g in got]) for i in range(len(names))]


def _im2col(x: np.ndarray, node: onnx.NodeProto, w_shape: Sequence[int]) -> np.ndarray:
    """Conv input [N, C, H, W] -> rows [N*OH*OW, C*kh*kw] matching W.reshape(O, -1)."""
    at = _attrs(node)
    kh, kw = int(w_shape[2]), int(w_shape[3])
    sh, sw = (int(v) for v in at.get("strides", [1, 1]))
    dh, dw = (int(v) for v in at.get("dilations", [1, 1]))
    t, left, b, r = (int(v) for v in at.get("pads", [0, 0, 0, 0]))
    auto = at.get("auto_pad", b"NOTSET")
    if (auto.decode() if isinstance(auto, bytes) else auto) not in ("NOTSET", "VALID"):
        raise ConversionError(f"{_name(node)}: auto_pad SAME is not reconstructed")
    xp = np.pad(x, ((0, 0), (0, 0), (t, b), (left, r)))
    n, c, hp, wp = xp.shape
    oh = (hp - dh * (kh - 1) - 1) // sh + 1
    ow = (wp - dw * (kw - 1) - 1) // sw + 1
    cols = np.empty((n, c, kh, kw, oh, ow), x.dtype)
    for i in range(kh):
        for j in range(kw):
            cols[:, :, i, j] = xp[
                :, :, i * dh : i * dh + sh * oh : sh, j * dw : j * dw + sw * ow : sw
            ]
    return cols.transpose(0, 4, 5, 1, 2, 3).reshape(n * oh * ow, c * kh * kw)


def recover(
    original: onnx.ModelProto,
    pruned: onnx.ModelProto,
    feeds: Sequence[Mapping[str, np.ndarray]],
    keep_of: Mapping[str, np.ndarray] | None = None,
    *,
    max_rows: int = 20000,
    ridge: float = 1e-3,
    seed: int = 0,
) -> onnx.ModelProto:
    """Training-free recovery: layer by layer in graph order, each Conv (group 1) and Gemm gets
    the weights and bias that best reproduce, by least squares on the calibration ``feeds``, the
    original model's output of that layer from the pruned model's input to it (so each layer
    also absorbs what the layers before it changed). ``keep_of`` maps a tensor to the original
    channels it kept. A layer whose fit would not improve on its pruned weights is left alone."""
    keep_of = dict(keep_of or {})
    rng = np.random.default_rng(seed)
    m = onnx.ModelProto.FromString(pruned.SerializeToString())
    layers = _consumers(m)
    targets = _outputs(original, [n.output[0] for n in layers], feeds)
    for node, y_ref in zip(layers, targets):
        inits = {i.name: i for i in m.graph.initializer}
        w = numpy_helper.to_array(inits[node.input[1]]).astype(np.float64)
        (x,) = _outputs(m, [node.input[0]], feeds)
        k = keep_of.get(node.output[0])
        if k is not None:
            y_ref = y_ref[:, k]
        if node.op_type == "Conv":
            if w.ndim != 4:
                continue
            rows = _im2col(x.astype(np.float64), node, w.shape)
            y = y_ref.transpose(0, 2, 3, 1).reshape(-1, w.shape[0]).astype(np.float64)
            w2 = w.reshape(w.shape[0], -1).T  # [C*kh*kw, O]
        else:
            trans_b = node.op_type == "Gemm" and _attrs(node).get("transB", 0)
            at = _attrs(node)
            if float(at.get("alpha", 1.0)) != 1.0 or float(at.get("beta", 1.0)) != 1.0:
                continue
            rows, y = x.astype(np.float64), y_ref.astype(np.float64)
            w2 = w.T if trans_b else w
        if rows.shape[0] != y.shape[0]:
            continue
        if rows.shape[0] > max_rows:
            pick = rng.choice(rows.shape[0], max_rows, replace=False)
            rows, y = rows[pick], y[pick]
        bias_name = node.input[2] if len(node.input) > 2 and node.input[2] else None
        b = (
            numpy_helper.to_array(inits[bias_name]).astype(np.float64).reshape(-1)
            if bias_name
            else np.zeros(y.shape[1])
        )
        if b.size == 1:
            b = np.full(y.shape[1], float(b[0]))
        before = float(np.mean((rows @ w2 + b - y) ** 2))
        a = np.hstack([rows, np.ones((rows.shape[0], 1))])
        gram = a.T @ a
        lam = ridge * float(np.trace(gram)) / gram.shape[0]
        theta = np.linalg.solve(gram + lam * np.eye(gram.shape[0]), a.T @ y)
        after = float(np.mean((a @ theta - y) ** 2))
        if not after < before:
            continue
        w_new, b_new = theta[:-1], theta[-1]
        if node.op_type == "Conv":
            w_out = w_new.T.reshape(w.shape)
        else:
            w_out = w_new.T if (node.op_type == "Gemm" and _attrs(node).get("transB", 0)) else w_new
        inits[node.input[1]].CopyFrom(
            numpy_helper.from_array(w_out.astype(np.float32), node.input[1])
        )
        if bias_name:
            inits[bias_name].CopyFrom(numpy_helper.from_array(b_new.astype(np.float32), bias_name))
        else:
            name = f"{_name(node)}__recovered_bias"
            m.graph.initializer.append(numpy_helper.from_array(b_new.astype(np.float32), name))
            while len(node.input) < 3:
                node.input.append("")
            node.input[2] = name
    return m


# -- unstructured --------------------------------------------------------------------------
def magnitude_prune(
    model: onnx.ModelProto,
    sparsity: float,
    *,
    per_layer: bool = False,
    skip_first_last: bool = True,
) -> tuple[onnx.ModelProto, list[dict[str, Any]]]:
    """Zero the smallest-magnitude weights of Conv/Gemm/MatMul layers: ``sparsity`` of them
    globally (one threshold) or in every layer. Returns (model, per-layer sparsity)."""
    if not 0 <= sparsity < 1:
        raise ConfigError(f"--unstructured {sparsity}: the sparsity must be in [0, 1)")
    m = onnx.ModelProto.FromString(model.SerializeToString())
    layers = weighted_layers(m)
    chosen = layers[1:-1] if skip_first_last and len(layers) > 2 else layers
    arrays = {init.name: numpy_helper.to_array(init) for _, init in chosen}
    if not arrays:
        raise ConfigError("no Conv/Gemm/MatMul weights to prune (the first and last are skipped)")
    theta_all = None
    if not per_layer:
        allw = np.concatenate([np.abs(w).reshape(-1) for w in arrays.values()])
        theta_all = float(np.quantile(allw, sparsity)) if sparsity > 0 else -1.0
    report = []
    for n, init in layers:
        name = init.name
        w = arrays[name] if name in arrays else numpy_helper.to_array(init)
        if name in arrays:
            theta = theta_all if theta_all is not None else float(np.quantile(np.abs(w), sparsity))
            w = np.where(np.abs(w) <= theta, 0, w).astype(w.dtype) if sparsity > 0 else w
            init.CopyFrom(numpy_helper.from_array(w, name))
        report.append({
            "node": _name(n), "op_type": n.op_type, "params": int(w.size),
            "sparsity": round(float(np.mean(w == 0)), 4), "skipped": name not in arrays,
        })  # fmt: skip
    return m, report


def weighted_layers(model: onnx.ModelProto) -> list[tuple[onnx.NodeProto, onnx.TensorProto]]:
    """(node, weight initializer) of every Conv/Gemm/MatMul whose weights are constant."""
    inits = {i.name: i for i in model.graph.initializer}
    return [
        (n, inits[n.input[1]])
        for n in model.graph.node
        if n.op_type in WEIGHTED and len(n.input) > 1 and n.input[1] in inits
    ]


def param_count(model: onnx.ModelProto) -> int:
    return int(sum(np.prod(i.dims) for i in model.graph.initializer if i.data_type == 1))


def compressed_size(data: bytes) -> int:
    """The model's size gzip-compressed, as a bundle stores it."""
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", compresslevel=6, mtime=0) as fh:
        fh.write(data)
    return len(buf.getvalue())
