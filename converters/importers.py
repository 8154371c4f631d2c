"""Turn a trained model from any supported source into one ONNX ``ModelProto``.

The canonicaliser (``converters.canonical``) takes it from there: IR/opset upgrade, fixed input
shapes, constant folding, BatchNorm fusion. Importers only get a faithful graph out of the source.

=================  =======================================  ======================================
Source             Recognised by                            Read with
=================  =======================================  ======================================
ONNX               ``.onnx`` (protobuf, no magic)           ``onnx.load`` (external data checked)
TorchScript        zip with ``constants.pkl`` or ``code/``  ``torch.jit.load`` + ONNX export
ExportedProgram    zip whose ``archive_format`` is ``pt2``  ``torch.export.load`` + ONNX export
pickle / joblib    ``.pkl .pickle .joblib``, pickle magic,  only with ``trust_pickle``: joblib,
                   a ``torch.save`` zip (``data.pkl``)      pickle or ``torch.load``
Keras              ``.keras .h5 .hdf5``, HDF5 magic         TensorFlow + tf2onnx (the ``tf`` extra)
SavedModel         a directory with ``saved_model.pb``      tf2onnx (the ``tf`` extra)
TFLite             ``TFL3`` identifier, ``.tflite .lite``   ``converters.tflite_import`` (float
                                                            models; no TensorFlow)
torch.nn.Module    a Python object                          ``torch.onnx.export``
scikit-learn       a fitted estimator or pipeline object    skl2onnx
=================  =======================================  ======================================

Content wins over the extension: a ``.pt`` file that is really a pickled ``nn.Module``
(``torch.save(model)``) is a pickle, and is refused without ``trust_pickle``. Nothing here
unpickles a file unless the caller trusts it; TorchScript and ExportedProgram archives are read with
their own restricted loaders.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import logging
import operator
import os
import pickle
import re
import subprocess
import sys
import tempfile
import warnings
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import onnx

from edge_agent.errors import ConfigError, EdgeError, ModelError, UnsupportedModelError, first_line

log = logging.getLogger(__name__)

#: What :func:`detect_kind` can return.
KINDS = ("onnx", "torchscript", "exported-program", "pickle", "keras", "savedmodel", "tflite")
#: The opset torch and scikit-learn models are exported at (the canonicaliser may raise it).
DEFAULT_OPSET = 17
#: The oldest opset we export at; the canonicaliser refuses older graphs.
MIN_OPSET = 10

SUPPORTED = (
    "ONNX (.onnx), TorchScript (.pt/.pth), ExportedProgram (.pt2), scikit-learn/joblib pickle "
    "(.pkl/.pickle/.joblib, with --trust-pickle), Keras (.keras/.h5), a SavedModel directory "
    "or a float TFLite model (.tflite)"
)

_ONNX_EXTS = frozenset({".onnx"})
_TORCH_EXTS = frozenset({".pt", ".pth", ".ptl", ".torchscript"})
_PT2_EXTS = frozenset({".pt2"})
_PICKLE_EXTS = frozenset({".pkl", ".pickle", ".joblib"})
_KERAS_EXTS = frozenset({".keras", ".h5", ".hdf5"})
_TFLITE_EXTS = frozenset({".tflite", ".lite"})
_ZIP_MAGIC = b"PK\x03\x04"
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
#: A TFLite flatbuffer's file identifier, at bytes 4-8 (after the root table offset).
_TFLITE_IDENT = b"TFL3"
#: Pickle protocol 2-5 header (PROTO opcode + version).
_PICKLE_HEADERS = tuple(b"\x80" + bytes([v]) for v in range(2, 6))
#: Start of a legacy (pre-zip) ``torch.save`` file: protocol 2, then torch's magic number.
_TORCH_LEGACY_MAGIC = b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19"
#: skl2onnx scaler converters that can compute in double and cast back (closer to scikit-learn).
_DIV_CAST_SCALERS = ("StandardScaler", "RobustScaler", "MaxAbsScaler")


# --- public API -------------------------------------------------------------------------------


def parse_input_shape(text: str) -> tuple[str, tuple[int, ...]]:
    """Parse ``--input-shape NAME=DIMS``: ``"x=1,3,224,224"`` -> ``("x", (1, 3, 224, 224))``."""
    example = "e.g. input=1,3,224,224"
    name, sep, dims_text = text.rpartition("=")
    name = name.strip()
    if not sep or not name:
        raise ConfigError(f"--input-shape {text!r}: expected NAME=DIMS, {example}")
    try:
        dims = tuple(int(part) for part in dims_text.split(","))
    except ValueError:
        dims = ()
    if not dims or any(d <= 0 for d in dims):
        raise ConfigError(
            f"--input-shape {text!r}: DIMS must be positive integers separated by commas, {example}"
        )
    return name, dims


def detect_kind(path: Path) -> str:
    """What kind of model ``path`` holds, from its content first and its extension second."""
    path = Path(path)
    if path.is_dir():
        if (path / "saved_model.pb").is_file() or (path / "saved_model.pbtxt").is_file():
            return "savedmodel"
        raise ModelError(f"{path}: a directory without saved_model.pb; expected {SUPPORTED}")
    if not path.exists():
        raise ModelError(f"{path}: no such file or directory")
    if path.name in ("saved_model.pb", "saved_model.pbtxt"):
        return "savedmodel"
    ext = path.suffix.lower()
    try:
        with path.open("rb") as fh:
            head = fh.read(16)
    except OSError as exc:
        raise ModelError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    if head.startswith(_ZIP_MAGIC):
        kind = _zip_kind(path)
        if kind is not None:
            return kind
    elif head.startswith(_HDF5_MAGIC):
        return "keras"
    elif head.startswith(_PICKLE_HEADERS):
        return "pickle"
    elif head[4:8] == _TFLITE_IDENT:
        return "tflite"
    by_ext = (
        (_ONNX_EXTS, "onnx"),
        (_TFLITE_EXTS, "tflite"),
        (_PICKLE_EXTS, "pickle"),
        (_KERAS_EXTS, "keras"),
        (_PT2_EXTS, "exported-program"),
    )
    for exts, kind in by_ext:
        if ext in exts:
            return kind
    if ext in _TORCH_EXTS:
        raise ModelError(
            f"{path}: neither TorchScript nor a torch.save archive; save it with "
            "torch.jit.save or torch.export.save, or export it to ONNX"
        )
    if not ext and head[:1] == b"\x08":  # protobuf field 1 (ir_version) as a varint
        return "onnx"
    raise ModelError(f"{path}: unrecognised model file; expected {SUPPORTED}")


def import_model(
    source: str | os.PathLike[str] | onnx.ModelProto | Any,
    *,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    example_inputs: tuple[Any, ...] | None = None,
    trust_pickle: bool = False,
    opset: int = DEFAULT_OPSET,
) -> onnx.ModelProto:
    """Import ``source`` as an ONNX model.

    ``source`` is a model file or SavedModel directory, an ``onnx.ModelProto``, a
    ``torch.nn.Module`` (or a ``torch.export.ExportedProgram``) or a fitted scikit-learn estimator.
    ``input_shapes`` names and shapes the inputs of torch and scikit-learn models (the batch
    dimension is exported dynamic); ``example_inputs`` gives torch models real example tensors
    instead. ``opset`` applies to exported models only: ONNX files are returned as they are.
    """
    shapes = _check_shapes(input_shapes)
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < MIN_OPSET:
        raise ConfigError(f"opset {opset!r}: must be an integer >= {MIN_OPSET}")
    if isinstance(source, onnx.ModelProto):
        return source
    if isinstance(source, (str, os.PathLike)):
        return _import_file(Path(source), shapes=shapes, trust_pickle=trust_pickle, opset=opset)
    return _import_object(
        source,
        label=type(source).__name__,
        shapes=shapes,
        example_inputs=example_inputs,
        opset=opset,
    )


# --- files ------------------------------------------------------------------------------------


def _import_file(
    path: Path, *, shapes: dict[str, tuple[int, ...]], trust_pickle: bool, opset: int
) -> onnx.ModelProto:
    kind = detect_kind(path)
    log.debug("%s: detected %s", path, kind)
    if kind == "onnx":
        return _load_onnx(path)
    if kind == "torchscript":
        return _import_torchscript(path, shapes=shapes, opset=opset)
    if kind == "exported-program":
        return _import_exported_program(path, shapes=shapes, opset=opset)
    if kind == "pickle":
        obj = _load_pickle(path, trust=trust_pickle)
        return _import_object(obj, label=str(path), shapes=shapes, example_inputs=None, opset=opset)
    if kind == "tflite":
        from converters.tflite_import import import_tflite

        return import_tflite(path)
    return _import_tensorflow(path, kind=kind, opset=opset)


def _zip_kind(path: Path) -> str | None:
    """TorchScript, ExportedProgram, a torch.save pickle or a Keras 3 archive; None if unknown."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            fmt = next((n for n in names if n.rsplit("/", 1)[-1] == "archive_format"), None)
            if fmt is not None and zf.read(fmt)[:16].strip() == b"pt2":
                return "exported-program"
    except (zipfile.BadZipFile, OSError, KeyError):
        return None
    leaves = {n.rsplit("/", 1)[-1] for n in names}
    if "constants.pkl" in leaves or any("/code/" in f"/{n}" for n in names):
        return "torchscript"
    if "data.pkl" in leaves:
        return "pickle"  # torch.save(obj): unpickling it runs arbitrary code
    if {"config.json", "model.weights.h5"} <= leaves:
        return "keras"
    return None


def _load_onnx(path: Path) -> onnx.ModelProto:
    try:
        model = onnx.load_model(str(path), load_external_data=False)
    except Exception as exc:
        raise ModelError(f"{path}: not an ONNX model (protobuf parse failed)") from exc
    if model.ir_version <= 0 or not model.HasField("graph") or not model.graph.output:
        raise ModelError(f"{path}: not an ONNX model (no IR version or no graph)")
    external = _external_locations(model)
    if external:
        base = path.resolve().parent
        for tensor_name, location in external:
            target = (base / location).resolve()
            if os.path.isabs(location) or base not in (target, *target.parents):
                raise ModelError(
                    f"{path}: tensor {tensor_name!r} points outside the model's directory "
                    f"({location}); re-save the model with its data beside it"
                )
            if not target.is_file():
                raise ModelError(
                    f"{path}: external data file {location!r} (tensor {tensor_name!r}) is "
                    f"missing; copy it next to the model"
                )
        try:
            onnx.load_external_data_for_model(model, str(base))
        except Exception as exc:
            raise ModelError(f"{path}: cannot read its external data: {first_line(exc)}") from exc
    return model


def _external_locations(model: onnx.ModelProto) -> list[tuple[str, str]]:
    """(tensor name, location) of every tensor stored outside the file, subgraphs included."""
    found: list[tuple[str, str]] = []

    def tensor(t: onnx.TensorProto) -> None:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            entries = {e.key: e.value for e in t.external_data}
            found.append((t.name, entries.get("location", "")))

    def graph(g: onnx.GraphProto) -> None:
        for t in g.initializer:
            tensor(t)
        for s in g.sparse_initializer:
            tensor(s.values)
            tensor(s.indices)
        for node in g.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    tensor(attr.t)
                for t in attr.tensors:
                    tensor(t)
                if attr.HasField("g"):
                    graph(attr.g)
                for sub in attr.graphs:
                    graph(sub)

    graph(model.graph)
    return found


def _load_pickle(path: Path, *, trust: bool) -> Any:
    if not trust:
        raise ConfigError(
            f"{path}: loading a pickle runs arbitrary code; pass --trust-pickle only if you trust "
            "its source (or export it to ONNX yourself)"
        )
    with path.open("rb") as fh:
        head = fh.read(len(_TORCH_LEGACY_MAGIC))
    is_torch = head.startswith(_TORCH_LEGACY_MAGIC) or (
        head.startswith(_ZIP_MAGIC) and _zip_kind(path) == "pickle"
    )
    try:
        with _captured_warnings("unpickling"):
            if is_torch:
                torch = _require("torch", extra="torch", label=path, what="torch.save files")
                return torch.load(str(path), map_location="cpu", weights_only=False)
            if importlib.util.find_spec("joblib") is not None:
                joblib = importlib.import_module("joblib")
                return joblib.load(str(path))
            with path.open("rb") as fh:
                return pickle.load(fh)  # the caller passed trust_pickle
    except EdgeError:
        raise
    except Exception as exc:
        raise ModelError(
            f"{path}: cannot unpickle: {first_line(exc)}; the code that defined its classes "
            "must be importable"
        ) from exc


# --- Python objects ---------------------------------------------------------------------------


def _import_object(
    obj: Any,
    *,
    label: str,
    shapes: dict[str, tuple[int, ...]],
    example_inputs: tuple[Any, ...] | None,
    opset: int,
) -> onnx.ModelProto:
    torch = sys.modules.get("torch")
    if torch is not None:
        if isinstance(obj, torch.export.ExportedProgram):
            return _export_program(obj, label=label, shapes=shapes, opset=opset)
        if isinstance(obj, torch.nn.Module):
            args = _torch_inputs(example_inputs, shapes, label=label, what="a torch model")
            names = _input_names(shapes, len(args))
            return _export_torch(obj, args, names=names, label=label, opset=opset)
    if _is_sklearn_estimator(obj):
        return _export_sklearn(obj, label=label, shapes=shapes, opset=opset)
    kind = f"{type(obj).__module__}.{type(obj).__qualname__}"
    if isinstance(obj, dict) and torch is not None:
        hint = "a state_dict? load it into its nn.Module and pass the module"
    else:
        hint = "expected an ONNX model, a torch.nn.Module or a fitted scikit-learn estimator"
    raise UnsupportedModelError(f"{label}: cannot import a {kind} ({hint})")


def _is_sklearn_estimator(obj: Any) -> bool:
    if "sklearn" not in sys.modules:
        return False
    from sklearn.base import BaseEstimator

    return isinstance(obj, BaseEstimator)


# --- torch ------------------------------------------------------------------------------------


def _import_torchscript(
    path: Path, *, shapes: dict[str, tuple[int, ...]], opset: int
) -> onnx.ModelProto:
    torch = _require("torch", extra="torch", label=path, what="TorchScript models")
    if not shapes:
        raise ConfigError(f"{path}: TorchScript needs input shapes; pass --input-shape NAME=DIMS")
    try:
        with _captured_warnings("torch.jit.load"):
            module = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:
        raise ModelError(f"{path}: not a readable TorchScript archive: {first_line(exc)}") from exc
    args = _torch_inputs(None, shapes, label=str(path), what="TorchScript")
    return _export_torch(module, args, names=list(shapes), label=str(path), opset=opset)


def _import_exported_program(
    path: Path, *, shapes: dict[str, tuple[int, ...]], opset: int
) -> onnx.ModelProto:
    torch = _require("torch", extra="torch", label=path, what="ExportedProgram (.pt2) files")
    try:
        with _captured_warnings("torch.export.load"):
            program = torch.export.load(str(path))
    except Exception as exc:
        raise ModelError(f"{path}: not a readable ExportedProgram: {first_line(exc)}") from exc
    return _export_program(program, label=str(path), shapes=shapes, opset=opset)


def _export_program(
    program: Any, *, label: str, shapes: dict[str, tuple[int, ...]], opset: int
) -> onnx.ModelProto:
    """Export a ``torch.export.ExportedProgram``: explicit shapes win over its example inputs."""
    stored = program.example_inputs
    if shapes:
        args = _torch_inputs(None, shapes, label=label, what="ExportedProgram")
    elif stored is not None and not stored[1] and stored[0]:
        args = tuple(stored[0])
    else:
        raise ConfigError(
            f"{label}: this ExportedProgram has no positional example inputs; "
            "pass --input-shape NAME=DIMS"
        )
    names = _input_names(shapes, len(args))
    try:
        # The shape guards would only be traced into constants (and a TracerWarning each).
        module = program.module(check_guards=False)
    except TypeError:  # an older torch without check_guards
        module = program.module()
    return _export_torch(module, args, names=names, label=label, opset=opset, program=program)


def _torch_inputs(
    example_inputs: tuple[Any, ...] | None,
    shapes: dict[str, tuple[int, ...]],
    *,
    label: str,
    what: str,
) -> tuple[Any, ...]:
    torch = _require("torch", extra="torch", label=label, what="torch models")
    if example_inputs is not None:
        if isinstance(example_inputs, torch.Tensor):
            return (example_inputs,)
        if not isinstance(example_inputs, tuple) or not example_inputs:
            raise ConfigError(
                f"{label}: example_inputs must be a non-empty tuple of tensors, "
                f"not {type(example_inputs).__name__}"
            )
        return example_inputs
    if not shapes:
        raise ConfigError(
            f"{label}: {what} needs input shapes; pass --input-shape NAME=DIMS "
            "(or example_inputs from Python)"
        )
    gen = torch.Generator().manual_seed(0)
    return tuple(torch.rand(dims, generator=gen, dtype=torch.float32) for dims in shapes.values())


def _input_names(shapes: Mapping[str, Sequence[int]], count: int) -> list[str]:
    if len(shapes) == count:
        return list(shapes)
    return ["input" if i == 0 else f"input_{i}" for i in range(count)]


def _export_torch(
    module: Any,
    args: tuple[Any, ...],
    *,
    names: list[str],
    label: str,
    opset: int,
    program: Any = None,
) -> onnx.ModelProto:
    """Export with the TorchScript-based exporter; fall back to the dynamo one if it fails."""
    torch = _require("torch", extra="torch", label=label, what="torch models")
    with _eval_mode(module) as mode_settable, torch.no_grad():
        try:
            with _captured_warnings("torch"):
                outputs = module(*args)
        except Exception as exc:
            shapes = ", ".join(str(tuple(a.shape)) for a in args if isinstance(a, torch.Tensor))
            raise ModelError(
                f"{label}: the model fails on inputs of shape {shapes}: {first_line(exc)}; "
                "check --input-shape"
            ) from exc
        out_ranks = _tensor_ranks(outputs, torch)
        out_names = ["output" if i == 0 else f"output_{i}" for i in range(len(out_ranks))]
        in_ranks = [a.dim() if isinstance(a, torch.Tensor) else 0 for a in args]
        dynamic_axes: dict[str, dict[int, str]] = {
            name: {0: "batch"}
            for name, rank in [*zip(names, in_ranks), *zip(out_names, out_ranks)]
            if rank >= 1
        }
        training = (
            torch.onnx.TrainingMode.EVAL if mode_settable else torch.onnx.TrainingMode.PRESERVE
        )
        buf = io.BytesIO()
        try:
            with _captured_warnings("torch.onnx.export"), _no_input_validation(module):
                torch.onnx.export(
                    module,
                    args,
                    buf,
                    dynamo=False,
                    opset_version=opset,
                    do_constant_folding=True,
                    input_names=names,
                    output_names=out_names,
                    dynamic_axes=dynamic_axes,
                    training=training,
                )
            model = onnx.load_model_from_string(buf.getvalue())
        except Exception as legacy_exc:
            log.debug("%s: the TorchScript-based exporter failed", label, exc_info=True)
            try:
                model = _export_dynamo(
                    program if program is not None else module,
                    args,
                    names=names,
                    out_names=out_names,
                    dynamic_axes=dynamic_axes,
                    opset=opset,
                )
            except Exception as dynamo_exc:
                log.debug("%s: the dynamo exporter failed", label, exc_info=True)
                raise ModelError(
                    f"{label}: torch cannot export the model to ONNX: {first_line(legacy_exc)} "
                    f"(the dynamo exporter also failed: {_dynamo_reason(dynamo_exc)})"
                ) from legacy_exc
    return _finish(model, label=label)


def _export_dynamo(
    module: Any,
    args: tuple[Any, ...],
    *,
    names: list[str],
    out_names: list[str],
    dynamic_axes: dict[str, dict[int, str]],
    opset: int,
) -> onnx.ModelProto:
    import torch

    chatter = io.StringIO()
    onnx_log = logging.getLogger("torch.onnx")  # its progress notes and opset-18 notices
    old_level = onnx_log.level
    with contextlib.ExitStack() as stack:
        stack.enter_context(_captured_warnings("torch.onnx.export(dynamo=True)"))
        stack.enter_context(contextlib.redirect_stdout(chatter))
        stack.enter_context(contextlib.redirect_stderr(chatter))
        stack.callback(onnx_log.setLevel, old_level)
        onnx_log.setLevel(logging.ERROR)
        program = torch.onnx.export(
            module,
            args,
            dynamo=True,
            opset_version=opset,
            input_names=names,
            output_names=out_names,
            dynamic_axes=dynamic_axes,
            verbose=False,
            report=False,
        )
    if chatter.getvalue().strip():
        log.debug("torch.onnx.export(dynamo=True) printed:\n%s", chatter.getvalue().rstrip())
    if program is None:
        raise ModelError("the dynamo exporter returned nothing")
    return onnx.ModelProto.FromString(program.model_proto.SerializeToString())


def _dynamo_reason(exc: BaseException) -> str:
    """The dynamo exporter wraps the real reason (a missing op) in generic, coloured errors."""
    if isinstance(exc, ModuleNotFoundError) and exc.name == "onnxscript":
        return "it needs onnxscript: pip install onnxscript"
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return re.sub(r"\x1b\[[0-9;]*m", "", first_line(exc))


@contextlib.contextmanager
def _eval_mode(module: Any) -> Iterator[bool]:
    """Put ``module`` in eval mode and restore it; yield False if its mode cannot be set
    (an ExportedProgram's module: its mode was fixed when it was exported)."""
    was_training = bool(getattr(module, "training", False))
    try:
        module.eval()
        settable = True
    except NotImplementedError:
        settable = False
    try:
        yield settable
    finally:
        if settable:
            module.train(was_training)


@contextlib.contextmanager
def _no_input_validation(module: Any) -> Iterator[None]:
    """Switch off an ExportedProgram module's Python-side input check while tracing: it reads
    shapes as Python ints (a TracerWarning each) and is not part of the graph. The inputs were
    already checked when the model ran once before export."""
    if getattr(module, "validate_inputs", None) is not True:
        yield
        return
    module.validate_inputs = False
    try:
        yield
    finally:
        module.validate_inputs = True


def _tensor_ranks(obj: Any, torch: Any) -> list[int]:
    """The rank of every tensor in a (nested) model output, in the exporter's order."""
    if isinstance(obj, torch.Tensor):
        return [obj.dim()]
    if isinstance(obj, (list, tuple)):
        return [r for item in obj for r in _tensor_ranks(item, torch)]
    if isinstance(obj, dict):
        return [r for item in obj.values() for r in _tensor_ranks(item, torch)]
    return []


# --- scikit-learn -----------------------------------------------------------------------------


def _export_sklearn(
    est: Any, *, label: str, shapes: dict[str, tuple[int, ...]], opset: int
) -> onnx.ModelProto:
    skl2onnx = _require("skl2onnx", extra="sklearn", label=label, what="scikit-learn models")
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.base import BaseEstimator, is_classifier
    from sklearn.exceptions import NotFittedError
    from sklearn.utils.validation import check_is_fitted

    cls = type(est).__name__
    try:
        check_is_fitted(est)
    except NotFittedError as exc:
        raise ModelError(f"{label}: the {cls} is not fitted; fit it before importing it") from exc
    except TypeError:
        pass  # not something check_is_fitted understands; skl2onnx will say
    n_features = getattr(est, "n_features_in_", None)
    name = "input"
    if shapes:
        if len(shapes) != 1:
            raise ConfigError(
                f"{label}: a scikit-learn model has one input; got --input-shape for "
                f"{', '.join(shapes)}"
            )
        name, dims = next(iter(shapes.items()))
        if n_features is not None and dims[-1] != n_features:
            raise ConfigError(
                f"{label}: --input-shape {name}={','.join(map(str, dims))} gives "
                f"{dims[-1]} features but the {cls} was fitted on {n_features}"
            )
        n_features = dims[-1]
    if n_features is None:
        raise ConfigError(
            f"{label}: cannot tell how many features the {cls} takes; "
            "pass --input-shape input=1,N_FEATURES"
        )
    options: dict[int, dict[str, Any]] = {}
    if is_classifier(est):
        options[id(est)] = {"zipmap": False}  # plain label + probability tensors
    parts = [est, *(v for v in est.get_params(deep=True).values() if isinstance(v, BaseEstimator))]
    for part in parts:
        # skl2onnx's default scaler multiplies by a float32 reciprocal; scikit-learn divides in
        # double. The difference flips tree thresholds downstream, so divide in double too.
        if type(part).__name__ in _DIV_CAST_SCALERS and type(part).__module__.startswith("sklearn"):
            options.setdefault(id(part), {})["div"] = "div_cast"
    target = {"": min(opset, skl2onnx.get_latest_tested_opset_version()), "ai.onnx.ml": 3}
    try:
        with _captured_warnings("skl2onnx"):
            model = skl2onnx.convert_sklearn(
                est,
                initial_types=[(name, FloatTensorType([None, int(n_features)]))],
                options=options or None,
                target_opset=target,
            )
    except Exception as exc:
        raise UnsupportedModelError(
            f"{label}: skl2onnx cannot convert the {cls}: {first_line(exc)}; export it to ONNX "
            "yourself (a custom skl2onnx converter) and pass the .onnx file"
        ) from exc
    return _finish(model, label=label)


# --- TensorFlow -------------------------------------------------------------------------------


def _import_tensorflow(path: Path, *, kind: str, opset: int) -> onnx.ModelProto:
    what = "Keras models" if kind == "keras" else "SavedModel directories"
    if any(importlib.util.find_spec(m) is None for m in ("tensorflow", "tf2onnx")):
        raise ConfigError(
            f"{path}: {what} need TensorFlow; install the 'tf' extra: "
            "pip install 'edge-inference[tf]'"
        )
    saved = path.parent if path.is_file() else path  # a SavedModel's saved_model.pb
    with tempfile.TemporaryDirectory(prefix="edge-import-") as tmp:
        if kind == "keras":
            saved = _keras_to_saved_model(path, Path(tmp) / "saved_model")
        out = Path(tmp) / "model.onnx"
        # tf2onnx's Python from_keras() breaks on Keras 3 (TF >= 2.16); its command line
        # converts a SavedModel on every version, and keeps TensorFlow's chatter in a child.
        cmd = [sys.executable, "-m", "tf2onnx.convert", "--saved-model", str(saved)]
        cmd += ["--opset", str(opset), "--output", str(out)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, check=False)
        except subprocess.TimeoutExpired as exc:
            raise ModelError(f"{path}: tf2onnx did not finish within an hour") from exc
        if proc.returncode != 0 or not out.is_file():
            lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
            reason = lines[-1].strip() if lines else f"exit code {proc.returncode}"
            raise ModelError(f"{path}: tf2onnx cannot convert the model: {reason}")
        model = onnx.load_model(str(out))
    return _finish(model, label=str(path))


def _keras_to_saved_model(path: Path, saved: Path) -> Path:
    try:
        tf = importlib.import_module("tensorflow")
    except Exception as exc:  # e.g. an ml_dtypes clash, not only ImportError
        raise ConfigError(
            f"{path}: TensorFlow failed to import ({first_line(exc)}); reinstall the 'tf' extra: "
            "pip install 'edge-inference[tf]'"
        ) from exc
    try:
        model = tf.keras.models.load_model(str(path), compile=False)
        export = getattr(model, "export", None)
        if callable(export):
            export(str(saved))  # Keras 3 (and tf.keras >= 2.13): an inference SavedModel
        else:
            tf.saved_model.save(model, str(saved))
    except Exception as exc:
        raise ModelError(
            f"{path}: Keras cannot load or export the model: {first_line(exc)}"
        ) from exc
    return saved


# --- helpers ----------------------------------------------------------------------------------


def _check_shapes(shapes: Mapping[str, Sequence[int]] | None) -> dict[str, tuple[int, ...]]:
    out: dict[str, tuple[int, ...]] = {}
    for name, dims in (shapes or {}).items():
        try:
            fixed = tuple(operator.index(d) for d in dims)
        except TypeError:
            fixed = ()
        ok = isinstance(name, str) and bool(name) and bool(fixed) and min(fixed) > 0
        if not ok:
            raise ConfigError(
                f"input shape {name!r}={dims!r}: must be a name and positive integer dims, "
                "e.g. input=1,3,224,224"
            )
        out[str(name)] = fixed
    return out


def _require(module: str, *, extra: str, label: object, what: str) -> Any:
    """Import an optional dependency, or say which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ConfigError(
            f"{label}: {what} need {module}; install the '{extra}' extra: "
            f"pip install 'edge-inference[{extra}]'"
        ) from exc


@contextlib.contextmanager
def _captured_warnings(source: str) -> Iterator[None]:
    """Keep third-party warnings (torch's legacy-exporter deprecation notices, tracer and
    skl2onnx notes) out of the caller's warning filters; log them instead.

    A tracer warning means the export may only hold for the example input's shapes or values,
    so it is logged at WARNING; the rest at DEBUG.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    seen: set[str] = set()
    for w in caught:
        text = f"{w.category.__name__}: {w.message}"
        if text in seen:
            continue
        seen.add(text)
        level = logging.WARNING if w.category.__name__ == "TracerWarning" else logging.DEBUG
        log.log(level, "%s: %s", source, text)


def _finish(model: onnx.ModelProto, *, label: str) -> onnx.ModelProto:
    """Merge duplicate opset imports (skl2onnx writes some) and check the exported graph."""
    best: dict[str, int] = {}
    for imp in model.opset_import:
        best[imp.domain] = max(best.get(imp.domain, 0), imp.version)
    if len(best) != len(model.opset_import):
        del model.opset_import[:]
        model.opset_import.extend(onnx.helper.make_opsetid(d, v) for d, v in best.items())
    try:
        onnx.checker.check_model(model)
    except Exception as exc:
        raise ModelError(f"{label}: the exported ONNX model is invalid: {first_line(exc)}") from exc
    return model


__all__ = [
    "DEFAULT_OPSET",
    "KINDS",
    "SUPPORTED",
    "detect_kind",
    "import_model",
    "parse_input_shape",
]
