"""The converter on models shaped like real exports (converters/standins.py): a YOLOv8-style
detector whose one output concatenates pixel boxes with [0, 1] scores, an SVTR-style CTC
recognizer, a DB-style probability map. Judged on the task metric, against fp32; and the
determinism rule (the same model, data and profile give the same bytes)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from converters.task import infer_task, model_metadata, task_fidelity

pytestmark = pytest.mark.slow

FAST = ("--latency-seconds", "0.2")


def _outputs(path: Path, x: np.ndarray) -> list[list[np.ndarray]]:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    runs = [sess.run(None, {name: x[i : i + 1]}) for i in range(len(x))]
    return [[r[k] for r in runs] for k in range(len(runs[0]))]


@pytest.fixture(scope="module")
def yolo(tmp_path_factory: pytest.TempPathFactory, standin_yolo: Any) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("yolo")
    d = standin_yolo
    (root / "yolo.onnx").write_bytes(d.onnx)
    np.save(root / "cal.npy", d.calibration)
    np.savez(root / "eval.npz", x=d.eval_images)
    return {"dir": root, "onnx": root / "yolo.onnx", "cal": root / "cal.npy",
            "eval": root / "eval.npz", "x": d.eval_images, "names": d.names}  # fmt: skip


def test_yolo_stand_in_really_is_hard_for_plain_int8(yolo: dict[str, Any]) -> None:
    """quantize_static's defaults lose the detections (every score under the boxes' scale):
    the stand-in has the property that matters."""
    from onnxruntime.quantization import CalibrationDataReader, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(np.load(yolo["cal"]))

        def get_next(self) -> dict[str, np.ndarray] | None:
            x = next(self.it, None)
            return None if x is None else {"images": x[None]}

    out = yolo["dir"] / "ort-default.onnx"
    quantize_static(str(yolo["onnx"]), str(out), Reader())
    ref, got = _outputs(yolo["onnx"], yolo["x"]), _outputs(out, yolo["x"])
    model = onnx.load(str(yolo["onnx"]))
    task = infer_task(
        [np.concatenate(ref[0])],
        output_names=["output0"],
        metadata=model_metadata(model.metadata_props),
    )
    assert task.kind == "detect" and task.labels == tuple(yolo["names"])
    fid = task_fidelity(task, ref, got)
    assert fid["details"]["detections_original"] >= 64  # the fp32 model does detect
    assert fid["value"] < 0.5, fid


@pytest.mark.parametrize("fmt", ["onnx-int8", "tflite-int8"])
def test_yolo_stand_in_keeps_its_detections(
    cli: Any, yolo: dict[str, Any], tmp_path: Path, fmt: str
) -> None:
    out = tmp_path / ("m.tflite" if fmt == "tflite-int8" else "m.onnx")
    rep = tmp_path / "r.json"
    r = cli(
        "quantize", yolo["onnx"], "-o", out, "--format", fmt, "--calibration", yolo["cal"],
        "--eval", yolo["eval"], "--report", rep, *FAST,
    )  # fmt: skip
    assert r.code == 0, r.err
    report = json.loads(rep.read_text())
    task = report["fidelity"]["task"]
    assert task["kind"] == "detect" and task["metric"] == "f1"
    assert task["value"] >= 0.95, task
    assert report["budget"]["min_task_metric"] == 0.95 and report["budget"]["task"] == "detect"
    # found from the graph and its ranges, no model-specific list: the output Concat
    reasons = {n["node"]: n["reason"] for n in report["float_nodes"]}
    concat = [n for n in onnx.load(str(yolo["onnx"])).graph.node if n.op_type == "Concat"][-1]
    assert "magnitude" in reasons.get(concat.name, ""), reasons
    assert report["size_bytes"]["ratio"] <= 0.35
    assert "task detect: f1" in r.out


def test_task_floor_and_override_through_the_cli(
    cli: Any, yolo: dict[str, Any], tmp_path: Path
) -> None:
    # --task raw: no task metric; cosine alone (the default floor) judges
    rep = tmp_path / "raw.json"
    r = cli(
        "quantize", yolo["onnx"], "-o", tmp_path / "raw.onnx", "--format", "onnx-int8",
        "--calibration", yolo["cal"], "--eval", yolo["eval"], "--task", "raw",
        "--report", rep, *FAST,
    )  # fmt: skip
    assert r.code == 0, r.err
    raw = json.loads(rep.read_text())
    assert raw["fidelity"]["task"]["value"] is None and raw["budget"]["min_task_metric"] is None
    # an impossible floor: refused as bad input (exit 2) before anything is written
    out = tmp_path / "never.onnx"
    r = cli(
        "quantize", yolo["onnx"], "-o", out, "--format", "onnx-int8",
        "--calibration", yolo["cal"], "--eval", yolo["eval"], "--min-task-metric", "1.5", *FAST,
    )  # fmt: skip
    assert r.code == 2 and "--min-task-metric 1.5" in r.err
    assert not out.exists()


def test_yolo_bundle_carries_the_detection_postprocessing(
    cli: Any, yolo: dict[str, Any], keys: tuple[Path, Path], tmp_path: Path
) -> None:
    from edge_agent.model.bundle import verify_bundle
    from edge_agent.model.keys import load_trusted_keys

    out = tmp_path / "yolo.edgebundle"
    r = cli(
        "build", yolo["onnx"], "-o", out, "--profile", "x86-64", "--sign-key", keys[0],
        "--calibration", yolo["cal"], "--eval", yolo["eval"], *FAST,
    )  # fmt: skip
    assert r.code == 0, r.err
    post = verify_bundle(out, trusted_keys=load_trusted_keys([keys[1]])).manifest["postprocess"]
    assert post["kind"] == "detection" and post["format"] == "yolo"
    assert post["yolo_version"] == 8 and post["output"] == "output0"
    assert post["labels"] == list(yolo["names"])


def test_same_model_data_and_profile_give_the_same_bytes(
    cli: Any, digits: Any, tmp_path: Path
) -> None:
    """Calibration, the schemes, the search and the writer are deterministic: a profile whose
    choice does not depend on timing here (another CPU kind: the first passing scheme in its
    order) gives the same bytes twice, for ONNX and TFLite."""
    for fmt, suffix in (("onnx-int8", ".onnx"), ("tflite-int8", ".tflite")):
        made = []
        for i in range(2):
            out, rep = tmp_path / f"m{i}{suffix}", tmp_path / f"r{i}.json"
            r = cli(
                "quantize", digits.onnx, "-o", out, "--format", fmt,
                "--profile", "jetson-orin-nano", "--calibration", digits.calibration,
                "--eval", digits.eval, "--report", rep, *FAST,
            )  # fmt: skip
            assert r.code == 0, r.err
            made.append((out.read_bytes(), json.loads(rep.read_text())))
        (a, ra), (b, rb) = made
        assert ra["int8_scheme"] == rb["int8_scheme"]
        assert a == b, fmt


def test_schemes_within_the_timing_noise_tie_and_the_smaller_wins() -> None:
    from converters.convert import MAX_TIE_BAND, MIN_TIE_BAND, choose_fastest

    # (size, median ms, noise): the second is 3 % faster, within the 5 % floor: the smaller wins
    assert choose_fastest([(100, 1.00, 0.0), (120, 0.97, 0.0)]) == (0, MIN_TIE_BAND, False)
    # clearly faster (20 %) with quiet timings: it wins despite its size
    assert choose_fastest([(100, 1.00, 0.005), (120, 0.80, 0.005)])[0] == 1
    # the same 20 % inside a noisy measurement (noise 10 % -> band 30 %, capped at 25 %): a tie
    idx, band, capped = choose_fastest([(100, 1.00, 0.10), (120, 0.80, 0.10)])
    assert (idx, band, capped) == (0, MAX_TIE_BAND, True)
    # equal sizes tie-break by the profile's order, whichever ran faster
    assert choose_fastest([(100, 1.00, 0.0), (100, 0.99, 0.0)])[0] == 0
    assert choose_fastest([(100, 0.99, 0.0), (100, 1.00, 0.0)])[0] == 0


def _files(root: Path, d: Any) -> tuple[Path, Path, Path]:
    (root / "m.onnx").write_bytes(d.onnx)
    np.save(root / "cal.npy", d.calibration)
    np.savez(root / "eval.npz", x=d.eval_inputs)
    return root / "m.onnx", root / "cal.npy", root / "eval.npz"


def _quantize(cli: Any, root: Path, d: Any, fmt: str) -> dict[str, Any]:
    """``edge-convert quantize`` on a stand-in with our defaults; its report."""
    src, cal, ev = _files(root, d)
    out, rep = root / ("m.tflite" if fmt == "tflite-int8" else "q.onnx"), root / "r.json"
    r = cli(
        "quantize", src, "-o", out, "--format", fmt, "--calibration", cal, "--eval", ev,
        "--report", rep, *FAST,
    )  # fmt: skip
    assert r.code == 0, r.err
    return dict(json.loads(rep.read_text()))


def test_a_recognizer_bundle_with_a_character_file_reads_text_on_the_device(
    cli: Any,
    standin_svtr: Any,
    keys: tuple[Path, Path],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``edge-convert build rec.onnx --labels keys.txt`` (a character file: one character a
    line, no blank): the bundle's postprocessing reads the CTC output as text, with the blank
    the converter found, and the agent reads the held-out lines with it. A file whose count
    fits no CTC layout is refused, naming the counts; class names (words) ship raw with the
    names, as before."""
    from edge_agent.model.bundle import verify_bundle
    from edge_agent.model.keys import load_trusted_keys
    from edge_agent.model.loader import load_model
    from edge_agent.model.profiles import load_profile

    d = standin_svtr
    src, cal, ev = _files(tmp_path, d)
    chars = tmp_path / "keys.txt"
    chars.write_text("\n".join(d.charset) + "\n")
    out = tmp_path / "rec.edgebundle"
    r = cli(
        "build", src, "-o", out, "--profile", "x86-64", "--sign-key", keys[0],
        "--calibration", cal, "--eval", ev, "--labels", chars, *FAST,
    )  # fmt: skip
    assert r.code == 0, r.err
    model = load_model(out, profile=load_profile("x86-64"), state_dir=tmp_path / "state",
                       trusted_keys=load_trusted_keys([keys[1]]))  # fmt: skip
    try:
        spec = model.postprocessor.spec
        assert (spec.kind, spec.blank, spec.labels) == ("text", 0, ("", *d.charset))
        read = []
        for x in d.eval_inputs[:32]:
            image = np.clip(x.transpose(1, 2, 0)[:, :, ::-1] * 255 + 0.5, 0, 255)
            feeds, geometry = model.prepare_image(np.ascontiguousarray(image.astype(np.uint8)))
            read.append(model.postprocessor(model.infer(feeds), geometry=geometry)["text"])
    finally:
        model.close()
    assert np.mean([t == want for t, want in zip(read, d.eval_texts)]) >= 0.9
    chars.write_text("\n".join(d.charset[:-3]) + "\n")
    r = cli(
        "build", src, "-o", tmp_path / "bad.edgebundle", "--profile", "x86-64",
        "--sign-key", keys[0], "--calibration", cal, "--labels", chars, *FAST,
    )  # fmt: skip
    assert r.code != 0 and "--labels has 17 lines for the 21 classes" in r.err
    chars.write_text("".join(f"class{i}\n" for i in range(21)) + " \n")  # class names
    words = tmp_path / "words.edgebundle"
    r = cli(
        "build", src, "-o", words, "--profile", "x86-64", "--sign-key", keys[0],
        "--calibration", cal, "--labels", chars, *FAST,
    )  # fmt: skip
    assert r.code == 0, r.err  # as before: raw, with the names (the space line is none)
    post = verify_bundle(words, trusted_keys=load_trusted_keys([keys[1]])).manifest["postprocess"]
    assert post == {"kind": "raw", "labels": [f"class{i}" for i in range(21)]}
    # the dictionary in the file (RapidOCR's ``character``) serves without --labels; one of
    # another count ships raw, with a warning naming where it came from
    for dictionary, bundle in ((d.charset, "own.edgebundle"), (d.charset[:-3], "bad2.edgebundle")):
        m = onnx.load_from_string(d.onnx)
        onnx.helper.set_model_props(m, {"character": "\n".join(dictionary)})
        onnx.save(m, str(src))
        r = cli(
            "build", src, "-o", tmp_path / bundle, "--profile", "x86-64",
            "--sign-key", keys[0], "--calibration", cal, *FAST,
        )  # fmt: skip
        assert r.code == 0, r.err
        post = verify_bundle(tmp_path / bundle, trusted_keys=load_trusted_keys([keys[1]]))
        text = post.manifest["postprocess"]
        if dictionary == d.charset:
            assert (text["kind"], text["blank"], text["labels"]) == ("text", 0, ["", *d.charset])
        else:
            assert text == {"kind": "raw"}
            assert "the model's dictionary (metadata 'character') has 17 lines" in caplog.text


@pytest.mark.parametrize("fmt", ["onnx-int8", "tflite-int8"])
def test_svtr_stand_in_keeps_its_readings(
    cli: Any, standin_svtr: Any, tmp_path: Path, fmt: str
) -> None:
    """Attention blocks (MatMul of two activations, LayerNorm, GELU) and a CTC head: judged on
    the greedy-decoded sequences, not on tensor cosine."""
    report = _quantize(cli, tmp_path, standin_svtr, fmt)
    task = report["fidelity"]["task"]
    assert task["kind"] == "ctc" and task["details"]["blank"] == 0  # the CTC blank the model has
    assert task["value"] >= 0.97 and task["details"]["cer"] <= 0.01, task
    assert report["size_bytes"]["ratio"] <= 0.40
    # every scheme that met the budget also tried its speed point (the unweighted ops float:
    # softmax, GELU, layer norm, the attention products); only the weights are int8 there, so
    # it is hardly larger than the budget point
    for scheme in {c["scheme"] for c in report["candidates"] if c["passed"]}:
        points = [s for s in report["search"] if s["scheme"] == scheme]
        budget = min(
            (s for s in points if s["purpose"] == "budget" and s["passed"]),
            key=lambda s: s["float_nodes"],
        )
        (speed,) = [s for s in points if s["purpose"] == "speed"]
        assert speed["float_nodes"] > budget["float_nodes"] + 20, scheme
        assert speed["size_bytes"] <= 1.1 * budget["size_bytes"], scheme
        assert speed["latency_ms"] is not None
    chosen = [s for s in report["search"] if s["chosen"]]
    assert len(chosen) == 1 and chosen[0]["passed"]
    if (report["int8_scheme"] or "").endswith("-qop"):  # a QOperator graph carries its hint
        from edge_agent.model.runtimes.onnx import SESSION_CONFIG_KEY

        meta = {p.key: p.value for p in onnx.load(str(tmp_path / "q.onnx")).metadata_props}
        assert json.loads(meta[SESSION_CONFIG_KEY]) == {"session.disable_quant_qdq": "1"}


@pytest.mark.parametrize("fmt", ["onnx-int8", "tflite-int8"])
def test_db_stand_in_keeps_its_text_map(
    cli: Any, standin_db: Any, tmp_path: Path, fmt: str
) -> None:
    report = _quantize(cli, tmp_path, standin_db, fmt)
    task = report["fidelity"]["task"]
    assert task["kind"] == "mask" and task["metric"] == "iou"
    assert task["value"] >= 0.95 and task["details"]["iou@0.3"] >= 0.95, task
    assert report["size_bytes"]["ratio"] <= 0.40


def test_a_missed_floor_is_searched_until_it_holds(
    cli: Any, standin_svtr: Any, tmp_path: Path
) -> None:
    """A floor the plain int8 model misses (a cosine of 0.99999 here): the ranked search keeps
    units in float until it holds, with the fewest units, and lists the trade-off it explored."""
    src, cal, ev = _files(tmp_path, standin_svtr)
    rep = tmp_path / "r.json"
    r = cli(
        "quantize", src, "-o", tmp_path / "q.onnx", "--format", "onnx-int8",
        "--scheme", "s8s8-qdq", "--calibration", cal, "--eval", ev, "--min-cosine", "0.99999",
        "--report", rep, *FAST,
    )  # fmt: skip
    assert r.code == 0, r.err
    report = json.loads(rep.read_text())
    search = report["search"]
    assert len(search) >= 3 and not search[0]["passed"] and search[0]["float_nodes"] == 0
    chosen = [s for s in search if s["chosen"]]
    assert len(chosen) == 1 and chosen[0]["passed"]
    # the search found the fewest units that pass: every budget point with fewer float nodes
    # failed; what is kept is that point, or its speed point (more in float, timed faster)
    budget = [s for s in search if s["purpose"] == "budget"]
    found = min((s for s in budget if s["passed"]), key=lambda s: s["float_nodes"])
    assert all(not s["passed"] for s in budget if s["float_nodes"] < found["float_nodes"])
    assert chosen[0] == found or (
        chosen[0]["purpose"] == "speed" and chosen[0]["float_nodes"] > found["float_nodes"]
    )
    assert all(s["size_bytes"] > 0 and s["latency_ms"] is not None for s in search)
    assert report["fidelity"]["cosine"] >= 0.99999
    assert "float-fallback search" in r.out
