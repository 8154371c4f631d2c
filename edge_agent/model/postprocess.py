"""Raw model outputs -> the JSON-ready ``output`` object of each result, configured by the bundle
manifest's ``postprocess`` block (written by ``converters/build.py``).

Kinds and the result each one produces (keys are a contract the sinks and the cloud rely on):

- ``classification``: ``{"kind", "top": [{"index", "label", "score"}, ...], "class", "label",
  "score"}``; scores are probabilities (``softmax = true`` turns logits into them).
- ``detection``: ``{"kind", "detections": [{"box": [x1, y1, x2, y2], "score", "class",
  "label"}, ...]}``, sorted by score, class-wise NMS unless ``class_agnostic``; boxes in source
  pixels when a :class:`~edge_agent.model.preprocess.Geometry` is given, clipped to the source size.
  With ``keypoint_shape`` (a pose model) each detection also has ``"keypoints": [[x, y(,
  score)], ...]``, mapped and clipped as the boxes.
- ``segmentation``: ``{"kind", "classes": [{"index", "label", "fraction"}, ...], "dominant",
  "size": [H, W]}``, classes present sorted by pixel fraction.
- ``raw``: ``{"kind", "outputs": {name: list | {"shape", "mean", "min", "max"}}}``.

A non-finite value (NaN, inf) in an output used does not raise: the result carries
``"error": "non-finite output"`` and the kind's empty structure, and
:attr:`Postprocessor.nonfinite` counts it. An output whose shape does not fit the spec is a
:class:`~edge_agent.errors.ModelError`. Everything is vectorized with numpy; the only Python loops
build the final (small) JSON lists and walk the boxes NMS keeps.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from edge_agent.errors import ConfigError, ModelError
from edge_agent.model.export_metadata import as_keypoint_shape
from edge_agent.model.preprocess import Geometry

#: ``text``: a CTC recognizer's ``[1, T, C]`` output read as the text it spells (an OCR
#: recognizer: PP-OCR's, CRNN's, SVTR's)
KINDS = ("classification", "detection", "segmentation", "raw", "text")
#: ``decoded``: the model decoded and suppressed its boxes itself (TFLite's
#: ``TFLite_Detection_PostProcess``: boxes, classes, scores and their count); ``end2end``: so
#: did it, into one output of rows (box, score, class): Ultralytics' NMS-free YOLO26 and YOLOv10
#: exports, and any Ultralytics export made with ``nms=True``
DETECTION_FORMATS = ("yolo", "ssd", "decoded", "end2end")
YOLO_VERSIONS = (5, 8)
BOX_FORMATS = ("cxcywh", "xyxy", "yxyx")
NONFINITE = "non-finite output"
#: Manifest keys that are accepted and ignored (informational, written by the converter).
IGNORED_KEYS: tuple[str, ...] = ()
#: At most this many boxes (the best scoring) go into NMS.
MAX_NMS_CANDIDATES = 10_000
#: A raw output with at most this many elements is reported in full, otherwise summarized.
RAW_LIST_MAX = 64
# Clamp for encoded SSD box sizes before exp() (torchvision's bbox_xform_clip): no overflow.
_LOG_SIZE_CLIP = math.log(1000.0 / 16)


@dataclass(frozen=True)
class PostprocessSpec:
    """How raw outputs become a result. Validated on construction; errors name key and value."""

    #: ``classification`` | ``detection`` | ``segmentation`` | ``raw``.
    kind: str
    #: The output tensor to read, by name; None = the first. For ``ssd``: the boxes output.
    output: str | None = None
    #: Class names, by class index; an index past the end gets label None.
    labels: tuple[str, ...] | None = None
    #: The scores are logits: apply softmax over classes (classification, ssd).
    softmax: bool = False
    #: Classification: how many of the best classes to report.
    top_k: int = 5
    #: Detection: ``yolo`` (one output), ``ssd`` (a boxes and a scores output) or ``decoded``
    #: (boxes ``[1, M, 4]``, classes ``[1, M]``, scores ``[1, M]`` and their count ``[1]``,
    #: decoded and suppressed by the model: no NMS here) or ``end2end`` (one output
    #: ``[1, M, 6]`` of rows: a box per ``box_format``, its score, its class; decoded and
    #: suppressed by the model, padding rows scoring 0: no NMS here).
    format: str = "yolo"
    #: YOLO layout: 5 = ``[N, A, 5+C]`` with objectness, 8 = ``[N, 4+C, A]`` without; None =
    #: from the shape (8 when the feature axis comes first, i.e. ``shape[1] < shape[2]``).
    yolo_version: int | None = None
    #: YOLO: the class scores are this many features after the box (and objectness); what
    #: follows them is not classes (an Ultralytics segment export's 32 mask coefficients, a
    #: pose export's keypoints). None = every remaining feature.
    num_classes: int | None = None
    #: YOLO: a pose export's keypoints, after the classes: (K, 2) or (K, 3) (Ultralytics'
    #: ``kpt_shape``): x, y in the boxes' units, and a visibility score; each detection reports
    #: them (``keypoints``: [[x, y, score], ...] in source pixels). None = none.
    keypoint_shape: tuple[int, ...] | None = None
    #: SSD: the scores output ``[N, A, C]`` by name; None = the first output that is not boxes.
    #: ``decoded``: the scores ``[1, M]``; None = the third output.
    scores_output: str | None = None
    #: ``decoded``: the class indices ``[1, M]`` by name; None = the second output.
    classes_output: str | None = None
    #: ``decoded``: how many of the M are detections ``[1]``, by name; None = the fourth output.
    count_output: str | None = None
    #: Detection: drop boxes scoring below this (score = objectness * class score for YOLOv5).
    score_threshold: float = 0.25
    #: Detection: NMS suppresses a box whose IoU with a better one is above this.
    iou_threshold: float = 0.45
    #: Detection: at most this many boxes in a result.
    max_detections: int = 100
    #: Box coordinates: ``cxcywh`` | ``xyxy`` | ``yxyx`` (TF SSD). With ``anchors`` it only gives
    #: the axis order of encodings and anchors: ``yxyx`` = (y, x, h, w), otherwise (x, y, w, h).
    box_format: str = "cxcywh"
    #: Box coordinates are in [0, 1] of the model input rather than in input pixels.
    normalized: bool = False
    #: SSD: center-size anchors ``[A, 4]`` (axis order per ``box_format``); when given the boxes
    #: output holds encodings decoded as ``c = t * var * anchor_size + anchor_c``,
    #: ``size = exp(t * var) * anchor_size``.
    anchors: tuple[tuple[float, ...], ...] | None = None
    #: SSD: variances of the encodings, in encoding order.
    variances: tuple[float, ...] = (0.1, 0.1, 0.2, 0.2)
    #: SSD: a class index that means background (never reported), e.g. 0 for TF SSD models.
    background_class: int | None = None
    #: Detection: one NMS across classes instead of one per class.
    class_agnostic: bool = False
    #: Text: the class index of CTC's blank (0 for PP-OCR, CRNN and most CTC heads); ``labels``
    #: give every class's character by class index, the blank's entry unused.
    blank: int = 0

    def __post_init__(self) -> None:
        _check_choice("kind", self.kind, KINDS)
        for key in ("output", "scores_output", "classes_output", "count_output"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, str) or not value):
                raise _bad(key, value, "must be an output name")
        if self.labels is not None:
            if isinstance(self.labels, str) or not isinstance(self.labels, Sequence):
                raise _bad("labels", self.labels, "must be a list of strings")
            if not all(isinstance(x, str) for x in self.labels):
                raise _bad("labels", self.labels, "must be a list of strings")
            object.__setattr__(self, "labels", tuple(self.labels))
        for key in ("softmax", "normalized", "class_agnostic"):
            if not isinstance(getattr(self, key), bool):
                raise _bad(key, getattr(self, key), "must be true or false")
        for key in ("top_k", "max_detections"):
            _check_int(key, getattr(self, key), minimum=1)
        _check_choice("format", self.format, DETECTION_FORMATS)
        if self.yolo_version is not None:
            _check_choice("yolo_version", self.yolo_version, YOLO_VERSIONS)
        for key in ("score_threshold", "iou_threshold"):
            value = getattr(self, key)
            if not _is_number(value) or not 0.0 <= value <= 1.0:
                raise _bad(key, value, "must be a number from 0 to 1")
        _check_choice("box_format", self.box_format, BOX_FORMATS)
        variances = _float_tuple("variances", self.variances)
        if len(variances) != 4 or not all(v > 0 for v in variances):
            raise _bad("variances", self.variances, "give 4 positive numbers")
        object.__setattr__(self, "variances", variances)
        if self.anchors is not None:
            if self.format != "ssd":
                raise _bad("anchors", "[...]", f"only for format 'ssd', not {self.format!r}")
            if isinstance(self.anchors, str) or not isinstance(self.anchors, Sequence):
                raise _bad("anchors", self.anchors, "must be a list of [c, c, size, size]")
            anchors = tuple(_float_tuple("anchors", a) for a in self.anchors)
            if not anchors or any(len(a) != 4 or a[2] <= 0 or a[3] <= 0 for a in anchors):
                bad = next((list(a) for a in anchors if len(a) != 4 or min(a[2:]) <= 0), [])
                raise _bad("anchors", bad, "each anchor is 4 numbers [c, c, size, size], sizes > 0")
            object.__setattr__(self, "anchors", anchors)
        if self.background_class is not None:
            _check_int("background_class", self.background_class, minimum=0)
        if self.num_classes is not None:
            _check_int("num_classes", self.num_classes, minimum=1)
        if self.keypoint_shape is not None:
            shape = as_keypoint_shape(self.keypoint_shape)
            if shape is None:
                raise _bad("keypoint_shape", self.keypoint_shape,
                           "give [K, 2] or [K, 3] (K keypoints >= 1)")  # fmt: skip
            if self.format != "yolo":
                raise _bad("keypoint_shape", list(shape), f"only for format 'yolo', not "
                           f"{self.format!r}")  # fmt: skip
            object.__setattr__(self, "keypoint_shape", shape)
        _check_int("blank", self.blank, minimum=0)
        if self.kind == "detection" and self.format == "end2end" and self.box_format != "xyxy":
            raise _bad("box_format", self.box_format, "end2end rows are (x1, y1, x2, y2, ...): "
                       "give 'xyxy'")  # fmt: skip

    @classmethod
    def from_manifest(cls, data: Mapping[str, Any]) -> PostprocessSpec:
        """From a manifest's ``postprocess`` block; unknown keys are an error."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"postprocess: {data!r}: must be a table of options")
        known = set(cls.__dataclass_fields__)
        extra = sorted(set(data) - known - set(IGNORED_KEYS))
        if extra:
            raise ConfigError(f"postprocess: unknown keys {extra} (known: {sorted(known)})")
        if "kind" not in data:
            raise ConfigError("postprocess: kind is missing: expected one of " + str(KINDS))
        return cls(**{k: v for k, v in data.items() if k in known})

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready; ``from_manifest(spec.to_dict()) == spec``."""
        data = asdict(self)
        if self.labels is not None:
            data["labels"] = list(self.labels)
        if self.anchors is not None:
            data["anchors"] = [list(a) for a in self.anchors]
        if self.keypoint_shape is not None:
            data["keypoint_shape"] = list(self.keypoint_shape)
        data["variances"] = list(self.variances)
        return data


class Postprocessor:
    """Applies a PostprocessSpec to a model's outputs. Output indices, anchors and constants are
    resolved once here, not per frame.

    ``input_size`` (width, height) of the model input is used only to turn ``normalized`` boxes
    into input pixels (and so to undo a letterbox). Without it the input size is inferred from the
    geometry and source size (within 1 px), or normalized boxes are scaled by the source size when
    there is no geometry (exact for a stretch resize), or left normalized when neither is given.
    """

    def __init__(
        self,
        spec: PostprocessSpec,
        *,
        output_names: Sequence[str],
        input_size: tuple[int, int] | None = None,
    ) -> None:
        self.spec = spec
        self.output_names = tuple(output_names)
        self.input_size = input_size
        #: How many calls met a non-finite output (each returned an ``error`` result).
        self.nonfinite = 0
        if not self.output_names:
            raise ConfigError("postprocess: the model has no outputs")
        self.index = self._resolve("output", spec.output, default=0)
        self.scores_index: int | None = None
        #: ``decoded``: the classes and count outputs
        self.classes_index = self.count_index = 0
        # SSD without names: boxes/scores may come in either order; decided by shape per call.
        self._ssd_auto = False
        if spec.kind == "detection" and spec.format == "ssd":
            if len(self.output_names) < 2:
                raise ConfigError(
                    f"postprocess: format = 'ssd': needs a boxes and a scores output, the model "
                    f"has {list(self.output_names)}"
                )
            other = next(i for i in range(len(self.output_names)) if i != self.index)
            self.scores_index = self._resolve("scores_output", spec.scores_output, default=other)
            if self.scores_index == self.index:
                raise ConfigError(
                    f"postprocess: scores_output = {spec.scores_output!r}: is also the boxes output"
                )
            self._ssd_auto = spec.output is None and spec.scores_output is None
        if spec.kind == "detection" and spec.format == "decoded":
            if len(self.output_names) < 4:
                raise ConfigError(
                    f"postprocess: format = 'decoded': needs boxes, classes, scores and count "
                    f"outputs, the model has {list(self.output_names)}"
                )
            self.classes_index = self._resolve("classes_output", spec.classes_output, default=1)
            self.scores_index = self._resolve("scores_output", spec.scores_output, default=2)
            self.count_index = self._resolve("count_output", spec.count_output, default=3)
            roles = (self.index, self.classes_index, self.scores_index, self.count_index)
            if len(set(roles)) != 4:
                raise ConfigError(
                    "postprocess: format = 'decoded': output, classes_output, scores_output "
                    "and count_output must name four different outputs"
                )
        self._anchors: np.ndarray | None = None
        self._variances = np.asarray(spec.variances, np.float64)
        yx = spec.box_format == "yxyx"
        if spec.anchors is not None:
            anchors = np.asarray(spec.anchors, np.float64)
            # Canonical order (cx, cy, w, h); encodings are reordered the same way per call.
            self._anchors = anchors[:, [1, 0, 3, 2]] if yx else anchors
            if yx:
                self._variances = self._variances[[1, 0, 3, 2]]
        self._labels = spec.labels or ()

    def _resolve(self, key: str, name: str | None, *, default: int) -> int:
        if name is None:
            return default
        if name not in self.output_names:
            raise ConfigError(
                f"postprocess: {key} = {name!r}: the model has no such output "
                f"(outputs: {list(self.output_names)})"
            )
        return self.output_names.index(name)

    def __call__(
        self,
        outputs: Sequence[np.ndarray],
        *,
        geometry: Geometry | None = None,
        source_size: tuple[int, int] | None = None,
    ) -> dict[str, Any]:
        """One result's ``output`` object. ``source_size`` is (width, height) of the source."""
        if len(outputs) != len(self.output_names):
            raise ModelError(
                f"postprocess: got {len(outputs)} outputs, the model declares "
                f"{len(self.output_names)} ({list(self.output_names)})"
            )
        kind = self.spec.kind
        if kind == "classification":
            return self._classification(np.asarray(outputs[self.index]))
        if kind == "detection":
            return self._detection(outputs, geometry=geometry, source_size=source_size)
        if kind == "segmentation":
            return self._segmentation(np.asarray(outputs[self.index]))
        if kind == "text":
            return self._text(np.asarray(outputs[self.index]))
        return self._raw(outputs)

    # -- kinds --------------------------------------------------------------------------------

    def _nonfinite(self, result: dict[str, Any]) -> dict[str, Any]:
        self.nonfinite += 1
        return {"kind": self.spec.kind, "error": NONFINITE, **result}

    def _label(self, index: int) -> str | None:
        return self._labels[index] if 0 <= index < len(self._labels) else None

    def _classification(self, out: np.ndarray) -> dict[str, Any]:
        if out.ndim == 0 or out.size == 0:
            raise ModelError(f"postprocess: classification output has shape {list(out.shape)}")
        if not _all_finite(out):
            return self._nonfinite({"top": [], "class": None, "label": None, "score": None})
        scores = (out.reshape(out.shape[0], -1)[0] if out.ndim > 1 else out).astype(np.float64)
        if self.spec.softmax:
            scores = softmax(scores)
        k = min(self.spec.top_k, scores.size)
        if k < scores.size:
            part = np.argpartition(-scores, k - 1)[:k]
            top = part[np.argsort(-scores[part], kind="stable")]
        else:
            top = np.argsort(-scores, kind="stable")
        values = _round_sig(scores[top]).tolist()
        entries = [
            {"index": i, "label": self._label(i), "score": s} for i, s in zip(top.tolist(), values)
        ]
        best = entries[0]
        return {
            "kind": "classification",
            "top": entries,
            "class": best["index"],
            "label": best["label"],
            "score": best["score"],
        }

    def _detection(
        self,
        outputs: Sequence[np.ndarray],
        *,
        geometry: Geometry | None,
        source_size: tuple[int, int] | None,
    ) -> dict[str, Any]:
        spec = self.spec
        if spec.format == "decoded":
            return self._decoded(outputs, geometry=geometry, source_size=source_size)
        if spec.format == "end2end":
            return self._end2end(outputs, geometry=geometry, source_size=source_size)
        if spec.format == "yolo":
            out = np.asarray(outputs[self.index])
            if not _all_finite(out):
                return self._nonfinite({"detections": []})
            boxes, scores, classes, points = self._decode_yolo(out)
        else:
            points = None
            assert self.scores_index is not None
            raw_boxes = np.asarray(outputs[self.index])
            raw_scores = np.asarray(outputs[self.scores_index])
            if self._ssd_auto and raw_boxes.shape[-1:] != (4,) and raw_scores.shape[-1:] == (4,):
                raw_boxes, raw_scores = raw_scores, raw_boxes
            if not (_all_finite(raw_boxes) and _all_finite(raw_scores)):
                return self._nonfinite({"detections": []})
            boxes, scores, classes = self._decode_ssd(raw_boxes, raw_scores)
        if scores.size == 0:
            return {"kind": "detection", "detections": []}
        xyxy = self._to_input_pixels(boxes, geometry=geometry, source_size=source_size)
        if spec.class_agnostic:
            keep = nms(xyxy, scores, spec.iou_threshold, max_out=spec.max_detections)
        else:
            # One NMS for all classes: shift each class to its own region so that boxes of
            # different classes never overlap (torchvision's batched_nms).
            span = float(xyxy.max() - xyxy.min()) + 1.0
            shifted = xyxy + (classes.astype(np.float64) * span)[:, None]
            keep = nms(shifted, scores, spec.iou_threshold, max_out=spec.max_detections)
        return self._detections(
            xyxy[keep], scores[keep], classes[keep], geometry=geometry, source_size=source_size,
            keypoints=None if points is None else points[keep],
        )  # fmt: skip

    def _decoded(
        self,
        outputs: Sequence[np.ndarray],
        *,
        geometry: Geometry | None,
        source_size: tuple[int, int] | None,
    ) -> dict[str, Any]:
        """Boxes the model decoded and suppressed (TFLite_Detection_PostProcess): the first
        ``count`` of them, those scoring at least ``score_threshold``, no NMS."""
        spec = self.spec
        assert self.scores_index is not None
        boxes = np.asarray(outputs[self.index])
        scores = np.asarray(outputs[self.scores_index]).reshape(-1)
        classes = np.asarray(outputs[self.classes_index]).reshape(-1)
        count = np.asarray(outputs[self.count_index]).reshape(-1)
        if (
            boxes.shape[-1:] != (4,)
            or not boxes.size // 4 == scores.size == classes.size
            or count.size != 1
        ):
            raise ModelError(
                f"postprocess: decoded detections have shapes {list(boxes.shape)} (boxes), "
                f"{list(np.shape(outputs[self.classes_index]))} (classes), "
                f"{list(np.shape(outputs[self.scores_index]))} (scores) and "
                f"{list(count.shape)} (count), expected [1, M, 4], [1, M], [1, M] and [1]"
            )
        if not _all_finite(count):
            return self._nonfinite({"detections": []})
        n = max(0, min(int(count[0]), scores.size))  # the rows past the count are padding
        boxes, scores, classes = boxes.reshape(-1, 4)[:n], scores[:n], classes[:n]
        if not (_all_finite(boxes) and _all_finite(scores) and _all_finite(classes)):
            return self._nonfinite({"detections": []})
        scores = scores.astype(np.float64)
        keep = np.flatnonzero(scores >= spec.score_threshold)
        keep = keep[np.argsort(-scores[keep], kind="stable")][: spec.max_detections]
        xyxy = _to_xyxy(boxes[keep].astype(np.float64), spec.box_format)
        xyxy = self._to_input_pixels(xyxy, geometry=geometry, source_size=source_size)
        return self._detections(
            xyxy, scores[keep], np.rint(classes[keep]).astype(np.int64),
            geometry=geometry, source_size=source_size,
        )  # fmt: skip

    def _end2end(
        self,
        outputs: Sequence[np.ndarray],
        *,
        geometry: Geometry | None,
        source_size: tuple[int, int] | None,
    ) -> dict[str, Any]:
        """Rows the model decoded and suppressed (box, score, class): those scoring at least
        ``score_threshold``, best first, no NMS (as Ultralytics reads an end-to-end head)."""
        spec = self.spec
        out = np.asarray(outputs[self.index])
        if out.ndim != 3 or out.shape[0] != 1 or out.shape[2] != 6:
            raise ModelError(
                f"postprocess: end2end detections have shape {list(out.shape)}, expected "
                "[1, M, 6] (x1, y1, x2, y2, score, class)"
            )
        rows = out[0]
        scores = rows[:, 4].astype(np.float64)
        # NaN compares false (checked next); a padding row scores 0 even at a threshold of 0
        keep = np.flatnonzero((scores >= spec.score_threshold) & (scores > 0))
        if not (_all_finite(scores) and _all_finite(rows[keep])):
            return self._nonfinite({"detections": []})
        keep = keep[np.argsort(-scores[keep], kind="stable")][: spec.max_detections]
        xyxy = _to_xyxy(rows[keep, :4].astype(np.float64), spec.box_format)
        xyxy = self._to_input_pixels(xyxy, geometry=geometry, source_size=source_size)
        return self._detections(
            xyxy, scores[keep], np.rint(rows[keep, 5]).astype(np.int64),
            geometry=geometry, source_size=source_size,
        )  # fmt: skip

    def _detections(
        self,
        xyxy: np.ndarray,
        scores: np.ndarray,
        classes: np.ndarray,
        *,
        geometry: Geometry | None,
        source_size: tuple[int, int] | None,
        keypoints: np.ndarray | None = None,
    ) -> dict[str, Any]:
        """Boxes in input pixels -> the result: in source pixels, clipped to the source.
        ``keypoints`` ``[n, K, 2 or 3]`` in the boxes' units (normalized or input pixels) go
        the same way, each detection's as ``keypoints``."""
        xyxy = _to_source(xyxy.reshape(-1, 2), geometry, source_size).reshape(-1, 4)
        box_list = _round_sig(xyxy).tolist()
        score_list = _round_sig(scores).tolist()
        found = [
            {"box": b, "score": s, "class": c, "label": self._label(c)}
            for b, s, c in zip(box_list, score_list, classes.tolist())
        ]
        if keypoints is not None and len(found):
            points = keypoints.copy()
            n, k = points.shape[:2]
            xy = self._to_input_pixels(
                points[..., :2].reshape(-1, 2), geometry=geometry, source_size=source_size
            )
            points[..., :2] = _to_source(xy, geometry, source_size).reshape(n, k, 2)
            for det, p in zip(found, _round_sig(points).tolist()):
                det["keypoints"] = p
        return {"kind": "detection", "detections": found}

    def _decode_yolo(
        self, out: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
        """-> candidate boxes [K, 4] (spec.box_format, float64), scores [K], classes [K], and
        with ``keypoint_shape`` their keypoints [K, P, 2 or 3] (the boxes' units), else None."""
        spec = self.spec
        if out.ndim == 2:
            out = out[None]
        if out.ndim != 3 or out.shape[0] < 1:
            raise ModelError(
                f"postprocess: YOLO output has shape {list(out.shape)}, expected [N, A, 5+C] "
                "(YOLOv5) or [N, 4+C, A] (YOLOv8)"
            )
        rows = out[0]
        if rows.shape[0] < rows.shape[1]:  # features first: [4+C, A]; view as [A, 4+C]
            rows = rows.T
        version = spec.yolo_version or (8 if out.shape[1] < out.shape[2] else 5)
        first_class = 5 if version == 5 else 4
        if rows.shape[1] < first_class + (version == 8):
            raise ModelError(
                f"postprocess: YOLOv{version} output has shape {list(out.shape)}: too few "
                f"values per box ({rows.shape[1]})"
            )
        threshold = spec.score_threshold
        kp = 0 if spec.keypoint_shape is None else spec.keypoint_shape[0] * spec.keypoint_shape[1]
        stop: int | None = None  # where the class scores end (None: at the end)
        if spec.num_classes is not None:
            stop = first_class + spec.num_classes
        elif kp:  # the keypoints are the last values
            stop = rows.shape[1] - kp
        if stop is not None and (
            stop < first_class + (version == 8)
            # the keypoints fill the rest exactly; without them, values may follow the classes
            or (rows.shape[1] != stop + kp if kp else rows.shape[1] < stop)
        ):
            raise ModelError(
                f"postprocess: YOLOv{version} output has shape {list(out.shape)}: "
                f"{rows.shape[1]} values per box, not the box, the classes ({spec.num_classes}) "
                f"and the keypoints ({kp} values) the spec gives"
            )
        cls_scores = rows[:, first_class:stop]
        if version == 5:
            obj = rows[:, 4]
            # score = obj * class score <= obj (scores are probabilities): filter on obj first.
            cand = np.flatnonzero(obj >= threshold)
            if cls_scores.shape[1]:
                sub = cls_scores[cand].astype(np.float64)
                classes = sub.argmax(axis=1)
                scores = sub[np.arange(cand.size), classes] * obj[cand]
            else:  # objectness only: a single class
                classes = np.zeros(cand.size, np.intp)
                scores = obj[cand].astype(np.float64)
        else:
            best = cls_scores.max(axis=1)
            cand = np.flatnonzero(best >= threshold)
            classes = cls_scores[cand].argmax(axis=1)
            scores = best[cand].astype(np.float64)
        sel = scores >= threshold
        cand, scores, classes = cand[sel], scores[sel], classes[sel]
        cand, scores, classes = _cap(cand, scores, classes)
        boxes = rows[cand, :4].astype(np.float64)
        points = None
        if spec.keypoint_shape is not None and stop is not None:
            k, d = spec.keypoint_shape
            points = rows[cand, stop : stop + kp].astype(np.float64).reshape(-1, k, d)
        return _to_xyxy(boxes, spec.box_format), scores, classes, points

    def _decode_ssd(
        self, raw_boxes: np.ndarray, raw_scores: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        spec = self.spec
        if raw_boxes.ndim == 2:
            raw_boxes = raw_boxes[None]
        if raw_scores.ndim == 2:
            raw_scores = raw_scores[None]
        if (
            raw_boxes.ndim != 3
            or raw_scores.ndim != 3
            or raw_boxes.shape[2] != 4
            or raw_boxes.shape[:2] != raw_scores.shape[:2]
        ):
            raise ModelError(
                f"postprocess: SSD outputs have shapes {list(raw_boxes.shape)} (boxes) and "
                f"{list(raw_scores.shape)} (scores), expected [N, A, 4] and [N, A, C]"
            )
        anchors = self._anchors
        if anchors is not None and anchors.shape[0] != raw_boxes.shape[1]:
            raise ModelError(
                f"postprocess: anchors: {anchors.shape[0]} anchors for {raw_boxes.shape[1]} boxes"
            )
        scores_all = raw_scores[0].astype(np.float64)
        if spec.softmax:
            scores_all = softmax(scores_all, axis=1)
        if spec.background_class is not None and spec.background_class < scores_all.shape[1]:
            scores_all = scores_all.copy()
            scores_all[:, spec.background_class] = -np.inf
        classes_all = scores_all.argmax(axis=1)
        best = scores_all[np.arange(scores_all.shape[0]), classes_all]
        cand = np.flatnonzero(best >= spec.score_threshold)
        cand, scores, classes = _cap(cand, best[cand], classes_all[cand])
        enc = raw_boxes[0, cand].astype(np.float64)
        if anchors is None:
            return _to_xyxy(enc, spec.box_format), scores, classes
        if spec.box_format == "yxyx":
            enc = enc[:, [1, 0, 3, 2]]
        a = anchors[cand]
        t = enc * self._variances
        center = t[:, :2] * a[:, 2:] + a[:, :2]
        size = np.exp(np.minimum(t[:, 2:], _LOG_SIZE_CLIP)) * a[:, 2:]
        return np.concatenate([center - size / 2, center + size / 2], axis=1), scores, classes

    def _to_input_pixels(
        self,
        xyxy: np.ndarray,
        *,
        geometry: Geometry | None,
        source_size: tuple[int, int] | None,
    ) -> np.ndarray:
        """Boxes ``[n, 4]`` (or points ``[n, 2]``, x then y) in input pixels."""
        if not self.spec.normalized:
            return xyxy
        w: float
        h: float
        if self.input_size is not None:
            w, h = self.input_size
        elif geometry is not None and source_size is not None:
            # Without input_size: the input is the scaled source plus padding on both sides;
            # exact for a stretch resize, within 1 px for a letterbox with odd padding.
            w = source_size[0] * geometry.scale_x + 2 * geometry.pad_x
            h = source_size[1] * geometry.scale_y + 2 * geometry.pad_y
        elif geometry is not None:
            raise ConfigError(
                "postprocess: normalized = true: undoing the resize needs the model input size; "
                "pass input_size to Postprocessor (or source_size with the geometry)"
            )
        elif source_size is not None:
            w, h = source_size  # normalized input == normalized source for a stretch resize
        else:
            return xyxy
        return xyxy * np.array([w, h, w, h][: xyxy.shape[-1]], np.float64)

    def _text(self, out: np.ndarray) -> dict[str, Any]:
        """CTC's greedy reading, as PP-OCR decodes it: the best class a step, repeats merged,
        blanks dropped; a class with no label reads as U+FFFD. ``score``: the mean probability
        of the characters read (0 when none are)."""
        if out.ndim == 3 and out.shape[0] == 1:
            steps = out[0]  # [1, T, C]
        elif out.ndim == 3 and out.shape[1] == 1:
            steps = out[:, 0]  # [T, 1, C]: time first, as torch's CTC takes it
        elif out.ndim == 2:
            steps = out
        else:
            raise ModelError(
                f"postprocess: text output has shape {list(out.shape)}, expected [1, T, C] "
                "(or [T, 1, C]) of class scores a step"
            )
        if steps.size == 0:
            raise ModelError(f"postprocess: text output has shape {list(out.shape)}")
        if not _all_finite(steps):
            return self._nonfinite({"text": None, "score": None})
        probs = softmax(steps, axis=-1) if self.spec.softmax else steps
        best = probs.argmax(axis=-1)
        keep = ctc_keep(best, self.spec.blank)
        chars = best[keep].tolist()
        text = "".join(_or_unknown(self._label(c)) for c in chars)
        score = float(probs[np.flatnonzero(keep), chars].mean()) if chars else 0.0
        return {"kind": "text", "text": text, "score": _sig(score)}

    def _segmentation(self, out: np.ndarray) -> dict[str, Any]:
        shape = list(out.shape)
        if out.ndim == 4 and out.shape[0] >= 1:
            nchw = out.shape[1] <= out.shape[3]
            scores: np.ndarray | None = out[0] if nchw else out[0].transpose(2, 0, 1)  # [C,H,W]
            class_map = None
            size = list(out.shape[2:] if nchw else out.shape[1:3])
        elif out.ndim in (2, 3) and out.size:
            scores, class_map = None, out if out.ndim == 2 else out[0]
            size = list(class_map.shape)
        else:
            raise ModelError(
                f"postprocess: segmentation output has shape {shape}, expected [1, C, H, W], "
                "[1, H, W, C] or a class map [1, H, W]"
            )
        if not _all_finite(out):
            return self._nonfinite({"classes": [], "dominant": None, "size": size})
        num_classes = 0
        if scores is not None:
            num_classes = scores.shape[0]
            if num_classes == 1:  # one channel: a foreground probability
                class_map, num_classes = scores[0] > 0.5, 2
            else:
                class_map = scores.argmax(axis=0)
        assert class_map is not None
        if class_map.dtype.kind == "f" and not np.array_equal(class_map, np.floor(class_map)):
            class_map = class_map > 0.5  # a float map that holds no class indices: probability
        class_map = class_map.astype(np.intp, copy=False)
        if class_map.size == 0:
            raise ModelError(f"postprocess: segmentation output has shape {shape}")
        if class_map.min() < 0:
            raise ModelError(
                f"postprocess: segmentation class map holds {int(class_map.min())}: "
                "class indices must be >= 0"
            )
        counts = np.bincount(class_map.ravel(), minlength=num_classes)
        present = np.flatnonzero(counts)
        order = present[np.argsort(-counts[present], kind="stable")]
        fractions = _round_sig(counts[order] / class_map.size).tolist()
        return {
            "kind": "segmentation",
            "classes": [
                {"index": i, "label": self._label(i), "fraction": f}
                for i, f in zip(order.tolist(), fractions)
            ],
            "dominant": int(order[0]),
            "size": size,
        }

    def _raw(self, outputs: Sequence[np.ndarray]) -> dict[str, Any]:
        arrays = [np.asarray(o) for o in outputs]
        if not all(_all_finite(a) for a in arrays):
            return self._nonfinite({"outputs": {}})
        result: dict[str, Any] = {}
        for name, a in zip(self.output_names, arrays):
            small = a.size <= RAW_LIST_MAX
            if small and a.dtype.kind == "f":
                result[name] = _round_sig(a).tolist()
            elif small and a.dtype.kind in "biuU":
                result[name] = a.tolist()
            elif a.dtype.kind in "biuf" and a.size:
                result[name] = {
                    "shape": list(a.shape),
                    "mean": _sig(float(a.mean(dtype=np.float64))),
                    "min": _sig(float(a.min())),
                    "max": _sig(float(a.max())),
                }
            else:  # strings, objects, complex numbers: not summarized
                result[name] = {"shape": list(a.shape), "dtype": str(a.dtype)}
        return {"kind": "raw", "outputs": result}


# -- numerics -----------------------------------------------------------------------------------


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax (the max is subtracted first), in float64 for float64 input
    and float32 otherwise."""
    x = np.asarray(x)
    x = x.astype(np.float64 if x.dtype == np.float64 else np.float32, copy=False)
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def nms(
    boxes_xyxy: np.ndarray, scores: np.ndarray, iou_threshold: float, *, max_out: int
) -> np.ndarray:
    """Greedy non-maximum suppression. Returns the indices kept, best score first: a box is
    dropped when its IoU with a better kept box is above ``iou_threshold``; ties keep input
    order. One vectorized IoU row per kept box, against the boxes after it in score order, in
    preallocated buffers (no gather per step)."""
    boxes = np.asarray(boxes_xyxy, np.float64).reshape(-1, 4)
    scores = np.asarray(scores).reshape(-1)
    if boxes.shape[0] != scores.shape[0]:
        raise ValueError(f"nms: {boxes.shape[0]} boxes but {scores.shape[0]} scores")
    order = np.argsort(-scores, kind="stable")
    x1, y1, x2, y2 = (np.ascontiguousarray(c) for c in boxes[order].T)
    area = np.maximum(x2 - x1, 0.0) * np.maximum(y2 - y1, 0.0)
    n = order.size
    alive = np.ones(n, bool)
    inter_buf, h_buf, union_buf = np.empty(n), np.empty(n), np.empty(n)
    keep: list[int] = []
    i = 0  # position in score order of the best box not yet suppressed
    while i < n and len(keep) < max_out:
        keep.append(i)
        rest = slice(i + 1, n)
        inter, h, union = inter_buf[rest], h_buf[rest], union_buf[rest]
        np.minimum(x2[i], x2[rest], out=inter)
        inter -= np.maximum(x1[i], x1[rest])
        np.maximum(inter, 0.0, out=inter)
        np.minimum(y2[i], y2[rest], out=h)
        h -= np.maximum(y1[i], y1[rest])
        np.maximum(h, 0.0, out=h)
        inter *= h
        np.add(area[rest], area[i], out=union)
        union -= inter
        # IoU in place; where the union is 0 the intersection (0) stays: IoU 0.
        iou = np.divide(inter, union, out=inter, where=union > 0)
        tail = alive[rest]
        tail &= iou <= iou_threshold
        if not tail.any():
            break
        i += 1 + int(tail.argmax())
    return order[np.asarray(keep, np.intp)]


def _to_xyxy(boxes: np.ndarray, box_format: str) -> np.ndarray:
    if box_format == "xyxy":
        return boxes
    if box_format == "yxyx":
        return boxes[:, [1, 0, 3, 2]]
    half = boxes[:, 2:] / 2
    return np.concatenate([boxes[:, :2] - half, boxes[:, :2] + half], axis=1)


def _cap(
    cand: np.ndarray, scores: np.ndarray, classes: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Keep the MAX_NMS_CANDIDATES best candidates (NMS time grows with their number)."""
    if scores.size <= MAX_NMS_CANDIDATES:
        return cand, scores, classes
    best = np.argpartition(-scores, MAX_NMS_CANDIDATES - 1)[:MAX_NMS_CANDIDATES]
    return cand[best], scores[best], classes[best]


def looks_like_characters(lines: Sequence[str]) -> bool:
    """Whether a label file's lines are a character file's (nine in ten one character long at
    least) rather than class names."""
    return bool(lines) and sum(len(x) == 1 for x in lines) >= 0.9 * len(lines)


def ctc_charset(
    chars: Sequence[str], classes: int, *, blank_last: bool = False
) -> tuple[tuple[str, ...], int, str] | None:
    """Every class's character of a CTC recognizer with ``classes`` classes, from a character
    file's lines ``chars`` (one character a line, without the blank, as PP-OCR's dictionaries
    are written: nine in ten one character long at least, or they are class names): (the
    ``labels``, the blank's index, how it was read), else None. ``classes`` = N + 2: the blank
    first, PP-OCR's ``use_space_char`` space last; N + 1: the blank first, or last when
    ``blank_last`` (TF/Keras CRNNs); N: a file that lists its blank first."""
    n = len(chars)
    if not looks_like_characters(chars):
        return None
    if classes == n + 2:
        return ("", *chars, " "), 0, "the blank first, a space last"
    if classes == n:
        return tuple(chars), 0, "the blank first, as the file lists it"
    if classes != n + 1:
        return None
    if blank_last:
        return (*chars, ""), classes - 1, "the blank last"
    return ("", *chars), 0, "the blank first"


def ctc_keep(best: np.ndarray, blank: int) -> np.ndarray:
    """CTC's greedy rule over one sequence of best classes a step: a step is read when it is
    not the blank and not a repeat of the step before (a blank between two steps of one class
    keeps both)."""
    keep = best != blank
    keep[1:] &= best[1:] != best[:-1]
    return np.asarray(keep)


def looks_like_rows(out: np.ndarray, *, claimed: bool = False) -> bool:
    """Whether ``out`` ``[N, M, 6]`` holds rows (x1, y1, x2, y2, score, class) a model decoded
    and suppressed itself (format ``end2end``: Ultralytics' end-to-end heads, YOLO26 and
    YOLOv10, or an export made with ``nms=True``, padded with zero rows): scores in [0, 1],
    classes whole numbers from 0, and, unless the model's metadata ``claimed`` so, every row
    scoring at least 0.25 a box with x2 >= x1 and y2 >= y1 (a row scoring less may be any box:
    an end-to-end head reports its best M whatever they score). A one-class YOLOv5 head
    ``[N, A, 6]`` holds a class score where the class index would be."""
    if out.ndim != 3 or out.shape[2] != 6 or out.shape[1] <= 6 or out.dtype.kind != "f":
        return False
    scores, classes = out[..., 4], out[..., 5]
    if not (_all_finite(scores) and _all_finite(classes)):
        return False
    if scores.size and (scores.min() < 0 or scores.max() > 1.0 + 1e-6):
        return False
    if not (np.all(classes >= 0) and np.all(classes == np.round(classes))):
        return False
    rows = out[scores >= 0.25]
    return claimed or bool(np.all(rows[:, 2] >= rows[:, 0]) and np.all(rows[:, 3] >= rows[:, 1]))


def _all_finite(a: np.ndarray) -> bool:
    """No NaN or inf, without allocating a mask: min and max propagate NaN."""
    if a.dtype.kind not in "fc" or a.size == 0:
        return True
    return bool(np.isfinite(a.min()) and np.isfinite(a.max()))


def _to_source(
    xy: np.ndarray, geometry: Geometry | None, source_size: tuple[int, int] | None
) -> np.ndarray:
    """Points ``[m, 2]`` (x, y) in input pixels -> source pixels, clipped to the source: a box
    is its two corners, a keypoint one point."""
    if geometry is not None:
        xy = np.stack(geometry.to_source(xy[:, 0], xy[:, 1]), axis=1)
    if source_size is not None:
        xy = np.clip(xy, 0.0, np.array(source_size, np.float64))
    return xy


def _round_sig(a: np.ndarray, digits: int = 6) -> np.ndarray:
    """Round to ``digits`` significant digits, vectorized, as float64."""
    a = np.asarray(a, np.float64)
    with np.errstate(divide="ignore"):
        mag = np.floor(np.log10(np.abs(a)))
    mag = np.clip(np.where(np.isfinite(mag), mag, 0.0), -290, 290)
    factor = 10.0 ** (digits - 1 - mag)
    return np.round(a * factor) / factor


def _or_unknown(label: str | None) -> str:
    """A character read, U+FFFD (the replacement character) for a class without a label."""
    return "\ufffd" if label is None else label


def _sig(x: float) -> float:
    return float(f"{x:.6g}")


# -- validation helpers -------------------------------------------------------------------------


def _bad(key: str, value: Any, why: str) -> ConfigError:
    return ConfigError(f"postprocess: {key} = {value!r}: {why}")


def _check_choice(key: str, value: Any, choices: tuple[Any, ...]) -> None:
    if isinstance(value, bool) or value not in choices:
        raise _bad(key, value, f"expected one of {list(choices)}")


def _check_int(key: str, value: Any, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise _bad(key, value, f"must be a whole number >= {minimum}")


def _is_number(value: Any) -> bool:
    return (
        not isinstance(value, bool)
        and isinstance(value, (int, float, np.integer, np.floating))
        and math.isfinite(value)
    )


def _float_tuple(key: str, values: Any) -> tuple[float, ...]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise _bad(key, values, "must be a list of numbers")
    if not all(_is_number(v) for v in values):
        raise _bad(key, list(values), "must be a list of finite numbers")
    return tuple(float(v) for v in values)


__all__ = [
    "BOX_FORMATS",
    "DETECTION_FORMATS",
    "KINDS",
    "NONFINITE",
    "PostprocessSpec",
    "Postprocessor",
    "ctc_charset",
    "ctc_keep",
    "looks_like_characters",
    "looks_like_rows",
    "nms",
    "softmax",
]
