"""Reading the small text files the agent is configured by (its config, secrets)."""

from __future__ import annotations

from pathlib import Path

from edge_agent.errors import ConfigError


def read_text(path: str | Path, *, what: str) -> str:
    """The file's text, or ConfigError ``"<what> <path>: no such file"`` / ``"…: cannot read it
    (<reason>)"`` / ``"…: not UTF-8 text (byte 0xff at offset 0)"``."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{what} {path}: no such file") from None
    except OSError as exc:
        raise ConfigError(f"{what} {path}: cannot read it ({exc.strerror})") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{what} {path}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset "
            f"{exc.start}); save it as UTF-8"
        ) from None


__all__ = ["read_text"]
