"""The measured plan: which runtime threads and inference workers serve this model fastest on
this device, measured rather than assumed (a rule tuned on one runtime loses on another: on a
2-core board a ~1 ms TFLite model runs fastest with one thread, a 10 ms one with two workers).

``edge-agent tune`` (or ``[pipeline] tune = true`` at start, when nothing is cached yet) tries
the plans that fit the cores, for a bounded time (``seconds``, 3 by default):

- a **throughput** source (a video file, images or a synthetic source at pace none): intra-op
  threads {1, all} with one worker, and two workers sharing all threads (onnxruntime runs one
  session twice at once; LiteRT gets one interpreter per worker) or, on 4 cores or more, one
  thread each (the other cores left to decoding). Each plan runs the real
  pipeline on a fresh copy of the source; the most results per second wins. One more plan pins
  the capture thread to a core of its own and the one-thread model to the others (on a 2-core
  board: decoding never preempts the invoke, and neither thread's caches are shared).
- a **live** or paced source (a camera, a stream, a sensor): one worker, threads {1, all}; the
  lowest median inference latency wins (the newest frame as fast as possible).

The choice is cached in ``<state_dir>/plans.json``, keyed by the model file's sha256 (with the
profile it fixes the artifact and its runtime), the profile, the kind of source and the cores,
and used by every later start without loading the model twice.
``--threads`` / ``--workers`` (``[model] threads``, ``[pipeline] workers``) still override it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import statistics
import threading
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

from edge_agent.common.durable import atomic_write
from edge_agent.common.hashing import sha256_file
from edge_agent.errors import ConfigError
from edge_agent.io.uri import open_source_from
from edge_agent.model.plan import open_model, open_planned_model, thread_plan
from edge_agent.model.runtimes import model_file
from edge_agent.pipeline import Pipeline, State, available_cores

log = logging.getLogger(__name__)

CACHE_FILE = "plans.json"
TUNE_SECONDS = 3.0
MIN_RESULTS = 20  # fewer in a throughput trial (a short file): the trial does not count
#: A plan this far (a fraction) behind the best after one trial each is not measured again.
CONTENDER = 0.1
#: Throughput plans this close (a fraction) to the best are a tie, which the most workers win.
TIE = 0.03
_Plan = TypeVar("_Plan", bound=tuple[Any, ...])  # (threads, workers, …) of a trial


@dataclass(frozen=True)
class Plan:
    """How the model runs: ``threads`` in all, ``workers`` frames at once, ``pin``: the capture
    thread on a core of its own (``Pipeline(pin_capture=…)``). ``how``: requested
    (flags or config), rule (no measurement yet), cached or tuned; ``fps`` / ``latency_ms``: what
    the measurement saw (throughput / live sources)."""

    threads: int
    workers: int
    how: str = "rule"
    mode: str = "throughput"
    fps: float | None = None
    latency_ms: float | None = None
    pin: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        seen = ""
        if self.fps is not None:
            seen = f", measured {self.fps:.1f} fps"
        elif self.latency_ms is not None:
            seen = f", measured {self.latency_ms:.3f} ms an inference"
        pinned = ", capture pinned apart" if self.pin else ""
        return f"{self.workers} worker(s) x {max(1, self.threads // self.workers)} thread(s)" \
               f"{pinned} ({self.how}, {self.mode}{seen})"  # fmt: skip


def source_mode(source: Any, pace: str) -> str:
    """``throughput`` when nobody waits on a frame's latency (a file, images or synthetic at
    pace none), else ``live``."""
    if getattr(source, "live", True) or getattr(source, "kind", "") != "image" or pace != "none":
        return "live"
    return "throughput"


def candidates(cores: int, mode: str) -> list[tuple[int, int, bool]]:
    """(threads in all, workers, capture pinned apart) worth trying on ``cores`` cores. Pinning
    is measured on throughput sources only (a live source's trial is the model alone)."""
    every = max(1, cores)
    plans = [(1, 1, False), (every, 1, False)]
    if mode == "throughput" and every >= 2:
        plans.append((every, 2, False))
        # two one-thread workers (the same as the above on 2 cores): on 4 or more, the other
        # cores are left to the capture thread and FFmpeg's decoding threads
        if every >= 4:
            plans.append((2, 2, False))
        plans.append((every - 1, 1, True))
    return list(dict.fromkeys(plans))


def cache_key(model_path: Path, profile: Any, mode: str, streams: int = 1) -> str:
    """The model file (a bundle and the profile fix the artifact and its runtime), the profile,
    the kind of source, the CPUs and, with several streams, how many: known before anything is
    loaded (eight files want another plan than one)."""
    parts = [sha256_file(model_file(model_path)), str(profile.name), mode, str(available_cores())]
    return "|".join(parts + ([f"streams={streams}"] if streams > 1 else []))


def cached_plan(state_dir: Path, key: str, mode: str) -> Plan | None:
    hit = load_cache(state_dir).get(key)
    if not isinstance(hit, dict):
        return None
    try:
        return Plan(int(hit["threads"]), int(hit["workers"]), how="cached", mode=mode,
                    pin=bool(hit.get("pin", False)), fps=hit.get("fps"),
                    latency_ms=hit.get("latency_ms"))  # fmt: skip
    except (KeyError, TypeError, ValueError):
        return None


def load_cache(state_dir: Path) -> dict[str, Any]:
    path = Path(state_dir) / CACHE_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def save_plan(state_dir: Path, key: str, plan: Plan) -> None:
    """Remember ``plan`` (a device that cannot write its state directory just measures again)."""
    cache = load_cache(state_dir)
    cache[key] = {**plan.to_dict(), "how": "cached", "measured_at": time.time()}
    try:
        Path(state_dir).mkdir(parents=True, exist_ok=True)
        atomic_write(Path(state_dir) / CACHE_FILE, json.dumps(cache, indent=2).encode() + b"\n")
    except OSError as exc:
        log.warning("plan: cannot cache it in %s (%s)", state_dir, exc.strerror or exc)


def rate_between(start: tuple[int, float], end: tuple[int, float]) -> float | None:
    """Results per second between two :meth:`Pipeline.progress` readings: the results that
    left after the first over the time from the first's last result to the second's. Whole
    results over their own time (counting results in a fixed window is off by up to one: 4 %
    of a 0.4 s trial of a 10 ms model)."""
    (n0, t0), (n1, t1) = start, end
    if n0 == 0 or n1 - n0 < MIN_RESULTS // 4 or t1 <= t0:  # no result yet at the start: no time
        return None
    return float((n1 - n0) / (t1 - t0))


def run_trials(
    plans: list[Any], seconds: float, trial: Any, *, minimum: float
) -> dict[Any, list[float]]:
    """Measure ``plans`` within about ``seconds``: each once (half the time, in order), then
    the contenders (within :data:`CONTENDER` of the best) again in the reverse order, with the
    other half; a plan far behind is not measured twice. ``trial(plan, seconds)`` returns its
    score (higher is better) or None (not measurable: left out). The reverse second pass keeps
    a machine that speeds up or slows down from favouring any contender (A B C, then C B A);
    one pass each was a coin toss between plans a few percent apart."""
    scores: dict[Any, list[float]] = {}
    first = max(minimum, seconds / 2 / max(1, len(plans)))
    for plan in plans:
        score = trial(plan, first)
        if score is not None:
            scores.setdefault(plan, []).append(score)
    if not scores:
        return scores
    best = max(v[0] for v in scores.values())
    contenders = [p for p in plans if p in scores and scores[p][0] >= best - CONTENDER * abs(best)]
    if len(contenders) < 2:
        return scores
    again = max(minimum, seconds / 2 / len(contenders))
    for plan in contenders[::-1]:
        score = trial(plan, again)
        if score is not None:
            scores[plan].append(score)
    return scores


def best_plan(scores: Mapping[_Plan, float], mode: str) -> _Plan:
    """The plan with the best mean score. In throughput mode a plan within :data:`TIE` of it
    with more workers (a plan is ``(threads, workers, …)``) wins: a few seconds of trials
    cannot tell plans that close apart, and one-thread interpreters side by side share
    nothing, where one interpreter's threads wait for each other at every layer (and for the
    capture thread that preempts one of them). On the 2-core Xeon (stop 29,
    ``benchmarks.agent``) the landmark-style model served by 1 x 2 reached 0.902 of the raw
    loop, by 2 x 1 0.976 and 1.014; stop 27 saw the same."""
    best = max(scores, key=lambda k: scores[k])
    if mode != "throughput":
        return best
    top = scores[best]
    ties = [k for k in scores if scores[k] >= top - TIE * abs(top)]
    return max(ties, key=lambda k: (k[1], scores[k]))


def measure_throughput(
    model: Any, config: Any, *, workers: int, seconds: float, pin: bool = False
) -> float | None:
    """Results per second of the real pipeline over a fresh copy of the configured source, in
    steady state: for ``seconds`` from the first ``2 × workers + 2`` results on (the source's
    opening and the model's first inferences are not the plan's rate)."""
    pipe = Pipeline(
        source=open_source_from(config), model=model, sinks=[], workers=workers, pin_capture=pin
    )
    runner = threading.Thread(target=pipe.run, name="edge-tune", daemon=True)
    runner.start()
    warm_until = time.monotonic() + max(2.0, seconds)
    while pipe.results < 2 * workers + 2 and runner.is_alive() and time.monotonic() < warm_until:
        time.sleep(0.002)
    start = pipe.progress()
    runner.join(seconds)
    end = pipe.progress()
    pipe.stop()
    runner.join(10.0)
    if pipe.results < MIN_RESULTS:
        return None
    return rate_between(start, end)


def measure_latency(model: Any, *, seconds: float) -> float:
    """The median warm inference time in ms, on zero inputs (:meth:`LoadedModel.zero_feeds`)."""
    runtime = model.runtime
    feeds = model.zero_feeds()
    times: list[float] = []
    deadline = time.monotonic() + seconds
    while len(times) < 5 or (time.monotonic() < deadline and len(times) < 2000):
        t0 = time.perf_counter()
        runtime.infer(feeds)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000.0


def open_tuned_model(
    config: Any,
    profile: Any,
    *,
    source: Any,
    state_dir: Path,
    tune: bool = False,
    seconds: float = TUNE_SECONDS,
    streams: int = 1,
) -> tuple[Any, Plan]:
    """The model loaded for its plan: the requested one, else the cached one, else (with
    ``tune``) the fastest measured now (and cached), else the rule's (``model.plan``). With
    several ``streams`` read at pace none, the rule is one worker of one thread per core: the
    streams' readers decode in parallel, so no capture thread waits on a second worker (with
    one source it would)."""
    kind = getattr(source, "kind", "image")
    mode = source_mode(source, config.source.pace)
    requested_threads, requested_workers = int(config.model.threads), int(config.pipeline.workers)
    threads = thread_plan(profile, requested=requested_threads, source_kind=kind)
    if requested_threads or requested_workers:
        model, workers = open_planned_model(config, profile, threads=threads, source=source)
        return model, Plan(threads, workers, how="requested", mode=mode)
    key = cache_key(Path(config.model.path), profile, mode, streams)
    plan = None if tune else cached_plan(state_dir, key, mode)
    if plan is not None:
        return open_model(config, profile, threads=plan.threads, workers=plan.workers), plan
    if streams > 1 and mode == "throughput":
        cores = min(int(profile.cores), available_cores())
        workers = min(cores, streams)
        model = open_model(config, profile, threads=cores, workers=workers)
        return model, Plan(cores, model.workers, how="rule", mode=mode)
    if tune and streams == 1:
        tuned = _tune(config, profile, key=key, mode=mode, state_dir=state_dir, seconds=seconds)
        if tuned is not None:
            return tuned
    model, workers = open_planned_model(config, profile, threads=threads, source=source)
    return model, Plan(threads, workers, how="rule", mode=mode)


def _tune(
    config: Any, profile: Any, *, key: str, mode: str, state_dir: Path, seconds: float
) -> tuple[Any, Plan] | None:
    """The candidate plans loaded and measured (:func:`run_trials`); the best mean kept loaded
    and cached. None when no trial could be measured (a file too short to count)."""
    plans = candidates(min(int(profile.cores), available_cores()), mode)
    model: Any = None  # the model of the last trial, kept for a trial of the same plan
    loaded: tuple[int, int, bool] | None = None

    def trial(plan: tuple[int, int, bool], budget: float) -> float | None:
        nonlocal model, loaded
        threads, workers, pin = plan
        if loaded != plan:
            if model is not None:
                model.close()
                model = None
            model = open_model(config, profile, threads=threads, workers=workers)
            loaded = plan
        if mode == "throughput":
            return measure_throughput(model, config, workers=workers, seconds=budget, pin=pin)
        return -measure_latency(model, seconds=budget)

    try:
        scores: dict[tuple[int, int, bool], list[float]] = run_trials(
            plans, seconds, trial, minimum=0.2
        )
    except BaseException:
        if model is not None:
            model.close()
        raise
    if not scores:
        if model is not None:
            model.close()
        return None
    means = {k: statistics.fmean(v) for k, v in scores.items()}
    for (threads, workers, pin), score in means.items():
        log.info("plan: tried %s", _tuned(threads, workers, pin, mode, score).describe())
    best = best_plan(means, mode)
    if best != loaded:  # the last trial's model is the winner's when it was measured last
        assert model is not None
        model.close()
        model = open_model(config, profile, threads=best[0], workers=best[1])
    assert model is not None
    plan = _tuned(*best, mode, means[best])
    save_plan(state_dir, key, plan)
    return model, plan


def _tuned(threads: int, workers: int, pin: bool, mode: str, score: float) -> Plan:
    """The plan measured at ``score`` (results/s on a throughput source; minus the median
    inference ms on a live one)."""
    if mode == "throughput":
        return Plan(threads, workers, how="tuned", mode=mode, pin=pin, fps=round(score, 2))
    return Plan(threads, workers, how="tuned", mode=mode, latency_ms=round(-score, 4))


def release_memory() -> None:
    """Give the heap a closed model freed back to the system (glibc keeps freed memory for
    reuse otherwise: trying three plans at start would leave the agent ~50 MB larger)."""
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class _Ended(Exception):
    """The online tuning cannot go on (no traffic, or somebody else swapped the model)."""


class OnlineTuner:
    """The plan measured at start without delaying the first result: the pipeline serves from
    its first frame with the rule's plan while this thread loads the same model for each other
    plan in turn, swaps it in between two frames (``Pipeline.swap_model``, no frame lost) and
    measures it on the live traffic (throughput: results a second; live: the median inference
    time); the fastest is kept serving and cached. A plan that meets a quiet source (a gated
    scene, a lost camera) waits for frames for up to ``patience`` seconds, then the tuning ends
    with the plan serving then, and nothing cached. An update swapped in by somebody else
    (``expect``) ends it too; the tuner closes only the models it got back from its own swaps,
    and never holds more than two models at once (the best plan is loaded again at the end)."""

    def __init__(
        self,
        pipeline: Any,
        *,
        open_plan: Any,
        current: Plan,
        mode: str,
        cores: int,
        seconds: float = TUNE_SECONDS,
        patience: float = 120.0,
        on_done: Any = None,
    ) -> None:
        self.pipeline = pipeline
        self.open_plan = open_plan  # (threads, workers) -> the model loaded for that plan
        self.current = current
        self.mode = mode
        self.plans = [(t, w) for t, w, pin in candidates(cores, mode) if not pin]
        if (current.threads, current.workers) in self.plans:  # measured first, as it serves
            self.plans.remove((current.threads, current.workers))
        self.plans.insert(0, (current.threads, current.workers))
        self.seconds = seconds  # in all, for run_trials
        self.patience = patience
        self.on_done = on_done
        self.result: Plan | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="edge-tune", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30.0)

    def _wait_results(self, n: int, since: int) -> bool:
        """Wait until ``n`` results beyond ``since`` (False: stopped or the source is quiet)."""
        deadline = time.monotonic() + self.patience
        while self.pipeline.results < since + n:
            if self._stop.wait(0.02) or time.monotonic() > deadline:
                return False
            if self.pipeline.state in (State.STOPPING, State.STOPPED):
                return False
        return True

    def _measure(self, seconds: float) -> float | None:
        """This plan's score (higher is better) on the traffic now; None when it cannot be."""
        pipe = self.pipeline
        if not self._wait_results(2 * pipe.workers, pipe.results):  # the plan warms up
            return None
        mark, start = pipe.stats.mark(), pipe.progress()
        if self._stop.wait(seconds) or not self._wait_results(MIN_RESULTS // 4, start[0]):
            return None
        if self.mode == "throughput":
            return rate_between(start, pipe.progress())
        p50 = pipe.stats.since(mark).inference.summary()["p50"]
        return None if p50 is None else -float(p50)

    def _run(self) -> None:
        try:
            self._tune()
        finally:  # settled, whatever the outcome: the capture thread follows the plan serving
            self.pipeline.release_priority()

    def _tune(self) -> None:
        self._serving = self.pipeline.model
        serving = (self.current.threads, self.current.workers)

        def trial(plan: tuple[int, int], seconds: float) -> float:
            nonlocal serving
            if plan != serving:
                if not self._switch(plan):
                    raise _Ended("the model could not be swapped (an update came in, or timed out)")
                serving = plan
            score = self._measure(seconds)
            if score is None:
                raise _Ended(f"no traffic to measure (keeping {plan[1]}x"
                             f"{max(1, plan[0] // plan[1])})")  # fmt: skip
            return score

        try:
            runs = run_trials(self.plans, self.seconds, trial, minimum=0.3)
            scores = {k: statistics.fmean(v) for k, v in runs.items()}
            for (threads, workers), score in scores.items():
                log.info("plan: tried %d worker(s) x %d thread(s): %s", workers,
                         max(1, threads // workers), self._say(score))  # fmt: skip
            best = best_plan(scores, self.mode)
            if best != serving and not self._switch(best):  # loaded again: two models at most
                return
            self.result = _tuned(best[0], best[1], False, self.mode, scores[best])
            if self.on_done is not None:
                self.on_done(self.result)
        except _Ended as end:
            log.info("plan: tuning ended, %s", end)
        except Exception as exc:  # the pipeline goes on with the plan it serves
            log.warning("plan: tuning failed (%s); keeping the plan serving", exc)

    def _switch(self, plan: tuple[int, int]) -> bool:
        """The model loaded for ``plan`` serving in place of the one the tuner last put in (or
        found), which it closes: never more than two loaded at once (a device's memory). False
        when somebody else (an update) swapped meanwhile: the tuning ends, touching nothing."""
        model = self.open_plan(*plan)
        try:
            old = self.pipeline.swap_model(model, expect=self._serving, plan_change=True)
        except Exception:
            model.close()
            return False
        self._serving = model
        old.close()
        release_memory()
        self.pipeline.set_workers(plan[1])
        return True

    def _say(self, score: float) -> str:
        if self.mode == "throughput":
            return f"{score:.1f} results/s"
        return f"{-score:.3f} ms an inference (median)"


def start_online_tuning(
    pipeline: Any,
    config: Any,
    profile: Any,
    *,
    current: Plan,
    state_dir: Path,
    on_done: Any,
    streams: int = 1,
) -> OnlineTuner | None:
    """``[pipeline] tune`` at start: an :class:`OnlineTuner` on the running ``pipeline`` for
    the model of ``config``, caching what it finds like ``edge-agent tune``; None when there is
    nothing to choose (one core, or a single candidate)."""
    cores = min(int(profile.cores), available_cores())
    tuner = OnlineTuner(
        pipeline,
        open_plan=lambda threads, workers: open_model(
            config, profile, threads=threads, workers=workers
        ),
        current=current,
        mode=current.mode,
        cores=cores,
        on_done=None,
    )
    if len(tuner.plans) < 2:
        return None
    key = cache_key(Path(config.model.path), profile, current.mode, streams)

    def done(plan: Plan) -> None:
        save_plan(state_dir, key, plan)
        on_done(plan)

    tuner.on_done = done
    tuner.start()
    return tuner


def run_tune(config: Any, profile: Any, *, seconds: float = TUNE_SECONDS) -> dict[str, Any]:
    """``edge-agent tune``: measure the plan for the configured model and source, cache it, and
    say what was chosen."""
    if config.model.threads or config.pipeline.workers:
        raise ConfigError(
            f"[model] threads = {config.model.threads}, [pipeline] workers = "
            f"{config.pipeline.workers}: tune measures the plan; leave both at 0"
        )
    if not 0 < seconds <= 600:
        raise ConfigError(f"--seconds {seconds}: expected 0 < S <= 600")
    state_dir = Path(config.agent.state_dir)
    model, plan = open_tuned_model(
        config, profile, source=open_source_from(config), state_dir=state_dir, tune=True,
        seconds=seconds,
    )  # fmt: skip
    model.close()
    return {"model": model.identity, "profile": profile.name, "plan": plan.to_dict(),
            "cached_in": str(state_dir / CACHE_FILE)}  # fmt: skip


__all__ = [
    "CACHE_FILE",
    "TUNE_SECONDS",
    "OnlineTuner",
    "Plan",
    "cache_key",
    "cached_plan",
    "candidates",
    "load_cache",
    "measure_latency",
    "measure_throughput",
    "open_tuned_model",
    "run_tune",
    "save_plan",
    "source_mode",
    "start_online_tuning",
]
