"""Validating TFLite models in the converter: the LiteRT session adapter behind onnxruntime's
interface, on real .tflite files written from the flatbuffer schema (no TensorFlow)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from converters.validate import LiteRTSession, measure_latency, run_all
from edge_agent.errors import ModelError
from tests.tflite_models import fully_connected


def test_litert_session_runs_batches_one_sample_at_a_time(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    w, b = rng.normal(size=(3, 5)).astype(np.float32), rng.normal(size=3).astype(np.float32)
    path = tmp_path / "fc.tflite"
    path.write_bytes(fully_connected(w, b))
    sess = LiteRTSession(
        path,
        inputs=[{"name": "x", "shape": [None, 5]}],
        outputs=[{"name": "y", "shape": [None, 3]}],
    )
    assert [a.name for a in sess.get_inputs()] == ["x"]
    x = rng.normal(size=(7, 5)).astype(np.float32)
    (y,) = sess.run(["y"], {"x": x})
    assert y.shape == (7, 3)
    np.testing.assert_allclose(y, x @ w.T + b, rtol=1e-5, atol=1e-5)
    batches = run_all(sess, [{"x": x[:4]}, {"x": x[4:]}])
    np.testing.assert_allclose(np.concatenate(batches[0]), y, rtol=1e-6)
    lat = measure_latency({"tfl": sess}, {"x": x[:1]}, seconds=0.05, min_runs=5)
    assert lat["tfl"].runs >= 5 and lat["tfl"].median_ms > 0


def test_litert_session_transposes_image_layouts() -> None:
    from edge_agent.model.runtimes import model_to_nchw, nchw_to_model

    x = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)  # NCHW
    nhwc = nchw_to_model(x, [1, 4, 5, 3])
    assert nhwc.shape == (2, 4, 5, 3) and nhwc[1, 2, 3, 0] == x[1, 0, 2, 3]
    back = LiteRTSession._to_onnx(nhwc, [None, 3, 4, 5])
    np.testing.assert_array_equal(back, x)
    np.testing.assert_array_equal(model_to_nchw(nhwc, x.shape), x)
    assert nchw_to_model(x, [1, 3, 4, 5]) is x  # already the model's layout
    assert model_to_nchw(x, x.shape) is x


def test_litert_session_refuses_a_model_that_does_not_match(tmp_path: Path) -> None:
    path = tmp_path / "fc.tflite"
    path.write_bytes(fully_connected(np.eye(2, dtype=np.float32), np.zeros(2, np.float32)))
    with pytest.raises(ModelError, match="1 inputs / 1 outputs, the ONNX model has 2 / 1"):
        LiteRTSession(
            path,
            inputs=[{"name": "a", "shape": [1, 2]}, {"name": "b", "shape": [1, 2]}],
            outputs=[{"name": "y", "shape": [1, 2]}],
        )
    (tmp_path / "bad.tflite").write_bytes(b"not a flatbuffer")
    with pytest.raises(ModelError, match="LiteRT cannot load it"):
        LiteRTSession(tmp_path / "bad.tflite", inputs=[], outputs=[])


def test_quantize_to_tflite_fp32_without_tensorflow(digits: Any, tmp_path: Path) -> None:
    """`edge-convert quantize --format tflite-fp32`: our own flatbuffer writer, validated in
    LiteRT against onnxruntime on the eval data, with the same report keys; no TensorFlow."""
    import json
    import subprocess
    import sys

    out, rep = tmp_path / "digits.tflite", tmp_path / "report.json"
    script = (
        "import sys; from converters.cli import main; code = main(sys.argv[1:]); "
        "assert 'tensorflow' not in sys.modules, 'TensorFlow was imported'; sys.exit(code)"
    )
    run = subprocess.run(
        [sys.executable, "-c", script, "quantize", str(digits.onnx), "-o", str(out),
         "--format", "tflite-fp32", "--eval", str(digits.eval), "--report", str(rep),
         "--latency-seconds", "0.2"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    report = json.loads(rep.read_text())
    assert report["format"] == "tflite-fp32"
    assert report["fidelity"]["cosine"] > 0.9999 and report["fidelity"]["top1_agreement"] == 1.0
    assert report["accuracy"]["converted"] == report["accuracy"]["original"]
    assert report["size_bytes"]["converted"] == out.stat().st_size
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=str(out))
    interp.allocate_tensors()
    assert list(interp.get_input_details()[0]["shape"]) == [1, 8, 8, 1]  # NHWC at the edge
    bad = subprocess.run(
        [sys.executable, "-m", "converters.cli", "quantize", str(digits.onnx),
         "-o", str(tmp_path / "x.onnx"), "--format", "tflite-fp32"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert bad.returncode == 2 and "written as .tflite" in bad.stderr
    assert not (tmp_path / "x.onnx").exists()


def test_quantize_to_tflite_fp16_halves_the_weights(digits: Any, tmp_path: Path) -> None:
    from converters.cli import main as edge_convert

    sizes = {}
    for fmt in ("tflite-fp32", "tflite-fp16"):
        out = tmp_path / f"{fmt}.tflite"
        code = edge_convert(
            ["quantize", str(digits.onnx), "-o", str(out), "--format", fmt, "--eval",
             str(digits.eval), "--report", str(tmp_path / f"{fmt}.json"),
             "--latency-seconds", "0.2"]
        )  # fmt: skip
        assert code == 0
        sizes[fmt] = out.stat().st_size
    import json

    report = json.loads((tmp_path / "tflite-fp16.json").read_text())
    assert report["format"] == "tflite-fp16" and report["fidelity"]["cosine"] > 0.999
    assert report["accuracy"]["converted"] >= report["accuracy"]["original"] - 0.5
    assert sizes["tflite-fp16"] <= 0.55 * sizes["tflite-fp32"]


def test_a_bundle_for_a_raspberry_pi_carries_tflite_int8_and_the_agent_runs_it(
    digits: Any, keys: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`build --profile raspberry-pi-4` makes tflite-int8 (the profile's first format); the
    agent, told it is that Pi, installs the bundle, passes its golden test on the NHWC artifact
    and classifies a digits video with it."""
    import json
    import logging

    from converters.cli import main as edge_convert
    from edge_agent.cli import main as edge_agent
    from tests.fleet import digits_video

    priv, pub = keys
    bundle, rep = tmp_path / "d.edgebundle", tmp_path / "build.json"
    code = edge_convert(
        ["build", str(digits.onnx), "--profile", "raspberry-pi-4", "--profile", "x86-64",
         "--calibration", str(digits.calibration), "--eval", str(digits.eval), "--sign-key",
         str(priv), "-o", str(bundle), "--report", str(rep), "--latency-seconds", "0.2"]
    )  # fmt: skip
    assert code == 0
    report = json.loads(rep.read_text())
    assert report["profiles"]["raspberry-pi-4"]["format"] == "tflite-int8"
    assert report["profiles"]["x86-64"]["format"] == "onnx-int8"
    tfl = next(a for a in report["artifacts"] if a["format"] == "tflite-int8")
    assert tfl["artifact"].endswith(".tflite") and tfl["accuracy"] >= tfl["accuracy_original"] - 0.5
    with np.load(digits.eval) as d:
        x, y = d["x"][:40], d["y"][:40]
    video = digits_video(tmp_path / "v.mp4", x)
    results, summary = tmp_path / "r.jsonl", tmp_path / "s.json"
    caplog.set_level(logging.INFO)
    code = edge_agent(
        ["run", "--model", str(bundle), "--profile", "raspberry-pi-4", "--trusted-key", str(pub),
         "--state-dir", str(tmp_path / "state"), "--source", f"file:{video}",
         "--results", f"jsonl:{results}", "--summary", str(summary)]
    )  # fmt: skip
    assert code == 0
    assert "serving digits 1.0.0 (tflite-int8" in caplog.text
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert len(rows) == 40 and json.loads(summary.read_text())["inference_errors"] == 0
    correct = sum(int(r["output"]["class"] == int(t)) for r, t in zip(rows, y))
    assert correct >= 36, correct  # the video is the 8x8 digits scaled up to 64 px and back
