"""Quantization primitives on the canonical model: fp16, static int8 (any scheme), dynamic int8,
one calibration shared by every scheme and retry, and per-node sensitivity.

Calibration runs once per model and method; its ranges are cached as JSON and every scheme and
every float-fallback retry quantizes from that cache (onnxruntime's ``calibration_cache_path``).
The same ranges will serve the TFLite int8 path, so the two int8 models agree.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import tempfile
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)
from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data

from converters.heads import consumers
from converters.validate import make_session
from edge_agent.errors import ConversionError, first_line
from edge_agent.model.formats import Int8Scheme
from edge_agent.model.runtimes.onnx import SESSION_CONFIG_KEY

log = logging.getLogger(__name__)

METHODS = {
    "minmax": CalibrationMethod.MinMax,
    "entropy": CalibrationMethod.Entropy,
    "percentile": CalibrationMethod.Percentile,
}
_QTYPE = {"u8": QuantType.QUInt8, "s8": QuantType.QInt8}
#: Ops whose weights carry most of a model's size and error; the ones sensitivity ranks.
WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """onnxruntime's quantizer logs advice at WARNING through the root logger, and its histogram
    calibrators (percentile, entropy) print their progress: keep both off the user's terminal."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(level)


class FeedReader(CalibrationDataReader):
    """onnxruntime's calibration reader over a stream of feeds."""

    def __init__(self, feeds: Iterable[Mapping[str, np.ndarray]], *, on_item: Any = None) -> None:
        self._it = iter(feeds)
        self._on_item = on_item

    def get_next(self) -> dict[str, np.ndarray] | None:
        item = next(self._it, None)
        if item is not None and self._on_item is not None:
            self._on_item()
        return None if item is None else dict(item)


def calibrate(
    model_path: Path,
    feeds: Iterable[Mapping[str, np.ndarray]],
    *,
    method: str,
    cache_path: Path,
    on_item: Any = None,
) -> Path:
    """Collect activation ranges once and write them to ``cache_path`` (JSON)."""
    if method not in METHODS:
        raise ConversionError(
            f"unknown calibration method {method!r} (known: {', '.join(METHODS)})"
        )
    extra: dict[str, Any] = {}
    if method == "percentile":
        extra["percentile"] = 99.99
    with tempfile.TemporaryDirectory(prefix="edge-calib-") as tmp, _quiet():
        try:
            calibrator = create_calibrator(
                model_path,
                None,
                augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                calibrate_method=METHODS[method],
                extra_options=extra,
            )
            calibrator.collect_data(FeedReader(feeds, on_item=on_item))
            ranges = calibrator.compute_data()
        except Exception as exc:
            raise ConversionError(f"calibration failed: {first_line(exc)}") from exc
    save_tensors_data(ranges, cache_path)
    return cache_path


def quantize_int8_static(
    model_path: Path,
    out_path: Path,
    *,
    scheme: Int8Scheme,
    cache_path: Path,
    method: str,
    per_channel: bool = True,
    nodes_to_exclude: Sequence[str] = (),
) -> Path:
    """Static int8 from cached ranges, in the given scheme."""
    fmt = QuantFormat.QDQ if scheme.graph == "qdq" else QuantFormat.QOperator
    with _quiet():
        try:
            quantize_static(
                str(model_path),
                str(out_path),
                None,
                quant_format=fmt,
                per_channel=per_channel,
                reduce_range=scheme.reduce_range,
                activation_type=_QTYPE[scheme.activation],
                weight_type=_QTYPE[scheme.weight],
                nodes_to_exclude=list(nodes_to_exclude),
                calibrate_method=METHODS[method],
                calibration_cache_path=str(cache_path),
                extra_options={},
            )
        except Exception as exc:
            raise ConversionError(
                f"int8 quantization ({scheme.name}) failed: {first_line(exc)}"
            ) from exc
    if fmt == QuantFormat.QOperator:
        _hint_qoperator(out_path)
    return out_path


def _hint_qoperator(path: Path) -> None:
    """Record in a QOperator graph's metadata that onnxruntime's QDQ passes are to stay off
    (:data:`edge_agent.model.runtimes.onnx.SESSION_HINTS`): the graph has no QDQ units for them
    to fuse, and with them on, the ops kept in float lose their fusions (a SiLU or a GELU runs
    as four or five kernels). The device and every measurement here load it the same way."""
    model = onnx.load_model(str(path))
    props = {p.key: p.value for p in model.metadata_props}
    props[SESSION_CONFIG_KEY] = json.dumps({"session.disable_quant_qdq": "1"})
    onnx.helper.set_model_props(model, props)
    onnx.save_model(model, str(path))


#: ops that quantizers and the TFLite writer fold into the weighted op before them (a fused
#: activation, a bias or scale): kept with it, so keeping them float would keep it float too
_FOLDED = ("Relu", "Clip", "LeakyRelu", "PRelu", "Add", "Sub", "Mul", "Div", "BatchNormalization")


def unweighted_nodes(model: onnx.ModelProto, *, min_weights: int = 256) -> list[str]:
    """The nodes with no learned weights: every node but the :data:`WEIGHTED_OPS` with a
    constant weight (for MatMul, either operand), the nodes with a constant input of
    ``min_weights`` values or more (a learned position embedding added, say), and the
    activation, bias or scale right after a weighted op that is folded into it (a Conv's Relu,
    a MatMul's bias Add). Keeping these in float while the rest is int8 costs almost nothing in
    size and saves the int8 softmax, elementwise and normalisation kernels, which on some
    runtimes are slower than float."""
    sizes = {i.name: int(np.prod(i.dims)) for i in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant":
            t = next((a.t for a in n.attribute if a.name == "value"), None)
            if t is not None:
                sizes[n.output[0]] = int(np.prod(t.dims))
    readers = consumers(model)
    weighted: set[str] = set()  # outputs of weighted ops (and of what is folded into them)
    out = []
    for node in model.graph.node:
        operands = node.input[:2] if node.op_type == "MatMul" else node.input[1:2]
        if node.op_type in WEIGHTED_OPS and any(i in sizes for i in operands):
            weighted.update(node.output)
            continue
        if any(sizes.get(i, 0) >= min_weights for i in node.input):
            continue
        acts = [i for i in node.input if i and i not in sizes]
        if (
            node.op_type in _FOLDED
            and len(acts) == 1
            and acts[0] in weighted
            and len(readers.get(acts[0], ())) == 1
        ):
            weighted.update(node.output)
            continue
        out.append(node.name)
    return out


def quantize_int8_dynamic(
    model_path: Path,
    out_path: Path,
    *,
    per_channel: bool = True,
    reduce_range: bool = False,
    nodes_to_exclude: Sequence[str] = (),
) -> Path:
    """Dynamic int8: int8 weights, activations quantized per call (MatMul / RNN-heavy models)."""
    with _quiet():
        try:
            quantize_dynamic(
                str(model_path),
                str(out_path),
                per_channel=per_channel,
                reduce_range=reduce_range,
                weight_type=QuantType.QInt8,
                nodes_to_exclude=list(nodes_to_exclude),
            )
        except Exception as exc:
            raise ConversionError(f"dynamic int8 quantization failed: {first_line(exc)}") from exc
    return out_path


def to_fp16(model: onnx.ModelProto, *, node_block_list: Sequence[str] = ()) -> onnx.ModelProto:
    """fp16 weights and compute, float32 inputs/outputs kept for the caller."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    with _quiet():
        try:
            converted = convert_float_to_float16(
                onnx.ModelProto.FromString(model.SerializeToString()),
                keep_io_types=True,
                node_block_list=list(node_block_list) or None,
            )
        except Exception as exc:
            raise ConversionError(f"fp16 conversion failed: {first_line(exc)}") from exc
    _drop_duplicate_nodes(converted)
    _skip_fp16_round_trips(converted)
    return converted


def _skip_fp16_round_trips(model: onnx.ModelProto) -> None:
    """Between two nodes kept in float the converter still passes the tensor through fp16
    (``Cast(to fp16) -> Cast(to fp32)``), which overflows exactly where it must not: read the
    float tensor directly instead, and drop casts nobody reads any more."""
    f16, f32 = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT

    def cast_to(node: onnx.NodeProto) -> int | None:
        if node.op_type != "Cast":
            return None
        return next((a.i for a in node.attribute if a.name == "to"), None)

    producers = {o: n for n in model.graph.node for o in n.output}
    graph_outputs = {o.name for o in model.graph.output}
    rename: dict[str, str] = {}
    dropped: set[int] = set()
    for node in model.graph.node:
        if cast_to(node) == f32 and node.output[0] not in graph_outputs:
            src = producers.get(node.input[0])
            if src is not None and cast_to(src) == f16:
                rename[node.output[0]] = src.input[0]
                dropped.add(id(node))
    if not rename:
        return
    keep = [n for n in model.graph.node if id(n) not in dropped]
    for node in keep:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    used = {i for n in keep for i in n.input} | graph_outputs
    keep = [n for n in keep if not (cast_to(n) == f16 and n.output[0] not in used)]
    del model.graph.node[:]
    model.graph.node.extend(keep)


def _drop_duplicate_nodes(model: onnx.ModelProto) -> None:
    """onnxruntime's fp16 converter inserts the same Cast twice when a kept-in-float node reads
    one tensor twice (``Mul(x, x)``): keep one copy of identical nodes."""
    seen: set[bytes] = set()
    keep = []
    for node in model.graph.node:
        key = node.SerializeToString(deterministic=True)
        if key not in seen:
            seen.add(key)
            keep.append(node)
    if len(keep) != len(model.graph.node):
        del model.graph.node[:]
        model.graph.node.extend(keep)


#: The largest finite float16 value.
FP16_MAX = 65504.0


def fp16_overflow_nodes(
    model: onnx.ModelProto,
    feeds: Sequence[Mapping[str, np.ndarray]],
    *,
    threads: int = 0,
    headroom: float = 0.5,
) -> list[dict[str, Any]]:
    """Nodes whose float32 outputs, on these samples, come within ``headroom`` of fp16's range.

    Validation cannot catch fp16 overflow on a CPU (onnxruntime runs many fp16 ops in fp32
    there); a Jetson GPU would produce inf. These nodes are kept in fp32 instead."""
    tensors = [o for n in model.graph.node for o in n.output if o]
    sess = make_session(_with_outputs(model, tensors), threads=threads)
    names = [o.name for o in sess.get_outputs()]
    peak: dict[str, float] = {}
    for feed in feeds:
        for name, value in zip(names, sess.run(names, dict(feed))):
            value = np.asarray(value)
            if value.dtype.kind == "f" and value.size:
                top = float(np.max(np.abs(value[np.isfinite(value)]), initial=0.0))
                peak[name] = max(peak.get(name, 0.0), top)
    limit = FP16_MAX * headroom
    found = []
    for node in model.graph.node:
        worst = max((peak.get(o, 0.0) for o in node.output), default=0.0)
        if worst > limit:
            found.append({"node": node.name, "op_type": node.op_type, "max_abs": worst})
    return found


# --- sensitivity -----------------------------------------------------------------------------


def quantizable_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type in WEIGHTED_OPS and n.name]


def _with_outputs(model: onnx.ModelProto, names: Sequence[str]) -> bytes:
    m = onnx.ModelProto.FromString(model.SerializeToString())
    have = {o.name for o in m.graph.output}
    for name in names:
        if name not in have:
            m.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    return m.SerializeToString()


def _nsr(ref: np.ndarray, got: np.ndarray) -> float:
    ref64, got64 = ref.astype(np.float64), got.astype(np.float64)
    return float(np.sum((got64 - ref64) ** 2) / max(np.sum(ref64**2), 1e-30))


def _channel_nsr(ref: np.ndarray, got: np.ndarray) -> float:
    """Noise-to-signal of each slice along axis 1 (channels, or a detector's features), each
    at most 1, averaged: a per-tensor scale that crushes the small channels beside a large one
    shows here (the whole tensor's energy is the large channel's, and hides it)."""
    if ref.ndim < 2 or ref.shape[1] < 2:
        return min(_nsr(ref, got), 1.0)
    r = np.moveaxis(ref.astype(np.float64), 1, 0).reshape(ref.shape[1], -1)
    g = np.moveaxis(got.astype(np.float64), 1, 0).reshape(ref.shape[1], -1)
    signal = np.sum(r**2, axis=1)
    noise = np.sum((g - r) ** 2, axis=1)
    live = signal > 1e-12 * max(float(signal.max()), 1e-30)
    if not live.any():
        return 0.0
    return float(np.mean(np.minimum(noise[live] / signal[live], 1.0)))


def _dequantized(qdq_model: onnx.ModelProto) -> dict[str, str]:
    """Tensor -> the name its consumers read it under in a QDQ graph (``t -> Q -> DQ``)."""
    prod = {o: n for n in qdq_model.graph.node for o in n.output}
    seen: dict[str, str] = {}
    for n in qdq_model.graph.node:
        if n.op_type == "DequantizeLinear":
            q_node = prod.get(n.input[0])
            if q_node is not None and q_node.op_type == "QuantizeLinear":
                seen.setdefault(q_node.input[0], n.output[0])
    return seen


def activation_sensitivity(
    float_model: onnx.ModelProto,
    qdq_model: onnx.ModelProto,
    feeds: Sequence[Mapping[str, np.ndarray]],
    *,
    threads: int = 0,
    blocks: Sequence[Mapping[str, Any]] = (),
) -> list[dict[str, Any]]:
    """Rank every node (and every block, as one unit) by the quantization error it adds.

    Runs the float model and a QDQ-quantized twin on the same feeds with every tensor exposed,
    each QDQ tensor read as its consumers read it (after its QuantizeLinear and
    DequantizeLinear). A unit's error is the noise-to-signal ratio of its output; what it *adds*
    is that minus the worst error already on its inputs from outside the unit. Highest first;
    each entry ``{"node", "nodes", "op_type", "output_nsr", "added_nsr"}`` (``node`` names a
    block by its first node, ``nodes`` lists what keeping the unit in float keeps).
    """
    float_tensors = {o for n in float_model.graph.node for o in n.output}
    q_tensors = {o for n in qdq_model.graph.node for o in n.output}
    q_nodes = {n.name: n for n in qdq_model.graph.node}
    seen = _dequantized(qdq_model)
    # The tensor that carries each node's result in both graphs. The quantizer may drop an
    # activation after a node (Relu/Clip folded into the quantized range): the node's output
    # in the QDQ graph is then the activation's output, which the float graph also has. A graph
    # output keeps its name on the DequantizeLinear after the node, while the node's own output
    # is renamed: fall back to the float name then.
    result_of: dict[str, str] = {}
    for node in float_model.graph.node:
        if not node.name or not node.output or node.op_type == "Constant":
            continue
        qnode = q_nodes.get(node.name)
        names = ([qnode.output[0]] if qnode is not None and qnode.output else []) + [node.output[0]]
        out = next((t for t in names if t in float_tensors and t in q_tensors), None)
        if out is not None:
            result_of[node.name] = out
    inputs = {
        i for n in float_model.graph.node for i in n.input if i in float_tensors and i in q_tensors
    }
    tensors = sorted(set(result_of.values()) | inputs)
    q_names = [seen.get(t, t) for t in tensors]
    sf = make_session(_with_outputs(float_model, tensors), threads=threads)
    sq = make_session(_with_outputs(qdq_model, sorted(set(q_names))), threads=threads)
    errors: dict[str, list[float]] = {t: [] for t in tensors}
    for feed in feeds:
        ref = sf.run(tensors, dict(feed))
        got = sq.run(q_names, dict(feed))
        for t, r, g in zip(tensors, ref, got):
            r, g = np.asarray(r), np.asarray(g)
            if r.dtype.kind == "f" and r.shape == g.shape:
                errors[t].append(_channel_nsr(r, g))
    err = {t: float(np.mean(v)) for t, v in errors.items() if v}
    by_name = {n.name: n for n in float_model.graph.node}
    in_block = {name for b in blocks for name in b["nodes"]}
    units: list[tuple[str, list[str]]] = [(b["kind"], list(b["nodes"])) for b in blocks]
    # nodes the quantizer fused (a Conv and the Relu folded into it) share one result: one unit
    fused: dict[str, list[str]] = {}
    for name, out in result_of.items():
        if name not in in_block:
            fused.setdefault(out, []).append(name)
    units += [(by_name[names[0]].op_type, names) for names in fused.values()]
    ranking: list[dict[str, Any]] = []
    read_by: dict[str, set[str]] = {}
    for n in float_model.graph.node:
        for i in n.input:
            read_by.setdefault(i, set()).add(n.name)
    graph_outputs = {o.name for o in float_model.graph.output}
    for kind, names in units:
        inside = set(names)
        # a unit's output: what leaves it (read outside it, or a graph output), not its inner
        # tensors (an attention block's scores are noisier than what it hands on)
        outs = [
            result_of[n]
            for n in names
            if n in result_of
            and result_of[n] in err
            and (
                len(names) == 1
                or read_by.get(result_of[n], set()) - inside
                or result_of[n] in graph_outputs
            )
        ]
        if not outs:
            continue
        made = {o for n in names for o in by_name[n].output}
        upstream = max(
            (err.get(i, 0.0) for n in names for i in by_name[n].input if i not in made),
            default=0.0,
        )
        out_nsr = max(err[o] for o in outs)
        ranking.append(
            {
                "node": names[0],
                "nodes": names,
                "op_type": kind,
                "op_types": {n: by_name[n].op_type for n in names},
                "output_nsr": out_nsr,
                "added_nsr": max(out_nsr - upstream, 0.0),
            }
        )
    # stable: by added error, then graph order (ties are common for exact ops)
    order = {n.name: k for k, n in enumerate(float_model.graph.node)}
    ranking.sort(key=lambda r: (-r["added_nsr"], order[r["node"]]))
    return ranking


def weight_sensitivity(
    model: onnx.ModelProto, *, reduce_range: bool = False
) -> list[dict[str, Any]]:
    """Rank weighted nodes by the noise of quantizing their weights per channel (symmetric int8).

    Used for dynamic quantization, where activations are quantized with exact ranges per call."""
    inits = {i.name: i for i in model.graph.initializer}
    qmax = 63 if reduce_range else 127
    ranking: list[dict[str, Any]] = []
    for node in quantizable_nodes(model):
        weight_name = next((i for i in node.input[1:2] if i in inits), None)
        if weight_name is None:
            continue
        w = numpy_helper.to_array(inits[weight_name]).astype(np.float64)
        if w.ndim == 0 or w.size == 0:
            continue
        axis = 0 if node.op_type in ("Conv", "ConvTranspose") else w.ndim - 1
        reduce_axes = tuple(a for a in range(w.ndim) if a != axis)
        scale = np.max(np.abs(w), axis=reduce_axes, keepdims=True) / qmax
        scale = np.where(scale == 0, 1.0, scale)
        wq = np.clip(np.round(w / scale), -qmax, qmax) * scale
        nsr = _nsr(w, wq)
        ranking.append(
            {
                "node": node.name,
                "nodes": [node.name],
                "op_type": node.op_type,
                "output_nsr": nsr,
                "added_nsr": nsr,
            }
        )
    ranking.sort(key=lambda r: r["added_nsr"], reverse=True)
    return ranking


def node_names_present(model: onnx.ModelProto, names: Iterable[str]) -> list[str]:
    have = {n.name for n in model.graph.node}
    return [n for n in names if n in have]


def ensure_node_names(model: onnx.ModelProto) -> int:
    """Give every unnamed node a stable unique name (the quantizer addresses nodes by name)."""
    used = {n.name for n in model.graph.node if n.name}
    fixed = 0
    for i, node in enumerate(model.graph.node):
        if not node.name:
            name = f"{node.op_type}_{i}"
            while name in used:
                name += "_"
            node.name = name
            used.add(name)
            fixed += 1
    return fixed
