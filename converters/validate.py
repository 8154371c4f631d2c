"""Validation: run the original and the converted model on the same samples and compare.

Fidelity per output: mean per-sample cosine similarity (and the worst sample), max absolute
error, SNR in dB; top-1 agreement for classifier outputs. Accuracy with labels. Latency is the
median of repeated batch-1 runs, timed in interleaved blocks so that a noisy neighbour slows
every candidate alike.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from edge_agent.errors import DataError, ModelError, first_line
from edge_agent.model.runtimes import nchw_to_model
from edge_agent.model.runtimes.onnx import open_session


def make_session(
    model: bytes | str, *, threads: int = 0, providers: Sequence[str] = ("CPUExecutionProvider",)
) -> ort.InferenceSession:
    """A CPU session made as the device makes it (:func:`edge_agent.model.runtimes.onnx.
    open_session`, the model's session hints included). Intra-op threads do not spin between
    runs: several sessions live side by side here (original, candidates), and a spinning pool
    would steal the cores of the next."""
    return open_session(model, threads=threads, providers=providers)


class Progress:
    """A one-line progress bar on a terminal; silent otherwise."""

    def __init__(self, label: str, total: int, *, enabled: bool | None = None) -> None:
        self.label, self.total, self.done = label, max(total, 1), 0
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self._last = 0.0

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if self.enabled and (now - self._last > 0.1 or self.done >= self.total):
            self._last = now
            frac = min(self.done / self.total, 1.0)
            bar = "#" * int(frac * 30)
            sys.stderr.write(f"\r{self.label:<14} [{bar:<30}] {self.done}/{self.total}")
            if self.done >= self.total:
                sys.stderr.write("\n")
            sys.stderr.flush()

    def wrap(self, items: Iterable[Any]) -> Iterator[Any]:
        for item in items:
            yield item
            self.update()


#: Outputs as run: for each output, the array of every batch (batches may differ in shape
#: when an output's size depends on the data, e.g. NonZero or NMS inside a detector).
Batches = list[list[np.ndarray]]


def run_all(
    session: ort.InferenceSession,
    feeds: Iterable[Mapping[str, np.ndarray]],
    *,
    progress: Progress | None = None,
) -> Batches:
    """Run every feed; return each output's arrays, one per feed."""
    names = [o.name for o in session.get_outputs()]
    chunks: Batches = [[] for _ in names]
    for feed in feeds:
        try:
            outs = session.run(names, dict(feed))
        except Exception as exc:
            raise ModelError(f"inference failed: {first_line(exc)}") from exc
        for i, out in enumerate(outs):
            out = np.asarray(out)
            chunks[i].append(out if out.ndim else out[None])
        if progress is not None:
            progress.update(int(next(iter(feed.values())).shape[0]))
    return chunks


def concat(batches: Batches) -> list[np.ndarray | None]:
    """Each output concatenated along the batch axis; None where batch shapes disagree."""
    out: list[np.ndarray | None] = []
    for arrays in batches:
        try:
            out.append(np.concatenate(arrays) if arrays else None)
        except ValueError:
            out.append(None)
    return out


def is_classifier_output(array: np.ndarray | None) -> bool:
    """A float [N, C] output with C > 1: logits or probabilities."""
    return array is not None and array.dtype.kind == "f" and array.ndim == 2 and array.shape[1] > 1


#: Outputs with fewer values than this per sample (a regression's [N, 1], a box's 4 numbers)
#: are compared across samples, centred: per-sample cosine is blind there (a 1-value vector's
#: cosine is always +-1, and a constant offset hides any error).
SMALL_OUTPUT = 8


def _cosines(ref: np.ndarray, got: np.ndarray) -> np.ndarray:
    a = ref.reshape(ref.shape[0], -1).astype(np.float64)
    b = got.reshape(got.shape[0], -1).astype(np.float64)
    if a.shape[1] < SMALL_OUTPUT:
        mean = a.mean(axis=0, keepdims=True)
        a, b = (a - mean).reshape(1, -1), (b - mean).reshape(1, -1)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    dot = np.einsum("ij,ij->i", a, b)
    both_zero = (na == 0) & (nb == 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = dot / (na * nb)
    cos = np.where(both_zero, 1.0, np.nan_to_num(cos, nan=0.0))
    return np.clip(cos, -1.0, 1.0)


def compare_outputs(
    ref: Batches, got: Batches, names: Sequence[str], *, state: Collection[str] = ()
) -> dict[str, Any]:
    """Fidelity of ``got`` against ``ref``: the report's ``fidelity`` block.

    Batches whose output shapes differ (data-dependent outputs) count against
    ``shape_agreement`` and are left out of the other measures. The outputs named in ``state``
    (a streaming model's state, fed back into the next window) are listed with
    ``"state": true`` but left out of the summary measures and the budget: what the state
    does shows in the other outputs over the sequence."""
    per_output: list[dict[str, Any]] = []
    top1: list[float] = []
    for name, r_batches, g_batches in zip(names, ref, got):
        entry: dict[str, Any] = {"name": name}
        if name in state:
            entry["state"] = True
        pairs = list(zip(r_batches, g_batches))
        matched = [(r, g) for r, g in pairs if r.shape == g.shape]
        if len(matched) < len(pairs):
            entry["shape_agreement"] = len(matched) / max(len(pairs), 1)
        if not matched:
            entry.update(kind="tensor", cosine=0.0, cosine_min=0.0, max_abs_error=None, snr_db=None)
            per_output.append(entry)
            continue
        try:
            r = np.concatenate([m[0] for m in matched])
            g = np.concatenate([m[1] for m in matched])
        except ValueError:  # shapes vary between batches: compare flattened
            r = np.concatenate([m[0].reshape(1, -1) for m in matched], axis=1)
            g = np.concatenate([m[1].reshape(1, -1) for m in matched], axis=1)
        if r.dtype.kind in "iub":
            agree = float(np.mean(r.reshape(r.shape[0], -1) == g.reshape(g.shape[0], -1)))
            agree *= entry.get("shape_agreement", 1.0)
            entry.update(kind="labels", agreement=agree)
            per_output.append(entry)
            continue
        cos = _cosines(r, g) * entry.get("shape_agreement", 1.0)
        diff = g.astype(np.float64) - r.astype(np.float64)
        signal = float(np.mean(r.astype(np.float64) ** 2))
        noise = float(np.mean(diff**2))
        snr = float("inf") if noise == 0 else 10.0 * np.log10(max(signal, 1e-30) / noise)
        entry.update(
            kind="tensor",
            cosine=float(np.mean(cos)),
            cosine_min=float(np.min(cos)),
            max_abs_error=float(np.max(np.abs(diff))) if diff.size else 0.0,
            snr_db=round(float(snr), 2) if np.isfinite(snr) else None,
        )
        if is_classifier_output(r) and name not in state:
            agreement = float(np.mean(np.argmax(r, axis=1) == np.argmax(g, axis=1)))
            entry["top1_agreement"] = agreement
            top1.append(agreement)
        per_output.append(entry)
    tensors = [e for e in per_output if e["kind"] == "tensor" and not e.get("state")]
    return {
        "cosine": min((e["cosine"] for e in tensors), default=None),
        "cosine_min": min((e["cosine_min"] for e in tensors), default=None),
        "top1_agreement": min(top1) if top1 else None,
        "max_abs_error": max(
            (e["max_abs_error"] for e in tensors if e["max_abs_error"] is not None), default=None
        ),
        "snr_db": min((e["snr_db"] for e in tensors if e["snr_db"] is not None), default=None),
        "per_output": per_output,
    }


def class_predictions(outputs: Sequence[np.ndarray | None]) -> np.ndarray | None:
    """Predicted class per sample: an integer label output, else argmax of the first classifier
    output."""
    for out in outputs:
        if out is not None and out.dtype.kind in "iu" and out.ndim == 1:
            return out.astype(np.int64)
    for out in outputs:
        if out is not None and is_classifier_output(out):
            return np.argmax(out, axis=1)
    return None


def classifier_output_index(outputs: Sequence[np.ndarray | None]) -> int | None:
    """Index of the output ``class_predictions`` uses as the class scores, if any."""
    for i, out in enumerate(outputs):
        if is_classifier_output(out):
            return i
    return None


def accuracy(outputs: Sequence[np.ndarray | None], labels: np.ndarray) -> float | None:
    """Top-1 accuracy in percent (points), or None when the model is not a classifier."""
    pred = class_predictions(outputs)
    if pred is None:
        return None
    y = np.asarray(labels)
    if y.ndim == 2 and y.shape[1] > 1:  # one-hot
        y = np.argmax(y, axis=1)
    if y.dtype.kind not in "iub" and not (y.dtype.kind == "f" and np.all(y == np.round(y))):
        raise DataError(
            f"labels (y) must be class indices or one-hot rows, not {y.dtype} values such as "
            f"{y.reshape(-1)[0]!r}; map class names to indices first"
        )
    y = y.reshape(-1).astype(np.int64)
    if y.shape[0] != pred.shape[0]:
        raise ModelError(f"{y.shape[0]} labels for {pred.shape[0]} predictions")
    return float(np.mean(pred == y) * 100.0)


@dataclass(frozen=True)
class Latency:
    median_ms: float
    p90_ms: float
    runs: int
    #: timing noise: the standard error of the median, over the median, estimated from the
    #: spread of the per-block medians (interquartile range / 1.349 / sqrt(blocks))
    noise: float = 0.0

    def to_dict(self) -> dict[str, float | int]:
        return {
            "median": round(self.median_ms, 4),
            "p90": round(self.p90_ms, 4),
            "runs": self.runs,
            "noise": round(self.noise, 4),
        }


def measure_latency(
    sessions: Mapping[str, ort.InferenceSession],
    feed: Mapping[str, np.ndarray],
    *,
    seconds: float = 2.0,
    min_runs: int = 20,
    max_runs: int = 2000,
    warmup: int = 5,
    block: int = 5,
) -> dict[str, Latency]:
    """Median batch-1 latency of each session on ``feed``, timed in interleaved blocks."""
    if not sessions:
        return {}
    feeds = {k: dict(feed) for k in sessions}
    names = {k: [o.name for o in s.get_outputs()] for k, s in sessions.items()}
    for key, sess in sessions.items():
        for _ in range(warmup):
            sess.run(names[key], feeds[key])
    times: dict[str, list[float]] = {k: [] for k in sessions}
    deadline = time.monotonic() + seconds
    while True:
        for key, sess in sessions.items():
            run, f, out = sess.run, feeds[key], names[key]
            bucket = times[key]
            for _ in range(block):
                t0 = time.perf_counter_ns()
                run(out, f)
                bucket.append((time.perf_counter_ns() - t0) / 1e6)
        count = min(len(v) for v in times.values())
        if count >= max_runs or (count >= min_runs and time.monotonic() > deadline):
            break
    result = {}
    for key, values in times.items():
        ordered = sorted(values)
        blocks = [statistics.median(values[i : i + block]) for i in range(0, len(values), block)]
        q1, _, q3 = np.percentile(blocks, [25, 50, 75]) if len(blocks) > 1 else (0.0, 0.0, 0.0)
        median = statistics.median(ordered)
        result[key] = Latency(
            median_ms=median,
            p90_ms=ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))],
            runs=len(ordered),
            noise=float(q3 - q1) / 1.349 / np.sqrt(len(blocks)) / median if median > 0 else 0.0,
        )
    return result


@dataclass(frozen=True)
class _Arg:
    """What a session says about one input or output (the part of onnxruntime's NodeArg used
    here)."""

    name: str
    shape: list[Any]
    type: str = "tensor(float)"


class LiteRTSession:
    """A .tflite model behind onnxruntime's session interface (``get_inputs``, ``get_outputs``,
    ``run``), so validation, latency timing and golden outputs treat both formats alike.

    Feeds and results keep the ONNX model's names and layout: a 4-D NCHW input the TFLite model
    takes as NHWC is transposed on the way in, and an NHWC output back to NCHW on the way out.
    A batch larger than the model's fixed batch of 1 is run one sample at a time. The model runs
    in the device's own runtime (``edge_agent.model.runtimes.tflite``): the same interpreter
    fallbacks, and int8 inputs and outputs quantized and dequantized as on the device."""

    def __init__(
        self,
        path: str | Path,
        *,
        inputs: Sequence[Mapping[str, Any]],
        outputs: Sequence[Mapping[str, Any]],
        threads: int = 0,
    ) -> None:
        from edge_agent.model.runtimes.tflite import LiteRTRuntime

        self._rt = LiteRTRuntime(Path(path), threads=threads)  # ModelError if it cannot load
        self._in = self._rt.inputs
        self._out = self._rt.outputs
        if len(self._in) != len(inputs) or len(self._out) != len(outputs):
            raise ModelError(
                f"{path}: {len(self._in)} inputs / {len(self._out)} outputs, the ONNX model has "
                f"{len(inputs)} / {len(outputs)}"
            )
        self._inputs = [_Arg(str(s["name"]), list(s["shape"])) for s in inputs]
        self._outputs = [_Arg(str(s["name"]), list(s["shape"])) for s in outputs]

    def get_inputs(self) -> list[_Arg]:
        return list(self._inputs)

    def get_outputs(self) -> list[_Arg]:
        return list(self._outputs)

    @staticmethod
    def _to_onnx(y: np.ndarray, onnx_shape: Sequence[Any]) -> np.ndarray:
        if y.ndim == 4 and len(onnx_shape) == 4:
            c = onnx_shape[1]
            if isinstance(c, int) and y.shape[3] == c and y.shape[1] != c:
                return np.ascontiguousarray(y.transpose(0, 3, 1, 2))
        return y

    def run(self, names: Sequence[str] | None, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        arrays = [np.asarray(feeds[a.name]) for a in self._inputs]
        batch = int(arrays[0].shape[0]) if arrays and arrays[0].ndim else 1
        shapes = [[d or 1 for d in spec.shape] for spec in self._in]  # dynamic dims run as 1
        step = shapes[0][0] if shapes and shapes[0] else 1
        chunks: list[list[np.ndarray]] = [[] for _ in self._out]
        for start in range(0, batch, max(step, 1)):
            # one run takes the feed whole (a state [2, 1, 128] has no batch axis first)
            whole = batch <= step
            tfl_feeds = {
                spec.name: nchw_to_model(
                    x[start : start + step] if x.ndim and not whole else x, shape
                )
                for spec, shape, x in zip(self._in, shapes, arrays)
            }
            for i, (y, arg) in enumerate(zip(self._rt.infer(tfl_feeds), self._outputs)):
                chunks[i].append(self._to_onnx(y, arg.shape))
        outs = [np.concatenate(c) if len(c) > 1 else c[0] for c in chunks]
        if names is None:
            return outs
        index = {a.name: i for i, a in enumerate(self._outputs)}
        return [outs[index[n]] for n in names]
