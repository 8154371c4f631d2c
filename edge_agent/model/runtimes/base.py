"""What every runtime shares: the tensor description, the ``Runtime`` interface, int8 / uint8
(de)quantization, warm-up, NCHW <-> NHWC at the artifact boundary, and the lock that serializes
``infer`` on a runtime that is not thread-safe."""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

_locks: weakref.WeakKeyDictionary[Any, threading.Lock] = weakref.WeakKeyDictionary()
_locks_guard = threading.Lock()


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


def zero_feeds(runtime: Runtime) -> dict[str, np.ndarray]:
    """A zero input for every model input (dynamic dimensions as 1), in what ``infer`` takes:
    float32 for quantized inputs, which the runtime quantizes."""
    return {
        spec.name: np.zeros(
            [d or 1 for d in spec.shape], np.dtype(spec.dtype if not spec.quantized else "float32")
        )
        for spec in runtime.inputs
    }


def warmup(
    runtime: Runtime, *, runs: int = 3, feeds: Mapping[str, np.ndarray] | None = None
) -> float:
    """Run a few zero inputs (``feeds``, else :func:`zero_feeds`) so the first real frame does
    not pay allocation and kernel setup. Returns the fastest warm run in milliseconds (the
    first pays the setup, so it is not one)."""
    feeds = zero_feeds(runtime) if feeds is None else feeds
    times = []
    for _ in range(max(runs, 2)):
        t0 = time.perf_counter()
        runtime.infer(feeds)
        times.append(time.perf_counter() - t0)
    return min(times[1:]) * 1000.0


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


def infer_lock(runtime: Runtime) -> threading.Lock:
    """The lock that serializes ``infer`` calls on one runtime object (LiteRT interpreters are
    not thread-safe). Created on first use; forgotten when the runtime is garbage collected."""
    with _locks_guard:
        lock = _locks.get(runtime)
        if lock is None:
            lock = _locks[runtime] = threading.Lock()
        return lock


__all__ = [
    "Runtime",
    "TensorSpec",
    "dequantize",
    "infer_lock",
    "model_to_nchw",
    "nchw_to_model",
    "quantize",
    "warmup",
    "zero_feeds",
]
