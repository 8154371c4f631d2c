"""A folder (or a glob) of image files, read in sorted order: finite."""

from __future__ import annotations

import glob
import os
from pathlib import Path

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

IMAGE_EXTENSIONS = frozenset(
    {".bmp", ".jpeg", ".jpg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp"}
)
DEFAULT_IMAGE_FPS = 10.0


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
        check_pace(self._label, pace)
        check_fps(self._label, "fps", fps)
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
            self._pacer = Pacer(self._fps)

    def _capture(self, timeout: float | None) -> np.ndarray | None:
        if self._next >= len(self._files):
            raise EndOfStream
        path = self._files[self._next]
        self._next += 1
        image = cv2.imread(path, cv2.IMREAD_COLOR)
        if image is None:
            raise SourceError(f"{self._label}: cannot read {path} (vanished or corrupt)")
        return image


__all__ = [
    "DEFAULT_IMAGE_FPS",
    "IMAGE_EXTENSIONS",
    "ImageFilesSource",
]
