"""Capture pinning (``python -m benchmarks.pin``): the pipeline with the capture thread pinned
to a core of its own and the one-thread model on the others, against the same pipeline
unpinned, on the agent benchmark's 640x480 mp4v video and models; runs alternated, medians.
This is the measurement behind keeping pinning a tuned candidate rather than a rule
(docs/agent.md, "The measured plan").
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from benchmarks.agent import _models, write_video
from edge_agent.io import open_source
from edge_agent.model.loader import load_model
from edge_agent.model.profiles import detect_host_profile
from edge_agent.pipeline import Pipeline

NAMES = ("small-128", "tflite-small-128", "heavy-256")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--frames", type=int, default=600)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        video = tmp / "video.mp4"
        write_video(video, frames=args.frames)
        models = _models(tmp)
        profile = detect_host_profile()
        print("| model (1 thread) | unpinned fps | pinned fps | pinned / unpinned |")
        print("|---|---:|---:|---:|")
        for name in NAMES:
            model = load_model(models[name], profile=profile, threads=1, state_dir=tmp)
            fps: dict[bool, list[float]] = {False: [], True: []}
            for _ in range(args.rounds):
                for pin in (False, True):
                    source = open_source(str(video), pace="none")
                    pipe = Pipeline(source=source, model=model, sinks=[], pin_capture=pin)
                    fps[pin].append(pipe.run()["fps"])
            model.close()
            free, pinned = statistics.median(fps[False]), statistics.median(fps[True])
            print(f"| {name} | {free:.1f} | {pinned:.1f} | {pinned / free:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
