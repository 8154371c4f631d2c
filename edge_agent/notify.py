"""systemd's readiness and watchdog protocol (``sd_notify``), without libsystemd.

The unit (``systemd/edge-agent.service``) is ``Type=notify`` with ``WatchdogSec=30``. systemd
then passes two things in the environment:

- ``NOTIFY_SOCKET``: a unix datagram socket, a path (``/run/systemd/notify``) or an abstract
  name (``@name``). Each datagram is newline-separated ``KEY=value`` lines: ``READY=1`` (start-up
  done: the model is loaded), ``STATUS=...`` (one line shown by ``systemctl status``),
  ``WATCHDOG=1`` (a ping), ``STOPPING=1``, ``RELOADING=1``.
- ``WATCHDOG_USEC`` (and ``WATCHDOG_PID``): the watchdog timeout. When no ping arrives within
  it, systemd kills the service with SIGABRT and ``Restart=on-failure`` starts it again.

Outside systemd (``NOTIFY_SOCKET`` unset) every :class:`Notifier` call is a no-op. A send that
fails is counted in :attr:`Notifier.failures`, logged once, and never raised: losing a status
line must not take the agent down.

**The watchdog proves that the loop is alive, not only that the interpreter runs.** Pinging
from a timer thread would go on being "healthy" while an inference call hangs in a driver. So
the pings are tied to the loop:

- the main loop asks the pipeline how long it has been stuck (``Pipeline.stalled_s``: the time
  since the capture loop last went round, or the age of an inference call that has not
  returned). Frames inferred, frames skipped by the motion gate, and a source that is quiet or
  being reconnected all keep the capture loop going round; while it is below
  ``[pipeline] stall_timeout`` (default: the watchdog timeout) the main loop calls
  :meth:`Watchdog.progress` (it stores ``time.monotonic()``, nothing else);
- the main loop calls :meth:`Watchdog.tick` at least every :attr:`Watchdog.interval` seconds
  (half the timeout). It sends ``WATCHDOG=1`` only if ``progress()`` was called within the
  stall timeout (by default the watchdog timeout itself).

When an inference call or the capture loop hangs, ``progress()`` stops, ``tick()`` stops
pinging, and systemd restarts the service. ``READY=1`` is sent once the model is loaded and the
source is open (a camera or a stream: its first frame) or being retried, not at the first
result::

    notifier = Notifier()                   # from $NOTIFY_SOCKET; a no-op outside systemd
    watchdog = Watchdog(notifier)           # timeout from $WATCHDOG_USEC
    load_model(); notifier.ready()
    # main loop: while not should_exit:
    #     if pipeline.stalled_s() < stall_timeout: watchdog.progress()
    #     watchdog.tick(); sleep(watchdog.interval)
    notifier.stopping()
"""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Mapping

log = logging.getLogger(__name__)

__all__ = ["Notifier", "Watchdog", "watchdog_interval", "watchdog_timeout"]

_KEY = re.compile(r"[A-Z][A-Z0-9_]*\Z")
_SEND_TIMEOUT = 1.0  # seconds: the most a send may block when systemd's queue is full


def _parse_address(value: str) -> str | None:
    """``/path`` -> the path, ``@name`` -> ``\\0name`` (Linux abstract namespace), else None."""
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    return None


class Notifier:
    """Sends ``sd_notify`` messages to ``$NOTIFY_SOCKET`` (or to ``address``).

    ``address`` is a socket path or an abstract ``@name``; when it is None the environment's
    ``NOTIFY_SOCKET`` is used (``environ`` defaults to ``os.environ``). With neither, or with an
    address this class cannot use (e.g. systemd 254's ``vsock:``), every call is a no-op that
    returns False. Methods return True when the datagram was sent.
    """

    def __init__(
        self, *, address: str | None = None, environ: Mapping[str, str] | None = None
    ) -> None:
        env = os.environ if environ is None else environ
        raw = address if address is not None else env.get("NOTIFY_SOCKET", "")
        self._address: str | None = None
        if raw:
            self._address = _parse_address(raw)
            if self._address is None:
                log.warning("NOTIFY_SOCKET=%r: not a path or @abstract name; not notifying", raw)
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self.sent = 0
        """Datagrams sent."""
        self.failures = 0
        """Sends that failed (logged once, then counted)."""

    @property
    def enabled(self) -> bool:
        """True when there is a socket to notify (running under systemd ``Type=notify``)."""
        return self._address is not None

    def ready(self, *, status: str | None = None) -> bool:
        """Start-up is done (``READY=1``), optionally with a status line."""
        if status is None:
            return self.notify(READY=1)
        return self.notify(READY=1, STATUS=_one_line(status))

    def status(self, text: str) -> bool:
        """One line of state for ``systemctl status`` (newlines become spaces)."""
        return self.notify(STATUS=_one_line(text))

    def watchdog(self) -> bool:
        """An unconditional watchdog ping. The agent pings through :meth:`Watchdog.tick`."""
        return self.notify(WATCHDOG=1)

    def stopping(self) -> bool:
        """Shutdown has begun (``STOPPING=1``)."""
        return self.notify(STOPPING=1)

    def reloading(self) -> bool:
        """A reload has begun. Send :meth:`ready` when it is done. ``MONOTONIC_USEC`` is what
        systemd >= 253 requires with ``RELOADING=1``; older versions ignore it."""
        return self.notify(RELOADING=1, MONOTONIC_USEC=time.monotonic_ns() // 1000)

    def notify(self, **fields: str | int) -> bool:
        """Send ``KEY=value`` lines in the given order, e.g. ``notify(STATUS="x", ERRNO=5)``.

        A key that is not upper-case or a value with a newline is a programming error
        (``ValueError``); a failure to send is counted, not raised.
        """
        if not fields:
            raise ValueError("notify() needs at least one KEY=value field")
        lines = []
        for key, value in fields.items():
            if not _KEY.match(key):
                raise ValueError(f"notify: field name {key!r} must match [A-Z][A-Z0-9_]*")
            text = str(int(value)) if isinstance(value, bool) else str(value)
            if "\n" in text:
                raise ValueError(f"notify: {key}={text!r}: the value must be one line")
            lines.append(f"{key}={text}")
        return self._send("\n".join(lines).encode())

    def close(self) -> None:
        """Close the socket (a later send opens a new one)."""
        with self._lock:
            self._drop()

    def __enter__(self) -> Notifier:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _send(self, data: bytes) -> bool:
        if self._address is None:
            return False
        with self._lock:
            try:
                if self._sock is None:
                    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                    try:
                        sock.settimeout(_SEND_TIMEOUT)
                        # Connected, so a full receive queue blocks (bounded by the timeout)
                        # instead of spinning, and a vanished socket shows as an error.
                        sock.connect(self._address)
                    except BaseException:
                        sock.close()
                        raise
                    self._sock = sock
                self._sock.send(data)
            except OSError as exc:
                # Drop the socket: systemd may have re-bound it (daemon-reexec); reconnect next.
                self._drop()
                self.failures += 1
                level = logging.WARNING if self.failures == 1 else logging.DEBUG
                log.log(
                    level,
                    "sd_notify to %s failed (%d so far): %s",
                    self._shown(),
                    self.failures,
                    exc,
                )
                return False
            self.sent += 1
            return True

    def _drop(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _shown(self) -> str:
        addr = self._address or ""
        return "@" + addr[1:] if addr.startswith("\0") else addr

    def __repr__(self) -> str:
        where = self._shown() if self.enabled else "disabled"
        return f"Notifier({where}, sent={self.sent}, failures={self.failures})"


def _one_line(text: str) -> str:
    return " ".join(text.splitlines())


def watchdog_timeout(environ: Mapping[str, str] | None = None) -> float | None:
    """The watchdog timeout systemd set for this process, in seconds, or None.

    None when ``WATCHDOG_USEC`` is unset, not a positive integer, or when ``WATCHDOG_PID`` is set
    to another process's id (the variables were inherited, not meant for us).
    """
    env = os.environ if environ is None else environ
    usec = env.get("WATCHDOG_USEC", "")
    pid = env.get("WATCHDOG_PID", "")
    if pid and pid.strip() != str(os.getpid()):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 1e6 if value > 0 else None


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """How often to ping, in seconds: half the watchdog timeout (systemd's advice), or None
    when no watchdog is set (see :func:`watchdog_timeout`)."""
    timeout = watchdog_timeout(environ)
    return None if timeout is None else timeout / 2


class Watchdog:
    """Pings systemd's watchdog only while the inference loop makes progress (see the module
    docstring).

    ``timeout``: the stall budget in seconds; by default the watchdog timeout from
    ``$WATCHDOG_USEC``. With no timeout at all (not under a systemd watchdog), :meth:`tick`
    never sends. ``clock`` is a seam for tests (default ``time.monotonic``). The grace period
    starts at construction: create the watchdog when the loop is about to start.
    """

    def __init__(
        self,
        notifier: Notifier,
        *,
        timeout: float | None = None,
        environ: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if timeout is None:
            timeout = watchdog_timeout(environ)
        elif not timeout > 0:
            raise ValueError(f"Watchdog: timeout = {timeout}: must be > 0 seconds")
        self._notifier = notifier
        self._timeout: float | None = timeout
        self._clock = clock
        self._last_progress = clock()
        self._last_ping: float | None = None
        self.pings = 0
        """``WATCHDOG=1`` datagrams sent by :meth:`tick`."""

    @property
    def timeout(self) -> float | None:
        """The stall budget in seconds (None: no watchdog)."""
        return self._timeout

    @property
    def interval(self) -> float | None:
        """Call :meth:`tick` at least this often (half the timeout; None: no watchdog)."""
        return None if self._timeout is None else self._timeout / 2

    def progress(self) -> None:
        """The loop advanced (a frame was processed). Cheap: one clock read and a store."""
        self._last_progress = self._clock()

    def since_progress(self) -> float:
        """Seconds since the last :meth:`progress` (or construction)."""
        return self._clock() - self._last_progress

    @property
    def stalled(self) -> bool:
        """True when no progress was seen within the timeout (pings have stopped)."""
        return self._timeout is not None and self.since_progress() > self._timeout

    def tick(self) -> bool:
        """Ping systemd if progress was seen within the timeout; returns True if it pinged.

        Safe to call as often as the main loop likes: pings are at most one per quarter
        timeout, so calling it every :attr:`interval` never lets the timeout pass unpinged.
        """
        if self._timeout is None:
            return False
        now = self._clock()
        if now - self._last_progress > self._timeout:
            return False
        if self._last_ping is not None and now - self._last_ping < self._timeout / 4:
            return False
        if not self._notifier.watchdog():
            return False
        self._last_ping = now
        self.pings += 1
        return True
