"""The loop: capture -> preprocess -> infer -> postprocess -> sinks, pipelined.

Two threads. The capture thread reads the source and preprocesses the frame for the current
model; the inference thread (the caller of :meth:`Pipeline.run`) runs the model, postprocesses
and writes results. They hand over through a one-slot queue: while frame n is inferred, frame
n+1 is decoded and preprocessed (OpenCV and both runtimes release the GIL), and no frame ever
waits behind more than one other. Live sources keep only their newest frame, so a slow model
drops frames at the source (counted) instead of serving stale ones.

Workers: by default one inference thread runs the model with all the runtime's threads (lowest
latency, right for live sources). With ``workers=N`` (a thread-safe runtime, such as
onnxruntime, loaded with threads/N intra-op threads each), N frames are in flight at once: on a
throughput-bound source (a file at ``pace="none"``) this beats one frame with N intra-op threads,
which synchronise at every operator (the measurements: docs/agent.md, "Workers"). Results
still leave in capture order, so ``seq`` follows the frames: a worker done before its turn
parks its result and takes the next frame, and the worker of the frame ahead writes the parked
results after its own (:meth:`Pipeline._emit`).

Several streams: with ``streams=`` (named sources, :class:`edge_agent.io.streams.Stream`) one
model serves them all. Each stream has a reader thread that keeps its newest frame (live) or its
next one (file), runs that stream's motion gate and region of interest and preprocesses the
frame, so decoding and preprocessing of different streams overlap; the capture thread picks the
next frame across the streams with one ready (:class:`~edge_agent.io.streams.StreamSet`:
round-robin or oldest-first) and hands it to the workers as above. Each stream is a lane of its
own for emission: its results leave in its capture order, but a worker done with one stream's
frame does not wait for another stream's frame picked before it (with two workers, eight files
and one emission order for all, each worker spent 22-37 % of its time waiting for the other's
turn, time in which its core had nothing of ours to run on a quiet machine). Each result
carries ``stream`` and ``stream_seq`` (that stream's own count, gap-free), besides the
device-wide ``seq`` (in the order results leave). Counters, latency and state are kept per
stream too; a lost stream is ``degraded`` on its own and never stalls the others.

Hot swap: :meth:`Pipeline.swap_model` takes a model that is already loaded and warmed beside the
running one; the inference thread switches between two frames. A frame preprocessed for the old
model is prepared again for the new one, so no frame is lost and the stall is one
preprocessing at most.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from edge_agent.common.urls import redact_uri
from edge_agent.errors import EdgeError, ModelError, SourceError
from edge_agent.io.opencv import VideoFileSource
from edge_agent.io.sinks import Sink, SinkWriter
from edge_agent.io.source import Frame, Source, SourceTimeout
from edge_agent.io.streams import Stream, StreamSet
from edge_agent.model.loader import LoadedModel
from edge_agent.model.preprocess import Geometry
from edge_agent.model.runtimes import infer_lock
from edge_agent.niceness import ThreadPriority, lower_priority, priority_restorable
from edge_agent.stats import StageStats

log = logging.getLogger(__name__)


class State(enum.Enum):
    STARTING = "starting"
    SERVING = "serving"
    SWAPPING = "swapping"
    DEGRADED = "degraded"
    STOPPING = "stopping"
    STOPPED = "stopped"


@dataclass
class _Item:
    #: the frame's place in its lane: results leave in this order within a lane
    order: int
    frame: Frame
    feeds: dict[str, np.ndarray]
    geometry: Geometry | None
    model: LoadedModel
    pre_ns: int
    stream: str | None = None
    #: the stream's source restarted before this frame: a stateful model starts it afresh
    reset: bool = False
    #: the frame before the stream's region of interest cropped it (None: not cropped)
    whole: Frame | None = None
    #: its stream's index (0 with one source): each stream is a lane of its own, so a worker
    #: done with one stream's frame never waits for another stream's frame to be emitted
    lane: int = 0


@dataclass
class _StreamTally:
    """One stream's own counters and latency, beside the pipeline's totals."""

    stream: Stream
    gate: MotionGate | None
    stats: StageStats = field(default_factory=StageStats.new)
    frames: int = 0
    gated: int = 0
    results: int = 0
    errors: int = 0
    seq: int = 0
    reconnects: int = 0
    window_mark: Any = None  # where this stream's telemetry interval started

    def __post_init__(self) -> None:
        self.window_mark = self.stats.mark()


@dataclass
class _Prepared:
    """What a stream's reader made of a frame: the frame (cropped to the region of interest),
    the model's feeds, and the model they were made for."""

    frame: Frame
    feeds: dict[str, np.ndarray]
    geometry: Geometry | None
    model: LoadedModel
    pre_ns: int
    #: the source's restarts when the frame was read (-1: not tracked, a model without state)
    reconnects: int = -1
    #: the frame before the region of interest cropped it (None: not cropped)
    whole: Frame | None = None


_END = object()
_STOP = object()
#: A camera or stream still without a frame this long after it was opened is "degraded" (READY=1
#: goes out; systemd's start timeout is 90 s), even while its status says nothing is wrong (an
#: rpicam-vid that started and went quiet, a FIFO with no writer).
STARTING_LIMIT_S = 20.0


class MotionGate:
    """Skips inference while the scene does not change: mean absolute difference of a 32x32
    grey thumbnail against the last frame inferred, below ``threshold`` (0-255 scale)."""

    def __init__(self, threshold: float = 2.0) -> None:
        import cv2

        self._cv2 = cv2
        self.threshold = threshold
        self._last: np.ndarray | None = None

    def changed(self, image: np.ndarray) -> bool:
        cv2 = self._cv2
        grey = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY) if image.ndim == 3 else image
        thumb = cv2.resize(grey, (32, 32), interpolation=cv2.INTER_AREA).astype(np.int16)
        if self._last is not None and float(np.mean(np.abs(thumb - self._last))) < self.threshold:
            return False
        self._last = thumb
        return True


def _batchable(model: LoadedModel) -> bool:
    """Whether ``model`` takes frames of several streams in one call: onnxruntime, a dynamic
    batch dimension on every input and output, no state (what ``model.plan.batch_plan`` also
    requires before it measures)."""
    rt = model.runtime
    return (
        rt.name == "onnxruntime"
        and not model.stateful
        and all(spec.shape and spec.shape[0] is None for spec in [*rt.inputs, *rt.outputs])
    )


def _to_frame(output: dict[str, Any], roi: tuple[int, int, int, int]) -> dict[str, Any]:
    """A result computed on a stream's region of interest, in the whole frame's terms:
    detection boxes moved by the region's corner (other kinds describe the region itself)."""
    if output.get("kind") == "detection":
        x, y = roi[0], roi[1]
        for d in output.get("detections", ()):
            b = d["box"]
            d["box"] = [b[0] + x, b[1] + y, b[2] + x, b[3] + y]
            for p in d.get("keypoints", ()):  # a pose model's, as its box
                p[0] += x
                p[1] += y
    return output


def wants_nicer_capture(model: LoadedModel) -> bool:
    """Whether the capture thread should run nicer than inference with ``model``'s plan: only
    when one inference uses several threads, which synchronise at every operator (a decode that
    preempts one stalls them all). With one thread an inference, a nicer capture thread starves
    the workers of frames instead: two one-thread LiteRT workers on a ~3 ms BlazeFace-style
    model ran at 338 fps with it and 449 without (2-core EPYC, stop 25; one-off runs, described
    in docs/agent.md)."""
    return model.threads > 1


def available_cores() -> int:
    """The CPUs this process may run on (a container or a cpuset may give it fewer)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def split_cores() -> tuple[set[int], set[int]] | None:
    """(the capture thread's core, the inference threads' cores) when the capture thread is
    pinned apart: the last CPU this process may use for decoding, the others for the model.
    None with fewer than two CPUs or where affinity is not supported."""
    try:
        cores = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None
    if len(cores) < 2:
        return None
    return {cores[-1]}, set(cores[:-1])


def _pin_thread(cores: set[int] | None) -> set[int] | None:
    """Pin the calling thread (Linux: pid 0 is the caller) to ``cores``; returns its previous
    mask, or None when nothing changed."""
    if not cores:
        return None
    try:
        before = os.sched_getaffinity(0)
        os.sched_setaffinity(0, cores)
    except (AttributeError, OSError):
        return None
    return before


class Pipeline:
    """One source (or several named streams), one model at a time, any number of sinks."""

    def __init__(
        self,
        *,
        source: Source | None = None,
        streams: Sequence[Stream] = (),
        policy: str = "round-robin",
        batch: int = 1,
        model: LoadedModel,
        sinks: Sequence[Sink],
        max_frames: int | None = None,
        gate: MotionGate | None = None,
        seq_start: int = 0,
        workers: int = 1,
        max_workers: int | None = None,
        pin_capture: bool = False,
        hold_priority: bool = False,
        observer: Callable[[dict[str, np.ndarray], dict[str, Any], list[np.ndarray]], None]
        | None = None,
        sampler: Callable[[Frame, dict[str, Any], Any, str | None], None] | None = None,
        shadow: Callable[..., None] | None = None,
    ) -> None:
        if workers < 1:
            raise ValueError(f"workers = {workers}: must be >= 1")
        if workers > 1 and model.stateful:
            log.warning(
                "%s carries a state from one window to the next: using 1 inference worker, not "
                "%d (a stream's windows run in order)",
                model.name,
                workers,
            )
            workers = 1
        if (source is None) == (not streams):
            raise ValueError("Pipeline: give a source or streams, not both and not neither")
        if batch < 1 or (batch > 1 and not streams):
            raise ValueError(f"batch = {batch}: must be >= 1, and 1 without streams")
        #: frames of several streams inferred in one call (:func:`edge_agent.model.plan.
        #: batch_plan` decides it by measurement)
        self.batch = batch
        if workers > 1 and not getattr(model.runtime, "concurrent", False):
            log.warning(
                "%s runtime is not thread-safe: using 1 inference worker, not %d",
                model.runtime.name,
                workers,
            )
            workers = 1
        #: the inference workers at work now (:meth:`set_workers` changes it while running, up to
        #: ``max_workers`` threads started: the tuner measures plans on the running pipeline)
        self.workers = workers
        self._spawned = workers if model.stateful else max(workers, max_workers or 1)
        self._tuning = max_workers is not None and not model.stateful  # plans may change
        #: (capture core, inference cores) with ``pin_capture``: the capture thread on a core of
        #: its own, the inference threads on the others (a plan the tuner may measure faster).
        self._cores = split_cores() if pin_capture else None
        #: While True the capture thread keeps its priority whatever the plan. ``hold_priority``
        #: (the online tuner, which measures plans on this pipeline) asks for it, and it is
        #: granted only where a lowered priority cannot be raised again (no ``RLIMIT_NICE``, as
        #: outside the shipped unit): a capture thread stuck nicer would spoil the one-thread
        #: plans' trials. Where it can, each plan is measured at the priority it serves with, as
        #: ``edge-agent tune`` does. :meth:`release_priority` ends it.
        self._priority_held = hold_priority and not priority_restorable()
        self._nicer_capture = not self._priority_held and wants_nicer_capture(model)
        self._restore_refused = False  # said once
        #: Called with (feeds, output, raw outputs) for every frame, in the worker thread, outside
        #: any lock (telemetry's Monitor: it samples every Nth call itself). Must be cheap.
        self.observer = observer
        #: Called with (frame, output, model identity, stream) for every frame, in the worker
        #: thread, outside any lock (``[capture]``'s Sampler: decides cheaply, hands off).
        self.sampler = sampler
        #: Called with (frame, output, raw outputs, inference ns, model identity, stream) for
        #: every frame, in the worker thread, outside any lock (the shadow model's
        #: ``ShadowRunner.offer``: hands the frame off or drops it, never waits).
        self.shadow = shadow
        #: the one source; with streams, the first stream's (its kind stands for them all)
        self.source: Source = source if source is not None else streams[0].source
        self._tallies: dict[str, _StreamTally] = {}
        self._streams: StreamSet | None = None
        if streams:
            self._tallies = {
                st.name: _StreamTally(st, MotionGate(gate.threshold) if gate else None)
                for st in streams
            }
            self._streams = StreamSet(
                [(st.name, st.source) for st in streams],
                policy=policy,
                prepare=self._prepare_stream,
                max_fps={st.name: st.max_fps for st in streams if st.max_fps},
            )
            self._tally_lock = threading.Lock()
            self._readers = threading.local()  # .priority: this reader thread's
        self._model = model
        self._pending: LoadedModel | None = None
        self._pending_plan_change = False  # the pending model is the same one, for a new plan
        self._workers_before_state = 0  # the plan's workers while a stateful model runs on 1
        self._swapped = threading.Event()
        self.sinks = list(sinks)
        self._writer = SinkWriter(self.sinks)  # writes outside the lock, in order
        self.max_frames = max_frames
        self.gate = gate
        self.seq = seq_start
        self.state = State.STARTING
        self._framed = False  # a frame came from the source: degraded can turn to serving
        self.stats = StageStats.new()
        self._window_mark = self.stats.mark()  # where telemetry's interval started
        self.frames = 0
        self.results = 0
        self.inference_errors = 0
        self.gated = 0
        self.swaps = 0
        self.plan_changes = 0
        self.started_mono = 0.0
        self.last_result_mono = 0.0
        self.capture_error: BaseException | None = None
        #: When the capture loop last went round (a frame read, gated, or a read that timed out
        #: while the source is quiet or reconnecting): liveness, not results.
        self.heartbeat_mono = 0.0
        self._infer_since: dict[int, float] = {}  # thread -> when its runtime.infer() began
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=workers)
        self._swap_lock = threading.Lock()  # one swap at a time (the updater's, the tuner's)
        self._stop = threading.Event()
        self._capture: threading.Thread | None = None
        # Emission in capture order, the model switch, and which models are mid-inference.
        self._cond = threading.Condition()
        #: per lane (a stream; one lane with one source), the order of the next frame to emit
        self._next_emit = [0] * max(1, len(streams))
        #: per lane, results done before their turn (order -> payload, None for a frame with
        #: none): their worker goes on to the next frame, and the worker whose result comes
        #: first writes them after its own (two one-thread workers each waited for the other in
        #: turn, the cores idle meanwhile)
        self._parked: list[dict[int, Any]] = [{} for _ in self._next_emit]
        #: results parked in a lane at most; beyond, a worker waits for its turn as before
        self._park_limit = 2 * max(workers, max_workers or 1) + 2
        self._in_flight: dict[int, int] = {}
        self._model_errors: dict[int, int] = {}
        self._worker_error: BaseException | None = None
        self._dropped_at_stop: int | None = None

    # --- control ------------------------------------------------------------------------

    @property
    def model(self) -> LoadedModel:
        return self._model

    def stop(self) -> None:
        """Ask the loop to finish (the signal handlers call this; it only sets flags)."""
        self._mark_drops()
        self._stop.set()

    def _mark_drops(self) -> None:
        # a live source keeps capturing until it is closed: frames it overwrites once the loop
        # is asked to stop were never going to be served, so they are not counted as drops
        if self._dropped_at_stop is None:
            self._dropped_at_stop = self._source_dropped()

    def swap_model(
        self,
        new_model: LoadedModel,
        *,
        timeout: float = 30.0,
        expect: LoadedModel | None = None,
        plan_change: bool = False,
    ) -> LoadedModel:
        """Switch to ``new_model`` (loaded and warmed by the caller) between two frames; returns
        the old model, which the caller closes. Immediate when the loop is not running. With
        ``expect``, only if that model is the one serving (else ModelError: somebody else
        swapped first; the tuner uses it so it never undoes an update). ``plan_change``: the
        same model loaded for another plan (counted in ``plan_changes``, not ``swaps``)."""
        with self._swap_lock:
            if expect is not None and self._model is not expect:
                raise ModelError(f"swap to {new_model.name}: the serving model changed meanwhile")
            if new_model.stateful and self.workers > 1:  # a stream's windows run in order
                log.warning("%s carries a state: 1 inference worker while it serves, not %d",
                            new_model.name, self.workers)  # fmt: skip
                self._workers_before_state = self.workers
                self.set_workers(1)
            self._pending_plan_change = plan_change
            old = self._swap(new_model, timeout)
            if not new_model.stateful and self._workers_before_state:
                self.set_workers(self._workers_before_state)  # the plan's workers again
                self._workers_before_state = 0
            return old

    def _swap(self, new_model: LoadedModel, timeout: float) -> LoadedModel:
        if self._capture is None or not self._capture.is_alive():
            with self._cond:
                old, self._model = self._model, new_model
                self._count_errors_from(old, new_model)
                if self._pending_plan_change:
                    self.plan_changes += 1
                else:
                    self.swaps += 1
            return old
        old = self._model
        self._swapped.clear()
        self._pending = new_model
        deadline = time.monotonic() + timeout
        if not self._swapped.wait(timeout):
            with self._cond:  # a worker may have switched just now: then it did happen
                if self._model is not new_model:
                    self._pending = None
                    raise ModelError(
                        f"swap to {new_model.name} {new_model.version} timed out after {timeout} s"
                    )
        with self._cond:  # another worker may still be inferring on the old model
            while self._in_flight.get(id(old)):
                self._cond.wait(0.05)
                if time.monotonic() > deadline + 30.0:  # a hung inference: the watchdog's job
                    log.error("old model %s still in use after the swap", old.version)
                    break
        return old

    def set_workers(self, workers: int) -> None:
        """Use ``workers`` inference workers from the next frame on (1 up to the ``max_workers``
        started; a model that is not thread-safe is still called by one worker at a time)."""
        if not 1 <= workers <= self._spawned:
            raise ValueError(f"workers = {workers}: this pipeline has 1 to {self._spawned}")
        self._queue.maxsize = workers  # read under the queue's own lock at each put
        self.workers = workers

    def progress(self) -> tuple[int, float]:
        """(results so far, when the last one left, monotonic): a consistent pair, so a rate
        taken between two calls counts whole results over the time they took."""
        with self._cond:
            return self.results, self.last_result_mono

    def release_priority(self) -> None:
        """The plan is settled: the capture thread's priority follows it from the next frame on
        (:func:`wants_nicer_capture`)."""
        self._priority_held = False
        self._nicer_capture = wants_nicer_capture(self._model)

    def errors_of(self, model: LoadedModel) -> int:
        """Failed frames (inference errors, NaN/inf outputs) of this model object."""
        with self._cond:
            return self._model_errors.get(id(model), 0)

    def _count_error(self, model: LoadedModel) -> int:
        with self._cond:
            self.inference_errors += 1
            self._model_errors[id(model)] = self._model_errors.get(id(model), 0) + 1
            return self.inference_errors

    # --- the loop -----------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Serve until the source ends, ``max_frames`` results, or :meth:`stop`. Returns the
        summary. Raises SourceError when the source (any stream) cannot be opened."""
        if self._streams is not None:
            self._streams.open()
        else:
            src = self.source
            if (
                isinstance(src, VideoFileSource)
                and not src.decode_threads
                and self._one_decoding_thread()
            ):
                # The inference threads fill the cores: FFmpeg's own decoding threads only add
                # handoffs. BlazeFace-style 2 x 1: 552-588 fps with one, 519-535 with its default
                # of one a core; no change with the 13 ms landmark-style model (two one-off
                # 3,000-frame runs each of benchmarks.agent.agent_run, stop 25). BlazeFace-style
                # 1 x 2: 527-537 against 421-511, about +10 %; small ONNX 1 x 2: 908-962 against
                # 952-980, about -2 %, taken for one rule for every runtime; 1 x 1 the same either
                # way (4 alternating runs each of a one-off script, stop 26). A plan that leaves
                # a core free keeps FFmpeg's choice: a large H.264 file may need those threads.
                src.decode_threads = 1
            src.open()
        # Serving once the source is: a camera or stream that connects in its capture thread
        # is "starting" until its first frame, or "degraded" when it is not there (the watchdog
        # pings all along; READY=1 waits for one or the other).
        if self._streams is None:
            background = self.source.connects_in_background
        else:  # several: starting until each that connects in the background has sent a frame
            background = any(t.stream.source.connects_in_background for t in self._tallies.values())
        self.state = State.STARTING if background else State.SERVING
        self.started_mono = time.monotonic()
        self._capture = threading.Thread(
            target=self._capture_loop if self._streams is None else self._streams_loop,
            name="edge-capture",
            daemon=True,
        )
        self._capture.start()
        self._writer.start()
        helpers = [
            threading.Thread(target=self._worker, args=(i,), name=f"edge-infer-{i}", daemon=True)
            for i in range(1, self._spawned)
        ]
        for t in helpers:
            t.start()
        restore = _pin_thread(self._cores[1] if self._cores else None)
        try:
            self._inference_loop()
        finally:
            _pin_thread(restore)  # the caller's thread goes on with its own mask
            self._mark_drops()
            self.state = State.STOPPING
            self._stop.set()
            for t in helpers:
                t.join(timeout=10.0)
            self._drain_queue()
            self._capture.join(timeout=5.0)
            self._writer.close()  # every result emitted is written before run() returns
            if self._streams is not None:
                self._streams.close()
            else:
                self.source.close()
            self.state = State.STOPPED
        if self._worker_error is not None:
            raise self._worker_error
        if self.capture_error is not None and self.results == 0:
            err = self.capture_error
            raise err if isinstance(err, EdgeError) else SourceError(str(err))
        return self.summary()

    def _one_decoding_thread(self) -> bool:
        """Whether a video file should decode in one FFmpeg thread: the plan's inference threads
        keep every core this process may use busy, or the capture thread has a core of its own
        (a pinned plan: FFmpeg's threads would run on the inference cores), or the online tuner
        may try such plans (``max_workers``; the decoder cannot change once open)."""
        if self._tuning or self._cores is not None:
            return True
        model = self._model
        if model.format.startswith("onnx"):  # the workers share one session's intra-op pool
            busy = self.workers + model.threads - 1
        else:  # an interpreter a worker, each with its own threads
            busy = self.workers * model.threads
        return busy >= available_cores()

    def _drain_queue(self) -> None:
        try:
            while True:
                self._queue.get_nowait()
        except queue.Empty:
            pass

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            self.heartbeat_mono = time.monotonic()  # waiting for a worker is alive too
            try:
                self._queue.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def _worker(self, index: int) -> None:
        try:
            _pin_thread(self._cores[1] if self._cores else None)
            self._inference_loop(index)
        except BaseException as exc:  # re-raised by run()
            self._worker_error = exc
            self._stop.set()

    def _capture_loop(self) -> None:
        source, gate = self.source, self.gate
        order = 0
        reconnects = 0
        priority = ThreadPriority()
        if self._cores is not None:
            _pin_thread(self._cores[0])
        try:
            while not self._stop.is_set():
                self.heartbeat_mono = time.monotonic()
                if self._cores is None:  # pinned apart, it keeps its priority
                    self._follow_plan_priority(priority)
                try:
                    frame = source.read(timeout=0.5)
                except SourceTimeout:
                    self._update_degraded()
                    continue
                self._framed = True
                if frame is None:
                    break
                if self.state is State.DEGRADED:  # frames again: the source is back
                    self._update_degraded()
                elif self.state is State.STARTING:  # the first frame: the source is there
                    self.state = State.SERVING
                self.frames += 1
                if gate is not None and not gate.changed(frame.data):
                    self.gated += 1
                    continue
                model = self._model
                t0 = time.monotonic_ns()
                feeds, geometry = model.prepare(frame.data)
                item = _Item(order, frame, feeds, geometry, model, time.monotonic_ns() - t0)
                if model.stateful:  # a restarted source starts its state afresh
                    restarts = source.stats.reconnects
                    item.reset, reconnects = restarts != reconnects, restarts
                order += 1
                if not self._put(item):
                    return
        except BaseException as exc:  # reported by run(); the loop must not die silently
            self.capture_error = exc
            log.error("capture stopped: %s", exc)
        finally:
            self._put(_END)

    def _follow_plan_priority(self, priority: ThreadPriority) -> None:
        """Bring the calling capture or reader thread's priority to the plan's
        (:func:`wants_nicer_capture`). Cheap when nothing changed: called for every frame."""
        if not priority.follow(self._nicer_capture) and not self._restore_refused:
            self._restore_refused = True
            log.info(
                "capture: a capture thread's priority cannot be raised back (RLIMIT_NICE); "
                "it stays nicer than inference"
            )

    def _prepare_stream(self, name: str, frame: Frame) -> _Prepared | None:
        """A stream reader's work on each frame (its thread): count it, crop it to the
        stream's region of interest, gate it, preprocess it for the current model. None when
        the motion gate skips it."""
        tally = self._tallies[name]
        priority = getattr(self._readers, "priority", None)
        if priority is None:
            priority = self._readers.priority = ThreadPriority()
        self._follow_plan_priority(priority)
        with self._tally_lock:
            self.frames += 1
            tally.frames += 1
        data = frame.data
        roi = tally.stream.roi
        whole = None
        if roi is not None and data.ndim >= 2 and data.dtype == np.uint8:
            x, y, w, h = roi
            data = data[y : y + h, x : x + w]
            if data.size == 0:  # a frame smaller than the region: nothing to infer
                with self._tally_lock:
                    tally.errors += 1
                if tally.errors in (1, 100) or tally.errors % 10000 == 0:
                    log.warning(
                        "stream %s: roi %s is outside its %dx%d frames; fix [[sources]] roi",
                        name, list(roi), frame.data.shape[1], frame.data.shape[0],
                    )  # fmt: skip
                return None
            whole, frame = frame, replace(frame, data=data)
        if tally.gate is not None and not tally.gate.changed(data):
            with self._tally_lock:
                self.gated += 1
                tally.gated += 1
            return None
        model = self._model
        t0 = time.monotonic_ns()
        feeds, geometry = model.prepare(data)
        prepared = _Prepared(frame, feeds, geometry, model, time.monotonic_ns() - t0, whole=whole)
        if model.stateful:  # compared when taken: a dropped frame cannot lose the restart
            prepared.reconnects = tally.stream.source.stats.reconnects
        return prepared

    def _streams_loop(self) -> None:
        """The capture thread with streams: the next frame across the streams, to the workers."""
        streams = self._streams
        assert streams is not None
        lanes = {name: i for i, name in enumerate(streams.names)}
        orders = [0] * len(lanes)  # per lane: each stream's results leave in its own order
        checked = 0.0
        # It only hands frames on, so it runs nicer whatever the plan: the readers decode and
        # preprocess (their priority follows the plan), and it should not preempt them or the
        # workers for a handoff (eight files: 358-362 fps with it at their priority, 372-391
        # nicer).
        lower_priority()
        try:
            while not self._stop.is_set():
                self.heartbeat_mono = time.monotonic()
                try:
                    taken = streams.take_many(self.batch, timeout=0.5)
                except SourceTimeout:
                    self._update_degraded()
                    continue
                if not taken:
                    break
                now = time.monotonic()
                if now - checked > 0.25:  # the streams' states, a few times a second
                    checked = now
                    self._update_degraded()
                items = []
                for t in taken:
                    prep = t.prepared
                    if prep is None:  # gated in the reader
                        continue
                    reset = False
                    if prep.reconnects >= 0:  # a stateful model: did the source restart?
                        tally = self._tallies[t.stream]
                        reset, tally.reconnects = (
                            prep.reconnects != tally.reconnects,
                            prep.reconnects,
                        )
                    lane = lanes[t.stream]
                    items.append(
                        _Item(
                            orders[lane],
                            prep.frame,
                            prep.feeds,
                            prep.geometry,
                            prep.model,
                            prep.pre_ns,
                            stream=t.stream,
                            reset=reset,
                            whole=prep.whole,
                            lane=lane,
                        )
                    )
                    orders[lane] += 1
                if items and not self._put(items[0] if len(items) == 1 else items):
                    return
        except BaseException as exc:  # reported by run(); the loop must not die silently
            self.capture_error = exc
            log.error("capture stopped: %s", exc)
        finally:
            self._put(_END)

    def stream_status(self) -> dict[str, str]:
        """Each stream's state: ``starting`` (a camera or stream that connects in the
        background, no frame from it yet), ``serving``, ``degraded`` (its source lost, being
        retried, or silent :data:`STARTING_LIMIT_S` after it was opened) or ``ended``; empty
        without streams."""
        out = {}
        counters = self._streams.counters() if self._streams is not None else {}
        waited = time.monotonic() - self.started_mono if self.started_mono else 0.0
        for name, tally in self._tallies.items():
            source = tally.stream.source
            status = getattr(getattr(source, "stats", None), "status", "ok")
            c = counters.get(name)
            if c is not None and c.ended and status != "degraded":
                out[name] = "ended"
            elif status == "degraded":
                out[name] = "degraded"
            elif c is not None and c.read + c.skipped == 0 and source.connects_in_background:
                out[name] = "starting" if waited <= STARTING_LIMIT_S else "degraded"
            else:
                out[name] = "serving"
        return out

    def _update_degraded(self) -> None:
        if self._tallies:
            states = set(self.stream_status().values())
            if "degraded" in states and self.state in (State.SERVING, State.STARTING):
                self.state = State.DEGRADED
            elif not states & {"degraded", "starting"} and self.state in (
                State.DEGRADED,
                State.STARTING,
            ):
                self.state = State.SERVING
            return
        status = getattr(getattr(self.source, "stats", None), "status", "ok")
        silent = (
            self.state is State.STARTING and time.monotonic() - self.started_mono > STARTING_LIMIT_S
        )
        if silent:
            log.warning("%s: no frame %g s after it was opened; degraded until one comes",
                        redact_uri(self.source.uri), STARTING_LIMIT_S)  # fmt: skip
        if (status == "degraded" or silent) and self.state in (State.SERVING, State.STARTING):
            self.state = State.DEGRADED
        elif status == "ok" and self.state == State.DEGRADED and self._framed:
            self.state = State.SERVING

    def _inference_loop(self, index: int = 0) -> None:
        get = self._queue.get
        while not self._stop.is_set():
            if index >= self.workers:  # a worker the plan does not use now
                self._stop.wait(0.1)
                continue
            try:
                item = get(timeout=0.5)
            except queue.Empty:
                if self._pending is not None:  # no frame coming: swap now, not at the next one
                    with self._cond:
                        if self._pending is not None:
                            self._switch(self._pending)
                continue
            if item is _END:
                with contextlib.suppress(queue.Full):
                    self._queue.put_nowait(_END)  # for the other workers
                return
            if isinstance(item, list):  # frames of several streams, inferred in one call
                try:
                    result = self._process_batch(item)
                finally:
                    for one in item:
                        self._emit(one.lane, one.order, None)  # no-op for those emitted
            else:
                try:
                    result = self._process(item)
                finally:
                    self._emit(item.lane, item.order, None)  # no-op when _process emitted it
            if result is _STOP:
                return

    def _take_pending(self) -> LoadedModel:
        with self._cond:
            pending = self._pending
            if pending is not None:
                self._switch(pending)
            model = self._model
            self._in_flight[id(model)] = self._in_flight.get(id(model), 0) + 1
            return model

    def _release(self, model: LoadedModel) -> None:
        with self._cond:
            self._in_flight[id(model)] -= 1
            self._cond.notify_all()

    def _process(self, item: _Item) -> Any:
        t_start = time.monotonic_ns()
        model = self._take_pending()
        try:
            pre_ns = item.pre_ns
            if item.model is not model:  # preprocessed for the old model: prepare it again
                t0 = time.monotonic_ns()
                item.feeds, item.geometry = model.prepare(item.frame.data)
                pre_ns += time.monotonic_ns() - t0
            runtime = model.runtime
            # The REST endpoint may share the runtime; a thread-safe one needs no lock.
            guard = (
                contextlib.nullcontext()
                if getattr(runtime, "concurrent", False)
                else infer_lock(runtime)
            )
            t_inf = time.monotonic_ns()
            ident = threading.get_ident()
            self._infer_since[ident] = t_inf / 1e9
            try:
                with guard:
                    if item.reset:
                        model.reset_state(item.stream or "")
                    outputs = model.infer(item.feeds, stream=item.stream or "")
            except ModelError as exc:
                n = self._count_error(model)
                if n in (1, 10, 100) or n % 1000 == 0:
                    log.warning("inference error #%d: %s", n, exc)
                return None
            finally:
                self._infer_since.pop(ident, None)
            t_post = time.monotonic_ns()
            payload = self._outcome(
                model, item, outputs, item.feeds,
                pre_ns=pre_ns, t_start=t_start, t_inf=t_inf, t_post=t_post,
            )  # fmt: skip
        finally:
            self._release(model)
        return None if payload is None else self._emit(item.lane, item.order, payload)

    def _outcome(
        self,
        model: LoadedModel,
        item: _Item,
        outputs: list[np.ndarray],
        feeds: dict[str, np.ndarray],
        *,
        pre_ns: int,
        t_start: int,
        t_inf: int,
        t_post: int,
    ) -> Any:
        """One frame's outputs -> (its result, whether it is an error, the timing ``_emit``
        records); None when its postprocessing fails (counted). Inference took ``t_inf`` to
        ``t_post``; the monitor and the sampler see the frame here, outside every lock."""
        data = item.frame.data
        size = (data.shape[1], data.shape[0]) if data.ndim >= 2 and data.dtype == np.uint8 else None
        try:
            output = model.postprocessor(outputs, geometry=item.geometry, source_size=size)
            if item.stream is not None and (roi := self._tallies[item.stream].stream.roi):
                output = _to_frame(output, roi)
        except Exception as exc:  # outputs this model's postprocessing cannot read
            n = self._count_error(model)
            if n in (1, 10, 100) or n % 1000 == 0:
                log.warning("postprocessing error #%d: %s", n, exc)
            return None
        if "error" in output:
            with self._cond:
                self._model_errors[id(model)] = self._model_errors.get(id(model), 0) + 1
        t_done = time.monotonic_ns()
        observer = self.observer
        if observer is not None:
            try:
                observer(feeds, output, outputs)
            except Exception:  # monitoring must never cost a frame
                log.exception("pipeline observer failed")
                self.observer = None
        if (sampler := self.sampler) is not None:
            try:
                sampler(item.whole or item.frame, output, model.identity, item.stream)
            except Exception:  # capture must never cost a frame
                log.exception("pipeline sampler failed")
                self.sampler = None
        if (shadow := self.shadow) is not None:
            try:
                shadow(item.frame, output, outputs, t_post - t_inf, model.identity, item.stream)
            except Exception:  # the shadow must never cost a frame
                log.exception("pipeline shadow hook failed")
                self.shadow = None
        t_ready = time.monotonic_ns()
        result = {
            "seq": 0,  # set in capture order by _emit
            **({} if item.stream is None else {"stream": item.stream, "stream_seq": 0}),
            "capture_ts": item.frame.capture_ts,
            "result_ts": time.time(),
            "frame": item.frame.index,
            "model": model.identity,
            "latency_ms": {
                "capture_to_result": round((t_done - item.frame.capture_ns) / 1e6, 4),
                "preprocess": round(pre_ns / 1e6, 4),
                "inference": round((t_post - t_inf) / 1e6, 4),
                "postprocess": round((t_done - t_post) / 1e6, 4),
            },
            "output": output,
        }
        timing = (t_start, t_inf, t_post, t_done, t_ready, pre_ns, item.frame.capture_ns)
        return result, "error" in output, timing

    def _process_batch(self, items: list[_Item]) -> Any:
        """Frames of several streams in one inference call (the model's batch dimension): one
        result each, emitted in order. Each result's ``inference`` latency is the call's time
        divided by the frames in it."""
        if not _batchable(self._pending or self._model):  # swapped to one that cannot batch
            for it in items:
                try:
                    if self._process(it) is _STOP:
                        return _STOP
                finally:
                    self._emit(it.lane, it.order, None)  # no-op when _process emitted it
            return None
        t_start = time.monotonic_ns()
        model = self._take_pending()
        if not _batchable(model):  # it changed just now: the next batch goes frame by frame
            self._release(model)
            return self._process_batch(items)
        payloads: list[Any] = []
        try:
            pre = []
            for it in items:
                pre_ns = it.pre_ns
                if it.model is not model:  # preprocessed for the old model: prepare it again
                    t0 = time.monotonic_ns()
                    it.feeds, it.geometry = model.prepare(it.frame.data)
                    pre_ns += time.monotonic_ns() - t0
                pre.append(pre_ns)
            # Frames fed at sizes of their own (text lines as wide as they are long: pad-right on
            # a model of dynamic width) go one call each: padded to another frame's width, a
            # recognizer of global attention or a BiLSTM would read them otherwise.
            shapes = {tuple(v.shape for v in it.feeds.values()) for it in items}
            calls = [items] if len(shapes) == 1 else [[it] for it in items]
            runtime = model.runtime
            t_inf = time.monotonic_ns()
            ident = threading.get_ident()
            self._infer_since[ident] = t_inf / 1e9
            each: list[tuple[list[np.ndarray], dict[str, np.ndarray]]] = []  # outputs, feeds
            try:
                for call in calls:
                    feeds = {k: np.concatenate([it.feeds[k] for it in call]) for k in call[0].feeds}
                    outputs = runtime.infer(feeds)  # batching is planned for onnxruntime only
                    each.extend(
                        (
                            [o[i : i + 1] for o in outputs],
                            {k: v[i : i + 1] for k, v in feeds.items()},
                        )
                        for i in range(len(call))
                    )
            except ModelError as exc:
                counts = [self._count_error(model) for _ in items]
                if counts[0] == 1 or counts[0] // 1000 != counts[-1] // 1000:
                    log.warning(
                        "inference error #%d (a batch of %d): %s", counts[-1], len(items), exc
                    )
                return None
            finally:
                self._infer_since.pop(ident, None)
            per_frame = (time.monotonic_ns() - t_inf) // len(items)
            for i, it in enumerate(items):
                t0 = time.monotonic_ns()  # the frame's share of the call, as if inferred alone
                payloads.append(
                    self._outcome(
                        model,
                        it,
                        *each[i],
                        pre_ns=pre[i],
                        t_start=t_start,
                        t_inf=t0 - per_frame,
                        t_post=t0,
                    )
                )
        finally:
            self._release(model)
        for it, payload in zip(items, payloads):  # in order: a frame without a result
            if self._emit(it.lane, it.order, payload) is _STOP:  # hands its turn on (None)
                return _STOP
        return None

    def _emit(self, lane: int, order: int, payload: Any) -> Any:
        """Write a result (or skip a frame that has none) in capture order in its lane (its
        stream: streams do not wait for each other). A result done before its turn is parked,
        and its worker goes on; the result before it writes it when it leaves. Returns _STOP
        when the loop should end. Called once with the payload, then once more (a no-op) from a
        ``finally``, so a failed frame still hands the turn on."""
        if payload is not None:
            self._writer.wait_room()  # a sink far behind slows us down, outside the lock
        cond = self._cond
        with cond:
            turns, parked = self._next_emit, self._parked[lane]
            if turns[lane] > order or order in parked:  # already written, skipped or parked
                return None
            # a full park waits for the turn, but not once the loop stops: the turn may never
            # come (max_frames reached by the result ahead, or its worker gone), and a result
            # parked beyond the limit is still written if it does
            while (
                turns[lane] < order and len(parked) >= self._park_limit and not self._stop.is_set()
            ):
                cond.wait(0.5)
            if turns[lane] < order:  # an earlier frame is still in inference
                parked[order] = payload  # None: a frame without a result, skipped in turn
                return None
            out = self._write_turn(lane, order, payload)
            while out is None and turns[lane] in parked:  # the results that waited on this one
                out = self._write_turn(lane, turns[lane], parked.pop(turns[lane]))
            return out

    def _write_turn(self, lane: int, order: int, payload: Any) -> Any:
        """The lane's turn ``order``: write its result, or skip it (None). Called with the
        lock held, in turn order."""
        self._next_emit[lane] = order + 1
        self._cond.notify_all()
        if payload is None:
            return None
        if self.max_frames is not None and self.results >= self.max_frames:
            self._stop.set()
            return _STOP
        stats = self.stats
        result, is_error, (t_start, t_inf, t_post, t_done, t_ready, pre_ns, capture_ns) = payload
        t_emit = time.monotonic_ns()
        if is_error:
            self.inference_errors += 1
        result["seq"] = self.seq
        tally = self._tallies.get(result.get("stream", "")) if self._tallies else None
        if tally is not None:
            result["stream_seq"] = tally.seq
            tally.seq += 1
            tally.results += 1
            tally.errors += is_error
        self._writer.submit(result)  # written in order by the sink thread, off this lock
        self.seq += 1
        self.results += 1
        t_end = time.monotonic_ns()
        for st in (stats,) if tally is None else (stats, tally.stats):
            st.capture_to_result.record(t_done - capture_ns)
            st.preprocess.record(pre_ns)
            st.inference.record(t_post - t_inf)
            st.postprocess.record(t_done - t_post)
        # Our own cost per frame: everything but inference and postprocessing, and not the
        # wait for this frame's turn (the other worker's inference, not overhead).
        stats.overhead.record((t_end - t_start) - (t_done - t_inf) - (t_emit - t_ready))
        self.last_result_mono = time.monotonic()
        if self.max_frames is not None and self.results >= self.max_frames:
            self._stop.set()
            return _STOP
        return None

    def _count_errors_from(self, old: LoadedModel, new: LoadedModel) -> None:
        """``new`` serves from now on: its failed frames count from 0, and only the models that
        can still have frames in flight keep a count. Called with ``self._cond`` held. The counts
        are keyed by ``id()``, which a model loaded after a closed one may get again: kept, a
        good update inherited the failures of the rolled-back one before it and failed its
        health window at once (tests/test_ota.py, staged rollout, 2026-12-07)."""
        self._model_errors = {id(old): self._model_errors.get(id(old), 0), id(new): 0}

    def _switch(self, new_model: LoadedModel) -> None:
        # called with self._cond held
        before, self.state = self.state, State.SWAPPING
        self._count_errors_from(self._model, new_model)
        self._model = new_model
        self._pending = None
        self._nicer_capture = not self._priority_held and wants_nicer_capture(new_model)
        if self._pending_plan_change:
            self.plan_changes += 1
        else:
            self.swaps += 1
            log.info("serving %s %s", new_model.name, new_model.version)
        # a swap does not bring a lost source back, start a camera, or undo a stop
        self.state = before
        self._swapped.set()

    # --- reporting ----------------------------------------------------------------------

    def take_window(self) -> dict[str, dict[str, float | int | None]]:
        """Per-stage latency since the last call (telemetry's interval), and start a new one."""
        with self._cond:
            window = self.stats.since(self._window_mark)
            self._window_mark = self.stats.mark()
        return window.summary()

    def take_stream_window(self, name: str) -> dict[str, dict[str, float | int | None]]:
        """One stream's per-stage latency since the last call for it, as :meth:`take_window`."""
        with self._cond:
            tally = self._tallies[name]
            window = tally.stats.since(tally.window_mark)
            tally.window_mark = tally.stats.mark()
        return window.summary()

    def stalled_s(self) -> float:
        """How long the loop has been stuck: the longer of the time since the capture loop last
        went round and the age of the oldest inference call still running (0 before start)."""
        now = time.monotonic()
        worst = now - self.heartbeat_mono if self.heartbeat_mono else 0.0
        for since in list(self._infer_since.values()):
            worst = max(worst, now - since)
        return worst

    def _source_dropped(self) -> int:
        if self._tallies:  # every stream's: its source's and its slot's
            counters = self._streams.counters() if self._streams is not None else {}
            return sum(
                int(getattr(getattr(t.stream.source, "stats", None), "dropped", 0) or 0)
                + (counters[n].dropped if n in counters else 0)
                for n, t in self._tallies.items()
            )
        return int(getattr(getattr(self.source, "stats", None), "dropped", 0) or 0)

    def _source_unreadable(self) -> int:
        """Inputs the sources skipped because they could not be decoded (a corrupt image)."""
        sources = [t.stream.source for t in self._tallies.values()] or [self.source]
        return sum(int(getattr(getattr(s, "stats", None), "unreadable", 0) or 0) for s in sources)

    def summary(self) -> dict[str, Any]:
        elapsed = max(time.monotonic() - self.started_mono, 1e-9) if self.started_mono else 0.0
        dropped = self._source_dropped()
        if self._dropped_at_stop is not None:
            dropped = min(dropped, self._dropped_at_stop)
        return {
            "state": self.state.value,
            "model": self._model.identity,
            "frames": self.frames,
            "results": self.results,
            "fps": round(self.results / elapsed, 3) if elapsed else 0.0,
            "elapsed_s": round(elapsed, 3),
            "dropped": dropped,
            "unreadable": self._source_unreadable(),
            "gated": self.gated,
            "inference_errors": self.inference_errors,
            "swaps": self.swaps,
            "plan_changes": self.plan_changes,
            "workers": self.workers,
            "batch": self.batch,
            "pin_capture": self._cores is not None,
            "next_seq": self.seq,
            "sink_errors": dict(self._writer.errors),
            "latency_ms": self.stats.summary(),
            **({"streams": self.stream_summary(elapsed)} if self._tallies else {}),
        }

    def stream_summary(self, elapsed: float | None = None) -> dict[str, dict[str, Any]]:
        """Per stream: state, frames, results, fps over ``elapsed`` (the run so far when
        None), drops (live streams: frames overwritten before they were taken), frames skipped
        for its fps cap, frames gated, errors, the next ``stream_seq``, and latency."""
        if elapsed is None:
            elapsed = time.monotonic() - self.started_mono if self.started_mono else 0.0
        counters = self._streams.counters() if self._streams is not None else {}
        status = self.stream_status()
        out: dict[str, dict[str, Any]] = {}
        with self._cond:
            for name, t in self._tallies.items():
                c = counters.get(name)
                src_stats = getattr(t.stream.source, "stats", None)
                out[name] = {
                    "state": status[name],
                    "uri": redact_uri(t.stream.source.uri),
                    "frames": t.frames,
                    "results": t.results,
                    "fps": round(t.results / elapsed, 3) if elapsed > 0 else 0.0,
                    "dropped": (c.dropped if c else 0) + int(getattr(src_stats, "dropped", 0)),
                    "skipped": c.skipped if c else 0,
                    "unreadable": int(getattr(src_stats, "unreadable", 0) or 0),
                    "gated": t.gated,
                    "errors": t.errors,
                    "reconnects": int(getattr(src_stats, "reconnects", 0)),
                    "last_error": (c.error if c else None)
                    or getattr(src_stats, "last_error", None),
                    "next_stream_seq": t.seq,
                    "latency_ms": t.stats.summary(),
                }
        return out
