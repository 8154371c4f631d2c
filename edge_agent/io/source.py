"""The agent's inputs, behind one protocol: cameras, network streams, video files, folders of
images, sensor streams, and a synthetic source (the designed test seam: a fake camera is a
``Source``, not a patched ``cv2``).

URIs (a contract; keep these spellings)::

    camera:0                         a camera by index                         live
    /dev/video0                      a camera by device path                   live
    rpicam:0                         a Pi camera through rpicam-vid            live
                                     (?width=W&height=H&fps=F&stride=S)
    picamera2:0                      a Pi camera through Picamera2             live
    rtsp://…  http(s)://…            a network stream                          live
    udp://HOST:PORT  tcp://HOST:PORT a network stream (MPEG-TS, H.264, MJPEG)  live
    file:PATH  or a plain PATH       a video file  (?loop=1 &live=1 &fps=F)    finite
    images:GLOB  or a directory      sorted image files  (?fps=F)              finite
    sensor:stdin                     sample lines on standard input            finite
    sensor:file:PATH                 a file being appended, tailed (?idle=S)   finite
    sensor:udp://HOST:PORT           datagrams of sample lines                 live
    wav:PATH?size=N&hop=N            a PCM WAV file, windowed                  finite
    synthetic:?width=640&height=480&fps=30&frames=100&pattern=noise|gradient|digits&live=1

Where each kind lives: this module is the ``Source`` base (threads, the one-slot buffer,
reconnection, pacing, statistics); ``opencv`` reads files, cameras and network streams,
``rpicam`` the Pi's camera modules (rpicam-vid, Picamera2), ``images`` folders of images,
``synthetic`` generated frames, ``sensors`` sample lines from
stdin or a tailed file, ``network`` UDP datagrams; ``uri`` turns a URI into one of them
(``open_source``). ``edge_agent.io`` exports the public names of all of them.

Sensor URIs also take ``?size=N&hop=N&channels=N`` (the ``WindowSpec``; ``hop`` defaults to
``size``). Query options override the keyword arguments of ``open_source``.

Two timing models:

- **finite** (``live = False``): files, images, stdin, tailed files, synthetic. ``read()`` works in
  the caller's thread and returns every frame in order. ``pace="native"`` sleeps to the source's
  frame rate, so a file can stand in for a camera without dropping frames. An error ends the
  stream (``status = "ended"``, ``last_error`` set, one warning logged); nothing is reconnected.
  An image file that cannot be decoded does not end an ``images:`` source: it is skipped with
  one warning naming it and counted in ``stats.unreadable``.
- **live** (``live = True``): cameras, streams, UDP sensors, ``synthetic:?live=1`` and
  ``file:PATH?loop=1&live=1``. A capture thread reads continuously and keeps only the newest frame
  in a one-slot buffer; a frame overwritten before ``read()`` took it counts in ``stats.dropped``.
  A lost source is reconnected with exponential backoff and jitter (``status = "degraded"``
  meanwhile, ``reconnects`` counted on success); nothing is raised to the reader but
  ``SourceTimeout``.
"""

from __future__ import annotations

import enum
import logging
import math
import random
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import cv2
import numpy as np

from edge_agent.common.backoff import DEFAULT_BACKOFF, BackoffPolicy
from edge_agent.common.urls import redact_uri
from edge_agent.errors import ConfigError, SourceError, first_line

logger = logging.getLogger(__name__)

PACE_MODES = ("none", "native")
CLOSE_TIMEOUT_S = 0.9  # close() waits this long for the capture thread, then lets it finish alone
POLL_S = 0.05  # how often an idle capture (a tail, a UDP socket) wakes up to check for close()
READ_CHUNK = 65536  # bytes per read of a byte stream (stdin, a tailed file)


class SourceTimeout(SourceError):
    """``read()`` found no frame newer than the last one within its timeout. For a live source
    this is normal while it is degraded: look at ``stats.status``."""


class EndOfStream(Exception):
    """Raised by ``Source._capture`` when a finite stream ends cleanly."""


@dataclass(frozen=True, eq=False)
class Frame:
    """One captured image or sensor window."""

    index: int  # this source's frame counter: 0, 1, 2, … as captured; a gap = dropped frames
    data: np.ndarray  # image: BGR uint8 HxWx3 (gray HxW); sensor: float32 [size, channels]
    capture_ts: float  # time.time() when captured (Unix epoch seconds)
    capture_ns: int  # time.monotonic_ns() when captured


@dataclass(frozen=True)
class SourceStats:
    """A snapshot of a source's counters."""

    frames: int = 0  # frames (windows) captured
    dropped: int = 0  # frames overwritten before read() took them (live sources only)
    reconnects: int = 0  # times a lost live source came back
    status: str = "ok"  # "ok" | "degraded" | "ended"
    last_error: str | None = None  # the last problem seen (kept after the source recovers)
    bad_lines: int = 0  # sensor lines skipped: unparsable or with the wrong channel count
    status_changes: int = 0  # how many times status changed
    unreadable: int = 0  # inputs passed over because they cannot be decoded (image files)


@dataclass(frozen=True)
class WindowSpec:
    """Sliding windows over a sensor stream: ``size`` samples of ``channels`` values, a new window
    every ``hop`` samples (``hop < size`` overlaps, ``hop > size`` skips samples)."""

    size: int
    hop: int
    channels: int

    def __post_init__(self) -> None:
        for key in ("size", "hop", "channels"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"window: {key} = {value!r}: must be an integer >= 1")


StatusCallback = Callable[[SourceStats], None]
_S = TypeVar("_S", bound="Source")


class _State(enum.Enum):
    UNOPENED = "unopened"
    OPEN = "open"
    CLOSED = "closed"


class Pacer:
    """Sleeps until the next frame is due at ``fps``. A late reader is not made to catch up with a
    burst: the schedule restarts from now."""

    def __init__(self, fps: float) -> None:
        self.fps = fps
        self._period_ns = round(1e9 / fps)
        self._due_ns: int | None = None

    def reset(self) -> None:
        self._due_ns = None

    def wait(self, stop: threading.Event, timeout: float | None, label: str) -> bool:
        """Wait for the next slot; False if ``stop`` was set meanwhile."""
        now = time.monotonic_ns()
        due = now if self._due_ns is None else self._due_ns
        if due > now:
            delay = (due - now) / 1e9
            if timeout is not None and delay > timeout:
                if stop.wait(max(timeout, 0.0)):
                    return False
                raise SourceTimeout(f"{label}: next frame is due in {delay:.3g} s (paced)")
            if stop.wait(delay):
                return False
            now = due
        self._due_ns = max(due + self._period_ns, now)
        return True


class Source(ABC):
    """One input. Create with ``open_source(uri)``, then ``open()`` / ``read()`` / ``close()``, or
    use it as a context manager. Subclasses implement ``_capture`` (and ``_connect`` /
    ``_disconnect``); this base class does the timing model, the one-slot buffer, reconnection,
    statistics and status callbacks.
    """

    uri: str  # as given (may hold credentials: messages use a redacted form)
    kind: str  # "image" | "sensor"
    live: bool  # latest-frame semantics, a capture thread, reconnection
    _connect_in_open = True  # False when connecting may block or must be retried (cameras)

    def __init__(
        self, uri: str, *, kind: str, live: bool, reconnect: BackoffPolicy = DEFAULT_BACKOFF
    ) -> None:
        self.uri = uri
        self.kind = kind
        self.live = live
        self._reconnect = reconnect
        self._label = redact_uri(uri)
        self._state = _State.UNOPENED
        self._cond = threading.Condition(threading.Lock())
        self._stop = threading.Event()
        self._read_lock = threading.Lock()  # a finite source's read() against close()
        self._thread: threading.Thread | None = None
        self._pacer: Pacer | None = None
        self._pending: Frame | None = None  # the one-slot buffer of a live source
        self._done = False
        self._index = 0
        self._frames = 0
        self._dropped = 0
        self._unreadable = 0
        self._reconnects = 0
        self._status = "ok"
        self._last_error: str | None = None
        self._status_changes = 0
        self._callbacks: list[StatusCallback] = []
        self._rng = random.Random()

    # -- the hooks a source implements ---------------------------------------------------------

    def _connect(self) -> None:  # noqa: B027 - optional hook
        """Acquire the device / file / socket; raise ``SourceError`` naming the uri."""

    @abstractmethod
    def _capture(self, timeout: float | None) -> np.ndarray | None:
        """The next frame's data; ``None`` when nothing arrived within ``timeout``. Raises
        ``EndOfStream`` at a clean end, ``SourceError`` / ``OSError`` when the source failed."""

    def _disconnect(self) -> None:  # noqa: B027 - optional hook
        """Release what ``_connect`` acquired; idempotent."""

    def _bad_line_count(self) -> int:
        return 0

    # -- the public protocol -------------------------------------------------------------------

    @property
    def connects_in_background(self) -> bool:
        """True when ``open()`` returns before the source is connected: a camera or a stream
        that connects (and reconnects) in its capture thread, so its first frame, or its first
        ``degraded``, says whether it is there."""
        return self.live and not self._connect_in_open

    def open(self) -> None:
        """Open the source (and start its capture thread if it is live). Raises ``SourceError``."""
        if self._state is not _State.UNOPENED:
            raise SourceError(f"{self._label}: a source can be opened only once; create a new one")
        if self._connect_in_open:
            self._connect()
        self._state = _State.OPEN
        if self.live:
            self._thread = threading.Thread(
                target=self._run, name=f"source {self._label}", daemon=True
            )
            self._thread.start()

    def read(self, timeout: float | None = None) -> Frame | None:
        """The next frame, or ``None`` when a finite source has ended (or the source was closed).

        A live source returns the newest frame captured since the last ``read()``, waiting up to
        ``timeout`` seconds (``None``: forever) for one, else raises ``SourceTimeout``. A finite
        source returns every frame in order; ``timeout`` bounds pacing and sensor waits."""
        if self._state is not _State.OPEN:
            if self._state is _State.CLOSED:
                return None
            raise SourceError(f"{self._label}: read() before open(); call open() or use `with`")
        if self.live:
            with self._cond:
                if not self._cond.wait_for(self._frame_or_done, timeout):
                    raise SourceTimeout(self._timeout_message(timeout))
                frame = self._pending
                self._pending = None
            return frame
        with self._read_lock:
            try:
                return self._read_finite(timeout)
            finally:
                if self._state is _State.CLOSED:  # closed by another thread meanwhile
                    self._disconnect()

    def _read_finite(self, timeout: float | None) -> Frame | None:
        if self._done:
            return None
        try:
            if self._pacer is not None and not self._pacer.wait(self._stop, timeout, self._label):
                return None
            data = self._capture(timeout)
        except EndOfStream:
            self._end(None)
            return None
        except SourceTimeout:
            raise
        except (SourceError, OSError, cv2.error) as exc:
            self._end(self._describe(exc))
            return None
        if data is None:
            raise SourceTimeout(self._timeout_message(timeout))
        frame = Frame(self._index, data, time.time(), time.monotonic_ns())
        self._index += 1
        self._frames += 1
        return frame

    def close(self) -> None:
        """Stop the capture thread (waits at most about a second) and release the source.
        Idempotent; a reader blocked in ``read()`` returns ``None``."""
        if self._state is _State.CLOSED:
            return
        was_open = self._state is _State.OPEN
        self._state = _State.CLOSED
        self._stop.set()
        with self._cond:
            self._done = True
            self._cond.notify_all()
        thread = self._thread
        if thread is not None:
            thread.join(CLOSE_TIMEOUT_S)
            if thread.is_alive():
                logger.warning(
                    "%s: the capture thread is still in a device call; it exits when that returns",
                    self._label,
                )
        elif was_open and self._read_lock.acquire(timeout=CLOSE_TIMEOUT_S):
            try:  # not under a read() in another thread: that one releases when it returns
                self._disconnect()
            finally:
                self._read_lock.release()
        self._set_status("ended", None)

    @property
    def stats(self) -> SourceStats:
        with self._cond:
            return SourceStats(
                frames=self._frames,
                dropped=self._dropped,
                reconnects=self._reconnects,
                status=self._status,
                last_error=self._last_error,
                bad_lines=self._bad_line_count(),
                status_changes=self._status_changes,
                unreadable=self._unreadable,
            )

    def on_status(self, callback: StatusCallback) -> None:
        """Call ``callback(stats)`` on every status change ("ok" / "degraded" / "ended"). It runs
        in the capture thread (or the reader's, for finite sources): keep it short."""
        self._callbacks.append(callback)

    def __enter__(self: _S) -> _S:
        if self._state is _State.UNOPENED:
            self.open()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self._label} {self._state.value} {self._status}>"

    # -- machinery -----------------------------------------------------------------------------

    def _frame_or_done(self) -> bool:
        return self._pending is not None or self._done

    def _timeout_message(self, timeout: float | None) -> str:
        why = f" ({self._status}: {self._last_error})" if self._status != "ok" else ""
        return f"{self._label}: no new frame within {timeout:g} s{why}"

    def _describe(self, exc: BaseException) -> str:
        if isinstance(exc, SourceError):
            return str(exc)
        return f"{self._label}: {first_line(exc)}"

    def _set_status(self, status: str, error: str | None) -> None:
        with self._cond:
            if self._stop.is_set() and status != "ended":
                return  # closing: the capture thread may still report, but we are done
            if error is not None:
                self._last_error = error
            if status == self._status:
                return
            self._status = status
            self._status_changes += 1
        if status == "degraded":
            logger.warning("%s: lost: %s; reconnecting", self._label, error)
        elif status == "ok":
            logger.info("%s: restored", self._label)
        snapshot = self.stats
        for callback in list(self._callbacks):
            try:
                callback(snapshot)
            except Exception:
                logger.exception("%s: status callback failed", self._label)

    def _skip(self, error: str) -> None:
        """One input of a finite source passed over (a file that cannot be decoded): counted in
        ``stats.unreadable``, kept as ``last_error``, said once in the log; reading goes on."""
        with self._cond:
            self._unreadable += 1
            self._last_error = error
        logger.warning("%s", error)

    def _end(self, error: str | None) -> None:
        with self._cond:
            self._done = True
            self._cond.notify_all()
        if not self.live:
            self._disconnect()
        if error is not None and not self._stop.is_set():  # an early end is said, once
            logger.warning("%s; the source ended there", error)
        self._set_status("ended", error)

    def _publish(self, data: np.ndarray) -> None:
        frame = Frame(self._index, data, time.time(), time.monotonic_ns())
        self._index += 1
        with self._cond:
            if self._pending is not None:
                self._dropped += 1
            self._pending = frame
            self._frames += 1
            self._cond.notify()

    def _run(self) -> None:
        """The capture thread of a live source: capture → publish, reconnecting when lost."""
        stop = self._stop
        pacer = self._pacer
        connected = self._connect_in_open
        lost = False
        attempt = 0
        try:
            while not stop.is_set():
                if not connected:
                    if lost:
                        if stop.wait(self._reconnect.delay(attempt, self._rng)):
                            break
                        attempt += 1
                    try:
                        self._connect()
                    except Exception as exc:  # never crash: report and retry
                        lost = True
                        self._set_status("degraded", self._describe(exc))
                        continue
                    connected = True
                    if pacer is not None:
                        pacer.reset()
                    if lost:
                        lost, attempt = False, 0
                        with self._cond:
                            self._reconnects += 1
                        self._set_status("ok", None)
                if pacer is not None and not pacer.wait(stop, None, self._label):
                    break
                try:
                    data = self._capture(POLL_S)
                except EndOfStream:
                    self._end(None)
                    break
                except Exception as exc:  # never crash: report and reconnect
                    self._disconnect()
                    connected, lost = False, True
                    with self._cond:  # a frame from before the loss is stale once it is back
                        if self._pending is not None:
                            self._pending = None
                            self._dropped += 1
                    self._set_status("degraded", self._describe(exc))
                    continue
                if data is not None:
                    self._publish(data)
        finally:
            self._disconnect()
            with self._cond:
                self._done = True
                self._cond.notify_all()


def check_pace(label: str, pace: str) -> None:
    if pace not in PACE_MODES:
        raise SourceError(f"{label}: pace = {pace!r}: expected one of {PACE_MODES}")


def check_fps(label: str, key: str, value: float | None) -> None:
    if value is not None and not (value > 0 and math.isfinite(value)):
        raise SourceError(f"{label}: {key} = {value}: must be > 0")


__all__ = [
    "CLOSE_TIMEOUT_S",
    "PACE_MODES",
    "POLL_S",
    "READ_CHUNK",
    "EndOfStream",
    "Frame",
    "Pacer",
    "Source",
    "SourceStats",
    "SourceTimeout",
    "StatusCallback",
    "WindowSpec",
    "check_fps",
    "check_pace",
]
