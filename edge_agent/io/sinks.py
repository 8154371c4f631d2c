"""Where results go: a JSONL file, stdout, the MQTT spool, or a Python callback. One JSON object
per result, the same object for every sink, written as compact JSON without NaN
(``edge_agent.fleet.protocol.dumps``, the wire's encoding)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, Protocol

from edge_agent.errors import ConfigError
from edge_agent.fleet.protocol import dumps


class Sink(Protocol):
    def write(self, result: dict[str, Any]) -> None: ...
    def close(self) -> None: ...


class JsonlSink:
    """Appends one line per result and flushes it (a reader tailing the file sees it at once)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.parent.is_dir():
            raise ConfigError(
                f"results: jsonl:{path}: the directory {self.path.parent} does not exist"
            )
        self._fh: IO[str] | None = self.path.open("a", encoding="utf-8")

    def write(self, result: dict[str, Any]) -> None:
        assert self._fh is not None, "sink is closed"
        self._fh.write(dumps(result).decode() + "\n")
        self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


class StdoutSink:
    def __init__(self, stream: IO[str] | None = None) -> None:
        self._stream = stream

    def write(self, result: dict[str, Any]) -> None:
        stream = self._stream or sys.stdout
        stream.write(dumps(result).decode() + "\n")
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
        seq = int(result["seq"])
        if self._wanted(result):
            self.spool.put("results", self.topic, dumps(result), seq=seq)
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


def open_sink(spec: str) -> Sink:
    """``jsonl:PATH`` or ``stdout`` (the CLI's ``--results``)."""
    if spec == "stdout":
        return StdoutSink()
    if spec.startswith("jsonl:") and len(spec) > len("jsonl:"):
        return JsonlSink(spec[len("jsonl:") :])
    raise ConfigError(f"results = {spec!r}: expected jsonl:PATH or stdout")
