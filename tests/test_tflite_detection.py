"""Bare detector files as people download them, through the agent with no postprocessing
flags. A TFLite detector as the TFLite examples, Coral and MediaPipe ship them: int8 with a uint8
input, ending in TensorFlow's ``TFLite_Detection_PostProcess`` custom op (boxes, classes, scores
and their count, listed in the file in another order than the op's). The stand-in
(``converters.standins.ssd_style``: SSD-MobileNet-style, trained briefly on coloured shapes) runs
in real LiteRT, bare, through ``load_model`` and ``edge-agent run``: the agent feeds it the
pixels, finds the op's outputs by role, and reports its detections in source pixels. And an
Ultralytics YOLOv8 export (``converters.standins.yolov8_style``, with its metadata), whose one
output is read as the head it is."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import onnx
import pytest

from edge_agent.cli import main as edge_agent
from edge_agent.errors import ConfigError, ModelError
from edge_agent.model.agreement import box_iou
from edge_agent.model.loader import load_model
from edge_agent.model.postprocess import Postprocessor, PostprocessSpec
from edge_agent.model.profiles import load_profile
from tests.agent_runs import run_bare

NAMES = ("square", "circle", "triangle")
W, H = 640, 480  # the camera's frames; the model sees 128 x 128


@pytest.fixture(scope="module")
def ssd(tmp_path_factory: pytest.TempPathFactory) -> Any:
    pytest.importorskip("torch")
    from converters import standins

    stand_in = standins.ssd_style()
    path = tmp_path_factory.mktemp("ssd") / "ssd_mobilenet_style.tflite"
    path.write_bytes(standins.tflite_ssd(stand_in))
    return stand_in, path


def _frame(image_rgb: np.ndarray) -> np.ndarray:
    """A 128-px RGB shapes image as a camera's 640x480 BGR frame."""
    return cv2.resize(image_rgb[:, :, ::-1], (W, H), interpolation=cv2.INTER_LINEAR)


def _recall(found: list[list[dict[str, Any]]], boxes: np.ndarray, classes: np.ndarray) -> float:
    """The share of drawn shapes with a detection of their class at IoU >= 0.5 (frame
    pixels)."""
    scale = np.array([W, H, W, H], np.float64) / 128
    hit = total = 0
    for dets, gt_boxes, gt_classes in zip(found, boxes, classes):
        keep = gt_classes >= 0
        total += int(keep.sum())
        if not dets:
            continue
        pred = np.array([d["box"] for d in dets], np.float64)
        iou = box_iou(gt_boxes[keep] * scale, pred)
        for row, cls in zip(iou, gt_classes[keep]):
            hit += any(iou_ >= 0.5 and d["class"] == cls for iou_, d in zip(row, dets))
    return hit / total


def test_a_bare_tflite_ssd_reports_its_own_detections_in_frame_pixels(
    ssd: Any, tmp_path: Path
) -> None:
    stand_in, path = ssd
    model = load_model(path, profile=load_profile("x86-64"), state_dir=tmp_path, labels=NAMES)
    try:
        spec = model.postprocessor.spec
        assert (spec.kind, spec.format) == ("detection", "decoded")
        # found through the op, not the file's order (scores, boxes, count, classes)
        assert [o.name for o in model.runtime.outputs][:2] == [
            "TFLite_Detection_PostProcess:2", "TFLite_Detection_PostProcess"]  # fmt: skip
        assert (spec.output, spec.classes_output, spec.scores_output, spec.count_output) == (
            "TFLite_Detection_PostProcess", "TFLite_Detection_PostProcess:1",
            "TFLite_Detection_PostProcess:2", "TFLite_Detection_PostProcess:3",
        )  # fmt: skip
        assert model.runtime.inputs[0].dtype == "uint8"
        found = []
        for image in stand_in.eval_images:
            frame = _frame(image)
            feeds, geometry = model.prepare_image(frame)
            outputs = model.infer(feeds)
            result = model.postprocessor(outputs, geometry=geometry, source_size=(W, H))
            dets = result["detections"]
            found.append(dets)
            # what the op said, by hand: its first `count` boxes scoring >= 0.25, (ymin, xmin,
            # ymax, xmax) of the input scaled to the frame
            by_name = {o.name: v for o, v in zip(model.runtime.outputs, outputs)}
            n = int(by_name["TFLite_Detection_PostProcess:3"][0])
            scores = by_name["TFLite_Detection_PostProcess:2"][0, :n]
            keep = scores >= 0.25
            boxes = by_name["TFLite_Detection_PostProcess"][0, :n][keep][:, [1, 0, 3, 2]]
            classes = by_name["TFLite_Detection_PostProcess:1"][0, :n][keep].astype(int)
            order = np.argsort(-scores[keep], kind="stable")
            assert [d["class"] for d in dets] == classes[order].tolist()
            assert [d["label"] for d in dets] == [NAMES[c] for c in classes[order]]
            want = np.clip(boxes[order] * [W, H, W, H], 0, [W, H, W, H])
            np.testing.assert_allclose([d["box"] for d in dets] or np.zeros((0, 4)), want,
                                       rtol=1e-5, atol=1e-3)  # fmt: skip
        # the right pixels went in: the trained model finds the shapes (0.905 on the build
        # machine; fed 0..1 quantized, 128..255, it finds 0.459 of them)
        recall = _recall(found, stand_in.eval_boxes, stand_in.eval_classes)
        assert recall >= 0.75, recall
    finally:
        model.close()


def test_a_tflite_ssds_labels_come_from_its_metadata(ssd: Any, tmp_path: Path) -> None:
    """The file as Model Maker and MediaPipe write it: a label map packed into the file and
    named in its classes output's metadata; no --labels needed, and --labels still wins."""
    from converters.standins import add_tflite_metadata

    path = tmp_path / "with_metadata.tflite"
    names = ("Square", "Circle", "Triangle")
    # the classes output is the file's fourth (scores, boxes, count, classes)
    path.write_bytes(
        add_tflite_metadata(ssd[1].read_bytes(), label_files={3: ("labelmap.txt", names)})
    )
    for given, want in ((None, names), (NAMES, NAMES)):
        model = load_model(path, profile=load_profile("x86-64"), state_dir=tmp_path, labels=given)
        try:
            assert model.postprocessor.spec.labels == want
            frame = _frame(ssd[0].eval_images[0])
            feeds, geometry = model.prepare_image(frame)
            out = model.postprocessor(model.infer(feeds), geometry=geometry, source_size=(W, H))
            assert out["detections"] and all(
                d["label"] == want[d["class"]] for d in out["detections"]
            )
        finally:
            model.close()


def test_edge_agent_run_on_a_tflite_ssd_and_a_video(ssd: Any, tmp_path: Path) -> None:
    """The file as a new user runs it: ``edge-agent run --model x.tflite --labels …`` on a
    video; each result's detections carry labels and frame-pixel boxes."""
    from converters import standins

    path = ssd[1]
    rng = np.random.default_rng(11)
    video = tmp_path / "shapes.mp4"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), 10.0, (W, H))
    truth = []
    for _ in range(12):
        image, boxes, classes = standins.shapes_image(rng, 128)
        writer.write(_frame(image))
        truth.append((boxes, classes))
    writer.release()
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(NAMES) + "\n")
    results = run_bare(path, labels, f"file:{video}", tmp_path)
    assert len(results) == 12
    assert {r["output"]["kind"] for r in results} == {"detection"}
    found = [r["output"]["detections"] for r in results]
    for dets in found:
        for d in dets:
            assert d["label"] == NAMES[d["class"]]
            x1, y1, x2, y2 = d["box"]
            assert 0 <= x1 < x2 <= W and 0 <= y1 < y2 <= H
    boxes = np.stack([np.pad(b, ((0, 4 - len(b)), (0, 0))) for b, _ in truth])
    classes = np.stack([np.pad(c, (0, 4 - len(c)), constant_values=-1) for _, c in truth])
    assert _recall(found, boxes, classes) >= 0.6


# --- the ``decoded`` format on its own ------------------------------------------------------

OUT = ("boxes", "classes", "scores", "count")


def _decoded(**kw: Any) -> Postprocessor:
    spec = PostprocessSpec(kind="detection", format="decoded", box_format="yxyx",
                           normalized=True, labels=("a", "b"), **kw)  # fmt: skip
    return Postprocessor(spec, output_names=OUT, input_size=(100, 50))


def test_decoded_detections_take_count_threshold_and_max_detections() -> None:
    boxes = np.array([[[0.1, 0.1, 0.5, 0.5], [0.0, 0.5, 1.0, 1.0], [0.2, 0.2, 0.3, 0.3],
                       [0.9, 0.9, 1.0, 1.0]]], np.float32)  # fmt: skip
    classes = np.array([[1, 0, 1, 0]], np.float32)
    scores = np.array([[0.5, 0.9, 0.1, 0.8]], np.float32)
    count = np.array([3], np.float32)  # the fourth is padding past the count
    out = _decoded()([boxes, classes, scores, count], source_size=(100, 50))
    assert out == {"kind": "detection", "detections": [
        {"box": [50.0, 0.0, 100.0, 50.0], "score": 0.9, "class": 0, "label": "a"},
        {"box": [10.0, 5.0, 50.0, 25.0], "score": 0.5, "class": 1, "label": "b"},
    ]}  # fmt: skip
    one = _decoded(max_detections=1)([boxes, classes, scores, count], source_size=(100, 50))
    assert [d["score"] for d in one["detections"]] == [0.9]
    none = _decoded()([boxes, classes, scores, np.array([0.0], np.float32)])
    assert none == {"kind": "detection", "detections": []}
    nan = _decoded()([boxes, classes, np.full((1, 4), np.nan, np.float32), count])
    assert nan["error"] == "non-finite output"
    bad_class = classes.copy()
    bad_class[0, 0] = np.inf
    assert _decoded()([boxes, bad_class, scores, count])["error"] == "non-finite output"
    padding = scores.copy()
    padding[0, 3] = np.nan  # past the count: not read
    assert len(_decoded()([boxes, classes, padding, count])["detections"]) == 2
    many = _decoded()([boxes, classes, scores, np.array([99.0], np.float32)])  # count > M
    assert [d["score"] for d in many["detections"]] == [0.9, 0.8, 0.5]


def test_decoded_needs_four_outputs_of_the_right_shapes() -> None:
    with pytest.raises(ConfigError, match="needs boxes, classes, scores and count"):
        Postprocessor(PostprocessSpec(kind="detection", format="decoded"),
                      output_names=("boxes", "scores"))  # fmt: skip
    with pytest.raises(ConfigError, match="four different outputs"):
        Postprocessor(PostprocessSpec(kind="detection", format="decoded", scores_output="boxes"),
                      output_names=OUT)  # fmt: skip
    with pytest.raises(ModelError, match=r"expected \[1, M, 4\], \[1, M\], \[1, M\] and \[1\]"):
        _decoded()([np.zeros((1, 3, 4)), np.zeros((1, 2)), np.zeros((1, 2)), np.zeros(1)])
    with pytest.raises(ModelError, match="decoded detections have shapes"):  # classes short
        _decoded()([np.zeros((1, 3, 4)), np.zeros((1, 2)), np.zeros((1, 3)), np.zeros(1)])


def test_end2end_rows_take_threshold_order_and_max_detections() -> None:
    """``end2end``: rows (x1, y1, x2, y2, score, class) the model decoded and suppressed: those
    scoring >= the threshold, best first, at most max_detections, no NMS (two overlapping boxes
    of one class both stay); zero padding is dropped; NaN in a kept row is an error result, in
    a dropped one it is not read; another shape is a model error."""
    rows = np.zeros((1, 8, 6), np.float32)  # rows 4..7: padding, as an nms=True export pads
    rows[0, :4] = [[10, 10, 50, 30, 0.6, 1], [12, 10, 50, 30, 0.9, 1],
                   [0, 0, 5, 5, 0.1, 0], [60, 20, 100, 40, 0.7, 0]]  # fmt: skip

    def post(**kw: Any) -> Postprocessor:
        spec = PostprocessSpec(kind="detection", format="end2end", box_format="xyxy",
                               labels=("a", "b"), **kw)  # fmt: skip
        return Postprocessor(spec, output_names=("output0",), input_size=(100, 50))

    out = post()([rows], source_size=(100, 50))
    assert out == {"kind": "detection", "detections": [
        {"box": [12.0, 10.0, 50.0, 30.0], "score": 0.9, "class": 1, "label": "b"},
        {"box": [60.0, 20.0, 100.0, 40.0], "score": 0.7, "class": 0, "label": "a"},
        {"box": [10.0, 10.0, 50.0, 30.0], "score": 0.6, "class": 1, "label": "b"},
    ]}  # fmt: skip
    assert len(post(max_detections=2)([rows])["detections"]) == 2
    normalized = rows.copy()
    normalized[0, :, :4] /= np.array([100, 50, 100, 50], np.float32)
    again = post(normalized=True)([normalized], source_size=(100, 50))
    assert [d["box"] for d in again["detections"]] == [d["box"] for d in out["detections"]]
    dropped = rows.copy()
    dropped[0, 2, 0] = np.nan  # a row scoring 0.1: not read
    assert len(post()([dropped])["detections"]) == 3
    kept = rows.copy()
    kept[0, 1, 2] = np.inf
    assert post()([kept])["error"] == "non-finite output"
    score = rows.copy()
    score[0, 5, 4] = np.nan
    assert post()([score])["error"] == "non-finite output"
    with pytest.raises(ModelError, match=r"end2end detections have shape \[1, 8, 7\]"):
        post()([np.zeros((1, 8, 7), np.float32)])
    assert len(post(score_threshold=0.0)([rows])["detections"]) == 4  # not the padding
    with pytest.raises(ConfigError, match=r"box_format = 'cxcywh'.*give 'xyxy'"):
        PostprocessSpec(kind="detection", format="end2end")


# --- a bare YOLO export: its one output is the head -------------------------------------------


def _normalized_yolo(model: onnx.ModelProto, size: int) -> onnx.ModelProto:
    """The head as Ultralytics' TFLite export writes it: the box rows (cx, cy, w, h) divided by
    the input size, so boxes come in [0, 1] of the input."""
    from onnx import helper, numpy_helper

    out = model.graph.output[0].name
    model.graph.output[0].name = "output0"
    for node in model.graph.node:
        node.output[:] = ["pixels" if o == out else o for o in node.output]
    rows = model.graph.output[0].type.tensor_type.shape.dim[1].dim_value
    div = np.ones((1, rows, 1), np.float32)
    div[0, :4] = size
    model.graph.initializer.append(numpy_helper.from_array(div, "box_scale"))
    model.graph.node.append(helper.make_node("Div", ["pixels", "box_scale"], ["output0"]))
    return model


def _ultralytics_export(d: Any, form: str, tmp_path: Path) -> Path:
    """The stand-in as Ultralytics writes each export: ``onnx`` (boxes in input pixels, names
    in ``metadata_props``); ``onnx-normalized`` (its boxes in [0, 1]); ``end2end`` (YOLO26 /
    YOLOv10: rows of box, score, class, ``end2end = True``); ``tflite`` (NHWC, boxes in [0, 1],
    the metadata as ``metadata.json`` in a zip appended to the file: Ultralytics 8.3 and later);
    ``tflite-8.1`` (the same metadata as one line of Python in ``temp_meta.txt``, named by
    TFLite metadata as the output's label file: Ultralytics 8.1-8.2)."""
    import zipfile

    from converters import standins

    model = onnx.load_from_string(d.onnx)
    metadata = {p.key: p.value for p in model.metadata_props}
    if form == "end2end":
        path = tmp_path / "yolo26_style.onnx"
        path.write_bytes(standins.yolo_end2end(d.onnx))
        return path
    if form == "onnx":
        path = tmp_path / "yolov8_style.onnx"
        onnx.save(model, str(path))
        return path
    model = _normalized_yolo(model, d.size)
    if form == "onnx-normalized":
        path = tmp_path / "yolov8_style_normalized.onnx"
        onnx.save(model, str(path))
        return path
    tflite = standins.tflite_fp16(model.SerializeToString())
    # as Ultralytics' exporter holds it: names a dict of int keys, args a dict
    meta = {**metadata, "names": dict(enumerate(d.names)), "imgsz": [d.size, d.size],
            "args": {"batch": 1, "half": True, "int8": False, "nms": False}}  # fmt: skip
    path = tmp_path / f"yolov8_style_{form}.tflite"
    if form == "tflite":
        path.write_bytes(tflite)
        with zipfile.ZipFile(path, "a", zipfile.ZIP_DEFLATED) as zf:
            zf.writestr("metadata.json", json.dumps(meta, indent=2))
    else:
        label_files = {0: ("temp_meta.txt", [str(meta)])}
        path.write_bytes(
            standins.add_tflite_metadata(tflite, label_files=label_files, value_labels=False)
        )
    return path


def _segment_or_pose(d: Any, task: str, tmp_path: Path) -> Path:
    """The stand-in's head as an Ultralytics ``segment`` or ``pose`` export lays it out: after
    the classes, 32 mask coefficients (5.0: above any class score, were they read as one) and a
    second output of mask prototypes ``[1, 32, 24, 24]`` (``segment-nhwc``: ``[1, 24, 40,
    32]``, listed first, as a TFLite file may); or two keypoints (x, y, visibility), each the
    box's centre with a visibility of 0.9. Metadata: task, names, ``kpt_shape``."""
    from onnx import helper, numpy_helper

    model = onnx.load_from_string(d.onnx)
    out = model.graph.output[0]
    for node in model.graph.node:
        node.output[:] = ["head" if o == out.name else o for o in node.output]
    dims = out.type.tensor_type.shape.dim
    features, anchors = dims[1].dim_value, dims[2].dim_value
    g = model.graph
    if task.startswith("segment"):
        coeffs = np.full((1, 32, anchors), 5.0, np.float32)
        g.initializer.append(numpy_helper.from_array(coeffs, "coefficients"))
        g.node.append(helper.make_node("Concat", ["head", "coefficients"], [out.name], axis=1))
        shape = [1, 32, 24, 24] if task == "segment" else [1, 24, 40, 32]
        protos = numpy_helper.from_array(np.zeros(shape, np.float32), "protos")
        g.node.append(helper.make_node("Constant", [], ["output1"], value=protos))
        info = helper.make_tensor_value_info("output1", onnx.TensorProto.FLOAT, shape)
        if task == "segment":
            g.output.append(info)
        else:
            g.output.insert(0, info)
        dims[1].dim_value = features + 32
        meta = {"task": "segment"}
    else:
        g.initializer.extend([
            numpy_helper.from_array(np.array([0], np.int64), "zero"),
            numpy_helper.from_array(np.array([2], np.int64), "two"),
            numpy_helper.from_array(np.array([1], np.int64), "axis1"),
            numpy_helper.from_array(np.full((1, 1, anchors), 0.9, np.float32), "visible"),
        ])  # fmt: skip
        g.node.append(helper.make_node("Slice", ["head", "zero", "two", "axis1"], ["centre"]))
        g.node.append(helper.make_node("Concat", ["centre", "visible"], ["point"], axis=1))
        g.node.append(helper.make_node("Concat", ["head", "point", "point"], [out.name], axis=1))
        dims[1].dim_value = features + 6
        meta = {"task": "pose", "kpt_shape": "[2, 3]"}
    meta["names"] = str(dict(enumerate(d.names)))
    del model.metadata_props[:]
    helper.set_model_props(model, meta)
    onnx.checker.check_model(model)
    path = tmp_path / f"yolov8_style_{task}.onnx"
    onnx.save(model, str(path))
    return path


def test_bare_segment_and_pose_exports_report_their_boxes_and_keypoints(
    standin_yolo: Any, tmp_path: Path
) -> None:
    """An Ultralytics segment export (``yolov8n-seg.onnx``: mask coefficients after the classes,
    a second output of prototypes) and a pose export (``yolov8n-pose.onnx``: keypoints after
    them) load bare as detectors of their own names: the same detections as the detect export
    of the same head (the coefficients, 5.0 each, are not read as class scores), and each pose
    detection's keypoints in frame pixels: here the box's centre, visibility 0.9. Their masks
    are not decoded (boxes only)."""
    d = standin_yolo
    profile = load_profile("x86-64")
    frames = []
    for x in d.eval_images[:24]:
        image = np.clip(x.transpose(1, 2, 0) * 255 + 0.5, 0, 255).astype(np.uint8)
        frame = np.full((216, 192, 3), 114, np.uint8)
        frame[:192] = cv2.resize(image[:, :, ::-1], None, fx=2, fy=2)
        frames.append(frame)

    def detect(path: Path) -> tuple[Any, list[list[dict[str, Any]]]]:
        loaded = load_model(path, profile=profile, state_dir=tmp_path)
        try:
            found = []
            for frame in frames:
                feeds, geometry = loaded.prepare_image(frame)
                out = loaded.postprocessor(loaded.infer(feeds), geometry=geometry,
                                           source_size=(192, 216))  # fmt: skip
                found.append(out["detections"])
            return loaded.postprocessor.spec, found
        finally:
            loaded.close()

    _, plain = detect(_ultralytics_export(d, "onnx", tmp_path))
    assert sum(map(len, plain)) >= 10
    for task in ("segment", "segment-nhwc", "pose"):
        spec, found = detect(_segment_or_pose(d, task, tmp_path))
        assert (spec.kind, spec.format, spec.num_classes, spec.labels) == (
            "detection", "yolo", len(d.names), d.names,
        )  # fmt: skip
        strip = [[{k: v for k, v in x.items() if k != "keypoints"} for x in f] for f in found]
        assert strip == plain, task
        if task.startswith("segment"):
            assert spec.output == "output0" and not any("keypoints" in x for f in found for x in f)
            continue
        assert spec.keypoint_shape == (2, 3)
        for x in (x for f in found for x in f):
            x1, y1, x2, y2 = x["box"]
            centre = [(x1 + x2) / 2, (y1 + y2) / 2]
            assert len(x["keypoints"]) == 2
            for point in x["keypoints"]:
                assert point[2] == pytest.approx(0.9, abs=1e-3)
                if min(x1, y1) > 0 and x2 < 192 and y2 < 216:  # a clipped box moves its centre
                    np.testing.assert_allclose(point[:2], centre, atol=0.01)


def test_a_pose_export_that_decodes_itself_stays_raw(tmp_path: Path) -> None:
    """A pose export with NMS inside (YOLO26-pose, ``nms=True``): rows of box, score, class and
    17 keypoints, ``[1, 300, 57]``. With one name it would fit a YOLOv5 head of 52 classes and
    report nothing (its scores read as 0): it is reported raw until such rows are read."""
    from onnx import helper, numpy_helper

    rows = numpy_helper.from_array(np.zeros((1, 300, 57), np.float32), "rows")
    graph = helper.make_graph(
        [helper.make_node("Constant", [], ["output0"], value=rows)],
        "pose_rows",
        [helper.make_tensor_value_info("images", onnx.TensorProto.FLOAT, [1, 3, 64, 64])],
        [helper.make_tensor_value_info("output0", onnx.TensorProto.FLOAT, [1, 300, 57])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    helper.set_model_props(model, {"task": "pose", "names": "{0: 'person'}",
                                   "kpt_shape": "[17, 3]", "end2end": "True"})  # fmt: skip
    path = tmp_path / "yolo26_pose_style.onnx"
    onnx.save(model, str(path))
    loaded = load_model(path, profile=load_profile("x86-64"), state_dir=tmp_path)
    try:
        assert loaded.postprocessor.spec.kind == "raw"
    finally:
        loaded.close()


def test_keypoints_and_class_counts_in_the_spec() -> None:
    """``num_classes`` and ``keypoint_shape`` on a hand-built head: the values after the classes
    are no class (YOLOv8 and YOLOv5 layouts); keypoints [0, 1] of the input (a TFLite export's)
    come back in frame pixels through the letterbox, clipped to the frame, and moved with the
    box into a stream's region of interest; a head that does not hold the classes and keypoints
    the spec gives is an error that says so; bad shapes are refused."""
    from edge_agent.model.preprocess import Geometry

    head = np.zeros((1, 4 + 2 + 4, 16), np.float32)  # two classes, two keypoints of (x, y)
    head[0, :4, 0] = (0.5, 0.5, 0.2, 0.2)
    head[0, 4, 0] = 0.8
    head[0, 6:, 0] = (0.5, 0.25, 1.2, -0.1)  # the second point beyond the input
    head[0, 6:, 1:] = 9.0  # far above any score: were they classes, every anchor would be one
    spec = PostprocessSpec(kind="detection", num_classes=2, keypoint_shape=[2, 2],
                           normalized=True)  # fmt: skip
    post = Postprocessor(spec, output_names=["output0"], input_size=(100, 100))
    geometry = Geometry(0.5, 0.5, 0.0, 25.0)  # a 200x100 frame letterboxed into 100x100
    out = post([head], geometry=geometry, source_size=(200, 100))
    (det,) = out["detections"]
    assert det["class"] == 0 and det["score"] == pytest.approx(0.8)
    np.testing.assert_allclose(det["box"], [80, 30, 120, 70], atol=1e-6)
    np.testing.assert_allclose(det["keypoints"], [[100, 0], [200, 0]], atol=1e-6)
    assert spec.to_dict()["keypoint_shape"] == [2, 2]
    assert PostprocessSpec.from_manifest(spec.to_dict()) == spec
    for short in ({"num_classes": 4}, {"num_classes": 2, "keypoint_shape": [1, 2]}):
        spec = PostprocessSpec(kind="detection", **{"keypoint_shape": [2, 2], **short})
        with pytest.raises(ModelError, match="10 values per box"):
            Postprocessor(spec, output_names=["output0"])([head])
    v5 = np.zeros((1, 40, 5 + 2 + 32), np.float32)  # YOLOv5-seg: objectness, 2 classes, 32
    v5[0, 0, :7] = (50, 50, 20, 20, 0.9, 0.1, 0.8)
    v5[0, :, 7:] = 9.0
    spec = PostprocessSpec(kind="detection", yolo_version=5, num_classes=2)
    (det,) = Postprocessor(spec, output_names=["output0"])([v5])["detections"]
    assert det["class"] == 1 and det["score"] == pytest.approx(0.72)
    from edge_agent.pipeline import _to_frame

    moved = _to_frame({"kind": "detection", "detections": [{"box": [1, 2, 3, 4],
                       "keypoints": [[1, 2, 0.5], [0, 0, 0.1]]}]}, (10, 20, 50, 50))  # fmt: skip
    (d,) = moved["detections"]
    assert d["box"] == [11, 22, 13, 24] and d["keypoints"] == [[11, 22, 0.5], [10, 20, 0.1]]
    for bad in ([2, 4], [0, 3], "2,3", [2.0, 3]):
        with pytest.raises(ConfigError, match="keypoint_shape"):
            PostprocessSpec(kind="detection", keypoint_shape=bad)
    with pytest.raises(ConfigError, match="keypoint_shape"):
        PostprocessSpec(kind="detection", format="ssd", keypoint_shape=[2, 3])
    with pytest.raises(ConfigError, match="num_classes"):
        PostprocessSpec(kind="detection", num_classes=0)


@pytest.mark.parametrize("form", ["onnx", "onnx-normalized", "end2end", "tflite", "tflite-8.1"])
def test_a_bare_ultralytics_export_reports_detections_with_its_own_names(
    standin_yolo: Any, tmp_path: Path, form: str
) -> None:
    """The load ``edge-agent run --model yolov8.onnx`` (or ``.tflite``, or an end-to-end
    YOLO26 export) does, with no flags: the class names come from the export's metadata (task
    = detect), the one output is read as the head it is, the (non-square) frame is letterboxed
    as Ultralytics does, and the boxes' units (input pixels in the ONNX export, [0, 1] in the
    TFLite one) are read from the model."""
    d = standin_yolo
    path = _ultralytics_export(d, form, tmp_path)
    loaded = load_model(path, profile=load_profile("x86-64"), state_dir=tmp_path)
    try:
        spec = loaded.postprocessor.spec
        if form == "end2end":
            assert (spec.kind, spec.format, spec.box_format) == ("detection", "end2end", "xyxy")
        else:
            assert (spec.kind, spec.format, spec.yolo_version) == ("detection", "yolo", 8)
        assert spec.labels == d.names
        assert spec.normalized is (form in ("onnx-normalized", "tflite", "tflite-8.1"))
        assert loaded.preprocessor is not None and loaded.preprocessor.spec.resize == "letterbox"
        scale = 2  # each 96-px image as the top of a 192x216 frame: letterboxed with padding
        found = []
        for x in d.eval_images:
            image = np.clip(x.transpose(1, 2, 0) * 255 + 0.5, 0, 255).astype(np.uint8)
            frame = np.full((216, 192, 3), 114, np.uint8)
            frame[:192] = cv2.resize(image[:, :, ::-1], None, fx=scale, fy=scale)
            feeds, geometry = loaded.prepare_image(frame)
            size = (frame.shape[1], frame.shape[0])
            raw = loaded.infer(feeds)
            out = loaded.postprocessor(raw, geometry=geometry, source_size=size)
            found.append(out["detections"])
            if form == "end2end":  # the model's own rows scoring >= 0.25, best first, no NMS
                rows = np.asarray(raw[0])[0]
                rows = rows[rows[:, 4] >= spec.score_threshold]
                rows = rows[np.argsort(-rows[:, 4], kind="stable")][: spec.max_detections]
                assert [x["class"] for x in out["detections"]] == rows[:, 5].astype(int).tolist()
                if len(rows):
                    x1, y1 = geometry.to_source(rows[:, 0], rows[:, 1])
                    x2, y2 = geometry.to_source(rows[:, 2], rows[:, 3])
                    by_hand = np.clip(np.stack([x1, y1, x2, y2], 1), 0, [192, 216, 192, 216])
                    got = np.array([x["box"] for x in out["detections"]])
                    np.testing.assert_allclose(got, by_hand, rtol=1e-5, atol=1e-3)
    finally:
        loaded.close()
    hit = total = 0
    for dets, gt_boxes, gt_classes in zip(found, d.eval_boxes, d.eval_classes):
        keep = gt_classes >= 0
        total += int(keep.sum())
        if dets:
            iou = box_iou(gt_boxes[keep] * scale, np.array([x["box"] for x in dets]))
            for row, cls in zip(iou, gt_classes[keep]):
                hit += any(v >= 0.5 and x["class"] == cls for v, x in zip(row, dets))
    assert hit / total >= 0.8, hit / total
    assert all(x["label"] == d.names[x["class"]] for dets in found for x in dets)


def test_an_ultralytics_export_with_nms_inside_reports_its_rows(tmp_path: Path) -> None:
    """An export made with ``nms=True`` (``[1, 300, 6]``: rows of box, score, class, padded)
    reports its rows (format ``end2end``, no NMS again). With one label it is read as a
    one-class YOLOv5 head ``[1, A, 6]`` unless its metadata says ``nms`` or ``end2end``; an
    output whose values are not rows (a class 0.5), or bad names, leave the file raw."""
    from onnx import TensorProto, helper, numpy_helper

    nodes = [
        helper.make_node("Flatten", ["images"], ["flat"]),
        helper.make_node("Slice", ["flat", "start", "end", "axis"], ["part"]),
        helper.make_node("Reshape", ["part", "shape"], ["output0"]),
    ]
    inits = [numpy_helper.from_array(np.array(v, np.int64), n) for n, v in
             (("start", [0]), ("end", [1800]), ("axis", [1]), ("shape", [1, 300, 6]))]  # fmt: skip
    graph = helper.make_graph(
        nodes, "nms_inside",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 32, 32])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, [1, 300, 6])], inits,
    )  # fmt: skip
    shifted = helper.make_graph(
        [*nodes[:2], helper.make_node("Add", ["part", "half"], ["moved"]),
         helper.make_node("Reshape", ["moved", "shape"], ["output0"])],
        "not_rows", graph.input, graph.output,
        [*inits, numpy_helper.from_array(np.array(0.5, np.float32), "half")],
    )  # fmt: skip
    cases = [
        ({"names": "{0: 'a', 1: 'b'}"}, ("detection", "end2end")),
        ({"names": "{0: 'a'}", "end2end": "False"}, ("detection", "yolo")),
        ({"names": "{0: 'a', 1: 'b'}", "graph": "shifted"}, ("raw", "yolo")),  # class 0.5
        ({"names": "{0: 'a'}"}, ("detection", "yolo")),
        ({"names": "{0: 'a'}", "args": "{'batch': 1, 'nms': True}"}, ("detection", "end2end")),
        ({"names": "{0: 'a'}", "end2end": "True"}, ("detection", "end2end")),
        ({"names": "{[1]: 'a'}"}, ("raw", "yolo")),
        ({"names": "{0: 'a', 'x': 'b'}"}, ("raw", "yolo")),
        ({"names": "not a literal", "end2end": "True"}, ("raw", "yolo")),
    ]
    for i, (props, (kind, fmt)) in enumerate(cases):
        chosen = shifted if props.pop("graph", None) else graph
        model = helper.make_model(chosen, opset_imports=[helper.make_opsetid("", 13)])
        model.ir_version = 8
        for key, value in {"task": "detect", **props}.items():
            prop = model.metadata_props.add()
            prop.key, prop.value = key, value
        path = tmp_path / f"nms{i}.onnx"
        onnx.save(model, str(path))
        loaded = load_model(path, profile=load_profile("x86-64"), state_dir=tmp_path)
        try:
            spec = loaded.postprocessor.spec
            assert (spec.kind, spec.format) == (kind, fmt), props
            if fmt == "end2end":  # nothing reported on a zero image: pixels, as ONNX exports
                assert spec.normalized is False and spec.box_format == "xyxy"
        finally:
            loaded.close()


def test_an_ultralytics_classifier_reports_its_own_names(tmp_path: Path) -> None:
    """An Ultralytics classify export (``task = classify``, its ``[1, C]`` output already
    probabilities) reports classes with its names, fed as Ultralytics feeds it (the shorter
    side resized, the middle cropped); names of another count leave it raw, ``--labels``
    win."""
    from onnx import TensorProto, helper, numpy_helper

    weights = np.array([[4.0, -4.0], [0.0, 0.0], [-4.0, 4.0]], np.float32)  # red vs blue
    graph = helper.make_graph(
        [helper.make_node("GlobalAveragePool", ["images"], ["pooled"]),
         helper.make_node("Flatten", ["pooled"], ["flat"]),
         helper.make_node("Gemm", ["flat", "w"], ["logits"]),
         helper.make_node("Softmax", ["logits"], ["output0"], axis=1)],
        "classify",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 32, 32])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, [1, 2])],
        [numpy_helper.from_array(weights, "w")],
    )  # fmt: skip
    red = np.zeros((48, 64, 3), np.uint8)
    red[..., 2] = 255  # BGR
    cases = [("{0: 'red', 1: 'blue'}", None, ("red", "blue")),
             ("{0: 'a', 1: 'b', 2: 'c'}", None, None),
             ("{0: 'red', 1: 'blue'}", ("x", "y"), ("x", "y"))]  # fmt: skip
    for i, (names, given, expected) in enumerate(cases):
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
        model.ir_version = 8
        for key, value in (("task", "classify"), ("names", names)):
            prop = model.metadata_props.add()
            prop.key, prop.value = key, value
        path = tmp_path / f"cls{i}.onnx"
        onnx.save(model, str(path))
        loaded = load_model(path, profile=load_profile("x86-64"), state_dir=tmp_path,
                            labels=given)  # fmt: skip
        try:
            spec = loaded.postprocessor.spec
            if expected is None:
                assert spec.kind == "raw"
                continue
            assert (spec.kind, spec.labels, spec.softmax) == ("classification", expected, False)
            assert loaded.preprocessor is not None and loaded.preprocessor.spec.resize == "crop"
            feeds, geometry = loaded.prepare_image(red)
            out = loaded.postprocessor(loaded.infer(feeds), geometry=geometry)
            assert out["label"] == expected[0] and out["score"] > 0.9
        finally:
            loaded.close()


def test_postprocess_raw_reports_a_recognised_detector_as_it_is(
    ssd: Any, standin_yolo: Any, tmp_path: Path
) -> None:
    """``--postprocess raw`` (``[model] postprocess``): the SSD file and the Ultralytics export
    report their outputs raw, with no letterbox; the inputs are still fed right; a bad value
    is a configuration error."""
    from edge_agent.config import parse_config

    yolo = tmp_path / "yolo.onnx"
    yolo.write_bytes(standin_yolo.onnx)
    for path in (ssd[1], yolo):
        model = load_model(path, profile=load_profile("x86-64"), state_dir=tmp_path,
                           labels=NAMES, postprocess="raw")  # fmt: skip
        try:
            assert model.postprocessor.spec.kind == "raw"
            assert model.preprocessor is not None and model.preprocessor.spec.resize == "stretch"
        finally:
            model.close()
    assert parse_config({"model": {"postprocess": "raw"}}).model.postprocess == "raw"
    with pytest.raises(ConfigError, match=r"\[model\] postprocess = 'boxes'"):
        parse_config({"model": {"postprocess": "boxes"}})
    out = tmp_path / "r.jsonl"
    code = edge_agent(
        ["run", "--model", str(ssd[1]), "--postprocess", "raw", "--source",
         "synthetic:?frames=2&width=64&height=48", "--results", f"jsonl:{out}",
         "--state-dir", str(tmp_path / "st")]
    )  # fmt: skip
    assert code == 0
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["output"]["kind"] for r in results] == ["raw", "raw"]
