"""A float .tflite flatbuffer -> the project's canonical ONNX graph (no TensorFlow).

Read with the flatbuffer schema that ships inside ai-edge-litert (``schema_py_generated``'s
object API). Float models only: fp32, or fp16 (or int8 "dynamic range") weights behind
DEQUANTIZE, which become fp32 initializers. A model with quantized activations is refused.

Layouts. TFLite is NHWC; the ONNX graph is NCHW: its 4-D inputs and outputs are NCHW, and the
weights are transposed here, so a pure CNN has no Transpose node inside. Every TFLite tensor is
carried as one or more ONNX values, each with a ``perm`` such that
``onnx_value == np.transpose(tflite_tensor, perm)``: 4-D activations are made in ``NCHW``
(``(0, 3, 1, 2)``), everything else in TFLite's order. An op that needs its input in another
layout asks for it (:meth:`_Reader.get`) and gets a Transpose node, made once. Axes (MEAN,
SQUEEZE, CONCATENATION, SOFTMAX, STRIDED_SLICE, GATHER, PAD, SPLIT) are mapped through the
perm; a RESHAPE or FULLY_CONNECTED of a 4-D tensor whose NHWC and NCHW byte orders differ (a
flatten of [1, H, W, C]) gets a Transpose to NHWC first, so it flattens in TFLite's order.

The original layout is recorded in the model's metadata (``edge.source_layout`` = ``NHWC``);
``converters.tflite`` writes 4-D inputs and outputs as NHWC again, so an imported CNN written
back to .tflite has no TRANSPOSE inside.

Padding. SAME becomes the explicit ONNX pads TFLite computes (the odd pixel at the end);
AVERAGE_POOL_2D excludes the padding from its count, as TFLite does. TRANSPOSE_CONV and
MediaPipe's ``Convolution2DTransposeBias`` become ConvTranspose with the crop TFLite applies.
Fused activations (RELU, RELU6, RELU_N1_TO_1) become their own node after the op; a fused TANH
or SIGN_BIT is refused (LiteRT's float kernels ignore them, so the model's meaning is unclear).

An operator it cannot read is refused before anything is built, one line naming each such
operator's index and name (:class:`~edge_agent.errors.UnsupportedModelError`, exit code 2).
"""

from __future__ import annotations

import logging
import re
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from ai_edge_litert import schema_py_generated as S
from onnx import helper, numpy_helper

from edge_agent.errors import ModelError, UnsupportedModelError, first_line

__all__ = ["LAYOUT_KEY", "OPSET", "SUPPORTED_OPS", "import_tflite", "tflite_to_onnx"]

log = logging.getLogger(__name__)

#: The opset the imported graph is written at (HardSwish needs 14; ReduceMean's axes are still an
#: attribute at 17).
OPSET = 17
_IR_VERSION = 8  # what opset 17 needs; onnxruntime 1.18+ reads it
#: metadata key recording the layout the .tflite had ("NHWC")
LAYOUT_KEY = "edge.source_layout"
_CUSTOM_TCONV = "Convolution2DTransposeBias"

Perm = tuple[int, ...]
#: the perm of a 4-D activation: ONNX NCHW value = TFLite NHWC tensor transposed by it
NCHW: Perm = (0, 3, 1, 2)
_B = S.BuiltinOperator
_ACT = S.ActivationFunctionType
_T = S.TensorType
_OP_NAMES = {v: k for k, v in vars(_B).items() if not k.startswith("_") and isinstance(v, int)}
_TYPE_NAMES = {v: k for k, v in vars(_T).items() if not k.startswith("_") and isinstance(v, int)}
_NP_TYPES: dict[int, Any] = {
    _T.FLOAT32: np.float32,
    _T.FLOAT16: np.float16,
    _T.FLOAT64: np.float64,
    _T.INT32: np.int32,
    _T.INT64: np.int64,
    _T.INT16: np.int16,
    _T.INT8: np.int8,
    _T.UINT8: np.uint8,
    _T.UINT16: np.uint16,
    _T.UINT32: np.uint32,
    _T.BOOL: np.bool_,
}
#: activation types the ONNX graph carries as they are
_PLAIN_TYPES = (_T.FLOAT32, _T.INT32, _T.INT64, _T.BOOL)
_QUANTIZED_TYPES = (_T.INT8, _T.UINT8, _T.INT16)
_NAME_BAD = re.compile(r"[^A-Za-z0-9_.:/-]+")


def _ident(rank: int) -> Perm:
    return tuple(range(rank))


def _canon(rank: int) -> Perm:
    """The layout an activation of this rank is carried in when nothing asks otherwise."""
    return NCHW if rank == 4 else _ident(rank)


def _same_bytes(shape: Sequence[int], perm: Perm) -> bool:
    """Whether transposing a tensor of ``shape`` by ``perm`` keeps its bytes in order (only unit
    axes move), so a Reshape can read it directly."""
    moved = [a for a in perm if shape[a] != 1]
    return moved == sorted(moved)


def _drop_axes(perm: Perm, dropped: Sequence[int]) -> Perm:
    """The perm of what is left when the TFLite axes ``dropped`` are removed from a value
    carried in ``perm`` (a reduction without keepdims, a squeeze)."""
    gone = set(dropped)
    return tuple(a - sum(d < a for d in gone) for a in perm if a not in gone)


def _same_pads(
    padding: int, in_hw: Sequence[int], k: Sequence[int], s: Sequence[int], d: Sequence[int]
) -> list[int]:
    """ONNX pads [top, left, bottom, right] for TFLite's SAME / VALID (SAME: the odd pixel at
    the end, as TFLite computes it)."""
    if padding == S.Padding.VALID:
        return [0, 0, 0, 0]
    before, after = [], []
    for i in range(2):
        out = -(-in_hw[i] // s[i])
        total = max((out - 1) * s[i] + (k[i] - 1) * d[i] + 1 - in_hw[i], 0)
        before.append(total // 2)
        after.append(total - total // 2)
    return [*before, *after]


def _int_list(values: Any) -> list[int]:
    """An object-API vector (a numpy array, a list or None) as a list of ints."""
    return [] if values is None else [int(v) for v in values]


def _clean(name: str, fallback: str) -> str:
    text = _NAME_BAD.sub("_", name.split(";")[0]).strip("_")
    return text or fallback


@dataclass(frozen=True)
class _Op:
    index: int
    name: str  # builtin name ("CONV_2D") or the custom code
    inputs: tuple[int, ...]  # tensor indices, -1 for an omitted optional input
    outputs: tuple[int, ...]
    options: Any
    custom: bytes


class _Reader:
    def __init__(self, model: Any, raw: bytes, label: str) -> None:
        self.label = label
        if not model.subgraphs:
            raise ModelError(f"{label}: the TFLite model has no subgraph")
        sg = model.subgraphs[0]
        self.sg = sg
        self.tensors: list[Any] = list(sg.tensors or [])
        codes = []
        for oc in model.operatorCodes or []:
            code = max(int(oc.builtinCode), int(oc.deprecatedBuiltinCode))
            if code == _B.CUSTOM:
                custom = oc.customCode
                codes.append(custom.decode() if isinstance(custom, bytes) else str(custom))
            else:
                codes.append(_OP_NAMES.get(code, f"BUILTIN_{code}"))
        self.ops: list[_Op] = []
        for i, o in enumerate(sg.operators or []):
            custom = b""
            if o.customOptions is not None:
                custom = np.asarray(o.customOptions, np.uint8).tobytes()
            self.ops.append(
                _Op(
                    index=i,
                    name=codes[o.opcodeIndex],
                    inputs=tuple(_int_list(o.inputs)),
                    outputs=tuple(_int_list(o.outputs)),
                    options=o.builtinOptions,
                    custom=custom,
                )
            )
        self.consts: dict[int, np.ndarray] = {}
        self.sparse: set[int] = set()
        buffers = model.buffers or []
        for i, t in enumerate(self.tensors):
            if t.sparsity is not None:
                self.sparse.add(i)
                continue
            try:
                arr = self._read_buffer(t, buffers, raw)
            except ValueError as exc:  # a buffer that does not fit its shape
                raise ModelError(
                    f"{label}: tensor {i} ('{self.tname(i)}'): its data does not match its shape "
                    f"{self.shape_of(t)}: {first_line(exc)}"
                ) from exc
            if arr is not None:
                self.consts[i] = arr
        self.values: dict[int, dict[Perm, str]] = {}  # tensor -> {perm: onnx value name}
        self.const_names: dict[tuple[int, Perm], str] = {}
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.names: set[str] = set()
        self.scalars: dict[float, str] = {}
        self.op: _Op | None = None  # the operator being converted
        # graph inputs and outputs keep their (sanitised) TFLite names: reserve them first
        self.io_names: dict[int, str] = {}
        self.inputs, self.outputs = _int_list(sg.inputs), _int_list(sg.outputs)
        for t in [*self.inputs, *self.outputs]:
            if t not in self.io_names:
                self.io_names[t] = self.unique(self.base(t))

    # -- tensors -----------------------------------------------------------------------------
    def _read_buffer(self, t: Any, buffers: list[Any], raw: bytes) -> np.ndarray | None:
        if t.buffer <= 0 or t.buffer >= len(buffers):
            return None
        buf = buffers[t.buffer]
        if buf.offset and buf.offset > 1:
            data = raw[int(buf.offset) : int(buf.offset) + int(buf.size)]
        elif buf.data is not None and len(buf.data):
            data = np.asarray(buf.data, np.uint8).tobytes()
        else:
            return None
        if t.type not in _NP_TYPES:
            return None  # refused where it is used
        arr = np.frombuffer(data, _NP_TYPES[t.type]).reshape(self.shape_of(t)).copy()
        q = t.quantization
        if t.type in _QUANTIZED_TYPES and q is not None and q.scale is not None and len(q.scale):
            # an int8 weight of a "dynamic range" model: dequantize it here
            scale = np.asarray(q.scale, np.float32)
            zero = np.asarray(q.zeroPoint if q.zeroPoint is not None else [0], np.float32)
            if scale.size > 1 and arr.ndim:
                bshape = [1] * arr.ndim
                bshape[int(q.quantizedDimension)] = scale.size
                scale, zero = scale.reshape(bshape), zero.reshape(bshape)
            arr = ((arr.astype(np.float32) - zero) * scale).astype(np.float32)
        return arr

    @staticmethod
    def shape_of(t: Any) -> list[int]:
        return _int_list(t.shape)

    def shape(self, t: int) -> list[int]:
        if t in self.consts:
            return list(self.consts[t].shape)
        return self.shape_of(self.tensors[t])

    def rank(self, t: int) -> int:
        return len(self.shape(t))

    def tname(self, t: int) -> str:
        raw = self.tensors[t].name
        return raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw or "")

    def base(self, t: int) -> str:
        return _clean(self.tname(t), f"t{t}")

    def unique(self, base: str) -> str:
        name, n = base, 0
        while name in self.names:
            n += 1
            name = f"{base}_{n}"
        self.names.add(name)
        return name

    def dtype(self, t: int) -> int:
        return int(self.tensors[t].type)

    # -- errors ------------------------------------------------------------------------------
    def fail(self, why: str) -> UnsupportedModelError:
        op = self.op
        where = f"operator {op.index} ({op.name})" if op is not None else "the model"
        return UnsupportedModelError(f"{self.label}: {where}: {why}")

    def need_const(self, t: int, what: str) -> np.ndarray:
        if t < 0 or t not in self.consts:
            raise self.fail(f"{what} must be a constant")
        return self.consts[t]

    # -- ONNX values ---------------------------------------------------------------------------
    def init(self, base: str, arr: np.ndarray) -> str:
        name = self.unique(base)
        self.inits.append(numpy_helper.from_array(np.array(arr, order="C"), name))
        return name

    def ints(self, base: str, values: Sequence[int]) -> str:
        return self.init(base, np.array([int(v) for v in values], np.int64))

    def scalar(self, value: float) -> str:
        """A float32 scalar initializer, one per value."""
        if value not in self.scalars:
            self.scalars[value] = self.init(f"const_{value:g}", np.array(value, np.float32))
        return self.scalars[value]

    def node(
        self, op_type: str, inputs: Sequence[str], outputs: Sequence[str], **attrs: Any
    ) -> None:
        op = self.op
        prefix = f"{op.name.lower()}_{op.index}" if op is not None else "graph"
        name = self.unique(f"{prefix}/{op_type}")
        self.nodes.append(
            helper.make_node(op_type, list(inputs), list(outputs), name=name, **attrs)
        )

    def produce(self, t: int, perm: Perm) -> str:
        """A new ONNX value holding tensor ``t`` transposed by ``perm``."""
        if perm == _canon(self.rank(t)) and t in self.io_names and t not in self.values:
            name = self.io_names[t]
        elif perm == _canon(self.rank(t)):
            name = self.unique(self.base(t))
        else:
            name = self.unique(f"{self.base(t)}_{'nhwc' if perm == _ident(4) else 'p'}")
        self.values.setdefault(t, {})[perm] = name
        return name

    def layout(self, t: int) -> Perm:
        if t in self.consts:
            return _canon(self.rank(t)) if t not in self.values else next(iter(self.values[t]))
        if t not in self.values:
            raise self.fail(f"tensor {t} ('{self.tname(t)}') is read before it is made")
        return next(iter(self.values[t]))

    def get(self, t: int, perm: Perm | None = None) -> str:
        """Tensor ``t`` as an ONNX value in layout ``perm`` (default: however it was made; a
        constant in its canonical layout). A Transpose is made once, when first asked for."""
        if t < 0:
            raise self.fail("a required input is missing")
        if t in self.consts and t not in self.values:
            arr = self.consts[t]
            perm = perm if perm is not None else _canon(arr.ndim)
            key = (t, perm)
            if key not in self.const_names:
                self.const_names[key] = self.init(self.base(t), np.transpose(arr, perm))
            return self.const_names[key]
        have = self.layout(t)
        perm = perm if perm is not None else have
        cache = self.values[t]
        if perm not in cache:
            rel = [have.index(p) for p in perm]
            out = self.unique(f"{self.base(t)}_{'nhwc' if perm == _ident(4) else 'p'}")
            self.node("Transpose", [cache[have]], [out], perm=rel)
            cache[perm] = out
        return cache[perm]

    def flat(self, t: int) -> str:
        """A value of ``t`` whose bytes are in TFLite's order (what a Reshape reads)."""
        shp = self.shape(t)
        if t in self.consts and t not in self.values:
            return self.get(t, _ident(len(shp)))
        for perm, name in self.values[t].items():
            if _same_bytes(shp, perm):
                return name
        return self.get(t, _ident(len(shp)))

    def broadcast(self, t: int, rank: int, perm: Perm) -> str:
        """``t`` broadcast (TFLite's numpy rules) against a rank-``rank`` tensor carried in
        ``perm``: lower ranks get leading unit axes, then the same transposition."""
        k = self.rank(t)
        if k == rank:
            return self.get(t, perm)
        if t in self.consts and t not in self.values:
            arr = self.consts[t]
            if arr.size == 1:
                return self.init(self.base(t), arr.reshape(()))
            full = arr.reshape([1] * (rank - k) + list(arr.shape))
            return self.init(self.base(t), np.transpose(full, perm))
        full_shape = [1] * (rank - k) + self.shape(t)
        x = self.unique(f"{self.base(t)}_r{rank}")
        self.node("Reshape", [self.flat(t), self.ints(f"{x}_shape", full_shape)], [x])
        if perm == _ident(rank):
            return x
        y = self.unique(f"{x}_p")
        self.node("Transpose", [x], [y], perm=list(perm))
        return y

    def pick_layout(self, tensors: Sequence[int], rank: int) -> Perm:
        """The layout for an elementwise op's output: the canonical one if a full-rank
        activation input has it, else the first full-rank activation input's."""
        acts = [t for t in tensors if t >= 0 and t in self.values and self.rank(t) == rank]
        canon = _canon(rank)
        if not acts or any(canon in self.values[t] for t in acts):
            return canon
        return self.layout(acts[0])

    def emit(
        self, op_type: str, inputs: Sequence[str], out: str, act: int = _ACT.NONE, **attrs: Any
    ) -> None:
        """``op_type`` writing ``out``, followed by its fused activation."""
        if act == _ACT.NONE:
            self.node(op_type, inputs, [out], **attrs)
            return
        pre = self.unique(f"{out}_pre")
        self.node(op_type, inputs, [pre], **attrs)
        self.activation(act, pre, out)

    def activation(self, act: int, x: str, y: str) -> None:
        if act == _ACT.RELU:
            self.node("Relu", [x], [y])
        elif act == _ACT.RELU6:
            self.node("Clip", [x, self.scalar(0.0), self.scalar(6.0)], [y])
        elif act == _ACT.RELU_N1_TO_1:
            self.node("Clip", [x, self.scalar(-1.0), self.scalar(1.0)], [y])
        else:
            # TANH and SIGN_BIT: LiteRT's float kernels clamp only for the RELUs and ignore
            # these, so what the model computes is ambiguous
            name = {_ACT.TANH: "TANH", _ACT.SIGN_BIT: "SIGN_BIT"}.get(act, str(act))
            raise self.fail(f"fused activation {name} is not supported (LiteRT ignores it)")

    def fold(self, t: int, arr: np.ndarray) -> None:
        """Record ``t`` as a constant computed at import time."""
        self.consts[t] = np.array(arr, order="C")  # (ascontiguousarray makes 0-d 1-d)

    def all_const(self, op: _Op) -> bool:
        return all(t < 0 or (t in self.consts and t not in self.values) for t in op.inputs)


def _act(op: _Op) -> int:
    return int(getattr(op.options, "fusedActivationFunction", _ACT.NONE) or _ACT.NONE)


def _opts(op: _Op, cls: Any) -> Any:
    return op.options if op.options is not None else cls()


def _opt(op: _Op, pos: int) -> int:
    return op.inputs[pos] if len(op.inputs) > pos else -1


# -- convolutions ---------------------------------------------------------------------------
def _conv_2d(r: _Reader, op: _Op) -> None:
    o = _opts(op, S.Conv2DOptionsT)
    x, w = op.inputs[0], op.inputs[1]
    if r.rank(x) != 4 or r.rank(w) != 4:
        raise r.fail("only 2-D convolutions of 4-D tensors")
    _, h, wd, cin = r.shape(x)
    _, kh, kw, cin_g = r.shape(w)
    if cin_g <= 0 or cin % cin_g:
        raise r.fail(f"filter has {cin_g} input channels, the input {cin}")
    _emit_conv(r, op, o, w_perm=NCHW, hw=(h, wd), k=(kh, kw), group=cin // cin_g)  # OHWI -> OIHW


def _emit_conv(
    r: _Reader,
    op: _Op,
    o: Any,
    *,
    w_perm: tuple[int, ...],
    hw: tuple[int, int],
    k: tuple[int, int],
    group: int,
) -> None:
    """An ONNX Conv from a TFLite convolution's options (strides, dilations, padding), its
    weights permuted by ``w_perm`` to OIHW, and its optional bias."""
    x, w, b = op.inputs[0], op.inputs[1], _opt(op, 2)
    s, d = [o.strideH, o.strideW], [o.dilationHFactor, o.dilationWFactor]
    ins = [r.get(x, NCHW), r.get(w, w_perm)]
    if b >= 0:
        ins.append(r.get(b, (0,)))
    r.emit(
        "Conv",
        ins,
        r.produce(op.outputs[0], NCHW),
        _act(op),
        kernel_shape=list(k),
        strides=s,
        dilations=d,
        pads=_same_pads(o.padding, list(hw), list(k), s, d),
        group=group,
    )


def _depthwise(r: _Reader, op: _Op) -> None:
    o = _opts(op, S.DepthwiseConv2DOptionsT)
    x, w = op.inputs[0], op.inputs[1]
    if r.rank(x) != 4 or r.rank(w) != 4:
        raise r.fail("only 2-D convolutions of 4-D tensors")
    _, h, wd, cin = r.shape(x)
    _, kh, kw, cout = r.shape(w)
    if cout % cin:
        raise r.fail(f"{cout} output channels is not a multiple of {cin} input channels")
    # [1, H, W, C*M] -> [C*M, 1, H, W]
    _emit_conv(r, op, o, w_perm=(3, 0, 1, 2), hw=(h, wd), k=(kh, kw), group=cin)


def _conv_transpose(
    r: _Reader,
    op: _Op,
    *,
    x: int,
    w: int,
    b: int,
    out_hw: Sequence[int],
    begin: Sequence[int],
    strides: Sequence[int],
    act: int,
) -> None:
    """ConvTranspose of the full (VALID) output, cropped from ``begin`` to ``out_hw``: what
    TFLite's transpose convolutions compute."""
    if r.rank(x) != 4 or r.rank(w) != 4:
        raise r.fail("only 2-D transposed convolutions of 4-D tensors")
    _, ih, iw, cin = r.shape(x)
    _, kh, kw, w_in = r.shape(w)
    if w_in != cin:
        raise r.fail(f"filter has {w_in} input channels, the input {cin}")
    pads_end, out_pad = [], []
    for i, (n_in, k) in enumerate(((ih, kh), (iw, kw))):
        end = (n_in - 1) * strides[i] + k - begin[i] - out_hw[i]
        if end < 0 and -end >= strides[i]:
            raise r.fail(f"output size {out_hw[i]} is beyond what the kernel reaches")
        pads_end.append(max(end, 0))
        out_pad.append(max(-end, 0))
    ins = [r.get(x, NCHW), r.get(w, (3, 0, 1, 2))]  # OHWI -> [I, O, H, W]
    if b >= 0:
        ins.append(r.get(b, (0,)))
    attrs: dict[str, Any] = {
        "kernel_shape": [kh, kw],
        "strides": list(strides),
        "pads": [*begin, *pads_end],
    }
    if any(out_pad):
        attrs["output_padding"] = out_pad
    r.emit("ConvTranspose", ins, r.produce(op.outputs[0], NCHW), act, **attrs)


def _transpose_conv(r: _Reader, op: _Op) -> None:
    o = _opts(op, S.TransposeConvOptionsT)
    out_shape = [int(v) for v in r.need_const(op.inputs[0], "the output shape").reshape(-1)]
    w, x, b = op.inputs[1], op.inputs[2], _opt(op, 3)
    _, kh, kw, _ = r.shape(w)
    s = [o.strideH, o.strideW]
    out_hw = out_shape[1:3]
    # TFLite pads as the forward convolution from the output back to the input would
    begin = [0, 0]
    if o.padding == S.Padding.SAME:
        begin = _same_pads(o.padding, out_hw, [kh, kw], s, [1, 1])[:2]
    _conv_transpose(r, op, x=x, w=w, b=b, out_hw=out_hw, begin=begin, strides=s, act=_act(op))


def _custom_tconv(r: _Reader, op: _Op) -> None:
    """MediaPipe's ``Convolution2DTransposeBias``: inputs (input, weights OHWI, bias); its
    custom options are a TfLiteTransposeConvParams (int32 padding 1 SAME / 2 VALID,
    stride_width, stride_height)."""
    if len(op.inputs) != 3 or len(op.custom) < 12:
        raise r.fail("expected 3 inputs and 12 bytes of options (padding, strides)")
    padding, sw, sh = struct.unpack("<iii", op.custom[:12])
    if padding not in (1, 2) or sw <= 0 or sh <= 0:
        raise r.fail(f"options padding={padding} stride={sw}x{sh} are not valid")
    x, w, b = op.inputs
    _, ih, iw, _ = r.shape(x)
    _, kh, kw, _ = r.shape(w)
    s = [sh, sw]
    begin, out_hw = [0, 0], []
    for i, (n_in, k) in enumerate(((ih, kh), (iw, kw))):
        total = max(0, k - (n_in - 1) % s[i] - 1) if padding == 1 else 0
        begin[i] = total // 2
        out_hw.append(s[i] * (n_in - 1) + k - total)
    declared = r.shape(op.outputs[0])
    if len(declared) == 4 and declared[1:3] != out_hw:
        raise r.fail(f"output shape {declared} does not match the computed {out_hw}")
    _conv_transpose(r, op, x=x, w=w, b=b, out_hw=out_hw, begin=begin, strides=s, act=_ACT.NONE)


def _fully_connected(r: _Reader, op: _Op) -> None:
    o = _opts(op, S.FullyConnectedOptionsT)
    if o.weightsFormat != S.FullyConnectedOptionsWeightsFormat.DEFAULT:
        raise r.fail("only the default weights format")
    x, w, b = op.inputs[0], op.inputs[1], _opt(op, 2)
    n_out, n_in = r.shape(w)
    xs = r.shape(x)
    rows = int(np.prod(xs)) // n_in
    if len(xs) == 2 and xs[1] == n_in:
        a = r.get(x, (0, 1))
    else:
        a = r.unique(f"{r.base(x)}_2d")
        r.node("Reshape", [r.flat(x), r.ints(f"{a}_shape", [rows, n_in])], [a])
    ins = [a, r.get(w, (0, 1))]
    if b >= 0:
        ins.append(r.get(b, (0,)))
    out = op.outputs[0]
    out_shape = r.shape(out)
    if out_shape == [rows, n_out]:
        r.emit("Gemm", ins, r.produce(out, (0, 1)), _act(op), transB=1)
        return
    y = r.unique(f"{r.base(out)}_2d")
    r.emit("Gemm", ins, y, _act(op), transB=1)
    target = r.produce(out, _ident(len(out_shape)))
    r.node("Reshape", [y, r.ints(f"{target}_shape", out_shape)], [target])


def _pool(r: _Reader, op: _Op) -> None:
    o = _opts(op, S.Pool2DOptionsT)
    x = op.inputs[0]
    if r.rank(x) != 4:
        raise r.fail("only 2-D pooling of 4-D tensors")
    _, h, wd, _ = r.shape(x)
    k, s = [o.filterHeight, o.filterWidth], [o.strideH, o.strideW]
    attrs: dict[str, Any] = {
        "kernel_shape": k,
        "strides": s,
        "pads": _same_pads(o.padding, [h, wd], k, s, [1, 1]),
    }
    if op.name == "AVERAGE_POOL_2D":
        attrs["count_include_pad"] = 0  # TFLite averages over the window's real pixels
    onnx_op = "MaxPool" if op.name == "MAX_POOL_2D" else "AveragePool"
    r.emit(onnx_op, [r.get(x, NCHW)], r.produce(op.outputs[0], NCHW), _act(op), **attrs)


# -- elementwise ------------------------------------------------------------------------------
_BINARY = {
    "ADD": "Add",
    "SUB": "Sub",
    "MUL": "Mul",
    "DIV": "Div",
    "MAXIMUM": "Max",
    "MINIMUM": "Min",
    "POW": "Pow",
}


def _binary(r: _Reader, op: _Op) -> None:
    out = op.outputs[0]
    rank = r.rank(out)
    perm = r.pick_layout(op.inputs[:2], rank)
    ins = [r.broadcast(t, rank, perm) for t in op.inputs[:2]]
    r.emit(_BINARY[op.name], ins, r.produce(out, perm), _act(op))


_UNARY = {
    "RELU": "Relu",
    "LOGISTIC": "Sigmoid",
    "TANH": "Tanh",
    "HARD_SWISH": "HardSwish",
    "EXP": "Exp",
    "ABS": "Abs",
    "NEG": "Neg",
    "SQRT": "Sqrt",
}
_CLIPS = {"RELU6": (0.0, 6.0), "RELU_N1_TO_1": (-1.0, 1.0), "RELU_0_TO_1": (0.0, 1.0)}


def _unary(r: _Reader, op: _Op) -> None:
    x, out = op.inputs[0], op.outputs[0]
    perm = r.layout(x)
    src = r.get(x, perm)
    y = r.produce(out, perm)
    if op.name in _CLIPS:
        lo, hi = _CLIPS[op.name]
        r.node("Clip", [src, r.scalar(lo), r.scalar(hi)], [y])
    elif op.name == "LEAKY_RELU":
        r.node("LeakyRelu", [src], [y], alpha=float(_opts(op, S.LeakyReluOptionsT).alpha))
    else:
        r.node(_UNARY[op.name], [src], [y])


def _prelu(r: _Reader, op: _Op) -> None:
    x, alpha, out = op.inputs[0], op.inputs[1], op.outputs[0]
    rank = r.rank(x)
    perm = r.layout(x)
    ins = [r.get(x, perm), r.broadcast(alpha, rank, perm)]
    r.node("PRelu", ins, [r.produce(out, perm)])


def _softmax(r: _Reader, op: _Op) -> None:
    x, out = op.inputs[0], op.outputs[0]
    rank = r.rank(x)
    perm = r.layout(x)
    src = r.get(x, perm)
    # no options: beta 1 (the schema's default of 0 is what no converter means)
    beta = 1.0 if op.options is None or op.name != "SOFTMAX" else float(op.options.beta)
    if beta != 1.0:
        scaled = r.unique(f"{src}_beta")
        r.node("Mul", [src, r.scalar(beta)], [scaled])
        src = scaled
    onnx_op = "Softmax" if op.name == "SOFTMAX" else "LogSoftmax"
    r.node(onnx_op, [src], [r.produce(out, perm)], axis=perm.index(rank - 1))


# -- reductions and shapes ----------------------------------------------------------------------
_REDUCE = {"MEAN": "ReduceMean", "SUM": "ReduceSum", "REDUCE_MAX": "ReduceMax"}


def _reduce(r: _Reader, op: _Op) -> None:
    x, out = op.inputs[0], op.outputs[0]
    rank = r.rank(x)
    axes = sorted({int(a) % rank for a in r.need_const(op.inputs[1], "the axes").reshape(-1)})
    keep = bool(_opts(op, S.ReducerOptionsT).keepDims)
    perm = r.layout(x)
    src = r.get(x, perm)
    if not axes:  # TensorFlow reduces nothing; ONNX would reduce everything
        r.node("Identity", [src], [r.produce(out, perm)])
        return
    onnx_axes = sorted(perm.index(a) for a in axes)
    out_perm = perm if keep else _drop_axes(perm, axes)
    y = r.produce(out, out_perm)
    if op.name == "SUM":
        r.node("ReduceSum", [src, r.ints(f"{y}_axes", onnx_axes)], [y], keepdims=int(keep))
    else:
        r.node(_REDUCE[op.name], [src], [y], axes=onnx_axes, keepdims=int(keep))


def _reshape(r: _Reader, op: _Op) -> None:
    """RESHAPE / EXPAND_DIMS: TFLite's order; the output is made in the canonical layout when
    that needs no data movement."""
    x, out = op.inputs[0], op.outputs[0]
    shp, size = r.shape(out), int(np.prod(r.shape(x)))
    if int(np.prod(shp)) != size and op.name == "RESHAPE":  # no static output shape
        given = r.consts.get(_opt(op, 1))
        if given is None and op.options is not None and op.options.newShape is not None:
            given = np.asarray(op.options.newShape)
        if given is not None:
            shp = [int(v) for v in given.reshape(-1)]
            if shp.count(-1) == 1:
                known = int(np.prod([d for d in shp if d != -1]))
                shp[shp.index(-1)] = size // max(known, 1)
    if int(np.prod(shp)) != size:
        raise r.fail(f"output shape {shp} does not hold the input's {r.shape(x)}")
    if x in r.consts and x not in r.values:
        r.fold(out, r.consts[x].reshape(shp))
        return
    src = r.flat(x)
    perm = _canon(len(shp))
    if not _same_bytes(shp, perm):
        perm = _ident(len(shp))
    y = r.produce(out, perm)
    r.node("Reshape", [src, r.ints(f"{y}_shape", [shp[p] for p in perm])], [y])


def _squeeze(r: _Reader, op: _Op) -> None:
    x, out = op.inputs[0], op.outputs[0]
    shp = r.shape(x)
    dims = _opts(op, S.SqueezeOptionsT).squeezeDims
    axes = sorted({int(d) % len(shp) for d in dims} if dims is not None and len(dims) else set())
    if not axes:
        axes = [i for i, d in enumerate(shp) if d == 1]
    if any(shp[a] != 1 for a in axes):
        raise r.fail(f"squeezes axes {axes} of shape {shp} that are not 1")
    perm = r.layout(x)
    y = r.produce(out, _drop_axes(perm, axes))
    onnx_axes = sorted(perm.index(a) for a in axes)
    r.node("Squeeze", [r.get(x, perm), r.ints(f"{y}_axes", onnx_axes)], [y])


def _transpose(r: _Reader, op: _Op) -> None:
    """A relabelling: no node. The value carrying x in perm p carries out in perm p'."""
    x, out = op.inputs[0], op.outputs[0]
    p_tfl = [int(v) for v in r.need_const(op.inputs[1], "the permutation").reshape(-1)]
    if x in r.consts and x not in r.values:
        r.fold(out, np.transpose(r.consts[x], p_tfl))
        return
    r.get(x)  # x is made
    r.values[out] = {
        tuple(p_tfl.index(a) for a in perm): name for perm, name in r.values[x].items()
    }


def _concat(r: _Reader, op: _Op) -> None:
    out = op.outputs[0]
    rank = r.rank(out)
    o = _opts(op, S.ConcatenationOptionsT)
    if _act(op) != _ACT.NONE:  # LiteRT's kernel refuses it, XNNPACK ignores it
        raise r.fail("a fused activation on a concatenation is not supported (LiteRT refuses it)")
    axis = int(o.axis) % rank
    perm = r.pick_layout(op.inputs, rank)
    ins = [r.get(t, perm) for t in op.inputs]
    r.node("Concat", ins, [r.produce(out, perm)], axis=perm.index(axis))


def _pad(r: _Reader, op: _Op) -> None:
    x, out = op.inputs[0], op.outputs[0]
    rank = r.rank(x)
    pads = r.need_const(op.inputs[1], "the paddings").astype(np.int64).reshape(rank, 2)
    perm = r.layout(x)
    y = r.produce(out, perm)
    ins = [
        r.get(x, perm),
        r.ints(f"{y}_pads", [pads[p][0] for p in perm] + [pads[p][1] for p in perm]),
    ]
    if op.name == "PADV2" and _opt(op, 2) >= 0:
        value = r.need_const(op.inputs[2], "the padding value").reshape(-1)[0]
        ins.append(r.init(f"{y}_value", np.array(value, r.consts[op.inputs[2]].dtype)))
    r.node("Pad", ins, [y], mode="constant")


def _resize(r: _Reader, op: _Op) -> None:
    x, out = op.inputs[0], op.outputs[0]
    if r.rank(x) != 4:
        raise r.fail("only 4-D images")
    size = [int(v) for v in r.need_const(op.inputs[1], "the size").reshape(-1)]
    bilinear = op.name == "RESIZE_BILINEAR"
    o = _opts(op, S.ResizeBilinearOptionsT if bilinear else S.ResizeNearestNeighborOptionsT)
    if o.alignCorners and o.halfPixelCenters:
        raise r.fail("align_corners and half_pixel_centers together")
    if o.alignCorners:
        ctm = "align_corners"
    elif o.halfPixelCenters:
        ctm = "half_pixel"
    else:
        ctm = "asymmetric"
    n, _, _, c = r.shape(x)
    attrs: dict[str, Any] = {"coordinate_transformation_mode": ctm}
    if bilinear:
        attrs["mode"] = "linear"
    else:
        # TFLite: floor((y + 0.5) * in / out) with half-pixel centres, round(y * scale) with
        # aligned corners, floor(y * in / out) otherwise
        attrs["mode"] = "nearest"
        attrs["nearest_mode"] = "floor" if ctm == "asymmetric" else "round_prefer_ceil"
    y = r.produce(out, NCHW)
    sizes = r.ints(f"{y}_sizes", [n, c, *size])
    r.node("Resize", [r.get(x, NCHW), "", "", sizes], [y], **attrs)


def _strided_slice(r: _Reader, op: _Op) -> None:
    o = _opts(op, S.StridedSliceOptionsT)
    if o.ellipsisMask or o.newAxisMask:
        raise r.fail("ellipsis_mask and new_axis_mask are not supported")
    x, out = op.inputs[0], op.outputs[0]
    shp = r.shape(x)
    begin = [int(v) for v in r.need_const(op.inputs[1], "begin").reshape(-1)]
    end = [int(v) for v in r.need_const(op.inputs[2], "end").reshape(-1)]
    strides = [int(v) for v in r.need_const(op.inputs[3], "strides").reshape(-1)]
    starts, stops, steps, axes, shrunk = [], [], [], [], []
    for i in range(len(begin)):
        b, e, s = begin[i], end[i], strides[i]
        if s == 0:
            raise r.fail("a stride of 0")
        if o.offset:
            e = b + e
        lo: int | None = b
        hi: int | None = e
        if o.shrinkAxisMask >> i & 1:
            lo = b + shp[i] if b < 0 else b
            hi, s = lo + 1, 1
            shrunk.append(i)
        else:
            lo = None if o.beginMask >> i & 1 else b
            hi = None if o.endMask >> i & 1 else e
        start, stop, step = slice(lo, hi, s).indices(shp[i])
        if (start, stop, step) == (0, shp[i], 1):
            continue
        if step < 0 and stop < 0:
            stop = -(2**62)  # past index 0 (ONNX clamps it to -1)
        starts.append(start)
        stops.append(stop)
        steps.append(step)
        axes.append(i)
    perm = r.layout(x)
    src = r.get(x, perm)
    if axes:
        sliced = r.produce(out, perm) if not shrunk else r.unique(f"{r.base(out)}_slice")
        r.node(
            "Slice",
            [
                src,
                r.ints(f"{sliced}_starts", starts),
                r.ints(f"{sliced}_ends", stops),
                r.ints(f"{sliced}_axes", [perm.index(a) for a in axes]),
                r.ints(f"{sliced}_steps", steps),
            ],
            [sliced],
        )
        src = sliced
    if shrunk:
        y = r.produce(out, _drop_axes(perm, shrunk))
        onnx_axes = sorted(perm.index(a) for a in shrunk)
        r.node("Squeeze", [src, r.ints(f"{y}_axes", onnx_axes)], [y])
    elif not axes:
        r.node("Identity", [src], [r.produce(out, perm)])


def _gather(r: _Reader, op: _Op) -> None:
    o = _opts(op, S.GatherOptionsT)
    if o.batchDims:
        raise r.fail("batch_dims is not supported")
    params, idx, out = op.inputs[0], op.inputs[1], op.outputs[0]
    rank = r.rank(params)
    axis = int(o.axis) % rank
    if r.all_const(op):
        r.fold(out, np.take(r.consts[params], r.consts[idx].astype(np.int64), axis=axis))
        return
    q = r.rank(idx)
    perm = r.layout(params) if params in r.values else _ident(rank)
    ax = perm.index(axis)
    out_perm: list[int] = []
    for j, a in enumerate(perm):
        if j == ax:
            out_perm.extend(axis + k for k in range(q))
        else:
            out_perm.append(a if a < axis else a + q - 1)
    ins = [r.get(params, perm), r.get(idx, _ident(q))]
    r.node("Gather", ins, [r.produce(out, tuple(out_perm))], axis=ax)


def _split(r: _Reader, op: _Op) -> None:
    if op.name == "SPLIT":
        axis_t, x = op.inputs[0], op.inputs[1]
    else:
        x, axis_t = op.inputs[0], op.inputs[2]
    rank = r.rank(x)
    axis = int(r.need_const(axis_t, "the axis").reshape(-1)[0]) % rank
    sizes = [r.shape(t)[axis] for t in op.outputs]
    perm = r.layout(x)
    outs = [r.produce(t, perm) for t in op.outputs]
    split = r.ints(f"{outs[0]}_split", sizes)
    r.node("Split", [r.get(x, perm), split], outs, axis=perm.index(axis))


def _dequantize(r: _Reader, op: _Op) -> None:
    x = op.inputs[0]
    if x not in r.consts or x in r.values:
        raise r.fail(f"dequantizes an activation ({_TYPE_NAMES.get(r.dtype(x), '?')})")
    r.fold(op.outputs[0], r.consts[x].astype(np.float32))


_OPS: dict[str, Callable[[_Reader, _Op], None]] = {
    "CONV_2D": _conv_2d,
    "DEPTHWISE_CONV_2D": _depthwise,
    "TRANSPOSE_CONV": _transpose_conv,
    _CUSTOM_TCONV: _custom_tconv,
    "FULLY_CONNECTED": _fully_connected,
    "MAX_POOL_2D": _pool,
    "AVERAGE_POOL_2D": _pool,
    **{k: _binary for k in _BINARY},
    **{k: _unary for k in (*_UNARY, *_CLIPS, "LEAKY_RELU")},
    "PRELU": _prelu,
    "SOFTMAX": _softmax,
    "LOG_SOFTMAX": _softmax,
    **{k: _reduce for k in _REDUCE},
    "RESHAPE": _reshape,
    "EXPAND_DIMS": _reshape,
    "SQUEEZE": _squeeze,
    "TRANSPOSE": _transpose,
    "CONCATENATION": _concat,
    "PAD": _pad,
    "PADV2": _pad,
    "RESIZE_BILINEAR": _resize,
    "RESIZE_NEAREST_NEIGHBOR": _resize,
    "STRIDED_SLICE": _strided_slice,
    "GATHER": _gather,
    "SPLIT": _split,
    "SPLIT_V": _split,
    "DEQUANTIZE": _dequantize,
}

#: TFLite operators the importer reads (builtin names; the custom op by its custom code).
SUPPORTED_OPS: tuple[str, ...] = tuple(sorted(_OPS))


# -- driver ---------------------------------------------------------------------------------------
def _check(r: _Reader) -> None:
    """Refuse, before building anything, quantized models, operators we cannot read and
    tensors we cannot carry (in that order: a quantized model has QUANTIZE operators too)."""
    made = {t for op in r.ops for t in op.outputs}
    uses = [(t, "input") for t in r.inputs] + [
        (t, f"operator {op.index} ({op.name})")
        for op in r.ops
        for t in (*op.inputs, *op.outputs)
        if t >= 0
    ]
    for t, where in uses:
        if t not in r.consts and r.dtype(t) in _QUANTIZED_TYPES:
            raise UnsupportedModelError(
                f"{r.label}: a quantized TFLite model ({where}: tensor '{r.tname(t)}' is "
                f"{_TYPE_NAMES[r.dtype(t)]}); the importer reads float models (fp32, or fp16 "
                "weights behind DEQUANTIZE): import the float original and quantize it here"
            )
    bad = [f"{op.index} ({op.name})" for op in r.ops if op.name not in _OPS]
    if bad:
        which = "operator" if len(bad) == 1 else "operators"
        verb = "is" if len(bad) == 1 else "are"
        raise UnsupportedModelError(
            f"{r.label}: {which} {', '.join(bad)} {verb} not supported by the TFLite importer "
            f"(supported: {', '.join(SUPPORTED_OPS)})"
        )
    for op in r.ops:
        where = f"operator {op.index} ({op.name})"
        for t in op.inputs:
            if t in r.sparse:
                raise UnsupportedModelError(
                    f"{r.label}: {where}: sparse constant '{r.tname(t)}' is not supported"
                )
            if t >= 0 and t not in r.consts and t not in made and t not in r.inputs:
                raise UnsupportedModelError(
                    f"{r.label}: {where} reads tensor '{r.tname(t)}', which is neither a "
                    "constant, an input nor made by an operator (a variable?)"
                )
    for t, where in uses:
        if t not in r.consts and r.dtype(t) not in _PLAIN_TYPES:
            raise UnsupportedModelError(
                f"{r.label}: {where}: tensor '{r.tname(t)}' is "
                f"{_TYPE_NAMES.get(r.dtype(t), r.dtype(t))}; the importer reads float32 "
                "activations (and int32/int64/bool index tensors)"
            )


def _value_info(r: _Reader, name: str, t: int, perm: Perm) -> onnx.ValueInfoProto:
    shp = r.shape(t)
    dtype = np.dtype(_NP_TYPES[r.dtype(t)])
    vi = helper.make_tensor_value_info(
        name, helper.np_dtype_to_tensor_dtype(dtype), [shp[p] for p in perm]
    )
    if len(shp) == 4:
        vi.doc_string = f"NCHW; NHWC {shp} in the .tflite"
    return vi


def tflite_to_onnx(data: bytes, *, label: str = "model.tflite") -> onnx.ModelProto:
    """A float .tflite flatbuffer as a checked ONNX model (opset :data:`OPSET`), NCHW.

    Raises :class:`~edge_agent.errors.ModelError` if ``data`` is not a TFLite flatbuffer and
    :class:`~edge_agent.errors.UnsupportedModelError` naming the operator (index and name) it
    cannot read, or if the model is quantized."""
    if len(data) < 8 or data[4:8] != b"TFL3":
        raise ModelError(f"{label}: not a TFLite flatbuffer (no TFL3 identifier)")
    try:
        model = S.ModelT.InitFromPackedBuf(data, 0)
    except Exception as exc:
        raise ModelError(f"{label}: cannot parse the TFLite flatbuffer: {first_line(exc)}") from exc
    r = _Reader(model, data, label)
    if len(model.subgraphs) > 1:
        log.debug("%s: %d subgraphs; importing the first", label, len(model.subgraphs))
    _check(r)
    inputs = []
    for t in r.inputs:
        if t in r.consts:
            continue
        perm = _canon(r.rank(t))
        inputs.append(_value_info(r, r.produce(t, perm), t, perm))
    for op in r.ops:
        r.op = op
        _OPS[op.name](r, op)
    r.op = None
    outputs = []
    for t in r.outputs:
        perm = _canon(r.rank(t))
        name = r.io_names[t]
        value = r.get(t, perm)
        if value != name:  # made in another layout, or an alias: io_names kept the name free
            r.node("Identity", [value], [name])
        outputs.append(_value_info(r, name, t, perm))
    graph = helper.make_graph(
        r.nodes,
        _clean(r.sg.name.decode() if isinstance(r.sg.name, bytes) else "", "main"),
        inputs,
        outputs,
        initializer=r.inits,
    )
    out = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="edge converters.tflite_import",
    )
    out.ir_version = _IR_VERSION
    helper.set_model_props(out, {LAYOUT_KEY: "NHWC", "edge.source_format": "tflite"})
    try:
        onnx.checker.check_model(out)
    except onnx.checker.ValidationError as exc:
        raise ModelError(f"{label}: the imported ONNX graph is invalid: {first_line(exc)}") from exc
    return out


def import_tflite(path: Path) -> onnx.ModelProto:
    """Read the .tflite file at ``path`` (see :func:`tflite_to_onnx`)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ModelError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    return tflite_to_onnx(data, label=str(path))
