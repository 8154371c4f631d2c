"""The Raspberry Pi camera modules: libcamera's own tools and Picamera2, since OpenCV's V4L2
capture does not see a CSI camera on Raspberry Pi OS (the sensor's device node gives raw Bayer
data; only libcamera runs the ISP).

- ``rpicam:[INDEX][?width=W&height=H&fps=F]`` runs ``rpicam-vid`` (``libcamera-vid`` on releases
  before Bookworm) with ``--codec yuv420 -o -``: uncompressed YUV420 (I420) frames back to back
  on a pipe, each a Y plane of ``stride x height`` bytes and U and V planes of
  ``stride/2 x height/2``, where the stride is the width rounded up to 64 bytes (the ISP's
  alignment; a width that is a multiple of 64, such as 640, 1280 or 1920, has no padding;
  ``?stride=`` overrides it). Frames are converted to BGR with OpenCV. Nothing to install in
  Python: rpicam-apps ships with Raspberry Pi OS.
- ``picamera2:[INDEX][?width=W&height=H&fps=F]`` uses Picamera2 when it can be imported (it is a
  system package on Raspberry Pi OS: create the agent's venv with ``--system-site-packages``).
  When it cannot be, ``open()`` raises ``ConfigError`` (an install problem that no retry fixes:
  ``edge-agent`` exits 78, which systemd does not restart).

Both are live sources: a capture thread keeps the newest frame, and a camera that is missing,
busy or whose process dies is retried with backoff (``degraded`` meanwhile).
"""

from __future__ import annotations

import importlib.util
from typing import Any

import cv2
import numpy as np

from edge_agent.common.backoff import DEFAULT_BACKOFF, BackoffPolicy
from edge_agent.common.buffers import BufferPool
from edge_agent.errors import ConfigError, SourceError, first_line
from edge_agent.io.process import PipeProcess, find_binary, wait_for_output
from edge_agent.io.source import POLL_S, Source, check_fps

RPICAM_BINARIES = ("rpicam-vid", "libcamera-vid")
STRIDE_ALIGN = 64
DEFAULT_SIZE = (640, 480)
DEFAULT_FPS = 30.0
FIRST_FRAME_TIMEOUT_S = 15.0  # a camera module starts in 1-2 s; a cold Pi Zero, more


def yuv420_stride(width: int, align: int = STRIDE_ALIGN) -> int:
    """The Y plane's row length in bytes for ``width`` pixels (U and V rows are half of it)."""
    return -(-width // align) * align


def i420_to_bgr(frame: bytes | bytearray | memoryview, width: int, height: int, stride: int,
                out: np.ndarray | None = None) -> np.ndarray:  # fmt: skip
    """One strided YUV420 frame (as ``rpicam-vid --codec yuv420`` writes it) as BGR uint8, into
    ``out`` when it is given (``height x width x 3`` uint8)."""
    buf = np.frombuffer(frame, np.uint8)
    if stride == width:  # no padding (640, 1280, 1920 wide): already the layout OpenCV reads
        packed = buf[: width * height * 3 // 2].reshape(height * 3 // 2, width)
    else:
        y_size, c_stride = stride * height, stride // 2
        c_size = c_stride * (height // 2)
        y = buf[:y_size].reshape(height, stride)[:, :width]
        u = buf[y_size : y_size + c_size].reshape(height // 2, c_stride)[:, : width // 2]
        v = buf[y_size + c_size : y_size + 2 * c_size].reshape(height // 2, c_stride)
        v = v[:, : width // 2]
        packed = np.concatenate([y.ravel(), u.ravel(), v.ravel()]).reshape(height * 3 // 2, width)
    return cv2.cvtColor(packed, cv2.COLOR_YUV2BGR_I420, dst=out)


class _PiCamera(Source):
    """A camera module by index, at a size and frame rate: live, connected (and reconnected) in
    the capture thread, so a missing camera is ``degraded``, not an error at start."""

    _connect_in_open = False
    scheme = ""

    def __init__(
        self,
        camera: int = 0,
        *,
        uri: str | None = None,
        width: int = DEFAULT_SIZE[0],
        height: int = DEFAULT_SIZE[1],
        fps: float = DEFAULT_FPS,
        reconnect: BackoffPolicy = DEFAULT_BACKOFF,
    ) -> None:
        super().__init__(
            uri or f"{self.scheme}:{camera}", kind="image", live=True, reconnect=reconnect
        )
        check_fps(self._label, "fps", fps)
        self.camera, self.width, self.height, self.fps = camera, width, height, fps


class RpicamSource(_PiCamera):
    """``rpicam-vid`` on a pipe: live, reconnecting (the process is started again)."""

    scheme = "rpicam"

    def __init__(
        self,
        camera: int = 0,
        *,
        uri: str | None = None,
        width: int = DEFAULT_SIZE[0],
        height: int = DEFAULT_SIZE[1],
        fps: float = DEFAULT_FPS,
        stride: int | None = None,
        binary: str | None = None,
        reconnect: BackoffPolicy = DEFAULT_BACKOFF,
    ) -> None:
        super().__init__(camera, uri=uri, width=width, height=height, fps=fps, reconnect=reconnect)
        if width < 2 or height < 2 or width % 2 or height % 2:
            raise SourceError(f"{self._label}: width and height must be even and >= 2")
        self.stride = stride or yuv420_stride(width)
        if self.stride < width or self.stride % 2:
            raise SourceError(f"{self._label}: stride = {self.stride}: must be even and >= width")
        self.frame_bytes = self.stride * height * 3 // 2
        self.binary = binary
        self._proc: PipeProcess | None = None
        self._buf = bytearray(self.frame_bytes)
        self._have = 0
        self._bgr = BufferPool()  # the BGR frames, reused once nobody holds them

    def command(self, binary: str) -> list[str]:
        """The command line: raw YUV420 on stdout, no preview, no time limit."""
        return [
            binary, "--camera", str(self.camera), "--codec", "yuv420",
            "--width", str(self.width), "--height", str(self.height),
            "--framerate", f"{self.fps:g}", "--timeout", "0", "--nopreview", "--flush",
            "-o", "-",
        ]  # fmt: skip

    def _connect(self) -> None:
        names = (self.binary,) if self.binary else RPICAM_BINARIES
        binary = find_binary(self._label, names, "on Raspberry Pi OS: sudo apt install rpicam-apps")
        self._proc, self._have = PipeProcess(self._label, self.command(binary)), 0
        try:
            wait_for_output(self._label, "rpicam-vid", self._read_some, self._stop,
                            FIRST_FRAME_TIMEOUT_S, POLL_S)  # fmt: skip
        except SourceError:
            self._disconnect()
            raise

    def _read_some(self, timeout: float | None) -> bool:
        """Read what the pipe holds into the frame buffer; False when nothing came within
        ``timeout``. Raises SourceError when rpicam-vid has exited."""
        if self._proc is None:
            raise SourceError(f"{self._label}: not connected")
        n = self._proc.read_into(memoryview(self._buf)[self._have :], timeout)
        self._have += n
        return n > 0

    def _capture(self, timeout: float | None) -> np.ndarray | None:
        while self._have < self.frame_bytes:
            if not self._read_some(timeout):
                return None  # nothing within the poll interval: the base loop checks for close
        self._have = 0
        out = self._bgr.take((self.height, self.width, 3), np.uint8)
        return i420_to_bgr(self._buf, self.width, self.height, self.stride, out)

    def _disconnect(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            proc.stop()


def _no_picamera2(label: str, why: str) -> ConfigError:
    return ConfigError(
        f"{label}: picamera2 cannot be imported ({why}); on Raspberry Pi OS it is a system "
        "package (sudo apt install python3-picamera2): create the agent's venv with "
        "--system-site-packages, or use rpicam:"
    )


def _import_picamera2(label: str) -> Any:
    """Picamera2's camera class, or ConfigError saying how to install it."""
    try:
        from picamera2 import Picamera2  # type: ignore[import-not-found]
    except (
        Exception
    ) as exc:  # missing, or broken (numpy ABI, libcamera bindings): no retry fixes it
        raise _no_picamera2(label, first_line(exc)) from None
    return Picamera2


class Picamera2Source(_PiCamera):
    """A camera through Picamera2 (libcamera's Python binding): live, reconnecting. Without
    Picamera2, ``open()`` raises ``ConfigError`` (in the caller's thread: no retry fixes it)."""

    scheme = "picamera2"
    _cam: Any = None
    _picamera2: Any = None  # the Picamera2 class, imported by open()

    def open(self) -> None:
        if self._picamera2 is None:
            self._picamera2 = _import_picamera2(self._label)
        super().open()

    def check_installed(self) -> None:
        """ConfigError when Picamera2 is not installed where this Python finds packages, found
        without importing it (``check-config``: importing starts libcamera)."""
        if importlib.util.find_spec("picamera2") is None:
            raise _no_picamera2(self._label, "no module named 'picamera2'")

    def _connect(self) -> None:
        try:
            cam = self._picamera2(self.camera)
            # "RGB888" is B, G, R in memory: OpenCV's order
            config = cam.create_video_configuration(
                main={"size": (self.width, self.height), "format": "RGB888"},
                controls={"FrameRate": self.fps},
            )
            cam.configure(config)
            cam.start()
        except Exception as exc:  # a missing or busy camera: degraded, retried
            raise SourceError(f"{self._label}: cannot start the camera: {first_line(exc)}") from exc
        self._cam = cam

    def _capture(self, timeout: float | None) -> np.ndarray | None:
        image = self._cam.capture_array("main")
        return np.ascontiguousarray(image[:, :, :3])

    def _disconnect(self) -> None:
        cam, self._cam = self._cam, None
        if cam is not None:
            try:
                cam.stop()
            finally:
                cam.close()


__all__ = [
    "RPICAM_BINARIES",
    "Picamera2Source",
    "RpicamSource",
    "i420_to_bgr",
    "yuv420_stride",
]
