"""A capture tool on a pipe: the sources that run a program which writes raw frames or samples to
its standard output (``rpicam-vid --codec yuv420 -o -``, ``arecord -t raw``) share this: start it,
keep the last lines of its standard error (where such tools say why they failed), read its
output without blocking past a poll interval, and stop it."""

from __future__ import annotations

import os
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
        self.stderr: deque[str] = deque(maxlen=5)
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
        threading.Thread(
            target=self._drain_stderr, args=(self.proc.stderr,), name=f"{self.name}-stderr",
            daemon=True,
        ).start()  # fmt: skip

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
        """The error for a tool that closed its output: its exit code and last word."""
        try:
            code: int | None = self.proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            code = None
        said = f": {self.stderr[-1]}" if self.stderr else ""
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


__all__ = ["STOP_TIMEOUT_S", "PipeProcess", "find_binary", "wait_for_output"]
