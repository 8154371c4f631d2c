"""The agent's inputs, behind one protocol: cameras, network streams, video files, folders of
images, sensor streams, and a synthetic source (the designed test seam: a fake camera is a
``Source``, not a patched ``cv2``).

URIs (a contract; keep these spellings)::

    camera:0                         a camera by index                         live
    /dev/video0                      a camera by device path                   live
    rtsp://…  http://…  https://…    a network stream                          live
    file:PATH  or a plain PATH       a video file  (?loop=1 &live=1 &fps=F)    finite
    images:GLOB  or a directory      sorted image files  (?fps=F)              finite
    sensor:stdin                     sample lines on standard input            finite
    sensor:file:PATH                 a file being appended, tailed (?idle=S)   finite
    sensor:udp://HOST:PORT           datagrams of sample lines                 live
    synthetic:?width=640&height=480&fps=30&frames=100&pattern=noise|gradient|digits&live=1

Sensor URIs also take ``?size=N&hop=N&channels=N`` (the ``WindowSpec``; ``hop`` defaults to
``size``). Query options override the keyword arguments of ``open_source``.

Two timing models:

- **finite** (``live = False``): files, images, stdin, tailed files, synthetic. ``read()`` works in
  the caller's thread and returns every frame in order. ``pace="native"`` sleeps to the source's
  frame rate, so a file can stand in for a camera without dropping frames. An error ends the
  stream (``status = "ended"``, ``last_error`` set); nothing is reconnected.
- **live** (``live = True``): cameras, streams, UDP sensors, ``synthetic:?live=1`` and
  ``file:PATH?loop=1&live=1``. A capture thread reads continuously and keeps only the newest frame
  in a one-slot buffer; a frame overwritten before ``read()`` took it counts in ``stats.dropped``.
  A lost source is reconnected with exponential backoff and jitter (``status = "degraded"``
  meanwhile, ``reconnects`` counted on success); nothing is raised to the reader but
  ``SourceTimeout``.
"""

from __future__ import annotations

import enum
import glob
import json
import logging
import math
import os
import random
import re
import select
import socket
import sys
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlsplit

import cv2
import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from edge_agent.errors import ConfigError, SourceError, first_line

logger = logging.getLogger(__name__)

PACE_MODES = ("none", "native")
PATTERNS = ("noise", "gradient", "digits")
IMAGE_EXTENSIONS = frozenset(
    {".bmp", ".jpeg", ".jpg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp"}
)
DEFAULT_IMAGE_FPS = 10.0
DEFAULT_SYNTHETIC_FPS = 30.0
CLOSE_TIMEOUT_S = 0.9  # close() waits this long for the capture thread, then lets it finish alone
STREAM_TIMEOUT_MS = 5000  # open/read timeout of a network stream, so a dead server cannot hang us
STREAM_SCHEMES = ("rtsp://", "rtsps://", "http://", "https://")
_POLL_S = 0.05  # how often an idle tail / UDP socket wakes up to check for close()
_CHUNK = 65536

_USAGE = (
    "use camera:N, /dev/videoN, rtsp://…, http(s)://…, file:PATH, images:GLOB, sensor:stdin, "
    "sensor:file:PATH, sensor:udp://HOST:PORT or synthetic:?…"
)


class SourceTimeout(SourceError):
    """``read()`` found no frame newer than the last one within its timeout. For a live source
    this is normal while it is degraded: look at ``stats.status``."""


class _EndOfStream(Exception):
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


@dataclass(frozen=True)
class BackoffPolicy:
    """Delays between reconnection attempts: ``initial * factor**attempt``, capped at ``maximum``,
    then spread by ± ``jitter`` (a fraction) so that many devices do not retry in step."""

    initial: float = 0.5
    maximum: float = 30.0
    factor: float = 2.0
    jitter: float = 0.2

    def __post_init__(self) -> None:
        if not self.initial > 0:
            raise ConfigError(f"reconnect: initial = {self.initial}: must be > 0")
        if not self.maximum >= self.initial:
            raise ConfigError(
                f"reconnect: maximum = {self.maximum}: must be >= initial ({self.initial})"
            )
        if not self.factor >= 1:
            raise ConfigError(f"reconnect: factor = {self.factor}: must be >= 1")
        if not 0 <= self.jitter < 1:
            raise ConfigError(f"reconnect: jitter = {self.jitter}: must be in [0, 1)")

    def delay(self, attempt: int, rng: random.Random) -> float:
        """Seconds to wait before reconnection attempt ``attempt`` (0, 1, 2, …)."""
        growth = attempt * math.log(self.factor)
        if growth >= math.log(self.maximum / self.initial):
            base = self.maximum
        else:
            base = self.initial * self.factor**attempt  # cannot overflow here
        return base * (1.0 + self.jitter * (2.0 * rng.random() - 1.0))


DEFAULT_BACKOFF = BackoffPolicy()


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


class _Pacer:
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
        self._label = _redact(uri)
        self._state = _State.UNOPENED
        self._cond = threading.Condition(threading.Lock())
        self._stop = threading.Event()
        self._read_lock = threading.Lock()  # a finite source's read() against close()
        self._thread: threading.Thread | None = None
        self._pacer: _Pacer | None = None
        self._pending: Frame | None = None  # the one-slot buffer of a live source
        self._done = False
        self._index = 0
        self._frames = 0
        self._dropped = 0
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
        ``_EndOfStream`` at a clean end, ``SourceError`` / ``OSError`` when the source failed."""

    def _disconnect(self) -> None:  # noqa: B027 - optional hook
        """Release what ``_connect`` acquired; idempotent."""

    def _bad_line_count(self) -> int:
        return 0

    # -- the public protocol -------------------------------------------------------------------

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
        except _EndOfStream:
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

    def _end(self, error: str | None) -> None:
        with self._cond:
            self._done = True
            self._cond.notify_all()
        if not self.live:
            self._disconnect()
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
                    data = self._capture(_POLL_S)
                except _EndOfStream:
                    self._end(None)
                    break
                except Exception as exc:  # never crash: report and reconnect
                    self._disconnect()
                    connected, lost = False, True
                    self._set_status("degraded", self._describe(exc))
                    continue
                if data is not None:
                    self._publish(data)
        finally:
            self._disconnect()
            with self._cond:
                self._done = True
                self._cond.notify_all()


# -- OpenCV sources ------------------------------------------------------------------------------


def _open_capture(target: int | str, api: int, params: list[int], label: str, what: str) -> Any:
    try:
        cap = cv2.VideoCapture(target, api, params)
    except cv2.error as exc:
        raise SourceError(f"{label}: {what}: {first_line(exc)}") from exc
    if not cap.isOpened():
        cap.release()
        raise SourceError(f"{label}: {what}")
    return cap


class _CvCaptureSource(Source):
    """A source read through an OpenCV VideoCapture held in ``_cap``; releases it on
    disconnect."""

    _cap: Any = None

    def _disconnect(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None


class VideoFileSource(_CvCaptureSource):
    """A video file: finite, every frame in order. ``loop`` starts again at the end (re-opening
    the file, so a file that vanished is noticed); ``live`` runs it like a camera: a capture thread
    paced at the file's frame rate, latest-frame semantics, reconnection when the file is gone."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        uri: str | None = None,
        loop: bool = False,
        live: bool = False,
        pace: str = "none",
        fps: float | None = None,
        reconnect: BackoffPolicy = DEFAULT_BACKOFF,
    ) -> None:
        super().__init__(uri or f"file:{path}", kind="image", live=live, reconnect=reconnect)
        _check_pace(self._label, pace)
        _check_fps(self._label, "fps", fps)
        self.path = Path(path)
        self.loop = loop
        self._paced = live or pace == "native"
        self._fps = fps
        self._count = 0  # frames in the file as the container reports it (0: unknown)
        self._since_open = 0

    def _connect(self) -> None:
        if not self.path.is_file():
            raise SourceError(
                f"{self._label}: no such file {self.path}; check the path "
                "(a camera is camera:N, a folder of images is images:DIR)"
            )
        cap = _open_capture(
            str(self.path),
            cv2.CAP_ANY,
            [],
            self._label,
            f"cannot decode {self.path} (not a video, or corrupt); check or re-encode the file",
        )
        if self._paced and self._pacer is None:
            fps = self._fps or cap.get(cv2.CAP_PROP_FPS)
            if not (fps and fps > 0 and math.isfinite(fps)):
                cap.release()
                raise SourceError(f"{self._label}: the file reports no frame rate; pass fps=N")
            self._pacer = _Pacer(float(fps))
        count = cap.get(cv2.CAP_PROP_FRAME_COUNT)
        self._count = int(count) if count and math.isfinite(count) and count > 0 else 0
        self._cap = cap
        self._since_open = 0

    def _capture(self, timeout: float | None) -> np.ndarray | None:
        ok, image = self._cap.read()
        if ok:
            self._since_open += 1
            return image
        if self._since_open == 0:
            raise SourceError(f"{self._label}: no frame could be decoded from {self.path}")
        if not self.loop:
            if self._since_open < self._count - 1:
                raise SourceError(
                    f"{self._label}: decoding stopped after {self._since_open} of {self._count} "
                    "frames (file truncated or corrupt)"
                )
            raise _EndOfStream
        self._disconnect()
        self._connect()  # raises SourceError when the file is gone
        ok, image = self._cap.read()
        if not ok:
            raise SourceError(f"{self._label}: no frame could be decoded from {self.path}")
        self._since_open = 1
        return image


class CaptureSource(_CvCaptureSource):
    """A camera (by index or device path) or a network stream (RTSP, HTTP): live. Opening never
    fails for want of the device: it reports "degraded" and keeps trying."""

    _connect_in_open = False

    def __init__(
        self,
        target: int | str,
        *,
        uri: str | None = None,
        fps: float | None = None,
        reconnect: BackoffPolicy = DEFAULT_BACKOFF,
    ) -> None:
        default_uri = f"camera:{target}" if isinstance(target, int) else target
        super().__init__(uri or default_uri, kind="image", live=True, reconnect=reconnect)
        _check_fps(self._label, "fps", fps)
        self.target = target
        self._fps = fps

    def _connect(self) -> None:
        target = self.target
        if isinstance(target, str) and target.lower().startswith(STREAM_SCHEMES):
            params = [
                cv2.CAP_PROP_OPEN_TIMEOUT_MSEC,
                STREAM_TIMEOUT_MS,
                cv2.CAP_PROP_READ_TIMEOUT_MSEC,
                STREAM_TIMEOUT_MS,
            ]
            what = "cannot connect to the stream; check the address and that the camera is up"
            self._cap = _open_capture(target, cv2.CAP_FFMPEG, params, self._label, what)
            return
        if isinstance(target, str) and not os.path.exists(target):
            raise SourceError(f"{self._label}: no such device; is the camera plugged in?")
        what = "cannot open the camera (missing or busy); check `v4l2-ctl --list-devices`"
        cap = _open_capture(target, cv2.CAP_ANY, [], self._label, what)
        cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)  # the newest frame, not one queued in the driver
        if self._fps:
            cap.set(cv2.CAP_PROP_FPS, self._fps)
        self._cap = cap

    def _capture(self, timeout: float | None) -> np.ndarray | None:
        ok, image = self._cap.read()
        if not ok:
            raise SourceError(f"{self._label}: no frame (camera unplugged or stream dropped)")
        return image


class ImageFilesSource(Source):
    """Image files, sorted by name: a directory (its image files) or a glob pattern. Finite."""

    def __init__(
        self,
        pattern: str | os.PathLike[str],
        *,
        uri: str | None = None,
        pace: str = "none",
        fps: float | None = None,
    ) -> None:
        super().__init__(uri or f"images:{pattern}", kind="image", live=False)
        _check_pace(self._label, pace)
        _check_fps(self._label, "fps", fps)
        self.pattern = str(pattern)
        self._fps = fps or DEFAULT_IMAGE_FPS
        self._paced = pace == "native"
        self._files: list[str] = []
        self._next = 0

    def _connect(self) -> None:
        root = Path(self.pattern)
        if root.is_dir():
            files = sorted(str(p) for p in root.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        else:
            files = sorted(glob.glob(self.pattern, recursive=True))
        files = [f for f in files if os.path.isfile(f)]
        if not files:
            raise SourceError(
                f"{self._label}: no image files there; check the folder or the glob pattern"
            )
        self._files = files
        self._next = 0
        if self._paced:
            self._pacer = _Pacer(self._fps)

    def _capture(self, timeout: float | None) -> np.ndarray | None:
        if self._next >= len(self._files):
            raise _EndOfStream
        path = self._files[self._next]
        self._next += 1
        image = cv2.imread(path, cv2.IMREAD_COLOR)
        if image is None:
            raise SourceError(f"{self._label}: cannot read {path} (vanished or corrupt)")
        return image


class SyntheticSource(Source):
    """Generated frames, the test seam and the demo input. Finite when ``frames`` is given; with
    ``live`` a capture thread produces them at ``fps`` (latest-frame semantics), else they come
    as fast as they are read (or at ``fps`` with ``pace="native"``). The ``digits`` pattern draws
    the frame index."""

    def __init__(
        self,
        *,
        uri: str = "synthetic:",
        width: int = 640,
        height: int = 480,
        fps: float = DEFAULT_SYNTHETIC_FPS,
        frames: int | None = None,
        pattern: str = "gradient",
        live: bool = False,
        pace: str = "none",
        seed: int = 0,
    ) -> None:
        super().__init__(uri, kind="image", live=live)
        _check_pace(self._label, pace)
        _check_fps(self._label, "fps", fps)
        for key, value in (("width", width), ("height", height)):
            if value < 1:
                raise SourceError(f"{self._label}: {key} = {value}: must be >= 1")
        if frames is not None and frames < 0:
            raise SourceError(f"{self._label}: frames = {frames}: must be >= 0")
        if pattern not in PATTERNS:
            raise SourceError(f"{self._label}: pattern = {pattern!r}: expected one of {PATTERNS}")
        self.width, self.height, self.fps, self.frames = width, height, fps, frames
        self.pattern = pattern
        self._made = 0
        self._np_rng = np.random.default_rng(seed)
        if live or pace == "native":
            self._pacer = _Pacer(fps)
        ramp = np.linspace(0, 255, width, dtype=np.float32).astype(np.uint8)
        self._base = np.repeat(np.broadcast_to(ramp[None, :, None], (height, width, 1)), 3, 2)
        self._blank = np.zeros((height, width, 3), np.uint8)
        self._text_scale = max(height / 60.0, 0.3)
        self._make: Callable[[int], np.ndarray] = getattr(self, f"_{pattern}")

    def _capture(self, timeout: float | None) -> np.ndarray | None:
        if self.frames is not None and self._made >= self.frames:
            raise _EndOfStream
        i = self._made
        self._made += 1
        return self._make(i)

    def _noise(self, i: int) -> np.ndarray:
        return self._np_rng.integers(0, 256, self._blank.shape, dtype=np.uint8)

    def _gradient(self, i: int) -> np.ndarray:
        return np.roll(self._base, i % self.width, axis=1)

    def _digits(self, i: int) -> np.ndarray:
        image = self._blank.copy()
        scale = self._text_scale
        y = (self.height + int(22 * scale)) // 2
        cv2.putText(image, str(i), (4, y), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 2)
        return image


# -- sensor sources ------------------------------------------------------------------------------


class _LineWindows:
    """Sample lines → float32 windows ``[size, channels]``.

    A line is a JSON list of numbers, a JSON object of numbers (the first object fixes the key
    order), or comma-separated numbers (a first line of names is a header and is skipped). Lines
    are parsed one by one into a preallocated buffer; the windows are cut with numpy
    (``sliding_window_view``) once per batch of lines, never sample by sample.
    """

    def __init__(self, window: WindowSpec) -> None:
        self.size, self.hop, self.channels = window.size, window.hop, window.channels
        self._buf = np.empty(
            (max(2 * (window.size + window.hop), 1024), window.channels), np.float32
        )
        self._n = 0  # samples in the buffer
        self._start = 0  # buffer position of the next window's first sample (may be > _n)
        self._keys: list[str] | None = None
        self._seen_line = False
        self.header: list[str] | None = None
        self.samples = 0
        self.bad_lines = 0
        self.ready: deque[np.ndarray] = deque()

    def feed(self, lines: Iterable[bytes]) -> None:
        buf = self._buf
        capacity = len(buf)
        for line in lines:
            values = self._parse(line)
            if values is None:
                continue
            if self._n == capacity:
                self._make_room()
            try:
                buf[self._n] = values
            except (TypeError, ValueError):
                self.bad_lines += 1
                continue
            self._n += 1
            self.samples += 1
        self._cut()

    def _parse(self, line: bytes) -> list[Any] | None:
        text = line.strip()
        if not text:
            return None
        first_line_of_stream = not self._seen_line
        self._seen_line = True
        try:
            head = text[:1]
            if head == b"[":
                values = json.loads(text)
                if not isinstance(values, list):
                    raise ValueError(text)
            elif head == b"{":
                obj = json.loads(text)
                if not isinstance(obj, dict) or len(obj) != self.channels:
                    raise ValueError(text)
                if self._keys is None:
                    self._keys = list(obj)
                values = [obj[key] for key in self._keys]
            else:
                parts = text.split(b",")
                try:
                    values = [float(part) for part in parts]
                except ValueError:
                    if not first_line_of_stream:
                        raise
                    self.header = [p.strip().decode("utf-8", "replace") for p in parts]
                    return None
        except (ValueError, KeyError, TypeError, RecursionError):
            self.bad_lines += 1
            return None
        if len(values) != self.channels:
            self.bad_lines += 1
            return None
        return values

    def _cut(self) -> None:
        n, start, size, hop = self._n, self._start, self.size, self.hop
        if n - start < size:
            return
        count = (n - start - size) // hop + 1
        views = sliding_window_view(self._buf[start:n], size, axis=0)[: count * hop : hop]
        block = views.transpose(0, 2, 1).copy()  # [count, size, channels], never a view
        self.ready.extend(block)
        self._start = start + count * hop

    def _make_room(self) -> None:
        self._cut()
        keep = min(self._start, self._n)
        tail = self._n - keep
        if tail:
            self._buf[:tail] = self._buf[keep : self._n]
        self._n = tail
        self._start -= keep


class _SensorSource(Source):
    def __init__(
        self,
        uri: str,
        *,
        window: WindowSpec,
        live: bool,
        reconnect: BackoffPolicy = DEFAULT_BACKOFF,
    ) -> None:
        super().__init__(uri, kind="sensor", live=live, reconnect=reconnect)
        self.window = window
        self._windows = _LineWindows(window)
        self._partial = b""

    @property
    def header(self) -> list[str] | None:
        """The CSV header's column names, when the stream had one."""
        return self._windows.header

    def _bad_line_count(self) -> int:
        return self._windows.bad_lines

    def _feed_chunk(self, chunk: bytes) -> None:
        lines = (self._partial + chunk).split(b"\n") if self._partial else chunk.split(b"\n")
        self._partial = lines.pop()
        self._windows.feed(lines)

    def _feed_rest(self) -> None:
        if self._partial:
            self._windows.feed((self._partial,))
            self._partial = b""


class StdinSensorSource(_SensorSource):
    """Sample lines on standard input (or another readable file descriptor); EOF ends it."""

    def __init__(
        self, *, window: WindowSpec, uri: str = "sensor:stdin", fd: int | None = None
    ) -> None:
        super().__init__(uri, window=window, live=False)
        self._given_fd = fd
        self._fd = -1
        self._eof = False

    def _connect(self) -> None:
        if self._given_fd is not None:
            self._fd = self._given_fd
            return
        try:
            self._fd = sys.stdin.fileno()
        except (AttributeError, OSError, ValueError) as exc:
            raise SourceError(f"{self._label}: standard input is not readable here") from exc

    def _capture(self, timeout: float | None) -> np.ndarray | None:
        ready = self._windows.ready
        deadline = None if timeout is None else time.monotonic() + timeout
        while not ready:
            if self._eof:
                raise _EndOfStream
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            readable, _, _ = select.select([self._fd], [], [], wait)
            if not readable:
                return None
            chunk = os.read(self._fd, _CHUNK)
            if chunk:
                self._feed_chunk(chunk)
            else:
                self._eof = True
                self._feed_rest()
        return ready.popleft()


class FileSensorSource(_SensorSource):
    """Sample lines appended to a file, read from its start and then tailed. It ends when the file
    is deleted (or replaced), or after ``idle`` seconds without new data."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        window: WindowSpec,
        uri: str | None = None,
        idle: float | None = None,
    ) -> None:
        super().__init__(uri or f"sensor:file:{path}", window=window, live=False)
        _check_fps(self._label, "idle", idle)
        self.path = Path(path)
        self.idle = idle
        self._file: Any = None
        self._inode = 0
        self._last_data = 0.0
        self._eof = False

    def _connect(self) -> None:
        try:
            self._file = open(self.path, "rb", buffering=0)  # noqa: SIM115 - closed in _disconnect
        except FileNotFoundError as exc:
            raise SourceError(
                f"{self._label}: no such file {self.path}; create it first or check the path"
            ) from exc
        except OSError as exc:
            raise SourceError(f"{self._label}: cannot read {self.path}: {first_line(exc)}") from exc
        self._inode = os.fstat(self._file.fileno()).st_ino
        self._last_data = time.monotonic()

    def _capture(self, timeout: float | None) -> np.ndarray | None:
        ready = self._windows.ready
        deadline = None if timeout is None else time.monotonic() + timeout
        while not ready:
            if self._eof:
                raise _EndOfStream
            chunk = self._file.read(_CHUNK)
            if chunk:
                self._feed_chunk(chunk)
                self._last_data = time.monotonic()
                continue
            now = time.monotonic()
            if self._gone() or (self.idle is not None and now - self._last_data >= self.idle):
                while chunk := self._file.read(_CHUNK):  # what was written before it went
                    self._feed_chunk(chunk)
                self._eof = True
                self._feed_rest()
                continue
            if deadline is not None and now >= deadline:
                return None
            wait = _POLL_S if deadline is None else min(_POLL_S, deadline - now)
            if self._stop.wait(wait):
                raise _EndOfStream
        return ready.popleft()

    def _gone(self) -> bool:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return True
        if st.st_ino != self._inode:
            return True
        if st.st_size < self._file.tell():  # truncated in place (copytruncate): start again
            self._file.seek(0)
            self._partial = b""
        return False

    def _disconnect(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class UdpSensorSource(_SensorSource):
    """Datagrams of sample lines (one or more complete lines each) on a bound UDP port: live.
    Port 0 binds a free port; ``address`` tells which."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        window: WindowSpec,
        uri: str | None = None,
        reconnect: BackoffPolicy = DEFAULT_BACKOFF,
    ) -> None:
        super().__init__(
            uri or f"sensor:udp://{host}:{port}", window=window, live=True, reconnect=reconnect
        )
        self.host, self.port = host, port
        self._sock: socket.socket | None = None
        self._buf = bytearray(65536)
        self._view = memoryview(self._buf)
        self._address: tuple[str, int] | None = None

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port), once open."""
        if self._address is None:
            raise SourceError(f"{self._label}: not bound yet; call open() first")
        return self._address

    def _connect(self) -> None:
        sock = None
        try:
            family, _, _, _, addr = socket.getaddrinfo(
                self.host, self.port, type=socket.SOCK_DGRAM
            )[0]
            sock = socket.socket(family, socket.SOCK_DGRAM)
            sock.bind(addr)
            sock.settimeout(_POLL_S)
            bound = sock.getsockname()
        except OSError as exc:
            if sock is not None:
                sock.close()
            raise SourceError(
                f"{self._label}: cannot bind {self.host}:{self.port}: {first_line(exc)}; "
                "pick a free port or a local address"
            ) from exc
        self._sock = sock
        self._address = (str(bound[0]), int(bound[1]))

    def _capture(self, timeout: float | None) -> np.ndarray | None:
        ready = self._windows.ready
        sock = self._sock
        if sock is None:
            raise SourceError(f"{self._label}: socket closed")
        while not ready:
            try:
                n = sock.recv_into(self._buf)
            except socket.timeout:
                return None
            self._windows.feed(bytes(self._view[:n]).split(b"\n"))
        return ready.popleft()

    def _disconnect(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


# -- URI parsing ---------------------------------------------------------------------------------

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+$")
_QUERY = re.compile(r"^[A-Za-z_]+=[^&=]*(&[A-Za-z_]+=[^&=]*)*$")
_CREDENTIALS = re.compile(r"(://[^/:@]*):[^/@]*@")


def _redact(uri: str) -> str:
    """The uri without a password, for messages and logs."""
    return _CREDENTIALS.sub(r"\1:***@", uri)


def _check_pace(label: str, pace: str) -> None:
    if pace not in PACE_MODES:
        raise SourceError(f"{label}: pace = {pace!r}: expected one of {PACE_MODES}")


def _check_fps(label: str, key: str, value: float | None) -> None:
    if value is not None and not (value > 0 and math.isfinite(value)):
        raise SourceError(f"{label}: {key} = {value}: must be > 0")


def _split_query(text: str) -> tuple[str, dict[str, str]]:
    head, sep, query = text.rpartition("?")
    if sep and (query == "" or _QUERY.match(query)):
        return head, dict(parse_qsl(query, keep_blank_values=True))
    return text, {}


class _Options:
    """The ``?key=value`` options of one URI, typed and checked; unknown keys are an error."""

    def __init__(self, uri: str, query: dict[str, str]) -> None:
        self.label = _redact(uri)
        self.values = query
        self.known: list[str] = []

    def _raw(self, key: str) -> str | None:
        self.known.append(key)
        return self.values.get(key)

    def _bad(self, key: str, raw: str, rule: str) -> SourceError:
        return SourceError(f"{self.label}: {key} = {raw!r}: {rule}")

    def integer(self, key: str, default: int | None, minimum: int) -> int | None:
        raw = self._raw(key)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            raise self._bad(key, raw, "expected an integer") from None
        if value < minimum:
            raise self._bad(key, raw, f"must be >= {minimum}")
        return value

    def number(self, key: str, default: float | None) -> float | None:
        raw = self._raw(key)
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError:
            raise self._bad(key, raw, "expected a number") from None
        if not (value > 0 and math.isfinite(value)):
            raise self._bad(key, raw, "must be > 0")
        return value

    def flag(self, key: str) -> bool:
        raw = self._raw(key)
        if raw is None:
            return False
        value = raw.strip().lower()
        if value in ("1", "true", "yes", "on"):
            return True
        if value in ("0", "false", "no", "off", ""):
            return False
        raise self._bad(key, raw, "expected 1 or 0")

    def choice(self, key: str, default: str, choices: tuple[str, ...]) -> str:
        raw = self._raw(key)
        if raw is None:
            return default
        if raw not in choices:
            raise self._bad(key, raw, f"expected one of {'|'.join(choices)}")
        return raw

    def finish(self) -> None:
        unknown = sorted(set(self.values) - set(self.known))
        if unknown:
            known = ", ".join(self.known) or "none"
            raise SourceError(f"{self.label}: unknown option(s) {unknown}; known here: {known}")


def open_source(
    uri: str,
    *,
    pace: str = "none",
    fps: float | None = None,
    window: WindowSpec | None = None,
    reconnect: BackoffPolicy = DEFAULT_BACKOFF,
) -> Source:
    """Parse ``uri`` and build its source, without opening it.

    ``pace`` ("none" | "native") times the finite image sources (files, images, synthetic);
    ``fps`` overrides their native frame rate (and requests a rate from a camera); ``window``
    is the sensors' windowing; ``reconnect`` the backoff of live sources. Raises ``SourceError``
    for an unknown scheme or a bad option; a missing file is reported by ``open()``."""
    label = _redact(uri)
    _check_pace(label, pace)
    _check_fps(label, "fps", fps)
    text = uri.strip()
    if not text:
        raise SourceError(f"source: empty URI; {_USAGE}")
    if text.lower().startswith(STREAM_SCHEMES):
        return CaptureSource(text, uri=uri, reconnect=reconnect)  # the query belongs to the server
    if text.startswith("/dev/video"):
        return CaptureSource(text, uri=uri, fps=fps, reconnect=reconnect)
    scheme, sep, rest = text.partition(":")
    if not sep or not _SCHEME.match(scheme):  # a plain path (also C:\… on Windows)
        path, query = _split_query(text)
        opts = _Options(uri, query)
        if Path(path).is_dir() or any(c in path for c in "*?["):
            return _images(uri, path, opts, pace=pace, fps=fps)
        return _video_file(uri, path, opts, pace=pace, fps=fps, reconnect=reconnect)
    scheme = scheme.lower()
    rest, query = _split_query(rest)
    opts = _Options(uri, query)
    if scheme == "camera":
        if not rest.isdigit():
            raise SourceError(
                f"{label}: expected camera:N with N a camera index (0, 1, …), or /dev/videoN"
            )
        cam_fps = opts.number("fps", fps)
        opts.finish()
        return CaptureSource(int(rest), uri=uri, fps=cam_fps, reconnect=reconnect)
    if scheme == "file":
        path = rest[2:] if rest.startswith("//") else rest
        return _video_file(uri, path, opts, pace=pace, fps=fps, reconnect=reconnect)
    if scheme == "images":
        return _images(uri, rest, opts, pace=pace, fps=fps)
    if scheme == "synthetic":
        if rest:
            raise SourceError(f"{label}: expected synthetic:?width=…&height=…&fps=…&frames=…")
        source = SyntheticSource(
            uri=uri,
            width=opts.integer("width", 640, 1) or 640,
            height=opts.integer("height", 480, 1) or 480,
            fps=opts.number("fps", fps) or DEFAULT_SYNTHETIC_FPS,
            frames=opts.integer("frames", None, 0),
            pattern=opts.choice("pattern", "gradient", PATTERNS),
            live=opts.flag("live"),
            pace=pace,
            seed=opts.integer("seed", 0, 0) or 0,
        )
        opts.finish()
        return source
    if scheme == "sensor":
        return _sensor(uri, rest, opts, window=window, reconnect=reconnect)
    raise SourceError(f"{label}: unknown source scheme {scheme!r}; {_USAGE}")


def _video_file(
    uri: str,
    path: str,
    opts: _Options,
    *,
    pace: str,
    fps: float | None,
    reconnect: BackoffPolicy,
) -> Source:
    if not path:
        raise SourceError(f"{opts.label}: no path; expected file:PATH")
    source = VideoFileSource(
        path,
        uri=uri,
        loop=opts.flag("loop"),
        live=opts.flag("live"),
        pace=pace,
        fps=opts.number("fps", fps),
        reconnect=reconnect,
    )
    opts.finish()
    return source


def _images(uri: str, pattern: str, opts: _Options, *, pace: str, fps: float | None) -> Source:
    if not pattern:
        raise SourceError(f"{opts.label}: no folder or pattern; expected images:GLOB")
    source = ImageFilesSource(pattern, uri=uri, pace=pace, fps=opts.number("fps", fps))
    opts.finish()
    return source


def _sensor(
    uri: str,
    rest: str,
    opts: _Options,
    *,
    window: WindowSpec | None,
    reconnect: BackoffPolicy,
) -> Source:
    label = opts.label
    size = opts.integer("size", window.size if window else None, 1)
    hop = opts.integer("hop", window.hop if window else size, 1)
    channels = opts.integer("channels", window.channels if window else None, 1)
    if size is None or hop is None or channels is None:
        raise SourceError(
            f"{label}: a sensor needs a window: pass window=WindowSpec(size, hop, channels) "
            "or add ?size=N&hop=N&channels=N"
        )
    spec = WindowSpec(size=size, hop=hop, channels=channels)
    source: Source
    if rest == "stdin":
        source = StdinSensorSource(window=spec, uri=uri)
    elif rest.startswith("file:"):
        path = rest[len("file:") :]
        if not path:
            raise SourceError(f"{label}: no path; expected sensor:file:PATH")
        source = FileSensorSource(path, window=spec, uri=uri, idle=opts.number("idle", None))
    elif rest.startswith("udp://"):
        parts = urlsplit(rest)
        try:
            port = parts.port
        except ValueError:
            port = None
        if not parts.hostname or port is None:
            raise SourceError(f"{label}: expected sensor:udp://HOST:PORT (e.g. 127.0.0.1:9000)")
        source = UdpSensorSource(parts.hostname, port, window=spec, uri=uri, reconnect=reconnect)
    else:
        raise SourceError(
            f"{label}: unknown sensor input; use sensor:stdin, sensor:file:PATH "
            "or sensor:udp://HOST:PORT"
        )
    opts.finish()
    return source


__all__ = [
    "DEFAULT_BACKOFF",
    "BackoffPolicy",
    "CaptureSource",
    "FileSensorSource",
    "Frame",
    "ImageFilesSource",
    "Source",
    "SourceError",
    "SourceStats",
    "SourceTimeout",
    "StdinSensorSource",
    "SyntheticSource",
    "UdpSensorSource",
    "VideoFileSource",
    "WindowSpec",
    "open_source",
]
