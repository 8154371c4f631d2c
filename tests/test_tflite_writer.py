"""converters.tflite: ONNX -> .tflite without TensorFlow, checked against onnxruntime."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from converters.tflite import SUPPORTED_OPS, count_ops, count_transposes, onnx_to_tflite
from edge_agent.errors import UnsupportedModelError

Interpreter = pytest.importorskip("ai_edge_litert.interpreter").Interpreter

TOL = 1e-4
HYP = settings(max_examples=15, deadline=None)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-6))


def _nhwc(x: np.ndarray) -> np.ndarray:
    return x.transpose(0, 2, 3, 1) if x.ndim == 4 else x


def _run_ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return [np.asarray(o) for o in sess.run(None, feeds)]


def _run_tflite(data: bytes, inputs: list[np.ndarray]) -> list[np.ndarray]:
    it = Interpreter(model_content=data)
    it.allocate_tensors()
    for d, x in zip(it.get_input_details(), inputs):
        it.set_tensor(d["index"], np.ascontiguousarray(x, np.float32))
    it.invoke()
    return [it.get_tensor(d["index"]).copy() for d in it.get_output_details()]


def _compare(model: onnx.ModelProto, seed: int = 0, **kw: Any) -> tuple[float, bytes]:
    """Convert, run both, return (max relative error over outputs, tflite bytes)."""
    rng = np.random.default_rng(seed)
    inits = {i.name for i in model.graph.initializer}
    feeds = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        shape = [d.dim_value or 1 for d in vi.type.tensor_type.shape.dim]
        feeds[vi.name] = rng.standard_normal(shape).astype(np.float32)
    data = onnx_to_tflite(model, **kw)
    want = _run_ort(model, feeds)
    keep = kw.get("keep_nchw_input", False)
    got = _run_tflite(data, [x if keep else _nhwc(x) for x in feeds.values()])
    assert len(got) == len(want)
    err = 0.0
    for g, w in zip(got, want):
        w = _nhwc(w)
        assert g.shape == w.shape, (g.shape, w.shape)
        err = max(err, _rel(w, g))
    return err, data


def _model(
    nodes: list[onnx.NodeProto],
    inputs: dict[str, list[int]],
    outputs: list[str],
    inits: dict[str, np.ndarray] | None = None,
    opset: int = 17,
) -> onnx.ModelProto:
    g = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(k, TensorProto.FLOAT, v) for k, v in inputs.items()],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
        [numpy_helper.from_array(v, k) for k, v in (inits or {}).items()],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    m = onnx.shape_inference.infer_shapes(m, strict_mode=True)
    # give the outputs their inferred shapes
    vis = {v.name: v for v in m.graph.value_info}
    for o in m.graph.output:
        if o.name in vis:
            o.CopyFrom(vis[o.name])
    return m


def _w(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32)


# -- operators -----------------------------------------------------------------------------
@HYP
@given(
    cin=st.integers(1, 6),
    cout=st.integers(1, 6),
    k=st.integers(1, 4),
    stride=st.integers(1, 3),
    dil=st.integers(1, 2),
    pads=st.lists(st.integers(0, 2), min_size=4, max_size=4),
    size=st.integers(7, 12),
    depthwise=st.booleans(),
    grouped=st.booleans(),
    mult=st.integers(1, 2),
    bias=st.booleans(),
    relu=st.booleans(),
)
def test_conv(
    cin: int,
    cout: int,
    k: int,
    stride: int,
    dil: int,
    pads: list[int],
    size: int,
    depthwise: bool,
    grouped: bool,
    mult: int,
    bias: bool,
    relu: bool,
) -> None:
    rng = np.random.default_rng(0)
    group = cin if depthwise else 1
    cout = cin * mult if depthwise else cout
    if grouped and not depthwise:  # 2 groups of cin and cout channels each
        group, cin, cout = 2, 2 * cin, 2 * cout
    inits = {"w": _w(rng, cout, cin // group, k, k)}
    ins = ["x", "w"]
    if bias:
        inits["b"] = _w(rng, cout)
        ins.append("b")
    conv = helper.make_node(
        "Conv", ins, ["c" if relu else "y"], group=group, strides=[stride, stride],
        dilations=[dil, dil], pads=pads, kernel_shape=[k, k], name="conv",
    )  # fmt: skip
    nodes = [conv] + ([helper.make_node("Relu", ["c"], ["y"])] if relu else [])
    m = _model(nodes, {"x": [1, cin, size, size + 1]}, ["y"], inits)
    err, data = _compare(m)
    assert err <= TOL
    assert count_transposes(data) == 0


def test_conv_same_padding_uses_no_pad_op() -> None:
    rng = np.random.default_rng(1)
    conv = helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1], strides=[1, 1])
    m = _model([conv], {"x": [1, 3, 8, 8]}, ["y"], {"w": _w(rng, 4, 3, 3, 3)})
    err, data = _compare(m)
    assert err <= TOL
    sub = _ops(data)
    assert sub == ["CONV_2D"], sub


def _ops(data: bytes) -> list[str]:
    from ai_edge_litert import schema_py_generated as S

    names = {v: k for k, v in vars(S.BuiltinOperator).items() if not k.startswith("_")}
    m = S.ModelT.InitFromPackedBuf(data, 0)
    codes = [oc.builtinCode for oc in m.operatorCodes]
    return [names[codes[o.opcodeIndex]] for o in m.subgraphs[0].operators]


_shape4 = st.lists(st.sampled_from([1, 3]), min_size=4, max_size=4)


@HYP
@given(
    op=st.sampled_from(["Add", "Sub", "Mul", "Div"]),
    a=_shape4,
    b_rank=st.integers(0, 4),
    b_const=st.booleans(),
    b_dims=st.lists(st.sampled_from([1, 3]), min_size=4, max_size=4),
    swap=st.booleans(),
)
def test_binary_broadcasting(
    op: str, a: list[int], b_rank: int, b_const: bool, b_dims: list[int], swap: bool
) -> None:
    rng = np.random.default_rng(2)
    a = [1, *a[1:]]
    b = b_dims[4 - b_rank :]
    if not b_const and b_rank < 4:
        b_rank = 4
        b = [1, *b_dims[1:]]
    ins = {"a": a}
    inits: dict[str, np.ndarray] = {}
    if b_const:
        inits["b"] = _w(rng, *b) + (3.0 if op == "Div" else 0.0)
    else:
        ins["b"] = b
    order = ["b", "a"] if swap else ["a", "b"]
    m = _model([helper.make_node(op, order, ["y"], name="bin")], ins, ["y"], inits)
    if op == "Div" and not b_const:
        return  # random divisors near 0 make the relative error meaningless
    err, data = _compare(m)
    assert err <= TOL
    assert count_transposes(data) == 0


def test_binary_rank_mismatch_activation() -> None:
    """A [C, 1, 1] activation against an NHWC tensor is reshaped and transposed."""
    m = _model(
        [helper.make_node("Add", ["a", "b"], ["y"])], {"a": [1, 3, 4, 5], "b": [3, 1, 1]}, ["y"]
    )
    err, _ = _compare(m)
    assert err <= TOL


@pytest.mark.parametrize(
    ("op", "attrs", "extra"),
    [
        ("Relu", {}, {}),
        ("Sigmoid", {}, {}),
        ("Tanh", {}, {}),
        ("HardSwish", {}, {}),
        ("HardSigmoid", {"alpha": 0.3, "beta": 0.4}, {}),
        ("LeakyRelu", {"alpha": 0.1}, {}),
        ("Clip", {}, {"lo": np.array(0.0, np.float32), "hi": np.array(6.0, np.float32)}),
        ("Clip", {}, {"lo": np.array(-0.5, np.float32), "hi": np.array(0.7, np.float32)}),
        ("PRelu", {}, {"slope": np.array([0.1, 0.2, 0.3], np.float32).reshape(3, 1, 1)}),
    ],
)
def test_unary(op: str, attrs: dict[str, Any], extra: dict[str, np.ndarray]) -> None:
    node = helper.make_node(op, ["x", *extra], ["y"], **attrs)
    m = _model([node], {"x": [1, 3, 5, 4]}, ["y"], dict(extra))
    err, data = _compare(m)
    assert err <= TOL
    assert count_transposes(data) == 0


def test_softmax_channels_and_2d() -> None:
    m = _model([helper.make_node("Softmax", ["x"], ["y"], axis=1)], {"x": [1, 5, 3, 3]}, ["y"])
    assert _compare(m)[0] <= TOL
    m = _model([helper.make_node("Softmax", ["x"], ["y"], axis=-1)], {"x": [2, 7]}, ["y"])
    assert _compare(m)[0] <= TOL


@HYP
@given(
    kind=st.sampled_from(["MaxPool", "AveragePool"]),
    k=st.integers(1, 3),
    stride=st.integers(1, 2),
    pad=st.integers(0, 1),
    size=st.integers(5, 9),
    cip=st.integers(0, 1),
)
def test_pool(kind: str, k: int, stride: int, pad: int, size: int, cip: int) -> None:
    pad = min(pad, k - 1)
    attrs: dict[str, Any] = dict(kernel_shape=[k, k], strides=[stride, stride], pads=[pad] * 4)
    if kind == "AveragePool":
        attrs["count_include_pad"] = cip
    m = _model([helper.make_node(kind, ["x"], ["y"], **attrs)], {"x": [1, 3, size, size]}, ["y"])
    try:
        err, _ = _compare(m)
    except UnsupportedModelError as exc:
        assert "count_include_pad" in str(exc)  # asymmetric-equivalent pads without counting
        return
    assert err <= TOL


def test_global_pool_flatten_gemm_and_reduce_mean() -> None:
    rng = np.random.default_rng(3)
    nodes = [
        helper.make_node("GlobalAveragePool", ["x"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "w", "b"], ["y"], transB=1, alpha=0.5, beta=2.0),
        helper.make_node("ReduceMean", ["x"], ["r"], axes=[3], keepdims=0),
    ]
    inits = {"w": _w(rng, 4, 6), "b": _w(rng, 4)}
    m = _model(nodes, {"x": [1, 6, 3, 5]}, ["y", "r"], inits)
    err, _ = _compare(m)
    assert err <= TOL


def test_flatten_into_gemm_permutes_weights() -> None:
    rng = np.random.default_rng(4)
    nodes = [
        helper.make_node("Conv", ["x", "cw"], ["c"], kernel_shape=[3, 3]),
        helper.make_node("Flatten", ["c"], ["f"]),
        helper.make_node("Gemm", ["f", "w"], ["g"], transB=0),
        helper.make_node("MatMul", ["g", "w2"], ["y"]),
    ]
    inits = {"cw": _w(rng, 4, 2, 3, 3), "w": _w(rng, 4 * 3 * 4, 5), "w2": _w(rng, 5, 3)}
    m = _model(nodes, {"x": [1, 2, 5, 6]}, ["y"], inits)
    err, data = _compare(m)
    assert err <= TOL
    assert count_transposes(data) == 0


def test_reshape_of_nhwc_is_transposed_first() -> None:
    nodes = [helper.make_node("Reshape", ["x", "s"], ["y"])]
    m = _model(nodes, {"x": [1, 3, 2, 4]}, ["y"], {"s": np.array([1, 3, 8], np.int64)})
    err, data = _compare(m)
    assert err <= TOL
    assert count_transposes(data) == 1


def test_concat_transpose_pad() -> None:
    nodes = [
        helper.make_node("Concat", ["a", "b"], ["c"], axis=1),
        helper.make_node("Pad", ["c", "p"], ["d"]),
        helper.make_node("Transpose", ["d"], ["y"], perm=[0, 1, 3, 2]),
    ]
    pads = np.array([0, 1, 2, 0, 0, 0, 1, 1], np.int64)
    m = _model(nodes, {"a": [1, 2, 3, 4], "b": [1, 3, 3, 4]}, ["y"], {"p": pads})
    err, _ = _compare(m)
    assert err <= TOL


@pytest.mark.parametrize(
    ("mode", "ctm", "nearest"),
    [
        ("nearest", "asymmetric", "floor"),
        ("linear", "asymmetric", "floor"),
        ("linear", "half_pixel", "floor"),
        ("linear", "align_corners", "floor"),
        ("linear", "pytorch_half_pixel", "floor"),
    ],
)
def test_resize(mode: str, ctm: str, nearest: str) -> None:
    node = helper.make_node(
        "Resize", ["x", "", "s"], ["y"], mode=mode, coordinate_transformation_mode=ctm,
        nearest_mode=nearest,
    )  # fmt: skip
    scales = np.array([1, 1, 2, 2], np.float32)
    m = _model([node], {"x": [1, 3, 4, 5]}, ["y"], {"s": scales})
    err, data = _compare(m)
    assert err <= TOL
    assert count_transposes(data) == 0


def test_keep_nchw_input_transposes_once() -> None:
    rng = np.random.default_rng(5)
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["a"], kernel_shape=[1, 1]),
        helper.make_node("Conv", ["x", "w2"], ["b"], kernel_shape=[1, 1]),
        helper.make_node("Add", ["a", "b"], ["y"]),
    ]
    m = _model(
        nodes, {"x": [1, 3, 4, 4]}, ["y"], {"w1": _w(rng, 2, 3, 1, 1), "w2": _w(rng, 2, 3, 1, 1)}
    )
    err, data = _compare(m, keep_nchw_input=True)
    assert err <= TOL
    assert count_transposes(data) == 1


def test_unsupported_ops_are_all_named() -> None:
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="ok"),
        helper.make_node("Einsum", ["r", "r"], ["e"], equation="ij,ij->ij", name="/attn/Einsum"),
        helper.make_node("Foo", ["e"], ["y"], name="/made/up", domain="custom"),
    ]
    g = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    with pytest.raises(UnsupportedModelError) as info:
        onnx_to_tflite(m)
    msg = str(info.value)
    assert "Einsum (node /attn/Einsum)" in msg
    assert "Foo (node /made/up)" in msg
    assert "Relu" not in msg
    assert "Einsum" not in SUPPORTED_OPS


def test_every_node_refused_for_its_attributes_is_named() -> None:
    nodes = [
        helper.make_node("Pad", ["x", "pads"], ["p"], mode="reflect", name="/pad/reflect"),
        helper.make_node("Relu", ["p"], ["r"], name="ok"),
        helper.make_node("Resize", ["r", "", "sc"], ["y"], mode="cubic", name="/up/cubic"),
    ]
    inits = {"pads": np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "sc": np.ones(4, np.float32)}
    m = _model(nodes, {"x": [1, 2, 4, 4]}, ["y"], inits)
    with pytest.raises(UnsupportedModelError) as info:
        onnx_to_tflite(m)
    msg = str(info.value)
    assert msg.startswith("2 nodes cannot be converted")
    assert "Pad (node /pad/reflect): only constant padding" in msg
    assert "Resize (node /up/cubic): mode=cubic" in msg
    assert "ok" not in msg


def test_conv_with_non_constant_weights_is_refused_by_name() -> None:
    node = helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[1, 1], name="dyn")
    m = _model([node], {"x": [1, 4, 3, 3], "w": [2, 4, 1, 1]}, ["y"])
    with pytest.raises(UnsupportedModelError, match="dyn"):
        onnx_to_tflite(m)


def test_slice_split_gather() -> None:
    i64 = np.int64
    nodes = [
        helper.make_node("Slice", ["x", "st", "en", "ax", "sp"], ["s"]),
        helper.make_node("Split", ["x", "sz"], ["p0", "p1"], axis=1),
        helper.make_node("Gather", ["x", "gi"], ["g"], axis=1),
        helper.make_node("Gather", ["x", "g0"], ["h"], axis=3),
        helper.make_node("Slice", ["x", "rs", "re", "rax", "rsp"], ["r"]),
    ]
    inits = {
        "st": np.array([1, 0], i64), "en": np.array([4, 5], i64),
        "ax": np.array([1, 3], i64), "sp": np.array([1, 2], i64),
        "sz": np.array([2, 3], i64), "gi": np.array([4, 0, 2], i64), "g0": np.array(-1, i64),
        "rs": np.array([-1], i64), "re": np.array([-100], i64),
        "rax": np.array([2], i64), "rsp": np.array([-1], i64),
    }  # fmt: skip
    m = _model(nodes, {"x": [1, 5, 4, 6]}, ["s", "p0", "p1", "g", "h", "r"], inits)
    err, data = _compare(m)
    assert err <= TOL
    assert count_transposes(data) == 1  # only for the rank-3 output h of the scalar Gather


# -- end to end ----------------------------------------------------------------------------
def _canonical(net: Any, shape: tuple[int, ...]) -> onnx.ModelProto:
    from converters import zoo
    from converters.canonical import canonicalize

    raw = onnx.load_from_string(zoo.export_onnx(net, shape, dynamic_batch=False))
    return canonicalize(raw).model


def _mlp() -> Any:
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(20, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16), torch.nn.Sigmoid(),
        torch.nn.Linear(16, 4), torch.nn.Softmax(dim=-1),
    )  # fmt: skip


def _e2e_net(name: str) -> tuple[onnx.ModelProto, bool]:
    """(canonical ONNX model, is a CNN) for one of the end-to-end nets."""
    pytest.importorskip("torch")
    import torch

    from converters import zoo

    nets: dict[str, tuple[Any, tuple[int, ...], bool]] = {
        "digits": (lambda: zoo.digits_cnn(), (1, 1, 8, 8), True),
        "resnet": (lambda: zoo.resnet_style(width=8), (1, 3, 64, 64), True),
        "mobilenet_v2": (
            lambda: zoo.mobilenet_v2_style(width_mult=0.35, classes=10), (1, 3, 64, 64), True
        ),
        "mobilenet_v2_grouped": (
            lambda: zoo.mobilenet_v2_style(width_mult=0.35, classes=10, grouped=True),
            (1, 3, 32, 32),
            True,
        ),
        "mlp": (_mlp, (1, 20), False),
        "se_hardswish": (lambda: zoo.se_hardswish_cnn(), (1, 3, 32, 32), True),
        "unet": (lambda: zoo.tiny_unet(), (1, 3, 32, 32), True),
        "conv1d_sensor": (lambda: zoo.conv1d_sensor(), (1, 6, 64), False),
    }  # fmt: skip
    make, shape, cnn = nets[name]
    torch.manual_seed(0)
    return _canonical(make(), shape), cnn


_E2E = [
    "digits", "resnet", "mobilenet_v2", "mobilenet_v2_grouped", "mlp", "se_hardswish", "unet",
    "conv1d_sensor",
]  # fmt: skip


@pytest.mark.parametrize("name", _E2E)
def test_end_to_end(name: str) -> None:
    model, cnn = _e2e_net(name)
    t0 = time.perf_counter()
    onnx_to_tflite(model)
    took = time.perf_counter() - t0
    err, data = _compare(model)
    n_t = count_transposes(data)
    print(f"{name}: max rel err {err:.2e}, transposes {n_t}, convert {took * 1000:.0f} ms")
    assert err <= TOL
    if cnn:
        assert n_t == 0
    elif name == "conv1d_sensor":  # the (N, C, L) input, once, to the (N, L, C) it runs in
        assert n_t == 1


def test_squeeze_unsqueeze_after_global_pool() -> None:
    nodes = [
        helper.make_node("GlobalAveragePool", ["x"], ["g"]),
        helper.make_node("Squeeze", ["g", "ax"], ["s"]),
        helper.make_node("Unsqueeze", ["s", "ax0"], ["y"]),
    ]
    inits = {"ax": np.array([2, 3], np.int64), "ax0": np.array([0], np.int64)}
    m = _model(nodes, {"x": [1, 6, 3, 5]}, ["y"], inits)
    err, data = _compare(m)
    assert err <= TOL
    assert count_transposes(data) == 0


@HYP
@given(
    k=st.integers(1, 4),
    stride=st.integers(1, 3),
    pad=st.integers(0, 1),
    out_pad=st.integers(0, 1),
    bias=st.booleans(),
)
def test_conv_transpose(k: int, stride: int, pad: int, out_pad: int, bias: bool) -> None:
    rng = np.random.default_rng(7)
    pad, out_pad = min(pad, k - 1), min(out_pad, stride - 1)
    inits = {"w": _w(rng, 3, 4, k, k)}
    ins = ["x", "w"]
    if bias:
        inits["b"] = _w(rng, 4)
        ins.append("b")
    node = helper.make_node(
        "ConvTranspose", ins, ["y"], strides=[stride, stride], pads=[pad] * 4,
        output_padding=[out_pad, out_pad], kernel_shape=[k, k], name="deconv",
    )  # fmt: skip
    m = _model([node], {"x": [1, 3, 4, 5]}, ["y"], inits)
    try:
        err, data = _compare(m)
    except UnsupportedModelError as exc:
        assert "output_padding" in str(exc)
        return
    assert err <= TOL
    assert count_transposes(data) == 0


@pytest.mark.parametrize("op", ["Exp", "Abs", "Neg", "Identity", "GlobalMaxPool", "LogSoftmax"])
def test_more_unary(op: str) -> None:
    attrs: dict[str, Any] = {"axis": 1} if op == "LogSoftmax" else {}
    m = _model([helper.make_node(op, ["x"], ["y"], **attrs)], {"x": [1, 3, 4, 5]}, ["y"])
    err, data = _compare(m)
    assert err <= TOL
    assert count_transposes(data) == 0


@pytest.mark.parametrize("op", ["Max", "Min", "Pow", "Sqrt", "Log"])
def test_more_elementwise(op: str) -> None:
    nodes = [helper.make_node("Abs", ["x"], ["a"])]  # positive inputs for Pow / Sqrt / Log
    unary = op in ("Sqrt", "Log")
    if unary:
        nodes.append(helper.make_node(op, ["a"], ["y"]))
    else:
        nodes.append(helper.make_node(op, ["a", "c"], ["y"]))
    c = np.array([0.5, 1.5, 2.0], np.float32).reshape(3, 1, 1)
    m = _model(nodes, {"x": [1, 3, 4, 5]}, ["y"], {"c": c} if not unary else {})
    err, data = _compare(m)
    assert err <= TOL
    assert count_transposes(data) == 0


# -- float16 weights -----------------------------------------------------------------------
def _tensor_types(data: bytes) -> dict[str, str]:
    """tflite tensor name -> type name (FLOAT32, FLOAT16, INT32, ...)."""
    from ai_edge_litert import schema_py_generated as S

    names = {v: k for k, v in vars(S.TensorType).items() if not k.startswith("_")}
    m = S.ModelT.InitFromPackedBuf(data, 0)
    return {t.name.decode(): names[t.type] for t in m.subgraphs[0].tensors}


def _buffer_bytes(data: bytes) -> int:
    from ai_edge_litert import schema_py_generated as S

    m = S.ModelT.InitFromPackedBuf(data, 0)
    return sum(0 if b.data is None else len(b.data) for b in m.buffers)


def _io_types(data: bytes) -> list[Any]:
    it = Interpreter(model_content=data)
    return [d["dtype"] for d in [*it.get_input_details(), *it.get_output_details()]]


@pytest.mark.parametrize("name", _E2E)
def test_end_to_end_fp16_weights(name: str) -> None:
    model, cnn = _e2e_net(name)
    fp32 = onnx_to_tflite(model)
    fp16 = onnx_to_tflite(model, fp16_weights=True)
    rng = np.random.default_rng(0)
    (vi,) = model.graph.input
    x = rng.standard_normal([d.dim_value for d in vi.type.tensor_type.shape.dim])
    x = x.astype(np.float32)
    (want,) = _run_ort(model, {vi.name: x})
    (got,) = _run_tflite(fp16, [_nhwc(x)])
    want, got = _nhwc(want).ravel().astype(np.float64), got.ravel().astype(np.float64)
    cos = float(want @ got / (np.linalg.norm(want) * np.linalg.norm(got)))
    err = _rel(want, got)
    ratio, w_ratio = len(fp16) / len(fp32), _buffer_bytes(fp16) / _buffer_bytes(fp32)
    ops, ops32 = count_ops(fp16), count_ops(fp32)
    print(
        f"{name}: size {len(fp32)} -> {len(fp16)} B ({ratio:.3f}x, buffers {w_ratio:.3f}x), "
        f"cosine {cos:.7f}, max rel err {err:.2e}, DEQUANTIZE {ops.get('DEQUANTIZE', 0)}"
    )
    assert cos >= 0.9999
    assert err <= 1e-2
    # the weights halve; the file does too where they dominate it (the MLP has 1268 weights,
    # ~5 KB, against ~1.3 KB of fixed flatbuffer structure: its file ratio is ~0.71)
    assert w_ratio <= 0.55
    if _buffer_bytes(fp32) >= 0.9 * len(fp32):  # the SE net's 4-channel squeezes do not
        assert ratio <= 0.55
    n_weights = sum(ops.get(k, 0) for k in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"))
    assert ops.get("DEQUANTIZE", 0) >= n_weights > 0
    assert "DEQUANTIZE" not in ops32
    assert {k: v for k, v in ops.items() if k != "DEQUANTIZE"} == ops32
    assert ops.get("TRANSPOSE", 0) == (0 if cnn else ops32.get("TRANSPOSE", 0))
    assert all(t == np.float32 for t in _io_types(fp16))


def test_fp16_weight_beyond_float16_range_stays_float32() -> None:
    rng = np.random.default_rng(8)
    big = _w(rng, 4, 3, 3, 3)
    big[1, 2, 0, 0] = 1e6
    nodes = [
        helper.make_node("Conv", ["x", "wb"], ["a"], kernel_shape=[3, 3], pads=[1] * 4),
        helper.make_node("Conv", ["a", "ws"], ["y"], kernel_shape=[3, 3], pads=[1] * 4),
    ]
    inits = {"wb": big, "ws": _w(rng, 5, 4, 3, 3)}
    m = _model(nodes, {"x": [1, 3, 6, 6]}, ["y"], inits)
    err, data = _compare(m, fp16_weights=True)
    types = _tensor_types(data)
    assert types["wb_ohwi"] == "FLOAT32" and "wb_ohwi_fp16" not in types
    assert types["ws_ohwi_fp16"] == "FLOAT16" and types["ws_ohwi"] == "FLOAT32"
    assert count_ops(data)["DEQUANTIZE"] == 3  # ws and both biases
    (got,) = _run_tflite(data, [rng.standard_normal((1, 6, 6, 3)).astype(np.float32)])
    assert np.isfinite(got).all()
    assert err <= 1e-2


def test_fp16_small_and_integer_constants_stay() -> None:
    """Elementwise constants: float16 from FP16_MIN_ELEMENTS elements; small ones, scalars and
    integer tensors (shapes, indices) stay as they are; I/O stays float32."""
    nodes = [
        helper.make_node("Add", ["x", "big"], ["a"]),
        helper.make_node("Mul", ["a", "small"], ["b"]),
        helper.make_node("Mul", ["b", "scalar"], ["c"]),
        helper.make_node("Reshape", ["c", "s"], ["y"]),
    ]
    inits = {
        "big": np.linspace(-2, 2, 4 * 5 * 3, dtype=np.float32).reshape(3, 4, 5),
        "small": np.array([0.5, 1.5, 2.0], np.float32).reshape(3, 1, 1),
        "scalar": np.array(3.0, np.float32),
        "s": np.array([1, 60], np.int64),
    }
    m = _model(nodes, {"x": [1, 3, 4, 5]}, ["y"], inits)
    err, data = _compare(m, fp16_weights=True)
    assert err <= 1e-3
    types = _tensor_types(data)
    assert [k for k, v in types.items() if v == "FLOAT16"] == ["big@4_fp16"]
    assert count_ops(data)["DEQUANTIZE"] == 1
    assert types["small@4"] == "FLOAT32" and types["scalar@4"] == "FLOAT32"
    assert "INT32" in types.values() and "INT64" not in types.values()
    assert all(t == np.float32 for t in _io_types(data))
    assert "DEQUANTIZE" not in count_ops(onnx_to_tflite(m))
