"""Task-level fidelity (converters/task.py) against hand-computed cases, task inference from
shapes and metadata, and the head analysis (converters/heads.py) on small graphs."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from converters import heads
from converters.task import Task, infer_task, task_fidelity
from edge_agent.errors import ConfigError
from edge_agent.model.agreement import (
    ctc_fidelity,
    edit_distance,
    greedy_ctc,
    mask_fidelity,
    match_detections,
)


def _det(box: list[float], cls: int, score: float) -> dict[str, object]:
    return {"box": box, "class": cls, "score": score}


def test_detection_f1_hand_computed() -> None:
    ref = [
        [_det([0, 0, 10, 10], 0, 0.9), _det([20, 20, 30, 30], 1, 0.8)],
        [_det([0, 0, 10, 10], 2, 0.7)],
    ]
    got = [
        # matches the first (IoU 0.81 > 0.5); the second has the wrong class; one extra
        [
            _det([1, 1, 10, 10], 0, 0.85),
            _det([20, 20, 30, 30], 0, 0.8),
            _det([50, 50, 60, 60], 1, 0.3),
        ],
        [],  # the second sample's detection is lost
    ]
    f1, d = match_detections(ref, got)
    # tp = 1, 3 original, 3 converted: F1 = 2 / 6
    assert f1 == pytest.approx(1 / 3)
    assert d["matched"] == 1 and d["detections_original"] == 3 and d["detections_converted"] == 3
    assert d["precision"] == pytest.approx(1 / 3) and d["recall"] == pytest.approx(1 / 3)
    assert d["mean_iou"] == pytest.approx(81 / 100)
    assert d["mean_score_error"] == pytest.approx(0.05)


def test_detection_below_the_match_iou_is_not_a_match() -> None:
    ref = [[_det([0, 0, 10, 10], 0, 0.9)]]
    got = [[_det([6, 0, 16, 10], 0, 0.9)]]  # IoU 40 / 160 = 0.25
    f1, d = match_detections(ref, got)
    assert f1 == 0.0 and d["matched"] == 0
    assert match_detections([[]], [[]])[0] == 1.0  # nothing to find, nothing found


def test_each_original_detection_matches_once() -> None:
    ref = [[_det([0, 0, 10, 10], 0, 0.9)]]
    got = [[_det([0, 0, 10, 10], 0, 0.9), _det([0, 0, 10, 9], 0, 0.8)]]  # a duplicate NMS missed
    f1, d = match_detections(ref, got)
    assert d["matched"] == 1 and f1 == pytest.approx(2 / 3)


def _yolo_v8(boxes: list[tuple[float, float, float, float, int, float]], n: int = 20) -> np.ndarray:
    """[1, 4+C, N] with C = 3: cx, cy, w, h rows, then class scores."""
    out = np.zeros((1, 7, n), np.float32)
    for j, (cx, cy, w, h, c, s) in enumerate(boxes):
        out[0, :4, j] = (cx, cy, w, h)
        out[0, 4 + c, j] = s
    return out


def test_detection_fidelity_decodes_as_the_device_does() -> None:
    ref = _yolo_v8([(20, 20, 10, 10, 0, 0.9), (60, 60, 20, 20, 2, 0.8)])
    # int8 of a shared scale: the scores rounded to 0 under the boxes' scale
    crushed = ref.copy()
    crushed[0, 4:] = 0.0
    task = infer_task([ref], output_names=["output0"])
    assert task.kind == "detect" and task.postprocess == {"format": "yolo", "yolo_version": 8}
    same = task_fidelity(task, [[ref]], [[ref.copy()]])
    assert same["metric"] == "f1" and same["value"] == 1.0
    assert same["details"]["detections_original"] == 2
    lost = task_fidelity(task, [[ref]], [[crushed]])
    assert lost["value"] == 0.0 and lost["details"]["detections_converted"] == 0


def test_infer_task_reads_ultralytics_metadata() -> None:
    ref = _yolo_v8([(20, 20, 10, 10, 0, 0.9)])
    meta = {"task": "detect", "names": "{0: 'a', 1: 'b', 2: 'c'}", "stride": "32"}
    task = infer_task([ref], output_names=["output0"], metadata=meta)
    assert task.kind == "detect" and task.labels == ("a", "b", "c") and task.num_classes == 3
    assert "metadata" in task.reason
    # [1, N, 5+C]: YOLOv5 with objectness
    v5 = np.zeros((1, 30, 8), np.float32)
    v5[0, :, :4] = np.abs(np.random.default_rng(0).standard_normal((30, 4))) * 50
    v5[0, :, 4:] = 0.5
    t5 = infer_task([v5], output_names=["y"])
    assert t5.kind == "detect" and t5.postprocess["yolo_version"] == 5


def test_a_segment_or_pose_export_ships_the_classes_apart_from_what_follows() -> None:
    """An Ultralytics segment export's head holds 32 mask coefficients after its classes, a
    pose export's its keypoints: the bundle's postprocessing says how many classes there are
    (``num_classes``; before, the device read the coefficients as class scores) and, for pose,
    the keypoints' shape from ``kpt_shape``; the fidelity is judged on the boxes."""
    ref = _yolo_v8([(20, 20, 10, 10, 0, 0.9), (60, 60, 20, 20, 1, 0.8)], n=64)
    coefficients = np.full((1, 32, ref.shape[2]), 5.0, np.float32)  # above any class score
    seg = np.concatenate([ref[:, :6], coefficients], axis=1)  # two classes, then 32
    meta = {"task": "segment", "names": "{0: 'a', 1: 'b'}"}
    task = infer_task([seg], output_names=["output0"], metadata=meta)
    post = task.to_postprocess()
    assert post == {"kind": "detection", "format": "yolo", "yolo_version": 8, "num_classes": 2}
    other = seg.copy()
    other[0, 6:] = -7.0  # other coefficients: the same boxes and classes
    assert task_fidelity(task, [[seg]], [[other]])["value"] == 1.0
    from edge_agent.model.postprocess import Postprocessor, PostprocessSpec

    found = Postprocessor(PostprocessSpec.from_manifest(post), output_names=["output0"])([seg])
    assert [(d["class"], d["score"]) for d in found["detections"]] == [(0, 0.9), (1, 0.8)]
    kpts = np.zeros((1, 6, ref.shape[2]), np.float32)  # two keypoints: x, y, visibility
    pose = np.concatenate([ref[:, :5], kpts], axis=1)  # one class ("person"), then 6
    meta = {"task": "pose", "names": "{0: 'person'}", "kpt_shape": "[2, 3]"}
    post = infer_task([pose], output_names=["output0"], metadata=meta).to_postprocess()
    assert (post["num_classes"], post["keypoint_shape"]) == (1, [2, 3])
    meta["kpt_shape"] = "[2, 4]"  # not Ultralytics' shape: no keypoints
    post = infer_task([pose], output_names=["output0"], metadata=meta).to_postprocess()
    assert "keypoint_shape" not in post and post["num_classes"] == 1
    meta["kpt_shape"] = "[3, 3]"  # a shape the head does not hold: no keypoints
    post = infer_task([pose], output_names=["output0"], metadata=meta).to_postprocess()
    assert "keypoint_shape" not in post
    # a pose export that decodes its own detections (YOLO26, nms=True): rows of 6 + 51 values,
    # [1, 300, 57], are no YOLOv5 head of one class (whose scores would all read 0)
    rows = np.zeros((1, 300, 57), np.float32)
    rows[0, :3, :6] = [[10, 10, 40, 40, 0.9, 0], [50, 50, 90, 90, 0.8, 0], [5, 5, 9, 9, 0.3, 0]]
    meta = {"task": "pose", "names": "{0: 'person'}", "kpt_shape": "[17, 3]", "end2end": "True"}
    found = infer_task([rows], output_names=["output0"], metadata=meta)
    assert found.postprocess.get("yolo_version") != 5, found


def test_infer_task_reads_rows_a_model_decoded_itself() -> None:
    """``[N, M, 6]`` rows (x1, y1, x2, y2, score, class) padded with zeros, as Ultralytics'
    end-to-end (YOLO26, YOLOv10) and ``nms=True`` exports write them: judged as detections
    the model decoded (format ``end2end``, no NMS), with or without the metadata saying so;
    F1 drops when a converted model loses a row. A one-class YOLOv5 head ``[N, A, 6]`` (a class
    score where the index would be) stays YOLOv5; the names may come as JSON's string keys."""
    rows = np.zeros((2, 300, 6), np.float32)
    rows[:, 0] = [10, 12, 40, 50, 0.9, 2]
    rows[:, 1] = [60, 20, 90, 70, 0.7, 0]
    meta = {"task": "detect", "names": "{0: 'a', 1: 'b', 2: 'c'}", "end2end": "True"}
    task = infer_task([rows], output_names=["output0"], metadata=meta)
    assert task.kind == "detect" and task.labels == ("a", "b", "c")
    assert task.postprocess == {"format": "end2end", "box_format": "xyxy"}
    assert "metadata says end2end" in task.reason
    bare = infer_task([rows], output_names=["output0"])
    assert bare.kind == "detect" and bare.postprocess["format"] == "end2end"
    normalized = rows.copy()
    normalized[..., :4] /= 100
    assert infer_task([normalized], output_names=["y"]).postprocess["normalized"] is True
    assert task_fidelity(task, [[rows]], [[rows.copy()]])["value"] == 1.0
    lost = rows.copy()
    lost[:, 1] = 0  # the second row gone: one of two detections a sample
    assert task_fidelity(task, [[rows]], [[lost]])["value"] == pytest.approx(2 / 3)
    nothing = np.zeros_like(rows)  # an nms=True export that found nothing: units unknown
    assert "normalized" not in infer_task([nothing], output_names=["y"]).postprocess
    # YOLO26: its best 300 rows whatever they score, no padding; a low-scoring one inverted
    full = np.tile(rows[:, :2], (1, 150, 1))
    full[:, 2:, 4] = 0.01
    full[:, 3, :4] = [50, 50, 40, 40]
    assert infer_task([full], output_names=["y"]).postprocess["format"] == "end2end"
    full[:, 0, :4] = [50, 50, 40, 40]  # one scoring 0.9 inverted: not rows, unless it says so
    assert infer_task([full], output_names=["y"]).postprocess.get("format") != "end2end"
    said = infer_task([full], output_names=["y"], metadata={"args": "{'nms': True}"})
    assert said.postprocess["format"] == "end2end"
    v5 = np.zeros((1, 30, 6), np.float32)
    v5[0, :, :4] = np.abs(np.random.default_rng(0).standard_normal((30, 4))) * 50
    v5[0, :, 4:] = 0.5
    one = infer_task([v5], output_names=["y"], metadata={"task": "detect", "names": '{"0": "a"}'})
    assert one.postprocess == {"format": "yolo", "yolo_version": 5} and one.labels == ("a",)
    odd = {"task": "detect", "names": '{"\u00b2": "a"}'}  # a digit int() does not read
    assert infer_task([v5], output_names=["y"], metadata=odd).labels is None


def test_infer_task_ssd_ctc_mask_classify_raw() -> None:
    rng = np.random.default_rng(0)
    boxes = rng.uniform(0, 1, (4, 10, 4)).astype(np.float32)
    scores = rng.uniform(0, 1, (4, 10, 3)).astype(np.float32)
    ssd = infer_task([boxes, scores], output_names=["boxes", "scores"])
    assert ssd.kind == "detect" and ssd.outputs == (0, 1) and ssd.postprocess["format"] == "ssd"

    logits = rng.standard_normal((4, 16, 11))
    probs = (np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)).astype(np.float32)
    ctc = infer_task([probs], output_names=["y"])
    assert ctc.kind == "ctc" and ctc.blank is not None
    # log-softmax is a distribution too
    assert infer_task([np.log(probs)], output_names=["y"]).kind == "ctc"

    maps = rng.uniform(0, 1, (4, 1, 16, 16)).astype(np.float32)
    assert infer_task([maps], output_names=["y"]).kind == "mask"
    assert infer_task(
        [rng.standard_normal((4, 10)).astype(np.float32)], output_names=["y"]
    ).kind == ("classify")
    raw = infer_task([rng.standard_normal((4, 8, 16, 16)).astype(np.float32)], output_names=["y"])
    assert raw.kind == "raw" and "no output shape" in raw.reason
    # an override names what it cannot find
    with pytest.raises(ConfigError, match="--task detect"):
        infer_task([maps], output_names=["y"], requested="detect")
    assert infer_task([maps], output_names=["y"], requested="segmentation").kind == "mask"
    assert infer_task([probs], output_names=["y"], requested="raw").kind == "raw"


def test_ctc_hand_computed() -> None:
    def onehot(seq: list[int], c: int = 5) -> np.ndarray:
        out = np.full((len(seq), c), 0.01, np.float32)
        out[np.arange(len(seq)), seq] = 0.96
        return out

    # blank 0: [1 1 0 1 2 2] -> (1, 1, 2); [3 0 3] -> (3, 3)
    a = onehot([1, 1, 0, 1, 2, 2])
    assert greedy_ctc(a[None]) == [(1, 1, 2)]
    ref = np.stack([onehot([1, 1, 0, 1, 2, 2]), onehot([3, 0, 3, 0, 0, 0])])
    got = np.stack([onehot([1, 1, 0, 1, 2, 2]), onehot([3, 3, 3, 0, 0, 0])])  # (3,) lost one
    agreement, d = ctc_fidelity(ref, got)
    assert agreement == 0.5 and d["cer"] == pytest.approx(1 / 5)
    assert edit_distance((1, 2, 3), (1, 3)) == 1 and edit_distance((), (4, 4)) == 2
    assert edit_distance((1, 2, 3), (3, 2, 1)) == 2


def test_mask_iou_hand_computed() -> None:
    ref = np.zeros((2, 1, 4, 4), np.float32)
    ref[0, 0, :2, :2] = 0.9  # 4 pixels
    ref[1, 0, 0, 0] = 0.4  # above 0.3, below 0.5
    got = ref.copy()
    got[0, 0, 0, 0] = 0.1  # one pixel lost at both thresholds
    value, d = mask_fidelity(ref, got)
    # @0.5: {4 px} vs {3 px} -> 3/4; @0.3: {5 px} vs {4 px} -> 4/5
    assert d["iou@0.5"] == pytest.approx(0.75) and d["iou@0.3"] == pytest.approx(0.8)
    assert value == pytest.approx(0.75)
    # several classes of scores: mean IoU of the argmax maps
    two = np.zeros((1, 2, 2, 2), np.float32)
    two[0, 0] = [[2, 2], [0, 0]]
    two[0, 1] = [[0, 0], [2, 2]]
    flipped = two.copy()
    flipped[0, :, 0, 0] = [0, 2]
    v, d2 = mask_fidelity(two, flipped)
    # class 0: {2} vs {1} -> 1/2; class 1: {2} vs {3} -> 2/3
    assert v == pytest.approx((1 / 2 + 2 / 3) / 2) and d2["classes"] == 2


def test_classify_task_metric() -> None:
    task = Task("classify", "test", (0,))
    ref = [[np.array([[0.1, 0.9], [0.8, 0.2]], np.float32)]]
    got = [[np.array([[0.2, 0.8], [0.4, 0.6]], np.float32)]]
    fid = task_fidelity(task, ref, got)
    assert fid == {
        "kind": "classify",
        "metric": "top1_agreement",
        "value": 0.5,
        "details": {"reason": "test", "samples": 2},
    }


def _head_graph() -> helper.ModelProto:
    """conv -> split into boxes (x 100) and scores (sigmoid) -> concat -> output: a detector's
    mixed-range output, with a fixed 1x1 conv (4 weights) in the box branch."""
    w = numpy_helper.from_array(np.ones((8, 3, 3, 3), np.float32) * 0.1, "w")
    fixed = numpy_helper.from_array(np.ones((4, 4, 1, 1), np.float32) * 0.25, "fixed")
    k = numpy_helper.from_array(np.array(100.0, np.float32), "k")
    split = numpy_helper.from_array(np.array([4, 4], np.int64), "split")
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["f"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Split", ["f", "split"], ["b0", "s0"], name="split", axis=1),
        helper.make_node("Conv", ["b0", "fixed"], ["b1"], name="dfl"),
        helper.make_node("Mul", ["b1", "k"], ["b2"], name="scale"),
        helper.make_node("Sigmoid", ["s0"], ["s1"], name="sig"),
        helper.make_node("Concat", ["b2", "s1"], ["c"], name="cat", axis=1),
        helper.make_node("Reshape", ["c", "shape"], ["y"], name="flat"),
    ]
    shape = numpy_helper.from_array(np.array([1, 8, -1], np.int64), "shape")
    graph = helper.make_graph(
        nodes,
        "head",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 64])],
        [w, fixed, k, split, shape],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_mixed_range_output_concat_is_kept_float() -> None:
    model = _head_graph()
    ranges = {"b2": (0.0, 640.0), "s1": (0.0, 1.0), "c": (0.0, 640.0)}
    found = heads.mixed_range_outputs(model, ranges)
    assert [f["node"] for f in found] == ["cat", "flat"]
    assert "640" in found[0]["reason"] and "round" in found[0]["reason"]
    # parts of similar magnitude share a scale fine
    assert heads.mixed_range_outputs(model, {"b2": (0.0, 2.0), "s1": (0.0, 1.0)}) == []


def test_decode_tail_stops_at_the_last_learned_layer() -> None:
    model = _head_graph()
    # the 4-weight fixed conv is decode arithmetic (like YOLO's DFL), the 3x3 conv is learned
    assert heads.decode_tail(model) == ["split", "dfl", "scale", "sig", "cat", "flat"]


def test_attention_and_layernorm_blocks() -> None:
    d = 8
    inits = [
        numpy_helper.from_array(np.eye(d, dtype=np.float32), "wq"),
        numpy_helper.from_array(np.array(0.35, np.float32), "scale"),
        numpy_helper.from_array(np.ones(d, np.float32), "g"),
        numpy_helper.from_array(np.zeros(d, np.float32), "b"),
        numpy_helper.from_array(np.array(2.0, np.float32), "two"),
        numpy_helper.from_array(np.array(1e-5, np.float32), "eps"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "wq"], ["q"], name="q"),
        helper.make_node("Transpose", ["x"], ["kt"], name="kt", perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "kt"], ["s"], name="qk"),
        helper.make_node("Mul", ["s", "scale"], ["s2"], name="scale_mul"),
        helper.make_node("Softmax", ["s2"], ["p"], name="softmax", axis=-1),
        helper.make_node("MatMul", ["p", "x"], ["a"], name="av"),
        helper.make_node("ReduceMean", ["a"], ["m"], name="mean", axes=[-1]),
        helper.make_node("Sub", ["a", "m"], ["c"], name="sub"),
        helper.make_node("Pow", ["c", "two"], ["c2"], name="pow"),
        helper.make_node("ReduceMean", ["c2"], ["v"], name="var", axes=[-1]),
        helper.make_node("Add", ["v", "eps"], ["ve"], name="add_eps"),
        helper.make_node("Sqrt", ["ve"], ["sd"], name="sqrt"),
        helper.make_node("Div", ["c", "sd"], ["n"], name="div"),
        helper.make_node("Mul", ["n", "g"], ["ng"], name="gamma"),
        helper.make_node("Add", ["ng", "b"], ["y"], name="beta"),
    ]
    graph = helper.make_graph(
        nodes,
        "attn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, d])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, d])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    found = {b["kind"]: b["nodes"] for b in heads.blocks(model)}
    assert found["attention"] == ["qk", "scale_mul", "softmax", "av"]
    assert found["layernorm"] == [
        "mean", "sub", "pow", "var", "add_eps", "sqrt", "div", "gamma", "beta",
    ]  # fmt: skip
