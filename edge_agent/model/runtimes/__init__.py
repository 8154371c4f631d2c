"""Inference runtimes behind one small interface: one module per runtime.

``load_runtime(path)`` picks by file type: ``.onnx`` -> onnxruntime (``runtimes/onnx.py``),
``.tflite`` -> LiteRT (``runtimes/tflite.py``: ai-edge-litert, falling back to tflite-runtime,
the two runtimes a device installs). A runtime that is not installed is reported once, not a
crash. What they share (``TensorSpec``, the ``Runtime`` interface, quantization, ``infer_lock``)
is in ``runtimes/base.py``.

Every runtime takes and returns float32 arrays for float models and quantizes / dequantizes
int8 / uint8 inputs and outputs for the caller, using each tensor's scale and zero point; a
feed that already has a quantized input's integer type (an image fed its pixels, see
``Preprocessor(pixels_as=…)``) goes in as it is.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from edge_agent.errors import ModelError
from edge_agent.model.runtimes.base import (
    Runtime,
    TensorSpec,
    dequantize,
    infer_lock,
    model_to_nchw,
    nchw_to_model,
    quantize,
    warmup,
    zero_feeds,
)

log = logging.getLogger(__name__)


def model_file(path: str | Path) -> Path:
    """``path`` when it is a file, else ModelError ``"<path>: no such model file"`` (exit 65):
    checked before anything reads it (its hash, a bundle's signature, a runtime)."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: no such model file")
    return path


def load_runtime(
    path: str | Path,
    *,
    threads: int = 0,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    instances: int = 1,
) -> Runtime:
    """Load a model file with the runtime its type needs. ``instances`` > 1 lets that many
    ``infer`` calls run at once: onnxruntime sessions are thread-safe by themselves; LiteRT gets
    that many interpreters, each with ``threads`` threads."""
    path = model_file(path)
    if path.suffix == ".onnx":
        from edge_agent.model.runtimes.onnx import OnnxRuntime

        return OnnxRuntime(path, threads=threads, providers=providers)
    if path.suffix == ".tflite":
        from edge_agent.model.runtimes.tflite import LiteRTRuntime

        return LiteRTRuntime(path, threads=threads, instances=instances)
    raise ModelError(f"{path}: unknown model type; expected .onnx or .tflite (or a .edgebundle)")


def available_runtimes() -> dict[str, str | None]:
    """Each runtime's version, or None when it cannot be imported here."""
    from edge_agent.model.runtimes import onnx as onnx_rt
    from edge_agent.model.runtimes import tflite as tflite_rt

    return {"onnxruntime": onnx_rt.runtime_version(), "litert": tflite_rt.runtime_version()}


__all__ = [
    "Runtime",
    "TensorSpec",
    "available_runtimes",
    "dequantize",
    "infer_lock",
    "load_runtime",
    "model_file",
    "model_to_nchw",
    "nchw_to_model",
    "quantize",
    "warmup",
    "zero_feeds",
]
