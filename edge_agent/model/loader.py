"""A model ready to serve: runtime + preprocessing + postprocessing + identity.

``load_model`` accepts a signed ``.edgebundle`` (verified, extracted into the state directory,
the artifact chosen for this device's profile, then smoke-tested on the bundle's golden input)
or a bare ``.onnx`` / ``.tflite`` file with preprocessing given by flags and raw output.

A stateful model (a recurrent voice-activity detector, say: ``edge_agent.model.state``) carries
one state per stream: :meth:`LoadedModel.infer` feeds a stream's state in and keeps the state
that comes out; :meth:`LoadedModel.reset_state` forgets it when the stream restarts.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.common.files import file_identity
from edge_agent.errors import ConfigError, ModelError
from edge_agent.model.export_metadata import characters as exported_characters
from edge_agent.model.export_metadata import class_names, decodes_itself, keypoint_shape
from edge_agent.model.formats import POSTPROCESS_CHOICES, RUNTIME_FOR_FORMAT, SOFTMAX_CHOICES
from edge_agent.model.postprocess import (
    Postprocessor,
    PostprocessSpec,
    ctc_charset,
    looks_like_rows,
)
from edge_agent.model.preprocess import (
    DynamicSizeError,
    Geometry,
    Preprocessor,
    PreprocessSpec,
)
from edge_agent.model.profiles import DeviceProfile
from edge_agent.model.runtimes import (
    Runtime,
    TensorSpec,
    available_runtimes,
    load_runtime,
    model_file,
    model_to_nchw,
    nchw_to_model,
    warmup,
    zero_feeds,
)
from edge_agent.model.state import StatePair, StreamState, state_pairs
from edge_agent.model.tflite_metadata import TfliteMetadata, read_metadata

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """Everything the pipeline needs to turn a frame into a result with one model."""

    name: str
    version: str
    runtime: Runtime
    preprocessor: Preprocessor | None
    postprocessor: Postprocessor
    artifact: Path
    format: str
    manifest: dict[str, Any] | None = None
    #: Concurrent inferences this model was loaded for (its runtime threads are split by it).
    workers: int = 1
    #: The runtime threads of one inference (``threads // workers`` of the plan, at least 1;
    #: ``load_model`` always sets it).
    threads: int = 0
    #: The fastest warm-up inference in milliseconds (what the thread plan decides on).
    warm_ms: float = 0.0
    #: the first input that is not a state input: what a frame or a window feeds
    input_name: str = field(init=False)
    input_shape: tuple[int | None, ...] = field(init=False)
    #: the model's state pairs: declared in the bundle's manifest (``state``), else detected
    #: from the runtime's inputs and outputs; empty for a model without state
    state_pairs: tuple[StatePair, ...] = field(init=False)
    _states: StreamState | None = field(init=False, repr=False, default=None)
    _output_names: list[str] = field(init=False, repr=False, default_factory=list)

    def __post_init__(self) -> None:
        declared = (self.manifest or {}).get("state")
        self.state_pairs = state_pairs(
            declared=declared, inputs=self.runtime.inputs, outputs=self.runtime.outputs
        )
        state_inputs = {p.input for p in self.state_pairs}
        data = [s for s in self.runtime.inputs if s.name not in state_inputs]
        if not data and declared is None:  # names that look like state on an x -> xn model
            log.info(
                "model %s: inputs named like state (%s) would leave nothing to feed: no state",
                self.name,
                ", ".join(sorted(state_inputs)),
            )
            self.state_pairs, state_inputs, data = (), set(), list(self.runtime.inputs)
        if not data:
            names = ", ".join(s.name for s in self.runtime.inputs)
            raise ModelError(
                f"model {self.name}: every input ({names}) is a state input, so nothing takes "
                "the frames; declare the model's state pairs in the bundle's manifest (state)"
            )
        spec: TensorSpec = data[0]
        self.input_name, self.input_shape = spec.name, spec.shape
        self._states = StreamState(self.state_pairs) if self.state_pairs else None
        self._output_names = [o.name for o in self.runtime.outputs]

    def zero_feeds(self) -> dict[str, np.ndarray]:
        """A zero input as this model takes it: a zero image through its preprocessing when
        its image input's height or width is dynamic (filled by ``[preprocess] width`` /
        ``height``), else zeros of the inputs' shapes (dynamic sides as 1)."""
        return _probe_feeds(self.runtime, self.preprocessor) or zero_feeds(self.runtime)

    @property
    def identity(self) -> dict[str, str]:
        return {"name": self.name, "version": self.version}

    @property
    def stateful(self) -> bool:
        """True when the model carries a state from one window of a stream to the next (its
        windows must then run in order, one at a time per stream)."""
        return bool(self.state_pairs)

    def infer(self, feeds: Mapping[str, np.ndarray], *, stream: str = "") -> list[np.ndarray]:
        """Run once; outputs in ``runtime.outputs`` order. A stateful model is fed ``stream``'s
        state (the initial value on its first window) and keeps the state it returns for the
        stream's next window; one window of a stream at a time (calls for the same stream
        wait for each other, other streams do not). A model without state: ``runtime.infer``."""
        states = self._states
        if states is None:
            return self.runtime.infer(feeds)
        with states.hold(stream):
            outs = self.runtime.infer(states.feeds(stream, feeds))
            states.update(stream, dict(zip(self._output_names, outs)))
        return outs

    def reset_state(self, stream: str | None = None) -> None:
        """Forget ``stream``'s state (every stream's with None): its next window starts from the
        initial state, as after a restart. Nothing to do for a model without state."""
        if self._states is not None:
            self._states.reset(stream)

    def prepare(self, data: np.ndarray) -> tuple[dict[str, np.ndarray], Geometry | None]:
        """A source frame's data -> the feed: uint8 images through the image preprocessing,
        sensor windows (float) reshaped to the input."""
        if data.dtype == np.uint8:
            return self.prepare_image(data)
        return self.prepare_window(data), None

    def prepare_image(self, image: np.ndarray) -> tuple[dict[str, np.ndarray], Geometry | None]:
        """A BGR frame -> the model's feed (and where the frame landed in the input)."""
        if self.preprocessor is None:
            raise ModelError(f"model {self.name} has no image preprocessing; it cannot take images")
        x = self.preprocessor(image)
        return {self.input_name: x}, self.preprocessor.geometry(image.shape[0], image.shape[1])

    def prepare_window(self, window: np.ndarray) -> dict[str, np.ndarray]:
        """A sensor window [size, channels] -> the model's feed, transposed or reshaped to fit."""
        shape = tuple(d or 1 for d in self.input_shape)
        if window.shape == shape[1:]:
            x = window[None]
        elif window.T.shape == shape[1:]:
            x = window.T[None]
        elif window.size == int(np.prod(shape)):
            x = window.reshape(shape)
        else:
            raise ModelError(
                f"model input '{self.input_name}' {list(self.input_shape)} does not fit sensor "
                f"windows of shape {list(window.shape)}; set [source] window size/channels to match"
            )
        return {self.input_name: np.ascontiguousarray(x, dtype=np.float32)}

    def close(self) -> None:
        self.runtime.close()


def choose_artifact(manifest: Mapping[str, Any], profile: DeviceProfile) -> dict[str, Any]:
    """The artifact for this profile: one built for it by name, else the profile's most preferred
    format; only artifacts whose runtime is installed here."""
    have = {k for k, v in available_runtimes().items() if v}
    usable = [a for a in manifest["artifacts"] if RUNTIME_FOR_FORMAT.get(a["format"]) in have]
    if not usable:
        formats = sorted({a["format"] for a in manifest["artifacts"]})
        raise ModelError(
            f"no artifact this device can run: the bundle has {formats}, "
            f"runtimes here: {sorted(have)}"
        )
    named = [a for a in usable if profile.name in a.get("profiles", [])]
    if named:
        return dict(named[0])
    rank = {fmt: i for i, fmt in enumerate(profile.formats)}
    return dict(min(usable, key=lambda a: rank.get(a["format"], len(rank))))


def _install_bundle(
    bundle: Path, *, state_dir: Path, trusted_keys: Mapping[str, Any]
) -> tuple[Path, dict[str, Any]]:
    """Verify and extract into ``state_dir/models/<name>-<version>``; never half-installed."""
    from edge_agent.model.bundle import extract_bundle

    models = state_dir / "models"
    models.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".incoming-", dir=models))
    try:
        verified = extract_bundle(bundle, staging / "x", trusted_keys=trusted_keys)
        manifest = verified.manifest
        dest = models / f"{manifest['name']}-{manifest['version']}"
        if dest.exists():
            old = models / f".old-{dest.name}-{staging.name}"
            dest.rename(old)
            (staging / "x").rename(dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            (staging / "x").rename(dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dest, manifest


#: Operators only a quantized ONNX graph has, as their names appear in the file
_ONNX_INT8_OPS = (b"QuantizeLinear", b"QLinearConv", b"QLinearMatMul", b"ConvInteger",
                  b"MatMulInteger")  # fmt: skip


def _logit_range(
    runtime: Any, zeros: Mapping[str, np.ndarray] | None = None
) -> tuple[float, float] | None:
    """The first output's range over a zero input (``zeros``, else :func:`zero_feeds`) and a
    noise input when it leaves [0, 1] (the scores are logits, not probabilities: a softmax or
    sigmoid never does), else None."""
    rng = np.random.default_rng(0)
    lo, hi = np.inf, -np.inf
    for noisy in (False, True):
        feeds = dict(zeros) if zeros is not None else zero_feeds(runtime)
        if noisy:
            feeds = {k: rng.standard_normal(v.shape).astype(v.dtype) if v.dtype.kind == "f"
                     else v for k, v in feeds.items()}  # fmt: skip
        out = np.asarray(runtime.infer(feeds)[0], np.float64)
        lo, hi = min(lo, float(out.min())), max(hi, float(out.max()))
    return (lo, hi) if lo < -1e-6 or hi > 1 + 1e-6 else None


def _decoded_detection(
    outputs: Mapping[str, str], labels: tuple[str, ...] | None, path: Path
) -> dict[str, Any]:
    """The postprocessing of a bare model ending in TFLite_Detection_PostProcess: detections
    from its four outputs (by role, as the op lists them), boxes (ymin, xmin, ymax, xmax) in
    [0, 1] of the input; ``labels`` by class index (the op's classes leave out the
    background)."""
    if _first_time(path, "decoded"):
        log.info("postprocess: %s ends in TFLite_Detection_PostProcess: its detections are "
                 "reported (score >= %g)", path.name,
                 PostprocessSpec(kind="detection").score_threshold)  # fmt: skip
    data: dict[str, Any] = {
        "kind": "detection", "format": "decoded", "box_format": "yxyx", "normalized": True,
        "output": outputs["boxes"], "classes_output": outputs["classes"],
        "scores_output": outputs["scores"], "count_output": outputs["count"],
    }  # fmt: skip
    if labels:
        data["labels"] = list(labels)
    return data


def _metadata_labels(
    meta: TfliteMetadata, runtime: Any, decoded: Mapping[str, str] | None
) -> tuple[str, ...] | None:
    """The labels a TFLite file's metadata gives: a detector's for its classes output, or a
    classifier's for its one ``[1, C]`` output with C labels; else None (labels on a
    segmenter's map, or a file of another count, do not make a classifier of it)."""
    if decoded:
        names = [o.name for o in runtime.outputs]
        return meta.labels.get(names.index(decoded["classes"]))
    return _classifier_names(meta.labels.get(0), runtime)


def _metadata_scaling(
    meta: TfliteMetadata, spec: Any, overrides: Mapping[str, Any], path: Path
) -> dict[str, Any]:
    """A float input's normalization as a TFLite file's metadata gives it ((pixel - mean) /
    std: MediaPipe's and Model Maker's float models take [-1, 1], mean = std = 127.5), unless
    the user gives a scaling."""
    if not meta.mean or spec.quantized or any(k in overrides for k in _SCALING_KEYS):
        return {}
    channels = spec.shape[-1]  # a TFLite input is NHWC
    if "channels" in overrides or spec.dtype not in ("float32", "float16"):
        channels = None  # the user's channels, or an integer input: the defaults, not these
    if channels is None or any(len(v) not in (1, channels) for v in (meta.mean, meta.std)):
        return {}
    if _first_time(path, "normalization"):
        log.info("input: %s's metadata normalizes it: (pixel - %s) / %s", path.name,
                 "/".join(f"{m:g}" for m in meta.mean),
                 "/".join(f"{v:g}" for v in meta.std))  # fmt: skip
    return {"scale": 1.0, "mean": meta.mean, "std": meta.std}


def _exporter_metadata(runtime: Any, meta: TfliteMetadata) -> Mapping[str, Any]:
    """An export's own metadata: an ONNX file's ``metadata_props`` (strings), or what a TFLite
    file packs into its archive (an Ultralytics export's ``metadata.json``, read as JSON or
    Python literals)."""
    return getattr(runtime, "metadata", None) or meta.properties or {}


def _classifier_names(names: tuple[str, ...] | None, runtime: Any) -> tuple[str, ...] | None:
    """``names`` when the model's one output is ``[1, C]`` for C of them, else None."""
    shape = tuple(runtime.outputs[0].shape) if len(runtime.outputs) == 1 else ()
    return names if names and len(shape) == 2 and shape[1] == len(names) else None


def _ctc_reading(
    runtime: Any,
    labels: tuple[str, ...] | None,
    path: Path,
    probe: Mapping[str, np.ndarray] | None,
) -> tuple[tuple[str, ...], int, str] | None:
    """How to read the model's one output as CTC text (:func:`~edge_agent.model.postprocess
    .ctc_charset`), when it is a recognizer's ``[1, T, C]`` (or ``[T, 1, C]``) and ``labels``
    a character file's lines; the blank is last when that is the class the model says at most
    steps of a blank image. Else None."""
    if not labels or len(runtime.outputs) != 1:
        return None
    shape = tuple(runtime.outputs[0].shape)
    if len(shape) != 3 or not isinstance(shape[2], int) or shape[2] < 2:
        return None
    first, second, c = shape
    if first == 1 or not isinstance(first, int):  # [1, T, C], the batch fixed or not
        steps = second
    elif second == 1:  # [T, 1, C]: time first, as torch's CTC takes it
        steps = first
    else:
        return None
    if isinstance(steps, int) and steps < 2:
        return None
    read = ctc_charset(labels, c)
    if read is not None and c == len(labels) + 1 and _blank_is_last(runtime, path, probe):
        return ctc_charset(labels, c, blank_last=True)
    return read


#: :func:`_blank_is_last`'s verdict per model file (path, size, modification time)
_BLANK_LAST: dict[tuple[str, int, int], bool] = {}


def _blank_is_last(runtime: Any, path: Path, probe: Mapping[str, np.ndarray] | None) -> bool:
    """Whether a recognizer's last class is its blank: the class it says at most steps of a
    blank image (as the converter finds a CTC head's blank), decided once a file; False when
    it cannot be run here."""
    key = file_identity(path)
    if key not in _BLANK_LAST:
        try:
            out = np.asarray(runtime.infer(dict(probe) if probe else zero_feeds(runtime))[0])
            best = out.reshape(-1, out.shape[-1]).argmax(axis=-1)
            _BLANK_LAST[key] = int(np.bincount(best).argmax()) == out.shape[-1] - 1
        except Exception:  # a dynamic size run at 1: read as the common case, blank first
            _BLANK_LAST[key] = False
    return _BLANK_LAST[key]


#: Ultralytics' tasks whose export's head holds boxes with class scores (``segment``: and mask
#: coefficients; ``pose``: and keypoints)
_DETECTING = ("detect", "segment", "pose")

#: A bare YOLO export's layout (:func:`_yolo_layout`): the format, the YOLO version, and what
#: the postprocessing also needs (``output``, ``num_classes``, ``keypoint_shape``)
YoloLayout = tuple[str, int | None, dict[str, Any]]


def _yolo_layout(
    runtime: Any,
    labels: tuple[str, ...] | None,
    *,
    end2end: bool,
    props: Mapping[str, Any] | None = None,
) -> YoloLayout | None:
    """How a bare model's head output holds ``labels``' detections, when it is a YOLO export's:
    ``("yolo", 8, …)`` for ``[1, 4 + C, A]`` (Ultralytics YOLOv8 and later), ``("yolo", 5,
    …)`` for ``[1, A, 5 + C]`` (YOLOv5: objectness, then the classes), ``("end2end", None,
    …)`` for ``[1, M, 6]``: rows (x1, y1, x2, y2, score, class) the model decoded and suppressed
    (YOLO26, YOLOv10, an export with NMS inside); else None. ``[1, A, 4 + C]`` is not taken: it
    is also a YOLOv5 head with one label too many (a label map with a ``???`` line). ``[1, A,
    6]`` with one label is YOLOv5's unless the metadata says ``end2end``.

    An Ultralytics segment export (metadata ``task = segment``) has a second output, its mask
    prototypes ``[1, P, H, W]`` (NHWC in TFLite), and P mask coefficients after the classes; a
    pose export (``task = pose``) has ``kpt_shape`` (K, 2 or 3) keypoint values after them:
    their classes are told apart from those (``num_classes``), the keypoints reported."""
    task = (props or {}).get("task")
    if not labels or not runtime.outputs:
        return None
    if task in ("segment", "pose") and end2end:  # rows with masks or keypoints: not read yet
        return None
    extra: dict[str, Any] = {}
    after = 0  # values after the classes
    index = 0
    if len(runtime.outputs) == 2 and task == "segment":  # the head and the mask prototypes
        heads = [i for i, o in enumerate(runtime.outputs) if len(o.shape) == 3]
        protos = [o for o in runtime.outputs if len(o.shape) == 4]
        if len(heads) != 1 or len(protos) != 1:
            return None
        index = heads[0]
        p, head = protos[0].shape, runtime.outputs[index].shape
        # NCHW [1, P, H, W] or NHWC [1, H, W, P]: the P that the head's values fit
        fits = [n for n in (p[1], p[3]) if isinstance(n, int) and head[1] == 4 + len(labels) + n]
        if not fits:
            return None
        after = fits[0]
        extra = {"output": runtime.outputs[index].name, "num_classes": len(labels)}
    elif len(runtime.outputs) != 1:  # a detection op's file has four
        return None
    elif task == "pose":
        kpt = keypoint_shape(props or {})
        if kpt is None:
            return None
        after = kpt[0] * kpt[1]
        extra = {"num_classes": len(labels), "keypoint_shape": list(kpt)}
    shape = runtime.outputs[index].shape
    if len(shape) != 3 or not all(isinstance(d, int) for d in shape[1:]):
        return None
    if isinstance(shape[0], int) and shape[0] != 1:  # a batch of several: not fed here
        return None
    a, b, c = int(shape[1]), int(shape[2]), len(labels) + after
    if b == 6 and a > b and (end2end or c != 1) and not after:
        return ("end2end", None, extra)
    if a == c + 4 and b > a:
        return ("yolo", 8, extra)
    if b == c + 5 and a > b and task not in ("segment", "pose"):  # theirs are features first
        return ("yolo", 5, extra)
    return None


def _yolo_detection(
    runtime: Any,
    layout: YoloLayout,
    labels: tuple[str, ...] | None,
    pre: Any,
    path: Path,
    *,
    claimed: bool,
) -> dict[str, Any]:
    """A bare YOLO export's postprocessing. Ultralytics' ONNX exports give boxes in input
    pixels, its TFLite exports in [0, 1] of the input; which, is read from the model on a zero
    image (the boxes' centres span the input whatever it shows: beyond 2 they are pixels). An
    export with NMS inside that reports nothing on it is taken to be as Ultralytics writes its
    format. Rows (``end2end``) whose values are not rows (scores outside [0, 1], classes not
    whole numbers…) leave the model raw."""
    fmt, version, extra = layout
    names = [o.name for o in runtime.outputs]
    head = names.index(extra["output"]) if "output" in extra else 0
    key = file_identity(path)
    if key not in _BOXES_NORMALIZED:  # once a file: the tuner's trials and swaps load it again
        image = np.zeros((pre.spec.height, pre.spec.width, 3), np.uint8)
        outs = runtime.infer({runtime.inputs[0].name: pre(image)})
        out = np.asarray(outs[head], np.float64)[0]
        if fmt == "end2end" and not looks_like_rows(out[None], claimed=claimed):
            _BOXES_NORMALIZED[key] = None
        else:
            if fmt == "end2end":
                rows = out[out[:, 4] > 0]  # the rows it reported (padding scores 0)
                centres = np.abs(rows[:, :2] + rows[:, 2:4]) / 2
            else:
                rows = out.T if out.shape[0] < out.shape[1] else out  # [A, 4 + C (+1)]
                centres = np.abs(rows[:, :2])
            if centres.size and np.isfinite(centres).all():
                _BOXES_NORMALIZED[key] = bool(centres.max() <= 2.0)
            else:
                _BOXES_NORMALIZED[key] = path.suffix == ".tflite"
    normalized = _BOXES_NORMALIZED[key]
    count = len(labels or ())
    if normalized is None:
        if _first_time(path, "yolo"):
            log.info("postprocess: %s's output %s is not rows of box, score and class (scores "
                     "in [0, 1], whole class numbers): reported raw", path.name,
                     list(runtime.outputs[head].shape))  # fmt: skip
        return {"kind": "raw"}
    units = "in [0, 1]" if normalized else "in input pixels"
    if fmt == "end2end":
        if _first_time(path, "yolo"):
            log.info("postprocess: %s's output is detections decoded and suppressed by the "
                     "model (rows of box, score, class; boxes %s) for %d classes: reported "
                     "with no NMS", path.name, units, count)  # fmt: skip
        return {"kind": "detection", "format": "end2end", "box_format": "xyxy",
                "normalized": normalized, "labels": list(labels or ())}  # fmt: skip
    if _first_time(path, "yolo"):
        besides = (
            " (its keypoints with them)" if "keypoint_shape" in extra
            else " (its mask coefficients are not read: boxes only)" if "output" in extra
            else ""
        )  # fmt: skip
        log.info("postprocess: %s's output is a YOLOv%d head for %d classes (boxes %s): its "
                 "detections are reported%s", path.name, version, count, units,
                 besides)  # fmt: skip
    return {"kind": "detection", "format": "yolo", "yolo_version": version,
            "normalized": normalized, "labels": list(labels or ()), **extra}  # fmt: skip


#: what has been said of which model file (:func:`_first_time`)
_SAID: set[tuple[Any, ...]] = set()


def _first_time(path: Path, *what: Any) -> bool:
    """True the first time ``what`` is to be said of this model file, then False: the tuner's
    trials and swaps load the same file again, and the log says each thing once."""
    key = (str(path.resolve()), *what)
    if key in _SAID:
        return False
    _SAID.add(key)
    return True


#: :func:`_yolo_detection`'s reading of a file's box units (path, size, modification time):
#: True in [0, 1], False in input pixels, None when its rows are not rows
_BOXES_NORMALIZED: dict[tuple[str, int, int], bool | None] = {}
#: ``softmax = auto``'s decision per model file (its path, size and modification time): the
#: tuner's trials and a swap back to the same file load it again, and neither probes it again
#: nor says it again in the log
_LOGITS_SEEN: dict[tuple[str, int, int], bool] = {}


def _square_image(shape: Sequence[Any]) -> bool:
    """Whether a 4-D image input (NCHW or NHWC) is square: Ultralytics crops only those (a
    non-square input it stretches to)."""
    dims = [d for d in shape[1:] if isinstance(d, int) and d > 3]
    return len(dims) == 2 and dims[0] == dims[1]


def _paddle_recognizer(
    runtime: Any, chars: tuple[str, ...] | None, props: Mapping[str, Any]
) -> bool:
    """Whether a bare model is a PaddleOCR text recognizer: one output of class scores a step
    for the characters of the dictionary RapidOCR packs into its files (``character``), or for
    a character file's plus the blank first and PaddleOCR's ``use_space_char`` space last
    (``C = N + 2``: no other trainer lays its classes out so)."""
    if not chars or len(runtime.outputs) != 1 or len(runtime.outputs[0].shape) != 3:
        return False
    classes = runtime.outputs[0].shape[2]
    if not isinstance(classes, int) or ctc_charset(chars, classes) is None:
        return False
    return exported_characters(props) is not None or classes == len(chars) + 2


#: How PaddleOCR feeds its recognizers (``resize_norm_img``): BGR as OpenCV decodes it, (pixel /
#: 255 - 0.5) / 0.5, the height resized to the input's and the line padded on the right with
#: zeros; ``rec_image_shape`` 3, 48 (32 before PP-OCRv3), 320
_PADDLE_SCALING = {"scale": 1.0 / 255.0, "mean": (0.5,), "std": (0.5,)}
_PADDLE_WIDTH = 320


def _paddle_defaults(
    shape: Sequence[Any], defaults: Mapping[str, Any], overrides: Mapping[str, Any], path: Path
) -> dict[str, Any]:
    """A PaddleOCR recognizer's preprocessing where the user gives none: its scaling (unless
    its quantized input's or the user's scaling rules), BGR, ``pad-right``, and a width of 320
    when the model leaves it dynamic."""
    out: dict[str, Any] = {"resize": "pad-right"}
    if not defaults and not any(k in overrides for k in _SCALING_KEYS):
        out.update(_PADDLE_SCALING)
    layout = overrides.get("layout") or ("nchw" if shape[1] in (1, 3) else "nhwc")
    channels, width = (shape[1], shape[3]) if layout == "nchw" else (shape[3], shape[2])
    if channels != 1:  # a gray recognizer (rec_image_shape 1, 32, 100) stays gray
        out["channels"] = "bgr"
    if not (isinstance(width, int) and width > 0):
        out["width"] = _PADDLE_WIDTH
    out = {**defaults, **{k: v for k, v in out.items() if k not in overrides}}
    if _first_time(path, "paddle"):
        log.info("preprocess: %s is read as a PaddleOCR recognizer, fed as PaddleOCR feeds it: "
                 "%s", path.name, ", ".join(f"{k} = {v}" for k, v in out.items()))  # fmt: skip
    return out


def _width_is_dynamic(spec: PreprocessSpec, runtime: Any) -> bool:
    """Whether lines can be fed wider than the spec's width (``resize = pad-right`` on a model
    whose one image input leaves its width dynamic)."""
    if spec.resize != "pad-right" or len(runtime.inputs) != 1:
        return False
    shape = runtime.inputs[0].shape
    if len(shape) != 4:
        return False
    width = shape[3] if spec.layout == "nchw" else shape[2]
    return not (isinstance(width, int) and width > 0)


def _probe_feeds(runtime: Any, pre: Preprocessor | None) -> dict[str, np.ndarray] | None:
    """A zero image as the model's one image input takes it, when that input's height or
    width is dynamic and the user filled it (``[preprocess] width``: an OCR recognizer's): the
    probes, the warm-up, the tuner and the batch plan feed it rather than a side of 1. None
    otherwise (:func:`zero_feeds` serves)."""
    if pre is None or len(runtime.inputs) != 1 or len(runtime.inputs[0].shape) != 4:
        return None
    shape = runtime.inputs[0].shape
    sides = shape[2:4] if pre.spec.layout == "nchw" else shape[1:3]
    if all(isinstance(d, int) and d > 0 for d in sides):
        return None
    image = np.zeros((pre.spec.height, pre.spec.width, 3), np.uint8)
    return {runtime.inputs[0].name: np.array(pre(image), copy=True)}


def _bare_softmax(
    softmax: str, runtime: Any, path: Path, zeros: Mapping[str, np.ndarray] | None = None
) -> bool:
    """Whether a bare classification model's scores get a softmax: ``yes``, ``no``, or
    ``auto``: when they are logits (:func:`_logit_range`), decided once a model file and said
    once in the log."""
    if softmax not in SOFTMAX_CHOICES:
        raise ConfigError(f"[model] softmax = {softmax!r}: expected one of {SOFTMAX_CHOICES}")
    if softmax != "auto":
        return softmax == "yes"
    key = file_identity(path)
    if key in _LOGITS_SEEN:
        return _LOGITS_SEEN[key]
    seen = _logit_range(runtime, zeros)
    _LOGITS_SEEN[key] = seen is not None
    if seen is not None:
        log.info(
            "scores: %s's outputs are logits (%.3g to %.3g seen), not probabilities: softmax "
            "applied ([model] softmax = no keeps them)", path.name, *seen,
        )  # fmt: skip
    return seen is not None


#: The scaling keys of ``[preprocess]``: one given leaves a quantized input's scaling to the user
_SCALING_KEYS = ("scale", "mean", "std")


def _pixel_scaling(spec: Any, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """The scaling of a bare model's image input that takes the pixels themselves, else {}:

    - quantized to 8 bits (the TFLite files mobile SDKs and Coral ship: uint8 with scale 1/128
      and zero point 128 for [-1, 1], and the like): 0..255 onto its whole integer range
      (uint8: the pixel; int8: the pixel - 128), as the TFLite Task Library feeds them. The
      default 1/255 would quantize to 128..255 there;
    - uint8 without quantization (an export that casts its input inside): the pixel.

    Scaling of the user's (``[preprocess] scale``, ``mean`` or ``std``) wins."""
    if any(k in overrides for k in _SCALING_KEYS):
        return {}
    if spec.quantized:
        offset = 0 if spec.dtype == "uint8" else 128  # the integer a 0 pixel becomes
        scale = float(spec.scale)
        return {"scale": scale, "mean": ((offset + spec.zero_point) * scale,), "std": (1.0,)}
    if spec.dtype == "uint8":
        return {"scale": 1.0, "mean": (0.0,), "std": (1.0,)}
    return {}


def _say_pixels(spec: Any, path: Path) -> None:
    """Said once a model file (the tuner's trials load it again)."""
    if not _first_time(path, "pixels", spec.dtype, spec.scale, spec.zero_point):
        return
    how = "" if not spec.quantized else f" (scale {spec.scale:.6g}, zero point {spec.zero_point})"
    log.info("input: %s takes %s%s: fed the pixels as they are", path.name, spec.dtype, how)


def _bare_format(path: Path, runtime: Any) -> str:
    """The artifact format of a model file given without a bundle's manifest: onnx-int8 (or
    -int8-dynamic) when its graph has quantization operators, onnx-fp16 with float16 inputs;
    a TFLite file's as LiteRT reports its tensors; else fp32."""
    if path.suffix == ".tflite":
        return f"tflite-{getattr(runtime, 'precision', 'fp32')}"
    data = path.read_bytes()
    if b"DynamicQuantizeLinear" in data:
        return "onnx-int8-dynamic"
    if any(op in data for op in _ONNX_INT8_OPS):
        return "onnx-int8"
    return "onnx-fp16" if any(t.dtype == "float16" for t in runtime.inputs) else "onnx-fp32"


def _layout_for(spec: PreprocessSpec, runtime: Any) -> PreprocessSpec:
    """The manifest's preprocessing describes the ONNX model (NCHW); a TFLite artifact of it
    takes NHWC. Follow the artifact's own input shape."""
    shape: tuple[int | None, ...] = runtime.inputs[0].shape if len(runtime.inputs) == 1 else ()
    if len(shape) != 4:
        return spec
    h, w = spec.height, spec.width
    if spec.layout == "nchw" and tuple(shape[1:3]) == (h, w) and shape[3] in (1, 3):
        return dataclasses.replace(spec, layout="nhwc")
    if spec.layout == "nhwc" and tuple(shape[2:4]) == (h, w) and shape[1] in (1, 3):
        return dataclasses.replace(spec, layout="nchw")
    return spec


def _check_fits(pre: Preprocessor, runtime: Any, *, path: Path, overridden: bool) -> None:
    """The preprocessing's channels and size against the model's one image input, where the
    model fixes them: caught at start, not as every frame's inference error. ConfigError when
    ``--channels`` (``overridden``) made the channels wrong, else ModelError."""
    if len(runtime.inputs) != 1 or len(runtime.inputs[0].shape) != 4:
        return
    spec, name, shape = pre.spec, runtime.inputs[0].name, runtime.inputs[0].shape
    _, a, b, c = shape
    channels, height, width = (a, b, c) if spec.layout == "nchw" else (c, a, b)
    problems = []
    if isinstance(channels, int) and channels != spec.num_channels:
        problems.append(
            f"{channels} channel(s), the preprocessing gives {spec.num_channels} ({spec.channels})"
        )
    if (
        isinstance(height, int)
        and isinstance(width, int)
        and (height, width)
        != (
            spec.height,
            spec.width,
        )
    ):
        problems.append(
            f"{width}x{height} images, the preprocessing gives {spec.width}x{spec.height}"
        )
    if not problems:
        return
    message = f"{path}: input '{name}' {list(shape)} takes " + "; ".join(problems)
    if overridden and problems[0].startswith(f"{channels} channel"):
        raise ConfigError(f"{message}: change --channels (or [preprocess] channels) to fit")
    raise ModelError(message)


def golden_check(model: LoadedModel, root: Path) -> None:
    """Run the bundle's golden input; the outputs must match what the converter recorded."""
    manifest = model.manifest or {}
    golden = manifest.get("golden")
    if not golden:
        return
    rel = str(model.artifact.relative_to(root))
    expected = golden["expected"].get(rel)
    if expected is None:
        raise ModelError(f"bundle has no golden outputs for {rel}")
    tol = golden.get("tolerance", {})
    with np.load(root / golden["file"], allow_pickle=False) as data:
        shapes = {s.name: s.shape for s in model.runtime.inputs}
        feeds = {  # stored in the ONNX model's layout: NHWC for a TFLite artifact
            name: nchw_to_model(data[key], shapes.get(name, ()))
            for name, key in golden["inputs"].items()
        }
        outs = model.runtime.infer(feeds)
        names = [o.name for o in model.runtime.outputs]
        for name, got in zip(names, outs):
            want = data[expected[name]]
            got = model_to_nchw(np.asarray(got), want.shape)
            a, b = np.asarray(want, np.float64).ravel(), np.asarray(got, np.float64).ravel()
            if a.shape != b.shape:
                raise ModelError(
                    f"golden test: output '{name}' has shape {got.shape}, expected {want.shape}"
                )
            if not np.isfinite(b).all():
                raise ModelError(f"golden test: output '{name}' is not finite")
            denom = float(np.linalg.norm(a) * np.linalg.norm(b))
            cos = 1.0 if denom == 0 else float(np.dot(a, b) / denom)
            if cos < float(tol.get("min_cosine", 0.98)):
                raise ModelError(
                    f"golden test: output '{name}' cosine {cos:.4f} below {tol.get('min_cosine')}"
                )
            classes = np.asarray(want).ndim == 2 and np.asarray(want).shape[1] > 1
            if tol.get("top1_must_match") and classes:  # noqa: SIM102
                if not np.array_equal(np.argmax(want, axis=1), np.argmax(got, axis=1)):
                    raise ModelError(f"golden test: output '{name}' top-1 class differs")


def load_model(
    path: str | Path,
    *,
    profile: DeviceProfile,
    state_dir: Path,
    trusted_keys: Mapping[str, Any] | None = None,
    threads: int = 0,
    preprocess_overrides: Mapping[str, Any] | None = None,
    labels: tuple[str, ...] | None = None,
    workers: int = 1,
    softmax: str = "auto",
    postprocess: str = "auto",
) -> LoadedModel:
    """Load, warm up and (for bundles) smoke-test a model. ``threads`` is the total; with
    ``workers`` > 1 each of that many concurrent inferences gets ``threads // workers`` of them
    (onnxruntime runs one session concurrently; LiteRT gets one interpreter per worker).
    ``softmax`` (a bare model with ``labels``): ``yes``, ``no`` or ``auto`` (when its scores
    are logits); a bundle's manifest says it. ``postprocess`` (a bare model): ``auto`` (a
    detector it recognises reports detections, labels make a classifier) or ``raw``."""
    path = model_file(path)
    overrides = dict(preprocess_overrides or {})
    threads = threads or profile.threads
    workers = max(1, min(workers, threads))
    if path.suffix == ".edgebundle":
        if not trusted_keys:
            raise ConfigError(
                "a bundle needs trusted keys: set [model] trusted_keys (or --trusted-key)"
            )
        root, manifest = _install_bundle(path, state_dir=state_dir, trusted_keys=trusted_keys)
        art = choose_artifact(manifest, profile)
        runtime = load_runtime(
            root / art["path"],
            threads=max(1, threads // workers),
            providers=profile.onnx_providers,
            instances=workers,
        )
        pre_data = manifest.get("preprocess")
        pre = None
        if pre_data:  # the bundle's sizes are its model's: width / height serve bare models
            kept = {k: v for k, v in overrides.items() if k not in ("width", "height")}
            spec = _layout_for(PreprocessSpec.from_dict({**pre_data, **kept}), runtime)
            pre = Preprocessor(spec, grow=_width_is_dynamic(spec, runtime))
            _check_fits(pre, runtime, path=path, overridden="channels" in overrides)
        post_spec = PostprocessSpec.from_manifest(manifest.get("postprocess") or {"kind": "raw"})
        input_size = None if pre is None else (pre.spec.width, pre.spec.height)
        model = LoadedModel(
            name=str(manifest["name"]),
            version=str(manifest["version"]),
            runtime=runtime,
            preprocessor=pre,
            postprocessor=Postprocessor(
                post_spec, output_names=[o.name for o in runtime.outputs], input_size=input_size
            ),
            artifact=root / art["path"],
            format=str(art["format"]),
            manifest=manifest,
            workers=workers,
            threads=max(1, threads // workers),
        )
        model.warm_ms = warmup(runtime, feeds=model.zero_feeds())
        golden_check(model, root)
        return model
    runtime = load_runtime(
        path,
        threads=max(1, threads // workers),
        providers=profile.onnx_providers,
        instances=workers,
    )
    shape = runtime.inputs[0].shape
    pre = None
    if postprocess not in POSTPROCESS_CHOICES:
        raise ConfigError(
            f"[model] postprocess = {postprocess!r}: expected one of {POSTPROCESS_CHOICES}"
        )
    meta = read_metadata(path) if path.suffix == ".tflite" else TfliteMetadata()
    auto = postprocess == "auto"
    decoded = getattr(runtime, "detection_outputs", None) if auto else None
    labels = (labels or _metadata_labels(meta, runtime, decoded)) if auto else None
    # an export's own metadata: an Ultralytics export's class names serve only its head, when
    # its output is one; a RapidOCR recognizer's dictionary, only when no labels are given
    props = _exporter_metadata(runtime, meta) if auto else {}
    characters = labels or exported_characters(props)  # a line of one space is a character
    labels = tuple(x for x in labels if x.strip()) if labels else labels
    names = None if labels or props.get("task") not in _DETECTING else class_names(props)
    claimed = decodes_itself(props)
    yolo = _yolo_layout(runtime, labels or names, end2end=claimed, props=props)
    if not labels and props.get("task") == "classify":  # an Ultralytics classifier's names
        labels = _classifier_names(class_names(props), runtime)
    unsized: DynamicSizeError | None = None
    if len(runtime.inputs) == 1 and len(shape) == 4:
        try:
            pixels = _pixel_scaling(runtime.inputs[0], overrides)
            defaults = pixels or _metadata_scaling(meta, runtime.inputs[0], overrides, path)
            if yolo is not None and "resize" not in overrides:
                defaults = {**defaults, "resize": "letterbox"}  # as Ultralytics feeds its models
            elif (
                props.get("task") == "classify"
                and "resize" not in overrides
                and _square_image(runtime.inputs[0].shape)
            ):  # Ultralytics feeds its (square) classifiers resized, then cropped
                defaults = {**defaults, "resize": "crop"}
            elif _paddle_recognizer(runtime, characters, props):
                defaults = _paddle_defaults(runtime.inputs[0].shape, defaults, overrides, path)
            spec = PreprocessSpec.for_input_shape(list(shape), **defaults, **overrides)
            pre = Preprocessor(
                spec,
                pixels_as=runtime.inputs[0].dtype if pixels else None,
                grow=_width_is_dynamic(spec, runtime),
            )
            if pixels:
                _say_pixels(runtime.inputs[0], path)
        except ConfigError as exc:
            if overrides:
                raise
            if isinstance(exc, DynamicSizeError):
                unsized = exc
        if pre is not None:
            _check_fits(pre, runtime, path=path, overridden="channels" in overrides)
    post_data: dict[str, Any] = {"kind": "raw"}
    probe = _probe_feeds(runtime, pre)
    reading = (
        None if yolo is not None or decoded else _ctc_reading(runtime, characters, path, probe)
    )
    if unsized is not None:  # an image input of dynamic size: a recognizer needs it given
        if reading is not None:
            raise unsized
        if _first_time(path, "dynamic size"):
            log.warning("%s: %s; until then it is fed no images", path.name, unsized)
    if decoded:  # an SSD / EfficientDet-Lite TFLite file: boxes, classes, scores, count
        post_data = _decoded_detection(decoded, labels, path)
    elif yolo is not None and pre is not None:
        post_data = _yolo_detection(runtime, yolo, labels or names, pre, path, claimed=claimed)
    elif reading is not None:
        charset, blank, how = reading
        post_data = {"kind": "text", "labels": list(charset), "blank": blank,
                     "softmax": _bare_softmax(softmax, runtime, path, probe)}  # fmt: skip
        if _first_time(path, "text"):
            log.info("postprocess: %s's output %s is read as CTC text over %d characters "
                     "(%s)", path.name, list(runtime.outputs[0].shape), len(characters or ()),
                     how)  # fmt: skip
    elif labels:
        post_data = {"kind": "classification", "labels": list(labels)}
        post_data["softmax"] = _bare_softmax(softmax, runtime, path, probe)
        classes = runtime.outputs[0].shape[-1] if runtime.outputs[0].shape else None
        if isinstance(classes, int) and classes != len(labels):
            log.warning(
                "labels: %d given for %s's %d classes; a class without one is reported "
                "with label null", len(labels), path.name, classes,
            )  # fmt: skip
    model = LoadedModel(
        name=path.stem,
        version="0.0.0",
        runtime=runtime,
        preprocessor=pre,
        postprocessor=Postprocessor(
            PostprocessSpec.from_manifest(post_data),
            output_names=[o.name for o in runtime.outputs],
            input_size=None if pre is None else (pre.spec.width, pre.spec.height),
        ),
        artifact=path,
        format=_bare_format(path, runtime),
        workers=workers,
        threads=max(1, threads // workers),
    )
    model.warm_ms = warmup(runtime, feeds=model.zero_feeds())
    return model
