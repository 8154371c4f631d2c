"""Full-integer quantization of the TFLite writer's float graph (TFLite's int8 scheme).

The float graph is emitted first (:mod:`converters.tflite`); this pass then rewrites it in place:

* **Weights** of CONV_2D, DEPTHWISE_CONV_2D, TRANSPOSE_CONV and FULLY_CONNECTED: int8,
  symmetric (zero point 0, values in [-127, 127]), one scale per output channel. Their biases:
  int32 with scale ``input_scale * weight_scale[c]``.
* **Activations**: int8, asymmetric, one scale and zero point per tensor, from the ONNX
  calibration ranges (:func:`converters.quantize.calibrate`'s cache, the one the int8 ONNX model
  is made from), so both int8 models quantize every activation alike. Tensors the writer adds
  (layout transposes, pads, the steps of a HardSigmoid) get their range from their inputs.
* Ops whose int8 kernels need it keep the input's scale on the output (pooling, reshapes, pads,
  resizes, slices, concatenation; concatenated inputs of another scale are requantized), and
  LOGISTIC, SOFTMAX, TANH and LOG_SOFTMAX get the fixed output scales TFLite's kernels require.
* **Float fallback**: an operator whose ONNX node is in ``float_nodes`` (or that stands for
  it: a fused activation, any node of a fused LayerNorm / GELU pattern), or with no int8 kernel
  here (DIV, POW, EXP, SQRT ...), or whose output has no calibrated range (a LayerNorm's inner
  arithmetic), or that the writer marks (``keep_float``: an AveragePool's divisor correction),
  stays float32 with a DEQUANTIZE before it and a QUANTIZE after it.
* **I/O**: float32 inputs and outputs (a QUANTIZE after each input, a DEQUANTIZE before each
  output), or int8 ones (``int8_io``) with their scale and zero point in the model, which the
  device's runtime quantizes for the caller.

Float tensors no longer used (the weights that were replaced) are dropped from the file.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from ai_edge_litert import schema_py_generated as S

from edge_agent.errors import ConversionError

__all__ = ["Int8Config", "load_ranges", "quantize_graph"]

_B = S.BuiltinOperator
_T = S.TensorType
Range = tuple[float, float]
QParams = tuple[float, int]


@dataclass(frozen=True)
class Int8Config:
    """What ``onnx_to_tflite(..., int8=...)`` needs: ONNX tensor name -> calibrated (min, max),
    the ONNX nodes to keep in float, and whether the model's inputs/outputs are int8."""

    ranges: Mapping[str, Range]
    float_nodes: Sequence[str] = field(default_factory=tuple)
    int8_io: bool = False


def load_ranges(cache_path: Path) -> dict[str, Range]:
    """ONNX tensor name -> (min, max) from :func:`converters.quantize.calibrate`'s JSON cache."""
    from onnxruntime.quantization.calibrate import load_tensors_data

    try:
        data = load_tensors_data(cache_path)
    except (OSError, ValueError) as exc:
        raise ConversionError(f"calibration cache {cache_path}: {exc}") from exc
    out: dict[str, Range] = {}
    for name, td in data.data.items():
        lo, hi = td.range_value
        out[name] = (float(np.min(lo)), float(np.max(hi)))
    return out


#: op code -> int8 op version (TFLite's op_version.cc for int8 inputs)
_INT8_VERSION = {
    _B.CONV_2D: 3,
    _B.DEPTHWISE_CONV_2D: 3,
    _B.FULLY_CONNECTED: 4,
    _B.TRANSPOSE_CONV: 3,
    _B.ADD: 2,
    _B.SUB: 2,
    _B.MUL: 2,
    _B.AVERAGE_POOL_2D: 2,
    _B.MAX_POOL_2D: 2,
    _B.CONCATENATION: 2,
    _B.RESHAPE: 1,
    _B.SOFTMAX: 2,
    _B.LOG_SOFTMAX: 2,
    _B.LOGISTIC: 2,
    _B.TANH: 2,
    _B.RELU: 2,
    _B.RELU6: 2,
    _B.RELU_N1_TO_1: 1,
    _B.RELU_0_TO_1: 1,
    _B.LEAKY_RELU: 2,
    _B.HARD_SWISH: 1,
    _B.PRELU: 1,
    _B.PAD: 2,
    _B.PADV2: 2,
    _B.MEAN: 2,
    _B.REDUCE_MAX: 2,
    _B.RESIZE_BILINEAR: 2,
    _B.RESIZE_NEAREST_NEIGHBOR: 2,
    _B.TRANSPOSE: 2,
    _B.STRIDED_SLICE: 2,
    _B.SPLIT: 2,
    _B.SPLIT_V: 2,
    _B.GATHER: 2,
    _B.MAXIMUM: 2,
    _B.MINIMUM: 2,
    _B.BATCH_MATMUL: 2,
    _B.GELU: 2,
}
#: output keeps the (first) input's scale and zero point: the int8 kernels move bytes only
_SAME_SCALE = {
    _B.AVERAGE_POOL_2D,
    _B.MAX_POOL_2D,
    _B.CONCATENATION,
    _B.RESHAPE,
    _B.PAD,
    _B.PADV2,
    _B.RESIZE_BILINEAR,
    _B.RESIZE_NEAREST_NEIGHBOR,
    _B.TRANSPOSE,
    _B.STRIDED_SLICE,
    _B.SPLIT,
    _B.SPLIT_V,
    _B.GATHER,
    _B.MAXIMUM,
    _B.MINIMUM,
    _B.REDUCE_MAX,
}
#: every input must have the output's scale (constants are quantized with it)
_ALL_SAME = {_B.CONCATENATION, _B.MAXIMUM, _B.MINIMUM, _B.PADV2}
#: fixed output scale and zero point (TFLite's quantization spec)
_FIXED = {
    _B.LOGISTIC: (1 / 256, -128),
    _B.SOFTMAX: (1 / 256, -128),
    _B.TANH: (1 / 128, 0),
    _B.LOG_SOFTMAX: (16 / 256, 127),
}
#: op -> (weights input, per-channel axis of the weights, bias input, activation input)
_WEIGHTED = {
    _B.CONV_2D: (1, 0, 2, 0),
    _B.DEPTHWISE_CONV_2D: (1, 3, 2, 0),
    _B.FULLY_CONNECTED: (1, 0, 2, 0),
    _B.TRANSPOSE_CONV: (1, 0, 3, 2),
}


def activation_qparams(lo: float, hi: float) -> QParams:
    """int8 asymmetric (scale, zero point) for [lo, hi], widened to hold 0 (as onnxruntime's
    compute_scale_zp does for int8 activations)."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    scale = (hi - lo) / 255.0
    if not np.isfinite(scale) or scale <= 0:
        return 1.0, 0
    scale = float(np.float32(scale))
    zp = int(np.clip(round(-128 - lo / scale), -128, 127))
    return scale, zp


def _quantize_values(x: np.ndarray, q: QParams) -> np.ndarray:
    return np.clip(np.round(x / q[0]) + q[1], -128, 127).astype(np.int8)


class _Pass:
    def __init__(self, w: Any, cfg: Int8Config) -> None:
        self.w = w
        self.cfg = cfg
        self.code_of = [max(c.builtinCode, c.deprecatedBuiltinCode) for c in w.codes]
        self.rng: dict[int, Range] = {}
        for idx, name in w.range_src.items():
            if name in cfg.ranges:
                self.rng[idx] = cfg.ranges[name]
        self.q: dict[int, QParams] = {}  # activation tensor -> its int8 params
        self.dq_cache: dict[int, int] = {}  # int8 tensor -> its DEQUANTIZEd float twin
        self.qz_cache: dict[tuple[int, QParams], int] = {}  # tensor, params -> int8 twin
        self.const_cache: dict[tuple[Any, ...], int] = {}
        self.ops: list[Any] = []
        self.float_ops = 0

    # -- tensors ---------------------------------------------------------------------------
    def is_const(self, idx: int) -> bool:
        return self.w.buffers[self.w.tensors[idx].buffer].data is not None

    def data(self, idx: int) -> np.ndarray:
        t = self.w.tensors[idx]
        raw = np.asarray(self.w.buffers[t.buffer].data, np.uint8).tobytes()
        dtype = {_T.FLOAT32: np.float32, _T.INT32: np.int32, _T.INT64: np.int64}[t.type]
        return np.frombuffer(raw, dtype).reshape(t.shape)

    def is_float_act(self, idx: int) -> bool:
        return not self.is_const(idx) and self.w.tensors[idx].type == _T.FLOAT32

    def set_int8(self, idx: int, q: QParams) -> None:
        t = self.w.tensors[idx]
        t.type = _T.INT8
        t.quantization = _qp([q[0]], [q[1]])
        self.q[idx] = q

    def twin(self, idx: int, suffix: str, type_: int) -> int:
        src = self.w.tensors[idx]
        t = S.TensorT()
        t.name = src.name + suffix.encode()
        t.shape = list(src.shape)
        t.type = type_
        self.w.buffers.append(S.BufferT())
        t.buffer = len(self.w.buffers) - 1
        self.w.tensors.append(t)
        return len(self.w.tensors) - 1

    def emit(self, code: int, ins: Sequence[int], outs: Sequence[int], version: int) -> None:
        self.w.op(code, ins, outs, version=version)
        self.ops.append(self.w.ops.pop())

    def as_float(self, idx: int) -> int:
        """``idx`` as a float32 activation (a DEQUANTIZE of an int8 one, cached)."""
        if self.w.tensors[idx].type == _T.FLOAT32:
            return idx
        if idx not in self.dq_cache:
            out = self.twin(idx, "/dequant", _T.FLOAT32)
            self.emit(_B.DEQUANTIZE, [idx], [out], 2)
            self.dq_cache[idx] = out
        return self.dq_cache[idx]

    def as_int8(self, idx: int, q: QParams | None = None) -> int:
        """``idx`` as an int8 activation with params ``q`` (default: its own), QUANTIZEd from
        float or requantized from other int8 params (cached)."""
        t = self.w.tensors[idx]
        if t.type == _T.INT8 and (q is None or self.q[idx] == q):
            return idx
        if q is None:
            q = activation_qparams(*self.rng[idx])
        key = (idx, q)
        if key not in self.qz_cache:
            out = self.twin(idx, "/quant", _T.INT8)
            self.set_int8(out, q)
            self.emit(_B.QUANTIZE, [idx], [out], 1 if t.type == _T.FLOAT32 else 2)
            self.qz_cache[key] = out
        return self.qz_cache[key]

    def const_int8(self, idx: int, q: QParams | None = None) -> int:
        """A float constant as int8, per tensor: with ``q``, or its own range (symmetric for a
        single value, so it is exact)."""
        data = self.data(idx).astype(np.float32)
        if q is None:
            if data.size == 1 or float(data.min()) == float(data.max()):
                m = float(np.abs(data).max())
                q = (m / 127.0, 0) if m > 0 else (1.0, 0)
            else:
                q = activation_qparams(float(data.min()), float(data.max()))
        key = ("c", idx, q)
        if key not in self.const_cache:
            name = self.w.tensors[idx].name.decode()
            new = self.w.new_tensor(f"{name}/int8", data.shape, _quantize_values(data, q))
            self.const_cache[key] = new
            self.q[new] = q
        new = self.const_cache[key]
        self.w.tensors[new].type = _T.INT8
        self.w.tensors[new].quantization = _qp([q[0]], [q[1]])
        return new

    def weights(self, idx: int, axis: int) -> tuple[int, np.ndarray]:
        """Per-channel symmetric int8 weights; (tensor, scales)."""
        key = ("w", idx, axis)
        data = self.data(idx).astype(np.float32)
        moved = np.moveaxis(data, axis, 0).reshape(data.shape[axis], -1)
        absmax = np.abs(moved).max(axis=1)
        scales = np.where(absmax > 0, absmax / 127.0, 1.0).astype(np.float32)
        if key not in self.const_cache:
            shape = [1] * data.ndim
            shape[axis] = -1
            qw = np.clip(np.round(data / scales.reshape(shape)), -127, 127).astype(np.int8)
            name = self.w.tensors[idx].name.decode()
            new = self.w.new_tensor(f"{name}/int8", data.shape, qw)
            t = self.w.tensors[new]
            t.type = _T.INT8
            t.quantization = _qp(scales.tolist(), [0] * len(scales), axis)
            self.const_cache[key] = new
        return self.const_cache[key], scales

    def bias(self, idx: int, scales: np.ndarray, key: tuple[Any, ...]) -> int:
        ck = ("b", idx, key)
        if ck not in self.const_cache:
            data = self.data(idx).astype(np.float64).reshape(-1)
            qb = np.clip(np.round(data / scales), -(2**31), 2**31 - 1).astype(np.int32)
            name = self.w.tensors[idx].name.decode()
            new = self.w.new_tensor(f"{name}/int32", [len(qb)], qb)
            self.w.tensors[new].quantization = _qp(
                scales.astype(np.float32).tolist(), [0] * len(qb)
            )
            self.const_cache[ck] = new
        return self.const_cache[ck]

    # -- ranges ----------------------------------------------------------------------------
    def const_range(self, idx: int) -> Range | None:
        if not self.is_const(idx) or self.w.tensors[idx].type != _T.FLOAT32:
            return None
        d = self.data(idx)
        return (float(d.min()), float(d.max())) if d.size else None

    def propagate(self, code: int, op: Any) -> None:
        """A range for each output the calibration does not cover, from the inputs'."""
        ins = [self.rng.get(i) or self.const_range(i) for i in op.inputs]
        for out in op.outputs:
            if out in self.rng:
                continue
            r: Range | None = None
            acts = [self.rng.get(i) for i in op.inputs if not self.is_const(i)]
            if code in _SAME_SCALE and acts and all(a is not None for a in acts):
                los, his = zip(*[a for a in acts if a is not None])
                r = (min(los), max(his))
            elif code in (_B.ADD, _B.SUB, _B.MUL) and len(ins) == 2 and None not in ins:
                (a0, a1), (b0, b1) = ins[0], ins[1]  # type: ignore[misc]
                if code == _B.ADD:
                    r = (a0 + b0, a1 + b1)
                elif code == _B.SUB:
                    r = (a0 - b1, a1 - b0)
                else:
                    p = [a0 * b0, a0 * b1, a1 * b0, a1 * b1]
                    r = (min(p), max(p))
            elif code in (_B.RELU, _B.RELU6, _B.RELU_0_TO_1, _B.RELU_N1_TO_1) and ins[0]:
                lo, hi = {
                    _B.RELU: (0.0, np.inf),
                    _B.RELU6: (0.0, 6.0),
                    _B.RELU_0_TO_1: (0.0, 1.0),
                    _B.RELU_N1_TO_1: (-1.0, 1.0),
                }[code]
                r = (float(np.clip(ins[0][0], lo, hi)), float(np.clip(ins[0][1], lo, hi)))
            if r is not None:
                self.rng[out] = r

    # -- the pass --------------------------------------------------------------------------
    def int8_ok(self, code: int, op: Any, node: str) -> bool:
        if code not in _INT8_VERSION or self.float_node(node):
            return False
        for i in op.inputs:
            if i < 0:
                continue
            t = self.w.tensors[i]
            if self.is_const(i):
                continue
            if t.type not in (_T.FLOAT32, _T.INT8) or (t.type == _T.FLOAT32 and i not in self.rng):
                return False
        return all(
            o in self.rng or code in _FIXED or code in _SAME_SCALE
            for o in op.outputs
            if self.w.tensors[o].type == _T.FLOAT32
        )

    def float_node(self, node: str) -> bool:
        """``node``, or a node its operators also stand for (a fused activation, the rest of
        a fused pattern), is to be kept float."""
        names = {node, *self.w.absorbed.get(node, ())}
        return any(n in names for n in self.cfg.float_nodes)

    def run(self, inputs: list[int], outputs: list[int]) -> tuple[list[int], list[int]]:
        w = self.w
        old = list(w.ops)
        w.ops = []
        if self.cfg.int8_io:
            for i in inputs:
                if self.is_float_act(i):
                    if i not in self.rng:
                        name = w.tensors[i].name.decode()
                        raise ConversionError(f"input '{name}' has no calibrated range")
                    self.set_int8(i, activation_qparams(*self.rng[i]))
        for i, (op, node) in enumerate(zip(old, w.op_node)):
            code = self.code_of[op.opcodeIndex]
            self.propagate(code, op)
            if i not in w.keep_float and self.int8_ok(code, op, node):
                self.quantize_op(code, op)
                continue
            self.float_ops += 1
            op.inputs = [i if i < 0 or self.is_const(i) else self.as_float(i) for i in op.inputs]
            self.ops.append(op)
        new_outputs = []
        for o in outputs:
            t = w.tensors[o]
            if self.cfg.int8_io and t.type == _T.FLOAT32:
                o = self.as_int8(o)
            elif not self.cfg.int8_io and t.type == _T.INT8:
                name = t.name
                f = self.as_float(o)
                t.name, w.tensors[f].name = name + b"/int8", name
                o = f
            new_outputs.append(o)
        w.ops = self.ops
        return inputs, new_outputs

    def quantize_op(self, code: int, op: Any) -> None:
        ins = list(op.inputs)
        if code in _WEIGHTED:
            wi, axis, bi, xi = _WEIGHTED[code]
            x = self.as_int8(ins[xi])
            qw, scales = self.weights(ins[wi], axis)
            ins[xi], ins[wi] = x, qw
            if len(ins) > bi and ins[bi] >= 0:
                s_in = self.q[x][0]
                ins[bi] = self.bias(ins[bi], scales.astype(np.float64) * s_in, (s_in,))
        elif code in _ALL_SAME:
            acts = [i for i in ins if not self.is_const(i)]
            out_q = self.out_params(code, op, acts)
            ins = [
                self.const_int8(i, out_q)
                if self.const_range(i) is not None
                else (i if self.is_const(i) else self.as_int8(i, out_q))
                for i in ins
            ]
        else:
            ins = [
                (self.const_int8(i) if self.const_range(i) is not None else i)
                if i < 0 or self.is_const(i)
                else self.as_int8(i)
                for i in ins
            ]
        acts = [i for i in ins if i >= 0 and not self.is_const(i)]
        if code not in _ALL_SAME:
            out_q = self.out_params(code, op, acts)
        for o in op.outputs:
            self.set_int8(o, out_q)
        op.inputs = ins
        op.opcodeIndex = self.w.opcode(code, _INT8_VERSION[code])
        self.ops.append(op)

    def out_params(self, code: int, op: Any, acts: Sequence[int]) -> QParams:
        if code in _FIXED:
            return _FIXED[code]
        if code in _ALL_SAME:
            o = op.outputs[0]
            if o in self.rng:
                return activation_qparams(*self.rng[o])
            return activation_qparams(*self.rng[acts[0]])
        if code in _SAME_SCALE:
            first = self.as_int8(acts[0]) if self.w.tensors[acts[0]].type != _T.INT8 else acts[0]
            return self.q[first]
        return activation_qparams(*self.rng[op.outputs[0]])


def _qp(scale: list[float], zp: list[int], axis: int = 0) -> Any:
    q = S.QuantizationParametersT()
    q.scale, q.zeroPoint, q.quantizedDimension = scale, zp, axis
    return q


def _prune(w: Any, inputs: list[int], outputs: list[int]) -> tuple[list[int], list[int]]:
    """Drop tensors (and their buffers) no operator or graph edge uses any more."""
    used = set(inputs) | set(outputs)
    for op in w.ops:
        used.update(i for i in op.inputs if i >= 0)
        used.update(op.outputs)
    keep = sorted(used)
    remap = {old: new for new, old in enumerate(keep)}
    buffers = [w.buffers[0]]
    tensors = []
    for old in keep:
        t = w.tensors[old]
        if t.buffer:
            buffers.append(w.buffers[t.buffer])
            t.buffer = len(buffers) - 1
        tensors.append(t)
    w.tensors, w.buffers = tensors, buffers
    for op in w.ops:
        op.inputs = [remap[i] if i >= 0 else i for i in op.inputs]
        op.outputs = [remap[i] for i in op.outputs]
    return [remap[i] for i in inputs], [remap[i] for i in outputs]


def quantize_graph(
    w: Any, inputs: list[int], outputs: list[int], cfg: Int8Config
) -> tuple[list[int], list[int], int]:
    """Rewrite the writer's float graph as int8; (inputs, outputs, operators left in float)."""
    p = _Pass(w, cfg)
    ins, outs = p.run(inputs, outputs)
    ins, outs = _prune(w, ins, outs)
    return ins, outs, p.float_ops
