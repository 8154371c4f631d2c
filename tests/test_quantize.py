"""Quantization and validation on real models built here, through the real CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from converters import zoo
from converters.canonical import canonicalize

FAST = ("--latency-seconds", "0.2")
REPORT_KEYS = (
    "format",
    "output",
    "size_bytes.original",
    "size_bytes.converted",
    "latency_ms.original",
    "latency_ms.converted",
    "fidelity.cosine",
    "fidelity.top1_agreement",
    "fidelity.max_abs_error",
    "accuracy.original",
    "accuracy.converted",
    "float_nodes",
)


def _get(report: dict[str, Any], dotted: str) -> Any:
    node: Any = report
    for part in dotted.split("."):
        assert part in node, f"report lacks {dotted}"
        node = node[part]
    return node


def _run(path: Path, x: np.ndarray) -> list[np.ndarray]:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})


def _op_types(path: Path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path)).graph.node}


@pytest.fixture(scope="module")
def convnets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("nets")
    nets = {
        "resnet": zoo.resnet_style(width=16),
        "mobilenet": zoo.mobilenet_v2_style(width_mult=0.35, classes=10, grouped=True),
    }
    out = {}
    for name, net in nets.items():
        out[name] = root / f"{name}.onnx"
        out[name].write_bytes(zoo.export_onnx(net, (1, 3, 64, 64)))
    out["resnet11"] = root / "resnet11.onnx"
    out["resnet11"].write_bytes(zoo.export_onnx(nets["resnet"], (1, 3, 64, 64), opset=11))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet", "mobilenet"])
def test_int8_conv_nets_with_bn_residuals_depthwise_grouped(
    cli: Any, convnets: dict[str, Path], image_calibration: Path, tmp_path: Path, name: str
) -> None:
    out, report_path = tmp_path / "int8.onnx", tmp_path / "report.json"
    r = cli(
        "quantize", convnets[name], "-o", out, "--format", "onnx-int8",
        "--calibration", image_calibration, "--report", report_path, *FAST,
    )  # fmt: skip
    assert r.code == 0, r.err
    report = json.loads(report_path.read_text())
    for key in REPORT_KEYS:
        _get(report, key)
    assert report["format"] == "onnx-int8" and report["output"] == str(out)
    assert report["profile"].startswith("host-")
    assert report["fidelity"]["cosine"] >= 0.99
    assert report["fidelity"]["top1_agreement"] >= 0.9
    assert report["size_bytes"]["converted"] < 0.45 * report["size_bytes"]["original"]
    assert report["accuracy"]["original"] is None  # no labels given
    # every weighted op in int8; the nodes without weights may stay float where the speed point
    # (converters.convert._with_budget) measured that faster on this CPU
    assert only_speed_floats(report), report["float_nodes"]
    assert len(report["candidates"]) >= 2 and sum(c["chosen"] for c in report["candidates"]) == 1
    ops = _op_types(out)
    assert ops & {"QLinearConv", "QuantizeLinear", "ConvInteger"}, ops
    x = np.random.default_rng(1).standard_normal((1, 3, 64, 64)).astype(np.float32)
    ref, got = _run(convnets[name], x)[0], _run(out, x)[0]
    cos = float(np.dot(ref.ravel(), got.ravel()) / np.linalg.norm(ref) / np.linalg.norm(got))
    assert got.shape == ref.shape and cos > 0.98
    assert "int8 schemes tried" in r.out


@pytest.mark.slow
def test_opset11_fused_bn_model_where_plain_per_channel_quantize_static_breaks(
    cli: Any, convnets: dict[str, Path], image_calibration: Path, tmp_path: Path
) -> None:
    from onnxruntime.quantization import CalibrationDataReader, quantize_static

    src = convnets["resnet11"]
    model = onnx.load(str(src))
    assert model.opset_import[0].version == 11
    assert "BatchNormalization" not in _op_types(src)  # the exporter fused it

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            x = np.load(image_calibration)["x"][:4]
            self.items = iter([{"input": x[i : i + 1]} for i in range(len(x))])

        def get_next(self) -> Any:
            return next(self.items, None)

    plain = tmp_path / "plain.onnx"
    broken = False
    try:
        quantize_static(str(src), str(plain), Reader(), per_channel=True)
        ort.InferenceSession(str(plain), providers=["CPUExecutionProvider"])
    except Exception:
        broken = True
    assert broken, "plain per-channel quantize_static was expected to fail on opset 11"

    out, rep = tmp_path / "ours.onnx", tmp_path / "r.json"
    r = cli(
        "quantize", src, "-o", out, "--format", "onnx-int8", "--calibration", image_calibration,
        "--report", rep, *FAST,
    )  # fmt: skip
    assert r.code == 0, r.err
    report = json.loads(rep.read_text())
    assert report["canonical"]["original_opset"] == 11 and report["canonical"]["opset"] >= 13
    assert report["fidelity"]["cosine"] >= 0.99
    _run(out, np.zeros((1, 3, 64, 64), np.float32))


@pytest.mark.slow
def test_digits_cnn_int8_accuracy_within_half_a_point(
    cli: Any, digits: Any, tmp_path: Path
) -> None:
    out, rep = tmp_path / "d8.onnx", tmp_path / "r.json"
    r = cli(
        "quantize", digits.onnx11, "-o", out, "--format", "onnx-int8",
        "--calibration", digits.calibration, "--eval", digits.eval,
        "--max-accuracy-drop", "0.5", "--report", rep, *FAST,
    )  # fmt: skip
    assert r.code == 0, r.err
    report = json.loads(rep.read_text())
    acc = report["accuracy"]
    assert acc["original"] == pytest.approx(digits.torch_accuracy, abs=0.01)
    assert acc["original"] > 90
    assert acc["original"] - acc["converted"] <= 0.5
    # The budget is accuracy; which passing scheme wins is a timing race. On this AVX2 EPYC the
    # fastest is sometimes s8s8-qdq, which agrees with fp32 on 98.1 % of these digits (and scored
    # 99.26 % against the original's 98.33 %): int8 noise flips borderline samples both ways.
    assert report["fidelity"]["top1_agreement"] >= 0.97
    assert report["budget"]["max_accuracy_drop"] == 0.5
    assert "accuracy %" in r.out  # the summary table


@pytest.mark.parametrize("fmt", ["onnx-fp32", "onnx-fp16", "onnx-int8-dynamic"])
def test_other_formats_validate_and_run(cli: Any, digits: Any, tmp_path: Path, fmt: str) -> None:
    out, rep = tmp_path / "m.onnx", tmp_path / "r.json"
    r = cli(
        "quantize", digits.onnx, "-o", out, "--format", fmt, "--eval", digits.eval,
        "--report", rep, *FAST,
    )  # fmt: skip
    assert r.code == 0, r.err
    report = json.loads(rep.read_text())
    assert report["format"] == fmt
    assert report["fidelity"]["cosine"] >= 0.99
    assert report["accuracy"]["converted"] > 90
    if fmt == "onnx-fp16":
        assert report["size_bytes"]["converted"] < 0.6 * report["size_bytes"]["original"]
        types = {i.data_type for i in onnx.load(str(out)).graph.initializer}
        assert TensorProto.FLOAT16 in types
    if fmt == "onnx-int8-dynamic":
        assert _op_types(out) & {"DynamicQuantizeLinear", "MatMulInteger", "ConvInteger"}


def _outlier_model(path: Path) -> None:
    """conv0 -> conv1 -> conv2 -> relu -> conv3, where conv1 puts one channel 500x larger than
    the rest and conv2 scales it back: per-tensor int8 on conv1's output crushes the other
    channels, so conv1/conv2 must stay float; conv0 and conv3 quantize fine. 32 channels wide,
    so that the int8 convs save more than the Q/DQ nodes cost (a mix no smaller and no faster
    than fp32 is refused)."""
    rng = np.random.default_rng(0)
    w0 = rng.standard_normal((32, 3, 3, 3)).astype(np.float32) * 0.3
    w1 = rng.standard_normal((32, 32, 3, 3)).astype(np.float32) * 0.1
    w1[0] *= 500.0
    w2 = rng.standard_normal((32, 32, 1, 1)).astype(np.float32) * 0.15
    w2[:, 0] /= 500.0
    w3 = rng.standard_normal((4, 32, 3, 3)).astype(np.float32) * 0.1
    inits = [numpy_helper.from_array(w, f"w{i}") for i, w in enumerate((w0, w1, w2, w3))]
    nodes = [
        helper.make_node("Conv", ["x", "w0"], ["a"], name="conv0", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["a", "w1"], ["b"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["b", "w2"], ["c"], name="conv2"),
        helper.make_node("Relu", ["c"], ["d"], name="relu"),
        helper.make_node("Conv", ["d", "w3"], ["y"], name="conv3", pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(
        nodes,
        "outlier",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 16, 16])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path))  # IR 14 from onnx 1.23: the converter must cope


def test_budget_keeps_sensitive_nodes_in_float(cli: Any, tmp_path: Path) -> None:
    src = tmp_path / "outlier.onnx"
    _outlier_model(src)
    cal = tmp_path / "cal.npz"
    np.savez(cal, x=np.random.default_rng(1).standard_normal((30, 3, 16, 16)).astype(np.float32))
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    r = cli(
        "quantize", src, "-o", out, "--format", "onnx-int8", "--calibration", cal,
        "--scheme", "u8s8-qdq", "--report", rep, *FAST,
    )  # fmt: skip
    assert r.code == 0, r.err
    report = json.loads(rep.read_text())
    floated = {n["node"] for n in report["float_nodes"]}
    assert "conv2" in floated or "conv1" in floated
    assert "conv0" not in floated and "conv3" not in floated
    assert all("noise" in n["reason"] for n in report["float_nodes"])
    assert report["fidelity"]["cosine"] >= 0.99
    assert "kept in float" in r.out
    # With a floor low enough that no fallback is needed, the same scheme is far off:
    # the test model really is hard for int8.
    rep2 = tmp_path / "r2.json"
    r = cli(
        "quantize", src, "-o", tmp_path / "o2.onnx", "--format", "onnx-int8",
        "--calibration", cal, "--scheme", "u8s8-qdq", "--min-cosine=-1", "--report", rep2,
        *FAST,
    )  # fmt: skip
    assert r.code == 0, r.err
    loose = json.loads(rep2.read_text())
    assert only_speed_floats(loose) and loose["fidelity"]["cosine"] < 0.99


def only_speed_floats(report: dict[str, Any]) -> bool:
    """No weighted op kept float: the float nodes (if any) are the speed point's, none of them
    a Conv, Gemm or MatMul."""
    return all(
        n["reason"].startswith("no learned weights: kept float for speed")
        and n["op_type"] not in ("Conv", "ConvTranspose", "Gemm", "MatMul")
        for n in report["float_nodes"]
    )


def test_budget_failure_exits_3_and_writes_nothing(cli: Any, digits: Any, tmp_path: Path) -> None:
    out, rep = tmp_path / "x.onnx", tmp_path / "r.json"
    r = cli(
        "quantize", digits.onnx, "-o", out, "--format", "onnx-int8",
        "--calibration", digits.calibration, "--min-cosine", "0.999999999",
        "--scheme", "u8s8-qop", "--no-float-fallback", "--report", rep, *FAST,
    )  # fmt: skip
    assert r.code == 3
    assert "budget" in r.err and "nothing was written" in r.err
    assert len(r.err.strip().splitlines()) == 1
    assert not out.exists() and not rep.exists()
    assert list(tmp_path.iterdir()) == []


def test_ir14_model_from_new_onnx_is_handled(tmp_path: Path) -> None:
    src = tmp_path / "m.onnx"
    _outlier_model(src)
    assert onnx.load(str(src)).ir_version > 10
    canon = canonicalize(onnx.load(str(src)))
    assert canon.model.ir_version <= 10
    sess = ort.InferenceSession(canon.model.SerializeToString(), providers=["CPUExecutionProvider"])
    (y,) = sess.run(None, {"x": np.zeros((2, 3, 16, 16), np.float32)})
    assert y.shape == (2, 4, 16, 16)


def test_input_shape_fixes_dynamic_dims(cli: Any, tmp_path: Path) -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, "H", "W"])
    w = numpy_helper.from_array(np.ones((3, 1, 3, 3), np.float32) / 9, "w")
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="dw", group=3, pads=[1, 1, 1, 1])
    model = helper.make_model(
        helper.make_graph([node], "g", [x], [y], [w]), opset_imports=[helper.make_opsetid("", 13)]
    )
    model.ir_version = 8
    src = tmp_path / "dyn.onnx"
    onnx.save(model, str(src))
    r = cli("quantize", src, "-o", tmp_path / "o.onnx", "--format", "onnx-fp32", *FAST)
    assert r.code == 2
    assert "--input-shape x=" in r.err and "dynamic dim 'H'" in r.err
    r = cli(
        "quantize", src, "-o", tmp_path / "o.onnx", "--format", "onnx-fp32",
        "--input-shape", "x=1,3,32,32", *FAST,
    )  # fmt: skip
    assert r.code == 0, r.err
    shape = onnx.load(str(tmp_path / "o.onnx")).graph.input[0].type.tensor_type.shape
    assert [d.dim_value for d in shape.dim] == [1, 3, 32, 32]


def test_symbolic_shape_inference_failure_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """When onnxruntime's symbolic inference raises (it asserts on some real Concat patterns),
    canonicalize falls back to onnx's own inference."""
    from onnxruntime.tools import symbolic_shape_infer

    def boom(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("symbolic inference failed")

    monkeypatch.setattr(symbolic_shape_infer.SymbolicShapeInference, "infer_shapes", boom)
    w = numpy_helper.from_array(np.ones((2, 2), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    canon = canonicalize(model)
    assert "shape inference: onnx" in canon.steps


@pytest.fixture(scope="module")
def iris(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    import joblib
    from sklearn.datasets import load_iris
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    root = tmp_path_factory.mktemp("iris")
    x, y = load_iris(return_X_y=True)
    x = x.astype(np.float32)
    idx = np.random.default_rng(0).permutation(len(x))
    tr, te = idx[:100], idx[100:]
    models = {
        "forest": make_pipeline(StandardScaler(), RandomForestClassifier(20, random_state=0)),
        "mlp": make_pipeline(
            StandardScaler(), MLPClassifier((32, 32), max_iter=2000, random_state=0)
        ),
    }
    out: dict[str, Any] = {"eval": root / "eval.npz"}
    np.savez(out["eval"], x=x[te], y=y[te])
    for name, est in models.items():
        est.fit(x[tr], y[tr])
        joblib.dump(est, root / f"{name}.joblib")
        out[name] = (root / f"{name}.joblib", float(np.mean(est.predict(x[te]) == y[te]) * 100))
    return out


@pytest.mark.parametrize(("name", "fmt"), [("forest", "onnx-fp32"), ("mlp", "onnx-int8-dynamic")])
def test_sklearn_iris_pickle_with_trust(
    cli: Any, iris: dict[str, Any], tmp_path: Path, name: str, fmt: str
) -> None:
    path, sk_accuracy = iris[name]
    r = cli("quantize", path, "-o", tmp_path / "m.onnx", "--format", fmt, *FAST)
    assert r.code == 2 and "--trust-pickle" in r.err and not (tmp_path / "m.onnx").exists()
    rep = tmp_path / "r.json"
    r = cli(
        "quantize", path, "--trust-pickle", "-o", tmp_path / "m.onnx", "--format", fmt,
        "--eval", iris["eval"], "--max-accuracy-drop", "2", "--report", rep, *FAST,
    )  # fmt: skip
    assert r.code == 0, r.err
    report = json.loads(rep.read_text())
    assert report["accuracy"]["original"] == pytest.approx(sk_accuracy, abs=0.01)
    assert report["accuracy"]["original"] - report["accuracy"]["converted"] <= 2
    if fmt == "onnx-int8-dynamic":
        assert _op_types(tmp_path / "m.onnx") & {"MatMulInteger", "DynamicQuantizeLinear"}


def test_fp16_keeps_nodes_that_would_overflow_in_float(cli: Any, tmp_path: Path) -> None:
    """An RMS-norm: squaring 300*x overflows fp16 (65504), which a CPU run does not show."""
    nodes = [
        helper.make_node("Mul", ["x", "k"], ["xs"], name="scale"),
        helper.make_node("Mul", ["xs", "xs"], ["sq"], name="square"),
        helper.make_node("ReduceMean", ["sq"], ["ms"], name="mean", axes=[1], keepdims=1),
        helper.make_node("Sqrt", ["ms"], ["rms"], name="sqrt"),
        helper.make_node("Div", ["xs", "rms"], ["y"], name="norm"),
    ]
    graph = helper.make_graph(
        nodes,
        "rms",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16])],
        [numpy_helper.from_array(np.array(300.0, np.float32), "k")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    src, data = tmp_path / "rms.onnx", tmp_path / "x.npz"
    onnx.save(model, str(src))
    np.savez(data, x=np.random.default_rng(0).standard_normal((40, 16)).astype(np.float32))
    rep = tmp_path / "r.json"
    r = cli(
        "quantize", src, "-o", tmp_path / "h.onnx", "--format", "onnx-fp16",
        "--calibration", data, "--report", rep, *FAST,
    )  # fmt: skip
    assert r.code == 0, r.err
    report = json.loads(rep.read_text())
    floated = {n["node"] for n in report["float_nodes"]}
    assert "square" in floated and "scale" not in floated
    assert "65504" in report["float_nodes"][0]["reason"]
    out = onnx.load(str(tmp_path / "h.onnx"))
    square = next(n for n in out.graph.node if n.name == "square")
    producers = {o: n for n in out.graph.node for o in n.output}
    assert producers[square.input[0]].op_type == "Cast"  # fed back to fp32 for this node


def test_regression_output_errors_are_not_hidden_by_cosine() -> None:
    """Per-sample cosine of a 1-value output is always 1: small outputs are compared across
    samples, centred, so a constant prediction scores ~0."""
    from converters.validate import compare_outputs

    ref = [[np.array([[1.0], [2.0], [3.0], [4.0]], np.float32) + 50]]
    constant = [[np.full((4, 1), 52.5, np.float32)]]
    close = [[ref[0][0] + np.float32(0.01)]]
    assert compare_outputs(ref, constant, ["y"])["cosine"] < 0.1
    assert compare_outputs(ref, close, ["y"])["cosine"] > 0.999


def test_data_dependent_output_sizes_do_not_crash() -> None:
    from converters.validate import compare_outputs

    ref = [[np.zeros((5, 2), np.int64), np.zeros((3, 2), np.int64)]]
    got = [[np.zeros((5, 2), np.int64), np.zeros((4, 2), np.int64)]]
    fid = compare_outputs(ref, got, ["dets"])
    assert fid["per_output"][0]["shape_agreement"] == 0.5
    assert fid["per_output"][0]["agreement"] == 0.5


def test_sorted_calibration_data_is_split_by_stride(cli: Any, digits: Any, tmp_path: Path) -> None:
    """Data sorted by class: validation must still see every class (a tail split would not)."""
    with np.load(digits.eval) as d:
        order = np.argsort(d["y"], kind="stable")
        np.savez(tmp_path / "sorted.npz", x=d["x"][order], y=d["y"][order])
    rep = tmp_path / "r.json"
    r = cli(
        "quantize", digits.onnx, "-o", tmp_path / "m.onnx", "--format", "onnx-fp32",
        "--calibration", tmp_path / "sorted.npz", "--report", rep, *FAST,
    )  # fmt: skip
    assert r.code == 0, r.err
    report = json.loads(rep.read_text())
    assert "every 5th sample" in report["validation"]["source"]
    assert report["accuracy"]["original"] > 90  # all ten classes, not just 8 and 9


def test_max_accuracy_drop_on_a_non_classifier_is_refused(cli: Any, tmp_path: Path) -> None:
    src = tmp_path / "outlier.onnx"
    _outlier_model(src)
    data = tmp_path / "d.npz"
    rng = np.random.default_rng(0)
    np.savez(data, x=rng.standard_normal((10, 3, 16, 16)).astype(np.float32), y=np.arange(10))
    r = cli(
        "quantize", src, "-o", tmp_path / "o.onnx", "--format", "onnx-fp32", "--eval", data,
        "--max-accuracy-drop", "1", *FAST,
    )  # fmt: skip
    assert r.code == 2 and "needs a classifier" in r.err and "--min-cosine" in r.err


def test_nan_in_data_and_string_labels_are_bad_input(cli: Any, digits: Any, tmp_path: Path) -> None:
    x = np.zeros((10, 1, 8, 8), np.float32)
    x[3, 0, 2, 2] = np.nan
    np.savez(tmp_path / "nan.npz", x=x)
    r = cli(
        "quantize", digits.onnx, "-o", tmp_path / "m.onnx", "--format", "onnx-fp32",
        "--calibration", tmp_path / "nan.npz", *FAST,
    )  # fmt: skip
    assert r.code == 2 and "sample 3" in r.err and "NaN" in r.err
    np.savez(
        tmp_path / "s.npz", x=np.zeros((4, 1, 8, 8), np.float32), y=np.array(["a", "b", "a", "c"])
    )
    r = cli(
        "quantize", digits.onnx, "-o", tmp_path / "m.onnx", "--format", "onnx-fp32",
        "--eval", tmp_path / "s.npz", *FAST,
    )  # fmt: skip
    assert r.code == 2 and "class indices" in r.err
    assert not (tmp_path / "m.onnx").exists()


def test_fixed_batch_larger_than_one(cli: Any, tmp_path: Path) -> None:
    w = numpy_helper.from_array(np.ones((6, 3), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 3])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    src = tmp_path / "b4.onnx"
    onnx.save(model, str(src))
    np.savez(
        tmp_path / "d.npz", x=np.random.default_rng(0).standard_normal((30, 6)).astype(np.float32)
    )
    r = cli(
        "quantize", src, "-o", tmp_path / "q.onnx", "--format", "onnx-int8",
        "--calibration", tmp_path / "d.npz", *FAST,
    )  # fmt: skip
    assert r.code == 0, r.err
    (y,) = _run(tmp_path / "q.onnx", np.zeros((4, 6), np.float32))
    assert y.shape == (4, 3)


def test_unweighted_nodes_are_the_ones_with_no_learned_weights() -> None:
    """The speed point keeps these in float: not the convolutions and matrix products with
    constant weights, and not a node holding a large constant (a learned position embedding),
    whose int8 copy is what makes the model small."""
    from converters.quantize import unweighted_nodes

    rng = np.random.default_rng(0)

    def const(name: str, *shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)

    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
        helper.make_node("Reshape", ["c", "shape"], ["r"], name="reshape"),
        helper.make_node("Add", ["r", "pos"], ["p"], name="add_pos"),  # 16 x 64 learned
        helper.make_node("MatMul", ["p", "wq"], ["q"], name="matmul_w"),
        helper.make_node("MatMul", ["wk", "p"], ["k"], name="matmul_w_first"),
        helper.make_node("Transpose", ["q"], ["qt"], name="transpose", perm=[1, 0]),
        helper.make_node("MatMul", ["k", "q"], ["s"], name="matmul_act"),  # two activations
        helper.make_node("Mul", ["s", "scale"], ["ss"], name="scale"),
        helper.make_node("Softmax", ["ss"], ["y"], name="softmax"),
    ]
    shape = numpy_helper.from_array(np.array([16, 64], np.int64), "shape")
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 4, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [const("w", 4, 4, 1, 1), shape, const("pos", 16, 64), const("wq", 64, 64),
         const("wk", 16, 16), const("scale")],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert unweighted_nodes(model) == ["reshape", "transpose", "matmul_act", "scale", "softmax"]
