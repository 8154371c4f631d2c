"""Inference runtimes behind one small interface: one module per runtime.

``load_runtime(path)`` picks by file type: ``.onnx`` -> onnxruntime (``runtimes/onnx.py``),
``.tflite`` -> LiteRT (``runtimes/tflite.py``: ai-edge-litert, falling back to tflite-runtime,
then TensorFlow Lite). A runtime that is not installed is reported once, not a crash.

Every runtime takes and returns float32 arrays for float models and quantizes / dequantizes
int8 / uint8 inputs and outputs for the caller, using each tensor's scale and zero point.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from edge_agent.errors import ModelError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TensorSpec:
    """A model input or output: name, shape (None for a dynamic dim), dtype, quantization."""

    name: str
    shape: tuple[int | None, ...]
    dtype: str
    scale: float | None = None
    zero_point: int | None = None

    @property
    def quantized(self) -> bool:
        return self.scale is not None and self.dtype in ("int8", "uint8")

    def to_dict(self) -> dict[str, object]:
        quant = None if not self.quantized else {"scale": self.scale, "zero_point": self.zero_point}
        return {
            "name": self.name,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "quantization": quant,
        }


class Runtime(Protocol):
    """What the pipeline needs from an inference engine."""

    name: str
    version: str
    #: True when ``infer`` may run in several threads at once (the pipeline's workers).
    concurrent: bool
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    def infer(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Run once; outputs in ``outputs`` order, dequantized to float32 when quantized."""
        ...

    def close(self) -> None: ...


def quantize(x: np.ndarray, spec: TensorSpec) -> np.ndarray:
    """float -> the tensor's integer type with its scale and zero point."""
    assert spec.scale is not None and spec.zero_point is not None
    info = np.iinfo(np.dtype(spec.dtype))
    q = np.round(x / spec.scale) + spec.zero_point
    return np.clip(q, info.min, info.max).astype(spec.dtype)


def dequantize(q: np.ndarray, spec: TensorSpec) -> np.ndarray:
    assert spec.scale is not None and spec.zero_point is not None
    return ((q.astype(np.float32) - np.float32(spec.zero_point)) * np.float32(spec.scale)).astype(
        np.float32
    )


def warmup(runtime: Runtime, *, runs: int = 3) -> float:
    """Run a few zero inputs so the first real frame does not pay allocation and kernel setup.
    Returns the fastest warm run in milliseconds (the first pays the setup, so it is not one)."""
    import time

    feeds = {
        spec.name: np.zeros(
            [d or 1 for d in spec.shape], np.dtype(spec.dtype if not spec.quantized else "float32")
        )
        for spec in runtime.inputs
    }
    times = []
    for _ in range(max(runs, 2)):
        t0 = time.perf_counter()
        runtime.infer(feeds)
        times.append(time.perf_counter() - t0)
    return min(times[1:]) * 1000.0


def load_runtime(
    path: str | Path,
    *,
    threads: int = 0,
    providers: Sequence[str] = ("CPUExecutionProvider",),
) -> Runtime:
    """Load a model file with the runtime its type needs."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: no such model file")
    if path.suffix == ".onnx":
        from edge_agent.model.runtimes.onnx import OnnxRuntime

        return OnnxRuntime(path, threads=threads, providers=providers)
    if path.suffix == ".tflite":
        from edge_agent.model.runtimes.tflite import LiteRTRuntime

        return LiteRTRuntime(path, threads=threads)
    raise ModelError(f"{path}: unknown model type; expected .onnx or .tflite (or a .edgebundle)")


def available_runtimes() -> dict[str, str | None]:
    """Each runtime's version, or None when it cannot be imported here."""
    from edge_agent.model.runtimes import onnx as onnx_rt
    from edge_agent.model.runtimes import tflite as tflite_rt

    return {"onnxruntime": onnx_rt.runtime_version(), "litert": tflite_rt.runtime_version()}


def nchw_to_model(x: np.ndarray, shape: Sequence[int | None]) -> np.ndarray:
    """A 4-D NCHW array as the model takes it: transposed to NHWC when the model's input is
    NHWC (a TFLite artifact converted from an NCHW ONNX model), else unchanged."""
    nhwc = (x.shape[2], x.shape[3], x.shape[1]) if x.ndim == 4 else None
    if len(shape) == 4 and tuple(shape[1:]) != tuple(x.shape[1:]) and tuple(shape[1:]) == nhwc:
        return np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    return x


def model_to_nchw(y: np.ndarray, want: Sequence[int]) -> np.ndarray:
    """A 4-D NHWC model output as the NCHW ONNX model gave it, when ``want`` is that shape."""
    nchw = (y.shape[0], y.shape[3], y.shape[1], y.shape[2]) if y.ndim == 4 else None
    if tuple(y.shape) != tuple(want) and tuple(want) == nchw:
        return np.ascontiguousarray(y.transpose(0, 3, 1, 2))
    return y
