"""Durable file writes: what survives a crash or a power loss, in one place.

:func:`atomic_write` replaces a file so that afterwards it holds the old bytes or the new ones,
whole (temporary file, fsync, rename, fsync of the directory). :func:`fsync_dir` makes a rename
durable. The bundle writer, the HTTP download and the OTA state all use these.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (POSIX); a no-op where directories cannot be
    opened or synced (some file systems refuse it)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_temp(path: Path, data: bytes, *, mode: int = 0o666, exact: bool = False) -> Path:
    """Write ``data`` to a new temporary file beside ``path`` and fsync it; returns its path
    (the caller renames it over ``path``, or removes it). Created with ``mode`` less the umask
    (``exact``: ``mode`` itself), so a ``0o600`` secret is never readable by others, not even
    for a moment. The file is new (``O_EXCL``, a random name, no symlink followed): nobody can
    have placed it, or a link in its name, beforehand."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(tmp, flags, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            if exact:
                os.fchmod(fh.fileno(), mode)
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def atomic_write(path: Path, data: bytes, *, mode: int = 0o666) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves the old or the new file, whole
    (:func:`write_temp`, then a rename and an fsync of the directory)."""
    tmp = write_temp(path, data, mode=mode)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
