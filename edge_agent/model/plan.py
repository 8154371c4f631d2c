"""The plan for running a model on this device: which profile, how many runtime threads, how
many inference workers, and the model loaded for that plan (from a config object: ``[model]``,
``[preprocess]``, ``[pipeline]``, ``[agent]``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edge_agent.common.files import read_text
from edge_agent.model.formats import label_lines


def resolve_profile(name: str) -> Any:
    from edge_agent.model.profiles import detect_device_profile, load_profile

    return detect_device_profile() if name == "auto" else load_profile(name)


def thread_plan(profile: Any, *, requested: int, source_kind: str) -> int:
    """Runtime threads: what was asked for, else all cores on 1-2 core boards (decoding then
    shares them, which measured best here) and all but one core on bigger ones, leaving that
    core to the capture thread's decoding and preprocessing."""
    if requested:
        return requested
    cores = int(profile.cores)
    if source_kind != "image" or cores <= 2:
        return max(1, min(profile.threads, cores))
    return max(1, min(profile.threads, cores - 1))


#: Throughput mode runs at most this many frames at once (memory: one set of activations each).
MAX_WORKERS = 4
#: Throughput mode only pays for a model whose warm inference takes at least this long: decoding
#: and preprocessing a 640x480 frame costs about 0.7 ms of CPU, and with a faster model a second
#: worker starves the capture thread instead (the measurements: docs/agent.md, "Workers").
THROUGHPUT_MIN_MS = 5.0


def worker_plan(*, requested: int, threads: int, source: Any, pace: str) -> int:
    """Inference workers: what was asked for, else one per runtime thread (each inferring its own
    frame with one intra-op thread) when the source is throughput-bound (a video file, images or
    a synthetic source at pace none: nobody waits on a frame's latency), else one worker with
    every thread (live and paced sources: the newest frame as fast as possible)."""
    if requested:
        return requested
    if getattr(source, "live", True) or getattr(source, "kind", "") != "image" or pace != "none":
        return 1  # sensor stdin / tailed files are finite but arrive in real time
    return max(1, min(threads, MAX_WORKERS))


def open_planned_model(config: Any, profile: Any, *, threads: int, source: Any) -> tuple[Any, int]:
    """The model, loaded for the worker plan: configured workers as asked; in auto mode one
    worker, reloaded for throughput mode when the source is throughput-bound and a warm
    inference takes at least ``THROUGHPUT_MIN_MS``. Returns (model, planned workers)."""
    requested = int(config.pipeline.workers)
    workers = worker_plan(
        requested=requested, threads=threads, source=source, pace=config.source.pace
    )
    if requested or workers == 1:
        return open_model(config, profile, threads=threads, workers=workers), workers
    model = open_model(config, profile, threads=threads)
    if model.warm_ms < THROUGHPUT_MIN_MS:
        return model, 1
    model.close()
    return open_model(config, profile, threads=threads, workers=workers), workers


def open_model(config: Any, profile: Any, *, threads: int, workers: int = 1) -> Any:
    from edge_agent.model.keys import load_trusted_keys
    from edge_agent.model.loader import load_model

    model_path = Path(config.model.path)
    keys = None
    if model_path.suffix == ".edgebundle":
        keys = load_trusted_keys([Path(k) for k in config.model.trusted_keys])
    labels = None
    if config.model.labels:
        text = read_text(config.model.labels, what="config: [model] labels")
        labels = label_lines(text)
    return load_model(
        model_path,
        profile=profile,
        state_dir=Path(config.agent.state_dir),
        trusted_keys=keys,
        threads=threads,
        preprocess_overrides=config.preprocess.overrides(),
        labels=labels,
        workers=workers,
        softmax=config.model.softmax,
        postprocess=config.model.postprocess,
    )


#: A batch of frames from several streams is inferred in one call only when that is at least
#: this much cheaper per frame than one frame a call (measured at start).
BATCH_MIN_GAIN = 0.15


def batch_plan(model: Any, *, streams: int, max_batch: int = 4) -> tuple[int, str]:
    """How many frames of different streams to infer in one call, and why: more than one only
    for several streams on a model with a dynamic batch dimension, in a runtime that takes one
    (onnxruntime), without recurrent state, when a batch measured on zero inputs is at least
    :data:`BATCH_MIN_GAIN` cheaper per frame than single frames (medians of 8 interleaved
    calls each)."""
    import statistics
    import time

    import numpy as np

    k = min(streams, max_batch)
    if k < 2:
        return 1, "one stream"
    runtime = model.runtime
    if runtime.name != "onnxruntime":
        return 1, f"{runtime.name} runs one frame a call"
    if getattr(model, "stateful", False):
        return 1, "the model carries state per stream"
    if any(
        not spec.shape or spec.shape[0] is not None for spec in [*runtime.inputs, *runtime.outputs]
    ):
        return 1, "the model's batch dimension is fixed"
    one = model.zero_feeds()
    many = {name: np.concatenate([x] * k) for name, x in one.items()}

    def timed(feeds: dict[str, Any]) -> float:
        t0 = time.perf_counter()
        runtime.infer(feeds)
        return time.perf_counter() - t0

    try:
        timed(many)  # the first call of a new shape allocates: not counted
        singles, batches = [], []
        for _ in range(8):  # interleaved, so a busy moment slows both alike
            singles.append(timed(one))
            batches.append(timed(many) / k)
    except Exception as exc:  # a graph whose dynamic batch does not really work
        return 1, f"a batch of {k} failed: {exc}"
    if any(np.shape(o)[:1] != (k,) for o in runtime.infer(many)):
        return 1, "the model's outputs are not one row per frame"
    single, batched = statistics.median(singles), statistics.median(batches)
    gain = 1.0 - batched / single
    how = f"{k} frames a call cost {batched * 1e3:.3f} ms each vs {single * 1e3:.3f} ms alone"
    return (k, how) if gain >= BATCH_MIN_GAIN else (1, how)


__all__ = [
    "BATCH_MIN_GAIN",
    "MAX_WORKERS",
    "THROUGHPUT_MIN_MS",
    "batch_plan",
    "open_model",
    "open_planned_model",
    "resolve_profile",
    "thread_plan",
    "worker_plan",
]
