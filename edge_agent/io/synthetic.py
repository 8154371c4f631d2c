"""Generated frames (noise, a moving gradient, digits): the designed test seam, a fake camera
that is a ``Source`` rather than a patched ``cv2``."""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np

from edge_agent.errors import SourceError
from edge_agent.io.source import (
    EndOfStream,
    Pacer,
    Source,
    check_fps,
    check_pace,
)

PATTERNS = ("noise", "gradient", "digits")
DEFAULT_SYNTHETIC_FPS = 30.0


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
        check_pace(self._label, pace)
        check_fps(self._label, "fps", fps)
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
            self._pacer = Pacer(fps)
        ramp = np.linspace(0, 255, width, dtype=np.float32).astype(np.uint8)
        self._base = np.repeat(np.broadcast_to(ramp[None, :, None], (height, width, 1)), 3, 2)
        self._blank = np.zeros((height, width, 3), np.uint8)
        self._text_scale = max(height / 60.0, 0.3)
        self._make: Callable[[int], np.ndarray] = getattr(self, f"_{pattern}")

    def _capture(self, timeout: float | None) -> np.ndarray | None:
        if self.frames is not None and self._made >= self.frames:
            raise EndOfStream
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


__all__ = [
    "DEFAULT_SYNTHETIC_FPS",
    "PATTERNS",
    "SyntheticSource",
]
