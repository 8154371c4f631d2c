"""ONNX Runtime: execution providers from the profile (CPU; CUDA and TensorRT on Jetson),
falling back with one warning when a provider is absent."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.errors import ModelError, first_line
from edge_agent.model.runtimes.base import TensorSpec

log = logging.getLogger(__name__)
_warned: set[str] = set()

_ORT_TYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(bool)": "bool",
}


def runtime_version() -> str | None:
    try:
        import onnxruntime
    except ImportError:
        return None
    return str(onnxruntime.__version__)


def _spec(arg: Any) -> TensorSpec:
    shape = tuple(d if isinstance(d, int) and d > 0 else None for d in arg.shape)
    return TensorSpec(name=arg.name, shape=shape, dtype=_ORT_TYPES.get(arg.type, str(arg.type)))


class OnnxRuntime:
    name = "onnxruntime"
    concurrent = True  # InferenceSession.run may be called from several threads at once

    def __init__(
        self,
        path: Path,
        *,
        threads: int = 0,
        providers: Sequence[str] = ("CPUExecutionProvider",),
        spinning: bool = False,
    ) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise ModelError("onnxruntime is not installed; pip install onnxruntime") from exc
        self.version = str(ort.__version__)
        available = set(ort.get_available_providers())
        chosen = [p for p in providers if p in available]
        missing = [p for p in providers if p not in available]
        for p in missing:
            if p not in _warned:
                _warned.add(p)
                log.warning("onnxruntime: %s is not available here; falling back", p)
        if "CPUExecutionProvider" not in chosen:
            chosen.append("CPUExecutionProvider")
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            so.intra_op_num_threads = threads
            so.inter_op_num_threads = 1
        # The capture thread shares the cores: a spinning intra-op pool would steal its time.
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        try:
            self._session = ort.InferenceSession(str(path), so, providers=chosen)
        except Exception as exc:
            raise ModelError(f"{path}: onnxruntime cannot load it: {first_line(exc)}") from exc
        self.providers = list(self._session.get_providers())
        self.inputs = [_spec(i) for i in self._session.get_inputs()]
        self.outputs = [_spec(o) for o in self._session.get_outputs()]
        self._out_names = [o.name for o in self.outputs]

    def infer(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        try:
            outs: list[np.ndarray] = self._session.run(self._out_names, dict(feeds))
            return outs
        except Exception as exc:
            raise ModelError(f"inference failed: {first_line(exc)}") from exc

    def close(self) -> None:
        self._session = None
