"""SHA-256 of files, read in blocks (bundles are tens of MB; a device has little memory)."""

from __future__ import annotations

import hashlib
from pathlib import Path

BLOCK = 1 << 20


def sha256_prefix(path: str | Path, limit: int | None = None) -> tuple[int, hashlib._Hash]:
    """``(bytes read, the hashlib state)`` after the first ``limit`` bytes of ``path`` (all of it
    when ``limit`` is None): the state can go on hashing, as a resumed download does."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while limit is None or size < limit:
            want = BLOCK if limit is None else min(BLOCK, limit - size)
            block = f.read(want)
            if not block:
                break
            digest.update(block)
            size += len(block)
    return size, digest


def sha256_file(path: str | Path) -> str:
    """The hex SHA-256 of the whole file."""
    return sha256_prefix(path)[1].hexdigest()


__all__ = ["sha256_file", "sha256_prefix"]
