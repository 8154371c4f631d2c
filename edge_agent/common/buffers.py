"""Per-frame arrays reused once nobody holds them.

A 640×480 BGR frame is 0.9 MB and a 256×256 float32 input 0.8 MB: allocated afresh for every
frame, glibc hands such blocks back to the kernel and takes them again (mmap, or trimming the
heap), and their pages are faulted in anew. Decoding into a buffer that is already
mapped took the small ONNX model (~1 ms, two one-thread workers over a 640×480 mp4v file) from
1,106 to 1,168 fps and its CPU a frame from 1.49 to 1.43 ms (medians of 6 alternating runs of
a one-off script, 2-core EPYC, stop 26); on the 1.4-18 ms models the change was within noise.

A buffer is free when the pool holds the only reference to it: whoever keeps a frame or a
tensor (the queue, a worker, a sink, a view of it) keeps it out of the pool, so nothing is ever
overwritten under a holder. A buffer that stayed free through a whole window of takes was not
needed (a burst is over, or a model swap held frames for a moment): the pool lets it go, so a
1080p camera does not keep 6 MB buffers it no longer uses. Thread-safe.
"""

from __future__ import annotations

import sys
import threading
from typing import Any

import numpy as np


def _refs(bufs: list[Any], i: int) -> int:
    """The references to ``bufs[i]`` as ``sys.getrefcount`` sees them from here: the one way
    they are counted, for the pool's buffers and for its probe (the baseline)."""
    buf = bufs[i]
    return sys.getrefcount(buf)


#: Takes in a window: a buffer left free after every take of a whole window is let go.
TRIM_WINDOW = 256


class BufferPool:
    """Up to ``keep`` arrays, each handed out again once nobody else holds it; one that no take
    of a ``window`` needed is let go."""

    def __init__(self, keep: int = 8, *, window: int = TRIM_WINDOW) -> None:
        if keep < 1:
            raise ValueError(f"keep = {keep}: must be >= 1")
        if window < 1:
            raise ValueError(f"window = {window}: must be >= 1")
        self._keep = keep
        self._window = window
        #: Only a GIL makes a reference count an owner count: a free-threaded build (3.13t)
        #: counts some references elsewhere, so there nothing is reused.
        self._reuse = bool(getattr(sys, "_is_gil_enabled", lambda: True)())
        #: An object only this list holds: what a free buffer's count looks like, measured in
        #: every take(), in the taking thread (a trace or profile function on 3.9-3.12 adds a
        #: reference to the locals of the thread it hooks, and hooks are per thread).
        self._probe = [object()]
        self._bufs: list[np.ndarray] = []
        self._next = 0  # with every buffer held: the next one to forget (round robin)
        #: The takes of this window, and the fewest buffers left free after any of them: that
        #: many were not needed in the whole window (buffers are only taken by take(), so none
        #: is taken between two takes)
        self._takes = 0
        self._spare = keep
        self._lock = threading.Lock()

    def take(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        """An array of ``shape`` and ``dtype`` (contents undefined) that nobody else holds: a
        free one from the pool, else a new one, kept when the pool has room, else in place of
        a free one of another shape (a camera that changed its resolution), else of a held one
        (which the pool then forgets)."""
        dtype = np.dtype(dtype)
        if not self._reuse:
            return np.empty(shape, dtype)
        with self._lock:
            free = _refs(self._probe, 0)
            found = -1
            spare: list[int] = []  # free, and not the one handed out
            for i in range(len(self._bufs)):
                if _refs(self._bufs, i) > free:
                    continue  # held: a frame still queued, a feed still being inferred
                buf = self._bufs[i]
                if found < 0 and buf.shape == shape and buf.dtype == dtype:
                    found = i
                else:
                    spare.append(i)
            self._spare = min(self._spare, len(spare))
            self._takes += 1
            if self._takes >= self._window:
                if self._spare:  # never needed in the whole window: let them go
                    drop = set(spare[: self._spare])
                    kept = [b for i, b in enumerate(self._bufs) if i not in drop]
                    if found >= 0:
                        found -= sum(1 for i in drop if i < found)
                    spare = []  # the rest of them: held again, or of this window's shape
                    self._bufs = kept
                self._takes, self._spare = 0, self._keep
            if found >= 0:
                return self._bufs[found]
            new = np.empty(shape, dtype)
            if len(self._bufs) < self._keep:
                self._bufs.append(new)
            else:  # in place of a free one of another shape, else of a held one, round robin
                # (its holder keeps it as an ordinary array: frames kept for a while, or more
                # in flight than the pool keeps, do not stop the reuse for the rest)
                if spare:
                    stale = spare[-1]
                else:
                    stale = self._next
                    self._next = (self._next + 1) % self._keep
                self._bufs[stale] = new
            return new

    def __len__(self) -> int:
        return len(self._bufs)
