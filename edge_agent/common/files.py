"""Reading the small text files the agent is configured by (its config, secrets), and telling
a file from its replacement."""

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


def file_identity(path: Path) -> tuple[str, int, int]:
    """The file as a key for what was learnt from it once (its real path, size and modification
    time): a load of the same file again finds it; a new file in its place does not."""
    st = path.stat()
    return str(path.resolve()), st.st_size, st.st_mtime_ns


__all__ = ["file_identity", "read_text"]
