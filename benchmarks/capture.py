"""Capture cost (``make bench``): what ``[capture]`` at 1 sample/s costs the device.

A live 640x480 source at 30 fps (noise: the worst case for JPEG, about 400 KB a frame) through the agent's loop (``Pipeline``) and a small ResNet-style
ONNX classifier, with the MQTT link and its spool connected to a Mosquitto this benchmark starts
on loopback (``tests.broker.Broker``), in both runs. The capture run adds the ``Sampler``
(``random_every = 30``: one frame in 30, so 1 sample/s; the policy check on every frame), JPEG
encoding at quality 90, the bounded store (atomic, fsynced writes) and delivery of every sample
over MQTT (32 KiB retained chunks at the lowest priority). The cost is the process's CPU time
(``time.process_time``: every thread) with capture minus without, over runs of the same length,
alternated (without, with, without, with, …) and compared pairwise; the median pair is the
result, in percent of one core. The broker's own CPU is not counted (it is not on the device).

Writes ``benchmarks/results/capture.json`` and ``capture.md``; exits 1 when the target (≤ 2 %
of a core) is missed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.convert import RESULTS, _cpu_name, save_results, targets_markdown
from converters import zoo
from edge_agent.config import CaptureSection
from edge_agent.fleet.capture import Sampler
from edge_agent.fleet.mqtt import BrokerSettings, MqttLink
from edge_agent.fleet.protocol import Topics
from edge_agent.fleet.samples import SampleOutbox, SampleStore
from edge_agent.fleet.spool import Spool
from edge_agent.io import open_source
from edge_agent.io.sinks import CallbackSink
from edge_agent.model.loader import load_model
from edge_agent.model.profiles import detect_host_profile
from edge_agent.pipeline import Pipeline

LIVE = "synthetic:?width=640&height=480&fps=30&live=1&pattern=noise"
TARGET_PERCENT = 2.0


def _run(
    model: Any, tmp: Path, broker_url: str, seconds: float, *, capture: bool
) -> dict[str, Any]:
    run_dir = Path(tempfile.mkdtemp(dir=tmp))
    topics = Topics("bench-capture")
    spool = Spool(run_dir / "spool.sqlite")
    link = MqttLink(BrokerSettings(url=broker_url), client_id=f"bench-{run_dir.name}", spool=spool)
    sampler = None
    if capture:
        store = SampleStore(run_dir / "samples", max_bytes=256 * 2**20)
        settings = CaptureSection(random_every=30, max_per_minute=0, max_per_hour=0, max_per_day=0)
        sampler = Sampler(settings, store=store, device=topics.device,
                          state_path=run_dir / "capture.json")  # fmt: skip
        link.low_priority = SampleOutbox(store, topics)
        sampler.start()
    link.start()
    link.wait_connected(10)
    pipe = Pipeline(source=open_source(LIVE), model=model, sinks=[CallbackSink(lambda r: None)],
                    sampler=sampler)  # fmt: skip
    runner = threading.Thread(target=pipe.run, daemon=True)
    runner.start()
    time.sleep(2.0)  # warm: the source, the model, the first sample
    c0, t0, r0 = time.process_time(), time.monotonic(), pipe.results
    s0 = sampler.stats.captured if sampler else 0
    d0 = sampler.store.stats.delivered if sampler else 0
    time.sleep(seconds)
    cpu, wall, results = time.process_time() - c0, time.monotonic() - t0, pipe.results - r0
    captured = (sampler.stats.captured - s0) if sampler else 0
    delivered = (sampler.store.stats.delivered - d0) if sampler else 0
    pipe.stop()
    runner.join(30)
    if sampler is not None:
        sampler.stop()
    link.stop()
    spool.close()
    return {
        "capture": capture,
        "seconds": round(wall, 3),
        "cpu_s": round(cpu, 4),
        "cores": round(cpu / wall, 4),
        "fps": round(results / wall, 2),
        "samples_per_s": round(captured / wall, 3),
        "delivered_per_s": round(delivered / wall, 3),
    }


def bench(*, seconds: float = 15.0, pairs: int = 3) -> dict[str, Any]:
    from tests.broker import Broker

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        path = tmp / "resnet.onnx"
        path.write_bytes(zoo.export_onnx(zoo.resnet_style(width=8), (1, 3, 64, 64)))
        model = load_model(path, profile=detect_host_profile(), state_dir=tmp / "state")
        runs = []
        with Broker(tmp / "broker") as broker:
            for _ in range(pairs):
                off = _run(model, tmp, broker.url, seconds, capture=False)
                on = _run(model, tmp, broker.url, seconds, capture=True)
                runs.append((off, on))
        model.close()
    deltas = [(on["cores"] - off["cores"]) * 100 for off, on in runs]
    cost = statistics.median(deltas)
    result: dict[str, Any] = {
        "benchmark": "capture",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpu": _cpu_name()},
        "source": LIVE,
        "seconds_per_run": seconds,
        "runs": [
            {"without": off, "with": on, "delta_percent": round(d, 3)}
            for (off, on), d in zip(runs, deltas)
        ],
        "cost_percent_of_a_core": round(cost, 3),
        "samples_per_s": statistics.median(on["samples_per_s"] for _, on in runs),
    }
    result["targets"] = [
        {"target": "capture at 1 sample/s (live 640x480 noise at 30 fps, JPEG, store, MQTT delivery): "
         "CPU % of one core", "value": round(cost, 3), "limit": f"<= {TARGET_PERCENT}",
         "met": cost <= TARGET_PERCENT},
    ]  # fmt: skip
    return result


def markdown(r: dict[str, Any]) -> str:
    lines = [
        f"Capture cost, {r['when']}, {r['machine']['cpu']}. `make bench` "
        f"(`python -m benchmarks.capture`). Source `{r['source']}`, {r['seconds_per_run']:g} s "
        "per run, runs alternated; process CPU time (all threads).",
        "",
        "| pair | fps without | cores without | fps with | cores with | samples/s | delivered/s "
        "| cost, % of a core |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for i, run in enumerate(r["runs"], 1):
        off, on = run["without"], run["with"]
        lines.append(
            f"| {i} | {off['fps']} | {off['cores']} | {on['fps']} | {on['cores']} | "
            f"{on['samples_per_s']} | {on['delivered_per_s']} | {run['delta_percent']} |"
        )
    lines.append(f"| median | | | | | {r['samples_per_s']} | | **{r['cost_percent_of_a_core']}** |")
    lines += targets_markdown(r["targets"])
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--pairs", type=int, default=3)
    args = parser.parse_args(argv)
    result = bench(seconds=args.seconds, pairs=args.pairs)
    return save_results(args.out, "capture", result, markdown(result))


if __name__ == "__main__":
    sys.exit(main())
