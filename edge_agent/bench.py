"""``edge-agent bench``: the same model and source measured three ways, side by side in one run:
the raw runtime invoke loop (the ceiling), a naive sequential loop (read -> preprocess -> invoke
-> postprocess, what hand-written loops do), and the agent's pipelined loop."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from edge_agent.common.urls import redact_uri
from edge_agent.errors import ConfigError, SourceError
from edge_agent.io.sinks import CallbackSink


def _source_uri(config: Any, frames: int) -> str:
    return config.source.uri or f"synthetic:?width=640&height=480&frames={frames}&pattern=noise"


def raw_fps(model: Any, feed: Mapping[str, np.ndarray], frames: int) -> float:
    """The ceiling: the runtime invoked back to back on one prepared feed."""
    infer = model.runtime.infer
    t0 = time.perf_counter()
    for _ in range(frames):
        infer(feed)
    return frames / (time.perf_counter() - t0)


def run_bench(config: Any, *, frames: int, profile: Any) -> dict[str, Any]:
    from edge_agent.config import with_overrides
    from edge_agent.io.uri import open_source_from
    from edge_agent.model.plan import open_model, open_planned_model, thread_plan
    from edge_agent.pipeline import Pipeline

    if frames < 1:
        raise ConfigError(f"--frames {frames}: must be >= 1")
    config = with_overrides(config, source={"uri": _source_uri(config, frames)})
    probe = open_source_from(config)
    threads = thread_plan(
        profile, requested=config.model.threads, source_kind=getattr(probe, "kind", "image")
    )
    # The raw and naive loops run the model as a hand-written loop would: one call at a time
    # with every thread. The agent runs its own plan (workers) with the same thread total.
    model = open_model(config, profile, threads=threads)
    agent_model, _ = open_planned_model(config, profile, threads=threads, source=probe)

    # 1. raw invoke loop on one prepared frame
    probe.open()
    first = probe.read(timeout=10.0)
    why = probe.stats.last_error or "it ended before its first frame"
    probe.close()
    if first is None:
        model.close()
        if agent_model is not model:
            agent_model.close()
        label = redact_uri(config.source.uri)
        why = why.removeprefix(f"{label}: ")
        raise SourceError(f"{label}: the source produced no frame: {why}")
    raw = raw_fps(model, model.prepare(first.data)[0], frames)
    infer = model.runtime.infer

    # 2. naive sequential loop
    src = open_source_from(config)
    src.open()
    n = 0
    t0 = time.perf_counter()
    while n < frames:
        frame = src.read(timeout=10.0)
        if frame is None:
            break
        feed, geom = model.prepare(frame.data)
        model.postprocessor(infer(feed), geometry=geom)
        n += 1
    naive_fps = n / (time.perf_counter() - t0)
    src.close()

    # 3. the agent's pipeline
    pipe = Pipeline(
        source=open_source_from(config),
        model=agent_model,
        sinks=[CallbackSink(lambda r: None)],
        max_frames=frames,
        workers=agent_model.workers,
    )
    summary = pipe.run()
    model.close()
    if agent_model is not model:
        agent_model.close()
    agent_fps = summary["fps"]
    return {
        "model": model.identity,
        "format": model.format,
        "threads": threads,
        "workers": agent_model.workers,
        "frames": frames,
        "raw_fps": round(raw, 2),
        "naive_fps": round(naive_fps, 2),
        "agent_fps": round(agent_fps, 2),
        "agent_vs_raw": round(agent_fps / raw, 3),
        "agent_vs_naive": round(agent_fps / naive_fps, 3) if naive_fps else None,
        "latency_ms": summary["latency_ms"],
    }
