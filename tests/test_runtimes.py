"""Both runtimes on real model files: onnxruntime on an ONNX model built with onnx.helper, LiteRT
on .tflite files written from the flatbuffer schema (float, and int8 in/out)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edge_agent.errors import ModelError
from edge_agent.model.runtimes import available_runtimes, load_runtime, warmup
from tests.tflite_models import fully_connected, pixel_mean

RNG = np.random.default_rng(0)
W = RNG.standard_normal((3, 4)).astype(np.float32)
B = np.array([0.1, -0.2, 0.3], np.float32)


def _onnx_fc(path: Path) -> None:
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "wt"], ["m"]),
            helper.make_node("Add", ["m", "b"], ["y"]),
        ],
        "fc",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        [numpy_helper.from_array(W.T.copy(), "wt"), numpy_helper.from_array(B, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))


def test_available_runtimes_reports_both() -> None:
    found = available_runtimes()
    assert found["onnxruntime"] and found["litert"]


def test_onnxruntime_runs_and_describes_io(tmp_path: Path) -> None:
    _onnx_fc(tmp_path / "fc.onnx")
    rt = load_runtime(
        tmp_path / "fc.onnx",
        threads=1,
        providers=["TensorrtExecutionProvider", "CPUExecutionProvider"],
    )
    assert rt.name == "onnxruntime" and rt.providers == ["CPUExecutionProvider"]  # type: ignore[attr-defined]
    assert (
        rt.inputs[0].name == "x"
        and rt.inputs[0].shape == (None, 4)
        and rt.inputs[0].dtype == "float32"
    )
    warmup(rt)
    x = RNG.standard_normal((2, 4)).astype(np.float32)
    (y,) = rt.infer({"x": x})
    np.testing.assert_allclose(y, x @ W.T + B, rtol=1e-5, atol=1e-6)


def test_litert_float_model(tmp_path: Path) -> None:
    path = tmp_path / "fc.tflite"
    path.write_bytes(fully_connected(W, B))
    rt = load_runtime(path, threads=2)
    assert rt.name == "litert" and rt.inputs[0].shape == (1, 4) and not rt.inputs[0].quantized
    x = RNG.standard_normal((1, 4)).astype(np.float32)
    (y,) = rt.infer({"x": x})
    np.testing.assert_allclose(y, x @ W.T + B, rtol=1e-5, atol=1e-5)


def test_litert_quantizes_int8_io_for_the_caller(tmp_path: Path) -> None:
    in_q, out_q = (0.05, 3), (0.1, -2)
    path = tmp_path / "fc8.tflite"
    path.write_bytes(fully_connected(W, B, int8_io=(in_q, out_q)))
    rt = load_runtime(path)
    spec_in, spec_out = rt.inputs[0], rt.outputs[0]
    assert spec_in.dtype == "int8" and spec_in.quantized and spec_in.scale == pytest.approx(0.05)
    assert spec_out.zero_point == -2
    x = np.array([[0.5, -1.0, 2.0, 0.25]], np.float32)
    (y,) = rt.infer({"x_int8": x})
    assert y.dtype == np.float32
    xq = np.clip(np.round(x / 0.05) + 3, -128, 127)
    expect = ((xq - 3) * 0.05) @ W.T + B
    np.testing.assert_allclose(y, expect, atol=0.1 + 1e-6)  # one output quantization step


@pytest.mark.parametrize(
    ("dtype", "q", "seen"),
    [
        # MobileNet / SSD quant as TensorFlow and Coral ship them: [-1, 1] in uint8
        ("uint8", (1 / 128, 128), lambda px: (px - 128) / 128),
        # EfficientDet-Lite from Model Maker: zero point 127
        ("uint8", (0.0078125, 127), lambda px: (px - 127) * 0.0078125),
        # a full-integer model with int8 input, calibrated on [0, 1]
        ("int8", (1 / 255, -128), lambda px: px / 255),
        # uint8 with no quantization, cast inside (as some detector exports take it)
        ("uint8", None, lambda px: px),
    ],
)
def test_a_bare_models_quantized_image_input_takes_the_pixels_as_they_are(
    tmp_path: Path, dtype: str, q: tuple[float, int] | None, seen: object
) -> None:
    """A bare TFLite model whose image input is quantized is fed the pixels onto its whole
    integer range (as the TFLite Task Library does), not 0..1 quantized (128..255 there); a
    scaling the user gives wins."""
    from edge_agent.model.loader import load_model
    from edge_agent.model.preprocess import Preprocessor
    from edge_agent.model.profiles import load_profile
    from edge_agent.model.runtimes import quantize

    path = tmp_path / "m.tflite"
    path.write_bytes(pixel_mean(16, dtype, q))
    image = np.random.default_rng(3).integers(0, 256, (16, 16, 3), np.uint8)
    rgb_mean = image[:, :, ::-1].reshape(-1, 3).astype(np.float64).mean(0)
    assert callable(seen)
    tries = [({}, seen(rgb_mean))] + ([({"scale": 1 / 255}, None)] if q is not None else [])
    for overrides, want in tries:
        model = load_model(path, profile=load_profile("x86-64"), state_dir=tmp_path,
                           preprocess_overrides=overrides)  # fmt: skip
        try:
            feeds, _ = model.prepare_image(image)
            # the pixels go in as the input's integers, with no float pass; the user's scaling
            # goes through float and the runtime quantizes it
            assert feeds["image"].dtype == (np.dtype(dtype) if not overrides else np.float32)
            got = np.asarray(model.infer(feeds)[0], np.float64)[0]
            if not overrides:  # the float path (an NCHW input) gives the same integers
                spec, x = model.runtime.inputs[0], Preprocessor(model.preprocessor.spec)(image)
                again = quantize(x, spec) if spec.quantized else x.astype(spec.dtype)
                np.testing.assert_array_equal(again, feeds["image"])
        finally:
            model.close()
        if want is not None:
            np.testing.assert_allclose(got, want, atol=1e-4)
        else:  # the user's 1/255, quantized with the model's own scale and zero point
            assert q is not None
            x = np.clip(
                np.round(image[:, :, ::-1] / 255 / q[0]) + q[1],
                *((0, 255) if dtype == "uint8" else (-128, 127)),
            )
            np.testing.assert_allclose(got, ((x - q[1]) * q[0]).reshape(-1, 3).mean(0), atol=1e-4)


def test_a_tflite_files_metadata_gives_its_float_inputs_normalization(tmp_path: Path) -> None:
    """A float model whose TFLite metadata says (pixel - 127.5) / 127.5 (MediaPipe's and Model
    Maker's float models) is fed [-1, 1]; the same file without metadata gets the default 1/255;
    a scaling the user gives wins over the metadata; a quantized input ignores it."""
    pytest.importorskip("torch")  # converters.standins writes the metadata
    from converters.standins import add_tflite_metadata
    from edge_agent.model.loader import load_model
    from edge_agent.model.profiles import load_profile

    plain = pixel_mean(16, "float32", None)
    image = np.random.default_rng(5).integers(0, 256, (16, 16, 3), np.uint8)
    rgb = image[:, :, ::-1].reshape(-1, 3).astype(np.float64).mean(0)
    mean, std = np.array([123.0, 117.0, 104.0]), np.array([58.0, 57.0, 57.5])
    cases = [
        (add_tflite_metadata(plain, mean=(127.5,), std=(127.5,)), {}, (rgb - 127.5) / 127.5),
        (plain, {}, rgb / 255),
        (add_tflite_metadata(plain, mean=(127.5,), std=(127.5,)), {"scale": 1 / 255}, rgb / 255),
        # per channel, in the model's (RGB) order
        (add_tflite_metadata(plain, mean=tuple(mean), std=tuple(std)), {}, (rgb - mean) / std),
        # a quantized input takes the pixels whatever the metadata says (what it says is the
        # float model's: the quantization already maps it)
        (
            add_tflite_metadata(pixel_mean(16, "uint8", (1 / 128, 128)), mean=(0.0,), std=(1.0,)),
            {},
            (rgb - 128) / 128,
        ),
    ]
    for i, (data, overrides, want) in enumerate(cases):
        path = tmp_path / f"m{i}.tflite"
        path.write_bytes(data)
        model = load_model(path, profile=load_profile("x86-64"), state_dir=tmp_path,
                           preprocess_overrides=overrides)  # fmt: skip
        try:
            got = np.asarray(model.infer(model.prepare_image(image)[0])[0], np.float64)[0]
        finally:
            model.close()
        np.testing.assert_allclose(got, want, atol=1e-4)


def test_a_tflite_classifiers_labels_come_from_its_metadata_when_they_fit(tmp_path: Path) -> None:
    """Labels packed into the file for a [1, C] output make a classifier of it (no --labels);
    a label file of another count does not."""
    pytest.importorskip("torch")
    from converters.standins import add_tflite_metadata
    from edge_agent.model.loader import load_model
    from edge_agent.model.profiles import load_profile

    plain = pixel_mean(16, "float32", None)  # output [1, 3]
    for labels, kind in ((("red", "green", "blue"), "classification"), (("a", "b"), "raw")):
        path = tmp_path / f"c{len(labels)}.tflite"
        path.write_bytes(add_tflite_metadata(plain, label_files={0: ("labels.txt", labels)},
                                             value_labels=False))  # fmt: skip
        model = load_model(path, profile=load_profile("x86-64"), state_dir=tmp_path)
        try:
            assert model.postprocessor.spec.kind == kind
            if kind == "classification":
                assert model.postprocessor.spec.labels == labels
        finally:
            model.close()


def test_an_exporters_metadata_packed_into_a_tflite_file_is_read_as_properties(
    tmp_path: Path,
) -> None:
    """The dict an Ultralytics TFLite export packs into the zip appended to it (JSON in
    ``metadata.json``, or one Python literal in a ``.txt``) is read as ``properties``, with no
    TFLite metadata around it; a label file, a JSON list, code and a file past the size cap
    are not."""
    import json
    import zipfile

    from edge_agent.model.tflite_metadata import MAX_LABEL_FILE, read_metadata

    plain = pixel_mean(16, "float32", None)
    cases = [
        ("metadata.json", json.dumps({"task": "detect", "names": {"0": "a"}, "end2end": True}),
         {"task": "detect", "names": {"0": "a"}, "end2end": True}),
        ("temp_meta.txt", str({"task": "detect", "names": {0: "a"}, "stride": 32}),
         {"task": "detect", "names": {0: "a"}, "stride": 32}),
        ("labels.txt", "person\nbicycle\n", {}),
        ("metadata.json", json.dumps([{"task": "detect"}]), {}),
        ("temp_meta.txt", "{'task': __import__('os').getcwd()}", {}),
        ("metadata.json", json.dumps({"task": "detect", "pad": "x" * MAX_LABEL_FILE}), {}),
    ]  # fmt: skip
    for i, (name, text, expected) in enumerate(cases):
        path = tmp_path / f"m{i}.tflite"
        path.write_bytes(plain)
        with zipfile.ZipFile(path, "a", zipfile.ZIP_DEFLATED) as zf:
            zf.writestr(name, text)
        found = read_metadata(path)
        assert found.properties == expected, name
        assert (found.mean, found.labels) == ((), {})


def test_bad_model_files_are_model_errors(tmp_path: Path) -> None:
    (tmp_path / "junk.tflite").write_bytes(b"\x00" * 64)
    (tmp_path / "junk.onnx").write_bytes(b"not onnx")
    for name in ("junk.tflite", "junk.onnx", "missing.onnx", "model.pb"):
        if name == "model.pb":
            (tmp_path / name).write_bytes(b"x")
        with pytest.raises(ModelError, match=name.split(".")[0]):
            load_runtime(tmp_path / name)


# --- session hints (a QOperator int8 graph asks for onnxruntime's QDQ passes to stay off) ---


def _conv_gelu_conv(path: Path) -> None:
    """x -> Conv -> GELU (PyTorch's Erf form) -> Conv: an int8 graph keeps the GELU in float
    between two QLinearConvs, behind a DequantizeLinear."""
    rng = np.random.default_rng(1)
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Div", ["c1", "sqrt2"], ["d"]),
        helper.make_node("Erf", ["d"], ["e"]),
        helper.make_node("Add", ["e", "one"], ["a"]),
        helper.make_node("Mul", ["c1", "a"], ["m"]),
        helper.make_node("Mul", ["m", "half"], ["g"]),
        helper.make_node("Conv", ["g", "w2"], ["y"], pads=[1, 1, 1, 1]),
    ]
    inits = [
        numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.standard_normal((4, 8, 3, 3)).astype(np.float32), "w2"),
        numpy_helper.from_array(np.array(np.sqrt(2), np.float32), "sqrt2"),
        numpy_helper.from_array(np.array(1.0, np.float32), "one"),
        numpy_helper.from_array(np.array(0.5, np.float32), "half"),
    ]
    graph = helper.make_graph(
        nodes,
        "conv-gelu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 16, 16])],
        inits,
    )
    for n in graph.node:
        n.name = n.output[0]
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


def _kernels(path: Path, **config: str) -> set[str]:
    """The op types onnxruntime runs for ``path``, from its own profile."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.enable_profiling = True
    so.profile_file_prefix = str(path.with_suffix(""))
    so.log_severity_level = 3
    for k, v in config.items():
        so.add_session_config_entry(k, v)
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    sess.run(None, {"x": np.zeros((1, 3, 16, 16), np.float32)})
    events = json.loads(Path(sess.end_profiling()).read_text())
    return {
        e["args"]["op_name"]
        for e in events
        if e.get("cat") == "Node" and "op_name" in e.get("args", {})
    }


def test_a_qoperator_int8_graph_carries_its_session_hint_and_the_device_applies_it(
    tmp_path: Path,
) -> None:
    from converters import quantize as q
    from edge_agent.model.formats import Int8Scheme as Scheme
    from edge_agent.model.runtimes.onnx import SESSION_CONFIG_KEY, open_session

    src = tmp_path / "fp32.onnx"
    _conv_gelu_conv(src)
    rng = np.random.default_rng(2)
    cache = q.calibrate(
        src,
        ({"x": rng.standard_normal((1, 3, 16, 16)).astype(np.float32)} for _ in range(8)),
        method="minmax",
        cache_path=tmp_path / "cal.json",
    )
    gelu = ["d", "e", "a", "m", "g"]
    made = {}
    for graph in ("qop", "qdq"):
        made[graph] = q.quantize_int8_static(
            src, tmp_path / f"{graph}.onnx", scheme=Scheme.parse(f"u8s8-{graph}"),
            cache_path=cache, method="minmax", nodes_to_exclude=gelu,
        )  # fmt: skip
    meta = {p.key: p.value for p in onnx.load(str(made["qop"])).metadata_props}
    assert json.loads(meta[SESSION_CONFIG_KEY]) == {"session.disable_quant_qdq": "1"}
    assert SESSION_CONFIG_KEY not in {p.key for p in onnx.load(str(made["qdq"])).metadata_props}
    # the device's session (and the converter's, the same function) takes the hint ...
    sess = open_session(made["qop"], threads=1)
    assert sess.get_session_options().get_session_config_entry("session.disable_quant_qdq") == "1"
    plain = open_session(made["qdq"], threads=1).get_session_options()
    with pytest.raises(RuntimeError, match="does not have configuration"):
        plain.get_session_config_entry("session.disable_quant_qdq")
    # ... and it matters: with the QDQ passes on, the float GELU behind a DequantizeLinear
    # stays five kernels (Div, Erf, Add, Mul, Mul); with the hint it is one fused Gelu
    assert "Erf" in _kernels(made["qop"]) and "Gelu" not in _kernels(made["qop"])
    hinted = _kernels(made["qop"], **{"session.disable_quant_qdq": "1"})
    assert "Gelu" in hinted and "Erf" not in hinted and "QLinearConv" in hinted


def test_session_hints_are_an_allow_list() -> None:
    from edge_agent.model.runtimes.onnx import SESSION_CONFIG_KEY, session_hints

    asked = {
        "session.disable_quant_qdq": "1",
        "session.load_model_format": "ORT",  # not the model's to choose
        "session.intra_op.allow_spinning": "1",
    }
    assert session_hints({SESSION_CONFIG_KEY: json.dumps(asked)}) == {
        "session.disable_quant_qdq": "1"
    }
    assert session_hints({SESSION_CONFIG_KEY: '{"session.disable_quant_qdq": "yes"}'}) == {}
    assert session_hints({SESSION_CONFIG_KEY: "not json"}) == {}
    assert session_hints({SESSION_CONFIG_KEY: "[1, 2]"}) == {}
    assert session_hints({}) == {}
