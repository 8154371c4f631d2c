"""Pruning (``converters/prune.py``, ``converters/pruning.py``, ``edge-convert prune``): every
pruned graph passes onnx.checker, runs in onnxruntime and in LiteRT (through our TFLite writer)
with its output shapes unchanged; refusals name the node; recovery keeps the digits CNN's
accuracy; magnitude pruning shrinks the compressed model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

from converters import prune as P
from converters.canonical import canonicalize
from edge_agent.errors import ConfigError
from tests.test_tflite_writer import _model, _nhwc, _run_tflite, _w


def _sess(model: onnx.ModelProto) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _flatten_gemm() -> Any:
    import torch

    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(16, 24, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(24 * 4 * 4, 32), torch.nn.ReLU(),
        torch.nn.Linear(32, 5),
    )  # fmt: skip


def _net(name: str) -> onnx.ModelProto:
    pytest.importorskip("torch")
    import torch

    from converters import zoo

    nets: dict[str, tuple[Any, tuple[int, ...]]] = {
        "resnet_residual_adds": (lambda: zoo.resnet_style(width=16), (1, 3, 32, 32)),
        "mobilenet_v2_depthwise": (lambda: zoo.mobilenet_v2_style(width_mult=0.5, classes=10),
                                   (1, 3, 32, 32)),
        "grouped_conv": (lambda: zoo.mobilenet_v2_style(width_mult=0.35, classes=10, grouped=True),
                         (1, 3, 32, 32)),
        "squeeze_excitation": (lambda: zoo.se_hardswish_cnn(), (1, 3, 32, 32)),
        "unet_concat": (lambda: zoo.tiny_unet(width=16), (1, 3, 32, 32)),
        "gap_gemm_head": (lambda: zoo.digits_cnn(), (1, 1, 8, 8)),
        "flatten_into_gemm": (_flatten_gemm, (1, 3, 8, 8)),
        "conv1d_sensor": (lambda: zoo.conv1d_sensor(), (1, 6, 64)),
    }  # fmt: skip
    make, shape = nets[name]
    torch.manual_seed(0)
    raw = onnx.load_from_string(zoo.export_onnx(make(), shape, dynamic_batch=False))
    return canonicalize(raw).model


_NETS = [
    "resnet_residual_adds", "mobilenet_v2_depthwise", "grouped_conv", "squeeze_excitation",
    "unet_concat", "gap_gemm_head", "flatten_into_gemm", "conv1d_sensor",
]  # fmt: skip


@pytest.mark.parametrize("name", _NETS)
def test_pruned_graph_validates_runs_and_keeps_its_output_shape(name: str) -> None:
    from converters.tflite import onnx_to_tflite

    model = _net(name)
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    analysis = P.analyse(model)
    assert analysis.prunable(), analysis.frozen()
    pr = P.prune_channels(model, 0.3, multiple=1)
    onnx.checker.check_model(pr.model, full_check=True)
    (want,) = _sess(model).run(None, {model.graph.input[0].name: x})
    (got,) = _sess(pr.model).run(None, {model.graph.input[0].name: x})
    assert got.shape == want.shape
    assert P.param_count(pr.model) < 0.85 * P.param_count(model)
    assert any(g["kept"] < g["channels"] for g in pr.groups)
    # the output layer's channels are never pruned
    assert any("graph output" in r for f in pr.frozen for r in f["reasons"])
    # and the pruned model converts to TFLite and runs there, matching onnxruntime
    (lite,) = _run_tflite(onnx_to_tflite(pr.model), [_nhwc(x)])
    assert np.abs(lite - _nhwc(got)).max() <= 1e-4 * max(1.0, float(np.abs(got).max()))
    if name == "grouped_conv":  # the grouped conv's channels (and what they tie to) are frozen
        assert any("grouped convolution" in r for f in pr.frozen for r in f["reasons"])
    if name == "squeeze_excitation":  # SE's Mul ties the excitation conv to the block's channels
        groups = [g["producers"] for g in pr.groups]
        assert any(len(p) >= 2 for p in groups), groups


def test_residual_adds_prune_as_one_group() -> None:
    model = _net("resnet_residual_adds")
    a = P.analyse(model)
    sizes = sorted(len(s.producers) for s in a.prunable().values())
    # each stage's downsampling conv and its two blocks' second convs share one channel space
    assert sizes.count(3) == 3, sizes


def test_a_channel_axis_consumed_by_a_reshape_is_frozen_and_named() -> None:
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["a"], kernel_shape=[3, 3], pads=[1] * 4, name="c1"),
        helper.make_node("Relu", ["a"], ["r"], name="relu"),
        helper.make_node("Reshape", ["r", "shape"], ["y"], name="/head/Reshape"),
    ]
    inits = {"w1": _w(rng, 8, 3, 3, 3), "shape": np.array([1, 8, 16], np.int64)}
    model = _model(nodes, {"x": [1, 3, 4, 4]}, ["y"], inits)
    a = P.analyse(model)
    assert not a.prunable()
    (frozen,) = a.frozen()
    assert frozen["producers"] == ["c1"] and "Reshape (node /head/Reshape)" in frozen["reasons"]
    from converters.pruning import PruneOptions, prune_model

    with pytest.raises(ConfigError, match=r"nothing can be pruned structurally.*/head/Reshape"):
        prune_model(model, PruneOptions(structured=0.3, latency_seconds=0.1))


def test_concat_prunes_each_part_and_the_consumer_follows() -> None:
    rng = np.random.default_rng(1)
    nodes = [
        helper.make_node("Conv", ["x", "wa"], ["a"], kernel_shape=[1, 1], name="ca"),
        helper.make_node("Conv", ["x", "wb"], ["b"], kernel_shape=[1, 1], name="cb"),
        helper.make_node("Concat", ["a", "b"], ["c"], axis=1, name="cat"),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Conv", ["r", "wc"], ["y"], kernel_shape=[1, 1], name="cc"),
    ]
    inits = {"wa": _w(rng, 16, 3, 1, 1), "wb": _w(rng, 8, 3, 1, 1), "wc": _w(rng, 4, 24, 1, 1)}
    model = _model(nodes, {"x": [1, 3, 5, 5]}, ["y"], inits)
    pr = P.prune_channels(model, 0.5, multiple=1)
    inits2 = {i.name: i for i in pr.model.graph.initializer}
    assert list(inits2["wa"].dims) == [8, 3, 1, 1] and list(inits2["wb"].dims) == [4, 3, 1, 1]
    assert list(inits2["wc"].dims) == [4, 12, 1, 1]
    # the kept input columns of wc are exactly the kept channels of a, then of b (offset 16)
    wc = onnx.numpy_helper.to_array(inits2["wc"])
    orig = inits["wc"]
    ka, kb = (pr.keep_of["a"], pr.keep_of["b"])
    np.testing.assert_array_equal(wc, orig[:, np.concatenate([ka, 16 + kb])])


def test_digits_cnn_pruned_20_percent_with_recovery_keeps_accuracy(digits: Any) -> None:
    from converters.pruning import PruneOptions, prune_model

    model = onnx.load(str(digits.onnx))
    common = dict(calibration=digits.calibration, eval=digits.eval, latency_seconds=0.2)
    rec = prune_model(model, PruneOptions(structured=0.2, channel_multiple=1, **common))
    raw = prune_model(model, PruneOptions(structured=0.2, channel_multiple=1, recover=False,
                                          **common))  # fmt: skip
    acc = rec.report["accuracy"]
    print(
        f"digits 20%: {acc['original']:.2f} -> no recovery {raw.report['accuracy']['pruned']:.2f}"
        f", recovered {acc['pruned']:.2f}; params x{rec.report['params']['ratio']}"
    )
    assert acc["drop"] <= 1.0
    assert raw.report["accuracy"]["pruned"] < acc["pruned"]  # recovery is what holds it
    assert rec.report["params"]["ratio"] < 0.85
    for key in ("latency_ms", "size_bytes", "params", "layers", "groups", "frozen"):
        assert key in rec.report
    assert rec.report["recovery"].startswith("least squares")


def test_magnitude_pruning_zeroes_by_threshold_and_skips_first_and_last(digits: Any) -> None:
    model = canonicalize(onnx.load(str(digits.onnx))).model
    pruned, layers = P.magnitude_prune(model, 0.5)
    assert layers[0]["skipped"] and layers[-1]["skipped"]
    assert layers[0]["sparsity"] < 0.05 and layers[-1]["sparsity"] < 0.05
    middle = [r for r in layers if not r["skipped"]]
    total = sum(r["params"] * r["sparsity"] for r in middle) / sum(r["params"] for r in middle)
    assert abs(total - 0.5) < 0.01  # one global threshold
    _, rows = P.magnitude_prune(model, 0.5, per_layer=True)
    assert all(abs(r["sparsity"] - 0.5) < 0.01 for r in rows if not r["skipped"])
    gz = P.compressed_size(pruned.SerializeToString())
    assert gz < 0.75 * P.compressed_size(model.SerializeToString())
    with pytest.raises(ConfigError, match="sparsity must be in"):
        P.magnitude_prune(model, 1.0)


def test_prune_cli_writes_model_and_report_and_refuses_cleanly(
    digits: Any, tmp_path: Path, cli: Any
) -> None:
    out, rep = tmp_path / "p.onnx", tmp_path / "r.json"
    r = cli("prune", digits.onnx, "-o", out, "--structured", "0.25", "--unstructured", "0.3",
            "--calibration", digits.calibration, "--eval", digits.eval, "--report", rep,
            "--latency-seconds", "0.2", "--max-accuracy-drop", "2")  # fmt: skip
    assert r.code == 0, r.err
    report = json.loads(rep.read_text())
    assert report["params"]["pruned"] < report["params"]["original"]
    assert report["size_bytes"]["compressed_pruned"] < report["size_bytes"]["compressed_original"]
    assert {"original", "pruned", "ratio"} <= set(report["latency_ms"])
    assert any(layer["sparsity"] > 0.2 for layer in report["layers"])
    assert any("gains no speed" in w for w in report["warnings"])
    onnx.checker.check_model(onnx.load(str(out)))
    assert "latency x" in r.out and "not pruned" in r.out
    # over the budget: exit 3, nothing written
    bad = tmp_path / "bad.onnx"
    r = cli("prune", digits.onnx, "-o", bad, "--structured", "0.9", "--no-recovery", "--eval",
            digits.eval, "--max-accuracy-drop", "0.1", "--latency-seconds", "0.1")  # fmt: skip
    assert r.code == 3 and "nothing was written" in r.err and not bad.exists()
    r = cli("prune", digits.onnx, "-o", bad)
    assert r.code == 2 and "give --structured RATIO" in r.err
    r = cli("prune", digits.onnx, "-o", tmp_path / "x.tflite", "--structured", "0.2")
    assert r.code == 2 and "written as .onnx" in r.err
    r = cli("prune", digits.onnx, "-o", bad, "--target-latency", "0.000001", "--eval",
            digits.eval, "--calibration", digits.calibration,
            "--latency-seconds", "0.1")  # fmt: skip
    assert r.code == 3 and "--target-latency" in r.err and "reaches" in r.err
    assert not bad.exists()


def test_build_prunes_then_quantizes_in_one_command(digits: Any, keys: Any, tmp_path: Path) -> None:
    from converters.cli import main as edge_convert

    out, rep = tmp_path / "b.edgebundle", tmp_path / "b.json"
    code = edge_convert(
        ["build", str(digits.onnx), "--profile", "x86-64", "--prune-structured", "0.2",
         "--calibration", str(digits.calibration), "--eval", str(digits.eval),
         "--max-accuracy-drop", "1.5", "--sign-key", str(keys[0]), "-o", str(out),
         "--report", str(rep), "--latency-seconds", "0.2"]
    )  # fmt: skip
    assert code == 0
    report = json.loads(rep.read_text())
    assert report["pruning"]["params"]["ratio"] < 0.85
    assert report["pruning"]["accuracy"]["drop"] <= 1.5
    (art,) = report["artifacts"]
    assert art["format"] == "onnx-int8" and art["accuracy"] >= art["accuracy_original"] - 1.5


def test_sensitivity_table_and_a_generous_latency_target(digits: Any) -> None:
    from converters.pruning import PruneOptions, _Data, _sensitivity, prune_model

    model = canonicalize(onnx.load(str(digits.onnx))).model
    opts = PruneOptions(target_latency_ms=1000.0, calibration=digits.calibration,
                        eval=digits.eval, latency_seconds=0.1, channel_multiple=1)  # fmt: skip
    table = _sensitivity(P.analyse(model), _Data(model, opts), opts)
    spaces = {r["space"] for r in table}
    assert len(spaces) == 3 and len(table) == 3 * 3
    for s in spaces:
        rows = sorted((r for r in table if r["space"] == s), key=lambda r: r["ratio"])
        assert [r["kept"] for r in rows] == sorted((r["kept"] for r in rows), reverse=True)
        assert rows[-1]["macs_saved"] > rows[0]["macs_saved"] > 0
    res = prune_model(model, opts)  # already under 1 s: nothing pruned
    assert res.report["params"]["ratio"] == 1.0 and len(res.report["sensitivity"]) == 9


def test_target_size_chooses_ratios_by_sensitivity_within_the_budget(
    digits: Any, tmp_path: Path, cli: Any
) -> None:
    out = tmp_path / "s.onnx"
    r = cli("prune", digits.onnx, "-o", out, "--target-size", "60000", "--score", "l2",
            "--calibration", digits.calibration, "--eval", digits.eval,
            "--max-accuracy-drop", "1", "--latency-seconds", "0.1")  # fmt: skip
    assert r.code == 0, r.err
    assert out.stat().st_size <= 60000
    assert onnx.load(str(out)).graph.output[0].type.tensor_type.shape.dim[1].dim_value == 10
    r = cli("prune", digits.onnx, "-o", tmp_path / "t.onnx", "--target-size", "1000",
            "--calibration", digits.calibration, "--eval", digits.eval,
            "--max-accuracy-drop", "1", "--latency-seconds", "0.1")  # fmt: skip
    assert r.code == 3 and "--target-size 1000 bytes" in r.err
    assert not (tmp_path / "t.onnx").exists()


def test_unstructured_can_include_the_first_and_last_layers(digits: Any) -> None:
    model = canonicalize(onnx.load(str(digits.onnx))).model
    _, rows = P.magnitude_prune(model, 0.5, per_layer=True, skip_first_last=False)
    assert all(not r["skipped"] and abs(r["sparsity"] - 0.5) < 0.02 for r in rows)


def test_a_zero_ratio_keeps_every_channel_even_off_the_multiple() -> None:
    assert P._keep_count(20, 0.0, 8) == 20 and P._keep_count(22, 0.3, 8) == 16
    model = _net("gap_gemm_head")
    pr = P.prune_channels(model, {}, multiple=8)
    assert all(g["kept"] == g["channels"] for g in pr.groups)
    assert P.param_count(pr.model) == P.param_count(model)
