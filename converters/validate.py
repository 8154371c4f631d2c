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
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnxruntime as ort

from edge_agent.errors import ModelError, first_line


def make_session(
    model: bytes | str, *, threads: int = 0, providers: Sequence[str] = ("CPUExecutionProvider",)
) -> ort.InferenceSession:
    """A CPU session. Intra-op threads do not spin between runs: several sessions live side by
    side here (original, candidates), and a spinning pool would steal the cores of the next."""
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(model, so, providers=list(providers))
    except Exception as exc:
        raise ModelError(f"onnxruntime cannot load the model: {first_line(exc)}") from exc


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


def run_all(
    session: ort.InferenceSession,
    feeds: Iterable[Mapping[str, np.ndarray]],
    *,
    progress: Progress | None = None,
) -> list[np.ndarray]:
    """Run every feed and concatenate each output along the batch axis."""
    names = [o.name for o in session.get_outputs()]
    chunks: list[list[np.ndarray]] = [[] for _ in names]
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
    return [np.concatenate(c) if c else np.zeros((0,)) for c in chunks]


def is_classifier_output(array: np.ndarray) -> bool:
    """A float [N, C] output with C > 1: logits or probabilities."""
    return array.dtype.kind == "f" and array.ndim == 2 and array.shape[1] > 1


def _cosines(ref: np.ndarray, got: np.ndarray) -> np.ndarray:
    a = ref.reshape(ref.shape[0], -1).astype(np.float64)
    b = got.reshape(got.shape[0], -1).astype(np.float64)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    dot = np.einsum("ij,ij->i", a, b)
    both_zero = (na == 0) & (nb == 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = dot / (na * nb)
    cos = np.where(both_zero, 1.0, np.nan_to_num(cos, nan=0.0))
    return np.clip(cos, -1.0, 1.0)


def compare_outputs(
    ref: Sequence[np.ndarray], got: Sequence[np.ndarray], names: Sequence[str]
) -> dict[str, Any]:
    """Fidelity of ``got`` against ``ref``: the report's ``fidelity`` block."""
    per_output: list[dict[str, Any]] = []
    top1: list[float] = []
    for name, r, g in zip(names, ref, got):
        entry: dict[str, Any] = {"name": name}
        if r.shape != g.shape:
            raise ModelError(f"output '{name}' changed shape: {list(r.shape)} -> {list(g.shape)}")
        if r.dtype.kind in "iub":
            agree = float(np.mean(r.reshape(r.shape[0], -1) == g.reshape(g.shape[0], -1)))
            entry.update(kind="labels", agreement=agree)
            per_output.append(entry)
            continue
        cos = _cosines(r, g)
        diff = g.astype(np.float64) - r.astype(np.float64)
        signal = float(np.mean(r.astype(np.float64) ** 2))
        noise = float(np.mean(diff**2))
        snr = float("inf") if noise == 0 else 10.0 * np.log10(max(signal, 1e-30) / noise)
        entry.update(
            kind="tensor",
            cosine=float(np.mean(cos)),
            cosine_min=float(np.min(cos)),
            max_abs_error=float(np.max(np.abs(diff))) if diff.size else 0.0,
            snr_db=round(snr, 2) if np.isfinite(snr) else None,
        )
        if is_classifier_output(r):
            agreement = float(np.mean(np.argmax(r, axis=1) == np.argmax(g, axis=1)))
            entry["top1_agreement"] = agreement
            top1.append(agreement)
        per_output.append(entry)
    tensors = [e for e in per_output if e["kind"] == "tensor"]
    return {
        "cosine": min((e["cosine"] for e in tensors), default=None),
        "cosine_min": min((e["cosine_min"] for e in tensors), default=None),
        "top1_agreement": min(top1) if top1 else None,
        "max_abs_error": max((e["max_abs_error"] for e in tensors), default=None),
        "snr_db": min((e["snr_db"] for e in tensors if e["snr_db"] is not None), default=None),
        "per_output": per_output,
    }


def class_predictions(outputs: Sequence[np.ndarray]) -> np.ndarray | None:
    """Predicted class per sample: an integer label output, else argmax of a classifier output."""
    for out in outputs:
        if out.dtype.kind in "iu" and out.ndim == 1:
            return out.astype(np.int64)
    for out in outputs:
        if is_classifier_output(out):
            return np.argmax(out, axis=1)
    return None


def accuracy(outputs: Sequence[np.ndarray], labels: np.ndarray) -> float | None:
    """Top-1 accuracy in percent (points), or None when the model is not a classifier."""
    pred = class_predictions(outputs)
    if pred is None:
        return None
    y = np.asarray(labels)
    if y.ndim == 2 and y.shape[1] > 1:  # one-hot
        y = np.argmax(y, axis=1)
    y = y.reshape(-1).astype(np.int64)
    if y.shape[0] != pred.shape[0]:
        raise ModelError(f"{y.shape[0]} labels for {pred.shape[0]} predictions")
    return float(np.mean(pred == y) * 100.0)


@dataclass(frozen=True)
class Latency:
    median_ms: float
    p90_ms: float
    runs: int

    def to_dict(self) -> dict[str, float | int]:
        return {"median": round(self.median_ms, 4), "p90": round(self.p90_ms, 4), "runs": self.runs}


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
        result[key] = Latency(
            median_ms=statistics.median(ordered),
            p90_ms=ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))],
            runs=len(ordered),
        )
    return result
