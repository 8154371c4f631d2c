"""A capture tool on a pipe: the sources that run a program which writes raw frames or samples to
its standard output (``rpicam-vid --codec yuv420 -o -``, ``arecord -t raw``) share this: start it,
keep the last lines of its standard error (where such tools say why they failed: the last one
that reads like an error is quoted, not a trailing INFO line), read its output without blocking
past a poll interval, and stop it."""

from __future__ import annotations

import os
import re
import select
import shutil
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from edge_agent.errors import SourceError, first_line

STOP_TIMEOUT_S = 2.0
STDERR_LINES = 20  # the tail of a tool's standard error kept to say why it exited
#: A line of a tool's log that says why it failed: rpicam-apps' ``ERROR: *** … ***``,
#: libcamera's ``[…] ERROR …``, ``failed to …``, ``Unable to …``, arecord's ``… error: …``.
_ERROR_WORDS = re.compile(
    r"\berror\b|\bfail(?:ed|ure|s)?\b|no cameras|\bcannot\b|can't|could not|unable to|"
    r"not found|no such|denied|\bbusy\b",
    re.IGNORECASE,
)
_LIBCAMERA_CHATTER = re.compile(r"\]\s+(?:DEBUG|INFO)\s")  # "[0:00:00.300] [1] INFO RPI …"


def reason_line(lines: Sequence[str]) -> str | None:
    """The line of a tool's standard error that best says why it stopped: the last one that
    reads like an error, else the last line (None when there is none)."""
    for line in reversed(lines):
        if _ERROR_WORDS.search(line) and not _LIBCAMERA_CHATTER.search(line):
            return line
    return lines[-1] if lines else None


def find_binary(label: str, names: Sequence[str], hint: str) -> str:
    """The first of ``names`` on PATH, else SourceError naming them and how to install one."""
    for name in names:
        found = shutil.which(name) if name else None
        if found:
            return found
    raise SourceError(f"{label}: {' or '.join(names)} not found; {hint}")


def wait_for_output(
    label: str,
    name: str,
    read_some: Callable[[float], bool],
    stop: threading.Event,
    timeout_s: float,
    poll_s: float,
) -> None:
    """Connected means the tool delivers, not that it started (a camera takes a second or two,
    a missing device makes the tool exit): call ``read_some(poll_s)`` until it returns True,
    ``stop`` is set, or ``timeout_s`` passes (SourceError)."""
    deadline = time.monotonic() + timeout_s
    while not stop.is_set():
        if read_some(poll_s):
            return
        if time.monotonic() > deadline:
            raise SourceError(f"{label}: {name} sent nothing in {timeout_s:g} s")


class PipeProcess:
    """One run of a capture tool whose standard output is the data."""

    def __init__(self, label: str, command: Sequence[str]) -> None:
        self.label = label
        self.name = os.path.basename(command[0])
        self.stderr: deque[str] = deque(maxlen=STDERR_LINES)
        try:
            self.proc = subprocess.Popen(
                list(command),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                bufsize=0,
            )
        except OSError as exc:
            raise SourceError(f"{label}: cannot start {command[0]}: {first_line(exc)}") from exc
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self._fd = self.proc.stdout.fileno()
        self._stderr_thread = threading.Thread(
            target=self._drain_stderr, args=(self.proc.stderr,), name=f"{self.name}-stderr",
            daemon=True,
        )  # fmt: skip
        self._stderr_thread.start()

    def read_into(self, buf: memoryview, timeout: float | None) -> int:
        """Read what the pipe holds into ``buf``: the byte count, 0 when nothing came within
        ``timeout``. Raises SourceError when the tool has exited."""
        readable, _, _ = select.select([self._fd], [], [], timeout)
        if not readable:
            return 0
        n = os.readv(self._fd, [buf])
        if n == 0:
            raise self.exited()
        return n

    def exited(self) -> SourceError:
        """The error for a tool that closed its output: its exit code and why it says it stopped
        (:func:`reason_line`)."""
        try:
            code: int | None = self.proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            code = None
        else:  # exited: its standard error ends too, so wait (briefly) for its last lines
            self._stderr_thread.join(STOP_TIMEOUT_S)
        line = reason_line(list(self.stderr))
        said = f": {line}" if line else ""
        return SourceError(f"{self.label}: {self.name} exited (code {code}){said}")

    def _drain_stderr(self, pipe: Any) -> None:
        with pipe:
            for raw in iter(pipe.readline, b""):
                line = raw.decode(errors="replace").strip()
                if line:
                    self.stderr.append(line)

    def stop(self) -> None:
        """Terminate the tool (kill it if it does not exit) and close the pipe. Idempotent."""
        proc = self.proc
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(STOP_TIMEOUT_S)
        if proc.stdout is not None:
            proc.stdout.close()


__all__ = [
    "STDERR_LINES",
    "STOP_TIMEOUT_S",
    "PipeProcess",
    "find_binary",
    "reason_line",
    "wait_for_output",
]
