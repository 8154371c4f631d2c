"""LiteRT (TensorFlow Lite): ai-edge-litert, falling back to tflite-runtime (the device's two
runtimes; TensorFlow itself is never imported here). XNNPACK is the default CPU delegate in
both; the thread count
comes from the profile or config. int8 / uint8 inputs and outputs are quantized and dequantized
for the caller."""

from __future__ import annotations

import logging
import queue
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.errors import ModelError, first_line
from edge_agent.model.runtimes.base import TensorSpec, dequantize, quantize

log = logging.getLogger(__name__)

#: TensorFlow's SSD post-processing, a custom op every LiteRT build registers: the TFLite SSD
#: and EfficientDet-Lite files of the TFLite examples, Coral and MediaPipe end in it
DETECTION_POSTPROCESS = "TFLite_Detection_PostProcess"
#: What its four outputs are, in the op's order
DETECTION_ROLES = ("boxes", "classes", "scores", "count")


def _interpreter_class() -> tuple[Any, str] | None:
    try:
        import ai_edge_litert
        from ai_edge_litert import interpreter as litert

        return litert.Interpreter, f"ai-edge-litert {getattr(ai_edge_litert, '__version__', '?')}"
    except ImportError:
        pass
    try:
        from tflite_runtime import interpreter as tfl_rt

        return tfl_rt.Interpreter, "tflite-runtime"
    except ImportError:
        return None


def runtime_version() -> str | None:
    found = _interpreter_class()
    return None if found is None else found[1]


def _precision(details: list[Mapping[str, Any]]) -> str:
    """int8 when any tensor is quantized to 8 bits, else fp16 when any is float16, else fp32."""
    types = {np.dtype(d["dtype"]) for d in details}
    if any(
        np.dtype(d["dtype"]) in (np.int8, np.uint8) and d.get("quantization", (0.0, 0))[0]
        for d in details
    ):
        return "int8"
    return "fp16" if np.dtype(np.float16) in types else "fp32"


def _spec(detail: Mapping[str, Any]) -> TensorSpec:
    dtype = np.dtype(detail["dtype"]).name
    scale, zero = detail.get("quantization", (0.0, 0))
    quantized = dtype in ("int8", "uint8") and scale
    shape = tuple(int(d) if d > 0 else None for d in detail.get("shape_signature", detail["shape"]))
    return TensorSpec(
        name=str(detail["name"]),
        shape=shape,
        dtype=dtype,
        scale=float(scale) if quantized else None,
        zero_point=int(zero) if quantized else None,
    )


def _detection_outputs(interp: Any, outputs: list[Mapping[str, Any]]) -> dict[str, str] | None:
    """The model's output names by role (:data:`DETECTION_ROLES`) when its graph ends in
    :data:`DETECTION_POSTPROCESS`, read from the op itself: exports list its four outputs in
    different orders, and their names (``StatefulPartitionedCall:3``) say nothing. None when
    there is no such op, or this runtime cannot list its ops."""
    try:
        ops = interp._get_ops_details()
    except Exception:  # a runtime without it (private API): the model's outputs as they are
        return None
    names = {int(d["index"]): str(d["name"]) for d in outputs}
    for op in ops:
        if op.get("op_name") != DETECTION_POSTPROCESS:
            continue
        outs = [int(i) for i in op.get("outputs", ())]
        found = [names.get(i, "") for i in outs]
        if len(found) == len(DETECTION_ROLES) and all(found) and len(set(found)) == len(found):
            return dict(zip(DETECTION_ROLES, found))
        log.warning("%s: its outputs are not the model's four, each with its own name: "
                    "reported raw", DETECTION_POSTPROCESS)  # fmt: skip
    return None


class LiteRTRuntime:
    """One model in ``instances`` interpreters. An interpreter is not thread-safe, so each
    ``infer`` takes one from a pool and gives it back: with one instance calls are serialized;
    with several (the pipeline's workers) as many run at once, each with ``threads`` threads.
    Interpreters are cheap: the weights are mapped from the same file."""

    name = "litert"

    def __init__(self, path: Path, *, threads: int = 0, instances: int = 1) -> None:
        found = _interpreter_class()
        if found is None:
            raise ModelError(
                f"{path}: no TFLite runtime installed; "
                "pip install ai-edge-litert (or tflite-runtime)"
            )
        cls, self.version = found
        self.instances = max(1, instances)
        self.concurrent = self.instances > 1
        interps = []
        try:
            for _ in range(self.instances):
                interp = cls(model_path=str(path), num_threads=threads or None)
                interp.allocate_tensors()
                interps.append(interp)
        except Exception as exc:
            raise ModelError(f"{path}: LiteRT cannot load it: {first_line(exc)}") from exc
        first = interps[0]
        self._in = first.get_input_details()
        self._out = first.get_output_details()
        self.inputs = [_spec(d) for d in self._in]
        self.outputs = [_spec(d) for d in self._out]
        self._in_index = {d["name"]: (d["index"], spec) for d, spec in zip(self._in, self.inputs)}
        #: the shape each input is allocated at when the file is loaded (its shape there)
        self._declared = {int(d["index"]): tuple(int(x) for x in d["shape"]) for d in self._in}
        #: the shape each interpreter's dynamic inputs are allocated at (key: interpreter's
        #: id, input index), once fed another: the interpreter is resized first
        self._allocated: dict[tuple[int, int], tuple[int, ...]] = {}
        self._pool: queue.LifoQueue[Any] = queue.LifoQueue()
        for interp in interps:
            self._pool.put(interp)
        self._interp: Any = first  # kept for close()
        #: what its weights are stored as: "int8" (quantized tensors), "fp16" or "fp32"
        self.precision = _precision(first.get_tensor_details())
        #: the model's outputs by role when it ends in TFLite_Detection_PostProcess, else None
        self.detection_outputs = _detection_outputs(first, self._out)

    def infer(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        pool = self._pool
        interp = pool.get()
        try:
            resized = False
            for name, value in feeds.items():
                index, spec = self._in_index[name]
                if None in spec.shape:  # a dynamic input: allocated at the shape it is fed
                    key = (id(interp), index)
                    if (self._allocated.get(key) or self._declared[index]) != value.shape:
                        interp.resize_tensor_input(index, list(value.shape), strict=True)
                        self._allocated[key], resized = tuple(value.shape), True
            if resized:
                interp.allocate_tensors()
            for name, value in feeds.items():
                index, spec = self._in_index[name]
                if spec.quantized and value.dtype != np.dtype(spec.dtype):  # else quantized already
                    value = quantize(value, spec)
                elif value.dtype != np.dtype(spec.dtype):
                    value = value.astype(spec.dtype)
                interp.set_tensor(index, value)
            interp.invoke()
            outs = []
            for detail, spec in zip(self._out, self.outputs):
                value = interp.get_tensor(detail["index"])
                outs.append(dequantize(value, spec) if spec.quantized else value)
            return outs
        except KeyError as exc:
            raise ModelError(f"no model input named {exc}") from exc
        except Exception as exc:
            raise ModelError(f"inference failed: {first_line(exc)}") from exc
        finally:
            pool.put(interp)

    def close(self) -> None:
        self._interp = None
        self._pool = queue.LifoQueue()
