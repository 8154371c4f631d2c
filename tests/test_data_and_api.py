"""Calibration data forms (npz streamed, image directories with a preprocessing spec),
calibration methods, and the Python API on a torch module."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from converters import zoo
from converters.data import load_dataset
from edge_agent.errors import DataError
from edge_agent.model.preprocess import Preprocessor, PreprocessSpec

SPEC = [{"name": "input", "shape": [None, 3, 32, 32], "dtype": "float32"}]


def _sample_images() -> list[np.ndarray]:
    """scikit-learn's two bundled sample photos (china.jpg, flower.jpg), read with OpenCV."""
    import sklearn.datasets

    folder = Path(sklearn.datasets.__file__).parent / "images"
    images = [cv2.imread(str(p)) for p in sorted(folder.glob("*.jpg"))]
    assert len(images) == 2 and all(i is not None for i in images)
    return images


def test_compressed_npz_is_streamed_in_order_and_matches(tmp_path: Path) -> None:
    x = np.random.default_rng(0).standard_normal((50, 3, 32, 32)).astype(np.float32)
    y = np.arange(50) % 7
    np.savez_compressed(tmp_path / "d.npz", x=x, y=y)
    ds = load_dataset(tmp_path / "d.npz", input_specs=SPEC)
    got = np.concatenate([b["input"] for b in ds.batches(batch=8)])
    np.testing.assert_array_equal(got, x)
    np.testing.assert_array_equal(ds.read_labels(10, 20), y[10:20])
    # Re-reading an earlier range reopens the member instead of failing.
    np.testing.assert_array_equal(next(ds.batches(batch=2, start=3))["input"], x[3:5])
    ds.close()


def test_npz_with_pickled_objects_is_refused(tmp_path: Path) -> None:
    np.savez(tmp_path / "o.npz", x=np.array([{"a": 1}] * 4, dtype=object))
    with pytest.raises(DataError, match="pickle"):
        load_dataset(tmp_path / "o.npz", input_specs=SPEC)


def test_image_directory_with_preprocessing_and_labels(tmp_path: Path) -> None:
    images = _sample_images()
    for label, image in zip(("china", "flower"), images):
        (tmp_path / label).mkdir()
        for i in range(3):
            crop = image[i * 40 : i * 40 + 300, i * 50 : i * 50 + 400]
            assert cv2.imwrite(str(tmp_path / label / f"{i}.png"), crop)
    spec = PreprocessSpec(
        width=32, height=32, resize="letterbox", channels="rgb",
        mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
    )  # fmt: skip
    ds = load_dataset(tmp_path, input_specs=SPEC, preprocess=spec)
    assert len(ds) == 6
    batch = next(ds.batches(batch=6))["input"]
    assert batch.shape == (6, 3, 32, 32) and batch.dtype == np.float32
    np.testing.assert_array_equal(ds.read_labels(), [0, 0, 0, 1, 1, 1])
    # The same spec applied by hand: RGB order, mean/std normalisation, letterbox bars.
    first = cv2.imread(str(tmp_path / "china" / "0.png"))
    one = Preprocessor(spec)(first)
    np.testing.assert_allclose(one[0], batch[0], rtol=1e-6)
    pad = (114 / 255 - 0.485) / 0.229
    assert np.allclose(batch[0, 0, 0, :], pad, atol=1e-5)  # 400x300 -> letterbox rows on top


def test_image_directory_calibration_through_the_cli(cli: Any, tmp_path: Path) -> None:
    images = _sample_images()
    cal = tmp_path / "cal"
    cal.mkdir()
    for i in range(12):
        img = images[i % 2]
        y, x = (i * 23) % 150, (i * 37) % 250
        cv2.imwrite(str(cal / f"{i:02d}.jpg"), img[y : y + 200, x : x + 200])
    src = tmp_path / "net.onnx"
    src.write_bytes(zoo.export_onnx(zoo.resnet_style(width=8), (1, 3, 32, 32)))
    rep = tmp_path / "r.json"
    r = cli(
        "quantize", src, "-o", tmp_path / "q.onnx", "--format", "onnx-int8",
        "--calibration", cal, "--mean", "0.5", "--std", "0.25", "--channels", "bgr",
        "--report", rep, "--latency-seconds", "0.2",
    )  # fmt: skip
    assert r.code == 0, r.err
    report = json.loads(rep.read_text())
    assert "12 images" in report["calibration"]["source"]
    assert report["validation"]["samples"] == 2  # a fifth held out
    assert report["fidelity"]["cosine"] >= 0.99


@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_other_calibration_methods(cli: Any, digits: Any, tmp_path: Path, method: str) -> None:
    rep = tmp_path / "r.json"
    r = cli(
        "quantize", digits.onnx, "-o", tmp_path / "q.onnx", "--format", "onnx-int8",
        "--calibration", digits.calibration, "--eval", digits.eval, "--max-accuracy-drop", "1",
        "--calibration-method", method, "--max-calibration-samples", "64",
        "--report", rep, "--latency-seconds", "0.2",
    )  # fmt: skip
    assert r.code == 0, r.err
    report = json.loads(rep.read_text())
    assert report["calibration"]["method"] == method and report["calibration"]["samples"] == 64
    assert report["accuracy"]["original"] - report["accuracy"]["converted"] <= 1


def test_python_api_quantizes_a_torch_module(tmp_path: Path, digits: Any) -> None:
    from converters.api import quantize

    model, data = zoo.train_digits_cnn(epochs=2)
    out, rep = tmp_path / "m.onnx", tmp_path / "r.json"
    report = quantize(
        model, out, format="onnx-int8", input_shapes={"input": (1, 1, 8, 8)},
        calibration=digits.calibration, eval=digits.eval, report=rep, latency_seconds=0.2,
    )  # fmt: skip
    assert out.exists() and json.loads(rep.read_text())["format"] == "onnx-int8"
    assert report["output"] == str(out)
    assert (
        abs(report["accuracy"]["original"] - zoo.torch_accuracy(model, data.x_test, data.y_test))
        < 0.01
    )
    assert report["fidelity"]["cosine"] >= 0.99
