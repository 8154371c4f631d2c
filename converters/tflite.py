"""Canonical fp32 ONNX -> .tflite flatbuffer, written with the schema's object API (no TensorFlow).

Every tensor carries a layout: ``perm`` such that ``tflite_shape == onnx_shape[perm]``. 4-D
activations are NHWC (``perm == (0, 2, 3, 1)``), everything else is in ONNX order. An op that
needs a particular layout asks for its input in that layout (:meth:`_Writer.get`), which emits
a TRANSPOSE only when the tensor is not already in it (and caches the result), so a pure CNN
converts with no TRANSPOSE inside. Constants are permuted at conversion time.

A Flatten (or Reshape to ``[N, -1]``) of an NHWC tensor that feeds only Gemm/MatMul with
constant weights flattens in NHWC order and permutes the weight's input columns instead.

Beyond one node per op: a MatMul of two activations is a BATCH_MATMUL (an operand held with
its last two axes swapped, as a Transpose leaves it, sets adj_x / adj_y instead of being
transposed back); a BatchNormalization no convolution absorbed is a 1x1 DEPTHWISE_CONV_2D on
an NHWC tensor, else MUL + ADD; a Softmax over an axis the layout does not put last is taken
in a layout that does. Two multi-node patterns torch exports are matched before writing
(:data:`_PATTERNS`) and written as one unit: LayerNorm (ReduceMean -> Sub -> Pow -> ReduceMean
-> Add -> Sqrt -> Div -> Mul -> Add, as the LayerNormalization op is written: MEAN, SUB, MUL,
MEAN, ADD, RSQRT, MUL, MUL, ADD) and the exact GELU (Div -> Erf -> Add -> Mul -> Mul: GELU).
The ONNX nodes such a unit stands for are recorded (:attr:`_Writer.absorbed`), so naming any
of them in ``Int8Config.float_nodes`` keeps the unit float.

``fp16_weights=True`` is TFLite's standard float16 scheme (what TensorFlow's converter emits with
``target_spec.supported_types = [tf.float16]``): the weights and biases of CONV_2D,
DEPTHWISE_CONV_2D, FULLY_CONNECTED and TRANSPOSE_CONV, and float constants of at least
:data:`FP16_MIN_ELEMENTS` elements feeding any other op, are stored as FLOAT16 tensors, each
followed by a DEQUANTIZE (version 3) to the float32 tensor the op consumes. Activations, inputs
and outputs stay float32; XNNPACK folds the DEQUANTIZEs at load time. A constant with a value
beyond float16's range (|w| > 65504) is kept in float32 (logged, and counted in
:attr:`_Writer.fp16_kept`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import Any

import flatbuffers  # type: ignore[import-untyped]
import numpy as np
import onnx
from ai_edge_litert import schema_py_generated as S
from onnx import helper, numpy_helper, shape_inference

from converters.tflite_int8 import Int8Config, quantize_graph
from edge_agent.errors import UnsupportedModelError

__all__ = [
    "FP16_MIN_ELEMENTS",
    "SUPPORTED_OPS",
    "count_ops",
    "count_transposes",
    "onnx_to_tflite",
    "pack_model",
]

log = logging.getLogger(__name__)

#: with fp16_weights, float constants that are not compute-op weights/biases are stored as
#: float16 only from this many elements (small ones and scalars stay float32).
FP16_MIN_ELEMENTS = 16
_FP16_MAX = float(np.finfo(np.float16).max)  # 65504
#: DEQUANTIZE's op version for a FLOAT16 input (TFLite's op_version.cc)
_DEQUANTIZE_FP16_VERSION = 3

NHWC: tuple[int, ...] = (0, 2, 3, 1)
_B = S.BuiltinOperator
_O = S.BuiltinOptions
Perm = tuple[int, ...]


def _ident(rank: int) -> Perm:
    return tuple(range(rank))


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


class _Writer:
    def __init__(
        self, model: onnx.ModelProto, keep_nchw_input: bool, fp16_weights: bool = False
    ) -> None:
        self.graph = model.graph
        self.opset = next(
            (int(i.version) for i in model.opset_import if i.domain in ("", "ai.onnx")), 13
        )
        self.keep_nchw_input = keep_nchw_input
        self.fp16_weights = fp16_weights
        self.fp16_kept: list[str] = []  # constants kept in float32: out of float16's range
        self.consts: dict[str, np.ndarray] = {
            i.name: numpy_helper.to_array(i) for i in self.graph.initializer
        }
        for n in self.graph.node:  # known before the patterns are matched
            if n.op_type == "Constant" and n.domain in ("", "ai.onnx") and n.attribute:
                a = _attrs(n)
                if "value" in a:
                    self.consts[n.output[0]] = numpy_helper.to_array(a["value"])
        self.shapes: dict[str, list[int]] = {}
        for vi in [*self.graph.input, *self.graph.value_info, *self.graph.output]:
            tt = vi.type.tensor_type
            if tt.HasField("shape"):
                self.shapes[vi.name] = [
                    int(d.dim_value) if d.HasField("dim_value") and d.dim_value > 0 else 1
                    for d in tt.shape.dim
                ]
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in self.graph.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.outputs = {o.name for o in self.graph.output}
        self.tensors: list[S.TensorT] = []
        self.buffers: list[S.BufferT] = [S.BufferT()]
        self.ops: list[S.OperatorT] = []
        self.opcodes: dict[tuple[int, int], int] = {}  # (builtin code, version) -> index
        self.codes: list[S.OperatorCodeT] = []
        # onnx name -> {perm: tflite tensor index}
        self.index: dict[str, dict[Perm, int]] = {}
        self.perm: dict[str, Perm] = {}  # the layout an activation was produced in
        self.skip: set[str] = set()  # nodes folded into an earlier op (fused activations)
        self.flat_nhwc: dict[str, tuple[int, int, int]] = {}  # flattened NHWC name -> (C, H, W)
        self.fused_out: dict[str, str] = {}  # op output -> output of the activation fused into it
        # for int8: the ONNX tensor whose calibrated range a tflite tensor has, and the ONNX
        # node each operator was emitted for (float fallback keeps a node's operators float)
        self.range_src: dict[int, str] = {}
        self.op_node: list[str] = []
        # ONNX node -> the other ONNX nodes its operators stand for (a fused activation, the
        # rest of a LayerNorm or GELU pattern): keeping any of them float keeps all float
        self.absorbed: dict[str, list[str]] = {}
        # operators (indices into ops) the int8 pass keeps float: int8 would lose too much
        self.keep_float: set[int] = set()
        self._emitting: str | None = None
        # multi-node patterns written as one unit: head node's output -> its writer, and the
        # names of every node a pattern covers (their op types need no writer of their own)
        self.fused: dict[str, Callable[[_Writer], None]] = {}
        self.fused_out_of: dict[str, list[str]] = {}  # head's output -> the pattern's outputs
        self.fused_nodes: set[str] = set()
        for n in self.graph.node:
            if n.output and n.output[0] not in self.fused and _node_name(n) not in self.fused_nodes:
                for match in _PATTERNS:
                    if match(self, n):
                        break

    # -- low-level -------------------------------------------------------------------------
    def new_tensor(
        self, name: str, shape: Sequence[int], data: np.ndarray | None = None, dtype: Any = None
    ) -> int:
        t = S.TensorT()
        t.name = name.encode()
        t.shape = [int(d) for d in shape]
        buf = S.BufferT()
        if data is not None:
            dtype = data.dtype
            buf.data = np.frombuffer(np.ascontiguousarray(data).tobytes(), np.uint8)
        self.buffers.append(buf)
        t.buffer = len(self.buffers) - 1
        dt = np.dtype(dtype or np.float32)
        t.type = {
            np.dtype(np.float32): S.TensorType.FLOAT32,
            np.dtype(np.float16): S.TensorType.FLOAT16,
            np.dtype(np.int32): S.TensorType.INT32,
            np.dtype(np.int64): S.TensorType.INT64,
            np.dtype(np.bool_): S.TensorType.BOOL,
            np.dtype(np.int8): S.TensorType.INT8,
        }[dt]
        self.tensors.append(t)
        return len(self.tensors) - 1

    def const(self, name: str, data: np.ndarray, weight: bool = False) -> int:
        """A constant tensor. With fp16_weights, a float one that is a compute op's weight or
        bias (``weight``) or has at least FP16_MIN_ELEMENTS elements is stored as float16 and
        DEQUANTIZEd to float32 (unless a value is beyond float16's range)."""
        if data.dtype == np.float64:
            data = data.astype(np.float32)
        if data.dtype == np.int64:
            data = data.astype(np.int32)
        if (
            self.fp16_weights
            and data.dtype == np.float32
            and (weight or data.size >= FP16_MIN_ELEMENTS)
        ):
            if data.size and not (np.abs(data).max() <= _FP16_MAX):  # also catches nan/inf
                self.fp16_kept.append(name)
                log.warning("fp16_weights: '%s' is beyond float16's range, kept float32", name)
            else:
                half = self.new_tensor(f"{name}_fp16", data.shape, data.astype(np.float16))
                out = self.new_tensor(name, data.shape)
                self.op(_B.DEQUANTIZE, [half], [out], version=_DEQUANTIZE_FP16_VERSION)
                return out
        return self.new_tensor(name, data.shape, data)

    def opcode(self, code: int, version: int = 1) -> int:
        """The index of (builtin code, version) in the model's operator codes, added if new."""
        if (code, version) not in self.opcodes:
            oc = S.OperatorCodeT()
            oc.builtinCode, oc.deprecatedBuiltinCode, oc.version = code, min(code, 127), version
            self.opcodes[code, version] = len(self.codes)
            self.codes.append(oc)
        return self.opcodes[code, version]

    def op(
        self,
        code: int,
        inputs: Sequence[int],
        outputs: Sequence[int],
        opts: Any = None,
        version: int = 1,
    ) -> None:
        o = S.OperatorT()
        o.opcodeIndex = self.opcode(code, version)
        o.inputs, o.outputs = list(inputs), list(outputs)
        if opts is not None:
            o.builtinOptionsType = getattr(_O, type(opts).__name__[:-1])
            o.builtinOptions = opts
        self.ops.append(o)

    # -- layouts ---------------------------------------------------------------------------
    def shape(self, name: str) -> list[int]:
        if name in self.consts:
            return list(self.consts[name].shape)
        if name not in self.shapes:
            raise UnsupportedModelError(f"tensor '{name}' has no inferred shape")
        return self.shapes[name]

    def produce(self, name: str, perm: Perm) -> int:
        """The tflite tensor for activation ``name`` produced in layout ``perm``."""
        shp = self.shape(name)
        idx = self.new_tensor(name, [shp[p] for p in perm])
        self.range_src[idx] = name
        self.index[name] = {perm: idx}
        self.perm[name] = perm
        return idx

    def alias(self, name: str, like: str) -> None:
        self.index[name] = dict(self.index[like])
        self.perm[name] = self.perm[like]

    def get(self, name: str, perm: Perm | None = None) -> int:
        """``name`` as a tflite tensor in layout ``perm`` (default: however it was produced)."""
        if name in self.consts:
            data = self.consts[name]
            perm = perm or _ident(data.ndim)
            cache = self.index.setdefault(name, {})
            if perm not in cache:
                cache[perm] = self.const(name, np.transpose(data, perm))
            return cache[perm]
        have = self.perm[name]
        perm = perm or have
        cache = self.index[name]
        if perm not in cache:
            rel = [have.index(q) for q in perm]
            shp = self.shape(name)
            new_shape = [shp[p] for p in perm]
            out = self.new_tensor(f"{name}_perm{''.join(map(str, perm))}", new_shape)
            src_shape = self.tensors[cache[have]].shape
            moved = [a for a in rel if src_shape[a] != 1]
            if moved == sorted(moved):  # only unit axes move: the bytes stay in order
                shape_t = self.const(f"{name}_rs{''.join(map(str, perm))}", np.array(new_shape))
                self.op(_B.RESHAPE, [cache[have], shape_t], [out])
            else:
                self.op(_B.TRANSPOSE, [cache[have], self.const(f"{name}_tp", np.array(rel))], [out])
            self.range_src[out] = name
            cache[perm] = out
        return cache[perm]

    def layout(self, name: str) -> Perm:
        if name in self.consts:
            return _ident(self.consts[name].ndim)
        return self.perm[name]

    def get_broadcast(self, name: str, rank: int, perm: Perm) -> int:
        """``name`` broadcast (ONNX rules) to ``rank`` dims, in layout ``perm``."""
        shp = self.shape(name)
        if len(shp) == rank:
            return self.get(name, perm)
        full = [1] * (rank - len(shp)) + shp
        if name in self.consts:
            key = f"{name}@{rank}"
            if key not in self.consts:
                self.consts[key] = self.consts[name].reshape(full)
            return self.get(key, perm)
        key = f"{name}@{rank}"
        if key not in self.index:
            src = self.get(name, _ident(len(shp)))
            out = self.produce_shape(key, full, _ident(rank))
            self.op(_B.RESHAPE, [src, self.const(f"{key}_shape", np.array(full))], [out])
        return self.get(key, perm)

    def produce_shape(self, name: str, shape: list[int], perm: Perm) -> int:
        self.shapes[name] = shape
        return self.produce(name, perm)

    def default_perm(self, name: str) -> Perm:
        r = len(self.shape(name))
        return NHWC if r == 4 else _ident(r)

    def absorb(self, node: onnx.NodeProto) -> None:
        """``node`` is written by the node being emitted (its output is not emitted again)."""
        if node.output:
            self.skip.add(node.output[0])
        if self._emitting is not None:
            self.absorbed.setdefault(self._emitting, []).append(_node_name(node))

    def fuse(self, nodes: Sequence[onnx.NodeProto], write: Callable[[_Writer], None]) -> None:
        """Write ``nodes`` (a matched pattern, topologically ordered) as one unit, when its
        first node comes up: the others are skipped and their names recorded as absorbed."""
        head = nodes[0]
        self.fused[head.output[0]] = write
        self.fused_out_of[head.output[0]] = [o for n in nodes[1:] for o in n.output]
        self.fused_nodes.update(_node_name(n) for n in nodes)
        for n in nodes[1:]:
            self.skip.add(n.output[0])
        self.absorbed[_node_name(head)] = [_node_name(n) for n in nodes[1:]]

    def fusable_activation(self, out: str) -> int:
        """If ``out``'s only consumer is a Relu or Clip(0, 6), fuse it (and skip that node)."""
        users = self.consumers.get(out, [])
        if out in self.outputs or len(users) != 1:
            return S.ActivationFunctionType.NONE
        user = users[0]
        act = None
        if user.op_type == "Relu":
            act = S.ActivationFunctionType.RELU
        elif user.op_type == "Clip" and self.clip_bounds(user) == (0.0, 6.0):
            act = S.ActivationFunctionType.RELU6
        if act is None:
            return S.ActivationFunctionType.NONE
        self.absorb(user)
        self.fused_out[out] = user.output[0]
        return act

    def clip_bounds(self, node: onnx.NodeProto) -> tuple[float, float] | None:
        a = _attrs(node)
        lo, hi = float(a.get("min", -np.inf)), float(a.get("max", np.inf))
        for pos in (1, 2):
            if len(node.input) > pos and node.input[pos]:
                if node.input[pos] not in self.consts:
                    return None
                v = float(self.consts[node.input[pos]].reshape(()))
                lo, hi = (v, hi) if pos == 1 else (lo, v)
        return lo, hi

    # -- driver ----------------------------------------------------------------------------
    def build(self) -> tuple[list[int], list[int]]:
        """Emit every node; the subgraph's (input, output) tensor indices."""
        inputs = []
        for vi in self.graph.input:
            if vi.name in self.consts:
                continue
            r = len(self.shape(vi.name))
            perm = _ident(r) if (self.keep_nchw_input or r != 4) else NHWC
            inputs.append(self.produce(vi.name, perm))
        refused: list[str] = []
        for node in self.graph.node:
            if node.output and node.output[0] in self.skip:
                continue
            start = len(self.ops)
            self._emitting = _node_name(node)
            try:
                if node.output and node.output[0] in self.fused:
                    self.fused[node.output[0]](self)
                else:
                    _OPS[node.op_type](self, node)
            except UnsupportedModelError as exc:
                # name every node refused for its attributes, not only the first: stand-in
                # outputs let the rest of the graph be checked too
                refused.append(str(exc))
                for o in [*node.output, *self.fused_out_of.get(node.output[0], ())]:
                    if o and o not in self.index and o in self.shapes:
                        self.produce(o, self.default_perm(o))
                continue
            finally:
                self._emitting = None
            self.op_node.extend([_node_name(node)] * (len(self.ops) - start))
            for o, final in list(self.fused_out.items()):
                if o in self.index and final not in self.index:
                    # the fused activation's output is the op's output
                    self.alias(final, o)
                    for idx in self.index[o].values():
                        self.range_src[idx] = final
        if len(refused) == 1:
            raise UnsupportedModelError(refused[0])
        if refused:
            raise UnsupportedModelError(
                f"{len(refused)} nodes cannot be converted: " + "; ".join(refused)
            )
        start = len(self.ops)
        outputs = [self.get(o.name, self.default_perm(o.name)) for o in self.graph.output]
        self.op_node.extend(["(graph outputs)"] * (len(self.ops) - start))
        return inputs, outputs

    def pack(self, inputs: list[int], outputs: list[int]) -> bytes:
        model = S.ModelT()
        model.version, model.description = 3, b"edge converters.tflite"
        sg = S.SubGraphT()
        sg.name = b"main"
        sg.tensors, sg.operators = self.tensors, self.ops
        sg.inputs, sg.outputs = inputs, outputs
        model.subgraphs = [sg]
        model.buffers = self.buffers
        model.operatorCodes = self.codes
        return pack_model(model)


def pack_model(model: Any) -> bytes:
    """A schema ``ModelT`` as ``.tflite`` bytes (identifier ``TFL3``)."""
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


# -- helpers for converters ----------------------------------------------------------------
def _node_name(node: onnx.NodeProto) -> str:
    return node.name or node.output[0]


def _fail(node: onnx.NodeProto, why: str) -> UnsupportedModelError:
    return UnsupportedModelError(f"{node.op_type} (node {_node_name(node)}): {why}")


def _padding(
    node: onnx.NodeProto,
    in_hw: Sequence[int],
    k: Sequence[int],
    s: Sequence[int],
    d: Sequence[int],
) -> tuple[int, list[int]]:
    """(TFLite padding, explicit pads [top, left, bottom, right] still to apply)."""
    a = _attrs(node)
    auto = a.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    same = []
    for i in range(2):
        out = -(-in_hw[i] // s[i])
        total = max((out - 1) * s[i] + (k[i] - 1) * d[i] + 1 - in_hw[i], 0)
        same.append((total // 2, total - total // 2))
    if auto == "VALID":
        return S.Padding.VALID, [0, 0, 0, 0]
    if auto == "SAME_UPPER":
        return S.Padding.SAME, [0, 0, 0, 0]
    if auto == "SAME_LOWER":
        pads = [same[0][1], same[1][1], same[0][0], same[1][0]]
    else:
        pads = [int(p) for p in a.get("pads", [0, 0, 0, 0])]
    if not any(pads):
        return S.Padding.VALID, pads
    if pads == [same[0][0], same[1][0], same[0][1], same[1][1]]:
        return S.Padding.SAME, [0, 0, 0, 0]
    return S.Padding.VALID, pads


def _pad_nhwc(w: _Writer, x: int, name: str, pads: list[int], value: float = 0.0) -> int:
    shp = list(w.tensors[x].shape)
    t, left, b, r = pads
    out_shape = [shp[0], shp[1] + t + b, shp[2] + left + r, shp[3]]
    out = w.new_tensor(f"{name}_pad", out_shape)
    p = w.const(f"{name}_pads", np.array([[0, 0], [t, b], [left, r], [0, 0]], np.int32))
    if value == 0.0:
        w.op(_B.PAD, [x, p], [out], S.PadOptionsT())
    else:
        v = w.const(f"{name}_padv", np.array([value], np.float32))
        w.op(_B.PADV2, [x, p, v], [out], S.PadV2OptionsT())
    return out


def _conv(w: _Writer, node: onnx.NodeProto) -> None:
    a = _attrs(node)
    x_name, w_name = node.input[0], node.input[1]
    if w_name not in w.consts or len(w.shape(x_name)) != 4:
        raise _fail(node, "only 2-D convolutions with constant weights")
    wt = w.consts[w_name].astype(np.float32)
    n_out, cin_g, kh, kw = wt.shape
    cin = w.shape(x_name)[1]
    group = int(a.get("group", 1))
    s = [int(v) for v in a.get("strides", [1, 1])]
    d = [int(v) for v in a.get("dilations", [1, 1])]
    pad, pads = _padding(node, w.shape(x_name)[2:], [kh, kw], s, d)
    bias = (
        w.consts[node.input[2]].astype(np.float32)
        if len(node.input) > 2 and node.input[2]
        else np.zeros(n_out, np.float32)
    )
    if len(node.input) > 2 and node.input[2] and node.input[2] not in w.consts:
        raise _fail(node, "bias must be constant")
    x = w.get(x_name, NHWC)
    if any(pads):
        x = _pad_nhwc(w, x, node.output[0], pads)
    out_name = node.output[0]
    act = w.fusable_activation(out_name)
    b = w.const(f"{out_name}_bias", bias, weight=True)
    if group == 1:
        f = w.const(f"{w_name}_ohwi", wt.transpose(0, 2, 3, 1), weight=True)
        o = S.Conv2DOptionsT()
        code = _B.CONV_2D
    elif group == cin and cin_g == 1:
        f = w.const(f"{w_name}_1hwc", wt.transpose(1, 2, 3, 0), weight=True)
        o = S.DepthwiseConv2DOptionsT()
        o.depthMultiplier = n_out // cin
        code = _B.DEPTHWISE_CONV_2D
    elif cin_g * group == cin and n_out % group == 0:
        _grouped_conv(w, node, x, wt, bias, group, (pad, s, d, act))
        return
    else:
        raise _fail(node, f"group={group} does not divide the channels")
    o.padding, o.strideH, o.strideW = pad, s[0], s[1]
    o.dilationHFactor, o.dilationWFactor = d[0], d[1]
    o.fusedActivationFunction = act
    w.op(code, [x, f, b], [w.produce(out_name, NHWC)], o)


def _grouped_conv(
    w: _Writer,
    node: onnx.NodeProto,
    x: int,
    wt: np.ndarray,
    bias: np.ndarray,
    group: int,
    conv: tuple[int, list[int], list[int], int],
) -> None:
    """SPLIT the channels, one CONV_2D per group, CONCATENATION."""
    pad, s, d, act = conv
    n, h, wd, cin = w.tensors[x].shape
    name = node.output[0]
    parts = [w.new_tensor(f"{name}_in{g}", [n, h, wd, cin // group]) for g in range(group)]
    so = S.SplitOptionsT()
    so.numSplits = group
    w.op(_B.SPLIT, [w.const(f"{name}_axis", np.array(3, np.int32)), x], parts, so)
    out_shape = w.shape(name)
    per = out_shape[1] // group
    outs = []
    for g, part in enumerate(parts):
        o = S.Conv2DOptionsT()
        o.padding, o.strideH, o.strideW = pad, s[0], s[1]
        o.dilationHFactor, o.dilationWFactor = d[0], d[1]
        o.fusedActivationFunction = act
        f = w.const(f"{name}_w{g}", wt[g * per : (g + 1) * per].transpose(0, 2, 3, 1), True)
        b = w.const(f"{name}_b{g}", bias[g * per : (g + 1) * per], True)
        t = w.new_tensor(f"{name}_out{g}", [out_shape[0], out_shape[2], out_shape[3], per])
        w.range_src[t] = w.fused_out.get(name, name)  # the CONCATENATION keeps one scale
        w.op(_B.CONV_2D, [part, f, b], [t], o)
        outs.append(t)
    co = S.ConcatenationOptionsT()
    co.axis = 3
    w.op(_B.CONCATENATION, outs, [w.produce(name, NHWC)], co)


def _pool(w: _Writer, node: onnx.NodeProto) -> None:
    """MAX_POOL_2D / AVERAGE_POOL_2D. SAME padding where it is what ONNX computes; else the
    explicit pads (and, for ceil_mode, what the last partial window runs past the end) as a
    PAD (the lowest float for MaxPool, zeros for AveragePool) then VALID, and an AveragePool
    whose ONNX divisor is not the full window (count_include_pad=0 next to padding, or any
    window cut short at the end) is corrected by a MUL with the constant k*k/divisor map
    (kept float by the int8 pass, which would multiply the pool's rounding by it)."""
    a = _attrs(node)
    k = [int(v) for v in a["kernel_shape"]]
    s = [int(v) for v in a.get("strides", [1, 1])]
    if len(k) != 2 or any(int(v) != 1 for v in a.get("dilations", [1, 1])):
        raise _fail(node, "only 2-D pooling without dilations")
    if len([o for o in node.output if o]) > 1:
        raise _fail(node, "the Indices output is not supported")
    in_hw = w.shape(node.input[0])[2:]
    pad, pads = _padding(node, in_hw, k, s, [1, 1])
    same = _same_pads(in_hw, k, s)
    if pad == S.Padding.SAME:
        pads = same
    out_hw = w.shape(node.output[0])[2:]
    ceil = bool(a.get("ceil_mode", 0))
    total = list(pads)  # [top, left, bottom, right], the ceil_mode windows' reach added
    for i in range(2):
        span = in_hw[i] + pads[i] + pads[i + 2] - k[i]
        size = -(-span // s[i]) + 1 if ceil else span // s[i] + 1
        if ceil and (size - 1) * s[i] >= in_hw[i] + pads[i]:
            size -= 1  # onnxruntime (and torch) drop a last window that starts in the end pad
        if size != out_hw[i]:
            raise _fail(
                node,
                f"the inferred output size {out_hw[i]} (axis {i + 2}) is not the {size} "
                "onnxruntime computes (a ceil_mode window starting in the end padding)",
            )
        extra = (out_hw[i] - 1) * s[i] + k[i] - (in_hw[i] + pads[i] + pads[i + 2])
        total[i + 2] += max(extra, 0)
    is_max = node.op_type == "MaxPool"
    cip = bool(a.get("count_include_pad", 0))
    # ONNX's divisor per output row / column: the window inside the input (count_include_pad
    # =0) or inside the input and its explicit pads (=1); never what runs past those
    div = []
    for i in range(2):
        lo, hi = (-pads[i], in_hw[i] + pads[i + 2]) if cip else (0, in_hw[i])
        starts = np.arange(out_hw[i]) * s[i] - pads[i]
        div.append(np.minimum(starts + k[i], hi) - np.maximum(starts, lo))
    if min(int(d.min()) for d in div) <= 0:
        raise _fail(node, "a window lies wholly in the padding")
    x = w.get(node.input[0], NHWC)
    if total == same and (is_max or not any(pads) or not cip):
        pad = S.Padding.SAME  # TFLite's SAME pools over the input only, as ONNX does here
        scale = None
    else:
        pad = S.Padding.VALID
        if any(total):
            x = _pad_nhwc(w, x, node.output[0], total, -3.4e38 if is_max else 0.0)
        scale = None if is_max else (k[0] * k[1]) / np.outer(div[0], div[1])
        if scale is not None and np.all(scale == 1.0):
            scale = None
    o = S.Pool2DOptionsT()
    o.padding, o.strideH, o.strideW = pad, s[0], s[1]
    o.filterHeight, o.filterWidth = k
    n = node.output[0]
    if scale is None:
        out = w.produce(n, NHWC)
    else:
        out = w.new_tensor(f"{n}_sum", [w.shape(n)[0], *out_hw, w.shape(n)[1]])
        w.range_src[out] = node.input[0]  # what the int8 kernel keeps: the input's scale
    w.op(_B.MAX_POOL_2D if is_max else _B.AVERAGE_POOL_2D, [x], [out], o)
    if scale is not None:
        c = w.const(f"{n}_divisor", scale.reshape(1, *out_hw, 1).astype(np.float32))
        w.op(_B.MUL, [out, c], [w.produce(n, NHWC)], S.MulOptionsT())
        # in int8 the pool's rounding would be multiplied by the correction (up to k*k):
        # these two stay float
        w.keep_float.update((len(w.ops) - 2, len(w.ops) - 1))


def _same_pads(in_hw: Sequence[int], k: Sequence[int], s: Sequence[int]) -> list[int]:
    """The [top, left, bottom, right] pads TFLite's SAME padding uses."""
    tot = [max((-(-in_hw[i] // s[i]) - 1) * s[i] + k[i] - in_hw[i], 0) for i in range(2)]
    return [tot[0] // 2, tot[1] // 2, tot[0] - tot[0] // 2, tot[1] - tot[1] // 2]


def _global_pool(w: _Writer, node: onnx.NodeProto) -> None:
    rank = len(w.shape(node.input[0]))
    perm = NHWC if rank == 4 else w.layout(node.input[0])
    x = w.get(node.input[0], perm)
    o = S.ReducerOptionsT()
    o.keepDims = True
    code = _B.MEAN if node.op_type == "GlobalAveragePool" else _B.REDUCE_MAX
    spatial = sorted(perm.index(a) for a in range(2, rank))
    axes = w.const(f"{node.output[0]}_axes", np.array(spatial, np.int32))
    w.op(code, [x, axes], [w.produce(node.output[0], perm)], o)


#: the layout a rank-3 (N, C, L) activation of a 1-D conv net is carried in: (N, L, C)
NLC: tuple[int, ...] = (0, 2, 1)


def _as_2d(
    w: _Writer, node: onnx.NodeProto, kernel: Callable[[_Writer, onnx.NodeProto], Any]
) -> None:
    """A 1-D Conv / MaxPool / AveragePool on (N, C, L), run as the 2-D op on (N, C, 1, L): the
    (N, L, C) tensor is RESHAPEd (no data movement) to NHWC (N, 1, L, C) and back."""
    x3, out = node.input[0], node.output[0]
    n, c, length = w.shape(x3)
    key = f"{x3}@2d"
    if key not in w.index:
        src = w.get(x3, NLC)
        w.shapes[key] = [n, c, 1, length]
        t = w.produce(key, NHWC)
        w.range_src[t] = x3
        w.op(_B.RESHAPE, [src, w.const(f"{key}_shape", np.array([n, 1, length, c]))], [t])
    a = _attrs(node)
    attrs: dict[str, Any] = {}
    for k, v in a.items():
        if k in ("kernel_shape", "strides", "dilations"):
            attrs[k] = [1, *v]
        elif k == "pads":
            attrs[k] = [0, v[0], 0, v[1]]
        else:
            attrs[k] = v
    ins = [key, *node.input[1:]]
    if node.op_type == "Conv":
        wkey = f"{node.input[1]}@2d"
        w.consts[wkey] = w.consts[node.input[1]][:, :, None, :]
        ins[1] = wkey
    on, oc, ol = w.shape(out)
    out2 = f"{out}@2d"
    w.shapes[out2] = [on, oc, 1, ol]
    w.consumers[out2] = w.consumers.get(out, [])
    if out in w.outputs:
        w.outputs.add(out2)
    kernel(w, helper.make_node(node.op_type, ins, [out2], name=node.name, **attrs))
    target = w.fused_out.pop(out2, None) or out  # an activation fused into the 2-D op
    y = w.get(out2, NHWC)
    w.range_src[y] = target
    shp = w.shape(target)
    t = w.produce(target, NLC)
    w.op(_B.RESHAPE, [y, w.const(f"{target}_shape", np.array([shp[0], shp[2], shp[1]]))], [t])


def _conv_any(w: _Writer, node: onnx.NodeProto) -> None:
    if len(w.shape(node.input[0])) == 3 and node.input[1] in w.consts:
        _as_2d(w, node, _conv)
    else:
        _conv(w, node)


def _pool_any(w: _Writer, node: onnx.NodeProto) -> None:
    if len(w.shape(node.input[0])) == 3:
        _as_2d(w, node, _pool)
    else:
        _pool(w, node)


def _reduce_mean(w: _Writer, node: onnx.NodeProto) -> None:
    a = _attrs(node)
    rank = len(w.shape(node.input[0]))
    axes = _reduce_axes(w, node, rank)
    if axes is None:
        raise _fail(node, "axes must be constant")
    keep = bool(a.get("keepdims", 1))
    perm = w.layout(node.input[0])
    x = w.get(node.input[0], perm)
    t_axes = np.array(sorted(perm.index(v) for v in axes), np.int32)
    o = S.ReducerOptionsT()
    o.keepDims = keep
    if keep:
        out_perm = perm
    else:  # the remaining axes, in the order they are in the input's layout
        rest = [p for p in perm if p not in axes]
        out_perm = tuple(sorted(rest).index(p) for p in rest)
    out = w.produce(node.output[0], out_perm)
    w.op(_B.MEAN, [x, w.const(f"{node.output[0]}_axes", t_axes)], [out], o)


_BINARY = {
    "Add": (_B.ADD, S.AddOptionsT),
    "Sub": (_B.SUB, S.SubOptionsT),
    "Mul": (_B.MUL, S.MulOptionsT),
    "Div": (_B.DIV, S.DivOptionsT),
    "Max": (_B.MAXIMUM, S.MaximumMinimumOptionsT),
    "Min": (_B.MINIMUM, S.MaximumMinimumOptionsT),
    "Pow": (_B.POW, S.PowOptionsT),
}


def _binary(w: _Writer, node: onnx.NodeProto) -> None:
    code, opts = _BINARY[node.op_type]
    a_name, b_name = node.input[0], node.input[1]
    rank = len(w.shape(node.output[0]))
    # the output takes the layout of a full-rank activation input, preferring NHWC
    perm = _ident(rank)
    for n in (a_name, b_name):
        if n not in w.consts and len(w.shape(n)) == rank and w.layout(n) != perm:
            perm = w.layout(n)
            break
    ins = [w.get_broadcast(n, rank, perm) for n in (a_name, b_name)]
    o = opts()
    if code in (_B.ADD, _B.SUB, _B.MUL, _B.DIV):
        o.fusedActivationFunction = w.fusable_activation(node.output[0])
    w.op(code, ins, [w.produce(node.output[0], perm)], o)


_UNARY = {
    "Relu": _B.RELU,
    "Sigmoid": _B.LOGISTIC,
    "Tanh": _B.TANH,
    "HardSwish": _B.HARD_SWISH,
    "Exp": _B.EXP,
    "Abs": _B.ABS,
    "Neg": _B.NEG,
    "Sqrt": _B.SQRT,
    "Log": _B.LOG,
    "Identity": -1,
}


def _unary(w: _Writer, node: onnx.NodeProto) -> None:
    if node.op_type == "Identity" and node.input[0] in w.consts:
        w.consts[node.output[0]] = w.consts[node.input[0]]
        return
    perm = w.layout(node.input[0])
    x = w.get(node.input[0], perm)
    code = _UNARY[node.op_type]
    if code == -1:
        w.alias(node.output[0], node.input[0])
        return
    w.op(code, [x], [w.produce(node.output[0], perm)])


def _leaky_relu(w: _Writer, node: onnx.NodeProto) -> None:
    perm = w.layout(node.input[0])
    o = S.LeakyReluOptionsT()
    o.alpha = float(_attrs(node).get("alpha", 0.01))
    w.op(_B.LEAKY_RELU, [w.get(node.input[0], perm)], [w.produce(node.output[0], perm)], o)


def _prelu(w: _Writer, node: onnx.NodeProto) -> None:
    rank = len(w.shape(node.input[0]))
    perm = w.layout(node.input[0])
    x = w.get(node.input[0], perm)
    slope = w.get_broadcast(node.input[1], rank, perm)
    w.op(_B.PRELU, [x, slope], [w.produce(node.output[0], perm)])


def _hard_sigmoid(w: _Writer, node: onnx.NodeProto) -> None:
    """HARD_SWISH when this is x * HardSigmoid(x) with alpha 1/6 and beta 0.5 (ONNX's
    HardSwish function, inlined), else MUL, ADD, RELU_0_TO_1."""
    a = _attrs(node)
    perm = w.layout(node.input[0])
    x = w.get(node.input[0], perm)
    users = w.consumers.get(node.output[0], [])
    if (
        abs(float(a.get("alpha", 0.2)) - 1 / 6) < 1e-6
        and float(a.get("beta", 0.5)) == 0.5
        and node.output[0] not in w.outputs
        and len(users) == 1
        and users[0].op_type == "Mul"
        and sorted(users[0].input) == sorted([node.input[0], node.output[0]])
    ):
        out = users[0].output[0]
        w.skip.add(out)
        w.op(_B.HARD_SWISH, [x], [w.produce(out, perm)])
        return
    shp = list(w.tensors[x].shape)
    n = node.output[0]
    t1 = w.new_tensor(f"{n}_mul", shp)
    w.op(
        _B.MUL,
        [x, w.const(f"{n}_alpha", np.array(a.get("alpha", 0.2), np.float32))],
        [t1],
        S.MulOptionsT(),
    )
    t2 = w.new_tensor(f"{n}_add", shp)
    w.op(
        _B.ADD,
        [t1, w.const(f"{n}_beta", np.array(a.get("beta", 0.5), np.float32))],
        [t2],
        S.AddOptionsT(),
    )
    w.op(_B.RELU_0_TO_1, [t2], [w.produce(n, perm)])


def _clip(w: _Writer, node: onnx.NodeProto) -> None:
    bounds = w.clip_bounds(node)
    if bounds is None:
        raise _fail(node, "min/max must be constant")
    lo, hi = bounds
    perm = w.layout(node.input[0])
    x = w.get(node.input[0], perm)
    n = node.output[0]
    if (lo, hi) == (0.0, 6.0):
        w.op(_B.RELU6, [x], [w.produce(n, perm)])
    elif (lo, hi) == (0.0, np.inf):
        w.op(_B.RELU, [x], [w.produce(n, perm)])
    elif (lo, hi) == (-1.0, 1.0):
        w.op(_B.RELU_N1_TO_1, [x], [w.produce(n, perm)])
    elif (lo, hi) == (0.0, 1.0):
        w.op(_B.RELU_0_TO_1, [x], [w.produce(n, perm)])
    else:
        shp = list(w.tensors[x].shape)
        if hi != np.inf:
            t = w.new_tensor(f"{n}_min", shp) if lo != -np.inf else w.produce(n, perm)
            w.op(_B.MINIMUM, [x, w.const(f"{n}_hi", np.array(hi, np.float32))], [t])
            x = t
        if lo != -np.inf or hi == np.inf:
            w.op(
                _B.MAXIMUM, [x, w.const(f"{n}_lo", np.array(lo, np.float32))], [w.produce(n, perm)]
            )


def _softmax(w: _Writer, node: onnx.NodeProto) -> None:
    """SOFTMAX / LOG_SOFTMAX over the last axis of the tensor in a layout that puts the ONNX
    axis last: the one it is in when that does (channels of an NHWC tensor), else NHWC for
    the channels of a 4-D tensor, else its layout with the axis moved last (one TRANSPOSE;
    consumers wanting another layout transpose back)."""
    rank = len(w.shape(node.input[0]))
    axis = int(_attrs(node).get("axis", -1 if w.opset >= 13 else 1)) % rank
    if w.opset < 13 and axis != rank - 1:
        raise _fail(node, f"opset {w.opset} flattens the axes from {axis} on; upgrade to 13")
    perm = w.layout(node.input[0])
    if perm.index(axis) != rank - 1:
        # NHWC for channels, else the axis moved last
        perm = NHWC if rank == 4 and axis == 1 else (*(p for p in perm if p != axis), axis)
    o = S.SoftmaxOptionsT()
    o.beta = 1.0
    op = _B.LOG_SOFTMAX if node.op_type == "LogSoftmax" else _B.SOFTMAX
    w.op(
        op,
        [w.get(node.input[0], perm)],
        [w.produce(node.output[0], perm)],
        None if op == _B.LOG_SOFTMAX else o,
    )


def _concat(w: _Writer, node: onnx.NodeProto) -> None:
    rank = len(w.shape(node.output[0]))
    axis = int(_attrs(node)["axis"]) % rank
    acts = [n for n in node.input if n not in w.consts]
    perm = w.layout(acts[0]) if acts else _ident(rank)
    ins = [w.get(n, perm) for n in node.input]
    o = S.ConcatenationOptionsT()
    o.axis = perm.index(axis)
    w.op(_B.CONCATENATION, ins, [w.produce(node.output[0], perm)], o)


def _reshape_to(w: _Writer, src: str, out: str) -> None:
    shp = w.shape(out)
    x = w.get(src, _ident(len(w.shape(src))))
    o = S.ReshapeOptionsT()
    o.newShape = shp
    y = w.produce(out, _ident(len(shp)))
    w.op(_B.RESHAPE, [x, w.const(f"{out}_shape", np.array(shp, np.int32))], [y], o)


def _flatten_like(w: _Writer, node: onnx.NodeProto) -> None:
    """Flatten / Reshape / Squeeze / Unsqueeze: a RESHAPE to the inferred output shape."""
    src, out = node.input[0], node.output[0]
    in_shp, out_shp = w.shape(src), w.shape(out)
    if src in w.consts:
        w.consts[out] = w.consts[src].reshape(out_shp)
        return
    channels_last = (w.layout(src) == NHWC and len(in_shp) == 4) or (
        w.layout(src) == NLC and len(in_shp) == 3
    )
    if channels_last and len(out_shp) == 2 and out_shp[0] == in_shp[0]:
        c, h, wd = in_shp[1:] if len(in_shp) == 4 else (in_shp[1], 1, in_shp[2])
        users = w.consumers.get(out, [])
        if h * wd == 1 or (
            out not in w.outputs
            and users
            and all(
                u.op_type in ("Gemm", "MatMul")
                and u.input[0] == out
                and u.input[1] in w.consts
                and not _attrs(u).get("transA", 0)
                for u in users
            )
        ):
            if h * wd != 1:
                w.flat_nhwc[out] = (c, h, wd)
            x = w.get(src, w.layout(src))
            o = S.ReshapeOptionsT()
            o.newShape = out_shp
            y = w.produce(out, (0, 1))
            w.op(_B.RESHAPE, [x, w.const(f"{out}_shape", np.array(out_shp, np.int32))], [y], o)
            return
    _reshape_to(w, src, out)


def _transpose(w: _Writer, node: onnx.NodeProto) -> None:
    """A relabelling: out's ONNX axis i is src's axis perm[i], so the tflite tensor holding src
    in layout L holds out in layout inv[L]. Consumers that need another layout transpose."""
    src, out = node.input[0], node.output[0]
    rank = len(w.shape(src))
    p = [int(v) for v in _attrs(node).get("perm", list(range(rank))[::-1])]
    if src in w.consts:
        w.consts[out] = np.transpose(w.consts[src], p)
        return
    have = w.layout(src)
    inv = [p.index(i) for i in range(rank)]
    w.index[out] = {tuple(inv[h] for h in have): w.get(src, have)}
    w.perm[out] = tuple(inv[h] for h in have)


def _gemm(w: _Writer, node: onnx.NodeProto) -> None:
    a = _attrs(node)
    a_name, b_name = node.input[0], node.input[1]
    if b_name not in w.consts or a.get("transA", 0):
        raise _fail(node, "only constant weights (B) without transA")
    wt = w.consts[b_name].astype(np.float32)
    if wt.ndim != 2:
        raise _fail(node, "weights must be 2-D")
    if node.op_type == "MatMul" or not a.get("transB", 0):
        wt = wt.T  # -> [out, in]
    wt = wt * float(a.get("alpha", 1.0))
    n_out, n_in = wt.shape
    if a_name in w.flat_nhwc:
        c, h, wd = w.flat_nhwc[a_name]
        wt = wt.reshape(n_out, c, h, wd).transpose(0, 2, 3, 1).reshape(n_out, n_in)
    bias = np.zeros(n_out, np.float32)
    if len(node.input) > 2 and node.input[2]:
        if node.input[2] not in w.consts:
            raise _fail(node, "bias must be constant")
        cb = w.consts[node.input[2]].astype(np.float32) * float(a.get("beta", 1.0))
        if cb.size not in (1, n_out):
            raise _fail(node, "bias must broadcast along the output features")
        bias = np.broadcast_to(cb.reshape(-1), (n_out,)).astype(np.float32)
    rank = len(w.shape(a_name))
    x = w.get(a_name, _ident(rank))
    o = S.FullyConnectedOptionsT()
    o.keepNumDims = rank > 2
    o.fusedActivationFunction = w.fusable_activation(node.output[0])
    out = w.produce(node.output[0], _ident(rank))
    ins = [
        x,
        w.const(f"{b_name}_fc", np.ascontiguousarray(wt), weight=True),
        w.const(f"{node.output[0]}_bias", bias, weight=True),
    ]
    w.op(_B.FULLY_CONNECTED, ins, [out], o)


def _pad(w: _Writer, node: onnx.NodeProto) -> None:
    a = _attrs(node)
    mode = a.get("mode", b"constant")
    if (mode.decode() if isinstance(mode, bytes) else mode) != "constant":
        raise _fail(node, "only constant padding")
    rank = len(w.shape(node.input[0]))
    if len(node.input) > 1:
        if node.input[1] not in w.consts:
            raise _fail(node, "pads must be constant")
        pads = w.consts[node.input[1]].astype(np.int64).tolist()
    else:
        pads = list(a["pads"])
    if len(node.input) > 3 and node.input[3]:
        raise _fail(node, "pad axes are not supported")
    value = 0.0
    if len(node.input) > 2 and node.input[2]:
        value = float(w.consts[node.input[2]].reshape(()))
    perm = w.layout(node.input[0])
    pairs = np.array([[pads[p], pads[p + rank]] for p in perm], np.int32)
    x = w.get(node.input[0], perm)
    n = node.output[0]
    ins = [x, w.const(f"{n}_pads", pairs)]
    if value != 0.0:
        ins.append(w.const(f"{n}_value", np.array([value], np.float32)))
        w.op(_B.PADV2, ins, [w.produce(n, perm)], S.PadV2OptionsT())
    else:
        w.op(_B.PAD, ins, [w.produce(n, perm)], S.PadOptionsT())


def _resize(w: _Writer, node: onnx.NodeProto) -> None:
    a = _attrs(node)

    def s(key: str, default: str) -> str:
        v = a.get(key, default)
        return v.decode() if isinstance(v, bytes) else str(v)

    mode, ctm = s("mode", "nearest"), s("coordinate_transformation_mode", "half_pixel")
    nearest = s("nearest_mode", "round_prefer_floor")
    in_shp, out_shp = w.shape(node.input[0]), w.shape(node.output[0])
    if len(in_shp) != 4 or in_shp[:2] != out_shp[:2]:
        raise _fail(node, "only spatial resizing of 4-D tensors")
    if ctm == "pytorch_half_pixel" and min(out_shp[2:]) > 1:
        ctm = "half_pixel"
    o: Any
    if mode == "linear" and ctm in ("asymmetric", "half_pixel", "align_corners"):
        o, code = S.ResizeBilinearOptionsT(), _B.RESIZE_BILINEAR
    elif mode == "nearest" and (ctm, nearest) in (
        ("asymmetric", "floor"),
        ("half_pixel", "round_prefer_ceil"),
        ("align_corners", "round_prefer_ceil"),
    ):
        o, code = S.ResizeNearestNeighborOptionsT(), _B.RESIZE_NEAREST_NEIGHBOR
    else:
        raise _fail(
            node, f"mode={mode} coordinate_transformation_mode={ctm} nearest_mode={nearest}"
        )
    o.alignCorners = ctm == "align_corners"
    o.halfPixelCenters = ctm == "half_pixel"
    x = w.get(node.input[0], NHWC)
    size = w.const(f"{node.output[0]}_size", np.array(out_shp[2:], np.int32))
    w.op(code, [x, size], [w.produce(node.output[0], NHWC)], o)


def _conv_transpose(w: _Writer, node: onnx.NodeProto) -> None:
    """TRANSPOSE_CONV (with its bias, version 3) and VALID padding: the full output, then a
    crop for the ONNX pads."""
    a = _attrs(node)
    x_name, w_name, n = node.input[0], node.input[1], node.output[0]
    if w_name not in w.consts or len(w.shape(x_name)) != 4:
        raise _fail(node, "only 2-D transposed convolutions with constant weights")
    if int(a.get("group", 1)) != 1 or any(int(v) != 1 for v in a.get("dilations", [1, 1])):
        raise _fail(node, "only group=1 and no dilations")
    auto = a.get("auto_pad", b"NOTSET")
    if (auto.decode() if isinstance(auto, bytes) else auto) != "NOTSET":
        raise _fail(node, "only explicit pads (auto_pad NOTSET)")
    wt = w.consts[w_name].astype(np.float32)  # [C_in, C_out, kH, kW]
    _, cout, kh, kw = wt.shape
    s = [int(v) for v in a.get("strides", [1, 1])]
    pads = [int(v) for v in a.get("pads", [0, 0, 0, 0])]
    bn, _, ih, iw = w.shape(x_name)
    full = [bn, (ih - 1) * s[0] + kh, (iw - 1) * s[1] + kw, cout]
    out = w.shape(n)
    want = [out[0], out[2], out[3], out[1]]
    if pads[0] + want[1] > full[1] or pads[1] + want[2] > full[2]:
        raise _fail(node, "output_padding beyond the kernel's reach")
    bias = np.zeros(cout, np.float32)
    if len(node.input) > 2 and node.input[2]:
        if node.input[2] not in w.consts:
            raise _fail(node, "bias must be constant")
        bias = w.consts[node.input[2]].astype(np.float32).reshape(cout)
    o = S.TransposeConvOptionsT()
    o.padding, o.strideH, o.strideW = S.Padding.VALID, s[0], s[1]
    if full == want:
        y = w.produce(n, NHWC)
    else:
        y = w.new_tensor(f"{n}_full", full)
        w.range_src[y] = n  # what the crop drops may clip: it is dropped
    ins = [
        w.const(f"{n}_oshape", np.array(full, np.int32)),
        w.const(f"{w_name}_ohwi", wt.transpose(1, 2, 3, 0), weight=True),
        w.get(x_name, NHWC),
        w.const(f"{n}_bias", bias, weight=True),
    ]
    w.op(_B.TRANSPOSE_CONV, ins, [y], o, version=3)
    if full != want:
        begin = [0, pads[0], pads[1], 0]
        ss = [y] + [
            w.const(f"{n}_{k}", np.array(v, np.int32))
            for k, v in (("b", begin), ("e", [b + d for b, d in zip(begin, want)]), ("s", [1] * 4))
        ]
        w.op(_B.STRIDED_SLICE, ss, [w.produce(n, NHWC)], S.StridedSliceOptionsT())


def _const_input(w: _Writer, node: onnx.NodeProto, pos: int) -> list[int] | None:
    if len(node.input) <= pos or not node.input[pos]:
        return None
    if node.input[pos] not in w.consts:
        raise _fail(node, f"input {pos} must be constant")
    return [int(v) for v in w.consts[node.input[pos]].reshape(-1)]


def _slice(w: _Writer, node: onnx.NodeProto) -> None:
    shp = w.shape(node.input[0])
    rank = len(shp)
    starts, ends = _const_input(w, node, 1), _const_input(w, node, 2)
    if starts is None or ends is None:
        raise _fail(node, "starts/ends must be given")
    axes = _const_input(w, node, 3) or list(range(len(starts)))
    steps = _const_input(w, node, 4) or [1] * len(starts)
    perm = w.layout(node.input[0])
    begin, end, stride = [0] * rank, list(shp), [1] * rank
    end_mask = 0
    for st, en, ax, sp in zip(starts, ends, axes, steps):
        ax %= rank
        b, e, k = slice(st, en, sp).indices(shp[ax])
        begin[ax], end[ax], stride[ax] = b, e, k
    tb, te, ts = ([v[p] for p in perm] for v in (begin, end, stride))
    for i in range(rank):
        if te[i] < 0:  # a negative step running past index 0
            end_mask |= 1 << i
            te[i] = 0
    o = S.StridedSliceOptionsT()
    o.endMask = end_mask
    n = node.output[0]
    ins = [w.get(node.input[0], perm)] + [
        w.const(f"{n}_{k}", np.array(v, np.int32)) for k, v in (("b", tb), ("e", te), ("s", ts))
    ]
    w.op(_B.STRIDED_SLICE, ins, [w.produce(n, perm)], o)


def _split(w: _Writer, node: onnx.NodeProto) -> None:
    shp = w.shape(node.input[0])
    axis = int(_attrs(node).get("axis", 0)) % len(shp)
    sizes = _const_input(w, node, 1) or [w.shape(o)[axis] for o in node.output]
    perm = w.layout(node.input[0])
    n = node.output[0]
    o = S.SplitVOptionsT()
    o.numSplits = len(sizes)
    ins = [
        w.get(node.input[0], perm),
        w.const(f"{n}_sizes", np.array(sizes, np.int32)),
        w.const(f"{n}_axis", np.array(perm.index(axis), np.int32)),
    ]
    w.op(_B.SPLIT_V, ins, [w.produce(out, perm) for out in node.output], o)


def _gather(w: _Writer, node: onnx.NodeProto) -> None:
    src, idx_name, n = node.input[0], node.input[1], node.output[0]
    if idx_name not in w.consts:
        raise _fail(node, "indices must be constant")
    rank = len(w.shape(src))
    axis = int(_attrs(node).get("axis", 0)) % rank
    idx = w.consts[idx_name].astype(np.int64)
    idx = np.where(idx < 0, idx + w.shape(src)[axis], idx).astype(np.int32)
    if src in w.consts:
        w.consts[n] = np.take(w.consts[src], idx, axis=axis)
        return
    perm = w.layout(src) if idx.ndim <= 1 else _ident(rank)
    if idx.ndim == 1:
        out_perm = perm
    elif idx.ndim == 0:
        rest = [p for p in perm if p != axis]
        out_perm = tuple(sorted(rest).index(p) for p in rest)
    else:
        out_perm = _ident(len(w.shape(n)))
    o = S.GatherOptionsT()
    o.axis = perm.index(axis)
    ins = [w.get(src, perm), w.const(f"{n}_idx", idx)]
    w.op(_B.GATHER, ins, [w.produce(n, out_perm)], o)


def _constant(w: _Writer, node: onnx.NodeProto) -> None:
    a = _attrs(node)
    if "value" not in a:
        raise _fail(node, "only Constant with a tensor value")
    w.consts[node.output[0]] = numpy_helper.to_array(a["value"])


# -- matrix products -----------------------------------------------------------------------
def _matmul(w: _Writer, node: onnx.NodeProto) -> None:
    """MatMul: FULLY_CONNECTED for 2-D constant weights, else BATCH_MATMUL."""
    a_name, b_name = node.input[0], node.input[1]
    if a_name in w.consts and b_name in w.consts:
        w.consts[node.output[0]] = np.matmul(w.consts[a_name], w.consts[b_name])
    elif b_name in w.consts and w.consts[b_name].ndim == 2:
        _gemm(w, node)
    else:
        _batch_matmul(w, node)


#: the highest rank LiteRT's BATCH_MATMUL takes
_BMM_MAX_RANK = 5


def _matmul_operand(w: _Writer, name: str) -> tuple[int, bool]:
    """``name`` as a BATCH_MATMUL operand: (tflite tensor, adjoint). A tensor held with its
    last two axes swapped (the output of a Transpose of those axes) is used as it is, with
    adj_x / adj_y set, instead of being transposed back."""
    rank = len(w.shape(name))
    ident = _ident(rank)
    swapped = (*ident[:-2], rank - 1, rank - 2)
    if name not in w.consts:
        cache = w.index[name]
        if ident not in cache and swapped in cache:
            return cache[swapped], True
    return w.get(name, ident), False


def _batch_matmul(w: _Writer, node: onnx.NodeProto) -> None:
    """BATCH_MATMUL of two activations (or an activation and a constant of rank > 2): ONNX
    order, numpy broadcasting of the batch dims, as LiteRT's kernel does."""
    a_name, b_name, out = node.input[0], node.input[1], node.output[0]
    ra, rb = len(w.shape(a_name)), len(w.shape(b_name))
    if min(ra, rb) < 2:
        raise _fail(node, "only operands of rank >= 2 (no matrix-vector products)")
    rank = max(ra, rb)
    if rank > _BMM_MAX_RANK:
        raise _fail(node, f"rank {rank}: BATCH_MATMUL takes up to {_BMM_MAX_RANK}")
    x, adj_x = _matmul_operand(w, a_name)
    y, adj_y = _matmul_operand(w, b_name)
    o = S.BatchMatMulOptionsT()
    o.adjX, o.adjY = adj_x, adj_y
    w.op(_B.BATCH_MATMUL, [x, y], [w.produce(out, _ident(rank))], o)


# -- normalization -------------------------------------------------------------------------
def _batch_norm(w: _Writer, node: onnx.NodeProto) -> None:
    """A BatchNormalization no convolution absorbed: y = x * s + t per channel (ONNX axis 1),
    s = scale / sqrt(var + eps), t = bias - mean * s. On an NHWC tensor a 1x1
    DEPTHWISE_CONV_2D with weights s and bias t (one op; int8 gets per-channel weights), else
    MUL + ADD with the constants broadcast in the tensor's layout. A following Relu / Clip(0,
    6) is fused."""
    a = _attrs(node)
    x, out = node.input[0], node.output[0]
    if a.get("training_mode", 0) or any(
        o and (o in w.consumers or o in w.outputs) for o in node.output[1:]
    ):
        raise _fail(node, "only inference mode (no running-statistics outputs)")
    if len(node.input) < 5 or any(n not in w.consts for n in node.input[1:5]):
        raise _fail(node, "scale, bias, mean and variance must be constant")
    scale, bias, mean, var = (w.consts[n].astype(np.float64).reshape(-1) for n in node.input[1:5])
    s = scale / np.sqrt(var + float(a.get("epsilon", 1e-5)))
    t = bias - mean * s
    shp = w.shape(x)
    rank, c = len(shp), shp[1]
    if x in w.consts:
        bshape = [c] + [1] * (rank - 2)
        w.consts[out] = (w.consts[x] * s.reshape(bshape) + t.reshape(bshape)).astype(np.float32)
        return
    perm = w.layout(x)
    act = w.fusable_activation(out)
    if rank == 4 and perm == NHWC:
        o = S.DepthwiseConv2DOptionsT()
        o.padding, o.strideH, o.strideW, o.depthMultiplier = S.Padding.VALID, 1, 1, 1
        o.dilationHFactor = o.dilationWFactor = 1
        o.fusedActivationFunction = act
        ins = [
            w.get(x, NHWC),
            w.const(f"{out}_bn_scale", s.astype(np.float32).reshape(1, 1, 1, c), weight=True),
            w.const(f"{out}_bn_shift", t.astype(np.float32), weight=True),
        ]
        w.op(_B.DEPTHWISE_CONV_2D, ins, [w.produce(out, NHWC)], o)
        return
    bshape = [c] + [1] * (rank - 2)
    w.consts[f"{out}_bn_scale"] = s.astype(np.float32).reshape(bshape)
    w.consts[f"{out}_bn_shift"] = t.astype(np.float32).reshape(bshape)
    xt = w.get(x, perm)
    mul = w.new_tensor(f"{out}_bn_mul", w.tensors[xt].shape)
    sc = w.get_broadcast(f"{out}_bn_scale", rank, perm)
    w.op(_B.MUL, [xt, sc], [mul], S.MulOptionsT())
    o2 = S.AddOptionsT()
    o2.fusedActivationFunction = act
    sh = w.get_broadcast(f"{out}_bn_shift", rank, perm)
    w.op(_B.ADD, [mul, sh], [w.produce(out, perm)], o2)


def _write_layer_norm(
    w: _Writer,
    x: str,
    axes: Sequence[int],
    eps: float,
    gamma: str | None,
    beta: str | None,
    out: str,
) -> None:
    """(x - mean) * rsqrt(mean((x - mean)^2) + eps) * gamma + beta over ``axes``, in x's
    layout: MEAN, SUB, MUL, MEAN, ADD, RSQRT, MUL (then MUL gamma, ADD beta). Only the output
    has a calibrated range, so the int8 pass keeps the arithmetic inside float."""
    rank = len(w.shape(x))
    perm = w.layout(x)
    xt = w.get(x, perm)
    shp = list(w.tensors[xt].shape)
    t_axes = sorted(perm.index(int(v) % rank) for v in axes)
    red = [1 if i in t_axes else d for i, d in enumerate(shp)]
    ax = w.const(f"{out}_ln_axes", np.array(t_axes, np.int32))
    ro = S.ReducerOptionsT()
    ro.keepDims = True

    def step(code: int, ins: list[int], shape: list[int], tag: str, opts: Any = None) -> int:
        t = w.new_tensor(f"{out}_ln_{tag}", shape)
        w.op(code, ins, [t], opts)
        return t

    mean = step(_B.MEAN, [xt, ax], red, "mean", ro)
    d = step(_B.SUB, [xt, mean], shp, "centred", S.SubOptionsT())
    sq = step(_B.MUL, [d, d], shp, "square", S.MulOptionsT())
    var = step(_B.MEAN, [sq, ax], red, "var", ro)
    e = w.const(f"{out}_ln_eps", np.array(eps, np.float32))
    ve = step(_B.ADD, [var, e], red, "var_eps", S.AddOptionsT())
    r = step(_B.RSQRT, [ve], red, "rstd")
    tail: list[tuple[int, int, Any]] = [(_B.MUL, r, S.MulOptionsT())]
    if gamma is not None and not (gamma in w.consts and np.all(w.consts[gamma] == 1)):
        tail.append((_B.MUL, w.get_broadcast(gamma, rank, perm), S.MulOptionsT()))
    if beta is not None and not (beta in w.consts and not np.any(w.consts[beta])):
        tail.append((_B.ADD, w.get_broadcast(beta, rank, perm), S.AddOptionsT()))
    cur = d
    for i, (code, other, opts) in enumerate(tail):
        last = i == len(tail) - 1
        t = w.produce(out, perm) if last else w.new_tensor(f"{out}_ln_{i}", shp)
        w.op(code, [cur, other], [t], opts)
        cur = t


def _layer_norm(w: _Writer, node: onnx.NodeProto) -> None:
    a = _attrs(node)
    x = node.input[0]
    if any(o and (o in w.consumers or o in w.outputs) for o in node.output[1:]):
        raise _fail(node, "only the normalized output (Mean / InvStdDev are not written)")
    rank = len(w.shape(x))
    axis = int(a.get("axis", -1)) % rank
    beta = node.input[2] if len(node.input) > 2 and node.input[2] else None
    eps = float(a.get("epsilon", 1e-5))
    _write_layer_norm(w, x, range(axis, rank), eps, node.input[1], beta, node.output[0])


def _gelu(w: _Writer, node: onnx.NodeProto) -> None:
    approx = _attrs(node).get("approximate", b"none")
    approx = approx.decode() if isinstance(approx, bytes) else str(approx)
    if approx not in ("none", "tanh"):
        raise _fail(node, f"approximate={approx}")
    _write_gelu(w, node.input[0], node.output[0], approximate=approx == "tanh")


def _write_gelu(w: _Writer, x: str, out: str, *, approximate: bool) -> None:
    perm = w.layout(x)
    o = S.GeluOptionsT()
    o.approximate = approximate
    w.op(_B.GELU, [w.get(x, perm)], [w.produce(out, perm)], o)


# -- multi-node patterns -------------------------------------------------------------------
def _scalar(w: _Writer, name: str) -> float | None:
    v = w.consts.get(name)
    return float(v.reshape(())) if v is not None and v.size == 1 else None


def _sole_user(w: _Writer, name: str, op_type: str) -> onnx.NodeProto | None:
    """The one consumer of ``name`` if it is an ``op_type`` and ``name`` is not an output."""
    users = w.consumers.get(name, [])
    if name in w.outputs or len(users) != 1 or users[0].op_type != op_type:
        return None
    return users[0]


def _other_input(node: onnx.NodeProto, name: str) -> str | None:
    """The other input of binary ``node``, one of whose inputs is ``name``."""
    ins = list(node.input)
    if len(ins) != 2 or name not in ins:
        return None
    return ins[1] if ins[0] == name else ins[0]


def _match_gelu(w: _Writer, head: onnx.NodeProto) -> bool:
    """torch's exact GELU, x * 0.5 * (1 + erf(x / sqrt(2))): Div(x, sqrt 2) (or Mul by
    1/sqrt 2) -> Erf -> Add(1) -> Mul(x) -> Mul(0.5), or with the 0.5 multiplied in first."""
    if head.op_type not in ("Div", "Mul") or len(head.input) != 2:
        return False
    x, k = head.input
    kv = _scalar(w, k)
    if head.op_type == "Mul" and kv is None:
        x, k = k, x
        kv = _scalar(w, k)
    want = np.sqrt(2.0) if head.op_type == "Div" else 1 / np.sqrt(2.0)
    if kv is None or x in w.consts or abs(kv - want) > 1e-4 * want:
        return False
    erf = _sole_user(w, head.output[0], "Erf")
    add = _sole_user(w, erf.output[0], "Add") if erf else None
    if erf is None or add is None or _scalar(w, _other_input(add, erf.output[0]) or "") != 1.0:
        return False
    m1 = _sole_user(w, add.output[0], "Mul")
    other = _other_input(m1, add.output[0]) if m1 else None
    m2 = _sole_user(w, m1.output[0], "Mul") if m1 else None
    if m1 is None or m2 is None or other is None:
        return False
    last = _other_input(m2, m1.output[0])
    x_first = other == x and _scalar(w, last or "") == 0.5  # Mul(x, 1 + erf), Mul(0.5)
    half_first = _scalar(w, other) == 0.5 and last == x  # Mul(1 + erf, 0.5), Mul(x)
    if not (x_first or half_first):
        return False
    out = m2.output[0]
    w.fuse([head, erf, add, m1, m2], lambda w: _write_gelu(w, x, out, approximate=False))
    return True


def _reduce_axes(w: _Writer, node: onnx.NodeProto, rank: int) -> list[int] | None:
    """A ReduceMean's axes (attribute, or input from opset 18), sorted; None if not constant."""
    axes = _attrs(node).get("axes")
    if len(node.input) > 1 and node.input[1]:
        if node.input[1] not in w.consts:
            return None
        axes = w.consts[node.input[1]].tolist()
    return sorted(int(v) % rank for v in (axes if axes is not None else range(rank)))


def _match_layer_norm(w: _Writer, head: onnx.NodeProto) -> bool:
    """The LayerNorm torch exports before opset 17: ReduceMean -> Sub -> Pow(2) -> ReduceMean
    -> Add(eps) -> Sqrt -> Div, then Mul(gamma) and Add(beta) when they are constants."""
    if head.op_type != "ReduceMean" or head.input[0] in w.consts:
        return False
    x = head.input[0]
    if x not in w.shapes:
        return False
    rank = len(w.shape(x))
    axes = _reduce_axes(w, head, rank)
    if axes is None or not _attrs(head).get("keepdims", 1):
        return False
    sub = _sole_user(w, head.output[0], "Sub")
    if sub is None or list(sub.input) != [x, head.output[0]]:
        return False
    d = sub.output[0]
    users = w.consumers.get(d, [])
    if d in w.outputs or len(users) != 2:
        return False
    sq = next((u for u in users if u.op_type in ("Pow", "Mul")), None)
    div = next((u for u in users if u.op_type == "Div"), None)
    if sq is None or div is None or div.input[0] != d:
        return False
    if sq.op_type == "Pow" and (sq.input[0] != d or _scalar(w, sq.input[1]) != 2.0):
        return False
    if sq.op_type == "Mul" and list(sq.input) != [d, d]:
        return False
    rm2 = _sole_user(w, sq.output[0], "ReduceMean")
    if rm2 is None or _reduce_axes(w, rm2, rank) != axes or not _attrs(rm2).get("keepdims", 1):
        return False
    add = _sole_user(w, rm2.output[0], "Add")
    eps = _scalar(w, _other_input(add, rm2.output[0]) or "") if add else None
    sqrt = _sole_user(w, add.output[0], "Sqrt") if add else None
    if add is None or eps is None or sqrt is None or list(div.input) != [d, sqrt.output[0]]:
        return False
    nodes = [head, sub, sq, rm2, add, sqrt, div]
    out, gamma, beta = div.output[0], None, None
    mul = _sole_user(w, out, "Mul")
    g = _other_input(mul, out) if mul else None
    if mul is not None and g is not None and g in w.consts:
        nodes.append(mul)
        out, gamma = mul.output[0], g
        badd = _sole_user(w, out, "Add")
        b = _other_input(badd, out) if badd else None
        if badd is not None and b is not None and b in w.consts:
            nodes.append(badd)
            out, beta = badd.output[0], b
    eps_v = float(eps)
    w.fuse(nodes, lambda w: _write_layer_norm(w, x, axes, eps_v, gamma, beta, out))
    return True


#: multi-node patterns, tried on each node in graph order (see _Writer.fuse)
_PATTERNS: tuple[Callable[[_Writer, onnx.NodeProto], bool], ...] = (
    _match_gelu,
    _match_layer_norm,
)


_OPS: dict[str, Callable[[_Writer, onnx.NodeProto], None]] = {
    "Conv": _conv_any,
    "Gemm": _gemm,
    "MatMul": _matmul,
    "BatchNormalization": _batch_norm,
    "LayerNormalization": _layer_norm,
    "Gelu": _gelu,
    **{k: _binary for k in _BINARY},
    **{k: _unary for k in _UNARY},
    "Clip": _clip,
    "LeakyRelu": _leaky_relu,
    "PRelu": _prelu,
    "HardSigmoid": _hard_sigmoid,
    "Softmax": _softmax,
    "LogSoftmax": _softmax,
    "MaxPool": _pool_any,
    "AveragePool": _pool_any,
    "GlobalAveragePool": _global_pool,
    "GlobalMaxPool": _global_pool,
    "ReduceMean": _reduce_mean,
    "Concat": _concat,
    "Flatten": _flatten_like,
    "Reshape": _flatten_like,
    "Squeeze": _flatten_like,
    "Unsqueeze": _flatten_like,
    "Transpose": _transpose,
    "Pad": _pad,
    "Resize": _resize,
    "Constant": _constant,
    "ConvTranspose": _conv_transpose,
    "Slice": _slice,
    "Split": _split,
    "Gather": _gather,
}

#: ONNX op types the writer converts (some attribute combinations are still refused, by name).
SUPPORTED_OPS: frozenset[str] = frozenset(_OPS)


def onnx_to_tflite(
    model: onnx.ModelProto,
    *,
    keep_nchw_input: bool = False,
    fp16_weights: bool = False,
    int8: Int8Config | None = None,
) -> bytes:
    """A canonical (shape-inferred, constant-folded, BN-fused) fp32 ONNX model -> a .tflite
    flatbuffer (fp32). 4-D image inputs/outputs become NHWC (keep_nchw_input=True keeps the
    declared NCHW input and transposes once at the edge). fp16_weights=True stores the weights
    as float16 + DEQUANTIZE (TFLite's float16 scheme; activations and I/O stay float32, a
    constant beyond float16's range stays float32). ``int8`` (calibrated ranges by ONNX tensor
    name) makes a fully integer model (``converters.tflite_int8``). Raises
    edge_agent.errors.UnsupportedModelError listing every unsupported op type and node name
    (e.g. "unsupported operators: Einsum (node /attn/Einsum), ...") before writing anything."""
    if int8 is not None and fp16_weights:
        raise ValueError("int8 and fp16_weights are exclusive")
    with contextlib.suppress(Exception):  # else keep the shapes it already carries
        model = shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    w = _Writer(model, keep_nchw_input, fp16_weights)  # matches the fused patterns
    bad = [
        f"{n.op_type} (node {_node_name(n)})"
        for n in model.graph.node
        if (n.op_type not in _OPS or n.domain not in ("", "ai.onnx"))
        and _node_name(n) not in w.fused_nodes
    ]
    if bad:
        raise UnsupportedModelError(f"unsupported operators: {', '.join(bad)}")
    inputs, outputs = w.build()
    if int8 is not None:
        inputs, outputs, _ = quantize_graph(w, inputs, outputs, int8)
    return w.pack(inputs, outputs)


_OP_NAMES = {v: k for k, v in vars(_B).items() if not k.startswith("_") and isinstance(v, int)}


def count_ops(tflite_bytes: bytes) -> dict[str, int]:
    """Builtin operator name (e.g. "CONV_2D", "DEQUANTIZE") -> how many the model runs."""
    m = S.ModelT.InitFromPackedBuf(tflite_bytes, 0)
    # builtinCode is 0 (ADD) in old files that only set the deprecated int8 code
    codes = [max(oc.builtinCode, oc.deprecatedBuiltinCode) for oc in m.operatorCodes]
    counts: dict[str, int] = {}
    for sg in m.subgraphs:
        for o in sg.operators or []:
            name = _OP_NAMES.get(codes[o.opcodeIndex], f"BUILTIN_{codes[o.opcodeIndex]}")
            counts[name] = counts.get(name, 0) + 1
    return counts


def count_transposes(tflite_bytes: bytes) -> int:
    """How many TRANSPOSE operators the model runs."""
    return count_ops(tflite_bytes).get("TRANSPOSE", 0)
