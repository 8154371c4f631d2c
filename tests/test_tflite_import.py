"""converters.tflite_import: float .tflite in, NCHW ONNX out, checked against LiteRT running the
same .tflite (and numpy, for MediaPipe's custom op that LiteRT cannot run alone)."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import flatbuffers
import numpy as np
import onnx
import pytest
import torch
from ai_edge_litert import schema_py_generated as S
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from converters.canonical import canonicalize
from converters.importers import detect_kind, import_model
from converters.tflite import count_ops, count_transposes, onnx_to_tflite
from converters.tflite_import import LAYOUT_KEY, SUPPORTED_OPS, tflite_to_onnx
from converters.zoo import export_onnx
from edge_agent.errors import ModelError, UnsupportedModelError
from tests.test_tflite_writer import _run_ort, _run_tflite
from tests.tflite_models import fully_connected

Interpreter = pytest.importorskip("ai_edge_litert.interpreter").Interpreter

_B = S.BuiltinOperator
_F32 = S.TensorType.FLOAT32
_RELU6, _RELU, _RELU_N1_TO_1, _TANH = (
    S.ActivationFunctionType.RELU6,
    S.ActivationFunctionType.RELU,
    S.ActivationFunctionType.RELU_N1_TO_1,
    S.ActivationFunctionType.TANH,
)


# -- helpers -------------------------------------------------------------------------------------
def _export(model: nn.Module, shape: tuple[int, ...]) -> onnx.ModelProto:
    return canonicalize(
        onnx.load_model_from_string(export_onnx(model, shape, opset=13, dynamic_batch=False))
    ).model


def _nhwc(x: np.ndarray) -> np.ndarray:
    return x.transpose(0, 2, 3, 1) if x.ndim == 4 else x


def _nchw(x: np.ndarray) -> np.ndarray:
    return x.transpose(0, 3, 1, 2) if x.ndim == 4 else x


def _feeds(model: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        vi.name: rng.standard_normal([d.dim_value for d in vi.type.tensor_type.shape.dim]).astype(
            np.float32
        )
        for vi in model.graph.input
    }


def _compare(data: bytes, imported: onnx.ModelProto, seed: int = 0) -> tuple[float, float]:
    """(max abs error, max error relative to the output's range) of the imported ONNX model in
    onnxruntime against LiteRT running ``data``, on random normal inputs."""
    feeds = _feeds(imported, seed)
    got = _run_ort(imported, feeds)
    want = _run_tflite(data, [_nhwc(x) for x in feeds.values()])
    assert len(got) == len(want)
    abs_err = rel_err = 0.0
    for g, w in zip(got, want):
        w = _nchw(w)
        assert g.shape == w.shape, (g.shape, w.shape)
        err = float(np.abs(g - w).max())
        abs_err = max(abs_err, err)
        rel_err = max(rel_err, err / max(float(np.abs(w).max()), 1e-6))
    return abs_err, rel_err


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(-1).astype(np.float64), b.reshape(-1).astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))


class _Tfl:
    """A .tflite written by hand with the schema's object API (what TensorFlow's converter or
    MediaPipe write, including ops our writer never emits)."""

    def __init__(self) -> None:
        self.tensors: list[Any] = []
        self.buffers: list[Any] = [S.BufferT()]
        self.ops: list[Any] = []
        self.codes: list[Any] = []
        self.code_index: dict[tuple[int, str, int], int] = {}

    def tensor(
        self,
        name: str,
        shape: list[int],
        data: np.ndarray | None = None,
        ttype: int = _F32,
        quant: tuple[np.ndarray, int] | None = None,
    ) -> int:
        t = S.TensorT()
        t.name, t.shape, t.type = name.encode(), list(shape), ttype
        buf = S.BufferT()
        if data is not None:
            buf.data = np.frombuffer(np.ascontiguousarray(data).tobytes(), np.uint8)
        self.buffers.append(buf)
        t.buffer = len(self.buffers) - 1
        if quant is not None:
            qp = S.QuantizationParametersT()
            qp.scale = [float(v) for v in quant[0]]
            qp.zeroPoint = [0] * len(quant[0])
            qp.quantizedDimension = quant[1]
            t.quantization = qp
        self.tensors.append(t)
        return len(self.tensors) - 1

    def const(self, name: str, arr: np.ndarray) -> int:
        types = {np.float32: _F32, np.int32: S.TensorType.INT32}
        return self.tensor(name, list(arr.shape), arr, types[arr.dtype.type])

    def fp16(self, name: str, arr: np.ndarray) -> int:
        """A float16 constant behind DEQUANTIZE (the mobile-SDK float16 scheme)."""
        half = self.tensor(f"{name}_fp16", list(arr.shape), arr.astype(np.float16), 1)
        out = self.tensor(name, list(arr.shape))
        self.op(_B.DEQUANTIZE, [half], [out], version=3)
        return out

    def int8(self, name: str, arr: np.ndarray) -> int:
        """A per-channel int8 constant behind DEQUANTIZE (dynamic-range quantized weights)."""
        scale = np.abs(arr).reshape(arr.shape[0], -1).max(axis=1) / 127
        q = np.round(arr / scale.reshape(-1, *[1] * (arr.ndim - 1))).astype(np.int8)
        packed = self.tensor(f"{name}_int8", list(arr.shape), q, S.TensorType.INT8, (scale, 0))
        out = self.tensor(name, list(arr.shape))
        self.op(_B.DEQUANTIZE, [packed], [out], version=4)
        return out

    def act(self, name: str, shape: list[int]) -> int:
        return self.tensor(name, shape)

    def op(
        self,
        code: int | str,
        inputs: list[int],
        outputs: list[int],
        opts: Any = None,
        *,
        custom: bytes | None = None,
        version: int = 1,
    ) -> None:
        builtin = _B.CUSTOM if isinstance(code, str) else code
        custom_code = code if isinstance(code, str) else ""
        key = (builtin, custom_code, version)
        if key not in self.code_index:
            oc = S.OperatorCodeT()
            oc.builtinCode, oc.deprecatedBuiltinCode, oc.version = (
                builtin,
                min(builtin, 127),
                version,
            )
            if custom_code:
                oc.customCode = custom_code.encode()
            self.code_index[key] = len(self.codes)
            self.codes.append(oc)
        o = S.OperatorT()
        o.opcodeIndex = self.code_index[key]
        o.inputs, o.outputs = inputs, outputs
        if opts is not None:
            o.builtinOptionsType = getattr(S.BuiltinOptions, type(opts).__name__[:-1])
            o.builtinOptions = opts
        if custom is not None:
            o.customOptions = np.frombuffer(custom, np.uint8)
        self.ops.append(o)

    def build(self, inputs: list[int], outputs: list[int]) -> bytes:
        model = S.ModelT()
        model.version, model.description = 3, b"hand-written test model"
        sg = S.SubGraphT()
        sg.name = b"main"
        sg.tensors, sg.operators, sg.inputs, sg.outputs = self.tensors, self.ops, inputs, outputs
        model.subgraphs, model.buffers, model.operatorCodes = [sg], self.buffers, self.codes
        builder = flatbuffers.Builder(1024)
        builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
        return bytes(builder.Output())


def _opts(cls: Any, **fields: Any) -> Any:
    o = cls()
    for k, v in fields.items():
        setattr(o, k, v)
    return o


def _check_declared_shapes(data: bytes) -> None:
    """The hand-written shapes are what LiteRT computes (the importer trusts them, as it can
    with any converter's output)."""
    it = Interpreter(model_content=data)
    it.allocate_tensors()
    tensors = S.ModelT.InitFromPackedBuf(data, 0).subgraphs[0].tensors
    for d in it.get_tensor_details():
        if d["index"] >= len(tensors):
            continue  # the kernels' scratch tensors
        declared = list(tensors[d["index"]].shape)
        assert list(d["shape"]) == declared, (d["name"], list(d["shape"]), declared)


# -- (a) round trips through our own writer (NHWC, fp16 weights behind DEQUANTIZE) --------------
class MobileNetBlock(nn.Module):
    """Stem conv + BN + ReLU6, inverted residual (1x1 HardSwish, depthwise ReLU6, 1x1 project,
    residual add), squeeze-excite, max pool, global average pool, FC, softmax."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.expand = nn.Conv2d(16, 32, 1)
        self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.project = nn.Conv2d(32, 16, 1)
        self.se1, self.se2 = nn.Linear(16, 8), nn.Linear(8, 16)
        self.fc = nn.Linear(16, 10)
        self.bn.running_mean.uniform_(-0.5, 0.5)
        self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.relu6(self.bn(self.stem(x)))
        z = nn.functional.hardswish(self.expand(y))
        z = self.project(nn.functional.relu6(self.dw(z)))
        y = y + z
        g = torch.sigmoid(self.se2(torch.relu(self.se1(y.mean(dim=(2, 3))))))
        y = nn.functional.max_pool2d(y * g[:, :, None, None], 2)
        return torch.softmax(self.fc(y.mean(dim=(2, 3))), dim=1)


class EncoderDecoder(nn.Module):
    """Conv encoder, TRANSPOSE_CONV and RESIZE (bilinear and nearest) decoders, skip
    CONCATENATIONs, LeakyReLU, sigmoid mask."""

    def __init__(self) -> None:
        super().__init__()
        self.e1 = nn.Conv2d(3, 8, 3, padding=1)
        self.e2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(16, 8, 2, stride=2)
        self.e3 = nn.Conv2d(16, 8, 3, padding=1)
        self.out = nn.Conv2d(24, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.e1(x))
        b = torch.relu(self.e2(a))
        c = torch.cat([a, self.up(b)], dim=1)
        c = nn.functional.leaky_relu(self.e3(c), 0.1)
        bil = nn.functional.interpolate(b, scale_factor=2, mode="bilinear", align_corners=False)
        near = nn.functional.interpolate(b, scale_factor=2, mode="nearest")
        return torch.sigmoid(self.out(torch.cat([c, bil + near], dim=1)))


@pytest.mark.parametrize(
    ("net", "shape", "ops"),
    [
        (
            MobileNetBlock,
            (1, 3, 33, 33),
            {"CONV_2D", "DEPTHWISE_CONV_2D", "HARD_SWISH", "MEAN", "FULLY_CONNECTED", "SOFTMAX"},
        ),
        (
            EncoderDecoder,
            (1, 3, 16, 16),
            {"TRANSPOSE_CONV", "RESIZE_BILINEAR", "RESIZE_NEAREST_NEIGHBOR", "CONCATENATION"},
        ),
    ],
)
def test_round_trip_of_our_fp16_tflite_matches_litert(
    net: type[nn.Module], shape: tuple[int, ...], ops: set[str]
) -> None:
    torch.manual_seed(0)
    data = onnx_to_tflite(_export(net(), shape), fp16_weights=True)
    written = count_ops(data)
    assert ops | {"DEQUANTIZE"} <= set(written), written
    imported = tflite_to_onnx(data)
    onnx.checker.check_model(imported)
    # canonical NCHW: inputs and 4-D outputs NCHW, no Transpose inside, fp32 initializers only
    assert [d.dim_value for d in imported.graph.input[0].type.tensor_type.shape.dim] == list(shape)
    assert imported.graph.input[0].name == "input"
    assert "Transpose" not in {n.op_type for n in imported.graph.node}
    assert {i.data_type for i in imported.graph.initializer} <= {
        onnx.TensorProto.FLOAT,
        onnx.TensorProto.INT64,
    }
    assert {p.key: p.value for p in imported.metadata_props}[LAYOUT_KEY] == "NHWC"
    abs_err, rel_err = _compare(data, imported)
    assert rel_err <= 1e-5, (abs_err, rel_err)  # both run the same fp16-rounded weights in fp32
    # written back: NHWC again, with no TRANSPOSE inside, and the same numbers
    back = onnx_to_tflite(canonicalize(imported).model)
    assert count_transposes(back) == 0
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    for a, b in zip(_run_tflite(back, [_nhwc(x)]), _run_tflite(data, [_nhwc(x)])):
        assert a.shape == b.shape
        assert float(np.abs(a - b).max()) <= 1e-5 * max(float(np.abs(b).max()), 1.0)


class Flattens(nn.Module):
    """A flatten into a Linear (our writer flattens NHWC and permutes the weights) and a flatten
    output in NCHW order (the writer's one TRANSPOSE)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 6 * 5, 7)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.relu(self.conv(x))
        return self.fc(y.flatten(1)), (y + 1.0).flatten(1)


def test_flattens_in_nhwc_order_are_read_in_nhwc_order() -> None:
    torch.manual_seed(0)
    data = onnx_to_tflite(_export(Flattens(), (1, 3, 6, 5)), fp16_weights=True)
    assert count_transposes(data) == 1
    imported = tflite_to_onnx(data)
    # the FC's NHWC flatten needs its input in NHWC: one Transpose (the TRANSPOSE the writer
    # made for the NCHW flatten is a relabelling here, no node)
    assert [n.op_type for n in imported.graph.node].count("Transpose") == 1
    _, rel_err = _compare(data, imported, seed=3)
    assert rel_err <= 1e-5
    assert count_transposes(onnx_to_tflite(canonicalize(imported).model)) == 1


# -- (b) a .tflite written by hand, with ops and options our writer never emits ------------------
def _hand_written() -> bytes:
    rng = np.random.default_rng(0)

    def w(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.5).astype(np.float32)

    m = _Tfl()
    x = m.act("image", [1, 9, 10, 3])
    # CONV_2D, SAME, stride 2 on 9x10 (pads top 1 / bottom 1, left 0 / right 1), fused RELU6
    c1 = m.act("conv1", [1, 5, 5, 8])
    conv_o = _opts(S.Conv2DOptionsT, padding=S.Padding.SAME, strideH=2, strideW=2)
    conv_o.fusedActivationFunction = _RELU6
    m.op(_B.CONV_2D, [x, m.fp16("w1", w(8, 3, 3, 3)), m.const("b1", w(8))], [c1], conv_o)
    # DEPTHWISE_CONV_2D, multiplier 2, dilation 2, SAME, fused RELU
    dw = m.act("dw", [1, 5, 5, 16])
    dw_o = _opts(
        S.DepthwiseConv2DOptionsT,
        padding=S.Padding.SAME,
        strideH=1,
        strideW=1,
        depthMultiplier=2,
        dilationHFactor=2,
        dilationWFactor=2,
        fusedActivationFunction=_RELU,
    )
    m.op(_B.DEPTHWISE_CONV_2D, [c1, m.fp16("wd", w(1, 3, 3, 16)), m.const("bd", w(16))], [dw], dw_o)
    # SAME pooling: AVERAGE_POOL_2D does not count the padding
    pool = dict(padding=S.Padding.SAME, strideH=2, strideW=2)
    ap, mp = m.act("avg", [1, 3, 3, 16]), m.act("max", [1, 3, 3, 8])
    m.op(
        _B.AVERAGE_POOL_2D,
        [dw],
        [ap],
        _opts(S.Pool2DOptionsT, filterHeight=3, filterWidth=3, **pool),
    )
    m.op(_B.MAX_POOL_2D, [c1], [mp], _opts(S.Pool2DOptionsT, filterHeight=2, filterWidth=2, **pool))
    cat = m.act("cat", [1, 3, 3, 24])
    m.op(_B.CONCATENATION, [ap, mp], [cat], _opts(S.ConcatenationOptionsT, axis=-1))
    # TRANSPOSE_CONV with SAME padding (TFLite crops the odd pixel at the end) and a bias
    tc = m.act("tconv", [1, 6, 6, 8])
    tc_ins = [m.const("tc_shape", np.array([1, 6, 6, 8], np.int32)), m.fp16("wt", w(8, 3, 3, 24))]
    tc_o = _opts(S.TransposeConvOptionsT, padding=S.Padding.SAME, strideH=2, strideW=2)
    m.op(_B.TRANSPOSE_CONV, [*tc_ins, cat, m.const("bt", w(8))], [tc], tc_o, version=3)
    # RESIZE_BILINEAR with half-pixel centres, 5x5 -> 6x6 (not an integer ratio)
    rb = m.act("bilinear", [1, 6, 6, 8])
    size66 = m.const("size66", np.array([6, 6], np.int32))
    rb_o = _opts(S.ResizeBilinearOptionsT, halfPixelCenters=True)
    m.op(_B.RESIZE_BILINEAR, [c1, size66], [rb], rb_o, version=3)
    s = m.act("sum", [1, 6, 6, 8])
    m.op(_B.ADD, [tc, rb], [s], _opts(S.AddOptionsT, fusedActivationFunction=_RELU))
    hs, pr, ms = (
        m.act("hswish", [1, 6, 6, 8]),
        m.act("prelu", [1, 6, 6, 8]),
        m.act("scaled", [1, 6, 6, 8]),
    )
    m.op(_B.HARD_SWISH, [s], [hs])
    m.op(_B.PRELU, [hs, m.const("alpha", np.abs(w(1, 1, 8)))], [pr])
    m.op(_B.MUL, [pr, m.const("gain", w(8))], [ms], S.MulOptionsT())
    rn = m.act("nearest", [1, 9, 11, 8])
    rn_o = _opts(S.ResizeNearestNeighborOptionsT, halfPixelCenters=True)
    m.op(
        _B.RESIZE_NEAREST_NEIGHBOR,
        [ms, m.const("size911", np.array([9, 11], np.int32))],
        [rn],
        rn_o,
        version=3,
    )
    pd = m.act("padded", [1, 10, 12, 8])
    pads = m.const("pads", np.array([[0, 0], [1, 0], [0, 1], [0, 0]], np.int32))
    m.op(_B.PAD, [rn, pads], [pd], S.PadOptionsT())
    # STRIDED_SLICE: H 1::2 (end_mask), W 0:12:3, C 2:6 -> [1, 5, 4, 4]
    ss = m.act("slice", [1, 5, 4, 4])
    ss_ins = [
        m.const(k, np.array(v, np.int32))
        for k, v in (("ss_b", [0, 1, 0, 2]), ("ss_e", [1, 0, 12, 6]), ("ss_s", [1, 2, 3, 1]))
    ]
    m.op(_B.STRIDED_SLICE, [pd, *ss_ins], [ss], _opts(S.StridedSliceOptionsT, endMask=0b0010))
    probs = m.act("probs", [1, 5, 4, 4])
    m.op(_B.SOFTMAX, [ss], [probs], _opts(S.SoftmaxOptionsT, beta=1.0))
    # RESHAPE to [1, 80] flattens in NHWC order, into an FC with int8 per-channel weights
    flat = m.act("flat", [1, 80])
    m.op(_B.RESHAPE, [ss, m.const("flat_shape", np.array([1, 80], np.int32))], [flat])
    fc, emb = m.act("fc", [1, 10]), m.act("embedding;with a converter's suffix", [1, 10])
    fc_o = _opts(S.FullyConnectedOptionsT, fusedActivationFunction=_RELU_N1_TO_1)
    m.op(_B.FULLY_CONNECTED, [flat, m.int8("wfc", w(10, 80)), m.const("bfc", w(10))], [fc], fc_o)
    m.op(_B.TANH, [fc], [emb])
    # MEAN without keepdims, GATHER along the channels, SUB and DIV with broadcast constants
    mean = m.act("mean", [1, 8])
    m.op(
        _B.MEAN,
        [pr, m.const("hw", np.array([1, 2], np.int32))],
        [mean],
        _opts(S.ReducerOptionsT, keepDims=False),
    )
    g = m.act("gathered", [1, 3])
    m.op(
        _B.GATHER,
        [mean, m.const("idx", np.array([7, 0, 3], np.int32))],
        [g],
        _opts(S.GatherOptionsT, axis=1),
    )
    sub, stats = m.act("centred", [1, 3]), m.act("stats", [1, 3])
    m.op(_B.SUB, [g, m.const("offset", w(3))], [sub], S.SubOptionsT())
    m.op(_B.DIV, [sub, m.const("den", np.abs(w(3)) + 1)], [stats], S.DivOptionsT())
    # STRIDED_SLICE with shrink_axis_mask, SQUEEZE, LEAKY_RELU, LOGISTIC
    row = m.act("row", [1, 4, 4])
    row_ins = [
        m.const(k, np.array(v, np.int32))
        for k, v in (("r_b", [0, 2, 0, 0]), ("r_e", [1, 3, 4, 4]), ("r_s", [1, 1, 1, 1]))
    ]
    m.op(
        _B.STRIDED_SLICE,
        [ss, *row_ins],
        [row],
        _opts(S.StridedSliceOptionsT, shrinkAxisMask=0b0010),
    )
    sq, lr, gate = m.act("squeezed", [4, 4]), m.act("leaky", [4, 4]), m.act("gate", [4, 4])
    m.op(_B.SQUEEZE, [row], [sq], _opts(S.SqueezeOptionsT, squeezeDims=[0]))
    m.op(_B.LEAKY_RELU, [sq], [lr], _opts(S.LeakyReluOptionsT, alpha=0.2))
    m.op(_B.LOGISTIC, [lr], [gate])
    # MEAN with keepdims into an FC (a flatten of [1, 1, 1, C]), RELU
    pooled = m.act("pooled", [1, 1, 1, 16])
    m.op(
        _B.MEAN,
        [dw, m.const("hw2", np.array([1, 2], np.int32))],
        [pooled],
        _opts(S.ReducerOptionsT, keepDims=True),
    )
    head_fc, head = m.act("head_fc", [1, 5]), m.act("head", [1, 5])
    m.op(
        _B.FULLY_CONNECTED,
        [pooled, m.const("wh", w(5, 16)), -1],
        [head_fc],
        S.FullyConnectedOptionsT(),
    )
    m.op(_B.RELU, [head_fc], [head])
    return m.build([x], [probs, emb, stats, gate, head])


def test_hand_written_tflite_matches_litert() -> None:
    data = _hand_written()
    _check_declared_shapes(data)
    imported = tflite_to_onnx(data, label="hand.tflite")
    assert [i.name for i in imported.graph.input] == ["image"]
    assert [o.name for o in imported.graph.output] == [
        "probs",
        "embedding",
        "stats",
        "gate",
        "head",
    ]
    assert [d.dim_value for d in imported.graph.output[0].type.tensor_type.shape.dim] == [
        1,
        4,
        5,
        4,
    ]
    nodes = {n.op_type: n for n in imported.graph.node}
    first_conv = next(n for n in imported.graph.node if n.op_type == "Conv")
    pads = next(a for a in first_conv.attribute if a.name == "pads")
    assert list(pads.ints) == [1, 0, 1, 1]  # SAME: the odd pixel at the end, as TFLite pads
    assert {"Conv", "ConvTranspose", "AveragePool", "Resize", "Slice", "Gather", "Squeeze"} <= set(
        nodes
    )
    for seed in range(3):
        abs_err, rel_err = _compare(data, imported, seed=seed)
        assert abs_err <= 1e-4 and rel_err <= 1e-5, (seed, abs_err, rel_err)
    # the writer reads it back: every op here has a TFLite form
    back = onnx_to_tflite(canonicalize(imported).model)
    x = _feeds(imported, 5)["image"]
    for a, b in zip(_run_tflite(back, [_nhwc(x)]), _run_tflite(data, [_nhwc(x)])):
        assert float(np.abs(a - b).max()) <= 1e-4


def _hand_written_rest() -> bytes:
    """The rest of the operator list: elementwise ops, two inputs with broadcasting between
    activations, splits, transposes, reductions, negative strides, aligned resizes."""
    rng = np.random.default_rng(1)
    m = _Tfl()
    a, b = m.act("a", [1, 6, 5, 4]), m.act("b", [1, 4])
    outs = []

    def unary(code: int, x: int, shape: list[int], opts: Any = None) -> int:
        y = m.act(f"t{len(m.tensors)}", shape)
        m.op(code, [x], [y], opts)
        return y

    def binary(code: int, x: int, y: int, shape: list[int], opts: Any = None) -> int:
        z = m.act(f"t{len(m.tensors)}", shape)
        m.op(code, [x, y], [z], opts)
        return z

    full = [1, 6, 5, 4]
    r6, n1, z1 = (unary(c, a, full) for c in (_B.RELU6, _B.RELU_N1_TO_1, _B.RELU_0_TO_1))
    mx = binary(_B.MAXIMUM, r6, n1, full)
    outs.append(binary(_B.MINIMUM, mx, z1, full))
    ab = unary(_B.ABS, a, full)
    outs.append(unary(_B.EXP, unary(_B.NEG, ab, full), full))
    sq = unary(_B.SQRT, ab, full)
    outs.append(binary(_B.POW, sq, m.const("two", np.array([2.0], np.float32)), full))
    # SPLIT along C and SPLIT_V along H
    c0, c1 = m.act("c0", [1, 6, 5, 2]), m.act("c1", [1, 6, 5, 2])
    m.op(
        _B.SPLIT,
        [m.const("ax3", np.array(3, np.int32)), a],
        [c0, c1],
        _opts(S.SplitOptionsT, numSplits=2),
    )
    h0, h1 = m.act("h0", [1, 2, 5, 4]), m.act("h1", [1, 4, 5, 4])
    sv_ins = [
        a,
        m.const("sizes", np.array([2, -1], np.int32)),
        m.const("ax1", np.array(1, np.int32)),
    ]
    m.op(_B.SPLIT_V, sv_ins, [h0, h1], _opts(S.SplitVOptionsT, numSplits=2))
    outs += [binary(_B.SUB, c0, c1, [1, 6, 5, 2], S.SubOptionsT()), h1]
    # TRANSPOSE to NCHW, flattened (the writer's kind), and one that swaps H and W
    nchw = m.act("nchw", [1, 4, 6, 5])
    m.op(_B.TRANSPOSE, [a, m.const("p0312", np.array([0, 3, 1, 2], np.int32))], [nchw])
    flat = m.act("flat_nchw", [1, 120])
    m.op(_B.RESHAPE, [nchw, m.const("s120", np.array([1, 120], np.int32))], [flat])
    swapped = m.act("swapped", [1, 5, 6, 4])
    m.op(_B.TRANSPOSE, [a, m.const("p0213", np.array([0, 2, 1, 3], np.int32))], [swapped])
    outs += [flat, binary(_B.ADD, swapped, swapped, [1, 5, 6, 4], S.AddOptionsT())]
    # activations of lower rank broadcast against a 4-D one; EXPAND_DIMS
    e1, e2 = m.act("e1", [1, 1, 4]), m.act("e2", [1, 1, 1, 4])
    m.op(_B.EXPAND_DIMS, [b, m.const("one", np.array(1, np.int32))], [e1])
    m.op(_B.EXPAND_DIMS, [e1, m.const("zero", np.array(0, np.int32))], [e2])
    outs.append(binary(_B.MUL, a, e2, full, S.MulOptionsT()))
    outs.append(binary(_B.MUL, a, b, full, S.MulOptionsT()))
    # PADV2 with a value, SUM with keepdims, REDUCE_MAX without, LOG_SOFTMAX, SOFTMAX beta
    padded = m.act("padded", [1, 8, 5, 6])
    pads = m.const("pads", np.array([[0, 0], [2, 0], [0, 0], [1, 1]], np.int32))
    m.op(
        _B.PADV2, [a, pads, m.const("pv", np.array([0.5], np.float32))], [padded], S.PadV2OptionsT()
    )
    outs.append(padded)
    keep = _opts(S.ReducerOptionsT, keepDims=True)
    outs.append(binary(_B.SUM, a, m.const("c", np.array([3], np.int32)), [1, 6, 5, 1], keep))
    drop = _opts(S.ReducerOptionsT, keepDims=False)
    outs.append(binary(_B.REDUCE_MAX, a, m.const("h", np.array([1], np.int32)), [1, 5, 4], drop))
    outs.append(unary(_B.LOG_SOFTMAX, a, full, S.LogSoftmaxOptionsT()))
    outs.append(unary(_B.SOFTMAX, a, full, _opts(S.SoftmaxOptionsT, beta=0.5)))
    # STRIDED_SLICE with a negative stride (H 5, 3, 1) and a begin mask on W
    rev = m.act("reversed", [1, 3, 5, 4])
    ss = [
        m.const(k, np.array(v, np.int32))
        for k, v in (("rb", [0, -1, 3, 0]), ("re", [1, -7, 5, 4]), ("rs", [1, -2, 1, 1]))
    ]
    m.op(_B.STRIDED_SLICE, [a, *ss], [rev], _opts(S.StridedSliceOptionsT, beginMask=0b0100))
    outs.append(rev)
    # aligned-corner and plain resizes
    for code, cls, size, align in (
        (_B.RESIZE_BILINEAR, S.ResizeBilinearOptionsT, [11, 9], True),
        (_B.RESIZE_NEAREST_NEIGHBOR, S.ResizeNearestNeighborOptionsT, [11, 9], True),
        (_B.RESIZE_NEAREST_NEIGHBOR, S.ResizeNearestNeighborOptionsT, [12, 10], False),
        (_B.RESIZE_BILINEAR, S.ResizeBilinearOptionsT, [9, 7], False),
    ):
        outs.append(
            binary(
                code,
                a,
                m.const(f"size{len(outs)}", np.array(size, np.int32)),
                [1, *size, 4],
                _opts(cls, alignCorners=align),
            )
        )
    # a grouped CONV_2D (2 groups of 2 channels)
    gw = m.const("gw", rng.standard_normal((6, 3, 3, 2)).astype(np.float32))
    gconv = m.act("grouped", [1, 6, 5, 6])
    m.op(
        _B.CONV_2D,
        [a, gw, m.const("gb", np.zeros(6, np.float32))],
        [gconv],
        _opts(S.Conv2DOptionsT, padding=S.Padding.SAME, strideH=1, strideW=1),
    )
    outs.append(gconv)
    # GATHER with a scalar index (drops the axis) and with 2-D indices, CONCATENATION on H
    g0 = m.act("g0", [1, 6, 5])
    m.op(
        _B.GATHER, [a, m.const("i0", np.array(2, np.int32))], [g0], _opts(S.GatherOptionsT, axis=3)
    )
    g2 = m.act("g2", [1, 2, 2, 5, 4])
    m.op(
        _B.GATHER,
        [a, m.const("i2", np.array([[5, 0], [1, 1]], np.int32))],
        [g2],
        _opts(S.GatherOptionsT, axis=1),
    )
    cat = m.act("cat_h", [1, 12, 5, 4])
    m.op(
        _B.CONCATENATION,
        [a, r6],
        [cat],
        _opts(S.ConcatenationOptionsT, axis=1),
    )
    outs += [g0, g2, cat]
    return m.build([a, b], outs)


def test_hand_written_tflite_rest_of_the_ops_match_litert() -> None:
    data = _hand_written_rest()
    _check_declared_shapes(data)
    imported = tflite_to_onnx(data)
    assert [i.name for i in imported.graph.input] == ["a", "b"]
    for seed in range(3):
        abs_err, rel_err = _compare(data, imported, seed=seed)
        assert abs_err <= 1e-4 and rel_err <= 1e-5, (seed, abs_err, rel_err)


@settings(max_examples=25, deadline=None)
@given(
    op=st.sampled_from(["conv", "depthwise", "avg", "max", "tconv"]),
    k=st.integers(1, 4),
    stride=st.integers(1, 3),
    dilation=st.integers(1, 2),
    size=st.tuples(st.integers(4, 9), st.integers(4, 9)),
    same=st.booleans(),
    extra=st.integers(0, 2),
)
def test_padding_and_strides_match_litert(
    op: str, k: int, stride: int, dilation: int, size: tuple[int, int], same: bool, extra: int
) -> None:
    """SAME / VALID become the pads TFLite computes, for every window op."""
    rng = np.random.default_rng(k * 100 + stride * 10 + dilation)
    padding = S.Padding.SAME if same else S.Padding.VALID
    if op != "conv" and op != "depthwise":
        dilation = 1
    eff = (k - 1) * dilation + 1
    if not same and eff > min(size) and op != "tconv":
        return  # no VALID output
    out_hw = [-(-n // stride) if same else (n - eff) // stride + 1 for n in size]
    m = _Tfl()
    x = m.act("x", [1, *size, 3])
    if op == "tconv":  # size is the input; the output is one a forward conv maps back to it
        lo = [(n - 1) * stride + 1 if same else (n - 1) * stride + k for n in size]
        out = [n + extra % stride for n in lo]  # SAME: up to n * stride; VALID: past the kernel
        y = m.act("y", [1, *out, 2])
        ins = [m.const("shape", np.array([1, *out, 2], np.int32))]
        ins += [m.const("w", rng.standard_normal((2, k, k, 3)).astype(np.float32)), x]
        ins.append(m.const("b", rng.standard_normal(2).astype(np.float32)))
        o = _opts(S.TransposeConvOptionsT, padding=padding, strideH=stride, strideW=stride)
        m.op(_B.TRANSPOSE_CONV, ins, [y], o, version=3)
    elif op in ("avg", "max"):
        y = m.act("y", [1, *out_hw, 3])
        o = _opts(S.Pool2DOptionsT, padding=padding, strideH=stride, strideW=stride)
        o.filterHeight = o.filterWidth = k
        m.op(_B.AVERAGE_POOL_2D if op == "avg" else _B.MAX_POOL_2D, [x], [y], o)
    else:
        depthwise = op == "depthwise"
        cout = 6 if depthwise else 4
        wshape = (1, k, k, cout) if depthwise else (cout, k, k, 3)
        y = m.act("y", [1, *out_hw, cout])
        cls = S.DepthwiseConv2DOptionsT if depthwise else S.Conv2DOptionsT
        o = _opts(cls, padding=padding, strideH=stride, strideW=stride)
        o.dilationHFactor = o.dilationWFactor = dilation
        o.fusedActivationFunction = _RELU6
        if depthwise:
            o.depthMultiplier = 2
        ins = [x, m.fp16("w", rng.standard_normal(wshape).astype(np.float32))]
        ins.append(m.const("b", rng.standard_normal(cout).astype(np.float32)))
        m.op(_B.DEPTHWISE_CONV_2D if depthwise else _B.CONV_2D, ins, [y], o)
    data = m.build([x], [y])
    _check_declared_shapes(data)
    abs_err, rel_err = _compare(data, tflite_to_onnx(data))
    assert rel_err <= 1e-5, (abs_err, rel_err)


def _tconv_reference(
    x: np.ndarray, w: np.ndarray, b: np.ndarray, stride: int, same: bool
) -> np.ndarray:
    """MediaPipe's Convolution2DTransposeBias in numpy (NHWC input, OHWI weights)."""
    n, ih, iw, _ = x.shape
    o, kh, kw, _ = w.shape
    full = np.zeros((n, (ih - 1) * stride + kh, (iw - 1) * stride + kw, o), np.float64)
    for y in range(ih):
        for xx in range(iw):
            contrib = np.einsum("ni,ohwi->nhwo", x[:, y, xx, :], w)
            full[:, y * stride : y * stride + kh, xx * stride : xx * stride + kw] += contrib
    pad = [max(0, k - (i - 1) % stride - 1) if same else 0 for k, i in ((kh, ih), (kw, iw))]
    out_h, out_w = full.shape[1] - pad[0], full.shape[2] - pad[1]
    top, left = pad[0] // 2, pad[1] // 2
    return (full[:, top : top + out_h, left : left + out_w] + b).astype(np.float32)


@pytest.mark.parametrize(
    ("k", "stride", "same", "size"),
    [(4, 2, True, (5, 7)), (3, 2, True, (4, 5)), (2, 2, True, (6, 6)), (3, 2, False, (5, 4))],
)
def test_mediapipe_convolution2d_transpose_bias(
    k: int, stride: int, same: bool, size: tuple[int, int]
) -> None:
    rng = np.random.default_rng(k + stride)
    x = rng.standard_normal((1, *size, 4)).astype(np.float32)
    w = rng.standard_normal((3, k, k, 4)).astype(np.float32)
    b = rng.standard_normal(3).astype(np.float32)
    want = _tconv_reference(x, w, b, stride, same)
    m = _Tfl()
    xi, yi = m.act("x", list(x.shape)), m.act("y", list(want.shape))
    options = struct.pack("<iii", 1 if same else 2, stride, stride)  # TfLiteTransposeConvParams
    m.op("Convolution2DTransposeBias", [xi, m.fp16("w", w), m.const("b", b)], [yi], custom=options)
    data = m.build([xi], [yi])
    imported = tflite_to_onnx(data)
    assert "Convolution2DTransposeBias" in SUPPORTED_OPS
    w16 = w.astype(np.float16).astype(np.float32)  # the weights are stored in fp16
    want = _tconv_reference(x, w16, b, stride, same)
    (got,) = _run_ort(imported, {"x": _nchw(x)})
    assert got.shape == _nchw(want).shape
    assert float(np.abs(got - _nchw(want)).max()) <= 1e-4
    # written back, it is a builtin TRANSPOSE_CONV that LiteRT runs
    back = onnx_to_tflite(canonicalize(imported).model)
    assert "TRANSPOSE_CONV" in count_ops(back) and count_transposes(back) == 0
    (ran,) = _run_tflite(back, [x])
    assert float(np.abs(ran - want).max()) <= 1e-4


# -- (c) what it refuses ------------------------------------------------------------------------
def test_unsupported_operator_is_named_with_its_index(cli: Any, tmp_path: Path) -> None:
    m = _Tfl()
    x, r, y = m.act("x", [1, 8]), m.act("r", [1, 8]), m.act("y", [1, 8])
    m.op(_B.RELU, [x], [r])
    m.op(_B.CUMSUM, [r, m.const("axis", np.array(1, np.int32))], [y], S.CumsumOptionsT())
    path = tmp_path / "x.tflite"
    path.write_bytes(m.build([x], [y]))
    with pytest.raises(UnsupportedModelError, match=r"operator 1 \(CUMSUM\) is not supported"):
        import_model(path)
    result = cli("inspect", path)
    assert result.code == 2
    line = result.err.strip()
    assert len(line.splitlines()) == 1
    assert f"{path}: operator 1 (CUMSUM) is not supported by the TFLite importer" in line
    assert "supported: " in line and "CONV_2D" in line


@pytest.mark.parametrize(
    ("code", "opts", "needle"),
    [
        (_B.ADD, _opts(S.AddOptionsT, fusedActivationFunction=_TANH), "TANH"),
        (
            _B.CONCATENATION,
            _opts(S.ConcatenationOptionsT, fusedActivationFunction=_RELU6),
            "concat",
        ),
        (_B.STRIDED_SLICE, _opts(S.StridedSliceOptionsT, ellipsisMask=1), "ellipsis_mask"),
    ],
)
def test_options_it_cannot_honour_are_refused(code: int, opts: Any, needle: str) -> None:
    m = _Tfl()
    x, y = m.act("x", [1, 2, 2, 3]), m.act("y", [1, 2, 2, 3])
    ins = [x, x]
    if code == _B.STRIDED_SLICE:
        ins = [x] + [m.const(k, np.array([0, 0, 0, 0], np.int32)) for k in "bes"]
    m.op(code, ins, [y], opts)
    with pytest.raises(UnsupportedModelError, match=rf"^m.tflite: operator 0 \(\w+\): .*{needle}"):
        tflite_to_onnx(m.build([x], [y]), label="m.tflite")


def test_quantized_tflite_is_refused(cli: Any, tmp_path: Path) -> None:
    w = np.eye(4, dtype=np.float32)
    path = tmp_path / "int8.tflite"
    path.write_bytes(fully_connected(w, np.zeros(4, np.float32), int8_io=((0.1, 0), (0.1, 0))))
    result = cli("inspect", path)
    assert result.code == 2
    assert "a quantized TFLite model" in result.err and "INT8" in result.err
    assert len(result.err.strip().splitlines()) == 1


def test_a_float_tflite_is_detected_by_content_and_extension(tmp_path: Path) -> None:
    data = fully_connected(np.eye(3, dtype=np.float32), np.zeros(3, np.float32))
    (tmp_path / "model.tflite").write_bytes(data)
    (tmp_path / "model.bin").write_bytes(data)
    assert detect_kind(tmp_path / "model.tflite") == "tflite"
    assert detect_kind(tmp_path / "model.bin") == "tflite"  # the TFL3 identifier
    imported = import_model(tmp_path / "model.bin")
    assert [i.name for i in imported.graph.input] == ["x"]
    (got,) = _run_ort(imported, {"x": np.array([[1.0, 2.0, 3.0]], np.float32)})
    np.testing.assert_allclose(got, [[1.0, 2.0, 3.0]])
    (tmp_path / "junk.tflite").write_bytes(b"\x00" * 64)
    with pytest.raises(ModelError, match="not a TFLite flatbuffer"):
        import_model(tmp_path / "junk.tflite")


# -- (d) edge-convert quantize model.tflite --format tflite-int8 ---------------------------------
def test_quantize_a_tflite_to_int8_through_the_cli(cli: Any, tmp_path: Path) -> None:
    torch.manual_seed(0)
    shape = (1, 3, 33, 33)
    src = tmp_path / "mobile.tflite"
    src.write_bytes(onnx_to_tflite(_export(MobileNetBlock(), shape), fp16_weights=True))
    rng = np.random.default_rng(0)
    # calibration samples are in the imported ONNX model's layout: NCHW
    samples = rng.standard_normal((60, *shape[1:])).astype(np.float32)
    np.save(tmp_path / "samples.npy", samples)
    out = tmp_path / "mobile-int8.tflite"
    result = cli(
        "quantize", src, "--format", "tflite-int8", "--calibration", tmp_path / "samples.npy",
        "-o", out, "--latency-seconds", "0.2",
    )  # fmt: skip
    assert result.code == 0, result.err
    data = out.read_bytes()
    assert "CONV_2D" in count_ops(data)
    it = Interpreter(model_content=data)
    assert it.get_input_details()[0]["shape"].tolist() == [1, 33, 33, 3]  # NHWC again
    test = rng.standard_normal((10, *shape[1:])).astype(np.float32)
    cosines = []
    for x in test:
        (want,) = _run_tflite(src.read_bytes(), [_nhwc(x[None])])
        (got,) = _run_tflite(data, [_nhwc(x[None])])
        cosines.append(_cosine(want, got))
    assert min(cosines) >= 0.99, cosines
