"""Version precedence per semver.org (2.0.0, section 11): numeric major, minor and patch; a
pre-release below its release (``1.0.0-rc.1 < 1.0.0``); pre-release identifiers compared one by
one, numbers numerically and below words, which compare in ASCII order, and a longer list above
its prefix; build metadata (``+…``) ignored.

Versions that are not strict semver still get a total order: a leading ``v`` is dropped, missing
minor or patch parts count as 0 (``1.2`` = ``1.2.0``), and a part that is not a number sorts
above every number in its place."""

from __future__ import annotations

from typing import Any


def _identifier(part: str) -> tuple[int, int, str]:
    return (0, int(part), "") if part.isdigit() else (1, 0, part)


def version_key(version: str) -> tuple[Any, ...]:
    """A sort key: ``version_key(a) < version_key(b)`` when ``a`` has lower precedence."""
    text = version.strip()
    if text[:1] in ("v", "V") and text[1:2].isdigit():
        text = text[1:]
    text = text.partition("+")[0]  # build metadata never counts
    core, dash, pre = text.partition("-")
    parts = [_identifier(p) for p in core.split(".")]
    while len(parts) < 3:
        parts.append((0, 0, ""))
    while len(parts) > 3 and parts[-1] == (0, 0, ""):  # 1.2.0.0 = 1.2.0
        parts.pop()
    release = (1,) if not dash else (0, *(_identifier(p) for p in pre.split(".")))
    return (tuple(parts), release)


__all__ = ["version_key"]
