"""Where results go: a JSONL file, stdout, or a Python callback (MQTT comes with the telemetry
issue). One JSON object per result, the same object for every sink."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, Protocol

from edge_agent.errors import ConfigError


class Sink(Protocol):
    def write(self, result: dict[str, Any]) -> None: ...
    def close(self) -> None: ...


def _dumps(result: dict[str, Any]) -> str:
    return json.dumps(result, separators=(",", ":"), allow_nan=False)


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
        self._fh.write(_dumps(result) + "\n")
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
        stream.write(_dumps(result) + "\n")
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


def open_sink(spec: str) -> Sink:
    """``jsonl:PATH`` or ``stdout`` (the CLI's ``--results``)."""
    if spec == "stdout":
        return StdoutSink()
    if spec.startswith("jsonl:") and len(spec) > len("jsonl:"):
        return JsonlSink(spec[len("jsonl:") :])
    raise ConfigError(f"results = {spec!r}: expected jsonl:PATH or stdout")
