"""converters.tflite on what real OCR / detector models hold: MatMul of two activations
(BATCH_MATMUL), a BatchNormalization no convolution absorbs, ceil_mode pooling, LayerNorm (the
op and the pattern torch exports before opset 17), GELU (the op and torch's erf pattern) and
Softmax over any axis. Each against onnxruntime in float32 (max relative error <= 1e-4), and in
int8 against the float model (converters.tflite_int8), from torch-exported models with
meaningful weights where the op comes from torch."""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper

from converters.tflite import count_ops, count_transposes, onnx_to_tflite
from edge_agent.errors import UnsupportedModelError
from tests.test_tflite_int8 import Int8Case, _cos, _out_scale
from tests.test_tflite_writer import TOL, _compare, _model, _run_ort, _run_tflite, _w

torch = pytest.importorskip("torch")
HYP = settings(max_examples=25, deadline=None)


# -- torch models --------------------------------------------------------------------------
def _export(
    net: Any, shape: tuple[int, ...], *, opset: int = 17, canonical: bool = True
) -> onnx.ModelProto:
    """torch's TorchScript exporter (what converters.zoo uses), then the canonical model the
    converter writes from; ``canonical=False`` keeps the exported graph as it is (without
    torch's constant folding, which would fold a BatchNorm into the ConvTranspose before it)."""
    from converters import zoo
    from converters.canonical import canonicalize

    if canonical:
        raw = onnx.load_from_string(zoo.export_onnx(net, shape, opset=opset, dynamic_batch=False))
        return canonicalize(raw).model
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net.eval(), (torch.zeros(*shape),), buf, dynamo=False, opset_version=opset,
            input_names=["input"], output_names=["output"], do_constant_folding=False,
        )  # fmt: skip
    return onnx.shape_inference.infer_shapes(onnx.load_from_string(buf.getvalue()))


def _meaningful(net: Any, seed: int = 0) -> Any:
    """Norm layers as a trained net has them: gamma, beta and BatchNorm's running statistics
    away from their 1 / 0 initial values (which would hide a mis-mapped parameter)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.LayerNorm | torch.nn.modules.batchnorm._BatchNorm):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 1.5 + 0.3)
                m.bias.copy_(torch.rand(m.bias.shape, generator=g) - 0.5)
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                assert m.running_mean is not None and m.running_var is not None
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) * 2 + 0.1)
    return net.eval()


class Attention(torch.nn.Module):
    """A pre-norm transformer block as SVTR has it: LayerNorm -> Q, K, V Linear -> Q Kᵀ / √d
    -> Softmax -> · V -> Linear, residual; LayerNorm -> GELU MLP, residual."""

    def __init__(self, dim: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = torch.nn.LayerNorm(dim), torch.nn.LayerNorm(dim)
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.proj = torch.nn.Linear(dim, dim)
        self.fc1, self.fc2 = torch.nn.Linear(dim, 2 * dim), torch.nn.Linear(2 * dim, dim)

    def forward(self, x: Any) -> Any:
        b, n, c = x.shape
        qkv = self.qkv(self.ln1(x)).reshape(b, n, 3, self.heads, c // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        a = (q @ k.transpose(-2, -1)) / (c // self.heads) ** 0.5
        y = (a.softmax(-1) @ v).transpose(1, 2).reshape(b, n, c)
        x = x + self.proj(y)
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.ln2(x))))


class DeconvBN(torch.nn.Module):
    """A DB-style detector head step: ConvTranspose -> BatchNorm -> ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.up = torch.nn.ConvTranspose2d(4, 6, 2, stride=2)
        self.bn = torch.nn.BatchNorm2d(6)

    def forward(self, x: Any) -> Any:
        return torch.relu(self.bn(self.up(x)))


class Cascade(torch.nn.Module):
    """A face-detector cascade stage (MTCNN P-Net style): Conv -> PReLU -> MaxPool(ceil)."""

    def __init__(self, ceil: bool = True) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 6, 3)
        self.act = torch.nn.PReLU(6)
        self.pool = torch.nn.MaxPool2d(2, 2, ceil_mode=ceil)
        self.conv2 = torch.nn.Conv2d(6, 4, 3)
        self.pool2 = torch.nn.AvgPool2d(3, 2, padding=1, ceil_mode=ceil, count_include_pad=False)

    def forward(self, x: Any) -> Any:
        return self.pool2(self.conv2(self.pool(self.act(self.conv(x)))))


def _seeded(make: Any) -> Any:
    torch.manual_seed(0)
    return _meaningful(make())


# -- MatMul of two activations -------------------------------------------------------------
_MATMUL_SHAPES = [
    ([4, 5], [5, 3]),
    ([2, 4, 5], [2, 5, 3]),
    ([2, 4, 5], [5, 3]),  # a 2-D activation right operand
    ([1, 4, 5], [3, 5, 2]),  # broadcast batch
    ([2, 3, 4, 5], [1, 3, 5, 6]),
    ([3, 4, 5], [2, 1, 5, 6]),  # ranks differ
    ([2, 1, 2, 4, 5], [1, 3, 2, 5, 2]),  # rank 5
]


@pytest.mark.parametrize(("a", "b"), _MATMUL_SHAPES)
def test_matmul_of_two_activations_is_batch_matmul(a: list[int], b: list[int]) -> None:
    m = _model([helper.make_node("MatMul", ["a", "b"], ["y"], name="mm")], {"a": a, "b": b}, ["y"])
    err, data = _compare(m)
    assert err <= TOL
    assert count_ops(data).get("BATCH_MATMUL") == 1


def test_matmul_with_a_constant_of_rank_3_is_batch_matmul() -> None:
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("MatMul", ["a", "w"], ["y"])]
    m = _model(nodes, {"a": [2, 4, 5]}, ["y"], {"w": _w(rng, 2, 5, 3)})
    err, data = _compare(m)
    assert err <= TOL
    assert count_ops(data).get("BATCH_MATMUL") == 1


@pytest.mark.parametrize("which", ["a", "b", "both"])
def test_transposed_operands_use_adjoint_flags_not_transposes(which: str) -> None:
    """MatMul(a, Transpose(b) of the last two axes) reads b as it is, with adj_y (and adj_x
    for a): no TRANSPOSE."""
    nodes, ins = [], {}
    for name, shape in (("a", [2, 4, 5]), ("b", [2, 5, 3])):
        if which in (name, "both"):
            ins[name] = [shape[0], shape[2], shape[1]]
            nodes.append(helper.make_node("Transpose", [name], [f"{name}t"], perm=[0, 2, 1]))
        else:
            ins[name] = shape
    feeds = [f"{n}t" if which in (n, "both") else n for n in ("a", "b")]
    nodes.append(helper.make_node("MatMul", feeds, ["y"]))
    m = _model(nodes, ins, ["y"])
    err, data = _compare(m)
    assert err <= TOL
    assert count_transposes(data) == 0
    from ai_edge_litert import schema_py_generated as S

    sub = S.ModelT.InitFromPackedBuf(data, 0).subgraphs[0]
    (op,) = sub.operators
    assert (op.builtinOptions.adjX, op.builtinOptions.adjY) == (which != "b", which != "a")


def test_matrix_vector_product_is_refused_by_name() -> None:
    nodes = [helper.make_node("MatMul", ["a", "v"], ["y"], name="/mv")]
    m = _model(nodes, {"a": [3, 4], "v": [4]}, ["y"])
    with pytest.raises(Exception, match=r"MatMul \(node /mv\): only operands of rank >= 2"):
        onnx_to_tflite(m)


# -- BatchNormalization --------------------------------------------------------------------
def test_conv_transpose_batchnorm_relu() -> None:
    """The BatchNorm torch leaves after a ConvTranspose (exported without its constant
    folding): one 1x1 DEPTHWISE_CONV_2D with the ReLU fused, in NHWC, no TRANSPOSE."""
    m = _export(_seeded(DeconvBN), (1, 4, 5, 7), canonical=False)
    assert "BatchNormalization" in [n.op_type for n in m.graph.node]
    err, data = _compare(m)
    assert err <= TOL
    ops = count_ops(data)
    assert ops == {"TRANSPOSE_CONV": 1, "DEPTHWISE_CONV_2D": 1}, ops
    err16, _ = _compare(m, fp16_weights=True)
    assert err16 <= 1e-2


class _BNAfterAdd(torch.nn.Module):
    """BatchNorms no convolution absorbs, kept by canonicalization: after an Add (2-D conv
    features), on a (N, C, L) sequence, after a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.Conv2d(3, 4, 1)
        self.bn = torch.nn.BatchNorm2d(4)
        self.bn_seq = torch.nn.BatchNorm1d(4)
        self.fc = torch.nn.Linear(4, 6)
        self.bn_fc = torch.nn.BatchNorm1d(6)

    def forward(self, x: Any) -> Any:
        y = torch.relu(self.bn(self.c1(x) + self.c2(x)))
        z = self.bn_seq(y.flatten(2))
        return self.bn_fc(self.fc(z.mean(-1)))


def test_batchnorm_after_add_on_a_sequence_and_after_linear() -> None:
    m = _export(_seeded(_BNAfterAdd), (1, 3, 7, 9))
    assert [n.op_type for n in m.graph.node].count("BatchNormalization") == 3
    err, data = _compare(m)
    assert err <= TOL
    ops = count_ops(data)
    assert ops["DEPTHWISE_CONV_2D"] == 1  # the NHWC one; the other two as MUL + ADD
    assert ops["MUL"] == 2 and ops["ADD"] >= 2


# -- ceil_mode pooling ---------------------------------------------------------------------
@HYP
@given(
    kind=st.sampled_from(["MaxPool", "AveragePool"]),
    k=st.integers(2, 3),
    stride=st.integers(1, 3),
    pads=st.lists(st.integers(0, 1), min_size=4, max_size=4),
    h=st.integers(5, 10),
    wd=st.integers(5, 10),
    ceil=st.integers(0, 1),
    cip=st.integers(0, 1),
)
def test_pool_ceil_mode_and_any_padding(
    kind: str, k: int, stride: int, pads: list[int], h: int, wd: int, ceil: int, cip: int
) -> None:
    """Partial last windows (ceil_mode) and asymmetric pads, with ONNX's divisor for an
    AveragePool (the input only, or the input and its pads: never what ceil_mode adds)."""
    attrs: dict[str, Any] = dict(
        kernel_shape=[k, k], strides=[stride] * 2, pads=pads, ceil_mode=ceil
    )
    if kind == "AveragePool":
        attrs["count_include_pad"] = cip
    m = _model([helper.make_node(kind, ["x"], ["y"], **attrs)], {"x": [1, 3, h, wd]}, ["y"])
    # onnx's shape inference keeps a last ceil_mode window that starts in the end padding,
    # onnxruntime (like torch) drops it: such a model is refused, naming the disagreement
    starts_in_pad = ceil and any(
        (-(-(n + pads[i] + pads[i + 2] - k) // stride)) * stride >= n + pads[i]
        for i, n in enumerate((h, wd))
    )
    if starts_in_pad:
        with pytest.raises(UnsupportedModelError, match="onnxruntime computes"):
            onnx_to_tflite(m)
        return
    err, data = _compare(m)
    assert err <= TOL
    assert count_transposes(data) == 0


def test_face_cascade_ceil_mode_pools_on_odd_sizes() -> None:
    """MaxPool(2, 2, ceil_mode) on a 13x11 map and AvgPool(3, 2, pad 1, ceil_mode,
    count_include_pad=False): the shapes differ from floor mode, the values match."""
    m = _export(_seeded(Cascade), (1, 3, 15, 13))
    floor = _export(_seeded(lambda: Cascade(ceil=False)), (1, 3, 15, 13))
    shape = [d.dim_value for d in m.graph.output[0].type.tensor_type.shape.dim]
    assert shape != [d.dim_value for d in floor.graph.output[0].type.tensor_type.shape.dim]
    err, data = _compare(m)
    assert err <= TOL
    assert count_transposes(data) == 0
    ops = count_ops(data)
    assert ops["MAX_POOL_2D"] == 1 and ops["AVERAGE_POOL_2D"] == 1


# -- LayerNorm -----------------------------------------------------------------------------
class _LN(torch.nn.Module):
    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.ln = torch.nn.LayerNorm(shape)

    def forward(self, x: Any) -> Any:
        return self.ln(x) * 2.0


@pytest.mark.parametrize("opset", [13, 17])
@pytest.mark.parametrize(
    ("shape", "norm"),
    [((1, 6, 16), (16,)), ((1, 4, 6, 8), (8,)), ((1, 5, 4, 6), (4, 6)), ((2, 12), (12,))],
)
def test_layer_norm(opset: int, shape: tuple[int, ...], norm: tuple[int, ...]) -> None:
    """LayerNormalization (opset 17) and the ReduceMean -> Sub -> Pow -> ReduceMean -> Add ->
    Sqrt -> Div -> Mul -> Add pattern torch exports before it: MEAN, SUB, MUL, MEAN, ADD, RSQRT,
    MUL, MUL, ADD in the tensor's layout (also over W of an NHWC tensor)."""
    m = _export(_seeded(lambda: _LN(norm)), shape, opset=opset)
    types = [n.op_type for n in m.graph.node]
    assert ("LayerNormalization" in types) == (opset >= 17)
    err, data = _compare(m)
    assert err <= TOL
    ops = count_ops(data)
    assert ops.get("RSQRT") == 1 and ops.get("MEAN") == 2
    assert not {"POW", "DIV", "SQRT"} & set(ops), ops


def test_layer_norm_pattern_with_a_second_consumer_is_not_fused() -> None:
    """When the centred tensor is used elsewhere too, the nodes are written one by one."""
    nodes = [
        helper.make_node("ReduceMean", ["x"], ["m"], axes=[-1]),
        helper.make_node("Sub", ["x", "m"], ["d"]),
        helper.make_node("Pow", ["d", "two"], ["p"]),
        helper.make_node("ReduceMean", ["p"], ["v"], axes=[-1]),
        helper.make_node("Add", ["v", "eps"], ["ve"]),
        helper.make_node("Sqrt", ["ve"], ["s"]),
        helper.make_node("Div", ["d", "s"], ["y"]),
        helper.make_node("Relu", ["d"], ["r"]),
    ]
    inits = {"two": np.array(2.0, np.float32), "eps": np.array(1e-5, np.float32)}
    m = _model(nodes, {"x": [2, 3, 8]}, ["y", "r"], inits, opset=13)
    err, data = _compare(m)
    assert err <= TOL
    assert "RSQRT" not in count_ops(data) and count_ops(data)["POW"] == 1


# -- GELU ----------------------------------------------------------------------------------
class _MLP(torch.nn.Module):
    def __init__(self, approximate: str = "none") -> None:
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(12, 24), torch.nn.Linear(24, 5)
        self.approximate = approximate

    def forward(self, x: Any) -> Any:
        h = torch.nn.functional.gelu(self.fc1(x), approximate=self.approximate)
        return self.fc2(h)


@pytest.mark.parametrize(("opset", "approximate"), [(17, "none"), (20, "none"), (20, "tanh")])
def test_gelu(opset: int, approximate: str) -> None:
    """torch's erf pattern (Div(√2) -> Erf -> Add(1) -> Mul(x) -> Mul(0.5)) at opset 17 and
    the Gelu op at 20: TFLite's GELU builtin (approximate for tanh)."""
    m = _export(_seeded(lambda: _MLP(approximate)), (3, 12), opset=opset)
    types = [n.op_type for n in m.graph.node]
    assert ("Erf" in types) == (opset < 20)
    err, data = _compare(m)
    assert err <= TOL
    assert count_ops(data) == {"FULLY_CONNECTED": 2, "GELU": 1}


def test_erf_outside_the_gelu_pattern_is_refused() -> None:
    nodes = [helper.make_node("Erf", ["x"], ["y"], name="/lonely/Erf")]
    m = _model(nodes, {"x": [2, 3]}, ["y"])
    with pytest.raises(Exception, match=r"unsupported operators: Erf \(node /lonely/Erf\)"):
        onnx_to_tflite(m)


# -- Softmax on any axis -------------------------------------------------------------------
@pytest.mark.parametrize(
    ("shape", "axis", "transposes"),
    [
        ([1, 5, 3, 4], 1, 0),  # the channels: last in NHWC
        ([1, 5, 3, 4], 3, 2),
        ([1, 5, 3, 4], 2, 2),
        ([2, 5, 3, 4], 0, 2),
        ([2, 6, 7], 1, 2),
        ([2, 6, 7], -1, 0),
        ([6, 7], 0, 2),
    ],
)
def test_softmax_on_any_axis(shape: list[int], axis: int, transposes: int) -> None:
    m = _model([helper.make_node("Softmax", ["x"], ["y"], axis=axis)], {"x": shape}, ["y"])
    err, data = _compare(m)
    assert err <= TOL
    assert count_transposes(data) == transposes


# -- the attention block, whole ------------------------------------------------------------
@pytest.mark.parametrize("opset", [13, 17, 20])
def test_attention_block(opset: int) -> None:
    """At opset 13 its LayerNorms and GELU are the decomposed patterns, at 17 LayerNorm is an
    op, at 20 GELU is too: the same TFLite graph each time."""
    m = _export(_seeded(Attention), (1, 8, 16), opset=opset)
    err, data = _compare(m)
    print(f"opset {opset}: max rel err {err:.2e}, ops {count_ops(data)}")
    assert err <= TOL
    ops = count_ops(data)
    assert ops["BATCH_MATMUL"] == 2 and ops["SOFTMAX"] == 1 and ops["GELU"] == 1
    assert ops["RSQRT"] == 2 and ops["FULLY_CONNECTED"] == 4
    # head split and merge: Q, K, V to (B, h, N, d) and the result back
    assert count_transposes(data) == 4
    err16, data16 = _compare(m, fp16_weights=True)
    assert err16 <= 1e-2
    assert count_ops(data16)["DEQUANTIZE"] >= 4


# -- int8 ----------------------------------------------------------------------------------
def _tensor_types(data: bytes) -> dict[str, Any]:
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_content=data)
    return {d["name"]: d["dtype"] for d in it.get_tensor_details()}


def _op_io_types(data: bytes, op_name: str) -> list[tuple[list[str], list[str]]]:
    """For each operator ``op_name``: (input tensor types, output tensor types)."""
    from ai_edge_litert import schema_py_generated as S

    names = {v: k for k, v in vars(S.BuiltinOperator).items() if not k.startswith("_")}
    tnames = {v: k for k, v in vars(S.TensorType).items() if not k.startswith("_")}
    m = S.ModelT.InitFromPackedBuf(data, 0)
    sg = m.subgraphs[0]
    codes = [max(c.builtinCode, c.deprecatedBuiltinCode) for c in m.operatorCodes]
    return [
        (
            [tnames[sg.tensors[i].type] for i in o.inputs if i >= 0],
            [tnames[sg.tensors[i].type] for i in o.outputs],
        )
        for o in sg.operators
        if names[codes[o.opcodeIndex]] == op_name
    ]


def _int8_error(case: Int8Case, data: bytes) -> tuple[float, float]:
    """(min cosine to the float model, max abs error in output quantization steps)."""
    rows = case.run(data)
    step = _out_scale(case)
    return (
        min(_cos(ref, got) for ref, _q, got in rows),
        max(float(np.abs(ref - got).max()) for ref, _q, got in rows) / step,
    )


def test_attention_block_int8(tmp_path: Path) -> None:
    """BATCH_MATMUL (both products), SOFTMAX, GELU and the Linears run in int8; the
    LayerNorms' arithmetic and the Div by √d (no int8 kernel) stay float between DEQUANTIZE
    and QUANTIZE. Measured: cosine to float 0.99992, max error 1.8 output steps."""
    case = Int8Case(_export(_seeded(Attention), (1, 8, 16), opset=17), tmp_path)
    data = case.tflite()
    for op in ("BATCH_MATMUL", "SOFTMAX", "GELU", "FULLY_CONNECTED"):
        io_types = _op_io_types(data, op)
        assert io_types and all(set(i) | set(o) <= {"INT8", "INT32"} for i, o in io_types), op
    assert all(i == ["FLOAT32"] for i, _o in _op_io_types(data, "RSQRT"))
    cos, steps = _int8_error(case, data)
    print(f"attention int8: cosine {cos:.6f}, max error {steps:.2f} steps")
    assert cos >= 0.9995 and steps <= 4


@pytest.mark.parametrize("opset", [13, 20])
def test_attention_block_int8_from_the_patterns_and_the_gelu_op(opset: int, tmp_path: Path) -> None:
    case = Int8Case(_export(_seeded(Attention), (1, 8, 16), opset=opset), tmp_path)
    data = case.tflite()
    assert _op_io_types(data, "GELU") == [(["INT8"], ["INT8"])]
    cos, steps = _int8_error(case, data)
    assert cos >= 0.9995 and steps <= 4


def test_float_nodes_naming_a_fused_pattern_node_keeps_its_operators_float(
    tmp_path: Path,
) -> None:
    """Int8Config.float_nodes names ONNX nodes: the Erf inside a GELU pattern keeps the GELU
    float, a LayerNorm pattern's Sub keeps that LayerNorm's output float too, a MatMul keeps
    its BATCH_MATMUL float."""
    m = _export(_seeded(Attention), (1, 8, 16), opset=13)
    case = Int8Case(m, tmp_path)
    by_type: dict[str, list[str]] = {}
    for n in m.graph.node:
        by_type.setdefault(n.op_type, []).append(n.name)
    assert _op_io_types(case.tflite(), "GELU") == [(["INT8"], ["INT8"])]
    data = case.tflite(float_nodes=[by_type["Erf"][0], by_type["MatMul"][0]])
    assert _op_io_types(data, "GELU") == [(["FLOAT32"], ["FLOAT32"])]
    assert sorted(i[0] for i, _o in _op_io_types(data, "BATCH_MATMUL")) == ["FLOAT32", "INT8"]
    cos, _ = _int8_error(case, data)
    assert cos >= 0.9995


def test_conv_transpose_batchnorm_relu_int8(tmp_path: Path) -> None:
    """The BatchNorm's 1x1 DEPTHWISE_CONV_2D gets per-channel int8 weights (a MUL + ADD with
    one scale for all channels measured 1.77 steps against this 1.29)."""
    case = Int8Case(_export(_seeded(DeconvBN), (1, 4, 5, 7), canonical=False), tmp_path)
    data = case.tflite()
    assert _op_io_types(data, "DEPTHWISE_CONV_2D") == [(["INT8", "INT8", "INT32"], ["INT8"])]
    cos, steps = _int8_error(case, data)
    assert cos >= 0.9999 and steps <= 2.01


def test_batchnorm_mul_add_int8(tmp_path: Path) -> None:
    case = Int8Case(_export(_seeded(_BNAfterAdd), (1, 3, 7, 9)), tmp_path)
    data = case.tflite()
    assert count_ops(data).get("DEQUANTIZE") == 1  # nothing inside is float
    cos, steps = _int8_error(case, data)
    assert cos >= 0.999 and steps <= 4


def test_ceil_mode_pools_int8(tmp_path: Path) -> None:
    """The MaxPool runs in int8 (its ceil_mode window is TFLite's SAME here). The AveragePool,
    whose partial windows need the divisor correction, stays float: in int8 the correction
    (up to 4.5x here) multiplies the pool's rounding, 4.4 output steps against 1.9."""
    case = Int8Case(_export(_seeded(Cascade), (1, 3, 15, 13)), tmp_path)
    data = case.tflite()
    assert _op_io_types(data, "MAX_POOL_2D") == [(["INT8"], ["INT8"])]
    assert _op_io_types(data, "AVERAGE_POOL_2D") == [(["FLOAT32"], ["FLOAT32"])]
    cos, steps = _int8_error(case, data)
    assert cos >= 0.9999 and steps <= 2.5


@pytest.mark.parametrize(("shape", "axis"), [([1, 5, 3, 4], 2), ([2, 6, 7], 1)])
def test_softmax_on_any_axis_int8(shape: list[int], axis: int, tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    nodes = [
        helper.make_node("Mul", ["x", "k"], ["xs"]),
        helper.make_node("Softmax", ["xs"], ["y"], axis=axis),
    ]
    m = _model(nodes, {"x": shape}, ["y"], {"k": np.array(4.0 + rng.random(), np.float32)})
    case = Int8Case(m, tmp_path)
    data = case.tflite()
    assert _op_io_types(data, "SOFTMAX") == [(["INT8"], ["INT8"])]
    for ref, _q, got in case.run(data):
        assert np.abs(got - ref).max() <= 2 / 256 + 1e-6


def test_matmul_of_two_activations_int8(tmp_path: Path) -> None:
    nodes = [
        helper.make_node("Sub", ["a", "h"], ["ac"]),  # signed operands: non-zero zero points
        helper.make_node("MatMul", ["ac", "b"], ["y"]),
    ]
    m = _model(nodes, {"a": [2, 4, 5], "b": [1, 5, 3]}, ["y"], {"h": np.array(0.3, np.float32)})
    case = Int8Case(m, tmp_path)
    data = case.tflite()
    assert _op_io_types(data, "BATCH_MATMUL") == [(["INT8", "INT8"], ["INT8"])]
    cos, steps = _int8_error(case, data)
    assert cos >= 0.999 and steps <= 2.01


def test_quantize_cli_writes_an_int8_model_with_every_new_op(tmp_path: Path) -> None:
    """`edge-convert quantize --format tflite-int8` on a small recognizer holding all of them
    (ceil_mode pools, a standalone BatchNorm, the attention block, Softmax over the classes)
    writes a model that LiteRT runs."""
    from ai_edge_litert.interpreter import Interpreter

    from converters.cli import main as edge_convert

    class Recognizer(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = Cascade()
            self.bn = torch.nn.BatchNorm1d(4)
            self.embed = torch.nn.Linear(4, 16)
            self.block = Attention()
            self.head = torch.nn.Linear(16, 7)

        def forward(self, x: Any) -> Any:
            f = self.bn(self.stem(x).flatten(2))  # (N, C, L)
            return self.head(self.block(self.embed(f.transpose(1, 2)))).softmax(-1)

    from converters import zoo

    torch.manual_seed(0)
    net = _meaningful(Recognizer())
    (tmp_path / "rec.onnx").write_bytes(zoo.export_onnx(net, (1, 3, 15, 13)))
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "cal.npz", x=rng.random((16, 3, 15, 13), dtype=np.float32))
    out, rep = tmp_path / "rec.tflite", tmp_path / "rep.json"
    code = edge_convert(
        ["quantize", str(tmp_path / "rec.onnx"), "-o", str(out), "--format", "tflite-int8",
         "--calibration", str(tmp_path / "cal.npz"), "--report", str(rep),
         "--input-shape", "input=1,3,15,13", "--task", "raw", "--latency-seconds", "0.1",
         "--no-float-fallback"]  # every op in int8: no speed point (unweighted ops float)
    )  # fmt: skip
    assert code == 0 and out.exists()
    report = json.loads(rep.read_text())
    print(f"recognizer int8: fidelity {report['fidelity']}, float nodes {report['float_nodes']}")
    assert report["format"] == "tflite-int8" and report["float_nodes"] == []
    data = out.read_bytes()
    ops = count_ops(data)
    for op in ("BATCH_MATMUL", "GELU", "SOFTMAX", "RSQRT", "MAX_POOL_2D", "AVERAGE_POOL_2D"):
        assert op in ops, (op, ops)
    for op in ("BATCH_MATMUL", "GELU"):
        assert {o[0] for i, o in _op_io_types(data, op)} == {"INT8"}, op
    it = Interpreter(model_path=str(out))
    it.allocate_tensors()
    x = rng.random((1, 15, 13, 3), dtype=np.float32)
    it.set_tensor(it.get_input_details()[0]["index"], x)
    it.invoke()
    y = it.get_tensor(it.get_output_details()[0]["index"])
    (want,) = _run_ort(onnx.load(str(tmp_path / "rec.onnx")), {"input": x.transpose(0, 3, 1, 2)})
    assert y.shape == want.shape
    assert _cos(y, want) >= 0.99
    (got32,) = _run_tflite(onnx_to_tflite(_export(net, (1, 3, 15, 13))), [x])
    assert np.abs(got32 - want).max() <= TOL * np.abs(want).max()
