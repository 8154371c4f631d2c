"""Sensor streams: sample lines (JSON or CSV) cut into sliding windows, from standard input or
a file being appended."""

from __future__ import annotations

import json
import logging
import os
import select
import sys
import time
from collections import deque
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from edge_agent.common.backoff import DEFAULT_BACKOFF, BackoffPolicy
from edge_agent.errors import SourceError, first_line
from edge_agent.io.source import (
    POLL_S,
    READ_CHUNK,
    EndOfStream,
    Source,
    WindowSpec,
    check_fps,
)

logger = logging.getLogger(__name__)


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


class SensorSource(Source):
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
        self._eof = False

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

    def _capture(self, timeout: float | None) -> np.ndarray | None:
        """The next window: bytes are read (``_read_more``) until one is complete, the stream
        ends (``EndOfStream``) or ``timeout`` passes (None)."""
        ready = self._windows.ready
        deadline = None if timeout is None else time.monotonic() + timeout
        while not ready:
            if self._eof:
                raise EndOfStream
            if not self._read_more(deadline):
                return None
        return ready.popleft()

    def _read_more(self, deadline: float | None) -> bool:
        """Feed what can be read now into the windows (setting ``_eof`` at the end); False when
        nothing came before ``deadline``."""
        raise NotImplementedError


class StdinSensorSource(SensorSource):
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

    def _read_more(self, deadline: float | None) -> bool:
        wait = None if deadline is None else max(0.0, deadline - time.monotonic())
        readable, _, _ = select.select([self._fd], [], [], wait)
        if not readable:
            return False
        chunk = os.read(self._fd, READ_CHUNK)
        if chunk:
            self._feed_chunk(chunk)
        else:
            self._eof = True
            self._feed_rest()
        return True


class FileSensorSource(SensorSource):
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
        check_fps(self._label, "idle", idle)
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

    def _read_more(self, deadline: float | None) -> bool:
        chunk = self._file.read(READ_CHUNK)
        if chunk:
            self._feed_chunk(chunk)
            self._last_data = time.monotonic()
            return True
        now = time.monotonic()
        if self._gone() or (self.idle is not None and now - self._last_data >= self.idle):
            while chunk := self._file.read(READ_CHUNK):  # what was written before it went
                self._feed_chunk(chunk)
            self._eof = True
            self._feed_rest()
            return True
        if deadline is not None and now >= deadline:
            return False
        wait = POLL_S if deadline is None else min(POLL_S, deadline - now)
        if self._stop.wait(wait):
            raise EndOfStream
        return True

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


__all__ = [
    "FileSensorSource",
    "SensorSource",
    "StdinSensorSource",
]
