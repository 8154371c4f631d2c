"""Task-level fidelity: does the converted model still do the original's job?

Tensor cosine is blind to what matters on many models: a detector whose one output concatenates
pixel-scale boxes with [0, 1] class scores keeps cosine 0.998 after int8 while every score under
the boxes' scale rounds to zero. So the converter also compares what the model is *for*:

- ``detect``: both models' outputs are decoded and NMS'd exactly as the device does it
  (:class:`edge_agent.model.postprocess.Postprocessor`, one implementation), then the converted
  model's detections are matched to the original's (IoU >= 0.5, same class): F1, mean score error
  and mean IoU of the matched boxes. YOLO layouts ``[1, 4+C, N]`` (v8, no objectness) and
  ``[1, N, 5+C]`` (v5, objectness), SSD-style pairs (boxes ``[1, A, 4]`` + scores
  ``[1, A, C]``), and rows the model decoded and suppressed itself (``[1, M, 6]``: box, score,
  class; Ultralytics' end-to-end YOLO26 and YOLOv10, or an export made with ``nms=True``).
- ``ctc``: ``[N, T, C]`` greedy-decoded (best class per step, repeats collapsed, blanks dropped):
  exact-sequence agreement and character error rate.
- ``mask``: probability or segmentation maps ``[N, C, H, W]``: IoU of the thresholded masks
  (0.3 and 0.5; the worse counts) or, for several classes with scores, the mean IoU of the
  argmax maps.
- ``classify``: top-1 agreement.
- ``binary``: one yes/no decision per sample, from a ``[N, 1]`` probability (thresholded at 0.5;
  at 0 for a logit outside [0, 1]) or a ``[N, 2]`` pair (the larger wins): decision agreement.
  Chosen by itself for a streaming model's (``converters.stateful``) ``[N, 1]`` probability or
  ``[N, 2]`` probabilities, a voice-activity detector's speech / no speech; ``--task binary``
  for any other model.
- ``raw``: no task metric; the cosine floor alone applies.

:func:`infer_task` tells the task from the outputs' shapes and values and the model's metadata
(Ultralytics writes ``task``, ``names``, ``stride``), and says why; ``--task`` overrides it.
:func:`task_fidelity` computes the report's ``fidelity.task`` block. The metrics themselves live
in :mod:`edge_agent.model.agreement`, one copy, which the device's shadow runner judges a candidate
model by too.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from converters.validate import is_classifier_output
from edge_agent.errors import ConfigError
from edge_agent.model.agreement import (
    Detections,
    ctc_fidelity,
    decision_fidelity,
    in_unit,
    is_distribution,
    is_softmax_axis1,
    mask_fidelity,
    match_detections,
)
from edge_agent.model.export_metadata import (
    characters,
    class_names,
    decodes_itself,
    keypoint_shape,
)
from edge_agent.model.postprocess import Postprocessor, PostprocessSpec, looks_like_rows

Batches = list[list[np.ndarray]]

TASKS = ("classify", "detect", "ctc", "mask", "binary", "raw")
#: the bundle's postprocessing kinds, accepted as task names too (``build --task``)
ALIASES = {"classification": "classify", "detection": "detect", "segmentation": "mask"}
#: the task metric each task is judged on, and the default floor the budget applies to it
METRICS = {
    "classify": "top1_agreement",
    "detect": "f1",
    "ctc": "sequence_agreement",
    "mask": "iou",
    "binary": "decision_agreement",
    "raw": None,
}
DEFAULT_FLOORS: dict[str, float] = {"detect": 0.95, "ctc": 0.97, "mask": 0.95, "binary": 0.98}
#: a ``binary`` task's [N, 1] probability says yes above this
BINARY_THRESHOLD = 0.5
#: the bundle postprocessing kind of each task (``ctc`` has none on the device yet: raw)
POSTPROCESS_KIND = {
    "classify": "classification",
    "detect": "detection",
    "mask": "segmentation",
    "ctc": "raw",
    "binary": "raw",
    "raw": "raw",
}


def canonical_task(name: str) -> str:
    """``auto`` or one of :data:`TASKS`, from a task or postprocessing-kind name."""
    key = ALIASES.get(name, name)
    if key != "auto" and key not in TASKS:
        choices = ", ".join(("auto", *TASKS))
        raise ConfigError(f"--task {name}: expected one of {choices}")
    return key


@dataclass(frozen=True)
class Task:
    """What the model is for, and how to read its outputs for that."""

    kind: str
    #: why this task: the shape, value or metadata that decided it
    reason: str
    #: the output indices the metric reads (detection SSD: boxes then scores)
    outputs: tuple[int, ...] = ()
    #: detection: the device's postprocessing options (format, yolo_version, ...)
    postprocess: Mapping[str, Any] = field(default_factory=dict)
    #: detection: the class names the export carries; ctc: the characters of the dictionary it
    #: carries (RapidOCR's ``character``)
    labels: tuple[str, ...] | None = None
    #: detection: class scores are the first ``num_classes`` features after the box (and
    #: objectness); None = every remaining feature (an Ultralytics segment export adds mask
    #: coefficients after them)
    num_classes: int | None = None
    #: ctc: the blank class
    blank: int | None = None
    #: binary with a [N, 1] output: a value above it says yes (None: a [N, 2] output's argmax)
    threshold: float | None = None

    @property
    def metric(self) -> str | None:
        return METRICS[self.kind]

    def to_postprocess(self) -> dict[str, Any]:
        """The bundle's ``postprocess`` block for this task (without labels)."""
        post: dict[str, Any] = {"kind": POSTPROCESS_KIND[self.kind]}
        if self.kind == "detect":
            post.update(self.postprocess)
            if self.num_classes is not None and post.get("format") == "yolo":
                post["num_classes"] = self.num_classes  # what follows them is not classes
        return post


# --- inference ---------------------------------------------------------------------------------


def _with_keypoints(
    task: Task, meta: Mapping[str, str], outputs: Sequence[np.ndarray | None]
) -> Task:
    """An Ultralytics pose export's detector: its keypoints (``kpt_shape``: K, 2 or 3) follow
    the classes of its head ``[N, 4 + C + K * d, A]``; the bundle's postprocessing reports them
    (``keypoint_shape``). Judged on its boxes only: the keypoints are not compared."""
    kpt = keypoint_shape(meta)
    head = outputs[task.outputs[0]] if task.outputs else None
    if (
        meta.get("task") != "pose"
        or task.postprocess.get("format") != "yolo"
        or task.postprocess.get("yolo_version") != 8
        or task.num_classes is None
        or kpt is None
        or head is None
        or head.shape[1] != 4 + task.num_classes + kpt[0] * kpt[1]
    ):
        return task
    return replace(task, postprocess={**task.postprocess, "keypoint_shape": list(kpt)})


def model_metadata(props: Sequence[Any]) -> dict[str, str]:
    """An ONNX model's ``metadata_props`` as a dict."""
    return {p.key: p.value for p in props}


def infer_task(
    outputs: Sequence[np.ndarray | None],
    *,
    output_names: Sequence[str],
    metadata: Mapping[str, str] | None = None,
    requested: str = "auto",
    stateful: bool = False,
) -> Task:
    """The task of a model whose outputs on the validation samples are ``outputs`` (each
    concatenated over the samples; None where batch shapes differed, and for a streaming
    model's state outputs). ``stateful``: the model carries a state between windows, so a
    ``[N, 1]`` / ``[N, 2]`` probability is read as a binary decision per window."""
    meta = dict(metadata or {})
    requested = canonical_task(requested)
    labels = class_names(meta)
    meta_task = meta.get("task")
    if requested == "raw":
        return Task("raw", "--task raw")
    if requested == "binary" or (requested == "auto" and stateful):
        found = _binary(outputs, output_names=output_names, forced=requested == "binary")
        if found is not None:
            return found
        if requested == "binary":
            shapes = [None if o is None else list(o.shape) for o in outputs]
            raise ConfigError(f"--task binary: no [N, 1] or [N, 2] float output (shapes {shapes})")
    if requested in ("auto", "detect"):
        found = _detection(
            outputs, labels=labels, meta_task=meta_task, forced=requested,
            says_decoded=decodes_itself(meta),
        )  # fmt: skip
        if found is not None:
            return _with_keypoints(found, meta, outputs)
        if requested == "detect":
            shapes = [None if o is None else list(o.shape) for o in outputs]
            raise ConfigError(
                f"--task detect: no output looks like a detector's (shapes {shapes}); expected "
                "YOLO [1, 4+C, N] / [1, N, 5+C], rows [1, M, 6] (box, score, class), or SSD boxes "
                "[1, A, 4] with scores [1, A, C]"
            )
    if requested in ("auto", "ctc"):
        for i, out in enumerate(outputs):
            if out is None or out.ndim != 3 or out.dtype.kind != "f" or min(out.shape[1:]) < 2:
                continue
            if requested == "ctc" or is_distribution(out):
                blank = int(np.bincount(out.argmax(axis=-1).ravel()).argmax())
                why = (
                    "--task ctc"
                    if requested == "ctc"
                    else f"output '{output_names[i]}' {list(out.shape)} holds a probability "
                    "distribution per time step"
                )
                return Task(
                    "ctc", f"{why}; blank = class {blank}, the most frequent", (i,),
                    blank=blank, labels=characters(meta),
                )  # fmt: skip
        if requested == "ctc":
            raise ConfigError("--task ctc: no [N, T, C] float output")
    if requested in ("auto", "mask"):
        for i, out in enumerate(outputs):
            if out is None or out.ndim != 4 or out.dtype.kind != "f":
                continue
            # one probability channel, or per-pixel class probabilities (softmax over C); an
            # image-like output in [0, 1] (super-resolution, denoising) is not a mask
            prob = out.shape[1] == 1 and in_unit(out)
            classes = out.shape[1] > 1 and in_unit(out) and is_softmax_axis1(out[:8])
            if requested == "mask" or (min(out.shape[2:]) >= 4 and (prob or classes)):
                why = (
                    "--task mask"
                    if requested == "mask"
                    else f"output '{output_names[i]}' {list(out.shape)} is a "
                    + ("probability map" if prob else "map of class probabilities")
                )
                return Task("mask", why, (i,))
        if requested == "mask":
            raise ConfigError("--task mask: no [N, C, H, W] float output")
    if _postprocessed_detections(outputs) and requested == "auto":
        return Task(
            "raw",
            "the outputs are detections already decoded (boxes [N, K, 4] beside "
            "[N, K] classes or scores): compared as tensors; --task overrides",
        )
    for i, out in enumerate(outputs):
        if out is not None and is_classifier_output(out):
            why = (
                "--task classify"
                if requested == "classify"
                else (f"output '{output_names[i]}' {list(out.shape)} holds a score per class")
            )
            return Task("classify", why, (i,), labels=labels)
        if out is not None and out.dtype.kind in "iu" and out.ndim == 1:
            return Task("classify", f"output '{output_names[i]}' holds class labels", (i,))
    if requested == "classify":
        raise ConfigError("--task classify: no [N, classes] float output and no label output")
    shapes = [None if o is None else list(o.shape) for o in outputs]
    return Task("raw", f"no output shape says detector, sequence, map or classifier ({shapes})")


def _binary(
    outputs: Sequence[np.ndarray | None], *, output_names: Sequence[str], forced: bool
) -> Task | None:
    """A yes/no decision per sample: a [N, 1] output (in [0, 1]: a probability, decided at
    :data:`BINARY_THRESHOLD`; forced, a logit outside it at 0), or a [N, 2] one (probabilities,
    or any pair when forced: the larger wins)."""
    for i, out in enumerate(outputs):
        if out is None or out.ndim != 2 or out.dtype.kind != "f" or out.shape[1] not in (1, 2):
            continue
        name = f"output '{output_names[i]}' {list(out.shape)}"
        why = "--task binary; " if forced else "a streaming model's "
        if out.shape[1] == 1 and in_unit(out):
            why += f"{name} in [0, 1]: a probability, yes above {BINARY_THRESHOLD}"
            return Task("binary", why, (i,), threshold=BINARY_THRESHOLD)
        if out.shape[1] == 1 and forced:
            why += f"{name} outside [0, 1]: a logit, yes above 0"
            return Task("binary", why, (i,), threshold=0.0)
        if out.shape[1] == 2 and (forced or is_distribution(out)):
            return Task("binary", f"{why}{name}: a pair of scores, the larger wins", (i,))
    return None


def _postprocessed_detections(outputs: Sequence[np.ndarray | None]) -> bool:
    """TF Object Detection API style: boxes [N, K, 4] and per-box [N, K] classes or scores."""
    boxes = [o for o in outputs if o is not None and o.ndim == 3 and o.shape[2] == 4]
    return any(
        o is not None and o.ndim == 2 and o.shape == b.shape[:2] for b in boxes for o in outputs
    )


def _detection(
    outputs: Sequence[np.ndarray | None],
    *,
    labels: tuple[str, ...] | None,
    meta_task: str | None,
    forced: str,
    says_decoded: bool = False,
) -> Task | None:
    nc = len(labels) if labels else None
    tagged = meta_task in ("detect", "segment", "pose", "obb")
    why_meta = f"metadata task = {meta_task!r}; " if tagged else ""
    # SSD: a boxes output [1, A, 4] and a scores output [1, A, C] with the same A.
    boxes_i = [
        i for i, o in enumerate(outputs) if o is not None and o.ndim == 3 and o.shape[2] == 4
    ]
    for b in boxes_i:
        box = outputs[b]
        assert box is not None
        for s, sc in enumerate(outputs):
            if s == b or sc is None or sc.ndim != 3 or sc.shape[:2] != box.shape[:2]:
                continue
            post: dict[str, Any] = {"format": "ssd"}
            if not in_unit(sc):
                post["softmax"] = True
            top = sc[:8].reshape(-1, sc.shape[2]).argmax(axis=1)
            if sc.shape[2] > 1 and np.mean(top == 0) > 0.5:  # class 0 wins most anchors
                post["background_class"] = 0
            post["box_format"] = "xyxy"
            if in_unit(box):
                post["normalized"] = True
            return Task(
                "detect",
                f"{why_meta}SSD-style outputs: boxes {list(box.shape)} and scores {list(sc.shape)}",
                (b, s),
                post,
                labels=labels,
            )
    for i, out in enumerate(outputs):
        if out is not None and looks_like_rows(out, claimed=says_decoded):
            said = "the metadata says end2end or nms; " if says_decoded else ""
            post = {"format": "end2end", "box_format": "xyxy"}
            reported = out[out[..., 4] > 0][:, :4]  # the padding's zeros say nothing of units
            if reported.size and in_unit(reported):
                post["normalized"] = True
            why = (
                f"{why_meta}{said}output {list(out.shape)}: rows of box, score and class, "
                "decoded and suppressed by the model (an end-to-end head or NMS inside)"
            )
            return Task("detect", why, (i,), post, labels=labels)
        if out is None or out.ndim != 3 or out.dtype.kind != "f" or min(out.shape[1:]) < 5:
            continue
        if not tagged and forced != "detect" and is_distribution(out):
            continue  # a CTC head [1, T, C] (softmax rows), not boxes
        features_first = out.shape[1] < out.shape[2]
        rows = out.transpose(0, 2, 1) if features_first else out  # [N, boxes, features]
        feats = rows.shape[2]
        version = 8 if features_first or (nc is not None and feats - 4 == nc) else 5
        if version == 5 and says_decoded and meta_task in ("segment", "pose"):
            continue  # rows the model decoded, with masks or keypoints: no YOLOv5 head
        first = 4 if version == 8 else 5
        classes = nc if nc is not None and first + nc <= feats else None
        scores = rows[..., first : first + classes] if classes else rows[..., first:]
        looks = in_unit(scores) and not in_unit(rows[..., :4])
        if not (tagged or forced == "detect" or looks):
            continue
        layout = "[1, 4+C, N]" if features_first else f"[1, N, {first}+C]"
        why = f"{why_meta}output {list(out.shape)}: YOLOv{version} layout {layout}" + (
            "" if tagged else ", boxes beside scores in [0, 1]"
        )
        post = {"format": "yolo", "yolo_version": version}
        return Task("detect", why, (i,), post, labels=labels, num_classes=classes)
    return None


# --- metrics -----------------------------------------------------------------------------------


def _samples(batches: list[np.ndarray]) -> list[np.ndarray]:
    """One array per sample (each with its batch axis of 1)."""
    return [b[j : j + 1] for b in batches for j in range(b.shape[0] if b.ndim else 1)]


def task_fidelity(task: Task, ref: Batches, got: Batches) -> dict[str, Any]:
    """The report's ``fidelity.task``: ``{"kind", "metric", "value", "details"}``; ``value`` is
    None for ``raw``."""
    return Judge(task, ref)(got)


class Judge:
    """:func:`task_fidelity` against one reference, whose decoding is done once (the converter
    judges many candidates against the same original)."""

    def __init__(self, task: Task, ref: Batches) -> None:
        self.task = task
        self._dets = decode_detections(task, ref) if task.kind == "detect" else None
        self._ref = (
            np.concatenate(ref[task.outputs[0]])
            if task.kind in ("ctc", "mask", "classify", "binary") and task.outputs
            else None
        )

    def __call__(self, got: Batches) -> dict[str, Any]:
        task = self.task
        details: dict[str, Any] = {"reason": task.reason}
        value: float | None = None
        if task.kind == "detect":
            assert self._dets is not None
            value, more = match_detections(self._dets, decode_detections(task, got))
            details.update(more, decode=dict(task.postprocess))
        elif self._ref is not None:
            g = np.concatenate(got[task.outputs[0]])
            if task.kind == "ctc":
                value, more = ctc_fidelity(self._ref, g, blank=task.blank or 0)
                details.update(more)
            elif task.kind == "mask":
                value, more = mask_fidelity(self._ref, g)
                details.update(more)
            elif task.kind == "binary":
                value, more = decision_fidelity(self._ref, g, threshold=task.threshold)
                details.update(more)
            else:
                r = self._ref
                if r.ndim == 2:
                    r, g = r.argmax(axis=1), g.argmax(axis=1)
                value = float(np.mean(r.reshape(-1) == g.reshape(-1))) if r.size else 1.0
                details["samples"] = int(r.shape[0])
        return {
            "kind": task.kind,
            "metric": task.metric,
            "value": None if value is None else round(float(value), 6),
            "details": details,
        }


def decode_detections(task: Task, batches: Batches) -> list[Detections]:
    """Every sample's detections, decoded and NMS'd as on the device."""
    used = [_samples(batches[i]) for i in task.outputs]
    if task.num_classes is not None and task.postprocess.get("format") == "yolo":
        first = 4 if task.postprocess.get("yolo_version") == 8 else 5
        stop = first + task.num_classes
        # features first ([1, 4+C, N]) or last ([1, N, 4+C]): drop what follows the classes
        used[0] = [a[:, :stop] if a.shape[1] < a.shape[2] else a[..., :stop] for a in used[0]]
    names = [f"out{i}" for i in range(len(used))]
    spec = dict(task.postprocess)
    spec.pop("keypoint_shape", None)  # judged on the boxes (the values after them are cut)
    if spec.get("format") == "ssd":
        spec.update(output="out0", scores_output="out1")
    post = Postprocessor(PostprocessSpec(kind="detection", **spec), output_names=names)
    return [post(list(sample))["detections"] for sample in zip(*used)]
