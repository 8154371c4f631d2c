"""The canonical ONNX model: one graph every output format is made from.

Real exporters (PaddlePaddle, tf2onnx, older torch) emit opset 10/11, fused BatchNorm, dynamic
batch dims and shape subgraphs; newer ``onnx`` releases write IR versions older onnxruntime
cannot read. ``canonicalize`` turns all of that into a graph that quantizes well:

1. IR version lowered to what the opsets need (onnx 1.23 writes IR 14; onnxruntime 1.31 reads 13).
2. Dynamic dims fixed from ``--input-shape``; a dynamic batch (axis 0) alone is kept.
3. Opset upgraded to at least 13 (per-channel QDQ needs ``DequantizeLinear(axis=...)``).
4. Shapes inferred: onnxruntime's symbolic inference, falling back to onnx's when it fails
   (it asserts on some real Concat patterns), then to none.
5. onnxruntime's hardware-independent ("basic") optimizations: constant folding, shape-subgraph
   folding, Conv+BatchNorm / Conv+Mul / Conv+Add fusion, identity and dropout removal.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, shape_inference, version_converter

from edge_agent.errors import (
    ConfigError,
    ConversionError,
    ModelError,
    UnsupportedModelError,
    first_line,
)

log = logging.getLogger(__name__)

#: Per-channel QDQ needs DequantizeLinear with an ``axis`` attribute: opset 13.
MIN_QUANT_OPSET = 13
#: The oldest opset we accept. Older graphs must be re-exported.
MIN_INPUT_OPSET = 10
#: The newest IR version the onnxruntime range we support reads (1.18 reads 10).
MAX_RUNTIME_IR = 10
#: Metadata onnxruntime's quantizer looks for to know pre-processing ran (silences its warning).
_PRE_PROCESS_META = ("onnx.quant.pre_process", "onnxruntime.quant")


@dataclass
class CanonicalModel:
    """The canonical model and what was done to get it."""

    model: onnx.ModelProto
    original_opset: int
    opset: int
    steps: list[str] = field(default_factory=list)

    @property
    def input_names(self) -> list[str]:
        return graph_input_names(self.model)


def graph_input_names(model: onnx.ModelProto) -> list[str]:
    """The graph's real inputs (initializers listed as inputs by old exporters excluded)."""
    inits = {i.name for i in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in inits]


def default_opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    raise UnsupportedModelError("model imports no default-domain ONNX opset")


def fix_ir_version(model: onnx.ModelProto) -> bool:
    """Bring the IR version into the range onnxruntime reads: at most MAX_RUNTIME_IR unless the
    opsets need more, and at least what the opsets need (after an opset upgrade).

    Returns True when it changed."""
    try:
        needed = helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True)
    except TypeError:  # onnx < 1.14 has no ignore_unknown
        needed = helper.find_min_ir_version_for(list(model.opset_import))
    target = max(needed, min(model.ir_version, max(needed, MAX_RUNTIME_IR)))
    if target != model.ir_version:
        model.ir_version = target
        return True
    return False


def fix_input_shapes(
    model: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]] | None
) -> list[str]:
    """Apply ``--input-shape`` values; refuse dynamic dims other than a leading batch axis."""
    steps: list[str] = []
    names = graph_input_names(model)
    shapes = dict(input_shapes or {})
    unknown = sorted(set(shapes) - set(names))
    if unknown:
        raise ConfigError(
            f"--input-shape names {', '.join(map(repr, unknown))}, but the model's inputs are "
            f"{', '.join(map(repr, names))}"
        )
    for inp in model.graph.input:
        if inp.name not in names:
            continue
        ttype = inp.type.tensor_type
        if not ttype.HasField("shape"):
            if inp.name in shapes:
                for d in shapes[inp.name]:
                    ttype.shape.dim.add().dim_value = int(d)
                steps.append(f"set shape of input '{inp.name}' to {list(shapes[inp.name])}")
                continue
            raise ConfigError(
                f"input '{inp.name}' has no shape; pass --input-shape {inp.name}=DIMS"
            )
        dims = ttype.shape.dim
        if inp.name in shapes:
            want = [int(d) for d in shapes[inp.name]]
            if len(want) != len(dims):
                raise ConfigError(
                    f"--input-shape {inp.name}={','.join(map(str, want))}: the input has rank "
                    f"{len(dims)}, not {len(want)}"
                )
            for axis, (dim, w) in enumerate(zip(dims, want)):
                if dim.HasField("dim_value") and dim.dim_value > 0 and dim.dim_value != w:
                    raise ConfigError(
                        f"--input-shape {inp.name}: axis {axis} is fixed at {dim.dim_value} in the "
                        f"model, not {w}"
                    )
                dim.Clear()
                dim.dim_value = w
            steps.append(f"set shape of input '{inp.name}' to {want}")
            continue
        for axis, dim in enumerate(dims):
            if dim.HasField("dim_value") and dim.dim_value > 0:
                continue
            if axis == 0:
                continue  # a dynamic batch is fine: it is set to 1 where a fixed one is needed
            label = dim.dim_param or "?"
            example = ",".join(
                str(d.dim_value)
                if d.HasField("dim_value") and d.dim_value > 0
                else ("1" if i == 0 else "N")
                for i, d in enumerate(dims)
            )
            raise ConfigError(
                f"input '{inp.name}' has a dynamic dim '{label}' at axis {axis}; fix it with "
                f"--input-shape {inp.name}={example} (N: the size you will run it at)"
            )
    return steps


def upgrade_opset(model: onnx.ModelProto, target: int) -> onnx.ModelProto:
    current = default_opset(model)
    if current >= target:
        return model
    try:
        upgraded = version_converter.convert_version(model, target)
    except Exception as exc:  # onnx raises RuntimeError / ValidationError / C++ errors
        first = first_line(exc)
        raise ConversionError(
            f"could not upgrade the model from opset {current} to {target}: {first}; "
            f"re-export it at opset {target} or newer"
        ) from exc
    return upgraded


@contextlib.contextmanager
def _cwd(path: str) -> Iterator[None]:
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def infer_shapes(model: onnx.ModelProto) -> tuple[onnx.ModelProto, str]:
    """Symbolic shape inference, falling back to onnx's own, then to none."""
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        # It may write a scratch file into the working directory: give it a temporary one.
        with tempfile.TemporaryDirectory(prefix="edge-shape-") as tmp, _cwd(tmp):  # noqa: SIM117
            with contextlib.redirect_stdout(io.StringIO()):  # (one `with` needs Python 3.10)
                inferred = SymbolicShapeInference.infer_shapes(model, auto_merge=True)
        if inferred is not None:
            return inferred, "symbolic"
    except Exception as exc:
        log.debug("symbolic shape inference failed: %s", exc)
    try:
        return shape_inference.infer_shapes(model, strict_mode=False, data_prop=True), "onnx"
    except Exception as exc:
        log.debug("onnx shape inference failed: %s", exc)
    return model, "none"


def ort_optimize(model: onnx.ModelProto, *, level: str = "basic") -> onnx.ModelProto:
    """Run onnxruntime's graph optimizer offline and return the optimized graph.

    ``basic`` is hardware-independent (constant folding, fusions that stay standard ONNX), so
    the result runs on any device."""
    levels = {
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    }
    with tempfile.TemporaryDirectory(prefix="edge-canon-") as tmp:
        src = Path(tmp) / "in.onnx"
        dst = Path(tmp) / "out.onnx"
        onnx.save_model(model, str(src))
        so = ort.SessionOptions()
        so.graph_optimization_level = levels[level]
        so.optimized_model_filepath = str(dst)
        so.log_severity_level = 3
        try:
            ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise ModelError(f"onnxruntime cannot load the model: {first_line(exc)}") from exc
        return onnx.load_model(str(dst))


def canonicalize(
    model: onnx.ModelProto,
    *,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    min_opset: int = MIN_QUANT_OPSET,
    optimize: bool = True,
) -> CanonicalModel:
    """Return the canonical form of ``model`` (the input is not modified)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    original_opset = default_opset(model)
    if original_opset < MIN_INPUT_OPSET:
        raise UnsupportedModelError(
            f"opset {original_opset} is older than {MIN_INPUT_OPSET}; re-export the model at "
            f"opset {MIN_QUANT_OPSET} or newer"
        )
    steps: list[str] = []
    old_ir = model.ir_version
    if fix_ir_version(model):
        steps.append(f"IR version {old_ir} -> {model.ir_version}")
    # Old exporters list initializers as graph inputs: that blocks constant folding.
    inits = {i.name for i in model.graph.initializer}
    if any(i.name in inits for i in model.graph.input):
        keep = [i for i in model.graph.input if i.name not in inits]
        del model.graph.input[:]
        model.graph.input.extend(keep)
        steps.append("removed initializers from graph inputs")
    steps += fix_input_shapes(model, input_shapes)
    if original_opset < min_opset:
        model = upgrade_opset(model, min_opset)
        fix_ir_version(model)
        steps.append(f"opset {original_opset} -> {min_opset}")
    if optimize:
        model = ort_optimize(model)
        fix_ir_version(model)
        steps.append("constant folding and fusions (onnxruntime basic level)")
    model, how = infer_shapes(model)
    steps.append(f"shape inference: {how}")
    _set_pre_process_meta(model)
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise ConversionError(f"the canonical model is invalid: {first_line(exc)}") from exc
    return CanonicalModel(
        model=model, original_opset=original_opset, opset=default_opset(model), steps=steps
    )


def _set_pre_process_meta(model: onnx.ModelProto) -> None:
    key, value = _PRE_PROCESS_META
    for prop in model.metadata_props:
        if prop.key == key:
            prop.value = value
            return
    entry = model.metadata_props.add()
    entry.key, entry.value = key, value


def tensor_spec(model: onnx.ModelProto, *, outputs: bool = False) -> list[dict[str, object]]:
    """Names, shapes (None for dynamic) and dtypes of the graph's inputs or outputs."""
    inits = {i.name for i in model.graph.initializer}
    items = model.graph.output if outputs else model.graph.input
    specs: list[dict[str, object]] = []
    for vi in items:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        shape: list[int | None] = []
        if tt.HasField("shape"):
            shape = [
                int(d.dim_value) if d.HasField("dim_value") and d.dim_value > 0 else None
                for d in tt.shape.dim
            ]
        dtype = (
            str(np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type))) if tt.elem_type else "?"
        )
        specs.append({"name": vi.name, "shape": shape, "dtype": dtype})
    return specs
