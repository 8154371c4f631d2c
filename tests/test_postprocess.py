"""Postprocessing: synthetic model outputs with planted answers, checked against hand
computations, a real Preprocessor's letterbox geometry and a brute-force NMS."""

from __future__ import annotations

import json
import math
from typing import Any

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.errors import ConfigError, ModelError
from edge_agent.model.postprocess import (
    NONFINITE,
    Postprocessor,
    PostprocessSpec,
    nms,
    softmax,
)
from edge_agent.model.preprocess import Preprocessor, PreprocessSpec


def _plain_json(obj: Any) -> Any:
    """Assert the result holds only plain Python JSON types (no numpy scalars, no NaN)."""

    def walk(x: Any) -> None:
        if isinstance(x, dict):
            assert all(type(k) is str for k in x), x
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)
        else:
            assert type(x) in (str, int, float, bool, type(None)), (x, type(x))

    walk(obj)
    return json.loads(json.dumps(obj, allow_nan=False))


def _post(names: tuple[str, ...] = ("out",), **spec: Any) -> Postprocessor:
    return Postprocessor(PostprocessSpec(**spec), output_names=names)


# -- softmax / classification ------------------------------------------------------------------


def test_softmax_is_stable_for_large_logits() -> None:
    big = np.array([[1000.0, 1001.0, 1002.0], [-1e4, 0.0, 1e4]])
    p = softmax(big)
    assert np.all(np.isfinite(p))
    np.testing.assert_allclose(p.sum(axis=-1), 1.0)
    np.testing.assert_allclose(p[0], softmax(np.array([0.0, 1.0, 2.0])))
    np.testing.assert_allclose(p[1], [0.0, 0.0, 1.0])
    cols = softmax(big.T.astype(np.float32), axis=0)
    assert cols.dtype == np.float32
    np.testing.assert_allclose(cols.T, p, rtol=1e-6)


def test_classification_top_k_with_labels_on_probabilities() -> None:
    probs = np.array([[0.05, 0.6, 0.1, 0.25]], np.float32)
    post = _post(kind="classification", labels=("a", "b", "c"), top_k=3)
    r = _plain_json(post([probs]))
    assert r["kind"] == "classification"
    assert [t["index"] for t in r["top"]] == [1, 3, 2]
    assert [t["label"] for t in r["top"]] == ["b", None, "c"]  # index 3 has no label
    assert [t["score"] for t in r["top"]] == pytest.approx([0.6, 0.25, 0.1])
    assert (r["class"], r["label"], r["score"]) == (1, "b", pytest.approx(0.6))


def test_classification_softmax_turns_logits_into_probabilities() -> None:
    logits = np.array([[2.0, 0.0, 1.0]], np.float32)
    r = _plain_json(_post(kind="classification", softmax=True, top_k=10)([logits]))
    expected = np.exp([2.0, 1.0, 0.0]) / np.exp([2.0, 1.0, 0.0]).sum()
    assert [t["index"] for t in r["top"]] == [0, 2, 1]  # top_k capped at the class count
    assert [t["score"] for t in r["top"]] == pytest.approx(expected.tolist(), rel=1e-5)
    assert r["label"] is None


# -- detection: YOLO ----------------------------------------------------------------------------

# (cx, cy, w, h, objectness, class, class score) in input pixels.
Box = tuple[float, float, float, float, float, int, float]


def _yolo(boxes: list[Box], *, version: int, anchors: int = 64, classes: int = 3) -> np.ndarray:
    """A synthetic YOLO output: background rows score 0.01, planted rows at spread indices."""
    rows = np.zeros((anchors, 5 + classes), np.float32)
    rows[:, :4] = [10, 10, 4, 4]
    rows[:, 4:] = 0.01
    for i, (cx, cy, w, h, obj, cls, score) in enumerate(boxes):
        row = rows[7 * i + 3]
        row[:5] = [cx, cy, w, h, obj]
        row[5 + cls] = score
    if version == 5:
        return rows[None]  # [1, A, 5+C]
    scores = rows[:, 5:] * rows[:, 4:5]  # v8 has no objectness: fold it into the class scores
    return np.concatenate([rows[:, :4], scores], axis=1).T[None].copy()  # [1, 4+C, A]


@pytest.mark.parametrize("version", [5, 8])
def test_yolo_same_class_overlap_keeps_the_better_box(version: int) -> None:
    out = _yolo(
        [
            (100, 100, 50, 50, 0.9, 0, 0.9),  # 0.81
            (104, 102, 50, 50, 0.8, 0, 0.9),  # 0.72, IoU ~0.8 with the first: suppressed
            (300, 200, 40, 60, 1.0, 2, 0.6),  # 0.6, far away
        ],
        version=version,
    )
    post = _post(kind="detection", labels=("person", "car", "dog"))
    r = _plain_json(post([out]))
    dets = r["detections"]
    assert [d["class"] for d in dets] == [0, 2]
    assert [d["label"] for d in dets] == ["person", "dog"]
    assert [d["score"] for d in dets] == pytest.approx([0.81, 0.6], rel=1e-5)
    assert dets[0]["box"] == pytest.approx([75, 75, 125, 125])
    assert dets[1]["box"] == pytest.approx([280, 170, 320, 230])


@pytest.mark.parametrize("version", [5, 8])
def test_yolo_overlap_of_different_classes_is_class_wise(version: int) -> None:
    out = _yolo([(100, 100, 50, 50, 0.9, 0, 0.9), (104, 102, 50, 50, 0.8, 1, 0.9)], version=version)
    class_wise = _post(kind="detection", yolo_version=version)([out])
    assert [d["class"] for d in class_wise["detections"]] == [0, 1]
    agnostic = _post(kind="detection", class_agnostic=True)([out])
    assert [d["class"] for d in agnostic["detections"]] == [0]


def test_yolo_thresholds_and_max_detections() -> None:
    boxes: list[Box] = [(20.0 + 40 * i, 50, 30, 30, 0.5 + 0.05 * i, 0, 1.0) for i in range(8)]
    out = _yolo(boxes, version=5)
    r = _post(kind="detection", score_threshold=0.6, max_detections=3)([out])
    assert [d["score"] for d in r["detections"]] == pytest.approx([0.85, 0.8, 0.75])
    none = _post(kind="detection", score_threshold=0.99)([out])
    assert none == {"kind": "detection", "detections": []}


def test_yolo_letterbox_is_undone_into_source_pixels() -> None:
    pre = Preprocessor(PreprocessSpec(width=320, height=320, resize="letterbox"))
    source = np.zeros((480, 640, 3), np.uint8)
    cv2.rectangle(source, (100, 50), (299, 249), (255, 255, 255), thickness=-1)
    # Where the real preprocessor put the rectangle: that is the box a model would find.
    ys, xs = np.nonzero(pre(source)[0, 0] > 0.9)
    x1, y1, x2, y2 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
    assert (x1, y1, x2, y2) == (50, 65, 150, 165)
    geometry = pre.geometry(480, 640)
    out = _yolo(
        [
            ((x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1, 0.9, 1, 0.9),
            (300, 240, 60, 40, 0.9, 0, 0.8),  # runs past the source's right edge
        ],
        version=8,
    )
    r = _plain_json(_post(kind="detection")([out], geometry=geometry, source_size=(640, 480)))
    assert r["detections"][0]["box"] == pytest.approx([100, 50, 300, 250])
    assert r["detections"][1]["box"] == pytest.approx([540, 360, 640, 440])  # x2 660 clipped


def test_normalized_boxes_use_the_input_size() -> None:
    geometry = Preprocessor(PreprocessSpec(width=320, height=320, resize="letterbox")).geometry(
        480, 640
    )
    out = _yolo([(100 / 320, 115 / 320, 100 / 320, 100 / 320, 0.9, 0, 0.9)], version=5)
    spec = PostprocessSpec(kind="detection", normalized=True)
    with_size = Postprocessor(spec, output_names=["out"], input_size=(320, 320))
    r = with_size([out], geometry=geometry, source_size=(640, 480))
    assert r["detections"][0]["box"] == pytest.approx([100, 50, 300, 250], abs=1e-3)
    inferred = Postprocessor(spec, output_names=["out"])(
        [out], geometry=geometry, source_size=(640, 480)
    )
    assert inferred["detections"][0]["box"] == pytest.approx([100, 50, 300, 250], abs=1e-3)
    with pytest.raises(ConfigError, match="input_size"):
        Postprocessor(spec, output_names=["out"])([out], geometry=geometry)


def test_many_candidates_stay_bounded() -> None:
    rng = np.random.default_rng(0)
    out = np.empty((1, 84, 8400), np.float32)  # YOLOv8 COCO at 640x640
    out[0, :2] = rng.uniform(0, 640, (2, 8400))
    out[0, 2:4] = rng.uniform(5, 200, (2, 8400))
    out[0, 4:] = rng.uniform(0, 1, (80, 8400))
    r = _plain_json(_post(kind="detection", max_detections=50)([out], source_size=(640, 640)))
    dets = r["detections"]
    assert len(dets) == 50
    scores = [d["score"] for d in dets]
    assert scores == sorted(scores, reverse=True)
    assert all(0 <= v <= 640 for d in dets for v in d["box"])


# -- detection: SSD -----------------------------------------------------------------------------


def test_ssd_anchor_decoding_matches_a_hand_computation() -> None:
    anchors = [[0.5, 0.5, 0.2, 0.4], [0.2, 0.2, 0.1, 0.1]]  # (cx, cy, w, h), normalized
    enc = np.array([[[1.0, -0.5, math.log(2) / 0.2, 0.0], [0.0, 0.0, 0.0, 0.0]]], np.float32)
    # class 0 is background: anchor 1 is background and never reported
    scores = np.array([[[0.1, 0.2, 0.7], [0.9, 0.05, 0.05]]], np.float32)
    # cx = 1 * 0.1 * 0.2 + 0.5 = 0.52, cy = -0.5 * 0.1 * 0.4 + 0.5 = 0.48,
    # w = exp(ln 2) * 0.2 = 0.4, h = exp(0) * 0.4 = 0.4 -> (0.32, 0.28, 0.72, 0.68) * 300
    expected = [96.0, 84.0, 216.0, 204.0]
    spec = PostprocessSpec(
        kind="detection",
        format="ssd",
        anchors=anchors,  # type: ignore[arg-type]  # lists, as in a manifest
        normalized=True,
        background_class=0,
        score_threshold=0.3,
    )
    post = Postprocessor(spec, output_names=["boxes", "scores"], input_size=(300, 300))
    r = _plain_json(post([enc, scores]))
    assert len(r["detections"]) == 1
    det = r["detections"][0]
    assert det["box"] == pytest.approx(expected, abs=1e-3)
    assert (det["class"], det["score"]) == (2, pytest.approx(0.7))
    # TF order: encodings (ty, tx, th, tw) and anchors (cy, cx, h, w) give the same box.
    tf = PostprocessSpec(
        kind="detection",
        format="ssd",
        box_format="yxyx",
        anchors=tuple(tuple(a[i] for i in (1, 0, 3, 2)) for a in anchors),
        normalized=True,
        background_class=0,
        score_threshold=0.3,
        output="boxes",
        scores_output="scores",
    )
    post_tf = Postprocessor(tf, output_names=["scores", "boxes"], input_size=(300, 300))
    r_tf = post_tf([scores, enc[:, :, [1, 0, 3, 2]]])
    assert r_tf["detections"][0]["box"] == pytest.approx(expected, abs=1e-3)


def test_ssd_plain_boxes_with_logits_in_either_output_order() -> None:
    boxes = np.array([[[0.1, 0.1, 0.5, 0.5], [0.6, 0.6, 0.9, 0.8]]], np.float32)  # yxyx
    logits = np.array([[[0.0, 5.0], [5.0, 0.0]]], np.float32)
    spec = PostprocessSpec(
        kind="detection", format="ssd", box_format="yxyx", softmax=True, normalized=True
    )
    post = Postprocessor(spec, output_names=["scores", "boxes"])
    r = post([logits, boxes], source_size=(200, 100))  # normalized -> source for a stretch
    assert [d["class"] for d in r["detections"]] == [1, 0]
    assert r["detections"][0]["box"] == pytest.approx([20, 10, 100, 50])
    assert r["detections"][1]["box"] == pytest.approx([120, 60, 160, 90])
    with pytest.raises(ModelError, match="SSD outputs"):
        post([logits, boxes[:, :1]])


# -- segmentation / raw -------------------------------------------------------------------------


def _class_map() -> np.ndarray:
    m = np.ones((4, 5), np.int64)  # class 1: 12 px
    m[:, 3:] = 2  # class 2: 8 px; class 0 absent
    return m


@pytest.mark.parametrize("layout", ["nchw", "nhwc", "argmax"])
def test_segmentation_summary(layout: str) -> None:
    m = _class_map()
    scores = np.eye(3, dtype=np.float32)[m]  # [H, W, C] one-hot
    out = {
        "nchw": scores.transpose(2, 0, 1)[None],
        "nhwc": scores[None],
        "argmax": m[None],
    }[layout]
    r = _plain_json(_post(kind="segmentation", labels=("bg", "road", "car"))([out]))
    assert r == {
        "kind": "segmentation",
        "classes": [
            {"index": 1, "label": "road", "fraction": 0.6},
            {"index": 2, "label": "car", "fraction": 0.4},
        ],
        "dominant": 1,
        "size": [4, 5],
    }


def test_segmentation_single_channel_is_a_foreground_probability() -> None:
    prob = np.zeros((1, 1, 2, 4), np.float32)
    prob[0, 0, 0, :3] = 0.8
    r = _post(kind="segmentation")([prob])
    assert r["classes"] == [
        {"index": 0, "label": None, "fraction": 0.625},
        {"index": 1, "label": None, "fraction": 0.375},
    ]


def test_raw_lists_small_outputs_and_summarizes_large_ones() -> None:
    small = np.array([[0.1, 0.2]], np.float32)
    large = np.arange(100, dtype=np.float32).reshape(1, 100)
    labels = np.array([3, 4], np.int64)
    r = _plain_json(_post(("a", "b", "c"), kind="raw")([small, large, labels]))
    assert r == {
        "kind": "raw",
        "outputs": {
            "a": [[0.1, 0.2]],
            "b": {"shape": [1, 100], "mean": 49.5, "min": 0.0, "max": 99.0},
            "c": [3, 4],
        },
    }


# -- non-finite outputs -------------------------------------------------------------------------


def test_non_finite_outputs_are_reported_and_counted() -> None:
    cls = _post(kind="classification")
    logits = np.array([[0.1, np.nan, 0.3]], np.float32)
    assert _plain_json(cls([logits])) == {
        "kind": "classification",
        "error": NONFINITE,
        "top": [],
        "class": None,
        "label": None,
        "score": None,
    }
    cls([logits])
    assert cls.nonfinite == 2
    cls([np.array([[0.1, 0.9]], np.float32)])
    assert cls.nonfinite == 2

    det = _post(kind="detection")
    yolo = _yolo([(100, 100, 50, 50, 0.9, 0, 0.9)], version=8)
    yolo[0, 1, 40] = np.inf
    assert det([yolo]) == {"kind": "detection", "error": NONFINITE, "detections": []}
    assert det.nonfinite == 1

    seg = _post(kind="segmentation")
    masks = np.zeros((1, 3, 4, 5), np.float32)
    masks[0, 2, 3, 4] = -np.inf
    assert seg([masks]) == {
        "kind": "segmentation",
        "error": NONFINITE,
        "classes": [],
        "dominant": None,
        "size": [4, 5],
    }
    raw = _post(("a", "b"), kind="raw")
    r = raw([np.zeros(3, np.float32), np.full(100, np.nan, np.float32)])
    assert r == {"kind": "raw", "error": NONFINITE, "outputs": {}}
    assert (seg.nonfinite, raw.nonfinite) == (1, 1)


# -- configuration ------------------------------------------------------------------------------


def test_from_manifest_round_trips_and_ignores_num_classes() -> None:
    data = {"kind": "classification", "output": "probs", "num_classes": 3, "softmax": True}
    data["labels"] = ["a", "b", "c"]
    spec = PostprocessSpec.from_manifest(data)
    assert spec.labels == ("a", "b", "c") and spec.softmax is True
    assert PostprocessSpec.from_manifest(json.loads(json.dumps(spec.to_dict()))) == spec
    ssd = PostprocessSpec(kind="detection", format="ssd", anchors=((0.5, 0.5, 1, 1),))
    assert PostprocessSpec.from_manifest(json.loads(json.dumps(ssd.to_dict()))) == ssd


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"kind": "raw", "topk": 3}, r"unknown keys \['topk'\] \(known: \[.*'top_k'"),
        ({"labels": ["a"]}, "kind is missing"),
        ({"kind": "pose"}, "kind = 'pose': expected one of"),
        ({"kind": "detection", "score_threshold": 2}, "score_threshold = 2: must be"),
        ({"kind": "detection", "iou_threshold": "high"}, "iou_threshold = 'high'"),
        ({"kind": "classification", "top_k": 0}, "top_k = 0: must be a whole number"),
        ({"kind": "classification", "softmax": "yes"}, "softmax = 'yes': must be true or"),
        ({"kind": "detection", "format": "rcnn"}, "format = 'rcnn'"),
        ({"kind": "detection", "yolo_version": 11}, "yolo_version = 11"),
        ({"kind": "detection", "box_format": "xywh"}, "box_format = 'xywh'"),
        ({"kind": "detection", "anchors": [[0, 0, 1, 1]]}, "anchors .*only for format 'ssd'"),
        (
            {"kind": "detection", "format": "ssd", "anchors": [[0, 0, 1]]},
            r"anchors = \[0.0, 0.0, 1.0\]",
        ),
        ({"kind": "detection", "variances": [0.1, 0.2]}, r"variances = \[0.1, 0.2\]: give 4"),
        ({"kind": "classification", "labels": "a,b"}, "labels = 'a,b'"),
    ],
)
def test_from_manifest_errors_name_the_key(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        PostprocessSpec.from_manifest(data)


def test_output_names_are_resolved_once() -> None:
    spec = PostprocessSpec(kind="classification", output="probs")
    post = Postprocessor(spec, output_names=["logits", "probs"])
    assert post.index == 1
    r = post([np.array([[9.0, 0.0]]), np.array([[0.3, 0.7]])])
    assert r["class"] == 1
    with pytest.raises(ConfigError, match=r"output = 'probs': the model has no such output"):
        Postprocessor(spec, output_names=["logits"])
    with pytest.raises(ConfigError, match="needs a boxes and a scores output"):
        Postprocessor(PostprocessSpec(kind="detection", format="ssd"), output_names=["x"])
    with pytest.raises(ModelError, match="got 1 outputs"):
        post([np.zeros((1, 2))])


# -- nms ----------------------------------------------------------------------------------------


def _nms_reference(boxes: np.ndarray, scores: np.ndarray, thr: float, max_out: int) -> list[int]:
    def iou(a: np.ndarray, b: np.ndarray) -> float:
        area = lambda r: max(r[2] - r[0], 0.0) * max(r[3] - r[1], 0.0)  # noqa: E731
        w = max(min(a[2], b[2]) - max(a[0], b[0]), 0.0)
        h = max(min(a[3], b[3]) - max(a[1], b[1]), 0.0)
        inter = w * h
        union = area(a) + area(b) - inter
        return inter / union if union > 0 else 0.0

    keep: list[int] = []
    for i in sorted(range(len(scores)), key=lambda i: -scores[i]):
        if len(keep) < max_out and all(iou(boxes[i], boxes[k]) <= thr for k in keep):
            keep.append(i)
    return keep


@settings(max_examples=60, deadline=None)
@given(
    raw=st.lists(
        st.tuples(
            st.integers(0, 30),
            st.integers(0, 30),
            st.integers(0, 15),
            st.integers(0, 15),
            st.sampled_from([0.1, 0.3, 0.5, 0.7, 0.9]),
        ),
        max_size=25,
    ),
    thr=st.sampled_from([0.0, 0.2, 0.45, 0.7, 1.0]),
    max_out=st.integers(1, 30),
)
def test_nms_matches_brute_force(
    raw: list[tuple[int, int, int, int, float]], thr: float, max_out: int
) -> None:
    data = np.array(raw, np.float64).reshape(-1, 5)
    boxes = np.concatenate([data[:, :2], data[:, :2] + data[:, 2:4]], axis=1)
    scores = data[:, 4]
    kept = nms(boxes, scores, thr, max_out=max_out)
    assert kept.tolist() == _nms_reference(boxes, scores, thr, max_out)


def test_nms_plain_cases() -> None:
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30]], np.float32)
    scores = np.array([0.5, 0.9, 0.7])
    assert nms(boxes, scores, 0.5, max_out=10).tolist() == [1, 2]
    assert nms(boxes, scores, 0.5, max_out=1).tolist() == [1]
    assert nms(boxes, scores, 0.9, max_out=10).tolist() == [1, 2, 0]
    assert nms(np.zeros((0, 4)), np.zeros(0), 0.5, max_out=5).tolist() == []


# --- a bare model's class scores: softmax when they are logits ----------------------------


def _bare_classifier(path: Any, *, with_softmax: bool) -> Any:
    """A bare ONNX classifier (an 8x8 gray image, 3 classes) whose scores are logits, or
    probabilities when it ends in a Softmax."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(1).standard_normal((64, 3)).astype(np.float32) * 4.0
    nodes = [
        helper.make_node("Flatten", ["x"], ["f"]),
        helper.make_node("MatMul", ["f", "w"], ["logits" if with_softmax else "y"]),
    ]
    if with_softmax:
        nodes.append(helper.make_node("Softmax", ["logits"], ["y"], axis=-1))
    graph = helper.make_graph(
        nodes, "c",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
        initializer=[numpy_helper.from_array(w, "w")],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize(
    ("with_softmax", "choice", "applied"),
    [(False, "auto", True), (True, "auto", False), (False, "no", False), (True, "yes", True)],
)
def test_a_bare_models_logits_get_a_softmax_unless_told(
    tmp_path: Any, with_softmax: bool, choice: str, applied: bool
) -> None:
    from edge_agent.model.loader import load_model
    from edge_agent.model.profiles import load_profile

    path = _bare_classifier(tmp_path / "c.onnx", with_softmax=with_softmax)
    model = load_model(path, profile=load_profile("x86-64"), state_dir=tmp_path,
                       labels=("a", "b", "c"), softmax=choice)  # fmt: skip
    try:
        assert model.postprocessor.spec.softmax is applied
        image = np.random.default_rng(2).integers(0, 256, (8, 8, 3), np.uint8)
        feeds, geometry = model.prepare(image)
        out = model.postprocessor(model.infer(feeds), geometry=geometry)
        scores = [e["score"] for e in out["top"]]
        probabilities = applied or with_softmax
        assert (min(scores) >= 0.0 and max(scores) <= 1.0) is probabilities, scores
        if probabilities:
            assert sum(scores) == pytest.approx(1.0, abs=1e-3)
    finally:
        model.close()


def test_a_bad_softmax_choice_is_a_config_error() -> None:
    from edge_agent.config import parse_config

    with pytest.raises(ConfigError, match=r"\[model\] softmax = 'maybe'"):
        parse_config({"model": {"softmax": "maybe"}})


def test_softmax_auto_is_decided_once_a_model_file(
    tmp_path: Any, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tuner's trials and a swap back load the same file again: one probe, one log line;
    a new file at the same path is probed afresh."""
    import logging

    from edge_agent.model import loader
    from edge_agent.model.profiles import load_profile

    probes: list[Any] = []
    real_probe = loader._logit_range
    monkeypatch.setattr(loader, "_logit_range",
                        lambda rt, *a: probes.append(rt) or real_probe(rt, *a))  # fmt: skip
    path = _bare_classifier(tmp_path / "c.onnx", with_softmax=False)
    caplog.set_level(logging.INFO, logger=loader.log.name)
    for _ in range(3):
        model = loader.load_model(path, profile=load_profile("x86-64"), state_dir=tmp_path,
                                  labels=("a", "b", "c"))  # fmt: skip
        assert model.postprocessor.spec.softmax is True
        model.close()
    said = [r for r in caplog.records if "outputs are logits" in r.getMessage()]
    assert (len(probes), len(said)) == (1, 1)
    _bare_classifier(tmp_path / "new.onnx", with_softmax=True)
    (tmp_path / "new.onnx").replace(path)  # a new model file in the old one's place
    model = loader.load_model(path, profile=load_profile("x86-64"), state_dir=tmp_path,
                              labels=("a", "b", "c"))  # fmt: skip
    assert model.postprocessor.spec.softmax is False and len(probes) == 2
    model.close()
