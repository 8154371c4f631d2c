"""A token bucket that counts what it refused, and reports the count at most once per window.

The agent puts one in front of its orders (``[fleet] command_rate`` / ``command_burst``): a
flood of commands is dropped before any parsing or signature check, and the drops are said in
one event per window (never one per drop: that would be a flood of its own).

::

    bucket = TokenBucket(rate=5.0, burst=20)
    if not bucket.take():          # on the network thread, per message: O(1), no allocation
        return
    dropped = bucket.report()      # on a periodic tick: a count to say, or None
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

#: A burst of drops is reported once it has been quiet this long (or after ``window``).
QUIET_S = 1.0


class TokenBucket:
    """``burst`` tokens, refilled at ``rate`` per second; :meth:`take` spends one or refuses.

    Refusals are counted. :meth:`report` returns the count (and resets it) at most once per
    ``window`` seconds: when the refusals have stopped for :data:`QUIET_S`, or, under a flood
    that does not stop, once ``window`` has passed since the first unreported one. ``rate = 0``
    means no limit. Thread-safe."""

    def __init__(
        self,
        *,
        rate: float,
        burst: int,
        window: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not (rate >= 0 and math.isfinite(rate)):
            raise ValueError(f"rate = {rate}: must be a finite number >= 0")
        if burst < 1:
            raise ValueError(f"burst = {burst}: must be >= 1")
        self.rate = float(rate)
        self.burst = int(burst)
        self.window = float(window)
        self._clock = clock
        self._lock = threading.Lock()
        self._tokens = float(burst)
        self._stamp = clock()
        self._dropped = 0  # refused since the last report
        self._first_drop = 0.0
        self._last_drop = 0.0
        self._last_report = -math.inf

    def take(self, *, count: bool = True) -> bool:
        """Spend a token: True, or False when the bucket is empty (counted as a refusal unless
        ``count`` is false: something that will be retried, not dropped)."""
        if not self.rate:
            return True
        with self._lock:
            now = self._clock()
            self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now
            if self._tokens >= 1.0:
                self._tokens -= 1.0
                return True
            if not count:
                return False
            if not self._dropped:
                self._first_drop = now
            self._dropped += 1
            self._last_drop = now
            return False

    def report(self) -> int | None:
        """The refusals to say now (see the class docstring), or None."""
        with self._lock:
            if not self._dropped:
                return None
            now = self._clock()
            if now - self._last_report < self.window:
                return None
            settled = now - self._last_drop >= QUIET_S
            if not settled and now - self._first_drop < self.window:
                return None
            count, self._dropped = self._dropped, 0
            self._last_report = now
            return count


__all__ = ["QUIET_S", "TokenBucket"]
