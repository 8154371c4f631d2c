"""Agent benchmark (``make bench``): the agent's pipelined loop vs the raw runtime invoke loop vs
a naive sequential loop (read -> preprocess -> invoke -> postprocess), same model, same runtime,
same thread count, same 640x480 mp4v video, side by side in one run; repeated in alternation,
fps as medians, ratios as the median of the per-round ratios. Also: per-frame overhead, capture-to-result on a live-paced source, RSS with a
~5 MB model, and process start to first result.

Writes ``benchmarks/results/agent.json`` and ``agent.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from converters import zoo
from edge_agent.bench import raw_fps
from edge_agent.config import AgentConfig, with_overrides
from edge_agent.io import open_source
from edge_agent.io.sinks import CallbackSink
from edge_agent.model.loader import load_model
from edge_agent.model.profiles import detect_host_profile
from edge_agent.pipeline import Pipeline
from edge_agent.tune import open_tuned_model

RESULTS = Path(__file__).resolve().parent / "results"
NAMES = ("heavy-256", "small-128", "tflite-heavy-256", "tflite-small-128")
#: Each loop of a round runs this long (frames from the model's raw rate), on a video this long.
RUN_SECONDS = 2.0
VIDEO_FRAMES = 3000


def write_video(path: Path, *, frames: int, fps: float = 30.0) -> None:
    """640x480 mp4v: moving shapes over a gradient (compresses like a real scene)."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (640, 480))
    base = np.tile(np.linspace(0, 255, 640, dtype=np.uint8), (480, 1))
    rng = np.random.default_rng(0)
    for i in range(frames):
        img = cv2.cvtColor(base, cv2.COLOR_GRAY2BGR)
        for k in range(6):
            x, y = (37 * i + 91 * k) % 600, (23 * i + 57 * k) % 440
            cv2.circle(img, (x, y), 30, tuple(int(c) for c in rng.integers(0, 255, 3)), -1)
        writer.write(img)
    writer.release()


def _models(tmp: Path) -> dict[str, Path]:
    specs = {
        # inference dominates: ~10+ ms at 256 px on this CPU
        "heavy-256": (zoo.resnet_style(width=32), 256),
        # a small model: ~1 ms
        "small-128": (zoo.resnet_style(width=8), 128),
        # ~5 MB of weights, for the RSS check
        "5mb-224": (zoo.resnet_style(width=40), 224),
    }
    out = {}
    for name, (net, px) in specs.items():
        path = tmp / f"{name}.onnx"
        path.write_bytes(zoo.export_onnx(net, (1, 3, px, px), dynamic_batch=False))
        out[name] = path
    # TFLite with fp16 weights behind DEQUANTIZE, as MediaPipe ships them, with the real models'
    # op mix (converters/standins.py, trained briefly on generated faces and hands): BlazeFace
    # (face_detection_short_range: 128x128) and a MobileNetV2/PReLU landmark model at 256x256
    # (hand / pose landmark style). Sized to the real files' times (issue 13: ~0.75 ms and ~9 ms
    # with 2 threads): BlazeFace with twice its real channels, because at the real counts this
    # stand-in invokes in ~0.37 ms on the 2-core EPYC (0.70 ms at twice; the real file 0.75).
    from converters import standins

    builds: dict[str, Any] = {
        "tflite-small-128": lambda: standins.blazeface_style(width=2.0),
        "tflite-heavy-256": standins.landmark_style,
    }
    for name, build in builds.items():
        stand_in = build()
        path = tmp / f"{name}.tflite"
        path.write_bytes(standins.tflite_fp16(stand_in.onnx))
        out[name] = path
    return out


def _target(name: str, value: Any, op: str, limit: float) -> dict[str, Any]:
    """One row of the targets table: ``value`` against ``limit`` by ``op`` (">=" or "<=")."""
    met = value >= limit if op == ">=" else value <= limit
    return {"target": name, "value": value, "limit": f"{op} {limit}", "met": met}


def naive_fps(model: Any, video: Path, frames: int) -> float:
    t0 = time.perf_counter()  # opening the file counts, as it does in the agent's run
    cap = cv2.VideoCapture(str(video))
    n = 0
    while n < frames:
        ok, img = cap.read()
        if not ok:
            break
        feed, geom = model.prepare_image(img)
        model.postprocessor(model.runtime.infer(feed), geometry=geom)
        n += 1
    cap.release()
    return n / (time.perf_counter() - t0)


def stage_costs(model_path: Path, video: Path, frames: int, cores: int) -> dict[str, Any]:
    """CPU ms a frame of each stage, each run alone with one runtime thread (process CPU time:
    FFmpeg's decoding threads count): decode, preprocess, invoke, postprocess. Their sum is
    what a frame costs the cores at best, so ``cores / sum`` is the packing limit: the rate of
    a pipeline that kept every core busy with nothing but this work. It moves with the CPU (on
    a CPU where the runtime's second thread doubles the invoke rate, little is left to gain
    over a sequential loop)."""
    profile = detect_host_profile()
    model = load_model(model_path, profile=profile, state_dir=Path(tempfile.mkdtemp()), threads=1)
    cap = cv2.VideoCapture(str(video))
    for _ in range(10):  # the decoder's start is not its rate
        cap.read()
    clock, invoke = time.process_time, model.runtime.infer
    spent = [0.0, 0.0, 0.0, 0.0]  # one frame at a time, as the pipeline reuses its memory
    n = 0
    for _ in range(frames):
        t0 = clock()
        ok, img = cap.read()
        if not ok:
            break
        t1 = clock()
        feed, geom = model.prepare_image(img)
        t2 = clock()
        out = invoke(feed)
        t3 = clock()
        model.postprocessor(out, geometry=geom)
        t4 = clock()
        for i, dt in enumerate((t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            spent[i] += dt
        n += 1
    decode, prepare, infer, post = (x / max(1, n) for x in spent)
    cap.release()
    model.close()
    total = decode + prepare + infer + post
    return {
        "decode_ms": round(decode * 1000, 3),
        "preprocess_ms": round(prepare * 1000, 3),
        "invoke_1_thread_ms": round(infer * 1000, 3),
        "postprocess_ms": round(post * 1000, 3),
        "limit_fps": round(cores / total, 2),
    }


def agent_run(model: Any, uri: str, frames: int, **source_kw: Any) -> dict[str, Any]:
    pipe = Pipeline(
        source=open_source(uri, **source_kw),
        model=model,
        sinks=[CallbackSink(lambda r: None)],
        max_frames=frames,
        workers=model.workers,
    )
    return pipe.run()


def raw_parallel_fps(model: Any, feed: Any, frames: int) -> float:
    """The raw invoke rate of the agent's own plan: ``model.workers`` threads invoking at once."""
    import threading

    def loop() -> None:
        for _ in range(frames // model.workers):
            model.runtime.infer(feed)

    threads = [threading.Thread(target=loop) for _ in range(model.workers)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return (frames // model.workers) * model.workers / (time.perf_counter() - t0)


def compare(
    model_path: Path, video: Path, *, frames: int, rounds: int, threads: int
) -> dict[str, Any]:
    profile = detect_host_profile()
    # The raw and naive loops: one call at a time with every thread, as hand-written loops run.
    model = load_model(
        model_path, profile=profile, state_dir=Path(tempfile.mkdtemp()), threads=threads
    )
    # The agent: the plan it measures for this model on this source (what `edge-agent tune`
    # caches and `edge-agent run` then uses: edge_agent.tune.open_tuned_model), 3 s of tuning.
    state = Path(tempfile.mkdtemp())
    config = with_overrides(
        AgentConfig(),
        agent={"state_dir": str(state)},
        model={"path": str(model_path)},
        source={"uri": f"file:{video}"},
    )
    agent_model, chosen = open_tuned_model(
        config, profile, source=open_source(f"file:{video}"), state_dir=state, tune=True
    )
    cap = cv2.VideoCapture(str(video))
    ok, img = cap.read()
    cap.release()
    assert ok
    feed = model.prepare_image(img)[0]
    # Each loop runs for about RUN_SECONDS (at least ``frames``, at most the video): 200 frames
    # of a ~1 ms model last 0.2 s, which times the start of a pipeline, not its rate.
    frames = max(frames, min(VIDEO_FRAMES, int(RUN_SECONDS * raw_fps(model, feed, 50))))
    raws, naives, agents, overheads, plans = [], [], [], [], []
    for _ in range(rounds):  # alternate, so drift on a shared machine hits all alike
        raws.append(raw_fps(model, feed, frames))
        naives.append(naive_fps(model, video, frames))
        summary = agent_run(agent_model, f"file:{video}", frames)
        agents.append(summary["fps"])
        overheads.append(summary["latency_ms"]["overhead"]["p50"])
        plans.append(raw_parallel_fps(agent_model, feed, frames))
    model.close()
    agent_model.close()
    raw, naive, agent, plan = (statistics.median(v) for v in (raws, naives, agents, plans))
    costs = stage_costs(model_path, video, min(frames, 300), min(profile.cores, threads))

    def paired(num: list[float], den: list[float]) -> float:
        """The median of the per-round ratios: each round's loops ran back to back, so a slow
        spell of this shared machine hits both sides of a ratio alike."""
        return round(statistics.median(a / b for a, b in zip(num, den, strict=True)), 3)

    return {
        "threads": threads,
        "frames": frames,
        "workers": agent_model.workers,
        "agent_threads": chosen.threads,
        "plan": chosen.describe(),
        "raw_plan_fps": round(plan, 2),
        "agent_vs_raw_plan": paired(agents, plans),
        "raw_fps": round(raw, 2),
        "naive_fps": round(naive, 2),
        "agent_fps": round(agent, 2),
        "agent_vs_raw": paired(agents, raws),
        "agent_vs_naive": paired(agents, naives),
        "naive_vs_raw": paired(naives, raws),
        "raw_ms": round(1000 / raw, 3),
        "overhead_p50_ms": statistics.median(overheads),
        "rounds": rounds,
        "stages": costs,
        "limit_vs_naive": round(costs["limit_fps"] / naive, 3),
        "limit_vs_raw": round(costs["limit_fps"] / raw, 3),
        "agent_vs_limit": round(agent / costs["limit_fps"], 3),
    }


def live_latency(model_path: Path, video: Path, *, frames: int) -> dict[str, Any]:
    profile = detect_host_profile()
    model = load_model(model_path, profile=profile, state_dir=Path(tempfile.mkdtemp()))
    summary = agent_run(model, f"file:{video}", frames, pace="native")
    model.close()
    c2r = summary["latency_ms"]["capture_to_result"]
    return {
        "fps": summary["fps"],
        "p50_ms": c2r["p50"],
        "p99_ms": c2r["p99"],
        "p99_over_p50": round(c2r["p99"] / c2r["p50"], 3),
    }


def process_run(model_path: Path, video: Path, *, frames: int, tmp: Path) -> dict[str, Any]:
    """`edge-agent run` as a process: time to its first result line, and its peak RSS."""
    import psutil

    exe = Path(sys.executable).parent / "edge-agent"
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [str(exe), "run", "--model", str(model_path), "--source", f"file:{video}",
         "--max-frames", str(frames), "--results", "stdout", "--state-dir", str(tmp)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    first = proc.stdout.readline()
    first_s = time.monotonic() - t0
    ps = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        try:
            peak = max(peak, ps.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        proc.stdout.readline()
    assert first.startswith("{"), first
    return {
        "first_result_s": round(first_s, 3),
        "peak_rss_mb": round(peak / 2**20, 1),
        "model_mb": round(model_path.stat().st_size / 2**20, 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--frames", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    profile = detect_host_profile()
    with tempfile.TemporaryDirectory(prefix="edge-agent-bench-") as tmp_name:
        tmp = Path(tmp_name)
        video = tmp / "scene.mp4"
        write_video(video, frames=max(args.frames, VIDEO_FRAMES))
        models = _models(tmp)
        result: dict[str, Any] = {
            "benchmark": "agent",
            "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": {"cores": profile.cores, "features": list(profile.cpu_features)},
        }
        for name in NAMES:
            result[name] = compare(
                models[name], video, frames=args.frames, rounds=args.rounds, threads=profile.cores
            )
            print(name, json.dumps(result[name]), flush=True)
        # three 5 s runs, the median one: the p99 of 150 results is their second slowest, so
        # one preempted frame of a run on a shared machine moved it from 1.2 to 3.3
        runs = [
            live_latency(models["small-128"], video, frames=min(args.frames, 150)) for _ in range(3)
        ]
        runs.sort(key=lambda r: r["p99_over_p50"])
        result["live_paced"] = {**runs[1], "runs_p99_over_p50": [r["p99_over_p50"] for r in runs]}
        print("live", json.dumps(result["live_paced"]), flush=True)
        # the first start measures the plan while serving (and caches it); a device then runs
        # with it from every later start, which is what its memory is sized for
        first = process_run(models["5mb-224"], video, frames=300, tmp=tmp)
        result["process"] = {**process_run(models["5mb-224"], video, frames=100, tmp=tmp),
                             "first_start": first}  # fmt: skip
        print("process", json.dumps(result["process"]), flush=True)
    h, s = result["heavy-256"], result["small-128"]
    th, ts = result["tflite-heavy-256"], result["tflite-small-128"]
    result["targets"] = [
        _target(
            "~1 ms TFLite model (BlazeFace-style): agent / naive loop",
            ts["agent_vs_naive"],
            ">=",
            1.1,
        ),
        _target(
            "~9 ms TFLite model (landmark-style): agent / raw invoke (all threads)",
            th["agent_vs_raw"],
            ">=",
            1.0,
        ),
        _target(
            "~10 ms ONNX model: agent / raw invoke (all threads)", h["agent_vs_raw"], ">=", 1.0
        ),
        _target("heavy model: agent / raw invoke", h["agent_vs_raw"], ">=", 0.95),
        _target("small model: agent / naive loop", s["agent_vs_naive"], ">=", 1.0),
        _target(
            "per-frame overhead p50 (ms)",
            max(h["overhead_p50_ms"], s["overhead_p50_ms"]),
            "<=",
            0.3,
        ),
        _target(
            "live-paced capture-to-result p99 / p50 (median of 3 runs)",
            result["live_paced"]["p99_over_p50"],
            "<=",
            3,
        ),
        _target(
            "RSS with a ~5 MB model (MB), plan cached", result["process"]["peak_rss_mb"], "<=", 150
        ),
        _target(
            "process start to first result (s), first start (tuning while serving)",
            result["process"]["first_start"]["first_result_s"],
            "<=",
            2,
        ),
        _target(
            "process start to first result (s), plan cached",
            result["process"]["first_result_s"],
            "<=",
            2,
        ),
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "agent.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"Agent benchmark, {result['when']}, {profile.cores} cores ({', '.join(profile.cpu_features)}), 640x480 mp4v video, batch 1, {args.rounds} alternating rounds, each loop about {RUN_SECONDS:g} s (at least {args.frames} frames): fps are medians, ratios the median of the per-round ratios. `make bench`.",
        "",
        "Models: `heavy-256` and `small-128` are ResNet-style ONNX nets (converters/zoo.py); "
        "`tflite-small-128` is a BlazeFace-style face detector (MediaPipe's short-range front "
        "model: 128x128, BlazeBlocks, 896 anchors; twice its channels, for the real file's time) "
        "and `tflite-heavy-256` a MediaPipe-landmark-"
        "style MobileNetV2/PReLU keypoint model (256x256, 21 keypoints and a presence flag), both "
        "TFLite with fp16 weights (converters/standins.py: blazeface_style, landmark_style).",
        "",
        "| model | raw invoke fps | naive loop fps | agent fps (workers × threads) | agent / raw | agent / naive | naive / raw | raw invoke of the agent's plan | agent / that | overhead p50 ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in NAMES:
        r = result[name]
        lines.append(
            f"| {name} ({r['raw_ms']} ms) | {r['raw_fps']} | {r['naive_fps']} | {r['agent_fps']} ({r['workers']} × {r['agent_threads'] // r['workers']}) | {r['agent_vs_raw']} | {r['agent_vs_naive']} | {r['naive_vs_raw']} | {r['raw_plan_fps']} | {r['agent_vs_raw_plan']} | {r['overhead_p50_ms']} |"
        )
    lines += [
        "",
        "What a frame costs the cores, each stage alone with one runtime thread (CPU ms, FFmpeg's "
        "decoding threads included; `stage_costs`), and the packing limit: cores / their sum, the "
        "rate of a pipeline that kept every core busy with this work and nothing else. It moves "
        "with the CPU: where the runtime's second thread doubles the invoke rate, a sequential "
        "loop already uses both cores while it invokes, and little is left to gain. Where "
        "limit / raw is under 1, no pipeline can reach the raw invoke loop: it must decode and "
        "preprocess each frame besides, and the runtime's own threads already use every core.",
        "",
        "| model | decode | preprocess | invoke (1 thread) | postprocess | packing limit fps | limit / naive | limit / raw | agent / limit |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in NAMES:
        r = result[name]
        c = r["stages"]
        lines.append(
            f"| {name} | {c['decode_ms']} | {c['preprocess_ms']} | {c['invoke_1_thread_ms']} | {c['postprocess_ms']} | {c['limit_fps']} | {r['limit_vs_naive']} | {r['limit_vs_raw']} | {r['agent_vs_limit']} |"
        )
    lines += ["", "| target | value | limit | met |", "|---|---:|---|---|"]
    lines += [
        f"| {t['target']} | {t['value']} | {t['limit']} | {'yes' if t['met'] else 'NO'} |"
        for t in result["targets"]
    ]
    first = result["process"]["first_start"]
    lines += [
        "",
        f"`edge-agent run` with the ~5 MB model: peak RSS {result['process']['peak_rss_mb']} MB "
        f"with its plan cached; {first['peak_rss_mb']} MB at the first start, while the plans "
        "are tried on the running pipeline (two models loaded at once for a moment).",
    ]
    (args.out / "agent.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if all(t["met"] for t in result["targets"]) else 1


if __name__ == "__main__":
    sys.exit(main())
