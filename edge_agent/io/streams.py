"""Several sources read as one: each stream keeps only its newest frame (a live source) or its
next frame (a finite one), and :meth:`StreamSet.take` picks the next frame across the streams
that have one ready, fairly:

- ``round-robin``: the streams take turns, starting after the one served last;
- ``oldest``: the frame captured first, whichever stream it is from.

One reader thread per stream reads its source (and runs ``prepare`` on the frame, so decoding
and preprocessing of different streams overlap) into that stream's one slot. A live stream
overwrites a frame nobody took (counted in its ``dropped``); a finite stream's reader waits
until its frame is taken, so a file loses nothing. A stream that ends or is lost never blocks
the others: ``take`` serves whatever is ready and returns ``None`` only when every stream has
ended.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from edge_agent.common.names import stream_name_problem
from edge_agent.errors import ConfigError, SourceError
from edge_agent.io.source import Frame, Source, SourceTimeout

log = logging.getLogger(__name__)

POLICIES = ("round-robin", "oldest")
READ_TIMEOUT_S = 0.5  # how long a reader waits on its source before checking for close()


def check_stream_name(name: str) -> str:
    """``name`` when it can name a stream; else SourceError saying why."""
    problem = stream_name_problem(name)
    if problem:
        raise SourceError(problem)
    return name


@dataclass(frozen=True)
class Stream:
    """One named source of a multi-stream pipeline, with its own options: ``max_fps`` caps the
    frames taken from it a second (0: all), ``roi`` is a region of interest ``(x, y, width,
    height)`` in source pixels that images are cropped to before preprocessing."""

    name: str
    source: Source
    max_fps: float = 0.0
    roi: tuple[int, int, int, int] | None = None

    def __post_init__(self) -> None:
        check_stream_name(self.name)
        if not self.max_fps >= 0:
            raise SourceError(f"stream {self.name}: fps = {self.max_fps}: must be >= 0")
        if self.roi is not None:
            x, y, w, h = self.roi
            if x < 0 or y < 0 or w < 1 or h < 1:
                raise SourceError(
                    f"stream {self.name}: roi = {list(self.roi)}: expected [x, y, width, "
                    "height] with x, y >= 0 and width, height >= 1"
                )


@dataclass
class StreamCounters:
    """What one stream did: frames read, frames taken, frames overwritten in its slot before
    they were taken (live streams), and whether it ended (with the error, if one ended it)."""

    read: int = 0
    taken: int = 0
    dropped: int = 0
    ended: bool = False
    error: str | None = None
    #: frames skipped to hold the stream's ``max_fps`` (not drops: asked for)
    skipped: int = 0


@dataclass
class Taken:
    """A frame :meth:`StreamSet.take` handed out: its stream, the frame, what ``prepare``
    made of it, and the stream's own count of frames taken before it (0, 1, 2, …)."""

    stream: str
    frame: Frame
    prepared: Any
    order: int


class _Stream:
    def __init__(self, name: str, source: Source, max_fps: float) -> None:
        self.name, self.source = name, source
        self.slot: tuple[Frame, Any] | None = None
        self.counters = StreamCounters()
        self.thread: threading.Thread | None = None
        #: a finite reader waits here for its slot to be taken (set by StreamSet, on its lock)
        self.free: threading.Condition | None = None
        #: the least time between two frames kept (0: every frame)
        self.min_gap_ns = int(1e9 / max_fps) if max_fps > 0 else 0


class StreamSet:
    def __init__(
        self,
        streams: Sequence[tuple[str, Source]],
        *,
        policy: str = "round-robin",
        prepare: Callable[[str, Frame], Any] | None = None,
        max_fps: Mapping[str, float] | None = None,
    ) -> None:
        """``prepare(name, frame)`` runs in the stream's reader on every frame kept; what it
        returns is handed out with the frame (:class:`Taken`), and ``None`` drops the frame (a
        motion gate said so) without touching the frame waiting in the slot. ``max_fps`` caps a
        stream's rate by name: frames are kept on a ``1 / max_fps`` cadence (a frame up to a
        quarter of that early counts as on time), the others skipped in the reader, before
        ``prepare`` (a 30 fps camera served at 15)."""
        if not streams:
            raise SourceError("streams: none given")
        names = [name for name, _ in streams]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise SourceError(f"streams: duplicate name(s) {dupes}; each stream needs its own")
        if policy not in POLICIES:
            raise SourceError(f"streams: policy = {policy!r}: expected one of {POLICIES}")
        self.policy = policy
        self._prepare = prepare
        caps = dict(max_fps or {})
        unknown = sorted(set(caps) - set(names))
        if unknown:
            raise SourceError(f"streams: max_fps names no stream: {unknown}")
        for name, fps in caps.items():
            if not fps >= 0:
                raise SourceError(f"streams: stream {name}: max_fps = {fps}: must be >= 0")
        self._streams = [_Stream(name, source, caps.get(name, 0.0)) for name, source in streams]
        # One lock, woken by purpose: ``_cond`` wakes a taker (a frame is ready, or a stream
        # ended), each stream's ``free`` wakes only that stream's reader (its slot was taken).
        # A frame then wakes one thread, not every reader: eight file streams went from 34-36
        # voluntary context switches a frame to 16 (one worker of two threads), and from 16-19
        # to 7-9 (two workers of one thread; eight agent processes: 8).
        lock = threading.Lock()
        self._cond = threading.Condition(lock)
        for stream in self._streams:
            stream.free = threading.Condition(lock)
        self._stop = threading.Event()
        self._next = 0  # round-robin: the index to look at first

    @property
    def names(self) -> list[str]:
        return [s.name for s in self._streams]

    def source(self, name: str) -> Source:
        return next(s.source for s in self._streams if s.name == name)

    def counters(self) -> dict[str, StreamCounters]:
        """A copy of every stream's counters, by name."""
        with self._cond:
            return {s.name: StreamCounters(**vars(s.counters)) for s in self._streams}

    def ready(self) -> dict[str, int]:
        """The streams with a frame waiting now, and when it was captured (monotonic ns)."""
        with self._cond:
            return {s.name: s.slot[0].capture_ns for s in self._streams if s.slot is not None}

    def open(self) -> None:
        """Open every source (a SourceError names the stream; the ones opened are closed) and
        start the readers."""
        opened: list[_Stream] = []
        for stream in self._streams:
            try:
                stream.source.open()
            except (SourceError, ConfigError) as exc:  # ConfigError: no Picamera2
                for done in opened:
                    done.source.close()
                raise type(exc)(f"stream {stream.name}: {exc}") from exc
            opened.append(stream)
        for stream in self._streams:
            stream.thread = threading.Thread(
                target=self._read, args=(stream,), name=f"stream {stream.name}", daemon=True
            )
            stream.thread.start()

    def _read(self, stream: _Stream) -> None:
        source, counters, cond, free = stream.source, stream.counters, self._cond, stream.free
        assert free is not None
        error: str | None = None
        due_ns = -(1 << 62)
        try:
            while not self._stop.is_set():
                try:
                    frame = source.read(timeout=READ_TIMEOUT_S)
                except SourceTimeout:
                    continue
                if frame is None:
                    break
                if stream.min_gap_ns:  # hold the cadence: a frame up to a quarter gap early
                    gap = stream.min_gap_ns  # is on time (camera jitter), one earlier skipped
                    if frame.capture_ns < due_ns - gap // 4:
                        with cond:
                            counters.skipped += 1
                        continue
                    due_ns = max(due_ns, frame.capture_ns) + gap
                prepared = self._prepare(stream.name, frame) if self._prepare else None
                if self._prepare is not None and prepared is None:
                    with cond:  # prepare dropped it (a motion gate): the slot keeps its frame
                        counters.read += 1
                    continue
                with cond:
                    counters.read += 1
                    if not source.live:  # a file's next frame waits for its turn
                        while stream.slot is not None and not self._stop.is_set():
                            free.wait()
                        if self._stop.is_set():
                            break
                    elif stream.slot is not None:
                        counters.dropped += 1
                    stream.slot = (frame, prepared)
                    cond.notify()  # one taker
        except Exception as exc:  # one stream's failure ends that stream, never the others
            error = f"{type(exc).__name__}: {exc}"
            log.error("stream %s stopped: %s", stream.name, error)
        finally:
            with cond:
                counters.ended = True
                counters.error = error or source.stats.last_error
                cond.notify_all()

    def _ready(self) -> bool:
        return any(s.slot is not None for s in self._streams) or all(
            s.counters.ended for s in self._streams
        )

    def take(self, timeout: float | None = None) -> Taken | None:
        """The next frame by the policy; ``None`` once every stream has ended (and its last
        frame was taken). Raises SourceTimeout when no stream had a frame within ``timeout``."""
        with self._cond:
            if not self._cond.wait_for(self._ready, timeout):
                raise SourceTimeout(f"streams: no frame within {timeout:g} s")
            ready = [i for i, s in enumerate(self._streams) if s.slot is not None]
            if not ready:
                return None
            if self.policy == "oldest":
                pick = min(ready, key=lambda i: self._slot_ns(i))
            else:
                n = len(self._streams)
                pick = min(ready, key=lambda i: (i - self._next) % n)
                self._next = (pick + 1) % n
            stream = self._streams[pick]
            assert stream.slot is not None
            frame, prepared = stream.slot
            stream.slot = None
            order = stream.counters.taken
            stream.counters.taken += 1
            assert stream.free is not None
            stream.free.notify()  # its reader may put its next frame now
            return Taken(stream.name, frame, prepared, order)

    def take_many(self, n: int, timeout: float | None = None) -> list[Taken]:
        """Up to ``n`` frames, in the policy's order: waits (``timeout``) for the first, then
        takes what else is ready now. ``[]`` once every stream has ended; SourceTimeout when
        nothing came within ``timeout``."""
        first = self.take(timeout)
        if first is None:
            return []
        out = [first]
        while len(out) < n:
            try:
                more = self.take(timeout=0)
            except SourceTimeout:
                break
            if more is None:
                break
            out.append(more)
        return out

    def _slot_ns(self, index: int) -> int:
        slot = self._streams[index].slot
        return slot[0].capture_ns if slot is not None else time.monotonic_ns()

    def close(self) -> None:
        """Stop the readers and close every source. Idempotent."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
            for stream in self._streams:
                if stream.free is not None:
                    stream.free.notify_all()
        for stream in self._streams:
            stream.source.close()
        for stream in self._streams:
            if stream.thread is not None:
                stream.thread.join(timeout=5.0)

    def __enter__(self) -> StreamSet:
        self.open()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


__all__ = ["POLICIES", "Stream", "StreamCounters", "StreamSet", "Taken", "check_stream_name"]
