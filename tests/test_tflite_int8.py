"""Full-integer TFLite (``converters.tflite_int8``): per operator and end to end, run in LiteRT and
compared with the float ONNX model and with onnxruntime's own int8 (s8s8 QDQ) model made from the
same calibration ranges: the two int8 models must agree with each other."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from ai_edge_litert.interpreter import Interpreter
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from onnx import helper

from converters import quantize as q
from converters.tflite import count_ops, count_transposes, onnx_to_tflite
from converters.tflite_int8 import Int8Config, activation_qparams, load_ranges
from edge_agent.model.formats import Int8Scheme
from tests.test_tflite_writer import _E2E, _e2e_net, _model, _nhwc, _w

HYP = settings(max_examples=12, deadline=None)
_WEIGHT_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "TRANSPOSE_CONV")


def _sess(model: onnx.ModelProto | str) -> ort.InferenceSession:
    """The reference session, with basic optimizations only: the int8 reference is the QDQ
    graph as written. onnxruntime 1.32's extended fusions of it into integer kernels disagree
    with it (a one-output-channel Conv: 66 output steps off the float model where the QDQ
    graph is 1; the grouped MobileNetV2: cosine 0.984 to the TFLite int8 model, 0.9995+ at
    'basic'), so at the default level they are no reference."""
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    src = model if isinstance(model, str) else model.SerializeToString()
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


class Int8Case:
    """A float ONNX model, calibrated once; its TFLite int8 model and onnxruntime's s8s8 QDQ
    model from the same ranges."""

    def __init__(self, model: onnx.ModelProto, tmp: Path, *, n_cal: int = 24, seed: int = 0):
        q.ensure_node_names(model)
        self.model = model
        self.tmp = tmp
        onnx.save(model, str(tmp / "m.onnx"))
        rng = np.random.default_rng(seed)
        inits = {i.name for i in model.graph.initializer}
        self.inputs = {
            vi.name: [d.dim_value or 1 for d in vi.type.tensor_type.shape.dim]
            for vi in model.graph.input
            if vi.name not in inits
        }

        def feed() -> dict[str, np.ndarray]:
            return {k: rng.random(s, dtype=np.float32) for k, s in self.inputs.items()}

        cal = [feed() for _ in range(n_cal)]
        self.test = [feed() for _ in range(8)]
        self.cache = tmp / "cal.json"
        # the test feeds are calibrated on too: the comparisons measure quantization error, not
        # the clipping of a test sample that goes past a range 24 samples happened to see
        q.calibrate(tmp / "m.onnx", cal + self.test, method="minmax", cache_path=self.cache)
        self.ranges = load_ranges(self.cache)
        qdq = q.quantize_int8_static(
            tmp / "m.onnx", tmp / "qdq.onnx", scheme=Int8Scheme.parse("s8s8-qdq"),
            cache_path=self.cache, method="minmax",
        )  # fmt: skip
        self.fp32, self.qdq = _sess(model), _sess(str(qdq))

    def tflite(self, **kw: Any) -> bytes:
        return onnx_to_tflite(self.model, int8=Int8Config(self.ranges, **kw))

    def run(self, data: bytes) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Per test feed: (float ONNX, onnxruntime int8, TFLite int8) of the first output, all
        in the TFLite layout."""
        from edge_agent.model.runtimes.tflite import LiteRTRuntime

        path = self.tmp / "case.tflite"
        path.write_bytes(data)
        rt = LiteRTRuntime(path)  # int8 inputs and outputs quantized as on the device
        rows = []
        for f in self.test:
            # every 4-D input of these models is NHWC in TFLite (a square one is too)
            feeds = {s.name: _nhwc(x) for s, x in zip(rt.inputs, f.values())}
            y = rt.infer(feeds)[0]
            ref = _nhwc(self.fp32.run(None, f)[0])
            rows.append((ref, _nhwc(self.qdq.run(None, f)[0]), y))
        return rows


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    den = float(np.linalg.norm(a) * np.linalg.norm(b))
    return 1.0 if den == 0 else float(a @ b / den)


def _out_scale(case: Int8Case) -> float:
    return activation_qparams(*case.ranges[case.model.graph.output[0].name])[0]


def _weights_are_int8(data: bytes) -> None:
    it = Interpreter(model_content=data)
    kinds = {d["name"]: d for d in it.get_tensor_details()}
    fl = [n for n, d in kinds.items() if d["dtype"] == np.float32 and "/int8" not in n]
    # float32 tensors left: only the model's float inputs and outputs
    io = {d["name"] for d in [*it.get_input_details(), *it.get_output_details()]}
    assert set(fl) <= io, set(fl) - io


# -- operators -----------------------------------------------------------------------------
@HYP
@given(
    cin=st.integers(1, 6),
    cout=st.integers(1, 6),
    k=st.integers(1, 3),
    stride=st.integers(1, 2),
    dil=st.integers(1, 2),
    pads=st.lists(st.integers(0, 1), min_size=4, max_size=4),
    depthwise=st.booleans(),
    relu=st.booleans(),
)
def test_conv_int8_agrees_with_onnxruntime_int8(
    tmp_path_factory: pytest.TempPathFactory,
    cin: int,
    cout: int,
    k: int,
    stride: int,
    dil: int,
    pads: list[int],
    depthwise: bool,
    relu: bool,
) -> None:
    rng = np.random.default_rng(cin * 7 + cout)
    group = cin if depthwise else 1
    n_out = cin * (1 + cout % 2) if depthwise else cout
    attrs = dict(kernel_shape=[k, k], strides=[stride] * 2, dilations=[dil] * 2, pads=pads)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], group=group, **attrs)]
    last = "c"
    if relu:
        nodes.append(helper.make_node("Relu", ["c"], ["r"]))
        last = "r"
    nodes.append(helper.make_node("Add", [last, "x2"], ["y"]))  # an int8 Add after it
    size = 9
    oh, ow = ((size + pads[i] + pads[i + 2] - dil * (k - 1) - 1) // stride + 1 for i in (0, 1))
    inits = {"w": _w(rng, n_out, cin // group, k, k), "b": _w(rng, n_out)}
    inputs = {"x": [1, cin, size, size], "x2": [1, n_out, oh, ow]}
    model = _model(nodes, inputs, ["y"], inits)
    case = Int8Case(model, tmp_path_factory.mktemp("conv"))
    # onnxruntime's QDQ quantizer turns an always-zero tensor (a dead ReLU, range [0, 0]) into a
    # graph whose output is all zeros, so it is no reference there: that case is checked against
    # the float model in test_a_dead_relu_before_an_add_stays_exact
    lo, hi = case.ranges[last]
    assume(hi > lo)
    data = case.tflite()
    ops = count_ops(data)
    assert ops.get("DEPTHWISE_CONV_2D" if depthwise and cin > 1 else "CONV_2D", 0) >= 1
    assert ops.get("DEQUANTIZE") == 1 and ops.get("QUANTIZE") == 2  # only at the edges
    _weights_are_int8(data)
    step = _out_scale(case)
    for ref, qdq, got in case.run(data):
        assert got.shape == ref.shape
        # the same quantization: within 2 steps of onnxruntime's int8, and close to the float
        # model
        assert np.abs(got - qdq).max() <= 2.01 * step
        assert _cos(got, ref) >= 0.99


def test_a_dead_relu_before_an_add_stays_exact(tmp_path: Path) -> None:
    """A conv whose ReLU is always zero (negative weight and bias on inputs in [0, 1]), then an
    Add: the int8 model still gives the other operand, within 2 steps of the float model (the
    example hypothesis found, where onnxruntime's own int8 model outputs zeros)."""
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], kernel_shape=[1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Add", ["r", "x2"], ["y"]),
    ]
    inits = {"w": np.full((1, 1, 1, 1), -1.74, np.float32), "b": np.array([-1.34], np.float32)}
    model = _model(nodes, {"x": [1, 1, 9, 9], "x2": [1, 1, 9, 9]}, ["y"], inits)
    case = Int8Case(model, tmp_path)
    assert case.ranges["r"] == (0.0, 0.0)
    step = _out_scale(case)
    for ref, _qdq, got in case.run(case.tflite()):
        assert np.abs(got - ref).max() <= 2.01 * step
        assert np.abs(ref).max() > 0.5  # the Add's other input really comes through


@HYP
@given(
    op=st.sampled_from(["Add", "Mul", "Sub"]),
    shape_b=st.sampled_from([[1, 4, 5, 6], [1, 4, 1, 1], [6], [1, 1, 5, 1]]),
    const=st.booleans(),
)
def test_broadcast_elementwise_int8(
    tmp_path_factory: pytest.TempPathFactory, op: str, shape_b: list[int], const: bool
) -> None:
    rng = np.random.default_rng(len(shape_b))
    nodes = [helper.make_node(op, ["x", "b"], ["y"])]
    inputs = {"x": [1, 4, 5, 6]}
    inits = {}
    if const:
        inits["b"] = rng.random(shape_b, dtype=np.float32) + 0.5
    else:
        inputs["b"] = shape_b
    case = Int8Case(_model(nodes, inputs, ["y"], inits), tmp_path_factory.mktemp("ew"))
    data = case.tflite()
    assert count_ops(data).get({"Add": "ADD", "Mul": "MUL", "Sub": "SUB"}[op]) == 1
    assert count_transposes(data) == 0
    step = _out_scale(case)
    for ref, qdq, got in case.run(data):
        assert np.abs(got - qdq).max() <= 2.01 * step
        assert np.abs(got - ref).max() <= 3.01 * step


def test_fixed_scale_and_same_scale_ops(tmp_path: Path) -> None:
    """Sigmoid / Softmax get TFLite's fixed output scales; MaxPool, Pad, Resize, Concat keep
    their input's, so they move bytes only."""
    rng = np.random.default_rng(3)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[1, 1]),
        helper.make_node("MaxPool", ["c"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Pad", ["p", "pads"], ["pd"]),
        helper.make_node("Resize", ["pd", "", "sc"], ["rs"], mode="nearest",
                         coordinate_transformation_mode="asymmetric", nearest_mode="floor"),
        helper.make_node("Sigmoid", ["rs"], ["sg"]),
        helper.make_node("Concat", ["rs", "sg"], ["cat"], axis=1),
        helper.make_node("GlobalAveragePool", ["cat"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Softmax", ["f"], ["y"]),
    ]  # fmt: skip
    inits = {
        "w": _w(rng, 4, 3, 1, 1),
        "pads": np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64),
        "sc": np.array([1, 1, 2, 2], np.float32),
    }
    case = Int8Case(_model(nodes, {"x": [1, 3, 8, 8]}, ["y"], inits), tmp_path)
    data = case.tflite()
    it = Interpreter(model_content=data)
    q_of = {d["name"]: d["quantization"] for d in it.get_tensor_details()}
    assert q_of["sg"] == pytest.approx((1 / 256, -128))
    assert q_of["y/int8"] == pytest.approx((1 / 256, -128))
    assert q_of["p"] == q_of["c"] == q_of["pd"] == q_of["rs"]
    ops = count_ops(data)
    assert ops.get("DEQUANTIZE") == 1 and count_transposes(data) == 0
    for ref, qdq, got in case.run(data):
        assert np.abs(got - ref).max() <= 2 / 256 + 1e-6
        assert np.abs(got - qdq).max() <= 2 / 256 + 1e-6


def test_float_fallback_keeps_named_nodes_float_between_dequantize_and_quantize(
    tmp_path: Path,
) -> None:
    rng = np.random.default_rng(4)
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["a"], kernel_shape=[3, 3], pads=[1] * 4, name="c1"),
        helper.make_node("Relu", ["a"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "w2"], ["b"], kernel_shape=[3, 3], pads=[1] * 4, name="c2"),
        helper.make_node("Div", ["b", "d"], ["e"], name="div"),  # no int8 DIV kernel: float
        helper.make_node("Conv", ["e", "w3"], ["y"], kernel_shape=[1, 1], name="c3"),
    ]
    inits = {
        "w1": _w(rng, 4, 3, 3, 3), "w2": _w(rng, 4, 4, 3, 3), "w3": _w(rng, 2, 4, 1, 1),
        "d": np.array(2.0, np.float32),
    }  # fmt: skip
    case = Int8Case(_model(nodes, {"x": [1, 3, 8, 8]}, ["y"], inits), tmp_path)
    base = count_ops(case.tflite())
    assert base["DIV"] == 1 and base["DEQUANTIZE"] == 2 and base["QUANTIZE"] == 2
    data = case.tflite(float_nodes=["c2"])
    ops = count_ops(data)
    # c2 and div are float together: one DEQUANTIZE before c2, one QUANTIZE after div
    assert ops["DEQUANTIZE"] == 2 and ops["QUANTIZE"] == 2 and ops["CONV_2D"] == 3
    it = Interpreter(model_content=data)
    types = {d["name"]: d["dtype"] for d in it.get_tensor_details()}
    assert types["b"] == np.float32 and types["a"] == np.int8 and types["e"] == np.float32
    float_w = [n for n, t in types.items() if t == np.float32 and "w2" in n]
    assert float_w, "c2's weights stay float"
    for ref, _qdq, got in case.run(data):
        assert _cos(ref, got) > 0.999


def test_int8_io_has_int8_inputs_and_outputs_with_their_scales(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[3, 3], pads=[1] * 4)]
    case = Int8Case(_model(nodes, {"x": [1, 3, 8, 8]}, ["y"], {"w": _w(rng, 4, 3, 3, 3)}), tmp_path)
    data = case.tflite(int8_io=True)
    ops = count_ops(data)
    assert "QUANTIZE" not in ops and "DEQUANTIZE" not in ops
    it = Interpreter(model_content=data)
    (i,), (o,) = it.get_input_details(), it.get_output_details()
    assert i["dtype"] == np.int8 and o["dtype"] == np.int8
    assert i["quantization"] == pytest.approx(activation_qparams(*case.ranges["x"]))
    assert o["quantization"] == pytest.approx(activation_qparams(*case.ranges["y"]))
    step = _out_scale(case)
    for ref, _qdq, got in case.run(data):
        assert np.abs(got - ref).max() <= 0.03 * np.abs(ref).max() + 2 * step


# -- end to end ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", _E2E)
def test_end_to_end_int8(name: str, tmp_path: Path) -> None:
    model, cnn = _e2e_net(name)
    case = Int8Case(model, tmp_path)
    fp32 = onnx_to_tflite(model)
    data = case.tflite()
    ops, ops32 = count_ops(data), count_ops(fp32)
    rows = case.run(data)
    c_ref = min(_cos(ref, got) for ref, _q, got in rows)
    c_qdq = min(_cos(qdq, got) for _r, qdq, got in rows)
    top = np.mean([np.argmax(qdq) == np.argmax(got) for _r, qdq, got in rows])
    print(
        f"{name}: int8 {len(data)} B ({len(data) / len(fp32):.3f}x fp32), cosine vs fp32 "
        f"{c_ref:.5f}, vs onnxruntime int8 {c_qdq:.5f}, ops {ops}"
    )
    assert c_ref >= 0.999 and c_qdq >= 0.9995
    if rows[0][0].ndim == 2:
        assert top == 1.0
    _weights_are_int8(data)
    assert ops.get("DEQUANTIZE", 0) == 1  # the float output; nothing inside is float
    # the graph is the float one's, op for op, plus the edges and concat requantizations
    assert {k: v for k, v in ops.items() if k not in ("QUANTIZE", "DEQUANTIZE")} == ops32
    assert count_transposes(data) == (0 if cnn else count_transposes(fp32))
    # int8 weights are a quarter; int32 biases and per-channel scales and (int64) zero points
    # are not (MobileNetV2 at width 0.35: 0.378x)
    assert len(data) <= 0.4 * len(fp32) + 6000


def test_tflite_int8_cli_on_digits_matches_fp32_and_onnx_int8(digits: Any, tmp_path: Path) -> None:
    """`edge-convert quantize --format tflite-int8` on the trained digits CNN: accuracy within
    0.5 points of fp32, top-1 agreement >= 99 %, and >= 99 % agreement with the onnx-int8 model
    made from the same calibration; int8 I/O as well."""
    from converters.cli import main as edge_convert
    from converters.validate import LiteRTSession, class_predictions

    reports = {}
    for fmt, io, out in (
        ("tflite-int8", "float", tmp_path / "d8.tflite"),
        ("tflite-int8", "int8", tmp_path / "d8io.tflite"),
        ("onnx-int8", None, tmp_path / "d8.onnx"),
    ):
        rep = tmp_path / f"{out.stem}.json"
        extra = ["--io-type", io] if io else ["--scheme", "s8s8-qdq"]
        code = edge_convert(
            ["quantize", str(digits.onnx), "-o", str(out), "--format", fmt, "--calibration",
             str(digits.calibration), "--eval", str(digits.eval), "--report", str(rep),
             "--latency-seconds", "0.2", "--max-accuracy-drop", "0.5", *extra]
        )  # fmt: skip
        assert code == 0
        reports[out.name] = json.loads(rep.read_text())
    for name in ("d8.tflite", "d8io.tflite"):
        r = reports[name]
        assert r["format"] == "tflite-int8"
        assert r["accuracy"]["drop"] <= 0.5
        assert r["fidelity"]["top1_agreement"] >= 0.99
        assert r["size_bytes"]["ratio"] < 0.35
        # every weighted op int8 (only the speed point's unweighted ops may be float)
        assert all("no learned weights" in n["reason"] for n in r["float_nodes"])
    it = Interpreter(model_path=str(tmp_path / "d8io.tflite"))
    assert it.get_input_details()[0]["dtype"] == np.int8
    with np.load(digits.eval) as d:
        x = d["x"]
    canon_in = [{"name": "input", "shape": [1, 1, 8, 8]}]
    outs = [{"name": "logits", "shape": [1, 10]}]
    tfl = LiteRTSession(tmp_path / "d8.tflite", inputs=canon_in, outputs=outs)
    onx = _sess(str(tmp_path / "d8.onnx"))
    a = class_predictions([tfl.run(None, {"input": x})[0]])
    b = class_predictions(
        [np.concatenate([onx.run(None, {"input": x[i : i + 1]})[0] for i in range(len(x))])]
    )
    assert a is not None and b is not None
    assert float(np.mean(a == b)) >= 0.99


def test_tflite_int8_needs_calibration_and_int8_io_needs_tflite_int8(
    digits: Any, tmp_path: Path, cli: Any
) -> None:
    r = cli("quantize", digits.onnx, "-o", tmp_path / "x.tflite", "--format", "tflite-int8")
    assert r.code == 2 and "tflite-int8 needs --calibration" in r.err
    r = cli("quantize", digits.onnx, "-o", tmp_path / "x.onnx", "--format", "onnx-fp32",
            "--io-type", "int8")  # fmt: skip
    assert r.code == 2 and "--io-type int8 applies to --format tflite-int8" in r.err
    assert not list(tmp_path.iterdir())


def test_tflite_int8_keeps_the_most_sensitive_nodes_float_to_meet_a_tighter_floor(
    digits: Any, tmp_path: Path
) -> None:
    """The float fallback through the CLI: a cosine floor above what all-int8 reaches keeps the
    nodes ranked most sensitive in float (between DEQUANTIZE and QUANTIZE) until it holds."""
    from converters.cli import main as edge_convert

    def run(*extra: str) -> dict[str, Any]:
        rep = tmp_path / "r.json"
        code = edge_convert(
            ["quantize", str(digits.onnx), "-o", str(tmp_path / "m.tflite"), "--format",
             "tflite-int8", "--calibration", str(digits.calibration), "--eval", str(digits.eval),
             "--report", str(rep), "--latency-seconds", "0.2", *extra]
        )  # fmt: skip
        assert code == 0
        return dict(json.loads(rep.read_text()))

    c0 = run()["fidelity"]["cosine"]
    assert c0 < 0.99999
    floor = c0 + (1 - c0) * 0.3
    r = run("--min-cosine", f"{floor:.7f}")
    assert r["fidelity"]["cosine"] >= floor
    kept = [n["node"] for n in r["float_nodes"]]
    # the ranked nodes; and when the speed point was timed faster, the unweighted ops with them
    ranked = [n for n in r["float_nodes"] if "noise-to-signal" in n["reason"]]
    speed = [n for n in r["float_nodes"] if n not in ranked]
    assert ranked and all("no learned weights" in n["reason"] for n in speed)
    assert all(n["op_type"] not in ("Conv", "Gemm", "MatMul") for n in speed)
    ops = count_ops((tmp_path / "m.tflite").read_bytes())
    assert ops["QUANTIZE"] >= 1 and ops["DEQUANTIZE"] >= 1  # around the float region(s)
    it = Interpreter(model_path=str(tmp_path / "m.tflite"))
    float_convs = [
        d["name"]
        for d in it.get_tensor_details()
        if d["dtype"] == np.float32 and d["name"].endswith("_ohwi")
    ]
    n_convs = sum(n["op_type"] == "Conv" for n in r["float_nodes"])
    assert len(float_convs) == n_convs, (float_convs, kept)  # the kept convs, and only they
