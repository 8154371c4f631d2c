"""URLs as they may appear in a message or a log: never with a password."""

from __future__ import annotations

import ipaddress
import re
import urllib.parse

_CREDENTIALS = re.compile(r"(://[^/:@]*):[^/@]*@")
INVALID_URL = "<invalid URL>"


def redact_uri(uri: str) -> str:
    """``uri`` with its password masked (``user:***@``) and everything else kept: a source's
    label, where the path and the query tell streams apart."""
    return _CREDENTIALS.sub(r"\1:***@", uri)


def with_password(uri: str, password: str) -> str:
    """``scheme://user@host/...`` with ``password`` put after the user (percent-encoded, so
    ``@``, ``:`` or ``/`` in it cannot change where the URI points). Only for handing to the
    library that opens the stream: never log or store the result."""
    parts = urllib.parse.urlsplit(uri)
    user, at, host = parts.netloc.rpartition("@")
    if not at or not user or ":" in user:
        raise ValueError("expected a URI with a user and no password (scheme://USER@HOST/...)")
    netloc = f"{user}:{urllib.parse.quote(password, safe='')}@{host}"
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


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


def url_host(host: str) -> str:
    """A URL's host as ``[ota] allowed_hosts`` compares it: lower case, and an IPv6 literal
    without its brackets, in its short form (``[0:0::1]``, ``::1`` -> ``::1``), as
    ``urlsplit(url).hostname`` gives it. A name or an IPv4 address is only lower-cased."""
    host = host.lower()
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if ":" in bare:
        try:
            return ipaddress.IPv6Address(bare).compressed
        except ValueError:
            pass
    return host


__all__ = ["INVALID_URL", "redact_uri", "redact_url", "url_host", "with_password"]
