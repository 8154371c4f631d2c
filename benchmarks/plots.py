"""PNG plots of the benchmark results (``make bench`` runs this last): one chart per benchmark,
drawn from ``benchmarks/results/*.json`` with matplotlib (``converters.charts``). A missing result
file is skipped. Usage: ``python -m benchmarks.plots [--results DIR]``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from benchmarks.convert import RESULTS
from converters.charts import bars_png


def _load(results: Path, name: str) -> dict[str, Any] | None:
    path = results / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def plot_all(results: Path) -> list[Path]:
    written = []
    conv = _load(results, "convert")
    if conv:
        rows = [
            (f"{r['model']}: {r['variant']}", r["latency_ratio"])
            for r in conv["rows"]
            if "error" not in r and r["variant"] != "original fp32"
        ]
        path = results / "convert.png"
        bars_png(f"converter: latency / original fp32 ({conv['when']})", rows, path,
                 ref=1.0, ref_label="fp32 = 1")  # fmt: skip
        written.append(path)
    agent = _load(results, "agent")
    if agent:
        rows = []
        for model in ("heavy-256", "small-128"):
            r = agent.get(model) or {}
            rows += [(f"{model}: raw invoke", r.get("raw_fps")),
                     (f"{model}: naive loop", r.get("naive_fps")),
                     (f"{model}: agent ({r.get('workers')} workers)", r.get("agent_fps"))]  # fmt: skip
        path = results / "agent.png"
        bars_png(f"agent: frames per second ({agent['when']})", rows, path, unit=" fps")
        written.append(path)
    tfl = _load(results, "tflite")
    if tfl and "rows" in (tfl.get("tensorflow") or {}):
        rows = [(r["variant"], r["latency_ms"]) for r in tfl["tensorflow"]["rows"]]
        path = results / "tflite.png"
        bars_png(f"Keras MobileNetV2 224 in LiteRT: latency ms ({tfl['when']})", rows, path,
                 unit=" ms")  # fmt: skip
        written.append(path)
    pr = _load(results, "prune")
    if pr:
        rows = [(f"{r['model']}: {r['variant']}", r["latency_ratio"]) for r in pr["latency"]]
        path = results / "prune.png"
        bars_png(f"pruning: latency / unpruned ({pr['when']})", rows, path, ref=0.75,
                 ref_label="target 0.75")  # fmt: skip
        written.append(path)
    mq = _load(results, "mqtt")
    if mq:
        pub = mq.get("publish") or {}
        rows = [("agent (spool, fsync, QoS 1)", (pub.get("agent") or {}).get("cpu_percent")),
                ("naive paho publisher", (pub.get("naive") or {}).get("cpu_percent"))]  # fmt: skip
        path = results / "mqtt.png"
        bars_png(f"publishing 200 results/s: CPU % of one core ({mq['when']})", rows, path,
                 unit=" %", ref=5.0, ref_label="target 5 %")  # fmt: skip
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    for path in plot_all(args.results):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
