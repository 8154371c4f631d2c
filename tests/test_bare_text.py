"""A bare OCR recognizer as PP-OCR, CRNN and SVTR ship them: one output ``[1, T, C]`` of class
scores a step, read with CTC (postprocess kind ``text``). With ``--labels`` a character file
(one character a line, without the blank, as PP-OCR's dictionaries are written), the agent
reports the text each image spells. The stand-in (``converters.standins.svtr_style``: an
SVTR-shaped recognizer trained briefly with CTC on rendered lines) runs in real onnxruntime,
through ``load_model`` and ``edge-agent run`` on a folder of line images."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from edge_agent.errors import ConfigError, ModelError
from edge_agent.model.agreement import frame_agreement
from edge_agent.model.loader import load_model
from edge_agent.model.postprocess import Postprocessor, PostprocessSpec
from edge_agent.model.profiles import load_profile
from tests.agent_runs import run_bare


def _post(**kw: Any) -> Postprocessor:
    spec = PostprocessSpec(kind="text", labels=("", "a", "b", "c"), **kw)
    return Postprocessor(spec, output_names=("softmax",))


def _steps(classes: list[int], p: float = 0.9, c: int = 4) -> np.ndarray:
    """[1, T, C] probabilities whose best class a step is ``classes``' (scoring ``p``)."""
    out = np.full((1, len(classes), c), (1 - p) / (c - 1), np.float32)
    out[0, np.arange(len(classes)), classes] = p
    return out


def test_text_is_read_as_ctc_greedy_decodes_it() -> None:
    """Best class a step, repeats merged, blanks dropped (a blank between two a's keeps both),
    the score the mean probability of the characters read; [T, 1, C] too; logits with
    softmax; a class without a label reads U+FFFD; another blank; NaN and bad shapes."""
    post = _post()
    out = post([_steps([1, 1, 0, 1, 2, 2, 0, 0, 3])])
    assert out == {"kind": "text", "text": "aabc", "score": 0.9}
    assert post([_steps([1, 1, 0, 1, 2, 2, 0, 0, 3]).transpose(1, 0, 2)])["text"] == "aabc"
    assert post([_steps([0, 0, 0])]) == {"kind": "text", "text": "", "score": 0.0}
    mixed = _steps([1, 2])
    mixed[0, 1, 2] = 0.5
    assert post([mixed])["score"] == pytest.approx(0.7)
    logits = np.log(_steps([3, 0, 1]))
    assert _post(softmax=True)([logits]) == {"kind": "text", "text": "ca", "score": 0.9}
    assert post([_steps([1, 4, 0], c=5)])["text"] == "a\ufffd"
    assert _post(blank=3)([_steps([3, 0, 3, 1])])["text"] == "a"  # class 0 has label ""
    nan = _steps([1, 2])
    nan[0, 0, 0] = np.nan
    assert post([nan])["error"] == "non-finite output"
    with pytest.raises(ModelError, match=r"text output has shape \[2, 3, 4\]"):
        post([np.zeros((2, 3, 4), np.float32)])
    with pytest.raises(ConfigError, match="blank = -1"):
        PostprocessSpec(kind="text", blank=-1)
    same = frame_agreement(post([_steps([1, 2])]), post([_steps([1, 2], p=0.6)]),
                           ref_raw=[], got_raw=[])  # fmt: skip
    differ = frame_agreement(post([_steps([1, 2])]), post([_steps([1, 3])]),
                             ref_raw=[], got_raw=[])  # fmt: skip
    assert (same.metric, same.agrees, differ.agrees) == ("sequence_agreement", True, False)


def _line_image(x: np.ndarray) -> np.ndarray:
    """One [3, 32, W] RGB line in [0, 1] as the BGR uint8 image a camera or a crop gives."""
    return np.ascontiguousarray(
        np.clip(x.transpose(1, 2, 0)[:, :, ::-1] * 255 + 0.5, 0, 255).astype(np.uint8)
    )


def _exact(model: Any, d: Any, n: int = 32) -> float:
    """The share of the first ``n`` held-out lines ``model`` reads exactly, fed as images."""
    read = []
    for x in d.eval_inputs[:n]:
        feeds, geometry = model.prepare_image(_line_image(x))
        read.append(model.postprocessor(model.infer(feeds), geometry=geometry)["text"])
    return float(np.mean([r == t for r, t in zip(read, d.eval_texts)]))


@pytest.fixture(scope="module")
def recognizer(standin_svtr: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    root = tmp_path_factory.mktemp("rec")
    path = root / "svtr_style_rec.onnx"
    path.write_bytes(standin_svtr.onnx)
    chars = root / "keys.txt"  # PP-OCR's dictionary form: one character a line, no blank
    chars.write_text("\n".join(standin_svtr.charset) + "\n")
    return standin_svtr, path, chars


def test_a_bare_recognizer_with_a_character_file_reports_its_text(
    recognizer: Any, tmp_path: Path
) -> None:
    """``load_model(rec.onnx, labels=the file's lines)``: C = N + 1 reads as text, blank
    first; the held-out lines read as they are written. C = N + 2 adds PP-OCR's space last;
    a file of another count leaves it a classifier of its first step, as before."""
    d, path, chars = recognizer
    labels = tuple(chars.read_text().splitlines())
    model = load_model(path, profile=load_profile("x86-64"), state_dir=tmp_path, labels=labels)
    try:
        spec = model.postprocessor.spec
        assert (spec.kind, spec.blank, spec.softmax) == ("text", 0, False)
        assert spec.labels == ("", *d.charset)
        read = []
        for x in d.eval_inputs[:64]:
            feeds, geometry = model.prepare_image(_line_image(x))
            read.append(model.postprocessor(model.infer(feeds), geometry=geometry))
    finally:
        model.close()
    exact = np.mean([r["text"] == t for r, t in zip(read, d.eval_texts)])
    assert exact >= 0.9, exact
    assert all(0.0 < r["score"] <= 1.0 for r in read if r["text"])
    for given, kind, last in ((labels[:-1], "text", " "), (labels[:-3], "classification", None)):
        other = load_model(path, profile=load_profile("x86-64"), state_dir=tmp_path,
                           labels=given)  # fmt: skip
        try:
            assert other.postprocessor.spec.kind == kind
            if last is not None:
                assert other.postprocessor.spec.labels[-1] == last
        finally:
            other.close()


def test_edge_agent_run_reads_a_folder_of_text_lines(recognizer: Any, tmp_path: Path) -> None:
    """As a new user runs it: ``edge-agent run --model rec.onnx --labels keys.txt --source
    images:DIR``: one ``text`` result an image, reading what it shows."""
    d, path, chars = recognizer
    folder = tmp_path / "lines"
    folder.mkdir()
    for i, x in enumerate(d.eval_inputs[:8]):
        assert cv2.imwrite(str(folder / f"line{i}.png"), _line_image(x))
    results = run_bare(path, chars, f"images:{folder}", tmp_path)
    assert [r["output"]["kind"] for r in results] == ["text"] * 8
    texts = [r["output"]["text"] for r in results]
    assert sum(t == want for t, want in zip(texts, d.eval_texts[:8])) >= 7, texts


def test_a_recognizer_of_dynamic_width_takes_the_width_given(
    recognizer: Any, tmp_path: Path
) -> None:
    """PP-OCR's recognizers leave their input's width dynamic (``[-1, 3, 48, -1]``): without a
    width the load says which key to give; ``[preprocess] width`` (``--width``) fills it and the
    lines read; a width the model fixes otherwise is a configuration error."""
    import onnx

    from edge_agent.config import parse_config

    d, path, chars = recognizer
    labels = tuple(chars.read_text().splitlines())
    model = onnx.load(str(path))
    model.graph.input[0].type.tensor_type.shape.dim[3].dim_param = "width"
    model.graph.output[0].type.tensor_type.shape.dim[1].dim_param = "steps"
    dynamic = tmp_path / "rec_dynamic.onnx"
    onnx.save(model, str(dynamic))
    profile = load_profile("x86-64")
    for given in ({}, {"mean": (0.0,)}):  # no size given: the load says which to give
        with pytest.raises(ConfigError, match=r"\[preprocess\] width / height \(--width"):
            load_model(dynamic, profile=profile, state_dir=tmp_path, labels=labels,
                       preprocess_overrides=given)  # fmt: skip

    overrides = parse_config({"preprocess": {"width": d.width}}).preprocess.overrides()
    assert overrides == {"width": d.width}
    loaded = load_model(dynamic, profile=profile, state_dir=tmp_path, labels=labels,
                        preprocess_overrides=overrides)  # fmt: skip
    try:
        assert loaded.postprocessor.spec.kind == "text"
        assert loaded.preprocessor is not None and loaded.preprocessor.spec.width == d.width
        feeds, geometry = loaded.prepare_image(_line_image(d.eval_inputs[0]))
        out = loaded.postprocessor(loaded.infer(feeds), geometry=geometry)
        assert out["text"] == d.eval_texts[0]
    finally:
        loaded.close()
    with pytest.raises(ConfigError, match=r"width = 100: the model's input .* fixes it at 128"):
        load_model(path, profile=profile, state_dir=tmp_path, labels=labels,
                   preprocess_overrides={"width": 100})  # fmt: skip


def test_a_tflite_input_of_dynamic_width_is_resized_to_the_width_given(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A TFLite input whose width is -1 in its shape signature: the interpreter is resized to
    ``[preprocess] width`` (and back when fed another width), and reads the whole image.
    Without a width (and not read as text) the load warns which key to give, and the model
    takes no images."""
    from tests.tflite_models import pixel_mean

    path = tmp_path / "dynamic.tflite"
    path.write_bytes(pixel_mean(16, "float32", None, dynamic_width=True))
    caplog.set_level(logging.WARNING)
    bare = load_model(path, profile=load_profile("x86-64"), state_dir=tmp_path)
    try:
        assert bare.preprocessor is None
        assert "[preprocess] width / height (--width, --height)" in caplog.text
    finally:
        bare.close()
    model = load_model(path, profile=load_profile("x86-64"), state_dir=tmp_path,
                       preprocess_overrides={"width": 40})  # fmt: skip
    try:
        assert model.runtime.inputs[0].shape == (1, 16, None, 3)
        image = np.zeros((16, 40, 3), np.uint8)
        image[:, 30:] = (0, 0, 255)  # red in the last quarter (BGR)
        feeds, _ = model.prepare_image(image)
        assert feeds[model.runtime.inputs[0].name].shape == (1, 16, 40, 3)
        (mean,) = model.infer(feeds)
        np.testing.assert_allclose(mean[0], [0.25, 0.0, 0.0], atol=1e-6)  # RGB
        narrow = np.full((1, 16, 8, 3), 0.5, np.float32)  # another width: resized again
        np.testing.assert_allclose(model.infer({model.runtime.inputs[0].name: narrow})[0][0],
                                   [0.5, 0.5, 0.5])  # fmt: skip
    finally:
        model.close()


def test_what_a_character_file_holds_and_where_the_blank_is(
    recognizer: Any, tmp_path: Path
) -> None:
    """A character file's line holding one space is a character (PP-OCR's English dictionary
    has one), not a line to skip; class names (words) are no character file, and such a model
    stays a classifier as before; a recognizer whose blank is its last class (TF/Keras CRNNs)
    is read with the blank there, found on a blank image."""
    import onnx
    from onnx import helper, numpy_helper

    from edge_agent.model.plan import label_lines

    assert label_lines("a\n \nb\r\n\n  \n") == ("a", " ", "b")
    d, path, chars = recognizer
    labels = tuple(chars.read_text().splitlines())
    words = tuple(f"class{i}" for i in range(len(labels)))
    model = load_model(path, profile=load_profile("x86-64"), state_dir=tmp_path,
                       labels=(*words[:3], " ", *words[3:]))  # fmt: skip
    try:  # a space line among class names names no class
        assert model.postprocessor.spec.kind == "classification"
        assert model.postprocessor.spec.labels == words
    finally:
        model.close()
    m = onnx.load(str(path))
    out = m.graph.output[0].name
    for node in m.graph.node:
        node.output[:] = ["scores" if o == out else o for o in node.output]
    order = np.array([*range(1, len(labels) + 1), 0], np.int64)  # the blank moved last
    m.graph.initializer.append(numpy_helper.from_array(order, "blank_last"))
    m.graph.node.append(helper.make_node("Gather", ["scores", "blank_last"], [out], axis=2))
    moved = tmp_path / "blank_last.onnx"
    onnx.save(m, str(moved))
    model = load_model(moved, profile=load_profile("x86-64"), state_dir=tmp_path, labels=labels)
    try:
        spec = model.postprocessor.spec
        assert (spec.kind, spec.blank, spec.labels) == ("text", len(labels), (*labels, ""))
        assert _exact(model, d) >= 0.9
    finally:
        model.close()


def _as_paddleocr_ships_it(onnx_bytes: bytes, charset: str, *, dictionary: bool) -> bytes:
    """The stand-in as PaddleOCR's recognizers are fed and laid out: it takes BGR (pixel / 255
    - 0.5) / 0.5 (turned back into the RGB [0, 1] it was trained on by a Mul, an Add and a
    Gather in front), and says its classes blank first and PaddleOCR's ``use_space_char`` space
    last (a class it never says, concatenated at the end); with ``dictionary``, RapidOCR's
    ``character`` metadata holds the dictionary, as its ONNX files carry it."""
    import onnx
    from onnx import helper, numpy_helper

    m = onnx.load_from_string(onnx_bytes)
    x, out = m.graph.input[0].name, m.graph.output[0].name
    for node in m.graph.node:
        node.input[:] = ["x01" if i == x else i for i in node.input]
        node.output[:] = ["classes" if o == out else o for o in node.output]
    steps = m.graph.output[0].type.tensor_type.shape.dim[1].dim_value
    m.graph.initializer.extend([
        numpy_helper.from_array(np.array(0.5, np.float32), "half"),
        numpy_helper.from_array(np.array([2, 1, 0], np.int64), "bgr_to_rgb"),
        numpy_helper.from_array(np.zeros((1, steps, 1), np.float32), "no_space"),
    ])  # fmt: skip
    m.graph.node.insert(0, helper.make_node("Mul", [x, "half"], ["x_half"]))
    m.graph.node.insert(1, helper.make_node("Add", ["x_half", "half"], ["x_bgr01"]))
    m.graph.node.insert(2, helper.make_node("Gather", ["x_bgr01", "bgr_to_rgb"], ["x01"], axis=1))
    m.graph.node.append(helper.make_node("Concat", ["classes", "no_space"], [out], axis=2))
    m.graph.output[0].type.tensor_type.shape.dim[2].dim_value = len(charset) + 2
    if dictionary:
        onnx.helper.set_model_props(m, {"character": "\n".join(charset)})
    onnx.checker.check_model(m)
    return bytes(m.SerializeToString())


def test_a_paddleocr_recognizer_runs_bare_fed_as_paddleocr_feeds_it(
    recognizer: Any, tmp_path: Path
) -> None:
    """A PP-OCR recognizer as RapidOCR ships it (its dictionary in the file's ``character``
    metadata): ``edge-agent run --model rec.onnx --source images:DIR`` with no flag at all
    reads the lines. It is fed as PaddleOCR feeds it (BGR, (pixel / 255 - 0.5) / 0.5, the
    height fitted and the line padded on the right); the same file without the metadata, given
    the dictionary with ``--labels``, is known by its classes (N + 2: the blank first, the
    space last) and fed the same; the user's keys win over each default."""
    d, _, chars = recognizer
    rapid = tmp_path / "rapidocr_rec.onnx"
    rapid.write_bytes(_as_paddleocr_ships_it(d.onnx, d.charset, dictionary=True))
    plain = tmp_path / "paddle_rec.onnx"
    plain.write_bytes(_as_paddleocr_ships_it(d.onnx, d.charset, dictionary=False))
    profile = load_profile("x86-64")
    labels = tuple(chars.read_text().splitlines())
    for model_path, given in ((rapid, None), (plain, labels)):
        model = load_model(model_path, profile=profile, state_dir=tmp_path, labels=given)
        try:
            post, pre = model.postprocessor.spec, model.preprocessor
            assert (post.kind, post.blank, post.labels) == ("text", 0, ("", *d.charset, " "))
            assert pre is not None and not pre.grow
            spec = pre.spec
            fed = (spec.channels, spec.resize, spec.mean, spec.std, spec.scale)
            assert fed == ("bgr", "pad-right", (0.5,), (0.5,), 1 / 255)
            assert _exact(model, d) >= 0.9, model_path.name
        finally:
            model.close()
    folder = tmp_path / "lines"
    folder.mkdir()
    for i, x in enumerate(d.eval_inputs[:8]):
        assert cv2.imwrite(str(folder / f"line{i}.png"), _line_image(x))
    results = run_bare(rapid, None, f"images:{folder}", tmp_path)
    texts = [r["output"]["text"] for r in results]
    assert sum(t == want for t, want in zip(texts, d.eval_texts[:8])) >= 7, texts
    mine = {"channels": "rgb", "resize": "stretch", "mean": (0.25,)}
    model = load_model(rapid, profile=profile, state_dir=tmp_path, preprocess_overrides=mine)
    try:
        spec = model.preprocessor.spec if model.preprocessor else None
        assert spec is not None
        assert (spec.channels, spec.resize, spec.mean, spec.std) == ("rgb", "stretch", (0.25,),
                                                                     (1.0,))  # fmt: skip
    finally:
        model.close()


def _paddle_shaped(
    tmp_path: Path, width: int | None, characters: str = "a", *, channels: int = 3
) -> Path:
    """A PaddleOCR-shaped recognizer of dynamic width (or ``width``): input ``x`` ``[-1, 3,
    48, W]`` (or of one channel, repeated thrice), output the input's mean over its height,
    step by step: ``[-1, W, 3]``, three classes for one character (the blank, it, the space),
    and RapidOCR's ``character``."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w: int | str = width or "width"
    nodes = [helper.make_node("ReduceMean", ["x", "axes"], ["m"], keepdims=0)]
    if channels == 1:  # the one channel as three classes
        nodes.append(helper.make_node("Concat", ["m", "m", "m"], ["m3"], axis=1))
    nodes.append(helper.make_node("Transpose", [nodes[-1].output[0]], ["softmax"], perm=[0, 2, 1]))
    graph = helper.make_graph(
        nodes,
        "paddle_shaped",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", channels, 48, w])],
        [helper.make_tensor_value_info("softmax", TensorProto.FLOAT, ["n", w, 3])],
        [numpy_helper.from_array(np.array([2], np.int64), "axes")],
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    m.ir_version = 9
    helper.set_model_props(m, {"character": characters})
    path = tmp_path / f"paddle_shaped_{width}_{channels}.onnx"
    onnx.save(m, str(path))
    return path


def test_a_paddleocr_recognizer_of_dynamic_width_is_fed_a_long_line_wider(
    tmp_path: Path,
) -> None:
    """PP-OCR's recognizers as exported (``[-1, 3, 48, -1]``) need no ``--width``: 320, as
    PaddleOCR feeds them; a line longer than 320 / 48 is fed wider in proportion (PaddleOCR's
    ``int(48 * w / h)``), a short one padded to 320 with zeros. A model of fixed width is fed
    that width, the long line squeezed."""
    profile = load_profile("x86-64")
    model = load_model(_paddle_shaped(tmp_path, None), profile=profile, state_dir=tmp_path)
    try:
        pre = model.preprocessor
        assert pre is not None and pre.grow and pre.spec.width == 320
        assert model.postprocessor.spec.kind == "text"
        long = np.full((20, 500, 3), 200, np.uint8)
        feeds, _ = model.prepare_image(long)
        assert feeds["x"].shape == (1, 3, 48, 1200)
        (out,) = model.infer(feeds)
        assert out.shape == (1, 1200, 3)
        short = np.full((48, 100, 3), 255, np.uint8)
        feeds_short, _ = model.prepare_image(short)
        x = feeds_short["x"]
        assert x.shape == (1, 3, 48, 320) and (x[..., :100] == 1.0).all()
        assert not x[..., 100:].any()
    finally:
        model.close()
    fixed = load_model(_paddle_shaped(tmp_path, 320), profile=profile, state_dir=tmp_path)
    try:
        assert fixed.preprocessor is not None and not fixed.preprocessor.grow
        feeds, _ = fixed.prepare_image(np.full((20, 500, 3), 200, np.uint8))
        assert feeds["x"].shape == (1, 3, 48, 320)
    finally:
        fixed.close()
    gray = load_model(_paddle_shaped(tmp_path, None, channels=1), profile=profile,
                      state_dir=tmp_path)  # fmt: skip
    try:  # a gray recognizer stays gray, fed as the others
        assert gray.preprocessor is not None and gray.preprocessor.spec.channels == "gray"
        feeds, _ = gray.prepare_image(np.full((20, 500, 3), 200, np.uint8))
        assert feeds["x"].shape == (1, 1, 48, 1200) and gray.postprocessor.spec.kind == "text"
    finally:
        gray.close()


def test_lines_of_several_widths_from_several_streams_are_inferred_one_by_one(
    tmp_path: Path,
) -> None:
    """Two streams batched into one call each (``batch = 2``): lines fed at widths of their own
    (320 and 1200) go one call each, not padded to each other's width (a recognizer of global
    attention reads a line padded wider otherwise): no call holds lines of both streams (green
    and red). Each line reads as it does alone: green "a", red the space class."""
    from edge_agent.io import open_source
    from edge_agent.io.sinks import CallbackSink
    from edge_agent.io.streams import Stream
    from edge_agent.pipeline import Pipeline

    folders = {}
    for name, (size, colour) in {"short": ((48, 100), (0, 255, 0)),
                                 "long": ((20, 500), (0, 0, 255))}.items():  # fmt: skip
        folder = tmp_path / name
        folder.mkdir()
        for i in range(3):
            assert cv2.imwrite(str(folder / f"{i}.png"), np.full((*size, 3), colour, np.uint8))
        folders[name] = folder
    model = load_model(_paddle_shaped(tmp_path, None), profile=load_profile("x86-64"),
                       state_dir=tmp_path)  # fmt: skip
    calls: list[tuple[int, int, int]] = []
    real = model.runtime.infer

    def infer(feeds: Any) -> Any:  # records each call's batch, width and colours, then runs it
        x = feeds["x"]
        colours = {int(np.argmax(x[i, :, 0, 0])) for i in range(x.shape[0])}
        calls.append((x.shape[0], x.shape[3], len(colours)))
        return real(feeds)

    model.runtime.infer = infer
    results: list[dict[str, Any]] = []
    streams = [Stream(n, open_source(f"images:{f}")) for n, f in folders.items()]
    try:
        summary = Pipeline(streams=streams, model=model, sinks=[CallbackSink(results.append)],
                           batch=2).run()  # fmt: skip
    finally:
        model.close()
    assert summary["batch"] == 2 and len(results) == 6
    read = {(r["stream"], r["output"]["text"]) for r in results}
    assert read == {("short", "a"), ("long", " ")}
    assert all(k == 1 for _, _, k in calls), calls  # one stream's lines a call
    assert {w for _, w, _ in calls} == {320, 1200} and sum(n for n, _, _ in calls) >= 6
