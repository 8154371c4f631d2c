"""The stand-ins for third-party exports: shapes, metadata, op mix, and trained quality.

Each model is built and trained once per session (conftest.py); the quality floors
sit below what was measured with the default seeds (see each builder's docstring) with margin.
"""

from __future__ import annotations

import ast
from dataclasses import replace

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from converters import standins

pytestmark = pytest.mark.slow


def _session(onnx_bytes: bytes) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(onnx_bytes, opts, providers=["CPUExecutionProvider"])


def _run_all(onnx_bytes: bytes, inputs: np.ndarray) -> list[np.ndarray]:
    sess = _session(onnx_bytes)
    name = sess.get_inputs()[0].name
    return [sess.run(None, {name: x[None]})[0] for x in inputs]


def _op_types(model: onnx.ModelProto) -> set[str]:
    return {n.op_type for n in model.graph.node}


def _constants(model: onnx.ModelProto) -> set[str]:
    """Names of tensors that are weights: initializers and Constant outputs."""
    names = {i.name for i in model.graph.initializer}
    names.update(o for n in model.graph.node if n.op_type == "Constant" for o in n.output)
    return names


def _producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in model.graph.node for o in n.output}


def _consumers(model: onnx.ModelProto, name: str) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if name in n.input]


def _check_loadable(onnx_bytes: bytes, opset: int) -> onnx.ModelProto:
    model = onnx.load_from_string(onnx_bytes)
    onnx.checker.check_model(model)
    assert [i.version for i in model.opset_import if i.domain in ("", "ai.onnx")] == [opset]
    assert model.ir_version <= 10  # what the onnxruntime range the project supports reads
    return model


# --------------------------------------------------------------------------------------------
# YOLOv8


@pytest.fixture(scope="module")
def yolo(standin_yolo: standins.DetectorStandIn) -> standins.DetectorStandIn:
    return standin_yolo  # trained once per session (conftest.py)


@pytest.fixture(scope="module")
def yolo_outputs(yolo: standins.DetectorStandIn) -> list[np.ndarray]:
    return _run_all(yolo.onnx, yolo.eval_images)


def test_yolo_io_and_metadata(yolo: standins.DetectorStandIn) -> None:
    model = _check_loadable(yolo.onnx, 17)
    sess = _session(yolo.onnx)
    (inp,), (out,) = sess.get_inputs(), sess.get_outputs()
    s = yolo.size
    assert (inp.name, inp.shape) == ("images", [1, 3, s, s])
    n = sum((s // st) ** 2 for st in (8, 16, 32))
    assert (out.name, out.shape) == ("output0", [1, 4 + 3, n])
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["task"] == "detect"
    assert meta["stride"] == "32"
    assert ast.literal_eval(meta["imgsz"]) == [s, s]
    assert ast.literal_eval(meta["names"]) == {0: "square", 1: "circle", 2: "triangle"}
    assert meta["description"] and meta["author"]


def test_yolo_data(yolo: standins.DetectorStandIn) -> None:
    s = yolo.size
    for x in (yolo.calibration, yolo.eval_images):
        assert x.shape == (64, 3, s, s) and x.dtype == np.float32
        assert x.min() >= 0.0 and x.max() <= 1.0
    assert yolo.eval_boxes.shape == (64, 4, 4) and yolo.eval_classes.shape == (64, 4)
    real = yolo.eval_classes >= 0
    assert real[:, 0].all()  # every image has at least one shape
    assert set(np.unique(yolo.eval_classes[real])) == {0, 1, 2}
    sides = (yolo.eval_boxes[real][:, 2:] - yolo.eval_boxes[real][:, :2]).max(1)
    assert sides.min() >= 10 and sides.max() <= 51


def test_yolo_graph_is_ultralytics_shaped(yolo: standins.DetectorStandIn) -> None:
    model = onnx.load_from_string(yolo.onnx)
    ops = _op_types(model)
    assert {"Conv", "Sigmoid", "Mul", "Split", "Concat", "MaxPool", "Resize"} <= ops
    assert {"Softmax", "Add", "Sub", "Div"} <= ops  # DFL and dist2bbox
    producers = _producers(model)
    last = producers["output0"]
    assert last.op_type == "Concat"
    # One input is the pixel boxes (strides Mul), the other the sigmoid scores.
    assert sorted(producers[i].op_type for i in last.input) == ["Mul", "Sigmoid"]
    # DFL: a 1x1 Conv with the fixed weights 0..15 right after the Softmax.
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    dfl = [
        n
        for n in model.graph.node
        if n.op_type == "Conv" and n.input[1] in inits and inits[n.input[1]].shape == (1, 16, 1, 1)
    ]
    assert len(dfl) == 1
    np.testing.assert_array_equal(inits[dfl[0].input[1]].ravel(), np.arange(16))


def test_yolo_detects_the_shapes(
    yolo: standins.DetectorStandIn, yolo_outputs: list[np.ndarray]
) -> None:
    score = standins.detection_scores(yolo_outputs, yolo.eval_boxes, yolo.eval_classes)
    assert score.ground_truth == int((yolo.eval_classes >= 0).sum())
    assert score.recall >= 0.85, score
    assert score.precision >= 0.75, score


def test_yolo_output_mixes_pixels_and_probabilities(
    yolo: standins.DetectorStandIn, yolo_outputs: list[np.ndarray]
) -> None:
    out = np.concatenate(yolo_outputs, 0)  # (N_img, 7, anchors)
    boxes, scores = out[:, :4], out[:, 4:]
    assert scores.min() >= 0.0 and scores.max() <= 1.0
    # Centres span the image in pixels; the box rows are two orders above the score rows.
    assert boxes[:, :2].min() > -yolo.size * 0.5 and boxes[:, :2].max() > yolo.size * 0.75
    assert np.median(boxes[:, 2:]) > 5.0
    # Real structure: background anchors near 0, the best anchor under each shape high.
    assert np.quantile(scores, 0.95) < 0.05
    score = standins.detection_scores(yolo_outputs, yolo.eval_boxes, yolo.eval_classes)
    assert score.matched_score >= 0.8, score


# --------------------------------------------------------------------------------------------
# SVTR


@pytest.fixture(scope="module")
def svtr(standin_svtr: standins.RecognizerStandIn) -> standins.RecognizerStandIn:
    return standin_svtr  # trained once per session (conftest.py)


def test_svtr_io_and_ops(svtr: standins.RecognizerStandIn) -> None:
    model = _check_loadable(svtr.onnx, 17)
    sess = _session(svtr.onnx)
    (inp,), (out,) = sess.get_inputs(), sess.get_outputs()
    assert inp.shape == [1, 3, 32, svtr.width]
    assert out.shape == [1, svtr.width // 4, len(svtr.charset) + 1]
    ops = _op_types(model)
    assert {"LayerNormalization", "Erf", "Softmax", "Conv", "HardSwish", "AveragePool"} <= ops
    # Attention: q·kᵀ and attn·v multiply two activations (no weight on either side).
    weights = _constants(model)
    two_act = [n for n in model.graph.node if n.op_type == "MatMul" and not set(n.input) & weights]
    assert len(two_act) == 4  # 2 blocks x (q·kᵀ, attn·v)
    assert _producers(model)[out.name].op_type == "Softmax"


def test_svtr_data(svtr: standins.RecognizerStandIn) -> None:
    assert svtr.calibration.shape == (64, 3, 32, svtr.width)
    assert svtr.eval_inputs.shape == (len(svtr.eval_texts), 3, 32, svtr.width)
    assert all(3 <= len(t) <= 8 and set(t) <= set(svtr.charset) for t in svtr.eval_texts)
    assert svtr.eval_inputs.min() >= 0.0 and svtr.eval_inputs.max() <= 1.0


def test_svtr_reads_the_lines(svtr: standins.RecognizerStandIn) -> None:
    outs = _run_all(svtr.onnx, svtr.eval_inputs)
    np.testing.assert_allclose(outs[0].sum(-1), 1.0, atol=1e-4)
    read = [standins.ctc_greedy(o, svtr.charset) for o in outs]
    exact = np.mean([r == t for r, t in zip(read, svtr.eval_texts)])
    assert exact >= 0.6, list(zip(read, svtr.eval_texts))[:10]


def test_svtr_opset_14_decomposes_layernorm() -> None:
    small = standins.svtr_style(dim=32, steps=1, batch=2, opset=14, n_calibration=1, n_eval=1)
    model = _check_loadable(small.onnx, 14)
    ops = _op_types(model)
    assert "LayerNormalization" not in ops
    assert {"ReduceMean", "Sub", "Pow", "Sqrt", "Div", "Erf", "Softmax"} <= ops
    assert _run_all(small.onnx, small.eval_inputs)[0].shape == (1, 32, len(small.charset) + 1)


# --------------------------------------------------------------------------------------------
# DBNet


@pytest.fixture(scope="module")
def db(standin_db: standins.TextDetectorStandIn) -> standins.TextDetectorStandIn:
    return standin_db  # trained once per session (conftest.py)


def test_db_io_and_ops(db: standins.TextDetectorStandIn) -> None:
    model = _check_loadable(db.onnx, 17)
    sess = _session(db.onnx)
    (inp,), (out,) = sess.get_inputs(), sess.get_outputs()
    assert inp.shape == [1, 3, db.size, db.size]
    assert out.shape == [1, 1, db.size, db.size]
    ops = _op_types(model)
    assert {"Conv", "Relu", "Resize", "Add", "Concat", "ConvTranspose", "Sigmoid"} <= ops
    deconv_bn = [
        n
        for n in model.graph.node
        if n.op_type == "ConvTranspose"
        and [c.op_type for c in _consumers(model, n.output[0])] == ["BatchNormalization"]
    ]
    assert len(deconv_bn) == 1
    assert _producers(model)[out.name].op_type == "Sigmoid"


def test_db_data(db: standins.TextDetectorStandIn) -> None:
    s = db.size
    assert db.calibration.shape == (64, 3, s, s)
    assert db.eval_inputs.shape == (64, 3, s, s) and db.eval_masks.shape == (64, 1, s, s)
    assert set(np.unique(db.eval_masks)) == {0.0, 1.0}
    assert (db.eval_masks.sum((1, 2, 3)) > 0).all()


def test_db_finds_the_text(db: standins.TextDetectorStandIn) -> None:
    outs = _run_all(db.onnx, db.eval_inputs)
    ious = [standins.mask_iou(o, m) for o, m in zip(outs, db.eval_masks)]
    assert np.mean(ious) >= 0.6, sorted(ious)[:5]
    probs = np.concatenate([o.ravel() for o in outs])
    assert probs.min() >= 0.0 and probs.max() <= 1.0


# --------------------------------------------------------------------------------------------
# All three


# --------------------------------------------------------------------------------------------
# The streaming voice-activity detector


def test_vad_io_ops_and_data(standin_vad: standins.VadStandIn) -> None:
    model = _check_loadable(standin_vad.onnx, 17)
    h = standin_vad.hidden
    io = [
        [(v.name, [d.dim_value for d in v.type.tensor_type.shape.dim]) for v in vs]
        for vs in (model.graph.input, model.graph.output)
    ]
    assert io == [
        [("input", [1, standin_vad.window]), ("state", [1, 1, h])],
        [("output", [1, 1]), ("stateN", [1, 1, h])],
    ]
    ops = _op_types(model)
    assert not ops & {"GRU", "LSTM", "RNN", "Loop", "Scan"}  # the cell as plain ops
    assert {"MatMul", "Abs", "Log", "Concat", "Gemm", "Sigmoid", "Tanh", "Sub"} <= ops
    cal = standin_vad.calibration
    assert cal.dtype == np.float32 and cal.shape[1] == standin_vad.window
    assert len(cal) == int(30.0 * standin_vad.rate) // standin_vad.window
    assert float(np.abs(cal).max()) <= 1.0


def test_vad_speech_audio_has_structure() -> None:
    rng = np.random.default_rng(0)
    audio, mask = standins.speech_audio(rng, 20.0)
    assert audio.dtype == np.float32 and audio.shape == mask.shape == (20 * standins.VAD_RATE,)
    assert 0.2 < mask.mean() < 0.8
    labels = standins.window_labels(mask)
    windows = standins.audio_windows(audio)
    assert len(labels) == len(windows) == 20 * standins.VAD_RATE // standins.VAD_WINDOW
    loud = np.sqrt((windows**2).mean(axis=1))
    # speech windows are louder on the whole; the hangover and syllable gaps are not
    assert np.median(loud[labels]) > 3 * np.median(loud[~labels])
    assert np.mean(loud[labels] < 0.02) > 0.05


@pytest.mark.parametrize(
    "build",
    [
        lambda: standins.yolov8_style(
            size=64, width=4, steps=2, batch=2, n_calibration=1, n_eval=1
        ),
        lambda: standins.svtr_style(dim=16, steps=2, batch=2, n_calibration=1, n_eval=1),
        lambda: standins.db_style(size=64, width=4, steps=2, batch=2, n_calibration=1, n_eval=1),
        lambda: standins.vad_style(
            hidden=8, steps=2, train_audio_seconds=30.0, calibration_seconds=1.0
        ),
    ],
    ids=["yolov8", "svtr", "db", "vad"],
)
def test_same_seed_same_bytes(build: object) -> None:
    assert callable(build)
    a, b = build(), build()
    assert a.onnx == b.onnx
    np.testing.assert_array_equal(a.calibration, b.calibration)


def test_yolov8_exported_at_another_size_than_it_was_trained_at() -> None:
    """Trained at 64 px, exported at 128 (as Ultralytics users export at another imgsz): the
    graph takes 128 px and its head has the anchors of 128 px (N = 16² + 8² + 4²), and the
    weights are the trained ones (the 64-px export of the same training has the same convs)."""
    import onnx

    kw = dict(size=64, width=4, steps=2, batch=2, n_calibration=1, n_eval=2)
    small = standins.yolov8_style(**kw)  # type: ignore[arg-type]
    big = standins.yolov8_style(**kw, export_size=128)  # type: ignore[arg-type]
    m = onnx.load_model_from_string(big.onnx)
    dims = [d.dim_value for d in m.graph.input[0].type.tensor_type.shape.dim]
    out = [d.dim_value for d in m.graph.output[0].type.tensor_type.shape.dim]
    assert dims == [1, 3, 128, 128] and out == [1, 7, 16 * 16 + 8 * 8 + 4 * 4]
    assert big.eval_images.shape[-2:] == (128, 128) and big.size == 128

    def tensors(model: onnx.ModelProto) -> dict[str, np.ndarray]:
        return {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}

    a, b = tensors(onnx.load_model_from_string(small.onnx)), tensors(m)
    convs = [k for k, v in a.items() if v.ndim == 4 and v.size > 16]  # the conv weights
    assert len(convs) > 30 and all(k in b for k in convs)
    for k in convs:
        np.testing.assert_array_equal(a[k], b[k])


# --------------------------------------------------------------------------------------------
# The MediaPipe-shaped TFLite stand-ins: BlazeFace and a landmark model


def _litert_all(tflite: bytes, inputs: np.ndarray) -> list[tuple[np.ndarray, ...]]:
    """Every NCHW input through LiteRT (NHWC), outputs in the ONNX graph's order."""
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_content=tflite, num_threads=1)
    it.allocate_tensors()
    (inp,) = it.get_input_details()
    outs = sorted(it.get_output_details(), key=lambda d: d["index"])
    result = []
    for x in inputs:
        it.set_tensor(inp["index"], np.ascontiguousarray(x.transpose(1, 2, 0)[None]))
        it.invoke()
        result.append(tuple(it.get_tensor(o["index"]).copy() for o in outs))
    return result


def _io(onnx_bytes: bytes, x: np.ndarray) -> list[list[tuple[str, tuple[int, ...]]]]:
    """[(name, shape)] of the inputs and of the outputs one run gives."""
    sess = _session(onnx_bytes)
    (inp,) = sess.get_inputs()
    outs = sess.run(None, {inp.name: x[None]})
    return [
        [(inp.name, tuple(inp.shape))],
        [(o.name, v.shape) for o, v in zip(sess.get_outputs(), outs)],
    ]


def _run_pairs(onnx_bytes: bytes, inputs: np.ndarray) -> list[tuple[np.ndarray, ...]]:
    sess = _session(onnx_bytes)
    name = sess.get_inputs()[0].name
    return [tuple(sess.run(None, {name: x[None]})) for x in inputs]


@pytest.fixture(scope="module")
def blazeface_tflite(standin_blazeface: standins.FaceDetectorStandIn) -> bytes:
    return standins.tflite_fp16(standin_blazeface.onnx)


def test_blazeface_io_anchors_and_tflite_op_mix(
    standin_blazeface: standins.FaceDetectorStandIn, blazeface_tflite: bytes
) -> None:
    from converters.tflite import count_ops

    bf = standin_blazeface
    _check_loadable(bf.onnx, 17)
    assert _io(bf.onnx, bf.eval_images[0]) == [
        [("input", (1, 3, 128, 128))],
        [("regressors", (1, 896, 16)), ("classificators", (1, 896, 1))],
    ]
    # 2 anchors per cell on the 16x16 map, then 6 per cell on the 8x8 map
    assert bf.anchors.shape == (896, 4)
    np.testing.assert_allclose(bf.anchors[:2, :2], [[1 / 32, 1 / 32]] * 2)
    np.testing.assert_allclose(bf.anchors[512:518, :2], [[1 / 16, 1 / 16]] * 6)
    ops = count_ops(blazeface_tflite)
    # the real face_detection_short_range.tflite's op mix, and nothing else
    assert set(ops) == {"CONV_2D", "DEPTHWISE_CONV_2D", "ADD", "MAX_POOL_2D", "PAD",
                        "RESHAPE", "CONCATENATION", "DEQUANTIZE"}, ops  # fmt: skip
    assert ops["DEPTHWISE_CONV_2D"] == 16 and ops["MAX_POOL_2D"] == 3  # 16 blocks, 3 stride 2
    assert ops["CONCATENATION"] == 2 and ops["RESHAPE"] == 4  # two heads, two maps each


def test_blazeface_finds_the_faces(standin_blazeface: standins.FaceDetectorStandIn) -> None:
    bf = standin_blazeface
    score = standins.face_scores(_run_pairs(bf.onnx, bf.eval_images), bf)
    assert score.faces == int(bf.eval_has_face.sum()) > 30
    assert score.recall >= 0.65, score
    assert score.precision >= 0.65, score
    assert score.keypoint_error <= 0.15, score
    # the same network with its initial weights finds none: the floors measure training
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    net = standins.blazeface_net().eval()
    with torch.no_grad():
        reg, cls = net(torch.from_numpy(bf.eval_images))
    untrained = standins.face_scores(list(zip(reg.numpy(), cls.numpy())), bf)
    assert untrained.recall < 0.2, untrained


def test_blazeface_litert_matches_onnxruntime(
    standin_blazeface: standins.FaceDetectorStandIn, blazeface_tflite: bytes
) -> None:
    bf = standin_blazeface
    images = bf.eval_images[:16]
    ref, lite = _run_pairs(bf.onnx, images), _litert_all(blazeface_tflite, images)
    for (r_reg, r_cls), (l_reg, l_cls) in zip(ref, lite):
        assert l_reg.shape == r_reg.shape and l_cls.shape == r_cls.shape
        # fp16 weights: pixels to a fraction of a pixel, logits to a few hundredths
        np.testing.assert_allclose(l_reg, r_reg, atol=0.5 + 0.01 * float(np.abs(r_reg).max()))
        np.testing.assert_allclose(l_cls, r_cls, atol=0.1)
    # and the same faces come out of both
    n = len(images)
    head = replace(
        bf,
        eval_images=images,
        eval_boxes=bf.eval_boxes[:n],
        eval_keypoints=bf.eval_keypoints[:n],
        eval_has_face=bf.eval_has_face[:n],
    )
    a, b = standins.face_scores(lite, head), standins.face_scores(ref, head)
    assert (a.recall, a.precision, a.detections) == (b.recall, b.precision, b.detections)
    assert a.keypoint_error == pytest.approx(b.keypoint_error, abs=1e-3)


@pytest.fixture(scope="module")
def landmark_tflite(standin_landmark: standins.LandmarkStandIn) -> bytes:
    return standins.tflite_fp16(standin_landmark.onnx)


def test_landmark_io_and_tflite_op_mix(
    standin_landmark: standins.LandmarkStandIn, landmark_tflite: bytes
) -> None:
    from converters.tflite import count_ops

    lm = standin_landmark
    _check_loadable(lm.onnx, 17)
    assert _io(lm.onnx, lm.eval_images[0]) == [
        [("input", (1, 3, lm.size, lm.size))],
        [("landmarks", (1, 63)), ("presence", (1, 1))],
    ]
    ops = count_ops(landmark_tflite)
    assert {"CONV_2D", "DEPTHWISE_CONV_2D", "PRELU", "ADD", "RESHAPE", "LOGISTIC",
            "DEQUANTIZE"} <= set(ops), ops  # fmt: skip
    assert ops["DEPTHWISE_CONV_2D"] == 17 and ops["ADD"] == 10  # MobileNetV2's blocks
    assert "TRANSPOSE" not in ops


def test_landmark_regresses_the_keypoints(standin_landmark: standins.LandmarkStandIn) -> None:
    lm = standin_landmark
    error, presence = standins.keypoint_error(_run_pairs(lm.onnx, lm.eval_images), lm)
    # beats the best constant answer (the evaluation set's own mean hand): measured 0.83 of it
    # for this build (0.12 of the image against 0.145), 0.72 for the benchmark's; the bound
    # leaves room for another CPU's float rounding steering the short training elsewhere
    mean = lm.eval_keypoints[lm.eval_present].mean(0).reshape(-1)
    constant, _ = standins.keypoint_error([(mean, np.ones(1))] * len(lm.eval_images), lm)
    assert error <= 0.95 * constant, (error, constant)
    assert presence >= 0.85
    assert lm.eval_present.mean() < 0.85  # below the floor: "always yes" cannot pass
    # initial weights land far off
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    net = standins.landmark_net(size=lm.size, width=0.5).eval()
    with torch.no_grad():
        pts, flag = net(torch.from_numpy(lm.eval_images))
    untrained, _ = standins.keypoint_error(list(zip(pts.numpy() * lm.size, flag.numpy())), lm)
    assert untrained > constant, (untrained, constant)


def test_landmark_litert_matches_onnxruntime(
    standin_landmark: standins.LandmarkStandIn, landmark_tflite: bytes
) -> None:
    lm = standin_landmark
    images = lm.eval_images[:16]
    for (r_pts, r_flag), (l_pts, l_flag) in zip(
        _run_pairs(lm.onnx, images), _litert_all(landmark_tflite, images)
    ):
        assert l_pts.shape == r_pts.shape == (1, 63) and l_flag.shape == (1, 1)
        np.testing.assert_allclose(l_pts, r_pts, atol=0.01 * lm.size)  # pixels
        np.testing.assert_allclose(l_flag, r_flag, atol=0.02)
