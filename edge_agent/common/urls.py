"""URLs as they may appear in a message or a log: never with a password."""

from __future__ import annotations

import re
import urllib.parse

_CREDENTIALS = re.compile(r"(://[^/:@]*):[^/@]*@")
INVALID_URL = "<invalid URL>"


def redact_uri(uri: str) -> str:
    """``uri`` with its password masked (``user:***@``) and everything else kept: a source's
    label, where the path and the query tell streams apart."""
    return _CREDENTIALS.sub(r"\1:***@", uri)


def redact_url(url: str) -> str:
    """``url`` reduced to scheme, host, port and path: no user, password, query (``?...`` marks
    that one was there) or fragment. For download URLs, whose query may hold a token."""
    try:
        parts = urllib.parse.urlsplit(url)
        netloc = parts.hostname or ""
        if ":" in netloc:
            netloc = f"[{netloc}]"
        if parts.port is not None:
            netloc += f":{parts.port}"
    except ValueError:
        return INVALID_URL
    query = "?..." if parts.query else ""
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", "")) + query


__all__ = ["INVALID_URL", "redact_uri", "redact_url"]
