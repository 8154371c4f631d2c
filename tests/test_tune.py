"""The measured plan: `edge-agent tune` tries the plans that fit the cores on the real pipeline,
caches the fastest, and `edge-agent run` uses it; flags still override it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from edge_agent.config import AgentConfig, with_overrides
from edge_agent.io import open_source
from edge_agent.model.loader import load_model
from edge_agent.model.profiles import load_profile
from edge_agent.pipeline import Pipeline
from edge_agent.tune import (
    CACHE_FILE,
    Plan,
    available_cores,
    candidates,
    load_cache,
    open_tuned_model,
    source_mode,
)

EDGE_AGENT = str(Path(sys.executable).parent / "edge-agent")


@pytest.fixture(scope="module")
def small_tflite(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small image model in TFLite with fp16 weights, as mobile SDKs ship them."""
    import onnx

    from converters import zoo
    from converters.tflite import onnx_to_tflite

    root = tmp_path_factory.mktemp("tune")
    onnx_path = root / "small.onnx"
    onnx_path.write_bytes(
        zoo.export_onnx(zoo.resnet_style(width=8), (1, 3, 64, 64), dynamic_batch=False)
    )
    out = onnx_to_tflite(onnx.load(str(onnx_path)), fp16_weights=True)
    path = root / "small.tflite"
    path.write_bytes(out if isinstance(out, bytes) else out[0])
    return path


def test_candidates_fit_the_cores_and_the_kind_of_source() -> None:
    assert candidates(1, "throughput") == [(1, 1, False)]
    assert candidates(2, "throughput") == [(1, 1, False), (2, 1, False), (2, 2, False),
                                           (1, 1, True)]  # fmt: skip
    assert candidates(4, "throughput")[-1] == (3, 1, True)  # capture on a core of its own
    # live: one worker, latency first, and nothing pinned (the trial is the model alone)
    assert candidates(4, "live") == [(1, 1, False), (4, 1, False)]
    assert source_mode(open_source("synthetic:?frames=3"), "none") == "throughput"
    assert source_mode(open_source("synthetic:?frames=3"), "native") == "live"
    assert source_mode(open_source("synthetic:?live=1"), "none") == "live"


def _config(model: Path, uri: str, state: Path, **pipeline: Any) -> Any:
    return with_overrides(
        AgentConfig(),
        agent={"state_dir": str(state)},
        model={"path": str(model)},
        source={"uri": uri},
        pipeline=pipeline,
    )


def test_tuning_measures_caches_and_the_cache_is_used(small_tflite: Path, tmp_path: Path) -> None:
    uri = "synthetic:?width=160&height=120&frames=100000&pattern=noise"
    config = _config(small_tflite, uri, tmp_path)
    profile = load_profile("x86-64")
    model, plan = open_tuned_model(
        config, profile, source=open_source(uri), state_dir=tmp_path, tune=True, seconds=1.5
    )
    assert plan.how == "tuned" and plan.mode == "throughput" and plan.fps and plan.fps > 0
    assert (model.workers, plan.workers) == (plan.workers, model.runtime.instances)
    model.close()
    (entry,) = load_cache(tmp_path).values()
    assert (entry["threads"], entry["workers"], entry["fps"]) == (plan.threads, plan.workers,
                                                                  plan.fps)  # fmt: skip
    again, cached = open_tuned_model(config, profile, source=open_source(uri), state_dir=tmp_path)
    assert cached == Plan(plan.threads, plan.workers, "cached", "throughput", plan.fps, None,
                          plan.pin)  # fmt: skip
    assert again.workers == plan.workers
    again.close()
    # flags win over the cache
    forced = _config(small_tflite, uri, tmp_path, workers=2)
    model, requested = open_tuned_model(
        forced, profile, source=open_source(uri), state_dir=tmp_path
    )
    assert requested.how == "requested" and model.workers == 2 == model.runtime.instances
    model.close()


def test_a_live_source_is_tuned_for_latency(small_tflite: Path, tmp_path: Path) -> None:
    uri = "synthetic:?width=160&height=120&fps=30&live=1"
    model, plan = open_tuned_model(
        _config(small_tflite, uri, tmp_path), load_profile("x86-64"), source=open_source(uri),
        state_dir=tmp_path, tune=True, seconds=0.5,
    )  # fmt: skip
    model.close()
    assert plan.mode == "live" and plan.workers == 1 and plan.latency_ms and plan.latency_ms > 0


def test_a_short_file_is_not_measured(small_tflite: Path, tmp_path: Path) -> None:
    uri = "synthetic:?width=160&height=120&frames=5"  # ends before a trial can count
    model, plan = open_tuned_model(
        _config(small_tflite, uri, tmp_path), load_profile("x86-64"), source=open_source(uri),
        state_dir=tmp_path, tune=True, seconds=0.6,
    )  # fmt: skip
    model.close()
    assert plan.how == "rule" and not (tmp_path / CACHE_FILE).exists()


def test_edge_agent_tune_then_run_uses_the_cached_plan(small_tflite: Path, tmp_path: Path) -> None:
    common = ["--model", str(small_tflite), "--state-dir", str(tmp_path), "--profile", "x86-64"]
    tune = subprocess.run(
        [EDGE_AGENT, "tune", *common, "--seconds", "1.5",
         "--source", "synthetic:?width=160&height=120&frames=100000"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert tune.returncode == 0, tune.stderr
    plan = json.loads(tune.stdout)["plan"]
    assert plan["how"] == "tuned" and (tmp_path / CACHE_FILE).is_file()
    cores = min(load_profile("x86-64").cores, available_cores())
    assert tune.stderr.count("plan: tried") == len(candidates(cores, "throughput"))
    run = subprocess.run(
        [EDGE_AGENT, "run", *common, "--source", "synthetic:?width=160&height=120&frames=100000",
         "--max-frames", "20", "--results", "stdout"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert (
        f"plan: {plan['workers']} worker(s)" in run.stderr and "(cached, throughput" in run.stderr
    )
    assert len(run.stdout.splitlines()) == 20
    bad = subprocess.run(
        [EDGE_AGENT, "tune", *common, "--threads", "1", "--source", "synthetic:"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert bad.returncode == 78 and "leave out --threads" in bad.stderr


@pytest.mark.skipif(
    not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
    reason="needs two CPUs and Linux thread affinity",
)
def test_a_pinned_plan_puts_capture_and_inference_on_different_cores(
    small_tflite: Path, tmp_path: Path
) -> None:
    """The pinned plan as the pipeline runs it: the capture thread's mask is one core, the
    inference thread's the others, and the caller's own mask is restored afterwards."""
    from edge_agent.pipeline import split_cores

    masks: dict[str, set[int]] = {}

    class Spy:
        def write(self, result: dict[str, Any]) -> None:  # runs in the sink thread
            masks.setdefault("sink", os.sched_getaffinity(0))

        def close(self) -> None:
            pass

    model = load_model(small_tflite, profile=load_profile("x86-64"), threads=1, state_dir=tmp_path)
    source = open_source("synthetic:?width=160&height=120&frames=30")
    real_read = source.read

    def read(timeout: float | None = None) -> Any:
        masks.setdefault("capture", os.sched_getaffinity(0))
        return real_read(timeout=timeout)

    source.read = read  # type: ignore[method-assign]
    real_infer = model.runtime.infer

    def infer(feeds: Any) -> Any:
        masks.setdefault("inference", os.sched_getaffinity(0))
        return real_infer(feeds)

    model.runtime.infer = infer  # type: ignore[method-assign]
    before = os.sched_getaffinity(0)
    pipe = Pipeline(source=source, model=model, sinks=[Spy()], pin_capture=True)
    summary = pipe.run()
    model.close()
    split = split_cores()
    assert split is not None and summary["pin_capture"] is True and summary["results"] == 30
    assert masks["capture"] == split[0] and masks["inference"] == split[1]
    assert not masks["capture"] & masks["inference"]
    assert os.sched_getaffinity(0) == before
