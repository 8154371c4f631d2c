"""ONNX Runtime: execution providers from the profile (CPU; CUDA and TensorRT on Jetson),
falling back with one warning when a provider is absent."""

from __future__ import annotations

import json
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


#: ONNX metadata key under which the converter records the onnxruntime session settings an
#: artifact was measured with: a JSON object of session config entries. Only the entries in
#: :data:`SESSION_HINTS` are honoured; anything else in it is ignored (a model file never
#: chooses how it is loaded beyond these).
SESSION_CONFIG_KEY = "edge.onnxruntime.session_config"
#: the session config entries a model may ask for, with the values allowed.
#: ``session.disable_quant_qdq``: the artifact is a QOperator int8 graph (QLinearConv ...), so
#: onnxruntime's QDQ passes have nothing to fuse; left on, they keep DequantizeLinear nodes
#: unfolded and block the float fusions (Gelu, SiLU) around the ops kept in float.
SESSION_HINTS: dict[str, frozenset[str]] = {"session.disable_quant_qdq": frozenset({"0", "1"})}


def session_hints(metadata: Mapping[str, str]) -> dict[str, str]:
    """The allowed session config entries a model's metadata asks for (none when absent or
    malformed: a hint is an optimisation, never a reason to refuse a model)."""
    raw = metadata.get(SESSION_CONFIG_KEY)
    if not raw:
        return {}
    try:
        asked = json.loads(raw)
    except ValueError:
        return {}
    if not isinstance(asked, dict):
        return {}
    return {
        k: str(v)
        for k, v in sorted(asked.items())
        if k in SESSION_HINTS and str(v) in SESSION_HINTS[k]
    }


def open_session(
    model: Path | str | bytes,
    *,
    threads: int = 0,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    spinning: bool = False,
) -> Any:
    """An ``onnxruntime.InferenceSession`` made as the agent runs models and as the converter
    measures them: full graph optimisation, ``threads`` intra-op threads (0: onnxruntime's
    default), no spinning unless asked (the capture thread shares the cores), and the session
    hints in the model's metadata (:func:`session_hints`, read first by an unoptimised session
    that is released before the real one is made). Raises :class:`ModelError` naming the model
    when it cannot be loaded."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise ModelError("onnxruntime is not installed; pip install onnxruntime") from exc
    where = "the model" if isinstance(model, bytes) else str(model)
    source = model if isinstance(model, bytes) else str(model)

    def make(hints: Mapping[str, str], *, probe: bool = False) -> Any:
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.graph_optimization_level = (
            ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            if probe
            else ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        )
        if threads:
            so.intra_op_num_threads = threads
            so.inter_op_num_threads = 1
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        for key, value in hints.items():
            so.add_session_config_entry(key, value)
        try:  # the probe on the CPU only: a TensorRT engine is not built to read metadata
            chosen = ["CPUExecutionProvider"] if probe else list(providers)
            return ort.InferenceSession(source, so, providers=chosen)
        except Exception as exc:
            raise ModelError(f"{where}: onnxruntime cannot load it: {first_line(exc)}") from exc

    # A cheap, unoptimised session reads the metadata; it is gone before the real one is made,
    # so a hinted model never holds two sessions' memory at once (an OTA swap holds two models).
    probe = make({}, probe=True)
    hints = session_hints(probe.get_modelmeta().custom_metadata_map)
    del probe
    return make(hints)


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
        self._session = open_session(path, threads=threads, providers=chosen, spinning=spinning)
        self.providers = list(self._session.get_providers())
        self.inputs = [_spec(i) for i in self._session.get_inputs()]
        self.outputs = [_spec(o) for o in self._session.get_outputs()]
        self._out_names = [o.name for o in self.outputs]
        #: the model's ``metadata_props`` (an Ultralytics export's task and class names)
        self.metadata = dict(self._session.get_modelmeta().custom_metadata_map)

    def infer(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        try:
            outs: list[np.ndarray] = self._session.run(self._out_names, dict(feeds))
            return outs
        except Exception as exc:
            raise ModelError(f"inference failed: {first_line(exc)}") from exc

    def close(self) -> None:
        self._session = None
