"""What exporters write about a model into its file, read the same way by the agent (a bare
model) and the converter (its task): Ultralytics' metadata, and the character dictionary
RapidOCR writes into its PP-OCR recognizers. An ONNX export holds it as
``metadata_props``, every value a string (``names`` is ``"{0: 'person', ...}"``, ``end2end``
is ``"True"``); a TFLite export as JSON packed into the file (``names`` with string keys), or,
before Ultralytics 8.3, as one Python literal (:mod:`edge_agent.model.tflite_metadata` reads
both). Strings are read as Python literals with ``ast.literal_eval``: literals only, nothing is
run.
"""

from __future__ import annotations

import ast
from collections.abc import Mapping
from typing import Any

#: a metadata string longer than this is not read
MAX_LITERAL = 1 << 20


def literal(value: Any) -> Any:
    """A metadata value: a string read as a Python literal (None when it is none), anything
    else as it is."""
    if not isinstance(value, str):
        return value
    if len(value) > MAX_LITERAL:
        return None
    try:
        return ast.literal_eval(value)
    except Exception:  # not a literal, too deep, or one that cannot be built (an unhashable key)
        return None


def class_names(props: Mapping[str, Any]) -> tuple[str, ...] | None:
    """The class names an export carries: ``names``, a dict of index -> name (integer keys,
    or JSON's string digits, 0 to C - 1) or a list; else None."""
    names = literal(props.get("names"))
    if isinstance(names, (list, tuple)) and names:
        return tuple(str(n) for n in names)
    if not isinstance(names, dict) or not names:
        return None
    by_index: dict[int, Any] = {}
    for key, name in names.items():
        if type(key) is str and key.isascii() and key.isdecimal():  # JSON's keys are strings
            key = int(key)
        if type(key) is not int:
            return None
        by_index[key] = name
    if sorted(by_index) != list(range(len(by_index))):
        return None
    return tuple(str(by_index[i]) for i in range(len(by_index)))


def decodes_itself(props: Mapping[str, Any]) -> bool:
    """Whether an export says its output holds detections it decoded and suppressed itself:
    an end-to-end head (``end2end``: YOLO26, YOLOv10) or an export made with ``nms=True``
    (``args``)."""
    if literal(props.get("end2end")) is True:
        return True
    args = literal(props.get("args"))
    return isinstance(args, dict) and args.get("nms") is True


def keypoint_shape(props: Mapping[str, Any]) -> tuple[int, int] | None:
    """The keypoints an Ultralytics pose export's head holds after its classes: ``kpt_shape``
    (:func:`as_keypoint_shape`); else None."""
    return as_keypoint_shape(literal(props.get("kpt_shape")))


def as_keypoint_shape(value: Any) -> tuple[int, int] | None:
    """``value`` as a keypoint shape, (K keypoints >= 1, 2 values each (x, y) or 3 (and a
    visibility score)), when it is a list or tuple of two such whole numbers; else None. The
    one check of Ultralytics' ``kpt_shape`` and of a manifest's ``keypoint_shape``."""
    if (
        isinstance(value, (list, tuple))
        and len(value) == 2
        and all(type(v) is int for v in value)
        and value[0] >= 1
        and value[1] in (2, 3)
    ):
        return int(value[0]), int(value[1])
    return None


def characters(props: Mapping[str, Any]) -> tuple[str, ...] | None:
    """The characters of a text recognizer whose file carries its dictionary: ``character``,
    PaddleOCR's dictionary file whole (one character a line, without the blank), as RapidOCR
    writes it into the ``metadata_props`` of its PP-OCR ONNX files and reads it back (its
    lines, ``str.splitlines``); else None."""
    value = props.get("character")
    if not isinstance(value, str) or not value or len(value) > MAX_LITERAL:
        return None
    return tuple(value.splitlines()) or None


__all__ = [
    "MAX_LITERAL",
    "as_keypoint_shape",
    "characters",
    "class_names",
    "decodes_itself",
    "keypoint_shape",
    "literal",
]
