"""Where results go: a JSONL file, stdout, the MQTT spool, or a Python callback. One JSON object
per result, the same object for every sink, written as compact JSON without NaN
(``edge_agent.fleet.protocol.dumps``, the wire's encoding)."""

from __future__ import annotations

import logging
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any, Protocol

from edge_agent.errors import ConfigError, first_line
from edge_agent.fleet.protocol import dumps

log = logging.getLogger(__name__)


class Sink(Protocol):
    """``write`` takes the result. A sink that sends it as JSON also has
    ``write_encoded(result, data)``, which the SinkWriter calls with the result encoded once
    for all such sinks."""

    def write(self, result: dict[str, Any]) -> None: ...
    def close(self) -> None: ...


def jsonl_problem(path: Path) -> str | None:
    """Why a ``jsonl:`` results file cannot be written at ``path`` (its directory missing, a
    directory in its place, not writable), or None. Opens nothing."""
    if not path.parent.is_dir():
        return f"the directory {path.parent} does not exist"
    if path.is_dir():
        return "is a directory"
    target = path if path.exists() else path.parent
    return None if os.access(target, os.W_OK) else f"{target} is not writable"


class JsonlSink:
    """Appends one line per result and flushes it (a reader tailing the file sees it at once).
    The file is opened at the first result: an agent that stops before one (a source that
    cannot be opened) leaves no empty file behind."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        problem = jsonl_problem(self.path)
        if problem:
            raise ConfigError(f"results: jsonl:{path}: {problem}")
        self._fh: IO[bytes] | None = None
        self._closed = False

    def write(self, result: dict[str, Any]) -> None:
        self.write_encoded(result, dumps(result))

    def write_encoded(self, result: dict[str, Any], data: bytes) -> None:
        assert not self._closed, "sink is closed"
        if self._fh is None:
            self._fh = self.path.open("ab")
        self._fh.write(data + b"\n")
        self._fh.flush()

    def close(self) -> None:
        self._closed = True
        fh, self._fh = self._fh, None
        if fh is None:
            return
        try:
            fh.close()  # closed even when its last flush fails (a full disk)
        except OSError as exc:
            log.warning("results: jsonl:%s: its last results were not written (%s)",
                        self.path, exc.strerror or exc)  # fmt: skip


class StdoutSink:
    def __init__(self, stream: IO[str] | None = None) -> None:
        self._stream = stream

    def write(self, result: dict[str, Any]) -> None:
        self.write_encoded(result, dumps(result))

    def write_encoded(self, result: dict[str, Any], data: bytes) -> None:
        stream = self._stream or sys.stdout
        stream.write(data.decode() + "\n")
        stream.flush()

    def close(self) -> None:
        pass


class CallbackSink:
    def __init__(self, fn: Callable[[dict[str, Any]], None]) -> None:
        self._fn = fn

    def write(self, result: dict[str, Any]) -> None:
        self._fn(result)

    def close(self) -> None:
        pass


class MqttResultSink:
    """Results into the spool (never blocks): all of them, only on change of the top class or
    label, or rate-limited."""

    def __init__(self, spool: Any, topic: str, *, mode: str = "all", max_rate: float = 0.0):
        self.spool, self.topic, self.mode = spool, topic, mode
        self.min_interval = 1.0 / max_rate if max_rate > 0 else 0.0
        self._last_key: Any = object()
        self._last_sent = 0.0
        self.skipped = 0

    def write(self, result: dict[str, Any]) -> None:
        self.write_encoded(result, None)

    def write_encoded(self, result: dict[str, Any], data: bytes | None) -> None:
        seq = int(result["seq"])
        if self._wanted(result):
            self.spool.put("results", self.topic, data or dumps(result), seq=seq)
        else:  # not sent, but its seq is taken: the counter must not hand it out again
            self.spool.observe_seq("results", seq)

    def _wanted(self, result: dict[str, Any]) -> bool:
        if self.mode == "none":
            return False
        if self.mode == "change":
            out = result.get("output") or {}
            key = (out.get("class"), out.get("label"), out.get("dominant"))
            if key == self._last_key:
                self.skipped += 1
                return False
            self._last_key = key
        if self.min_interval:
            now = time.monotonic()
            if now - self._last_sent < self.min_interval:
                self.skipped += 1
                return False
            self._last_sent = now
        return True

    def close(self) -> None:
        pass


class SinkWriter:
    """Writes results to the sinks in its own thread, in the order they were submitted, so that
    a slow sink (a blocked stdout, a busy journal) never holds the pipeline's lock, its workers or
    a hot swap. A sink that raises is logged (the first error, then every 100th) and counted in
    ``errors``; that result is dropped for that sink only, and the others go on.

    ``submit`` never blocks; ``wait_room`` (called before taking the pipeline's lock) holds the
    caller back while ``max_pending`` results wait, so that a sink slower than the model for good
    slows the loop down rather than filling memory."""

    def __init__(self, sinks: Sequence[Sink], *, max_pending: int = 256) -> None:
        self.sinks = list(sinks)
        self.max_pending = max_pending
        self.errors: dict[str, int] = {}
        self.written = 0
        self._queue: queue.SimpleQueue[dict[str, Any] | None] = queue.SimpleQueue()
        self._submitted = 0
        self._done = threading.Condition()
        self._thread: threading.Thread | None = None

    @property
    def pending(self) -> int:
        return self._submitted - self.written

    def start(self) -> None:
        if self._thread is None and self.sinks:
            self._thread = threading.Thread(target=self._run, name="edge-sinks", daemon=True)
            self._thread.start()

    def submit(self, result: dict[str, Any]) -> None:
        if not self.sinks:
            return
        if self._thread is None:  # not started: write in the caller's thread
            self._write(result)
            return
        self._submitted += 1
        self._queue.put(result)

    def wait_room(self, timeout: float = 0.5) -> None:
        if self.pending < self.max_pending:
            return
        with self._done:
            self._done.wait_for(lambda: self.pending < self.max_pending, timeout)

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every submitted result is written; False when ``timeout`` passed first."""
        with self._done:
            return self._done.wait_for(lambda: self.pending <= 0, timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued (for at most ``timeout`` seconds), then stop the thread. The
        sinks themselves stay open: their owner closes them."""
        if self._thread is None:
            return
        self.flush(timeout)
        self._queue.put(None)
        self._thread.join(timeout=1.0)
        self._thread = None

    def _run(self) -> None:
        get = self._queue.get
        while (result := get()) is not None:
            self._write(result)
            with self._done:
                self.written += 1
                self._done.notify_all()

    def _write(self, result: dict[str, Any]) -> None:
        encoded: bytes | None = None  # once for every sink that sends JSON
        for sink in self.sinks:
            try:
                write_encoded = getattr(sink, "write_encoded", None)
                if write_encoded is None:
                    sink.write(result)
                    continue
                if encoded is None:
                    encoded = dumps(result)
                write_encoded(result, encoded)
            except Exception as exc:  # a sink's failure is its own: the loop goes on
                name = type(sink).__name__
                n = self.errors[name] = self.errors.get(name, 0) + 1
                if n == 1 or n % 100 == 0:
                    log.warning("sink %s failed (%d so far; result dropped there): %s",
                                name, n, first_line(exc))  # fmt: skip


def parse_sink(spec: str) -> tuple[str, str]:
    """``jsonl:PATH`` → ("jsonl", PATH), ``stdout`` → ("stdout", ""); else ConfigError. Opens
    nothing (``edge-agent check-config``)."""
    if spec == "stdout":
        return "stdout", ""
    if spec.startswith("jsonl:") and len(spec) > len("jsonl:"):
        return "jsonl", spec[len("jsonl:") :]
    raise ConfigError(f"results = {spec!r}: expected jsonl:PATH or stdout")


def open_sink(spec: str) -> Sink:
    """``jsonl:PATH`` or ``stdout`` (the CLI's ``--results``)."""
    kind, path = parse_sink(spec)
    return StdoutSink() if kind == "stdout" else JsonlSink(path)
