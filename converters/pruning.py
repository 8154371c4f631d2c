"""``edge-convert prune`` and ``build --prune-*``: canonicalize, prune (structured, magnitude,
or to a target latency by sensitivity analysis), recover on the calibration data, validate
against the original, measure. The graph algorithms are in :mod:`converters.prune`.

The report adds to the quantize report's keys: ``latency_ms``, ``size_bytes`` (and its gzip
size, what a bundle stores), ``params`` (before and after), ``layers`` (per-layer channels,
parameters and sparsity), ``groups`` (per channel group: kept / ratio), ``frozen`` (what could
not be pruned and why) and, with ``--target-latency``, ``sensitivity``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from converters import prune as P
from converters.canonical import canonicalize, tensor_spec
from converters.convert import _fixed_batch, image_preprocess
from converters.data import split_data
from converters.validate import (
    accuracy,
    compare_outputs,
    concat,
    make_session,
    measure_latency,
    run_all,
)
from edge_agent.errors import AccuracyBudgetError, ConfigError

#: the ratios each channel group is tried at in the sensitivity analysis
SENSITIVITY_RATIOS = (0.25, 0.5, 0.75)
UNSTRUCTURED_WARNING = (
    "unstructured sparsity: dense runtimes (onnxruntime, LiteRT/XNNPACK) run zeros at full "
    "cost, so this gains no speed; it shrinks the compressed bundle"
)


@dataclass(frozen=True)
class PruneOptions:
    structured: float | None = None
    unstructured: float | None = None
    target_latency_ms: float | None = None
    target_size_bytes: int | None = None
    calibration: Path | None = None
    eval: Path | None = None
    max_accuracy_drop: float | None = None
    min_cosine: float | None = None
    per_layer: bool = False
    channel_multiple: int = 8
    recover: bool = True
    skip_first_last: bool = True
    score: str = "l1"
    threads: int = 2
    latency_seconds: float = 1.5
    max_calibration_samples: int = 256
    max_validation_samples: int = 1000
    preprocess_overrides: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        modes = [self.structured, self.unstructured, self.target_latency_ms, self.target_size_bytes]
        if all(m is None for m in modes):
            raise ConfigError(
                "prune: give --structured RATIO, --unstructured SPARSITY, --target-latency MS "
                "or --target-size BYTES"
            )
        targets = (self.structured, self.target_latency_ms, self.target_size_bytes)
        if sum(m is not None for m in targets) > 1:
            raise ConfigError("--structured, --target-latency and --target-size are exclusive")
        if self.target_size_bytes is not None and self.target_size_bytes <= 0:
            raise ConfigError(f"--target-size {self.target_size_bytes}: must be > 0 bytes")
        if self.structured is not None and not 0 < self.structured < 1:
            raise ConfigError(f"--structured {self.structured}: the ratio must be in (0, 1)")
        if self.unstructured is not None and not 0 < self.unstructured < 1:
            raise ConfigError(f"--unstructured {self.unstructured}: the sparsity must be in (0, 1)")
        if self.target_latency_ms is not None and self.target_latency_ms <= 0:
            raise ConfigError(f"--target-latency {self.target_latency_ms}: must be > 0 ms")
        if self.score not in ("l1", "l2"):
            raise ConfigError(f"--score {self.score}: expected l1 or l2")
        if self.channel_multiple < 1:
            raise ConfigError(f"--channel-multiple {self.channel_multiple}: must be >= 1")
        if self.max_accuracy_drop is not None and not 0 <= self.max_accuracy_drop <= 100:
            raise ConfigError(f"--max-accuracy-drop {self.max_accuracy_drop}: 0 to 100 points")


@dataclass
class PruneResult:
    model: onnx.ModelProto
    report: dict[str, Any]


class _Data:
    """Calibration feeds (for recovery) and validation feeds, labels and reference outputs."""

    def __init__(self, model: onnx.ModelProto, opts: PruneOptions) -> None:
        specs = tensor_spec(model)
        fixed = _fixed_batch(specs)
        split = split_data(
            specs,
            calibration=opts.calibration,
            eval=opts.eval,
            preprocess=image_preprocess(specs, dict(opts.preprocess_overrides or {})),
            max_calibration_samples=opts.max_calibration_samples,
            max_validation_samples=opts.max_validation_samples,
            fixed_batch=fixed,
        )
        batch = fixed or 32  # a fixed batch size is kept (split_data trims to whole batches)
        self.val, self.source, self.warnings = split.val, split.source, split.warnings
        self.cal = [] if split.calib is None else list(split.calib.batches(batch=batch))
        self.feeds = list(self.val.batches(batch=batch))
        self.labels = self.val.labels()
        split.close()
        self.sess_ref = make_session(model.SerializeToString(), threads=opts.threads)
        self.names = [o.name for o in self.sess_ref.get_outputs()]
        self.ref = run_all(self.sess_ref, self.feeds)
        self.acc_ref = accuracy(concat(self.ref), self.labels) if self.labels is not None else None
        if opts.max_accuracy_drop is not None and self.acc_ref is None:
            raise ConfigError("--max-accuracy-drop needs labels: pass --eval DATA.npz with x and y")

    def score(self, model: onnx.ModelProto, *, threads: int) -> tuple[dict[str, Any], float | None]:
        sess = make_session(model.SerializeToString(), threads=threads)
        got = run_all(sess, self.feeds)
        fid = compare_outputs(self.ref, got, self.names)
        acc = accuracy(concat(got), self.labels) if self.labels is not None else None
        return fid, acc

    def drop(self, fid: Mapping[str, Any], acc: float | None) -> float:
        """Accuracy points lost, or (without labels) 100 x (1 - cosine)."""
        if self.acc_ref is not None and acc is not None:
            return float(self.acc_ref - acc)
        return float(100 * (1 - (fid.get("cosine") or 0.0)))


def _macs(model: onnx.ModelProto) -> int:
    """Multiply-accumulates of the Conv and Gemm/MatMul layers, from the model's inferred shapes
    (canonical and pruned models carry them)."""
    shapes = P._shapes(model)
    total = 0
    for n, w in P.weighted_layers(model):
        out = shapes.get(n.output[0], [])
        spatial = int(np.prod([d for d in out[2:] if d > 0])) if n.op_type == "Conv" else 1
        total += int(np.prod(w.dims)) * spatial
    return total


def _layers(before: onnx.ModelProto, after: onnx.ModelProto) -> list[dict[str, Any]]:
    b = {P._name(n): tuple(w.dims) for n, w in P.weighted_layers(before)}
    weights = {P._name(n): numpy_helper.to_array(w) for n, w in P.weighted_layers(after)}
    a = {name: w.shape for name, w in weights.items()}
    sp = {name: float(np.mean(w == 0)) for name, w in weights.items()}
    rows = []
    for name, shp in b.items():
        new = a.get(name, shp)
        rows.append({
            "node": name, "weight_shape": list(shp), "pruned_shape": list(new),
            "params_ratio": round(float(np.prod(new)) / max(float(np.prod(shp)), 1), 4),
            "channels_ratio": round(1 - new[0] / shp[0], 4) if shp else 0.0,
            "sparsity": round(sp.get(name, 0.0), 4),
        })  # fmt: skip
    return rows


def _cut(a: P.Analysis, ratios: Mapping[int, float] | float, opts: PruneOptions) -> P.Pruned:
    """``a.model`` pruned at ``ratios`` with the options' channel multiple and score."""
    return P.prune_channels(
        a.model, ratios, analysis=a, multiple=opts.channel_multiple, score=opts.score
    )


def _structured(
    a: P.Analysis, ratios: Mapping[int, float] | float, data: _Data, opts: PruneOptions
) -> P.Pruned:
    model = a.model
    pr = _cut(a, ratios, opts)
    if opts.recover and data.cal:
        pr.model = P.recover(model, pr.model, data.cal, pr.keep_of)
    return pr


def _sensitivity(a: P.Analysis, data: _Data, opts: PruneOptions) -> list[dict[str, Any]]:
    """Each channel group pruned alone at each ratio (no recovery): the drop and the MACs
    saved."""
    model = a.model
    base, base_params = _macs(model), P.param_count(model)
    rows = []
    for sid, space in a.prunable().items():
        for r in SENSITIVITY_RATIOS:
            pr = _cut(a, {sid: r}, opts)
            fid, acc = data.score(pr.model, threads=opts.threads)
            rows.append({
                "space": sid, "producers": space.producers, "channels": space.size,
                "ratio": r, "kept": pr.groups[[g["space"] for g in pr.groups].index(sid)]["kept"],
                "drop": round(data.drop(fid, acc), 4),
                "macs_saved": round(1 - _macs(pr.model) / base, 4),
                "params_saved": round(1 - P.param_count(pr.model) / base_params, 4),
            })  # fmt: skip
    return rows


def _to_target(
    a: P.Analysis, data: _Data, opts: PruneOptions
) -> tuple[P.Pruned, list[dict[str, Any]], float]:
    """Greedy over the sensitivity table: raise the ratio of the group that costs the least drop
    per MAC (latency target) or parameter (size target) saved, until the measured latency or the
    model's size reaches the target; then recover, and back off while the budget is missed."""
    model = a.model
    by_size = opts.target_size_bytes is not None
    goal = opts.target_size_bytes if by_size else opts.target_latency_ms
    target = float(goal or 0.0)
    gain_key = "params_saved" if by_size else "macs_saved"
    flag, unit = ("--target-size", "bytes") if by_size else ("--target-latency", "ms")
    table = _sensitivity(a, data, opts)
    by = {(r["space"], r["ratio"]): r for r in table}
    ratios: dict[int, float] = {}
    steps: list[dict[int, float]] = []
    spaces = sorted({r["space"] for r in table})
    feed = data.feeds[0]
    one = {k: v[:1] for k, v in feed.items()}

    def latency(m: onnx.ModelProto) -> float:
        s = make_session(m.SerializeToString(), threads=opts.threads)
        return measure_latency({"m": s}, one, seconds=min(opts.latency_seconds, 0.5))["m"].median_ms

    def measure(m: onnx.ModelProto) -> float:
        return float(len(m.SerializeToString())) if by_size else latency(m)

    current = _cut(a, {}, opts).model
    lat = measure(current)
    while lat > target:
        best = None
        for s in spaces:
            now = ratios.get(s, 0.0)
            nxt = next((r for r in SENSITIVITY_RATIOS if r > now), None)
            if nxt is None:
                continue
            row = by[s, nxt]
            prev = by.get((s, now), {"drop": 0.0, gain_key: 0.0})
            gain = row[gain_key] - prev[gain_key]
            cost = max(row["drop"] - prev["drop"], 0.0) + 1e-6
            if gain > 0 and (best is None or cost / gain < best[0]):
                best = (cost / gain, s, nxt)
        if best is None:
            break
        ratios[best[1]] = best[2]
        steps.append(dict(ratios))
        current = _cut(a, ratios, opts).model
        lat = measure(current)
    # recover; back off while over budget
    while True:
        pr = _structured(a, ratios, data, opts)
        fid, acc = data.score(pr.model, threads=opts.threads)
        drop = data.drop(fid, acc)
        within = opts.max_accuracy_drop is None or drop <= opts.max_accuracy_drop + 1e-9
        if within or not steps:
            break
        steps.pop()
        ratios = dict(steps[-1]) if steps else {}
    achieved = measure(pr.model)
    if achieved > target:
        why = (
            ""
            if opts.max_accuracy_drop is None
            else f" within --max-accuracy-drop {opts.max_accuracy_drop}"
        )
        raise AccuracyBudgetError(
            f"{flag} {target:g} {unit}: the best pruning{why} reaches {achieved:.3f} {unit} "
            f"(unpruned {measure(model):.3f} {unit}); nothing was written"
        )
    return pr, table, achieved


def prune_model(
    imported: onnx.ModelProto,
    options: PruneOptions,
    *,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
) -> PruneResult:
    """Prune ``imported``; raise AccuracyBudgetError (nothing written) over the budget."""
    canon = canonicalize(imported, input_shapes=input_shapes)
    model = canon.model
    structured = any(
        v is not None
        for v in (options.structured, options.target_latency_ms, options.target_size_bytes)
    )
    analysis = P.analyse(model) if structured else None
    if analysis is not None and not analysis.prunable():
        reasons = sorted({r for f in analysis.frozen() for r in f["reasons"]})
        raise ConfigError(
            "nothing can be pruned structurally: every channel group is tied to "
            + "; ".join(reasons[:6])
        )
    data = _Data(model, options)
    warnings = list(data.warnings)
    report: dict[str, Any] = {"format": "onnx-fp32", "pruned": True}
    pruned = model
    if analysis is not None:
        if options.target_latency_ms is not None or options.target_size_bytes is not None:
            pr, table, _ = _to_target(analysis, data, options)
            report["sensitivity"] = table
        else:
            pr = _structured(analysis, options.structured or 0.0, data, options)
        pruned = pr.model
        report["groups"], report["frozen"] = pr.groups, pr.frozen
        report["recovery"] = (
            "least squares per layer on the calibration samples"
            if options.recover and data.cal
            else None
        )
        if not data.cal and options.recover:
            warnings.append("no --calibration data: pruned without recovery")
    if options.unstructured is not None:
        pruned, per_layer = P.magnitude_prune(
            pruned,
            options.unstructured,
            per_layer=options.per_layer,
            skip_first_last=options.skip_first_last,
        )
        report["unstructured"] = {
            "sparsity": options.unstructured, "per_layer": options.per_layer, "layers": per_layer,
        }  # fmt: skip
        warnings.append(UNSTRUCTURED_WARNING)
    fid, acc = data.score(pruned, threads=options.threads)
    drop = None if acc is None or data.acc_ref is None else data.acc_ref - acc
    if (
        options.max_accuracy_drop is not None
        and drop is not None
        and drop > options.max_accuracy_drop + 1e-9
    ):
        raise AccuracyBudgetError(
            f"the pruned model loses {drop:.2f} accuracy points > budget "
            f"{options.max_accuracy_drop}; nothing was written"
        )
    if options.min_cosine is not None and (fid.get("cosine") or 0) < options.min_cosine:
        raise AccuracyBudgetError(
            f"the pruned model's cosine {fid.get('cosine'):.4f} < --min-cosine "
            f"{options.min_cosine}; nothing was written"
        )
    one = {k: v[:1] for k, v in data.feeds[0].items()}
    lat = measure_latency(
        {
            "original": data.sess_ref,
            "pruned": make_session(pruned.SerializeToString(), threads=options.threads),
        },
        one,
        seconds=options.latency_seconds,
    )
    before, after = model.SerializeToString(), pruned.SerializeToString()
    gz_b, gz_a = P.compressed_size(before), P.compressed_size(after)
    p_b, p_a = P.param_count(model), P.param_count(pruned)
    report.update(
        {
            "validation": {"samples": len(data.val), "source": data.source},
            "latency_ms": {
                "original": round(lat["original"].median_ms, 4),
                "pruned": round(lat["pruned"].median_ms, 4),
                "ratio": round(lat["pruned"].median_ms / lat["original"].median_ms, 4),
                "measured_on": f"this machine, batch 1, {options.threads} threads, median of "
                "interleaved runs",
            },
            "size_bytes": {
                "original": len(before),
                "pruned": len(after),
                "ratio": round(len(after) / len(before), 4),
                "compressed_original": gz_b,
                "compressed_pruned": gz_a,
                "compressed_ratio": round(gz_a / gz_b, 4),
            },
            "params": {"original": p_b, "pruned": p_a, "ratio": round(p_a / max(p_b, 1), 4)},
            "macs": {"original": _macs(model), "pruned": _macs(pruned)},
            "fidelity": fid,
            "accuracy": {"original": data.acc_ref, "pruned": acc, "drop": drop},
            "budget": {
                "max_accuracy_drop": options.max_accuracy_drop,
                "min_cosine": options.min_cosine,
                "met": True,
            },
            "layers": _layers(model, pruned),
            "warnings": warnings,
        }
    )
    return PruneResult(pruned, report)
