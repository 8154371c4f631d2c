"""The demo's report: Markdown with PNG plots drawn with OpenCV (already a device dependency, so
no plotting library is needed): per-stage latency histograms, fps over time with the hot swap
marked, the fp32 / int8 size, latency and accuracy table, and the swap's frame accounting."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

STAGES = ("preprocess", "inference", "postprocess", "capture_to_result")
_W, _H, _M = 560, 260, 44  # panel size and margin
_INK, _BAR, _RED, _GRID = (40, 40, 40), (180, 110, 40), (40, 40, 220), (225, 225, 225)


def _panel(title: str) -> np.ndarray:
    import cv2

    img = np.full((_H, _W, 3), 255, np.uint8)
    cv2.putText(img, title, (_M, 22), cv2.FONT_HERSHEY_SIMPLEX, 0.5, _INK, 1, cv2.LINE_AA)
    cv2.line(img, (_M, _H - _M), (_W - 12, _H - _M), _INK, 1)
    cv2.line(img, (_M, 34), (_M, _H - _M), _INK, 1)
    return img


def _text(img: np.ndarray, s: str, xy: tuple[int, int], scale: float = 0.38) -> None:
    import cv2

    cv2.putText(img, s, xy, cv2.FONT_HERSHEY_SIMPLEX, scale, _INK, 1, cv2.LINE_AA)


def histogram_png(values: Mapping[str, Sequence[float]], path: Path) -> None:
    """One histogram panel per stage, stacked."""
    import cv2

    panels = []
    for stage in STAGES:
        v = np.asarray(values.get(stage) or [], np.float64)
        img = _panel(f"{stage} latency (ms), {len(v)} results")
        if v.size:
            hi = float(np.percentile(v, 99.5)) or float(v.max()) or 1.0
            counts, edges = np.histogram(np.clip(v, 0, hi), bins=30, range=(0, hi))
            top = max(int(counts.max()), 1)
            width = (_W - 12 - _M) / len(counts)
            for i, c in enumerate(counts):
                x0 = int(_M + i * width)
                y0 = int(_H - _M - (c / top) * (_H - _M - 40))
                cv2.rectangle(img, (x0 + 1, y0), (int(x0 + width) - 1, _H - _M), _BAR, -1)
            for frac in (0.0, 0.5, 1.0):
                x = int(_M + frac * (_W - 12 - _M))
                _text(
                    img, f"{edges[0] + frac * (edges[-1] - edges[0]):.2f}", (x - 10, _H - _M + 16)
                )
            p50, p99 = np.percentile(v, [50, 99])
            _text(img, f"p50 {p50:.3f}  p99 {p99:.3f}  (max {v.max():.3f})", (_W - 250, 40))
            _text(img, str(top), (4, 44))
        panels.append(img)
    cv2.imwrite(str(path), np.vstack(panels))


def fps_png(times: Sequence[float], swap_at: float | None, path: Path, label: str) -> None:
    """Results per second over time, the swap as a vertical line."""
    import cv2

    img = _panel("results per second (fps) over time; red: the hot swap")
    t = np.asarray(sorted(times), np.float64)
    if t.size > 1:
        t0 = t[0]
        rel = t - t0
        bins = np.arange(
            0, np.floor(rel[-1]) + 1
        )  # whole seconds: the last partial one is left out
        if bins.size < 2:
            bins = np.array([0.0, max(float(rel[-1]), 1e-3)])
        counts, _ = np.histogram(rel, bins=bins)
        top = max(float(counts.max()) * 1.15, 1.0)
        span = max(float(bins[-1]), 1.0)

        def xy(sec: float, fps: float) -> tuple[int, int]:
            return (
                int(_M + sec / span * (_W - 12 - _M)),
                int(_H - _M - fps / top * (_H - _M - 40)),
            )

        pts = [xy(float(b) + 0.5, float(c)) for b, c in zip(bins[:-1], counts)]
        for a, b in zip(pts, pts[1:]):
            cv2.line(img, a, b, _BAR, 2, cv2.LINE_AA)
        for frac in (0.0, 0.5, 1.0):
            _text(img, f"{frac * span:.0f} s", (xy(frac * span, 0)[0] - 8, _H - _M + 16))
        _text(img, f"{top / 1.15:.0f}", (4, xy(0, top / 1.15)[1] + 4))
        if swap_at is not None:
            x = xy(swap_at - t0, 0)[0]
            cv2.line(img, (x, 34), (x, _H - _M), _RED, 1)
            _text(img, label, (min(x + 4, _W - 150), 50))
    cv2.imwrite(str(path), img)


def swap_accounting(results: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Frames and sequence numbers around the swap: anything lost?"""
    rows = sorted(results, key=lambda r: int(r["seq"]))
    seqs = [int(r["seq"]) for r in rows]
    gaps = [b - a - 1 for a, b in zip(seqs, seqs[1:]) if b - a != 1]
    versions = [(r.get("model") or {}).get("version") for r in rows]
    change = next((i for i in range(1, len(versions)) if versions[i] != versions[i - 1]), None)
    out: dict[str, Any] = {
        "results": len(rows),
        "seq_gaps": len(gaps),
        "versions": sorted({v for v in versions if v}),
        "swapped": change is not None,
    }
    if change is not None:
        ts = [float(r["capture_ts"]) for r in rows]
        gaps_s = np.diff(ts)
        typical = float(np.median(gaps_s)) if gaps_s.size else 0.0
        out["stall_vs_frame_gap"] = (
            round(float(ts[change] - ts[change - 1]) / typical, 2) if typical else None
        )
        frames = [r.get("frame") for r in rows[max(0, change - 3) : change + 3]]
        out["frames_around_swap"] = frames
    return out


def write_report(
    out: Path,
    *,
    live: Any,
    quantize_reports: Mapping[str, Mapping[str, Any]],
    v2_note: str,
) -> Path:
    """report.md + latency-histograms.png + fps.png in ``out``."""
    lat: dict[str, list[float]] = {s: [] for s in STAGES}
    for r in live.results:
        for s in STAGES:
            v = (r.get("latency_ms") or {}).get(s)
            if v is not None:
                lat[s].append(float(v))
    histogram_png(lat, out / "latency-histograms.png")
    seen = {(r.get("model") or {}).get("version") for r in live.results}
    versions = sorted(str(v) for v in seen if v)
    fps_png([float(r["capture_ts"]) for r in live.results], live.swap_ts, out / "fps.png",
            f"swap to {versions[-1] if versions else '?'}")  # fmt: skip
    acct = swap_accounting(live.results)
    lines = [
        "# Demo report",
        "",
        f"Broker: {live.broker}. Device `demo`, a digits video played at its native 30 fps.",
        "",
        "## The model: fp32 against int8",
        "",
        "| model | size KB | latency ms (this machine) | accuracy % |",
        "|---|---:|---:|---:|",
    ]
    first = next(iter(quantize_reports.values()), None)
    if first is not None:
        lines.append(
            f"| original fp32 ONNX | {first['size_bytes']['original'] / 1024:.1f} | "
            f"{first['latency_ms']['original']:.4f} | {first['accuracy']['original']:.2f} |"
        )
    for label, rep in quantize_reports.items():
        lines.append(
            f"| {label} | {rep['size_bytes']['converted'] / 1024:.1f} | "
            f"{rep['latency_ms']['converted']:.4f} | {rep['accuracy']['converted']:.2f} |"
        )
    lines += [
        "",
        "Latency: batch 1, median of interleaved runs, measured by `edge-convert quantize`.",
        "",
        "## The live run",
        "",
        f"- Results received over MQTT: {acct['results']}; sequence gaps: {acct['seq_gaps']}; "
        f"model versions seen: {', '.join(acct['versions'])}.",
        f"- The agent's own count of dropped frames: {live.summary.get('dropped', '?')}; "
        f"inference errors: {live.summary.get('inference_errors', '?')}; swaps: "
        f"{live.summary.get('swaps', '?')}; exit code {live.agent_exit}.",
    ]
    if acct.get("swapped"):
        lines.append(
            f"- Hot swap ({v2_note}): the gap between the last result of the old model and the "
            f"first of the new one was {acct['stall_vs_frame_gap']}x the median frame gap; frame "
            f"numbers around it: {acct['frames_around_swap']}."
        )
    else:
        lines.append("- **No swap happened**: see `agent.log` and the rollout output below.")
    lines += [
        "",
        "![per-stage latency](latency-histograms.png)",
        "",
        "![fps over time](fps.png)",
        "",
        "## edgectl rollout",
        "",
        "```",
        live.rollout_output or "(no output)",
        "```",
        "",
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def bars_png(
    title: str,
    rows: Sequence[tuple[str, float | None]],
    path: Path,
    *,
    unit: str = "",
    ref: float | None = None,
    ref_label: str = "",
) -> None:
    """Horizontal bars, one per (label, value), with an optional reference line (a target)."""
    import cv2

    label_w, bar_h, top = 330, 22, 40
    width = 900
    height = top + bar_h * max(len(rows), 1) + 36
    img = np.full((height, width, 3), 255, np.uint8)
    cv2.putText(img, title, (10, 22), cv2.FONT_HERSHEY_SIMPLEX, 0.5, _INK, 1, cv2.LINE_AA)
    values = [v for _, v in rows if v is not None and np.isfinite(v)]
    hi = max([*values, ref or 0.0, 1e-9]) * 1.12
    x0, x1 = label_w, width - 80

    def x_of(v: float) -> int:
        return int(x0 + (x1 - x0) * v / hi)

    for i, (label, v) in enumerate(rows):
        y = top + i * bar_h
        _text(img, label[:56], (8, y + 15))
        if v is None or not np.isfinite(v):
            _text(img, "n/a", (x0 + 4, y + 15))
            continue
        cv2.rectangle(img, (x0, y + 3), (max(x_of(v), x0 + 1), y + bar_h - 3), _BAR, -1)
        _text(img, f"{v:.3g}{unit}", (x_of(v) + 4, y + 15))
    cv2.line(img, (x0, top - 4), (x0, height - 30), _INK, 1)
    if ref is not None:
        xr = x_of(ref)
        cv2.line(img, (xr, top - 4), (xr, height - 30), _RED, 1)
        _text(img, ref_label or f"{ref:g}", (min(xr + 4, width - 120), height - 14))
    cv2.imwrite(str(path), img)
