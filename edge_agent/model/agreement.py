"""Agreement between two models' outputs: the task metrics the converter judges a conversion
by (``converters.task``) and the shadow judges a candidate by (``edge_agent.shadow``), one copy.

- classification: top-1 agreement;
- detection: F1 of the candidate's detections against the reference's, matched at IoU >= 0.5
  within one class (:func:`match_detections`, on the device's decoded detections);
- CTC ``[N, T, C]``: exact agreement of the greedy decodings, and the character error rate
  (:func:`ctc_fidelity`);
- masks ``[N, C, H, W]``: IoU of the thresholded masks, or the mean IoU of the argmax maps
  (:func:`mask_fidelity`);
- binary ``[N, 1]`` / ``[N, 2]``: decision agreement (:func:`decision_fidelity`);
- anything else: the cosine of the raw outputs (:func:`cosine`).

:func:`frame_agreement` picks one of these for a single frame from the device's postprocessed
outputs (and the raw ones where the postprocessing keeps no more than a summary).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from edge_agent.model.postprocess import ctc_keep

#: detections match at this IoU or more, and only within one class
MATCH_IOU = 0.5
MASK_THRESHOLDS = (0.3, 0.5)


def in_unit(a: np.ndarray) -> bool:
    """Every value in [0, 1] (within float rounding), and at least one."""
    return bool(a.size) and float(a.min()) >= -1e-6 and float(a.max()) <= 1.0 + 1e-6


def is_distribution(a: np.ndarray) -> bool:
    """Rows over the last axis are probabilities (softmax) or log-probabilities (judged on the
    first few samples)."""
    if a.size == 0 or a.shape[-1] < 2:
        return False
    a64 = a[:8].astype(np.float64)
    if float(a64.min()) >= -1e-6 and np.allclose(a64.sum(axis=-1), 1.0, atol=1e-3):
        return True
    if float(a64.max()) <= 1e-6:
        top = a64.max(axis=-1, keepdims=True)
        lse = np.log(np.exp(a64 - top).sum(axis=-1)) + top[..., 0]
        return bool(np.allclose(lse, 0.0, atol=1e-3))
    return False


def decisions(scores: np.ndarray, *, threshold: float | None) -> np.ndarray:
    """Yes / no per sample: a [N, 1] score above ``threshold``, or a [N, 2] pair's argmax."""
    s = np.asarray(scores).reshape(np.asarray(scores).shape[0], -1)
    return s.argmax(axis=1) == 1 if threshold is None else s[:, 0] > threshold


def decision_fidelity(
    ref: np.ndarray, got: np.ndarray, *, threshold: float | None
) -> tuple[float, dict[str, Any]]:
    """The share of samples whose decision (:func:`decisions`) the converted model keeps."""
    r, g = decisions(ref, threshold=threshold), decisions(got, threshold=threshold)
    value = float(np.mean(r == g)) if r.size else 1.0
    return value, {
        "samples": int(r.shape[0]),
        "threshold": threshold,
        "yes_original": int(r.sum()),
        "yes_converted": int(g.sum()),
        "decision_agreement": round(value, 6),
    }


def greedy_ctc(probs: np.ndarray, *, blank: int = 0) -> list[tuple[int, ...]]:
    """Best class per step, repeats collapsed, blanks dropped: one sequence per sample."""
    best = np.asarray(probs).argmax(axis=-1)  # [N, T]
    return [tuple(int(c) for c in row[ctc_keep(row, blank)]) for row in best]


def edit_distance(a: Sequence[int], b: Sequence[int]) -> int:
    """Levenshtein distance (insertions, deletions, substitutions)."""
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def ctc_fidelity(
    ref: np.ndarray, got: np.ndarray, *, blank: int = 0
) -> tuple[float, dict[str, Any]]:
    """Exact-sequence agreement of the greedy decodings, and the character error rate of the
    converted sequences against the original's."""
    rs, gs = greedy_ctc(ref, blank=blank), greedy_ctc(got, blank=blank)
    same = sum(r == g for r, g in zip(rs, gs))
    chars = sum(len(r) for r in rs)
    errors = sum(edit_distance(r, g) for r, g in zip(rs, gs))
    agreement = same / len(rs) if rs else 1.0
    cer = errors / chars if chars else float(errors > 0)
    return agreement, {
        "samples": len(rs),
        "blank": blank,
        "sequence_agreement": round(agreement, 6),
        "cer": round(cer, 6),
    }


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = int(np.count_nonzero(a | b))
    return 1.0 if union == 0 else int(np.count_nonzero(a & b)) / union


def mask_fidelity(ref: np.ndarray, got: np.ndarray) -> tuple[float, dict[str, Any]]:
    """IoU of the converted model's masks against the original's, pooled over the samples.

    One channel, or channels holding independent probabilities in [0, 1]: thresholded at 0.3 and
    0.5, the worse IoU counts. Several channels of scores: mean IoU of the argmax class maps over
    the classes present."""
    details: dict[str, Any] = {"samples": int(ref.shape[0])}
    if ref.shape[1] == 1 or (ref.shape[1] > 1 and in_unit(ref) and not is_softmax_axis1(ref)):
        per = {f"iou@{t}": round(_iou(ref > t, got > t), 6) for t in MASK_THRESHOLDS}
        details.update(per)
        return min(per.values()), details
    r, g = ref.argmax(axis=1), got.argmax(axis=1)
    present = np.union1d(np.unique(r), np.unique(g))
    ious = [_iou(r == c, g == c) for c in present]
    details["classes"] = int(present.size)
    details["pixel_agreement"] = round(float(np.mean(r == g)), 6)
    value = float(np.mean(ious)) if ious else 1.0
    details["mean_iou"] = round(value, 6)
    return value, details


def is_softmax_axis1(a: np.ndarray) -> bool:
    """Channels (axis 1) sum to one: a softmax over classes."""
    return bool(np.allclose(a.astype(np.float64).sum(axis=1), 1.0, atol=1e-3))


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box in ``a`` [n, 4] with every box in ``b`` [m, 4] (xyxy)."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area_a = np.prod(np.clip(a[:, 2:] - a[:, :2], 0, None), axis=1)
    area_b = np.prod(np.clip(b[:, 2:] - b[:, :2], 0, None), axis=1)
    union = area_a[:, None] + area_b[None, :] - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / union, 0.0)


Detections = list[dict[str, Any]]


def match_detections(
    ref: Sequence[Detections], got: Sequence[Detections], *, iou: float = MATCH_IOU
) -> tuple[float, dict[str, Any]]:
    """F1 of ``got`` against ``ref`` (lists of the device's detection dicts, one per sample):
    each converted detection, best score first, matches the unmatched original detection of the
    same class it overlaps most, if that IoU is at least ``iou``."""
    tp = n_ref = n_got = 0
    score_err: list[float] = []
    ious: list[float] = []
    for r_dets, g_dets in zip(ref, got):
        n_ref += len(r_dets)
        n_got += len(g_dets)
        if not r_dets or not g_dets:
            continue
        rb = np.array([d["box"] for d in r_dets], np.float64)
        gb = np.array([d["box"] for d in g_dets], np.float64)
        overlap = box_iou(gb, rb)
        r_cls = np.array([d["class"] for d in r_dets])
        taken = np.zeros(len(r_dets), bool)
        for gi in np.argsort([-d["score"] for d in g_dets], kind="stable"):
            cand = np.where((r_cls == g_dets[gi]["class"]) & ~taken, overlap[gi], -1.0)
            ri = int(cand.argmax())
            if cand[ri] >= iou:
                taken[ri] = True
                tp += 1
                ious.append(float(cand[ri]))
                score_err.append(abs(float(g_dets[gi]["score"]) - float(r_dets[ri]["score"])))
    f1 = 1.0 if n_ref + n_got == 0 else 2.0 * tp / (n_ref + n_got)
    details = {
        "samples": len(ref),
        "detections_original": n_ref,
        "detections_converted": n_got,
        "matched": tp,
        "precision": round(tp / n_got, 6) if n_got else None,
        "recall": round(tp / n_ref, 6) if n_ref else None,
        "f1": round(f1, 6),
        "mean_score_error": round(float(np.mean(score_err)), 6) if score_err else None,
        "mean_iou": round(float(np.mean(ious)), 6) if ious else None,
        "match_iou": iou,
    }
    return f1, details


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine of two tensors read as flat vectors (1.0 for two zero tensors, 0.0 for one, or for
    tensors of different sizes)."""
    x, y = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    if x.shape != y.shape:
        return 0.0
    denom = float(np.linalg.norm(x) * np.linalg.norm(y))
    if denom == 0.0:
        return 1.0 if not x.any() and not y.any() else 0.0
    return float(np.dot(x, y) / denom)


#: a frame of raw outputs agrees when their cosine is at least this
RAW_AGREE_COSINE = 0.99


@dataclass(frozen=True)
class FrameAgreement:
    """How far a candidate's output for one frame agrees with the reference's: ``value`` in
    [0, 1] (the metric's: 1 or 0 for a class, a sequence or a decision; F1, IoU or cosine
    otherwise), ``agrees`` when the frame counts as the same answer, and the ``metric``."""

    metric: str
    value: float
    agrees: bool


def _is_ctc(out: np.ndarray) -> bool:
    a = np.asarray(out)
    return a.ndim == 3 and a.dtype.kind == "f" and is_distribution(a)


def _raw_agreement(ref: Sequence[np.ndarray], got: Sequence[np.ndarray]) -> FrameAgreement:
    """Raw outputs, by their shape: CTC, a yes/no decision, or the cosine."""
    if len(ref) == 1 and len(got) == 1:
        r, g = np.asarray(ref[0]), np.asarray(got[0])
        if r.shape == g.shape and _is_ctc(r):
            same = greedy_ctc(r) == greedy_ctc(g)
            return FrameAgreement("sequence_agreement", float(same), same)
        if r.shape == g.shape and r.ndim == 2 and r.shape[1] in (1, 2) and r.dtype.kind == "f":
            threshold = 0.5 if r.shape[1] == 1 and in_unit(r) else None
            if r.shape[1] == 1 and threshold is None:
                threshold = 0.0  # a logit
            value, _ = decision_fidelity(r, g, threshold=threshold)
            return FrameAgreement("decision_agreement", value, value == 1.0)
    if len(ref) != len(got):
        return FrameAgreement("cosine", 0.0, False)
    value = min((cosine(r, g) for r, g in zip(ref, got)), default=1.0)
    return FrameAgreement("cosine", max(0.0, value), value >= RAW_AGREE_COSINE)


def frame_agreement(
    ref: Mapping[str, Any],
    got: Mapping[str, Any],
    *,
    ref_raw: Sequence[np.ndarray],
    got_raw: Sequence[np.ndarray],
) -> FrameAgreement:
    """One frame: the candidate's postprocessed output ``got`` (and its raw outputs) against
    the reference's ``ref``, with the task metric of the reference's kind. Two outputs of
    different kinds disagree."""
    kind = ref.get("kind")
    if kind != got.get("kind"):
        return FrameAgreement("kind", 0.0, False)
    if kind == "classification":
        same = ref.get("class") == got.get("class")
        return FrameAgreement("top1_agreement", float(same), same)
    if kind == "detection":
        f1, _ = match_detections([list(ref.get("detections") or [])],
                                 [list(got.get("detections") or [])])  # fmt: skip
        return FrameAgreement("f1", f1, f1 >= MATCH_IOU)
    if kind == "text":  # an error result (no text) agrees with nothing
        same = ref.get("text") is not None and ref.get("text") == got.get("text")
        return FrameAgreement("sequence_agreement", float(same), same)
    if kind == "segmentation" and len(ref_raw) == 1 and len(got_raw) == 1:
        r, g = np.asarray(ref_raw[0]), np.asarray(got_raw[0])
        if r.shape == g.shape and r.ndim == 4:
            iou, _ = mask_fidelity(r, g)
            return FrameAgreement("iou", iou, iou >= 0.5)
    return _raw_agreement(ref_raw, got_raw)
