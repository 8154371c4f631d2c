"""The shadow: a candidate model run beside the serving one on live frames, never served.

The desired state may name a ``shadow`` bundle (``edgectl shadow``, ``edgectl rollout
--require-shadow``). :class:`ShadowController` follows it in a thread of its own: the bundle is
fetched and verified exactly as an update (``Updater.fetch_verified``: hashes, signature,
compatibility), loaded with its golden test (``[shadow] threads`` runtime threads), and handed
to a :class:`ShadowRunner`; a desired state without ``shadow`` stops and unloads it.

::

    inference worker: Pipeline._outcome -> ShadowRunner.offer(frame, output, raw, inference ns)
                      budget? slot free? -> the one-slot hand-off (else dropped and counted)
                                │
    edge-shadow thread (SCHED_IDLE: only on a core that would idle): prepare -> infer -> postprocess
                      -> frame_agreement(serving output, shadow output) -> counters, histograms
                      -> Sampler.disagreement (``[capture] disagreement``) when they differ

The budget (``[shadow] max_share``, default 0.25): a frame is handed off only while the
shadow's own time so far (preprocessing, inference, postprocessing, comparison: wall time of
its thread) is at most ``max_share`` times the serving model's inference time since the shadow
started. The hand-off never blocks and never waits: the serving result goes on at once, and a
shadow that raises, returns NaN/inf or is slow only costs its own frames (counted as
``errors``, ``nans``, ``skipped_busy``, ``skipped_budget``). Its outputs never reach a sink.

Agreement is the converter's task metric (:mod:`edge_agent.model.agreement`) on each frame:
top-1 class, detection F1 at IoU 0.5, CTC sequence, mask IoU, a yes/no decision, else the
cosine of the raw outputs. Telemetry's ``shadow`` section, the reported state's ``shadow`` and
the ``shadow_*`` events carry it (docs/mqtt.md).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.common.slots import put_latest
from edge_agent.errors import EdgeError
from edge_agent.fleet.protocol import ShadowSpec
from edge_agent.model.agreement import frame_agreement
from edge_agent.model.loader import LoadedModel
from edge_agent.niceness import idle_priority
from edge_agent.stats import LatencyHistogram

log = logging.getLogger(__name__)

#: How much nicer than the thread that started it the shadow thread runs where SCHED_IDLE is
#: missing (the capture thread, when it runs nicer: CAPTURE_NICENESS, 10).
SHADOW_NICENESS = 15
_STOP = object()


@dataclass
class _Offer:
    data: np.ndarray
    frame: Any
    output: Mapping[str, Any]
    raw: list[np.ndarray]
    stream: str | None
    serving: Mapping[str, str]


class ShadowRunner:
    """One loaded shadow model and the thread that runs it; :meth:`offer` is the pipeline's
    ``shadow`` hook (in the inference worker, cheap, never blocking)."""

    def __init__(
        self,
        model: LoadedModel,
        *,
        spec: ShadowSpec,
        max_share: float,
        sampler: Any = None,
        on_target: Callable[[ShadowRunner], None] | None = None,
        threads: int = 1,
    ) -> None:
        self.model = model
        self.spec = spec
        self.max_share = max_share
        # The budget counts the shadow's CPU time: with one runtime thread the runtime computes
        # on this thread, so its CPU clock is exact (and a shadow preempted by serving threads or
        # other processes is not charged for the wait); with more, their CPU is not on this
        # thread's clock, so the wall clock stands in.
        self._clock = time.thread_time_ns if threads == 1 else time.monotonic_ns
        self.sampler = sampler
        self._on_target = on_target
        self._slot: queue.Queue[Any] = queue.Queue(maxsize=1)
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="edge-shadow", daemon=True)
        self.serving_ns = 0  # the serving model's inference time since the shadow started
        self.spent_ns = 0  # the shadow thread's own time
        self.offered = self.skipped_busy = self.skipped_budget = 0
        self.frames = self.disagreements = self.errors = self.nans = 0
        self.metric: str | None = None
        self._agreement_sum = 0.0
        self.latency = LatencyHistogram()  # the shadow's inference, per compared frame
        self.serving_latency = LatencyHistogram()  # the serving model's, on the same frames
        self.last_error: str | None = None

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopped.set()
        with contextlib.suppress(queue.Full):
            self._slot.put_nowait(_STOP)
        if self._thread.is_alive():
            self._thread.join(timeout)

    # --- the pipeline's hook (inference worker) -------------------------------------------------

    def offer(
        self,
        frame: Any,
        output: Mapping[str, Any],
        raw: list[np.ndarray],
        inference_ns: int,
        serving: Mapping[str, str],
        stream: str | None,
    ) -> None:
        """A served frame: handed to the shadow when the budget allows and it is free."""
        with self._lock:
            self.serving_ns += inference_ns
            if self._stopped.is_set() or "error" in output:
                return
            self.offered += 1
            if self.spent_ns > self.max_share * self.serving_ns:
                self.skipped_budget += 1
                return
            if self._slot.full():
                self.skipped_busy += 1
                return
        item = _Offer(np.array(frame.data, copy=True), frame, output, raw, stream, serving)
        try:
            self._slot.put_nowait(item)
        except queue.Full:
            with self._lock:
                self.skipped_busy += 1
            return
        with self._lock:
            self.serving_latency.record(inference_ns)

    # --- the shadow thread ----------------------------------------------------------------------

    def _run(self) -> None:
        idle_priority(fallback=SHADOW_NICENESS)
        while True:
            item = self._slot.get()
            if item is _STOP or self._stopped.is_set():
                return
            t0 = self._clock()
            try:
                self._compare(item)
            except Exception as exc:  # a broken shadow costs its own frames, nothing else
                with self._lock:
                    self.errors += 1
                    self.last_error = f"{type(exc).__name__}: {exc}"
                if self.errors in (1, 10, 100) or self.errors % 1000 == 0:
                    log.warning("shadow error #%d: %s", self.errors, self.last_error)
            finally:
                with self._lock:
                    self.spent_ns += self._clock() - t0

    def _compare(self, item: _Offer) -> None:
        model = self.model
        feeds, geometry = model.prepare(item.data)
        t_inf = time.monotonic_ns()
        outs = model.infer(feeds, stream=item.stream or "")
        took = time.monotonic_ns() - t_inf
        if any(o.dtype.kind == "f" and not np.isfinite(o).all() for o in map(np.asarray, outs)):
            with self._lock:
                self.nans += 1
                self.latency.record(took)
            return
        data = item.data
        size = (data.shape[1], data.shape[0]) if data.ndim >= 2 and data.dtype == np.uint8 else None
        got = model.postprocessor(outs, geometry=geometry, source_size=size)
        if "error" in got:
            with self._lock:
                self.nans += 1
                self.latency.record(took)
            return
        agreement = frame_agreement(item.output, got, ref_raw=item.raw, got_raw=outs)
        with self._lock:
            self.latency.record(took)
            self.frames += 1
            self.metric = agreement.metric
            self._agreement_sum += agreement.value
            self.disagreements += not agreement.agrees
            reached = self.frames == self.spec.frames
        if not agreement.agrees and self.sampler is not None:
            self.sampler.disagreement(
                frame=item.frame, output=item.output, shadow_output=got, model=item.serving,
                stream=item.stream,
            )  # fmt: skip
        if reached and self._on_target is not None:
            self._on_target(self)

    # --- reporting ------------------------------------------------------------------------------

    @property
    def agreement(self) -> float | None:
        return round(self._agreement_sum / self.frames, 6) if self.frames else None

    def snapshot(self) -> dict[str, Any]:
        """Telemetry's ``shadow`` counters (totals since the shadow started)."""
        with self._lock:
            lat = self.latency.summary()
            serving = self.serving_latency.summary()
            ratio = None
            if lat["p50"] and serving["p50"]:
                ratio = round(float(lat["p50"]) / float(serving["p50"]), 3)
            return {
                "metric": self.metric,
                "target_frames": self.spec.frames,
                "frames": self.frames,
                "agreement": self.agreement,
                "disagreements": self.disagreements,
                "offered": self.offered,
                "skipped_busy": self.skipped_busy,
                "skipped_budget": self.skipped_budget,
                "errors": self.errors,
                "nans": self.nans,
                "latency_ms": {q: lat[q] for q in ("p50", "p95", "p99")},
                "serving_latency_ms": {q: serving[q] for q in ("p50", "p95", "p99")},
                "latency_ratio": ratio,
                "share": round(self.spent_ns / self.serving_ns, 4) if self.serving_ns else None,
                "max_share": self.max_share,
                "last_error": self.last_error,
            }


class ShadowController:
    """Follows the desired state's ``shadow``: fetch, verify and load it (its own thread, one
    request at a time, the newest wins), run it, stop and unload it."""

    def __init__(
        self,
        *,
        settings: Any,  # config.ShadowSection
        fetch_verified: Callable[..., tuple[Path, dict[str, Any]]],
        load: Callable[[Path], LoadedModel],
        pipeline: Any,
        sampler: Any,
        event: Callable[..., None],
        report: Callable[[], None],
    ) -> None:
        self.settings = settings
        self.fetch_verified = fetch_verified
        self.load = load
        self.pipeline = pipeline
        self.sampler = sampler
        self.event = event
        self.report = report
        self.runner: ShadowRunner | None = None
        #: the state reported: {"sha256", "version", "state", "reason", "deployment"}
        self.state: dict[str, Any] | None = None
        self._wanted: ShadowSpec | None = None
        self._failed: set[tuple[str, str]] = set()  # (sha256, deployment): not retried
        self._jobs: queue.Queue[Any] = queue.Queue(maxsize=1)
        self._cancel = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="edge-shadow-load", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._cancel.set()
        put_latest(self._jobs, _STOP)
        self._thread.join(timeout)
        self._unload(reason=None)

    def request(self, spec: ShadowSpec | None) -> None:
        """The effective desired state's ``shadow`` (None: no shadow). Cheap; repeated
        requests for what already runs, or what already failed, do nothing."""
        if spec == self._wanted:
            return
        self._wanted = spec
        self._cancel.set()  # a transfer for a shadow no longer wanted stops
        put_latest(self._jobs, spec)

    def _run(self) -> None:
        while not self._stop.is_set():
            job = self._jobs.get()
            if job is _STOP:
                return
            self._cancel.clear()
            try:
                self._apply(job)
            except Exception:  # a bug: report it, keep serving
                log.exception("shadow: job failed")
                self.event("error", reason="internal error in the shadow; see the agent log")

    def _apply(self, spec: ShadowSpec | None) -> None:
        running = self.runner.spec if self.runner is not None else None
        if spec is not None and running is not None and running.sha256 == spec.sha256:
            if running != spec:  # the same bundle asked again (new --frames): start afresh
                self._unload(reason=None)
            else:
                return
        elif self.runner is not None:
            self._unload(reason="withdrawn from the desired state")
        if spec is None:
            return
        if (spec.sha256, spec.deployment) in self._failed:
            return
        if self.settings.max_share <= 0:
            self._fail(spec, "[shadow] max_share = 0 on this device: shadows are refused")
            return
        self._set_state(spec, "loading")
        try:
            path, _ = self.fetch_verified(spec.as_desired(), cancel=self._cancel)
            if self._wanted != spec:
                return
            model = self.load(path)
        except EdgeError as exc:
            if self._wanted == spec:
                self._fail(spec, str(exc))
            return
        if self._wanted != spec:  # withdrawn while it loaded
            model.close()
            return
        spec = ShadowSpec(
            sha256=spec.sha256, name=model.name, version=model.version, url=spec.url,
            frames=spec.frames, deployment=spec.deployment,
        )  # fmt: skip
        runner = ShadowRunner(
            model, spec=spec, max_share=self.settings.max_share, sampler=self.sampler,
            threads=self.settings.threads,
            on_target=self._reached,
        )  # fmt: skip
        runner.start()
        self.runner = runner
        self.pipeline.shadow = runner.offer
        self._set_state(spec, "running")
        log.info("shadow: %s %s beside %s", model.name, model.version, self.pipeline.model.name)
        self.event(
            "shadow_started", sha256=spec.sha256, version=model.version,
            deployment=spec.deployment, frames=spec.frames, max_share=self.settings.max_share,
        )  # fmt: skip

    def _reached(self, runner: ShadowRunner) -> None:
        snap = runner.snapshot()
        self.event(
            "shadow_completed", sha256=runner.spec.sha256, version=runner.spec.version,
            deployment=runner.spec.deployment, frames=snap["frames"],
            agreement=snap["agreement"], metric=snap["metric"], errors=snap["errors"],
            nans=snap["nans"], latency_ratio=snap["latency_ratio"],
        )  # fmt: skip
        self.report()

    def _unload(self, *, reason: str | None) -> None:
        runner = self.runner
        if runner is None:
            return
        self.pipeline.shadow = None
        runner.stop()
        snap = runner.snapshot()
        runner.model.close()
        self.runner = None
        self._set_state(runner.spec, "stopped", reason)
        if reason is not None:
            self.event(
                "shadow_stopped", reason=reason, sha256=runner.spec.sha256,
                version=runner.spec.version, frames=snap["frames"], agreement=snap["agreement"],
            )  # fmt: skip

    def _fail(self, spec: ShadowSpec, reason: str) -> None:
        log.warning("shadow: %s failed: %s", spec.sha256[:12], reason)
        self._failed.add((spec.sha256, spec.deployment))
        self._set_state(spec, "failed", reason)
        self.event("shadow_failed", reason=reason, sha256=spec.sha256, version=spec.version,
                   deployment=spec.deployment)  # fmt: skip

    def _set_state(self, spec: ShadowSpec, state: str, reason: str | None = None) -> None:
        self.state = {
            "sha256": spec.sha256,
            "version": spec.version,
            "state": state,
            "reason": reason,
            "deployment": spec.deployment,
        }
        self.report()

    # --- reporting ------------------------------------------------------------------------------

    def reported(self) -> dict[str, Any] | None:
        """The reported state's ``shadow``: its state, and its counts so far."""
        if self.state is None:
            return None
        runner = self.runner
        counts = (
            {"frames": runner.frames, "agreement": runner.agreement}
            if runner is not None and self.state["state"] == "running"
            else {}
        )
        return {**self.state, **counts}

    def telemetry(self) -> dict[str, Any] | None:
        """Telemetry's ``shadow`` section: None before any shadow was asked for."""
        if self.state is None:
            return None
        runner = self.runner
        base = {
            "state": self.state["state"],
            "sha256": self.state["sha256"],
            "deployment": self.state["deployment"],
            "reason": self.state["reason"],
            "frames": 0,
            "agreement": None,
            "errors": 0,
            "nans": 0,
            "max_share": self.settings.max_share,
        }
        if runner is None or self.state["state"] != "running":
            return base
        return {**base, "model": runner.model.identity, **runner.snapshot()}


__all__ = ["SHADOW_NICENESS", "ShadowController", "ShadowRunner"]
