"""Calibration sample layouts: ``(N, *input_shape)`` for a model whose batch is fixed at 1
(each row one full input), ``(N,)`` for one value per sample, and the layouts that are refused:
ambiguous ones naming both readings, and ones that fit no reading."""

from __future__ import annotations

import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from converters.data import load_dataset, split_data
from edge_agent.errors import DataError

FAST = ("--latency-seconds", "0.2")


def _spec(shape: list[int | None]) -> list[dict[str, Any]]:
    return [{"name": "input", "shape": shape, "dtype": "float32"}]


def _samples(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _matmul_model(path: Path, in_shape: list[Any], out_shape: list[Any], k: int, m: int) -> None:
    """x @ w -> Relu, built with onnx.helper (IR 8, opset 13: what onnxruntime here reads)."""
    w = numpy_helper.from_array(_samples(k, m, seed=7), "w")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
            helper.make_node("Relu", ["h"], ["y"], name="relu"),
        ],
        "layouts",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, in_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


@pytest.mark.parametrize("compressed", [False, True])
def test_batch1_full_inputs_in_npz_are_read_in_the_model_layout(
    tmp_path: Path, compressed: bool
) -> None:
    x = _samples(20, 1, 64)
    y = np.arange(20) % 3
    (np.savez_compressed if compressed else np.savez)(tmp_path / "d.npz", x=x, y=y)
    ds = load_dataset(tmp_path / "d.npz", input_specs=_spec([1, 64]))
    assert len(ds) == 20
    assert ds.inputs["input"].read(0, 5).shape == (5, 64)
    batches = list(ds.batches(batch=1))
    assert all(b["input"].shape == (1, 64) for b in batches)  # one model input each
    np.testing.assert_array_equal(np.concatenate([b["input"] for b in batches]), x[:, 0])
    # Out-of-order and non-contiguous reads (the strided hold-out) give the same rows.
    np.testing.assert_array_equal(ds.read_rows([3, 7, 11])["input"], x[[3, 7, 11], 0])
    np.testing.assert_array_equal(ds.read_labels(4, 9), y[4:9])
    ds.close()


def test_multi_dim_batch1_inputs_from_npy(tmp_path: Path) -> None:
    x = _samples(9, 1, 3, 8, 8)
    np.save(tmp_path / "d.npy", x)
    ds = load_dataset(tmp_path / "d.npy", input_specs=_spec([1, 3, 8, 8]))
    got = ds.inputs["input"].read(2, 6)
    assert got.shape == (4, 3, 8, 8)
    np.testing.assert_array_equal(got, x[2:6, 0])
    ds.close()


def test_dynamic_batch_accepts_inputs_saved_with_their_batch_axis(tmp_path: Path) -> None:
    x = _samples(6, 1, 64)
    np.savez(tmp_path / "d.npz", x=x)
    ds = load_dataset(tmp_path / "d.npz", input_specs=_spec([None, 64]))
    np.testing.assert_array_equal(next(ds.batches(batch=6))["input"], x[:, 0])
    ds.close()


def test_the_usual_layout_is_untouched_when_the_batch_is_fixed_at_1(tmp_path: Path) -> None:
    # (N, 1, 8, 8) for a [1, 1, 8, 8] model is N samples of [1, 8, 8] (the channel axis), as before.
    x = _samples(10, 1, 8, 8)
    np.savez(tmp_path / "d.npz", x=x)
    ds = load_dataset(tmp_path / "d.npz", input_specs=_spec([1, 1, 8, 8]))
    assert ds.inputs["input"].read(0, 3).shape == (3, 1, 8, 8)
    ds.close()


def test_batch1_layout_stays_streamed(tmp_path: Path) -> None:
    """A 16 MiB (N, 1, 1024) array, .npy and .npz: opening it and reading a batch allocates
    a small fraction of it (memory-mapped / streamed, not loaded to be reshaped)."""
    x = np.ones((4096, 1, 1024), np.float32)
    np.save(tmp_path / "d.npy", x)
    np.savez(tmp_path / "d.npz", x=x)
    for name in ("d.npy", "d.npz"):
        tracemalloc.start()
        try:
            ds = load_dataset(tmp_path / name, input_specs=_spec([1, 1024]))
            batch = ds.inputs["input"].read(100, 108)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert batch.shape == (8, 1024) and batch.sum() == 8 * 1024
        assert peak < x.nbytes / 8, (name, peak)
        ds.close()


@pytest.mark.parametrize(
    ("shape", "row"),
    [([None, 1], (1,)), ([1, 1], (1,)), ([None, 1, 1], (1, 1)), ([1], ()), ([None], ())],
)
def test_scalar_per_sample(tmp_path: Path, shape: list[int | None], row: tuple[int, ...]) -> None:
    x = np.arange(12, dtype=np.float32)
    np.save(tmp_path / "s.npy", x)
    ds = load_dataset(tmp_path / "s.npy", input_specs=_spec(shape))
    got = ds.inputs["input"].read(3, 7)
    assert got.shape == (4, *row)
    np.testing.assert_array_equal(got.reshape(-1), x[3:7])
    ds.close()


def test_split_data_on_batch1_full_inputs(tmp_path: Path) -> None:
    x = _samples(25, 1, 64)
    np.savez(tmp_path / "cal.npz", x=x)
    split = split_data(
        _spec([1, 64]),
        calibration=tmp_path / "cal.npz",
        eval=None,
        preprocess=None,
        max_calibration_samples=256,
        max_validation_samples=256,
        fixed_batch=1,
    )
    try:
        assert split.calib is not None and len(split.calib) == 20 and len(split.val) == 5
        val = [b["input"] for b in split.val.batches(batch=1)]
        assert all(v.shape == (1, 64) for v in val)
        np.testing.assert_array_equal(np.concatenate(val), x[4::5, 0])  # every 5th held out
        cal = np.concatenate([b["input"] for b in split.calib.batches(batch=1)])
        assert cal.shape == (20, 64)
    finally:
        split.close()


@pytest.mark.parametrize("shape", [[None, None], [1, None], [None, None, 1]])
def test_ambiguous_scalar_layout_is_refused_naming_both_readings(
    tmp_path: Path, shape: list[int | None]
) -> None:
    np.savez(tmp_path / "s.npz", x=np.arange(5, dtype=np.float32))
    with pytest.raises(DataError) as exc:
        load_dataset(tmp_path / "s.npz", input_specs=_spec(shape))
    message = str(exc.value)
    assert "\n" not in message
    assert "input 'input' have shape (5,)" in message
    assert "read as 5 samples of one value or as one sample of 5 values" in message
    assert f"save them as {(5, *[1] * (len(shape) - 1))}" in message


def test_ambiguous_layout_is_refused_by_split_data_too(tmp_path: Path) -> None:
    np.save(tmp_path / "s.npy", np.arange(5, dtype=np.float32))
    with pytest.raises(DataError, match="5 samples of one value or as one sample of 5 values"):
        split_data(
            _spec([None, None]),
            calibration=tmp_path / "s.npy",
            eval=None,
            preprocess=None,
            max_calibration_samples=8,
            max_validation_samples=8,
        )


@pytest.mark.parametrize(
    ("shape", "data", "got"),
    [
        ([1, 64], (10, 2, 64), [None, 2, 64]),  # neither [64] nor [1, 64]
        ([4, 64], (10, 1, 64), [None, 1, 64]),  # batch fixed at 4: a row is not one input
        ([1, 64], (10,), [None]),  # scalars, but the model wants 64 values
        ([1, 3, 8, 8], (10, 1, 3, 8, 4), [None, 1, 3, 8, 4]),
    ],
)
def test_shapes_fitting_no_reading_keep_the_existing_error(
    tmp_path: Path, shape: list[int | None], data: tuple[int, ...], got: list[int | None]
) -> None:
    np.savez(tmp_path / "d.npz", x=np.zeros(data, np.float32))
    want = [None, *shape[1:]]
    with pytest.raises(DataError) as exc:
        load_dataset(tmp_path / "d.npz", input_specs=_spec(shape))
    assert str(exc.value) == (
        f"{tmp_path / 'd.npz'}: samples for input 'input' have shape {got}, but the model "
        f"expects {want}"
    )


def test_quantize_a_batch1_model_calibrated_with_full_inputs(cli: Any, tmp_path: Path) -> None:
    src, out = tmp_path / "m.onnx", tmp_path / "q.onnx"
    _matmul_model(src, [1, 64], [1, 16], 64, 16)
    cal = tmp_path / "cal.npz"
    np.savez(cal, x=_samples(40, 1, 64, seed=1))
    r = cli("quantize", src, "-o", out, "--format", "onnx-int8", "--calibration", cal, *FAST)
    assert r.code == 0, r.err
    assert out.exists()
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert any(n.op_type == "QuantizeLinear" for n in onnx.load(str(out)).graph.node)
    feed = _samples(1, 64, seed=2)
    (y,) = sess.run(None, {"x": feed})
    (ref,) = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).run(
        None, {"x": feed}
    )
    assert y.shape == (1, 16)
    cos = float((y * ref).sum() / (np.linalg.norm(y) * np.linalg.norm(ref) + 1e-12))
    assert cos > 0.95


def test_quantize_a_scalar_input_model_calibrated_with_n_values(cli: Any, tmp_path: Path) -> None:
    src, out = tmp_path / "s.onnx", tmp_path / "qs.onnx"
    _matmul_model(src, ["N", 1], ["N", 8], 1, 8)
    cal = tmp_path / "cal.npy"
    np.save(cal, np.linspace(-2, 2, 30, dtype=np.float32))
    r = cli("quantize", src, "-o", out, "--format", "onnx-int8", "--calibration", cal, *FAST)
    assert r.code == 0, r.err
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (y,) = sess.run(None, {"x": np.array([[0.5], [-1.0]], np.float32)})
    assert y.shape == (2, 8)
