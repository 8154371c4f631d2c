"""Telemetry cost (``make bench``): what the agent's own telemetry costs the device.

- ``SystemProbe.sample()`` (CPU %, load, RAM, disk, CPU temperature, throttling flags, RSS), run
  once per telemetry interval: median time per sample, and its share of one core at the default
  1 s interval;
- ``Monitor.observe()`` (per-channel input statistics, class histogram, top-1 confidence), run on
  every ``monitor_every``-th frame (default 10): median time per observed frame on a 224x224 RGB
  input, and its share of one core at 30 fps.

The publishing cost of the telemetry is in ``benchmarks/mqtt.py``. Writes
``benchmarks/results/telemetry.json`` and ``telemetry.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.convert import RESULTS, _cpu_name, targets_markdown
from edge_agent.fleet.telemetry import Monitor, SystemProbe


def _median_ms(fn: Any, n: int) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        fn()
        times.append((time.perf_counter_ns() - t0) / 1e6)
    return float(statistics.median(times))


def bench(interval_s: float = 1.0, fps: float = 30.0, every: int = 10) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        probe = SystemProbe(state_dir=Path(tmp))
        probe.sample()  # the first CPU % reading primes its counters
        probe_ms = _median_ms(probe.sample, 50)
    rng = np.random.default_rng(0)
    feeds = {"input": rng.random((1, 3, 224, 224), dtype=np.float32)}
    logits = rng.standard_normal((1, 1000)).astype(np.float32)
    output = {"kind": "classification", "class": 3, "score": 0.9, "top": [{"index": 3}]}
    stats = {
        "samples": 100,
        "inputs": {"input": {"channel_axis": 1, "mean": [0.5] * 3, "std": [0.29] * 3}},
        "class_histogram": [0.001] * 1000,
    }
    monitor = Monitor(calibration_stats=stats, every=1)
    monitor.observe(feeds, output, [logits])
    observe_ms = _median_ms(lambda: monitor.observe(feeds, output, [logits]), 500)
    snapshot_ms = _median_ms(lambda: monitor.snapshot(reset=False), 50)
    probe_pct = probe_ms / (interval_s * 1000) * 100
    monitor_pct = observe_ms * (fps / every) / 1000 * 100 + snapshot_ms / (interval_s * 1000) * 100
    result: dict[str, Any] = {
        "benchmark": "telemetry",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpu": _cpu_name()},
        "interval_s": interval_s, "fps": fps, "monitor_every": every,
        "probe_ms": round(probe_ms, 4), "probe_cpu_percent": round(probe_pct, 4),
        "observe_ms": round(observe_ms, 4), "snapshot_ms": round(snapshot_ms, 4),
        "monitor_cpu_percent": round(monitor_pct, 4),
        "total_cpu_percent": round(probe_pct + monitor_pct, 4),
    }  # fmt: skip
    total = result["total_cpu_percent"]
    result["targets"] = [
        {"target": "telemetry probe + monitoring: CPU % of one core (1 s interval, 30 fps)",
         "value": total, "limit": "measured (no target)", "met": None},
    ]  # fmt: skip
    return result


def markdown(r: dict[str, Any]) -> str:
    lines = [
        f"Telemetry cost, {r['when']}, {r['machine']['cpu']}. `make bench`.",
        "",
        "| part | median ms per call | calls | CPU % of one core |",
        "|---|---:|---|---:|",
        f"| SystemProbe.sample() | {r['probe_ms']} | every {r['interval_s']:g} s | "
        f"{r['probe_cpu_percent']} |",
        f"| Monitor.observe() (224x224 RGB, 1000 classes) | {r['observe_ms']} | 1 frame in "
        f"{r['monitor_every']} at {r['fps']:g} fps | {r['monitor_cpu_percent']} |",
        f"| Monitor.snapshot() | {r['snapshot_ms']} | every {r['interval_s']:g} s | (in the above) |",
        f"| total | | | **{r['total_cpu_percent']}** |",
    ]
    lines += targets_markdown(r["targets"])
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    result = bench()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "telemetry.json").write_text(json.dumps(result, indent=2) + "\n")
    md = markdown(result)
    (args.out / "telemetry.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
