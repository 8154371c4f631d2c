"""Names shared by the converter, the bundle format and device profiles: artifact formats and
int8 quantization schemes. One place defines them; everything else imports them."""

from __future__ import annotations

from dataclasses import dataclass

#: Artifact formats, in the spelling the CLI, manifests and profiles use.
ONNX_FORMATS = ("onnx-fp32", "onnx-fp16", "onnx-int8", "onnx-int8-dynamic")
TFLITE_FORMATS = ("tflite-fp32", "tflite-fp16", "tflite-int8")
ARTIFACT_FORMATS = ONNX_FORMATS + TFLITE_FORMATS

#: ``[model] softmax`` / ``--softmax``: whether a bare classification model's scores get one.
SOFTMAX_CHOICES = ("auto", "yes", "no")
#: ``[model] postprocess`` / ``--postprocess``: a bare model's outputs read as what they are
#: (auto: a detector's detections, a classifier's classes) or reported raw.
POSTPROCESS_CHOICES = ("auto", "raw")

#: ``[preprocess] resize`` / ``--resize``: how a frame is fitted to the model's input.
#: ``crop``: the shorter side resized to the input's and the middle cut out (torchvision's and
#: Ultralytics' classifiers: Resize, then CenterCrop). ``pad-right``: the height resized to the
#: input's and the width in proportion, up to the input's, the rest padded on the right with
#: zeros of the model's input (PaddleOCR's text recognizers: ``resize_norm_img``).
RESIZE_MODES = ("stretch", "letterbox", "crop", "pad-right")

#: The runtime that executes each artifact format.
RUNTIME_FOR_FORMAT = {
    **dict.fromkeys(ONNX_FORMATS, "onnxruntime"),
    **dict.fromkeys(TFLITE_FORMATS, "litert"),
}


@dataclass(frozen=True)
class Int8Scheme:
    """An int8 quantization scheme: activation type, weight type, reduce_range and graph format.

    Spelled ``<act><weight>[-rr]-<qdq|qop>``, e.g. ``u8s8-rr-qop``: uint8 activations, int8
    weights, 7-bit reduce_range, QOperator graph (QLinearConv ...). QDQ graphs keep float ops
    between QuantizeLinear/DequantizeLinear pairs (TensorRT needs them); QOperator graphs use
    onnxruntime's fused integer kernels.
    """

    activation: str  # "u8" | "s8"
    weight: str  # "u8" | "s8"
    reduce_range: bool
    graph: str  # "qdq" | "qop"

    def __post_init__(self) -> None:
        if self.activation not in ("u8", "s8") or self.weight not in ("u8", "s8"):
            raise ValueError(f"Invalid int8 scheme types: {self.activation}{self.weight}")
        if self.graph not in ("qdq", "qop"):
            raise ValueError(f"Invalid int8 scheme graph: {self.graph}")

    @property
    def name(self) -> str:
        rr = "-rr" if self.reduce_range else ""
        return f"{self.activation}{self.weight}{rr}-{self.graph}"

    @classmethod
    def parse(cls, text: str) -> Int8Scheme:
        """Parse ``u8s8-rr-qop`` and friends; raise ``ValueError`` naming the bad text."""
        parts = text.strip().lower().split("-")
        ok = len(parts) in (2, 3) and len(parts[0]) == 4 and (len(parts) == 2 or parts[1] == "rr")
        try:
            if ok:
                return cls(parts[0][:2], parts[0][2:], len(parts) == 3, parts[-1])
        except ValueError:
            pass
        raise ValueError(
            f"Invalid int8 scheme: {text!r} (expected e.g. u8s8-rr-qop, s8s8-qdq; known: "
            f"{', '.join(INT8_SCHEMES)})"
        )


#: Every scheme the converter knows how to produce.
INT8_SCHEMES = (
    "u8s8-rr-qop",
    "u8s8-rr-qdq",
    "u8s8-qop",
    "u8s8-qdq",
    "s8s8-qop",
    "s8s8-qdq",
    "u8u8-qop",
)

#: The calibration methods onnxruntime offers, in the CLI's spelling.
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")

#: A dataset folder of samples from the field (``edgectl collect --out DIR``), which
#: ``edge-convert --calibration DIR`` / ``--eval DIR`` read: one JSON line per sample in
#: ``DATASET_INDEX`` (its ``file``, the model's ``output``, ``reasons``, ``label``: null until a
#: person fills in the class index) and the files in one folder per kind.
DATASET_INDEX = "samples.jsonl"
DATASET_FOLDERS = {"jpeg": "images", "npy": "windows"}
DATASET_EXTENSIONS = {"jpeg": ".jpg", "npy": ".npy"}


def label_lines(text: str) -> tuple[str, ...]:
    """A label file's labels, one a line, stripped; empty lines are skipped, but a line that is
    one space is the space character (a character file's, as PP-OCR's English one has)."""
    lines = (line.rstrip("\r\n") for line in text.splitlines())
    return tuple(
        " " if line == " " else line.strip() for line in lines if line.strip() or line == " "
    )
