"""The CLI's points in time: ``--since`` and ``--until`` of ``collect``, ``export`` and
``history``.

A module of its own, importing nothing heavy: ``edgectl history`` is a command a user runs and
waits for, so its import path holds only what it uses (``benchmarks/fleet.py`` times it).
"""

from __future__ import annotations

import calendar
import re
import time

from edge_agent.errors import EdgeError


def parse_since(text: str, *, now: float | None = None, what: str = "--since") -> float:
    """``--since`` (or ``what``: ``--until``): a duration ago (``90s``, ``30m``, ``2h``,
    ``7d``), a Unix time, or an ISO 8601 UTC date / time (``2026-12-01``, ``2026-12-01T10:30``,
    with or without ``Z``)."""
    now = time.time() if now is None else now
    value = text.strip()
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd])", value)
    if m:
        return now - float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
    if re.fullmatch(r"\d{9,}(\.\d+)?", value):
        return float(value)
    for fmt in ("%Y-%m-%dT%H:%M:%S", "%Y-%m-%dT%H:%M", "%Y-%m-%d"):
        try:
            return float(calendar.timegm(time.strptime(value.rstrip("Z"), fmt)))
        except ValueError:
            continue
    raise EdgeError(
        f"{what} {text!r}: expected a duration ago (30m, 2h, 7d), a Unix time or an ISO date "
        "(2026-12-01 or 2026-12-01T10:30, UTC)"
    )


def time_range(
    since: str | None, until: str | None, *, since_default: str | None
) -> tuple[float, float]:
    """``--since`` / ``--until`` as Unix times: ``since`` (else ``since_default``; neither: the
    beginning), ``until`` (else a second from now). Raises :class:`EdgeError` when ``until`` is
    not after ``since``."""
    now = time.time()
    since_text = since or since_default
    start = parse_since(since_text, now=now) if since_text else 0.0
    end = parse_since(until, now=now, what="--until") if until else now + 1.0
    if end <= start:
        raise EdgeError(f"--until {until!r} is not after --since {since_text!r}")
    return start, end
