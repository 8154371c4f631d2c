"""Which frames become samples for the next model: the ``[capture]`` policies, per-class quotas
and rate limits, decided in the inference worker after postprocessing, cheaply and without
blocking; the chosen frames are encoded (JPEG, or ``.npy`` for a sensor or audio window) and
stored (:class:`~edge_agent.fleet.samples.SampleStore`) by a thread of their own.

::

    worker: Sampler(frame, output, model, stream)   policies → quota → rate limits → hand-off
                      │ bounded queue (full: the sample is dropped and counted, never waited for)
                      ▼
    edge-capture thread: encode → SampleStore.add (bounded, oldest first)

Policies (all off by default; a frame may match several, all are recorded as its ``reasons``):
``low_confidence`` (the top score, or a detection's, below T), ``near_threshold`` (within ±d of
T), ``drift`` (while telemetry's monitor reports drift), ``random`` (1 frame in N) and
``disagreement``: a shadow model that disagrees with the serving one calls
:meth:`Sampler.disagreement` (the hook; the shadow itself is not part of this module).

Quotas and limits: at most ``class_quota`` samples per predicted class in 24 hours, and
``max_per_minute`` / ``max_per_hour`` / ``max_per_day`` in sliding windows. They are counted
when a frame is chosen and kept in ``<state_dir>/capture.json`` with the on/off switch, so a
restart neither resets the day's limit nor turns capture back on after ``edgectl capture --off``.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import queue
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.common.durable import atomic_write
from edge_agent.fleet import protocol
from edge_agent.fleet.samples import SampleStore

log = logging.getLogger(__name__)

_WINDOWS = (("max_per_minute", 60.0), ("max_per_hour", 3600.0), ("max_per_day", 86400.0))
_DAY = 86400.0
_STOP = object()


@dataclass
class CaptureStats:
    matched: int = 0
    """Frames a policy chose."""
    captured: int = 0
    """Samples stored."""
    rate_limited: int = 0
    """Chosen frames over a per-minute, per-hour or per-day limit."""
    quota: int = 0
    """Chosen frames over their class's quota."""
    dropped: int = 0
    """Chosen frames dropped because the encoder was behind (the queue was full)."""
    too_large: int = 0
    """Samples larger than the store's whole bound."""
    reasons: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(protocol.SAMPLE_REASONS, 0)
    )


def _scores(output: Mapping[str, Any]) -> list[float]:
    """The scores the thresholds look at: a classifier's top score, every detection's score,
    a text's score."""
    kind = output.get("kind")
    if kind in ("classification", "text"):
        score = output.get("score")
        return [float(score)] if isinstance(score, (int, float)) else []
    if kind == "detection":
        return [float(d["score"]) for d in output.get("detections") or () if "score" in d]
    return []


def _predicted_class(output: Mapping[str, Any]) -> str | None:
    kind = output.get("kind")
    if kind == "classification":
        value = output.get("class")
        return None if value is None else str(value)
    if kind == "detection":
        dets = output.get("detections") or []
        if dets:
            return str(max(dets, key=lambda d: d.get("score", 0.0)).get("class"))
    return None


def encode_sample(data: np.ndarray, *, jpeg_quality: int) -> tuple[str, bytes, list[int]]:
    """``(kind, bytes, shape)``: an image (uint8 HxW or HxWx3, BGR) as JPEG, anything else (a
    sensor or audio window) as a numpy ``.npy`` (no pickle)."""
    if data.dtype == np.uint8 and data.ndim in (2, 3):
        import cv2

        ok, buf = cv2.imencode(".jpg", data, [cv2.IMWRITE_JPEG_QUALITY, int(jpeg_quality)])
        if not ok:
            raise ValueError(f"cv2.imencode failed for a {data.shape} frame")
        return "jpeg", buf.tobytes(), list(data.shape)
    out = io.BytesIO()
    np.save(out, np.ascontiguousarray(data), allow_pickle=False)
    return "npy", out.getvalue(), list(data.shape)


class Sampler:
    """The pipeline's ``sampler``: ``sampler(frame, output, model, stream)`` from the inference
    worker (see the module docstring). ``settings`` is the ``[capture]`` section."""

    def __init__(
        self,
        settings: Any,
        *,
        store: SampleStore,
        device: str,
        state_path: Path,
        drifting: Callable[[], bool] = lambda: False,
        queue_size: int = 4,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.store = store
        self.device = protocol.check_name(device)
        self.state_path = Path(state_path)
        self._drifting = drifting
        self._clock = clock
        self.chunk_size = int(settings.chunk_kb) * 1024
        self.stats = CaptureStats()
        self._lock = threading.Lock()
        self._count = 0  # frames seen, for random 1/N
        self._recent: deque[float] = deque()  # when samples were chosen (24 h)
        self._classes: dict[str, deque[float]] = {}
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=queue_size)
        self._switch = threading.Lock()  # capture --off vs a sample being stored
        self._thread = threading.Thread(target=self._run, name="edge-capture", daemon=True)
        self._on = True
        self._load_state()

    # --- state across restarts ----------------------------------------------------------------

    def _load_state(self) -> None:
        try:
            data = json.loads(self.state_path.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            log.warning("capture: %s unreadable (%s); starting afresh", self.state_path, exc)
            return
        self._on = bool(data.get("enabled", True))
        now = self._clock()
        self._recent = deque(t for t in data.get("recent", []) if now - float(t) < _DAY)
        for cls, times in (data.get("classes") or {}).items():
            kept = deque(t for t in times if now - float(t) < _DAY)
            if kept:
                self._classes[str(cls)] = kept

    def _save_state(self) -> None:
        with self._lock:
            data = {
                "enabled": self._on,
                "recent": list(self._recent),
                "classes": {k: list(v) for k, v in self._classes.items()},
            }
        try:
            atomic_write(self.state_path, json.dumps(data).encode())
        except OSError as exc:
            log.warning("capture: cannot write %s: %s", self.state_path, exc.strerror)

    # --- control ------------------------------------------------------------------------------

    @property
    def enabled(self) -> bool:
        """A policy is on and no operator switched capture off."""
        return self._on and bool(self.settings.enabled)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        if not self._thread.is_alive():
            return
        with contextlib.suppress(queue.Full):
            self._queue.put(_STOP, timeout=timeout)
        self._thread.join(timeout)

    def set_enabled(self, on: bool, *, purge: bool = False) -> dict[str, Any]:
        """``edgectl capture --on|--off [--purge]``: takes effect at once (the next frame), and
        frames chosen but not yet stored are discarded (one being encoded too); kept across
        restarts."""
        with self._switch:
            self._on = bool(on)
        discarded = 0
        if not on:
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    self._queue.put_nowait(_STOP)
                    break
                discarded += 1
        purged = self.store.purge() if purge else 0
        self._save_state()
        log.info(
            "capture: %s%s", "on" if on else "off", f", {purged} samples purged" if purge else ""
        )
        return {
            "enabled": self.enabled,
            "configured": bool(self.settings.enabled),
            "discarded": discarded,
            "purged": purged,
            "waiting": len(self.store),
        }

    # --- the worker's hooks -------------------------------------------------------------------

    def __call__(
        self, frame: Any, output: Mapping[str, Any], model: Mapping[str, str] | None,
        stream: str | None,
    ) -> None:  # fmt: skip
        """After postprocessing, in the inference worker: cheap, never blocks."""
        if not self._on:
            return
        s = self.settings
        if "error" in output:
            return
        reasons = []
        if s.low_confidence or s.near_threshold:
            scores = _scores(output)
            if s.low_confidence and any(x < s.low_confidence for x in scores):
                reasons.append("low_confidence")
            if s.near_threshold and any(abs(x - s.near_threshold) <= s.near_margin for x in scores):
                reasons.append("near_threshold")
        if s.drift and self._drifting():
            reasons.append("drift")
        if s.random_every:
            with self._lock:
                self._count += 1
                if self._count % s.random_every == 0:
                    reasons.append("random")
        if reasons:
            self._offer(frame, output, model, stream, reasons, None)

    def disagreement(
        self,
        *,
        frame: Any,
        output: Mapping[str, Any],
        shadow_output: Mapping[str, Any],
        model: Mapping[str, str] | None,
        stream: str | None = None,
    ) -> bool:
        """The shadow model's hook: it disagreed with the serving model on ``frame``. Captured
        (with both outputs) when ``[capture] disagreement`` is on, within the quotas and rate
        limits; True when the frame was taken."""
        if not self._on or not self.settings.disagreement:
            return False
        extra = {"shadow_output": dict(shadow_output)}
        return self._offer(frame, output, model, stream, ["disagreement"], extra)

    def _offer(
        self,
        frame: Any,
        output: Mapping[str, Any],
        model: Mapping[str, str] | None,
        stream: str | None,
        reasons: list[str],
        extra: dict[str, Any] | None,
    ) -> bool:
        s = self.settings
        now = self._clock()
        cls = _predicted_class(output) if s.class_quota else None
        with self._lock:
            self.stats.matched += 1
            recent = self._recent
            while recent and now - recent[0] >= _DAY:
                recent.popleft()
            for key, span in _WINDOWS:
                limit = getattr(s, key)
                if limit and self._count_since(recent, now - span) >= limit:
                    self.stats.rate_limited += 1
                    return False
            if cls is not None:
                times = self._classes.setdefault(cls, deque())
                while times and now - times[0] >= _DAY:
                    times.popleft()
                if len(times) >= s.class_quota:
                    self.stats.quota += 1
                    return False
            if self._queue.full():
                self.stats.dropped += 1
                return False
            recent.append(now)
            if cls is not None:
                self._classes[cls].append(now)
            for r in reasons:
                self.stats.reasons[r] += 1
        data = np.array(frame.data, copy=True)  # a chosen frame only: at most a few a second
        item = (data, frame.capture_ts, getattr(frame, "index", None), dict(output), model,
                stream, reasons, extra)  # fmt: skip
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            with self._lock:
                self.stats.dropped += 1
            return False
        return True

    @staticmethod
    def _count_since(times: deque[float], since: float) -> int:
        n = 0
        for t in reversed(times):  # newest first: stops at the window's start
            if t < since:
                break
            n += 1
        return n

    # --- the encoding thread ------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            try:
                self._store(*item)
            except Exception:  # capture must never take the agent down
                log.exception("capture: storing a sample failed")

    def _store(
        self,
        data: np.ndarray,
        capture_ts: float,
        index: int | None,
        output: dict[str, Any],
        model: Mapping[str, str] | None,
        stream: str | None,
        reasons: list[str],
        extra: dict[str, Any] | None,
    ) -> None:
        if not self._on:  # switched off after the frame was chosen
            return
        kind, blob, shape = encode_sample(data, jpeg_quality=self.settings.jpeg_quality)
        sample_id = f"{int(capture_ts * 1e6):016d}-{secrets.token_hex(3)}"
        meta = protocol.sample_meta_payload(
            device=self.device, sample_id=sample_id, kind=kind, reasons=reasons,
            capture_ts=capture_ts, stream=stream, frame=index, model=model, output=output,
            data=blob, chunk_size=self.chunk_size, shape=shape, extra=extra,
        )  # fmt: skip
        with self._switch:  # not after an --off --purge that came while it was encoded
            if not self._on:
                return
            if not self.store.add(meta, blob):
                self.stats.too_large += 1
                return
        self.stats.captured += 1
        self._save_state()

    def telemetry(self) -> dict[str, Any]:
        """Telemetry's ``capture`` section."""
        from edge_agent.fleet.samples import sample_stats

        s = self.stats
        return {
            "enabled": self.enabled,
            "matched": s.matched,
            "captured": s.captured,
            "rate_limited": s.rate_limited,
            "quota": s.quota,
            "dropped": s.dropped,
            "reasons": {k: v for k, v in s.reasons.items() if v},
            **sample_stats(self.store),
        }


__all__ = ["CaptureStats", "Sampler", "encode_sample"]
