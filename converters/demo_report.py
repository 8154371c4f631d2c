"""The demo's report: Markdown with PNG charts (``converters.charts``, matplotlib): per-stage
latency histograms, fps over time with the hot swap
marked, the fp32 / int8 size, latency and accuracy table, and the swap's frame accounting."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from converters.charts import STAGES, fps_png, histogram_png


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
    lines += _shadow_and_samples(live)
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


def _shadow_and_samples(live: Any) -> list[str]:
    """The loop's other half: the candidate's shadow agreement before it served, and the
    low-confidence frames the agent captured for the next training round."""
    done = [e for e in live.events if e.get("kind") == "shadow_completed"]
    lines = ["", "## Shadow, then samples", ""]
    if done:
        d = done[-1].get("details") or {}
        lines.append(
            f"- The candidate ran in shadow on the canary before serving a frame: agreement "
            f"{d.get('agreement')} with the serving model over {d.get('frames')} frames "
            f"(`edgectl rollout --require-shadow 0.95 --frames 60`; the rollout went on only "
            "because it held)."
        )
    else:
        lines.append("- **No shadow completed**: see the rollout output below and `agent.log`.")
    samples = list(live.samples)
    lines.append(
        f"- Samples collected by `edgectl collect` into `samples/` (frames the serving model was "
        f"less than 90 % sure of, `[capture] low_confidence = 0.9`): {len(samples)}."
    )
    if samples:
        lines += ["", "| sample | reasons | model | class | score |", "|---|---|---|---:|---:|"]
        for one in samples[:6]:
            out = one.get("output") or {}
            model = one.get("model") or {}
            lines.append(
                f"| ![](samples/{one['file']}) | {', '.join(one.get('reasons') or [])} | "
                f"{model.get('version', '?')} | {out.get('class', '-')} | "
                f"{float(out.get('score') or 0.0):.2f} |"
            )
    return lines
