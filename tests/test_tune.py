"""The measured plan: `edge-agent tune` tries the plans that fit the cores on the real pipeline,
caches the fastest, and `edge-agent run` uses it; flags still override it."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from edge_agent.config import AgentConfig, with_overrides
from edge_agent.io import open_source
from edge_agent.model.loader import load_model
from edge_agent.model.profiles import load_profile
from edge_agent.niceness import thread_niceness
from edge_agent.pipeline import Pipeline, available_cores
from edge_agent.tune import (
    CACHE_FILE,
    Plan,
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
    assert candidates(4, "throughput") == [(1, 1, False), (4, 1, False), (4, 2, False),
                                           (2, 2, False), (3, 1, True)]  # fmt: skip
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
    bad = subprocess.run(  # tune does not offer --threads: it measures them
        [EDGE_AGENT, "tune", *common, "--threads", "1", "--source", "synthetic:"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert bad.returncode == 2 and "--threads" in bad.stderr
    pinned = tmp_path / "pinned.toml"
    pinned.write_text("[model]\nthreads = 1\n")
    bad = subprocess.run(
        [EDGE_AGENT, "tune", *common, "--config", pinned, "--source", "synthetic:"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert bad.returncode == 78 and "[model] threads = 1" in bad.stderr


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


def test_tuning_at_start_serves_from_the_first_frame_and_loses_none(
    small_tflite: Path, tmp_path: Path
) -> None:
    """The online tuner: results flow before it has measured anything, every plan is tried on
    the running pipeline, no frame is lost or reordered through the plan changes, the fastest
    plan ends up serving with its workers, and it is cached for the next start."""
    from edge_agent.io.sinks import CallbackSink
    from edge_agent.model.plan import open_model
    from edge_agent.tune import OnlineTuner, start_online_tuning

    uri = "synthetic:?width=160&height=120&frames=100000&pattern=noise"
    config = _config(small_tflite, uri, tmp_path)
    profile = load_profile("x86-64")
    model, rule = open_tuned_model(config, profile, source=open_source(uri), state_dir=tmp_path)
    assert rule.how == "rule"
    seqs: list[int] = []
    first = threading.Event()

    def sink(result: dict[str, Any]) -> None:
        seqs.append(result["seq"])
        first.set()

    pipe = Pipeline(
        source=open_source(uri), model=model, sinks=[CallbackSink(sink)],
        workers=model.workers, max_workers=2,
    )  # fmt: skip
    runner = threading.Thread(target=pipe.run, daemon=True)
    runner.start()
    chosen: list[Plan] = []
    tuner = start_online_tuning(
        pipe, config, profile, current=rule, state_dir=tmp_path, on_done=chosen.append
    )
    assert isinstance(tuner, OnlineTuner)
    assert first.wait(30) and not chosen  # serving while the tuner has yet to decide
    tuner._thread.join(60)
    assert chosen, "the tuner did not finish"
    (plan,) = chosen
    cores = min(profile.cores, available_cores())
    tried = {(t, w) for t, w, pin in candidates(cores, "throughput") if not pin}
    tried.add((rule.threads, rule.workers))  # the plan serving is measured too (it may win)
    assert plan.how == "tuned" and (plan.threads, plan.workers) in tried and plan.fps
    assert pipe.plan_changes >= len(tried) - 1 and pipe.swaps == 0
    assert pipe.workers == plan.workers and pipe.model.workers == plan.workers
    n = len(seqs)
    wait = threading.Event()
    while len(seqs) < n + 20 and not wait.wait(0.05):
        pass
    pipe.stop()
    runner.join(30)
    assert seqs == list(range(len(seqs)))  # gap-free and in order through every plan change
    (entry,) = load_cache(tmp_path).values()
    assert (entry["threads"], entry["workers"]) == (plan.threads, plan.workers)
    pipe.model.close()
    # the next start finds it cached and does not tune
    again, cached = open_tuned_model(config, profile, source=open_source(uri), state_dir=tmp_path)
    assert cached.how == "cached" and (cached.threads, cached.workers) == (plan.threads,
                                                                          plan.workers)  # fmt: skip
    again.close()
    assert open_model(config, profile, threads=1).workers == 1


def test_the_tuner_gives_way_to_an_update(small_tflite: Path, tmp_path: Path) -> None:
    """A model swapped in by somebody else (an update) ends the tuning: the tuner never swaps
    it out, never closes it, and caches nothing."""
    from edge_agent.model.plan import open_model
    from edge_agent.tune import OnlineTuner

    uri = "synthetic:?width=160&height=120&frames=100000&pattern=noise"
    config = _config(small_tflite, uri, tmp_path)
    profile = load_profile("x86-64")
    model = open_model(config, profile, threads=1)
    update = open_model(config, profile, threads=1)
    pipe = Pipeline(source=open_source(uri), model=model, sinks=[], max_workers=2)
    runner = threading.Thread(target=pipe.run, daemon=True)
    runner.start()
    gate = threading.Event()
    opened: list[Any] = []

    def open_plan(threads: int, workers: int) -> Any:
        gate.wait(30)  # the update lands while the tuner loads its next plan
        opened.append(open_model(config, profile, threads=threads, workers=workers))
        return opened[-1]

    chosen: list[Plan] = []
    tuner = OnlineTuner(
        pipe, open_plan=open_plan, current=Plan(1, 1), mode="throughput", cores=2,
        seconds=0.6, on_done=chosen.append,
    )  # fmt: skip
    tuner.start()
    old = pipe.swap_model(update)  # the updater's swap
    assert old is model
    gate.set()
    tuner._thread.join(60)
    assert not tuner._thread.is_alive() and not chosen and tuner.result is None
    assert pipe.model is update and pipe.swaps == 1 and pipe.plan_changes == 0
    results = pipe.results
    done, deadline = threading.Event(), time.monotonic() + 30
    while pipe.results < results + 5 and time.monotonic() < deadline:
        done.wait(0.05)  # the update still serves: it was not closed under the pipeline
    assert pipe.results >= results + 5
    pipe.stop()
    runner.join(30)
    assert pipe.inference_errors == 0 and not (tmp_path / CACHE_FILE).exists()
    update.close()
    model.close()


def test_edge_agent_run_tunes_while_serving_and_says_so(small_tflite: Path, tmp_path: Path) -> None:
    """`edge-agent run` with nothing cached: the first result does not wait for the tuning; the
    start log says the plan is being measured, then which plan won; plans.json holds it."""
    import signal

    proc = subprocess.Popen(
        [EDGE_AGENT, "run", "--model", str(small_tflite), "--state-dir", str(tmp_path),
         "--profile", "x86-64", "--results", "stdout",
         "--source", "synthetic:?width=160&height=120&frames=1000000"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    try:
        first = json.loads(proc.stdout.readline())
        assert first["seq"] == 0
        log: list[str] = []
        for line in proc.stderr:  # bounded by the test's timeout
            log.append(line)
            if "(tuned, throughput" in line:
                break
        text = "".join(log)
        assert "measuring the others while serving" in text, text
        assert text.index("measuring the others") < text.index("(tuned, throughput")
        # every candidate, and the rule's plan when it is not one of them (the profile says
        # 4 cores: the rule leaves one to the capture thread)
        assert text.count("plan: tried") >= len(
            [c for c in candidates(min(4, available_cores()), "throughput") if not c[2]]
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        # read on through the text wrapper: communicate() would read the pipe beneath it and
        # miss the lines the first readline() buffered
        with proc.stdout, proc.stderr:
            out = proc.stdout.read()
            proc.stderr.read()
        proc.wait(60)
    assert proc.returncode == 0
    seqs = [json.loads(line)["seq"] for line in out.splitlines()]
    assert seqs == list(range(1, len(seqs) + 1))  # none lost through the plan changes
    (entry,) = load_cache(tmp_path).values()
    assert entry["how"] == "cached" and entry["fps"] > 0


def _capture_niceness(source: Any) -> dict[str, int]:
    """Record the capture thread's niceness at each read, from inside that thread, in the dict
    returned (``"last"``)."""
    seen: dict[str, int] = {}
    real_read = source.read

    def read(timeout: float | None = None) -> Any:
        seen["last"] = _own_niceness()
        return real_read(timeout=timeout)

    source.read = read  # type: ignore[method-assign]
    return seen


def _own_niceness() -> int:
    niceness = thread_niceness()
    if niceness is None:
        pytest.skip("no per-thread niceness on this system")
    return niceness


def _base_niceness() -> int:
    """The test thread's niceness; skips the test where it is 19 already (a nicer capture
    thread could not be told apart)."""
    base = _own_niceness()
    if base >= 19:
        pytest.skip(f"the tests run at niceness {base}: a nicer capture thread cannot show")
    return base


@contextlib.contextmanager
def _serving(pipe: Pipeline) -> Iterator[Callable[[int], None]]:
    """``pipe`` running in a thread; yields ``more(n)``, which waits (30 s at most) until ``n``
    more results have left; stops it on the way out."""
    runner = threading.Thread(target=pipe.run, daemon=True)
    runner.start()
    wait = threading.Event()

    def more(n: int) -> None:
        want = pipe.results + n
        deadline = time.monotonic() + 30
        while pipe.results < want and time.monotonic() < deadline:
            wait.wait(0.01)
        assert pipe.results >= want

    try:
        yield more
    finally:
        pipe.stop()
        runner.join(30)


@pytest.mark.parametrize(("threads", "workers", "nicer"), [(2, 1, True), (1, 1, False),
                                                          (2, 2, False)])  # fmt: skip
def test_the_capture_thread_is_nicer_only_when_an_inference_uses_several_threads(
    small_tflite: Path, tmp_path: Path, threads: int, workers: int, nicer: bool
) -> None:
    """Several runtime threads an inference synchronise at every operator: the capture thread
    runs nicer, so a decode cannot stall them. One thread an inference: it keeps its priority
    (nicer, it would starve the workers of frames)."""
    model = load_model(small_tflite, profile=load_profile("x86-64"), threads=threads,
                       workers=workers, state_dir=tmp_path)  # fmt: skip
    source = open_source("synthetic:?width=160&height=120&frames=20")
    seen = _capture_niceness(source)
    base = _base_niceness()
    pipe = Pipeline(source=source, model=model, sinks=[], workers=workers)
    assert pipe.run()["results"] == 20
    model.close()
    assert seen["last"] == (min(19, base + 10) if nicer else base)


def test_a_held_priority_waits_for_the_plan_to_settle(
    small_tflite: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where a lowered priority cannot be raised again (the probe says so: a shell's
    RLIMIT_NICE, tested for real in test_niceness.py), the capture thread keeps its priority
    while the online tuner measures (nicer, it would spoil the next plan's trial); released, it
    follows the plan serving."""
    import edge_agent.pipeline

    monkeypatch.setattr(edge_agent.pipeline, "priority_restorable", lambda: False)
    model = load_model(small_tflite, profile=load_profile("x86-64"), threads=2,
                       state_dir=tmp_path)  # fmt: skip
    source = open_source("synthetic:?width=160&height=120&frames=1000000")
    seen = _capture_niceness(source)
    base = _base_niceness()
    pipe = Pipeline(source=source, model=model, sinks=[], hold_priority=True)
    try:
        with _serving(pipe) as more:
            more(20)
            assert seen["last"] == base  # held
            pipe.release_priority()
            more(20)
            assert seen["last"] == min(19, base + 10)  # two threads an inference: nicer now
    finally:
        model.close()


def test_where_priority_can_go_back_the_tuner_measures_each_plan_at_its_own(
    small_tflite: Path, tmp_path: Path
) -> None:
    """With RLIMIT_NICE (the shipped unit's LimitNICE=+0) or CAP_SYS_NICE, nothing is held
    while the online tuner measures: the capture thread runs nicer under a plan of two threads
    an inference and goes back to its own niceness when a one-thread plan is swapped in, so
    every plan is measured as it serves (as `edge-agent tune` measures them)."""
    from edge_agent.niceness import priority_restorable

    if not priority_restorable():
        pytest.skip("this process may not raise a thread's priority back")
    two = load_model(small_tflite, profile=load_profile("x86-64"), threads=2, state_dir=tmp_path)
    one = load_model(small_tflite, profile=load_profile("x86-64"), threads=1, state_dir=tmp_path)
    source = open_source("synthetic:?width=160&height=120&frames=1000000")
    seen = _capture_niceness(source)
    base = _base_niceness()
    pipe = Pipeline(source=source, model=two, sinks=[], hold_priority=True)
    try:
        with _serving(pipe) as more:
            more(20)
            assert seen["last"] == min(19, base + 10)  # not held: the plan's priority at once
            assert pipe.swap_model(one, expect=two, plan_change=True) is two
            more(20)
            assert seen["last"] == base  # back to its own, for the one-thread plan
    finally:
        two.close()
        one.close()


def test_trials_measure_every_plan_once_then_the_contenders_again_in_reverse() -> None:
    """Half the time on one trial each; the other half on the plans within 10 % of the best,
    in the reverse order; a plan far behind, or one that cannot be measured, is not retried."""
    from edge_agent.tune import run_trials

    rates = {"A": 100.0, "B": 98.0, "C": 50.0, "D": 91.0, "E": None}
    calls: list[tuple[str, float]] = []

    def trial(plan: str, seconds: float) -> float | None:
        calls.append((plan, seconds))
        return rates[plan]

    scores = run_trials(list(rates), 3.0, trial, minimum=0.1)
    assert [p for p, _ in calls] == ["A", "B", "C", "D", "E", "D", "B", "A"]
    assert all(s == pytest.approx(0.3) for _, s in calls[:5])  # 1.5 s over five plans
    assert all(s == pytest.approx(0.5) for _, s in calls[5:])  # 1.5 s over three contenders
    assert scores == {"A": [100.0, 100.0], "B": [98.0, 98.0], "C": [50.0], "D": [91.0, 91.0]}
    # latencies (negative scores): within 10 % of the lowest
    calls.clear()
    rates.update({"A": -10.0, "B": -10.5, "C": -12.0, "D": -10.9, "E": -30.0})
    run_trials(list(rates), 1.0, trial, minimum=0.3)
    assert [p for p, _ in calls] == ["A", "B", "C", "D", "E", "D", "B", "A"]
    assert calls[0][1] == 0.3  # never below the minimum


def test_a_tie_between_throughput_plans_goes_to_more_workers() -> None:
    """Within 3 % of the best, the plan with the most workers wins (then the better score);
    further behind it does not; latency plans (minus ms) keep the best score."""
    from edge_agent.tune import best_plan

    # (threads, workers, pin): 1 x 2 measured 2 % ahead of 2 x 1
    assert best_plan({(2, 1, False): 102.0, (2, 2, False): 100.0}, "throughput") == (2, 2, False)
    assert best_plan({(2, 1, False): 110.0, (2, 2, False): 100.0}, "throughput") == (2, 1, False)
    ties = {(1, 1, True): 100.0, (2, 2, False): 98.0, (2, 2, True): 99.0, (2, 1, False): 101.0}
    assert best_plan(ties, "throughput") == (2, 2, True)
    assert best_plan({(2, 1): -10.0, (2, 2): -10.2}, "live") == (2, 1)


def test_a_rate_counts_whole_results_over_their_own_time() -> None:
    from edge_agent.tune import rate_between

    assert rate_between((10, 5.0), (60, 5.5)) == pytest.approx(100.0)
    assert rate_between((10, 5.0), (12, 5.5)) is None  # too few results to tell
    assert rate_between((10, 5.0), (60, 5.0)) is None


@pytest.mark.parametrize(("workers", "nicer"), [(1, True), (2, False)])
def test_stream_readers_follow_the_same_rule(
    small_tflite: Path, tmp_path: Path, workers: int, nicer: bool
) -> None:
    """Several streams: each reader thread runs nicer only when an inference uses several
    threads (two threads in all: one worker of two, or two workers of one)."""
    from edge_agent.io.streams import Stream

    model = load_model(small_tflite, profile=load_profile("x86-64"), threads=2,
                       workers=workers, state_dir=tmp_path)  # fmt: skip
    seen: list[dict[str, int]] = []
    streams = []
    for i in range(2):
        source = open_source("synthetic:?width=160&height=120&frames=15")
        seen.append(_capture_niceness(source))
        streams.append(Stream(f"s{i}", source))
    base = _base_niceness()
    pipe = Pipeline(streams=streams, model=model, sinks=[], workers=workers)
    assert pipe.run()["results"] == 30
    model.close()
    assert [s["last"] for s in seen] == [min(19, base + 10) if nicer else base] * 2


@pytest.mark.parametrize(
    ("fmt", "threads", "workers", "cores", "extra", "decode_threads"),
    [
        ("tflite", 2, 1, 2, {}, 1),  # 1 x 2 fills 2 cores
        ("tflite", 2, 2, 2, {}, 1),  # 2 x 1
        ("tflite", 1, 1, 2, {}, 0),  # 1 x 1 leaves a core free: FFmpeg's choice
        ("tflite", 1, 1, 2, {"max_workers": 2}, 1),  # the online tuner may try 2 x 1
        ("tflite", 1, 1, 2, {"pin_capture": True}, 1),  # capture on a core of its own
        ("tflite", 2, 2, 4, {}, 0),  # 2 x 1 on 4 cores: two free
        ("tflite", 4, 2, 4, {}, 1),  # 2 x 2, an interpreter a worker: 4 busy
        ("onnx", 4, 2, 4, {}, 0),  # 2 x 2 sharing one session's pool: 3 busy
        ("onnx", 2, 1, 2, {}, 1),
    ],
)
def test_a_video_file_decodes_in_one_thread_when_inference_fills_the_cores(
    small_tflite: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    fmt: str,
    threads: int,
    workers: int,
    cores: int,
    extra: dict[str, Any],
    decode_threads: int,
) -> None:
    """Inference threads on every core: FFmpeg decodes in one thread (its default, one a core,
    only adds handoffs); also with the capture thread pinned apart, and from the start when the
    online tuner may try several workers (the decoder cannot change once open). A plan that
    leaves a core free keeps FFmpeg's choice (0). The cores are the test's (4: patched)."""
    import edge_agent.pipeline

    if available_cores() < 2:
        pytest.skip("one CPU: every plan fills it")
    monkeypatch.setattr(edge_agent.pipeline, "available_cores", lambda: cores)
    model_path = small_tflite if fmt == "tflite" else small_tflite.with_suffix(".onnx")
    import cv2
    import numpy as np

    video = tmp_path / "v.mp4"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), 30.0, (160, 120))
    for i in range(12):
        writer.write(np.full((120, 160, 3), i * 20, np.uint8))
    writer.release()
    model = load_model(model_path, profile=load_profile("x86-64"), threads=threads,
                       workers=workers, state_dir=tmp_path)  # fmt: skip
    assert (model.threads, model.workers) == (threads // workers, workers)
    source = open_source(f"file:{video}")
    pipe = Pipeline(source=source, model=model, sinks=[], workers=workers, **extra)
    assert pipe.run()["results"] == 12
    model.close()
    assert source.decode_threads == decode_threads  # type: ignore[attr-defined]
