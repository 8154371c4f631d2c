"""A folder (or a glob) of image files, read in sorted order: finite. A file that cannot be
decoded (not an image, truncated, or gone since the folder was listed) is skipped with one
warning naming it and counted in ``stats.unreadable``; reading goes on with the next file."""

from __future__ import annotations

import glob
import os
from pathlib import Path

import cv2
import numpy as np

from edge_agent.errors import SourceError, first_line
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
    """Image files, sorted by name: a directory (its image files) or a glob pattern. Finite.
    A file that cannot be decoded is skipped (one warning, ``stats.unreadable``)."""

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
        """The next file that decodes; the ones that do not are skipped on the way."""
        while self._next < len(self._files):
            path = self._files[self._next]
            self._next += 1
            try:
                image = cv2.imread(path, cv2.IMREAD_COLOR)
            except cv2.error as exc:
                why = first_line(exc)
            else:
                if image is not None:
                    return image
                why = "not an image, or truncated" if os.path.exists(path) else "it vanished"
            self._skip(f"{self._label}: cannot decode {path} ({why}); skipped it")
        raise EndOfStream


__all__ = [
    "DEFAULT_IMAGE_FPS",
    "IMAGE_EXTENSIONS",
    "ImageFilesSource",
]
