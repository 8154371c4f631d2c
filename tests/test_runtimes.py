"""Both runtimes on real model files: onnxruntime on an ONNX model built with onnx.helper, LiteRT
on .tflite files written from the flatbuffer schema (float, and int8 in/out)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edge_agent.errors import ModelError
from edge_agent.model.runtimes import available_runtimes, load_runtime, warmup
from tests.tflite_models import fully_connected

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


def test_bad_model_files_are_model_errors(tmp_path: Path) -> None:
    (tmp_path / "junk.tflite").write_bytes(b"\x00" * 64)
    (tmp_path / "junk.onnx").write_bytes(b"not onnx")
    for name in ("junk.tflite", "junk.onnx", "missing.onnx", "model.pb"):
        if name == "model.pb":
            (tmp_path / name).write_bytes(b"x")
        with pytest.raises(ModelError, match=name.split(".")[0]):
            load_runtime(tmp_path / name)
