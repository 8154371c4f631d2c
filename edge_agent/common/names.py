"""Names that travel: a stream's name is a field in results and a label in telemetry and
Prometheus, so it is kept to characters every one of those takes as they are."""

from __future__ import annotations

import re

_STREAM_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def stream_name_problem(name: str) -> str | None:
    """Why ``name`` cannot name a stream, or None when it can (1-64 of letters, digits,
    ``_``, ``-`` and ``.``)."""
    if _STREAM_NAME.fullmatch(name):
        return None
    return f"stream name {name!r}: use 1-64 letters, digits, '_', '-' or '.' (e.g. front-door)"


__all__ = ["stream_name_problem"]
