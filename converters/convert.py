"""From an imported model to one validated artifact: canonicalize, quantize, validate, and
enforce the accuracy budget. ``quantize`` and ``build`` both go through :func:`convert`.

The budget: with ``max_accuracy_drop`` and labelled samples, the converted model's accuracy may
drop at most that many points; otherwise every float output must keep a mean cosine similarity of
at least ``min_cosine`` (0.99 by default) to the original. When int8 misses it, the nodes that
add the most quantization error are kept in float, greedily, until the budget holds.

int8 schemes are chosen by measurement: every scheme the profile allows is quantized from the
same calibration, validated and timed; the fastest that meets the budget wins (when the profile
is the host's kind of CPU; for another target, the first in the profile's order that meets it).
"""

from __future__ import annotations

import platform
import tempfile
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from converters import heads, stateful
from converters import quantize as q
from converters.canonical import CanonicalModel, canonicalize, fix_ir_version, tensor_spec
from converters.data import Subset, evenly, split_data
from converters.task import (
    DEFAULT_FLOORS,
    Judge,
    Task,
    canonical_task,
    infer_task,
    model_metadata,
)
from converters.validate import (
    LiteRTSession,
    Progress,
    accuracy,
    class_predictions,
    compare_outputs,
    concat,
    is_classifier_output,
    make_session,
    measure_latency,
    run_all,
)
from edge_agent.errors import AccuracyBudgetError, ConfigError, EdgeError
from edge_agent.model.formats import ONNX_FORMATS, TFLITE_FORMATS, Int8Scheme
from edge_agent.model.preprocess import PreprocessSpec
from edge_agent.model.state import StatePair

#: What ``convert`` produces: every ONNX format, and TFLite fp32 / fp16 / int8 from our own
#: flatbuffer writer (no TensorFlow; ``converters/tflite.py``, ``converters/tflite_int8.py``).
QUANTIZE_FORMATS = (*ONNX_FORMATS, *TFLITE_FORMATS)
#: formats that quantize activations, so need calibration data
_STATIC_INT8 = ("onnx-int8", "tflite-int8")

if TYPE_CHECKING:
    from edge_agent.model.profiles import DeviceProfile

DEFAULT_MIN_COSINE = 0.99
#: candidates whose median latencies differ by less than this fraction (or 3x the measured
#: timing noise, when larger) tie
MIN_TIE_BAND = 0.05
#: ... but never wider than this: a much slower scheme does not tie because the machine is busy
MAX_TIE_BAND = 0.25


@dataclass(frozen=True)
class ConvertOptions:
    """What to make and how strictly to check it."""

    fmt: str
    profile: DeviceProfile
    calibration: Path | None = None
    eval: Path | None = None
    max_accuracy_drop: float | None = None
    min_cosine: float | None = None
    calibration_method: str = "minmax"
    preprocess: PreprocessSpec | None = None
    preprocess_overrides: Mapping[str, Any] = field(default_factory=dict)
    max_calibration_samples: int = 256
    max_validation_samples: int = 1000
    schemes: tuple[str, ...] = ()
    per_channel: bool = True
    float_fallback: bool = True
    progress: bool | None = None
    latency_seconds: float = 1.5
    host_profile: bool = True
    int8_io: bool = False  # tflite-int8: int8 inputs and outputs (default float32)
    #: what the model is for (``auto``: from its outputs and metadata): classify, detect, ctc,
    #: mask or raw; the task metric is measured and budgeted (:mod:`converters.task`)
    task: str = "auto"
    #: the floor on the task metric (default: the task's, :data:`converters.task.DEFAULT_FLOORS`)
    min_task_metric: float | None = None

    def __post_init__(self) -> None:
        if self.fmt not in QUANTIZE_FORMATS:
            raise ConfigError(f"--format {self.fmt}: expected one of {', '.join(QUANTIZE_FORMATS)}")
        if self.int8_io and self.fmt != "tflite-int8":
            raise ConfigError(f"--io-type int8 applies to --format tflite-int8, not {self.fmt}")
        if self.max_accuracy_drop is not None and not 0 <= self.max_accuracy_drop <= 100:
            raise ConfigError(
                f"--max-accuracy-drop {self.max_accuracy_drop}: must be between 0 and 100 points"
            )
        if self.min_cosine is not None and not -1 <= self.min_cosine <= 1:
            raise ConfigError(f"--min-cosine {self.min_cosine}: must be between -1 and 1")
        canonical_task(self.task)  # ConfigError naming the choices
        if self.min_task_metric is not None and not 0 <= self.min_task_metric <= 1:
            raise ConfigError(f"--min-task-metric {self.min_task_metric}: must be between 0 and 1")
        if self.latency_seconds <= 0:
            raise ConfigError(f"--latency-seconds {self.latency_seconds}: must be > 0")
        if self.max_validation_samples <= 0:
            raise ConfigError(f"--max-eval-samples {self.max_validation_samples}: must be > 0")
        if self.max_calibration_samples <= 0:
            raise ConfigError(
                f"--max-calibration-samples {self.max_calibration_samples}: must be > 0"
            )
        if self.calibration_method not in q.METHODS:
            raise ConfigError(
                f"--calibration-method {self.calibration_method}: expected one of "
                f"{', '.join(q.METHODS)}"
            )
        for name in self.schemes:
            try:
                Int8Scheme.parse(name)
            except ValueError as exc:
                raise ConfigError(f"--scheme: {exc}") from exc


@dataclass
class Candidate:
    """One produced model and how it did."""

    label: str
    path: Path
    float_nodes: list[dict[str, Any]] = field(default_factory=list)
    fidelity: dict[str, Any] = field(default_factory=dict)
    accuracy: float | None = None
    passed: bool = False
    latency: dict[str, float | int] | None = None
    error: str | None = None
    scheme: str | None = None
    #: every candidate the float-fallback search tried on the way to this one (itself included)
    explored: list[Candidate] = field(default_factory=list)
    #: the calibration method its activation ranges come from (static int8)
    method: str | None = None
    #: how far its worst budget check clears the floor (negative: missed by that much)
    margin: float = float("-inf")
    #: why it was made: ``budget`` (the fewest float nodes that meet the budget) or ``speed``
    #: (that mix with every unweighted op in float too: kept only when measured faster)
    purpose: str = "budget"

    @property
    def size(self) -> int:
        return self.path.stat().st_size if self.path.exists() else 0


@dataclass
class ConvertResult:
    model_bytes: bytes
    report: dict[str, Any]
    canonical: CanonicalModel
    calibration_stats: dict[str, Any] | None
    golden_inputs: dict[str, np.ndarray]
    golden_outputs: dict[str, np.ndarray]
    input_specs: list[dict[str, Any]]
    output_specs: list[dict[str, Any]]
    preprocess: PreprocessSpec | None
    #: what the model is for, as judged (``fidelity.task`` in the report)
    task: Task | None = None
    #: a streaming model's state pairs (validated in sequence: :mod:`converters.stateful`)
    state_pairs: tuple[StatePair, ...] = ()


class _Budget:
    def __init__(
        self,
        *,
        max_drop: float | None,
        min_cosine: float | None,
        has_labels: bool,
        task: Task | None = None,
        min_task: float | None = None,
    ):
        if max_drop is not None and not has_labels:
            raise ConfigError(
                "--max-accuracy-drop needs labels: pass --eval DATA.npz holding x and y "
                "(or use --min-cosine for a fidelity floor)"
            )
        self.max_drop = max_drop
        self.min_cosine = (
            min_cosine
            if min_cosine is not None
            else (None if max_drop is not None else DEFAULT_MIN_COSINE)
        )
        self.task = task
        self.min_task = (
            min_task if min_task is not None or task is None else DEFAULT_FLOORS.get(task.kind)
        )

    def check(self, fid: Mapping[str, Any], acc: float | None, acc_ref: float | None) -> str | None:
        """None when within budget, else the reason."""
        if self.max_drop is not None and acc is not None and acc_ref is not None:
            drop = acc_ref - acc
            if drop > self.max_drop + 1e-9:
                return f"accuracy drop {drop:.2f} points > budget {self.max_drop}"
        task = fid.get("task") or {}
        value = task.get("value")
        if self.min_task is not None and value is not None and value < self.min_task - 1e-12:
            return f"task {task['kind']}: {task['metric']} {task['value']:.4f} < {self.min_task}"
        if self.min_cosine is not None:
            for entry in fid.get("per_output", []):
                if entry.get("state"):  # judged by what it does to the other outputs
                    continue
                if entry["kind"] == "tensor" and entry["cosine"] < self.min_cosine:
                    return (
                        f"output '{entry['name']}' cosine {entry['cosine']:.4f} < {self.min_cosine}"
                    )
                if entry["kind"] == "labels" and entry["agreement"] < self.min_cosine:
                    return (
                        f"output '{entry['name']}' label agreement {entry['agreement']:.4f} "
                        f"< {self.min_cosine}"
                    )
        return None

    def margin(self, fid: Mapping[str, Any], acc: float | None, acc_ref: float | None) -> float:
        """How far the worst check clears its floor (negative when it misses): the measure that
        compares two candidates that both miss, on what made them miss."""
        margins = []
        if self.max_drop is not None and acc is not None and acc_ref is not None:
            margins.append((self.max_drop - (acc_ref - acc)) / 100.0)
        value = (fid.get("task") or {}).get("value")
        if self.min_task is not None and value is not None:
            margins.append(value - self.min_task)
        if self.min_cosine is not None:
            for entry in fid.get("per_output", []):
                if entry.get("state"):
                    continue
                if entry["kind"] == "tensor":
                    margins.append(entry["cosine"] - self.min_cosine)
                elif entry["kind"] == "labels":
                    margins.append(entry["agreement"] - self.min_cosine)
        return min(margins, default=0.0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "max_accuracy_drop": self.max_drop,
            "min_cosine": self.min_cosine,
            "task": None if self.task is None else self.task.kind,
            "min_task_metric": self.min_task,
        }


def image_preprocess(
    input_specs: Sequence[Mapping[str, Any]], overrides: Mapping[str, Any]
) -> PreprocessSpec | None:
    """The preprocessing spec of an image model (one 4-D input with 1 or 3 channels), else None.

    ``overrides`` are the user's flags (mean, std, scale, channels, resize, layout)."""
    shape = list(input_specs[0]["shape"]) if len(input_specs) == 1 else []
    if len(shape) != 4:
        if overrides:
            raise ConfigError("preprocessing flags apply to single-input image models only")
        return None
    try:
        return PreprocessSpec.for_input_shape(shape, **dict(overrides))
    except ConfigError:
        if overrides:
            raise
        return None


def _fixed_batch(specs: Sequence[Mapping[str, Any]]) -> int | None:
    """The model's batch size when its first input fixes one, else None (dynamic)."""
    first = list(specs[0]["shape"]) if specs else []
    return int(first[0]) if first and first[0] else None


def _original_for_runtime(model: onnx.ModelProto) -> bytes:
    m = onnx.ModelProto.FromString(model.SerializeToString())
    fix_ir_version(m)
    return m.SerializeToString()


def convert(
    imported: onnx.ModelProto,
    *,
    options: ConvertOptions,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    original_size: int | None = None,
    workdir: Path | None = None,
) -> ConvertResult:
    """Produce ``options.fmt`` from ``imported``, validated against it within the budget.

    Raises AccuracyBudgetError (nothing written) when no candidate meets the budget."""
    with tempfile.TemporaryDirectory(prefix="edge-convert-", dir=workdir) as tmp:
        return _convert(
            imported,
            options=options,
            input_shapes=input_shapes,
            original_size=original_size,
            tmp=Path(tmp),
        )


def _convert(
    imported: onnx.ModelProto,
    *,
    options: ConvertOptions,
    input_shapes: Mapping[str, Sequence[int]] | None,
    original_size: int | None,
    tmp: Path,
) -> ConvertResult:
    warnings_: list[str] = []
    canon = canonicalize(imported, input_shapes=input_shapes)
    q.ensure_node_names(canon.model)
    fp32_path = tmp / "fp32.onnx"
    onnx.save_model(canon.model, str(fp32_path))
    in_specs = tensor_spec(canon.model)
    out_specs = tensor_spec(canon.model, outputs=True)
    threads = options.profile.threads if options.host_profile else 0
    # a streaming model: the data feeds the other inputs, windows run in sequence
    pairs = stateful.state_pairs_of(in_specs, out_specs)
    data_specs = stateful.data_inputs(in_specs, pairs)
    state_outputs = {p.output for p in pairs}
    preprocess = options.preprocess or image_preprocess(data_specs, options.preprocess_overrides)

    # --- data ---------------------------------------------------------------------------
    fixed_batch = _fixed_batch(data_specs)
    stateful.check_batch(fixed_batch, pairs)
    step = fixed_batch or 1  # sample counts are kept multiples of a fixed batch
    if options.calibration is None and options.fmt in _STATIC_INT8:
        alt = "onnx-int8-dynamic" if options.fmt == "onnx-int8" else "tflite-fp16"
        raise ConfigError(
            f"{options.fmt} needs --calibration PATH (.npy/.npz of preprocessed samples, or an "
            f"image directory); or use --format {alt}"
        )
    data = split_data(
        data_specs,
        calibration=options.calibration,
        eval=options.eval,
        preprocess=preprocess,
        max_calibration_samples=options.max_calibration_samples,
        max_validation_samples=options.max_validation_samples,
        fixed_batch=fixed_batch,
        sequence=bool(pairs),
    )
    warnings_ += data.warnings
    val, calib, val_source = data.val, data.calib, data.source
    labels = val.labels()
    if options.max_accuracy_drop is not None and labels is None:
        _Budget(max_drop=options.max_accuracy_drop, min_cosine=None, has_labels=False)  # raises
    batch = fixed_batch or 32

    # --- the reference ------------------------------------------------------------------
    progress = options.progress
    orig_bytes = _original_for_runtime(imported)
    orig_sess = make_session(orig_bytes, threads=threads)

    def outputs_of(sess: Any, progress_: Progress | None = None) -> Any:
        """Every validation sample's outputs; a streaming model's windows in sequence, the
        session carrying its own state."""
        if pairs:
            return stateful.run_sequence(sess, val.batches(batch=batch), pairs, progress=progress_)
        return run_all(sess, val.batches(batch=batch), progress=progress_)

    ref = outputs_of(orig_sess, Progress("validation", len(val), enabled=progress))
    out_names = [o.name for o in orig_sess.get_outputs()]
    task = infer_task(
        stateful.hide_state(concat(ref), out_names, pairs),
        output_names=out_names,
        metadata=model_metadata(imported.metadata_props),
        requested=options.task,
        stateful=bool(pairs),
    )
    judge = Judge(task, ref)
    if task.kind == "detect" and options.task == "auto":
        # a decoding that does not reproduce the original against itself is a wrong guess of
        # the layout (raw SSD encodings without their anchors, say): judge the tensors instead
        itself = judge(ref)["value"]
        if itself is None or itself < 1.0:
            task = Task(
                "raw",
                f"{task.reason}; but decoded so, the original does not match itself (F1 "
                f"{itself}): compared as tensors; --task detect insists",
            )
            judge = Judge(task, ref)
    budget = _Budget(
        max_drop=options.max_accuracy_drop,
        min_cosine=options.min_cosine,
        has_labels=labels is not None,
        task=task,
        min_task=options.min_task_metric,
    )
    acc_ref = accuracy(concat(ref), labels) if labels is not None else None
    if budget.max_drop is not None and acc_ref is None:
        raise ConfigError(
            "--max-accuracy-drop needs a classifier (an integer label output or a float "
            "[N, classes] output); this model has neither: use --min-cosine for a fidelity floor"
        )

    def session_for(path: Path) -> Any:
        if path.suffix == ".tflite":  # LiteRT, behind onnxruntime's session interface
            return LiteRTSession(path, inputs=in_specs, outputs=out_specs, threads=threads)
        return make_session(str(path), threads=threads)

    if pairs and calib is not None:  # the state inputs: the float model's states in sequence
        calib = stateful.with_states(
            calib, orig_sess, pairs, keep=options.max_calibration_samples, batch=batch
        )

    def evaluate(cand: Candidate) -> Candidate:
        try:
            sess = session_for(cand.path)
            got = outputs_of(sess)
            cand.fidelity = compare_outputs(ref, got, out_names, state=state_outputs)
            cand.fidelity["task"] = judge(got)
            cand.accuracy = accuracy(concat(got), labels) if labels is not None else None
            reason = budget.check(cand.fidelity, cand.accuracy, acc_ref)
            cand.margin = budget.margin(cand.fidelity, cand.accuracy, acc_ref)
            cand.passed = reason is None
            cand.error = reason
        except EdgeError as exc:
            cand.passed, cand.error = False, str(exc)
        return cand

    # --- candidates ---------------------------------------------------------------------
    candidates: list[Candidate] = []
    fmt = options.fmt
    if fmt == "onnx-fp32":
        candidates.append(evaluate(Candidate("fp32", fp32_path)))
    elif fmt in ("tflite-fp32", "tflite-fp16"):
        from converters.tflite import onnx_to_tflite

        tfl = tmp / "model.tflite"
        # UnsupportedModelError lists what is not supported; fp16: fp16 weights, DEQUANTIZE to
        # float (TFLite's standard float16 scheme), activations in float32
        tfl.write_bytes(onnx_to_tflite(canon.model, fp16_weights=fmt == "tflite-fp16"))
        candidates.append(evaluate(Candidate(fmt, tfl)))
    elif fmt == "onnx-fp16":
        path = tmp / "fp16.onnx"
        range_feeds = (
            list(Subset(calib.ds, evenly(calib.indices, 16)).batches(batch=step)) if calib else []
        )
        if not range_feeds:
            val16 = (
                stateful.with_states(val, orig_sess, pairs, keep=16)
                if pairs
                else Subset(val.ds, evenly(val.indices, 16))
            )
            range_feeds = list(val16.batches(batch=step))
        hot = q.fp16_overflow_nodes(canon.model, range_feeds, threads=threads)
        onnx.save_model(q.to_fp16(canon.model, node_block_list=[h["node"] for h in hot]), str(path))
        cand = evaluate(Candidate("fp16", path))
        cand.float_nodes = [
            {
                "node": h["node"],
                "op_type": h["op_type"],
                "reason": f"its output reaches {h['max_abs']:.3g} on the samples; fp16 holds at "
                f"most {q.FP16_MAX:g}",
            }
            for h in hot
        ]
        candidates.append(cand)
    elif fmt == "onnx-int8-dynamic":
        ranking = q.weight_sensitivity(canon.model)

        def make_dynamic(exclude: Sequence[str], tag: str) -> Path:
            return q.quantize_int8_dynamic(
                fp32_path,
                tmp / f"dyn-{tag}.onnx",
                per_channel=options.per_channel,
                nodes_to_exclude=exclude,
            )

        candidates.append(
            _with_budget(
                "dynamic",
                make_dynamic,
                lambda _method: ranking,
                evaluate,
                scheme="dynamic",
                fallback=options.float_fallback,
            )
        )
    else:
        assert calib is not None
        cal_progress = Progress("calibration", len(calib), enabled=progress)
        calibrations = _Calibrations(fp32_path, calib, step=step, tmp=tmp)
        calibrations.get(options.calibration_method, on_item=cal_progress.update)
        sens_feeds = list(Subset(calib.ds, evenly(calib.indices, 16)).batches(batch=step))
        shared: dict[str, Any] = dict(
            fp32=fp32_path, canon=canon, calibrations=calibrations,
            method=options.calibration_method, sens_feeds=sens_feeds, evaluate=evaluate,
            threads=threads, tmp=tmp, fallback=options.float_fallback,
        )  # fmt: skip
        if fmt == "tflite-int8":
            candidates.append(_tflite_int8_candidate(**shared, int8_io=options.int8_io))
        else:
            for name in options.schemes or options.profile.int8_schemes:
                scheme = Int8Scheme.parse(name)
                candidates.append(
                    _int8_candidate(scheme, **shared, per_channel=options.per_channel)
                )

    # --- latency, choice ---------------------------------------------------------------
    feed = next(val.batches(batch=step))
    if pairs:  # the stream's first window, from the initial state
        feed = {**feed, **stateful.initial_feeds(pairs)}
    passing = [c for c in candidates if c.passed]
    if not passing:
        raise AccuracyBudgetError(_budget_failure(fmt, candidates, budget))
    # Every candidate produced is timed in one interleaved measurement, the float-fallback
    # search's points included (the report's trade-off table).
    timed = list(
        {id(c): c for c in candidates + [e for c in candidates for e in c.explored]}.values()
    )
    timed = [c for c in timed if c.path.exists()]
    sessions: dict[str, Any] = {"original": orig_sess}
    for c in timed:
        try:
            sessions[str(c.path)] = session_for(c.path)
        except EdgeError:
            continue
    lat = measure_latency(sessions, feed, seconds=options.latency_seconds)
    for c in timed:
        if str(c.path) in lat:
            c.latency = lat[str(c.path)].to_dict()
    tie_band = None
    if options.host_profile:
        # each scheme's budget point, then its speed point (same scheme, unweighted ops float),
        # which must stay as small as int8 promises (at most 10 % above its budget point)
        points = [
            p
            for c in passing
            for p in (
                c,
                *(
                    e
                    for e in c.explored
                    if e.purpose == "speed" and e.passed and e.size <= 1.1 * c.size
                ),
            )
            if str(p.path) in lat
        ]
        index, tie_band, noisy = choose_fastest(
            [(p.size, lat[str(p.path)].median_ms, lat[str(p.path)].noise) for p in points]
        )
        chosen = points[index]
        # the report's candidate row of that scheme is the point kept
        candidates = [chosen if chosen in c.explored else c for c in candidates]
        if noisy:
            warnings_.append(
                "latency timing was too noisy to tell the schemes apart: ties were judged within "
                f"{MAX_TIE_BAND:.0%}; rerun on a quieter machine or with a longer --latency-seconds"
            )
    else:
        chosen = passing[0]
        warnings_.append(
            f"profile {options.profile.name} is not this machine's kind of CPU: the first passing "
            "scheme in the profile's order was kept; latencies were measured here, not there"
        )
    orig_lat, conv_lat = lat["original"], lat[str(chosen.path)]
    slower = conv_lat.median_ms > orig_lat.median_ms * 1.02
    fp32_size = fp32_path.stat().st_size
    if (
        chosen.float_nodes
        and options.host_profile
        and fmt in (*_STATIC_INT8, "onnx-int8-dynamic")
        and conv_lat.median_ms >= orig_lat.median_ms
        and chosen.size >= fp32_size
    ):
        raise AccuracyBudgetError(
            f"the only {fmt} mixes that meet the budget ({len(chosen.float_nodes)} nodes in "
            f"float) are no faster ({conv_lat.median_ms:.3f} ms vs {orig_lat.median_ms:.3f} ms) "
            f"and no smaller ({chosen.size} vs {fp32_size} bytes) than fp32; nothing was "
            "written: use --format onnx-fp16, or keep the fp32 model"
        )
    if slower and options.host_profile:
        warnings_.append(
            f"the {fmt} model is SLOWER than the original on this machine "
            f"({conv_lat.median_ms:.3f} ms vs {orig_lat.median_ms:.3f} ms median)"
        )

    model_bytes = chosen.path.read_bytes()
    golden_in = dict(feed)
    golden_out = dict(zip(out_names, sessions[str(chosen.path)].run(out_names, golden_in)))
    stats = None
    if calib is not None:
        skip = {p.input for p in pairs} | state_outputs
        stats = calibration_statistics(calib, orig_sess, batch=batch, skip=skip)
    report: dict[str, Any] = {
        "format": fmt,
        "output": None,
        "profile": options.profile.name,
        "profile_source": options.profile.source,
        "host": {"machine": platform.machine(), "processor": platform.processor() or None},
        "int8_scheme": chosen.scheme if fmt == "onnx-int8" else None,
        "calibration": None
        if calib is None
        else {
            "method": chosen.method or options.calibration_method,
            "samples": len(calib),
            "source": calib.ds.description,
        },
        "validation": {"samples": len(val), "source": val_source},
        "size_bytes": {
            "original": original_size
            if original_size is not None
            else len(imported.SerializeToString()),
            "converted": len(model_bytes),
        },
        "latency_ms": {
            "original": round(orig_lat.median_ms, 4),
            "converted": round(conv_lat.median_ms, 4),
            "original_p90": round(orig_lat.p90_ms, 4),
            "converted_p90": round(conv_lat.p90_ms, 4),
            "runs": min(orig_lat.runs, conv_lat.runs),
            "measured_on": "this machine, batch 1, median of interleaved runs",
        },
        "fidelity": chosen.fidelity,
        "accuracy": {
            "original": acc_ref,
            "converted": chosen.accuracy,
            "drop": None
            if acc_ref is None or chosen.accuracy is None
            else acc_ref - chosen.accuracy,
        },
        "budget": {**budget.to_dict(), "met": True},
        "float_nodes": chosen.float_nodes,
        "candidates": [
            {
                "scheme": c.scheme or c.label,
                "passed": c.passed,
                "chosen": c is chosen,
                "purpose": c.purpose,
                "reason": c.error,
                "size_bytes": c.size,
                "latency_ms": None if c.latency is None else c.latency["median"],
                "cosine": c.fidelity.get("cosine"),
                "top1_agreement": c.fidelity.get("top1_agreement"),
                "task_metric": (c.fidelity.get("task") or {}).get("value"),
                "accuracy": c.accuracy,
                "float_nodes": len(c.float_nodes),
                "latency": c.latency,
            }
            for c in candidates
        ],
        "search": [
            {
                "scheme": c.scheme or c.label,
                "purpose": e.purpose,
                "float_nodes": len(e.float_nodes),
                "passed": e.passed,
                "task_metric": (e.fidelity.get("task") or {}).get("value"),
                "cosine": e.fidelity.get("cosine"),
                "size_bytes": e.size,
                "latency_ms": None if e.latency is None else e.latency["median"],
                "chosen": e is chosen,
            }
            for c in candidates
            for e in c.explored
        ],
        "tie_band": None if tie_band is None else round(tie_band, 4),
        "canonical": {
            "original_opset": canon.original_opset,
            "opset": canon.opset,
            "steps": canon.steps,
        },
        "slower_than_original": slower,
        "state": None
        if not pairs
        else {
            "pairs": [{**p.to_manifest(), "shape": list(p.shape)} for p in pairs],
            "validation": "the windows in sequence, each model carrying its own state",
        },
        "warnings": warnings_,
    }
    size = report["size_bytes"]
    size["ratio"] = round(size["converted"] / size["original"], 4) if size["original"] else None
    lat_r = report["latency_ms"]
    lat_r["ratio"] = round(lat_r["converted"] / lat_r["original"], 4) if lat_r["original"] else None
    data.close()
    return ConvertResult(
        model_bytes=model_bytes,
        report=report,
        canonical=canon,
        calibration_stats=stats,
        golden_inputs=golden_in,
        golden_outputs=golden_out,
        input_specs=in_specs,
        output_specs=out_specs,
        preprocess=preprocess,
        task=task,
        state_pairs=pairs,
    )


def choose_fastest(timings: Sequence[tuple[int, float, float]]) -> tuple[int, float, bool]:
    """The index of the candidate to keep among passing ones given as ``(size, median latency,
    noise)`` in the profile's order, the tie band, and whether the band was capped.

    Candidates within the timing noise of the fastest tie: the band is 3x the largest measured
    noise (the standard error of a median, relative), at least :data:`MIN_TIE_BAND` and at most
    :data:`MAX_TIE_BAND`. A tie breaks by size, then by the profile's order, so the same model,
    data and profile give the same bytes unless a scheme is clearly faster."""
    best = min(t[1] for t in timings)
    noise = max(t[2] for t in timings)
    band = min(max(MIN_TIE_BAND, 3.0 * noise), MAX_TIE_BAND)
    close = [i for i, t in enumerate(timings) if t[1] <= best * (1.0 + band)]
    return min(close, key=lambda i: (timings[i][0], i)), band, 3.0 * noise > MAX_TIE_BAND


def _with_budget(
    label: str,
    make: Any,
    ranking_fn: Any,
    evaluate: Any,
    *,
    scheme: str,
    fallback: bool = True,
    always_float: Sequence[Mapping[str, Any]] = (),
    tail: Sequence[Mapping[str, Any]] = (),
    method: str | None = None,
    methods: Sequence[str] = (),
    unweighted: Sequence[Mapping[str, Any]] = (),
) -> Candidate:
    """Quantize; while the budget is missed, keep more of the most sensitive units in float.

    ``always_float`` nodes (mixed-range output parts) are float in every candidate. When the
    first candidate misses, the decode ``tail`` is tried in float as one block, and kept float
    from then on when it helped the task metric. Then the ranked units (nodes, and attention /
    layer-norm blocks as wholes) are searched: doubling the count kept in float until the budget
    holds, then bisecting between the last miss and the first hit, so the fewest units that
    meet the budget (under a monotone ranking) are found in O(log n) tries. Every candidate
    tried is listed in the returned candidate's ``explored``.

    With ``method`` (static int8: ``make`` then takes ``method=``), the other calibration
    ``methods`` are tried after the first miss, and the one with the best task metric
    calibrates the rest of the search.

    Once a mix meets the budget, the same mix with the ``unweighted`` nodes in float too (only
    the learned weights in int8: nearly the same size) is made and checked as a ``speed``
    point: int8 softmax, elementwise and normalisation kernels are slower than float ones on
    some runtimes and CPUs, and the interleaved timing decides (:func:`choose_fastest`)."""
    found = _search_budget(
        label, make, ranking_fn, evaluate, scheme=scheme, fallback=fallback,
        always_float=always_float, tail=tail, method=method, methods=methods,
    )  # fmt: skip
    kept = {e["node"] for e in found.float_nodes}
    extra = [
        {
            **u,
            "reason": "no learned weights: kept float for speed (only the weights are int8 in "
            "this mix, which is kept only when measured faster)",
        }
        for u in unweighted
        if u["node"] not in kept
    ]
    if not (found.passed and extra and fallback):
        return found
    how = found.method
    names = [e["node"] for e in found.float_nodes + extra]
    try:
        path = make(names, "speed") if how is None else make(names, f"{how}-speed", method=how)
    except EdgeError:  # an optional point: the budget's mix stands without it
        return found
    fast = evaluate(Candidate(label, path, scheme=scheme, method=how, purpose="speed"))
    fast.float_nodes = [dict(e) for e in found.float_nodes] + extra
    found.explored.append(fast)
    fast.explored = found.explored
    return found


def _search_budget(
    label: str,
    make: Any,
    ranking_fn: Any,
    evaluate: Any,
    *,
    scheme: str,
    fallback: bool,
    always_float: Sequence[Mapping[str, Any]],
    tail: Sequence[Mapping[str, Any]],
    method: str | None,
    methods: Sequence[str],
) -> Candidate:
    """:func:`_with_budget`'s search for the fewest float units that meet the budget."""
    explored: list[Candidate] = []
    # --no-float-fallback: int8 as it comes, nothing kept in float
    base = [dict(e) for e in always_float] if fallback else []
    current = method

    def attempt(extra: Sequence[Mapping[str, Any]], tag: str, how: str | None = None) -> Candidate:
        entries = base + [dict(e) for e in extra]
        how = how or current
        names = [e["node"] for e in entries]
        path = make(names, tag) if how is None else make(names, f"{how}-{tag}", method=how)
        cand = evaluate(Candidate(label, path, scheme=scheme, method=how))
        cand.float_nodes = entries
        explored.append(cand)
        cand.explored = explored
        return cand

    first = attempt([], "0")
    if first.passed or first.fidelity == {} or not fallback:
        return first
    best_yet = first
    for other in methods:
        try:
            alt = attempt([], "0", other)
        except EdgeError:  # that calibration could not be made: the others still stand
            continue
        if alt.passed:
            return alt
        if alt.margin > best_yet.margin:
            best_yet, current = alt, other
    if tail:
        with_tail = attempt(tail, "tail")
        if with_tail.passed:
            return with_tail
        if with_tail.margin > best_yet.margin:
            base += [dict(e) for e in tail]
    done = {e["node"] for e in base}
    ranking = [r for r in ranking_fn(current) if not set(r["nodes"]) <= done]

    def entries(k: int) -> list[dict[str, Any]]:
        out = []
        for i, r in enumerate(ranking[:k]):
            block = ""
            if r["op_type"] in ("attention", "layernorm"):
                block = f"; part of a {r['op_type']} block"
            elif len(r["nodes"]) > 1:
                block = f"; one unit with {', '.join(n for n in r['nodes'] if n != r['node'])}"
            for name in r["nodes"]:
                if name in done:
                    continue
                out.append(
                    {
                        "node": name,
                        "op_type": r.get("op_types", {}).get(name, r["op_type"]),
                        "reason": f"adds quantization noise-to-signal {r['added_nsr']:.2e} "
                        f"(rank {i + 1} of {len(ranking)}){block}",
                    }
                )
        return out

    lo, hi, best = 0, None, None  # lo: the most units known to miss the budget
    k = 1
    while ranking:
        k = min(k, len(ranking))
        cand = attempt(entries(k), str(k))
        if cand.passed:
            hi, best = k, cand
            break
        lo = k
        if k == len(ranking):
            break
        k *= 2
    if best is None or hi is None:
        last = explored[-1]
        if last is not first:
            last.error = f"{last.error}; even with {len(last.float_nodes)} nodes kept in float"
        return last
    while hi - lo > 1:
        mid = (lo + hi) // 2
        cand = attempt(entries(mid), str(mid))
        if cand.passed:
            hi, best = mid, cand
        else:
            lo = mid
    return best


class _Calibrations:
    """One calibration per method, made when first asked for (every scheme and retry of that
    method quantizes from its cache)."""

    #: what is tried, after a miss, beside minmax (per-tensor ranges that clip outliers)
    ALTERNATIVES = ("percentile",)

    def __init__(self, fp32: Path, calib: Subset, *, step: int, tmp: Path) -> None:
        self.fp32, self.calib, self.step, self.tmp = fp32, calib, step, tmp
        self.caches: dict[str, Path] = {}

    def get(self, method: str, *, on_item: Any = None) -> Path:
        if method not in self.caches:
            self.caches[method] = q.calibrate(
                self.fp32,
                self.calib.batches(batch=self.step),
                method=method,
                cache_path=self.tmp / f"calibration-{method}.json",
                on_item=on_item,
            )
        return self.caches[method]

    def alternatives(self, method: str) -> tuple[str, ...]:
        """The other methods worth a try: only beside the default (a method the user chose
        stays theirs)."""
        return tuple(m for m in self.ALTERNATIVES if m != method) if method == "minmax" else ()


def _head_float(canon: CanonicalModel, cache: Path) -> dict[str, list[dict[str, Any]]]:
    """What the head analysis keeps float in every int8 candidate, the decode tail the
    fallback tries first (:mod:`converters.heads`), and the unweighted nodes of the speed
    point (:func:`_with_budget`)."""
    from converters.tflite_int8 import load_ranges

    always = heads.mixed_range_outputs(canon.model, load_ranges(cache))
    kept = {e["node"] for e in always}
    ops = {n.name: n.op_type for n in canon.model.graph.node}
    tail = [
        {
            "node": name,
            "op_type": ops[name],
            "reason": "decode arithmetic after the last learned layer: int8 missed the budget "
            "and this block in float measurably helped",
        }
        for name in heads.decode_tail(canon.model)
        if name not in kept
    ]
    unweighted = set(q.unweighted_nodes(canon.model))
    speed = [
        {"node": n.name, "op_type": n.op_type}
        for n in canon.model.graph.node
        if n.name in unweighted
    ]
    return {"always_float": always, "tail": tail, "unweighted": speed}


def _int8_candidate(
    scheme: Int8Scheme,
    *,
    fp32: Path,
    canon: CanonicalModel,
    calibrations: _Calibrations,
    method: str,
    per_channel: bool,
    sens_feeds: Sequence[Mapping[str, np.ndarray]],
    evaluate: Any,
    threads: int,
    tmp: Path,
    fallback: bool,
) -> Candidate:
    def make(
        exclude: Sequence[str], tag: str, graph: str = scheme.graph, method: str = method
    ) -> Path:
        s = Int8Scheme(scheme.activation, scheme.weight, scheme.reduce_range, graph)
        return q.quantize_int8_static(
            fp32,
            tmp / f"{s.name}-{tag}.onnx",
            scheme=s,
            cache_path=calibrations.get(method),
            method=method,
            per_channel=per_channel,
            nodes_to_exclude=exclude,
        )

    def ranking(how: str | None = None) -> list[dict[str, Any]]:
        twin = make((), f"twin-{how or method}", "qdq", how or method)
        return q.activation_sensitivity(
            canon.model,
            onnx.load_model(str(twin)),
            sens_feeds,
            threads=threads,
            blocks=heads.blocks(canon.model),
        )

    try:
        return _with_budget(
            scheme.name,
            make,
            ranking,
            evaluate,
            scheme=scheme.name,
            fallback=fallback,
            method=method,
            methods=calibrations.alternatives(method),
            **_head_float(canon, calibrations.get(method)),
        )
    except EdgeError as exc:
        return Candidate(scheme.name, tmp / "missing", error=str(exc), scheme=scheme.name)


def _tflite_int8_candidate(
    *,
    canon: CanonicalModel,
    fp32: Path,
    calibrations: _Calibrations,
    method: str,
    sens_feeds: Sequence[Mapping[str, np.ndarray]],
    evaluate: Any,
    threads: int,
    tmp: Path,
    fallback: bool,
    int8_io: bool,
) -> Candidate:
    """Full-integer TFLite from the calibration the int8 ONNX path uses (the same ranges);
    nodes over the budget are kept in float, ranked on the ONNX s8s8 QDQ twin (the same
    quantization: int8 activations, per-channel symmetric int8 weights)."""
    from converters.tflite import onnx_to_tflite
    from converters.tflite_int8 import Int8Config, load_ranges

    def make(exclude: Sequence[str], tag: str, method: str = method) -> Path:
        path = tmp / f"tflite-int8-{tag}.tflite"
        ranges = load_ranges(calibrations.get(method))
        cfg = Int8Config(ranges=ranges, float_nodes=tuple(exclude), int8_io=int8_io)
        path.write_bytes(onnx_to_tflite(canon.model, int8=cfg))
        return path

    def ranking(how: str | None = None) -> list[dict[str, Any]]:
        how = how or method
        twin = q.quantize_int8_static(
            fp32, tmp / f"tflite-twin-{how}.onnx", scheme=Int8Scheme.parse("s8s8-qdq"),
            cache_path=calibrations.get(how), method=how,
        )  # fmt: skip
        return q.activation_sensitivity(
            canon.model,
            onnx.load_model(str(twin)),
            sens_feeds,
            threads=threads,
            blocks=heads.blocks(canon.model),
        )

    label = "tflite-int8" + ("-int8-io" if int8_io else "")
    try:
        return _with_budget(
            label,
            make,
            ranking,
            evaluate,
            scheme=label,
            fallback=fallback,
            method=method,
            methods=calibrations.alternatives(method),
            **_head_float(canon, calibrations.get(method)),
        )
    except EdgeError as exc:
        return Candidate(label, tmp / "missing", error=str(exc), scheme=label)


def _budget_failure(fmt: str, candidates: Sequence[Candidate], budget: _Budget) -> str:
    tried = "; ".join(f"{c.scheme or c.label}: {c.error}" for c in candidates) or "nothing produced"
    return f"no {fmt} model met the budget ({tried}); nothing was written"


def calibration_statistics(
    subset: Subset, session: Any, *, batch: int, skip: Collection[str] = ()
) -> dict[str, Any]:
    """Summary statistics of the calibration inputs and the float model's outputs on them:
    what the device compares live data with to detect drift. The tensors named in ``skip`` (a
    streaming model's state inputs and outputs) are left out."""
    sums: dict[str, Any] = {}
    count = 0
    out_names = [o.name for o in session.get_outputs()]
    outputs: list[list[np.ndarray]] = [[] for _ in out_names]
    for feed in subset.batches(batch=batch):
        for name, x in feed.items():
            if name in skip:
                continue
            x64 = x.astype(np.float64)
            axis = 1 if x.ndim == 4 and x.shape[1] in (1, 3) else x.ndim - 1
            red = tuple(a for a in range(x.ndim) if a != axis)
            s = sums.setdefault(name, {"axis": axis, "sum": 0.0, "sq": 0.0, "n": 0})
            s["sum"] = s["sum"] + x64.sum(axis=red)
            s["sq"] = s["sq"] + (x64**2).sum(axis=red)
            s["n"] += int(np.prod([x.shape[a] for a in red]))
        count += int(next(iter(feed.values())).shape[0])
        for i, out in enumerate(session.run(out_names, dict(feed))):
            out = np.asarray(out)
            outputs[i].append(out if out.ndim else out[None])
    inputs = {}
    for name, s in sums.items():
        mean = s["sum"] / max(s["n"], 1)
        var = np.maximum(s["sq"] / max(s["n"], 1) - mean**2, 0.0)
        inputs[name] = {
            "channel_axis": s["axis"],
            "mean": np.round(mean, 6).tolist(),
            "std": np.round(np.sqrt(var), 6).tolist(),
        }
    outs: dict[str, Any] = {}
    full = [None if name in skip else arr for name, arr in zip(out_names, concat(outputs))]
    preds = class_predictions(full)
    for name, arr in zip(out_names, full):
        if name in skip:
            continue
        entry: dict[str, Any] = {}
        if arr is None:  # data-dependent size: summarise the values of every batch together
            arr = np.concatenate([o.reshape(-1) for o in outputs[out_names.index(name)]])
        if arr.dtype.kind == "f" and arr.size:
            entry.update(
                min=float(arr.min()),
                max=float(arr.max()),
                mean=float(arr.mean()),
                std=float(arr.std()),
            )
            if is_classifier_output(arr):
                entry["mean_top1"] = float(np.mean(np.max(arr, axis=1)))
        outs[name] = entry
    result: dict[str, Any] = {"samples": count, "inputs": inputs, "outputs": outs}
    if preds is not None:
        n_classes = max(
            int(preds.max()) + 1,
            max((a.shape[1] for a in full if a is not None and is_classifier_output(a)), default=0),
        )
        hist = np.bincount(preds, minlength=n_classes)
        result["class_histogram"] = (hist / max(hist.sum(), 1)).round(6).tolist()
    return result
