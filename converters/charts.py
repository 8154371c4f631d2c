"""The PNG charts of the demo report and of ``make bench``, drawn with matplotlib (a desktop
extra: ``demo`` and ``dev``; never a device dependency), headless (the Agg backend)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

STAGES = ("preprocess", "inference", "postprocess", "capture_to_result")
DPI = 100
PANEL_PX = (700, 320)  # one chart panel, width x height in pixels
BAR = "#2f6fb0"
SWAP = "#e0201c"  # the hot swap / a reference line: red enough to find in a test


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> None:
    """Written to a temporary name first, then renamed: never a half-written PNG."""
    plt = _pyplot()
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fig.savefig(tmp, dpi=DPI, format="png")
        tmp.replace(path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)


def histogram_png(values: Mapping[str, Sequence[float]], path: Path) -> None:
    """One latency histogram per stage, stacked, each with its p50 and p99 marked."""
    plt = _pyplot()
    w, h = PANEL_PX
    fig, axes = plt.subplots(len(STAGES), 1, figsize=(w / DPI, len(STAGES) * h / DPI))
    for ax, stage in zip(axes, STAGES):
        v = np.asarray(values.get(stage) or [], np.float64)
        ax.set_title(f"{stage}: latency of {len(v)} results", fontsize=10)
        ax.set_xlabel("ms")
        ax.set_ylabel("results")
        ax.grid(axis="y", alpha=0.3)
        if v.size:
            hi = float(np.percentile(v, 99.5)) or float(v.max()) or 1.0
            ax.hist(np.clip(v, 0, hi), bins=30, range=(0, hi), color=BAR)
            p50, p99 = np.percentile(v, [50, 99])
            for q, name, style in ((p50, "p50", "--"), (p99, "p99", ":")):
                ax.axvline(q, color="black", linestyle=style, linewidth=1, label=f"{name} {q:.3f}")
            ax.legend(loc="upper right", fontsize=8, title=f"max {v.max():.3f}")
        else:
            ax.text(0.5, 0.5, "no results", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    _save(fig, path)


def fps_png(times: Sequence[float], swap_at: float | None, path: Path, label: str) -> None:
    """Results per second over whole seconds, the swap as a red vertical line."""
    plt = _pyplot()
    w, h = PANEL_PX
    fig, ax = plt.subplots(figsize=(w / DPI, h / DPI))
    ax.set_title("results per second over time", fontsize=10)
    ax.set_xlabel("seconds since the first result")
    ax.set_ylabel("results / s (fps)")
    ax.grid(alpha=0.3)
    t = np.asarray(sorted(times), np.float64)
    if t.size > 1:
        rel = t - t[0]
        bins = np.arange(
            0, np.floor(rel[-1]) + 1
        )  # whole seconds: the last partial one is left out
        if bins.size < 2:
            bins = np.array([0.0, max(float(rel[-1]), 1e-3)])
        counts, _ = np.histogram(rel, bins=bins)
        ax.plot(bins[:-1] + 0.5 * np.diff(bins), counts, color=BAR, marker="o", markersize=3)
        ax.set_ylim(0, max(float(counts.max()) * 1.15, 1.0))
        ax.set_xlim(0, max(float(bins[-1]), 1.0))
        if swap_at is not None:
            ax.axvline(swap_at - t[0], color=SWAP, linewidth=2, label=label)
            ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def bars_png(
    title: str,
    rows: Sequence[tuple[str, float | None]],
    path: Path,
    *,
    unit: str = "",
    ref: float | None = None,
    ref_label: str = "",
) -> None:
    """Horizontal bars, one per (label, value; None is drawn as n/a), with an optional reference
    line (a target). 900 px wide, 22 px a bar plus 76 px of title and axis."""
    plt = _pyplot()
    height_px = 40 + 22 * max(len(rows), 1) + 36
    fig, ax = plt.subplots(figsize=(900 / DPI, height_px / DPI))
    labels = [label[:56] for label, _ in rows]
    values = [v if v is not None and np.isfinite(v) else 0.0 for _, v in rows]
    y = np.arange(len(rows))
    ax.barh(y, values, color=BAR, height=0.7)
    ax.set_yticks(y, labels, fontsize=7)
    ax.invert_yaxis()
    ax.tick_params(axis="x", labelsize=7)
    ax.set_title(title, fontsize=8)
    known = [v for _, v in rows if v is not None and np.isfinite(v)]
    hi = max([*known, ref or 0.0, 1e-9]) * 1.25
    ax.set_xlim(0, hi)
    for i, (_, v) in enumerate(rows):
        text = "n/a" if v is None or not np.isfinite(v) else f"{v:.3g}{unit}"
        ax.text(values[i] + hi * 0.01, i, text, va="center", fontsize=7)
    if ref is not None:
        ax.axvline(ref, color=SWAP, linewidth=1.5, label=ref_label or f"{ref:g}")
        ax.legend(loc="lower right", fontsize=7)
    fig.subplots_adjust(left=0.36, right=0.97, top=1 - 28 / height_px, bottom=22 / height_px)
    _save(fig, path)


__all__ = ["STAGES", "bars_png", "fps_png", "histogram_png"]
