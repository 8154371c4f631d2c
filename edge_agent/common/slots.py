"""A one-slot queue where the newest item wins."""

from __future__ import annotations

import contextlib
import queue
from typing import Any


def put_latest(slot: queue.Queue[Any], item: Any) -> None:
    """Put ``item``, replacing whatever waits (a flood of requests holds one, not a queue)."""
    while True:
        try:
            slot.put_nowait(item)
            return
        except queue.Full:
            with contextlib.suppress(queue.Empty):
                slot.get_nowait()
