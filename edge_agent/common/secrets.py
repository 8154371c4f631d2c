"""Secrets read from files: passwords, tokens, passphrases (never from flags or the config).

A bare file name is looked up in ``$CREDENTIALS_DIRECTORY`` (systemd ``LoadCredential``); a file
that group or others may read is used, with one warning per file (``chmod 600`` it).
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

from edge_agent.common.files import read_text
from edge_agent.errors import ConfigError

log = logging.getLogger(__name__)

_warned: set[str] = set()


def credential_path(name: str, *, environ: dict[str, str] | None = None) -> Path:
    """A secret's file: an absolute or relative path as given, or a bare name inside
    ``$CREDENTIALS_DIRECTORY`` (systemd ``LoadCredential=NAME:PATH``) when that is set."""
    env = os.environ if environ is None else environ
    path = Path(name)
    creds = env.get("CREDENTIALS_DIRECTORY")
    if creds and not path.is_absolute() and len(path.parts) == 1:
        candidate = Path(creds) / name
        if candidate.exists():
            return candidate
    return path


def exposure_problem(path: Path) -> str | None:
    """Why ``path`` is too open for a secret (group or world readable), or None."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return None
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        who = "others" if mode & stat.S_IROTH else "its group"
        return f"readable by {who} (mode {mode & 0o777:o}); chmod 600 it"
    return None


def read_secret(name: str, *, what: str) -> str:
    """The secret in file ``name`` (without its trailing newline), or ConfigError naming
    ``what`` (the setting) and the file."""
    path = credential_path(name)
    text = read_text(path, what=what)
    secret = text.strip("\r\n")
    if not secret:
        raise ConfigError(f"{what} {path}: the file is empty")
    problem = exposure_problem(path)
    if problem and str(path) not in _warned:
        _warned.add(str(path))
        log.warning("%s %s: %s", what, path, problem)
    return secret


__all__ = ["credential_path", "exposure_problem", "read_secret"]
