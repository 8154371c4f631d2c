"""Video files, cameras and network streams, read through OpenCV's VideoCapture.

OpenCV's and FFmpeg's own messages (``[tcp @ 0x…] Connection to … failed``, ``[ WARN:…]
VIDEOIO(FFMPEG): …``, ``Stream ends prematurely``) would go to standard error on every
reconnection of a stream; our one line says the source was lost and is retried. So importing
this module lowers OpenCV's log level to errors and FFmpeg's to fatal errors
(:func:`quiet_opencv_logs`), unless ``OPENCV_LOG_LEVEL`` / ``OPENCV_FFMPEG_LOGLEVEL`` is set
already: a user's own setting (``OPENCV_FFMPEG_LOGLEVEL=32`` to debug a camera) wins. It is done
at import because OpenCV reads ``OPENCV_FFMPEG_LOGLEVEL`` once, when its FFmpeg backend is first
used (a video written or read before the first source opens would be too late).
"""

from __future__ import annotations

import logging
import math
import os
import select
import socket
import stat
import urllib.parse
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from edge_agent.common.backoff import DEFAULT_BACKOFF, BackoffPolicy
from edge_agent.common.buffers import BufferPool
from edge_agent.common.secrets import read_secret
from edge_agent.common.urls import with_password
from edge_agent.errors import ConfigError, SourceError, first_line
from edge_agent.io.source import (
    EndOfStream,
    Pacer,
    Source,
    check_fps,
    check_pace,
)

logger = logging.getLogger(__name__)

STREAM_TIMEOUT_MS = 5000  # open/read timeout of a network stream, so a dead server cannot hang us
#: Network streams read through OpenCV's FFmpeg backend (MJPEG, H.264, MPEG-TS, …).
STREAM_SCHEMES = ("rtsp://", "rtsps://", "http://", "https://", "udp://", "tcp://")
_DEFAULT_PORTS = {"rtsp": 554, "rtsps": 322, "http": 80, "https": 443}
PROBE_TIMEOUT_S = 2.0  # the TCP probe that says why a stream could not be opened
#: FFmpeg's level while the agent reads through OpenCV: AV_LOG_FATAL (its errors are per
#: connection attempt or per damaged packet; our own message says the stream is lost)
FFMPEG_LOG_LEVEL = "8"


def quiet_opencv_logs() -> None:
    """Lower OpenCV's log level to errors and FFmpeg's to fatal errors, unless the environment
    sets ``OPENCV_LOG_LEVEL`` / ``OPENCV_FFMPEG_LOGLEVEL`` (then it is left as given). Called
    when this module is imported: OpenCV's FFmpeg backend reads its variable once, at first use."""
    if "OPENCV_LOG_LEVEL" not in os.environ:
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", FFMPEG_LOG_LEVEL)


quiet_opencv_logs()


def _open_capture(target: int | str, api: int, params: list[int], label: str, what: str) -> Any:
    try:
        cap = cv2.VideoCapture(target, api, params)
    except cv2.error as exc:
        raise SourceError(f"{label}: {what}: {first_line(exc)}") from exc
    if not cap.isOpened():
        cap.release()
        raise SourceError(f"{label}: {what}")
    return cap


def why_unreachable(target: str) -> str:
    """Why a network stream could not be opened, in a few words, from a plain TCP connection to
    its host and port (FFmpeg's own message is hidden, :func:`quiet_opencv_logs`): refused, no
    answer, unknown host, or "the server answered" (then the path or the format is wrong). Empty
    for UDP (nothing to connect to). Never names the user or the password."""
    try:
        parts = urllib.parse.urlsplit(target)
        host, port = parts.hostname, parts.port or _DEFAULT_PORTS.get(parts.scheme.lower())
    except ValueError:
        return ""
    listening = "listen" in parts.query  # tcp://…?listen=1, rtsp_flags=listen: we are the server
    if parts.scheme.lower() == "udp" or listening or not host or not port:
        return ""
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S):
            pass
    except ConnectionRefusedError:
        return f"{where} refused the connection"
    except socket.gaierror:
        return f"cannot resolve {host}"
    except socket.timeout:  # TimeoutError from 3.10 on
        return f"{where} did not answer in {PROBE_TIMEOUT_S:g} s"
    except OSError as exc:
        return f"{where}: {exc.strerror or first_line(exc)}"
    except ValueError:  # a host name IDNA cannot encode
        return f"cannot resolve {host}"
    return f"{where} answered, but no video could be read there (path or format)"


class _CvCaptureSource(Source):
    """A source read through an OpenCV VideoCapture held in ``_cap``; releases it on
    disconnect."""

    _cap: Any = None
    _pool: BufferPool | None = None
    _last: tuple[tuple[int, ...], Any] | None = None  # the last frame's shape and dtype

    def _read(self) -> tuple[bool, Any]:
        """The next frame from ``_cap``, decoded into a pooled buffer of the last frame's shape
        and dtype that nobody holds any more (``edge_agent.common.buffers``: no fresh 0.9 MB a
        frame to fault in); a frame of another size gets a new one."""
        if self._last is None:
            ok, image = self._cap.read()
        else:
            if self._pool is None:
                self._pool = BufferPool()
            ok, image = self._cap.read(self._pool.take(*self._last))
        if ok:
            self._last = image.shape, image.dtype
        return ok, image

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
        check_pace(self._label, pace)
        check_fps(self._label, "fps", fps)
        self.path = Path(path)
        self.loop = loop
        self._paced = live or pace == "native"
        self._fps = fps
        self._count = 0  # frames in the file as the container reports it (0: unknown)
        self._since_open = 0
        #: FFmpeg's decoding threads (0: its own choice, one per core). Several file streams set
        #: 1: they decode in parallel already, and eight decoders each with a thread per core
        #: spend about 13 % more CPU a frame here (2-core Xeon, eight 640x480 mp4v files).
        self.decode_threads = 0
        #: a FIFO waiting for its writer: our own non-blocking descriptor, polled by ``_capture``
        #: (FFmpeg's open would block until a writer comes, before READY=1, saying nothing)
        self._fifo: int | None = None
        self._fifo_said = False

    @property
    def connects_in_background(self) -> bool:
        """A FIFO is there once its writer has sent something (``starting`` until then)."""
        return super().connects_in_background or self._is_fifo()

    def _is_fifo(self) -> bool:
        try:
            return stat.S_ISFIFO(self.path.stat().st_mode)
        except OSError:
            return False

    def _connect(self) -> None:
        try:
            mode = self.path.stat().st_mode
        except OSError:
            raise SourceError(
                f"{self._label}: no such file {self.path}; check the path "
                "(a camera is camera:N, a folder of images is images:DIR)"
            ) from None
        if stat.S_ISFIFO(mode):  # read as it comes, once a writer has sent something
            try:
                self._fifo = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)
            except OSError as exc:
                raise SourceError(
                    f"{self._label}: cannot open the FIFO {self.path}: {exc.strerror or exc}"
                ) from None
            return
        if not stat.S_ISREG(mode):
            raise SourceError(
                f"{self._label}: {self.path} is not a regular file or a FIFO; check the path "
                "(a camera is camera:N or /dev/videoN, a folder of images is images:DIR)"
            )
        self._open_cap()

    def _writer_came(self, timeout: float | None) -> bool:
        """Whether the FIFO's writer has sent something, waiting up to ``timeout``; then FFmpeg
        reads our own descriptor (``pipe:N``): opening the path again would block once a
        writer that sent everything has gone, and what it sent would be lost."""
        fd = self._fifo
        assert fd is not None
        if not self._fifo_said:
            self._fifo_said = True
            logger.info("%s: waiting for a writer on the FIFO", self._label)
        wait_ms = -1 if timeout is None else max(0, int(timeout * 1000))
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        if not poller.poll(wait_ms):
            return False
        os.set_blocking(fd, True)  # FFmpeg waits for the writer's next bytes, as on a file
        self._open_cap(f"pipe:{fd}", cv2.CAP_FFMPEG)
        return True

    def _open_cap(self, target: str | None = None, api: int = cv2.CAP_ANY) -> None:
        cap = _open_capture(
            target or str(self.path),
            api,
            [cv2.CAP_PROP_N_THREADS, self.decode_threads] if self.decode_threads else [],
            self._label,
            f"cannot decode {self.path} (not a video, or corrupt); check or re-encode the file",
        )
        if self._paced and self._pacer is None:
            fps = self._fps or cap.get(cv2.CAP_PROP_FPS)
            if not (fps and fps > 0 and math.isfinite(fps)):
                cap.release()
                raise SourceError(f"{self._label}: the file reports no frame rate; pass fps=N")
            self._pacer = Pacer(float(fps))
        count = cap.get(cv2.CAP_PROP_FRAME_COUNT)
        self._count = int(count) if count and math.isfinite(count) and count > 0 else 0
        self._cap = cap
        self._since_open = 0

    def _disconnect(self) -> None:
        super()._disconnect()  # FFmpeg leaves a pipe:N descriptor open: ours to close
        if self._fifo is not None:
            os.close(self._fifo)
            self._fifo = None

    def _capture(self, timeout: float | None) -> np.ndarray | None:
        if self._cap is None and self._fifo is not None and not self._writer_came(timeout):
            return None
        ok, image = self._read()
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
            raise EndOfStream
        self._disconnect()
        self._connect()  # raises SourceError when the file is gone
        if self._cap is None:  # a FIFO again: its next writer
            self._since_open = 0
            return None
        ok, image = self._read()
        if not ok:
            raise SourceError(f"{self._label}: no frame could be decoded from {self.path}")
        self._since_open = 1
        return image


class CaptureSource(_CvCaptureSource):
    """A camera (by index or device path) or a network stream (RTSP, HTTP, UDP, TCP): live.
    Opening never fails for want of the device: it reports "degraded" and keeps trying.

    ``password_file`` (a network stream whose URI names a user): the password is read from the
    file at each connection and put into the URI handed to FFmpeg (:meth:`stream_target`); the
    source's ``uri`` and label never hold it."""

    _connect_in_open = False

    def __init__(
        self,
        target: int | str,
        *,
        uri: str | None = None,
        fps: float | None = None,
        reconnect: BackoffPolicy = DEFAULT_BACKOFF,
        password_file: str = "",
    ) -> None:
        default_uri = f"camera:{target}" if isinstance(target, int) else target
        super().__init__(uri or default_uri, kind="image", live=True, reconnect=reconnect)
        check_fps(self._label, "fps", fps)
        stream = isinstance(target, str) and target.lower().startswith(STREAM_SCHEMES)
        if password_file and not stream:
            raise SourceError(f"{self._label}: password_file is only for network streams")
        self.target = target
        self.password_file = password_file
        self._fps = fps

    def stream_target(self) -> int | str:
        """What OpenCV opens: the target, with the password from ``password_file`` put in."""
        if not self.password_file or not isinstance(self.target, str):
            return self.target
        try:
            password = read_secret(self.password_file, what="password_file")
            return with_password(self.target, password)
        except ConfigError as exc:
            raise SourceError(f"{self._label}: {exc}") from None
        except ValueError as exc:
            raise SourceError(f"{self._label}: password_file: {exc}") from None

    def _connect(self) -> None:
        target = self.stream_target()
        if isinstance(target, str) and target.lower().startswith(STREAM_SCHEMES):
            params = [
                cv2.CAP_PROP_OPEN_TIMEOUT_MSEC,
                STREAM_TIMEOUT_MS,
                cv2.CAP_PROP_READ_TIMEOUT_MSEC,
                STREAM_TIMEOUT_MS,
            ]
            try:
                self._cap = _open_capture(target, cv2.CAP_FFMPEG, params, self._label, "")
            except SourceError as exc:
                why = why_unreachable(target)
                if exc.__cause__ is not None:  # OpenCV raised: its words too
                    why = "; ".join(w for w in (why, first_line(exc.__cause__)) if w)
                raise SourceError(
                    f"{self._label}: cannot connect to the stream{f' ({why})' if why else ''}; "
                    "check the address and that the camera is up"
                ) from exc
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
        ok, image = self._read()
        if not ok:
            raise SourceError(f"{self._label}: no frame (camera unplugged or stream dropped)")
        return image


__all__ = [
    "FFMPEG_LOG_LEVEL",
    "STREAM_SCHEMES",
    "STREAM_TIMEOUT_MS",
    "CaptureSource",
    "VideoFileSource",
    "quiet_opencv_logs",
    "why_unreachable",
]
