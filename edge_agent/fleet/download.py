"""Resumable HTTP(S) download of an update (a model bundle), standard library only.

:func:`download` writes to ``<dest>.part`` and renames it to ``dest`` only once the whole file is
there and its size and sha256 match what the caller expects, so ``dest`` is never a partial or
wrong file. An interrupted transfer keeps the ``.part``; the next call resumes it with
``Range: bytes=<size>-``:

- ``206 Partial Content`` whose ``Content-Range`` starts at the part's size: append;
- ``200 OK`` (the server ignored the Range): start again from zero;
- ``416 Range Not Satisfiable`` while the part already has all the bytes: it is complete.

The bytes are hashed as they stream (after hashing the existing part when resuming), flushed as
they arrive, and ``fsync``-ed before the rename. A size or sha256 mismatch deletes the ``.part``
(it can never become right) and raises. Nothing larger than ``max_bytes`` is ever written: a
``Content-Length`` over the limit is refused before reading, and reading stops at the limit.

Plain ``http://`` is allowed on purpose: what is downloaded is a signed bundle, verified
(signature and every artifact's sha256) before anything in it is used, so the transport does not
have to be trusted. ``https://`` uses ``ssl.create_default_context(cafile=ca_file)``: the system's
CAs, or only ``ca_file`` when given.

Credentials in the URL (``https://user:password@host/...``) go as HTTP Basic to that server only:
a redirect to another scheme, host or port is followed without them (they would otherwise reach
whatever server the redirect names).

Errors are :class:`~edge_agent.errors.UpdateError`, one line naming the URL (without its
credentials or query string) and the problem: an HTTP status, a timeout, a lost connection, a
size or sha256 mismatch, a file too large.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import os
import re
import socket
import ssl
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import IO, BinaryIO, NoReturn

from edge_agent.common.durable import fsync_dir
from edge_agent.common.hashing import sha256_prefix
from edge_agent.common.urls import INVALID_URL, redact_url
from edge_agent.errors import UpdateError, first_line

__all__ = ["CHUNK_SIZE", "download"]

CHUNK_SIZE = 64 * 1024
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)\s*\Z", re.IGNORECASE)
_UNSATISFIED_RANGE = re.compile(r"bytes\s+\*/(\d+)\s*\Z", re.IGNORECASE)
_SHA256 = re.compile(r"[0-9a-f]{64}\Z")


def _request(url: str, offset: int) -> urllib.request.Request:
    """A GET without the URL's credentials (sent as basic auth instead), asking for bytes from
    ``offset`` on when resuming."""
    parts = urllib.parse.urlsplit(url)
    headers = {"Accept-Encoding": "identity", "User-Agent": "edge-agent"}
    netloc = parts.netloc
    if "@" in netloc:
        netloc = netloc.rsplit("@", 1)[1]
        user = urllib.parse.unquote(parts.username or "")
        password = urllib.parse.unquote(parts.password or "")
        token = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
        headers["Authorization"] = f"Basic {token}"
    if offset:
        headers["Range"] = f"bytes={offset}-"
    clean = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, parts.query, ""))
    return urllib.request.Request(clean, headers=headers)


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    return (
        scheme,
        (parts.hostname or "").lower(),
        parts.port or {"http": 80, "https": 443}.get(scheme),
    )


class _RedirectHandler(urllib.request.HTTPRedirectHandler):
    """Follows redirects, dropping the credentials (``Authorization``) when one leads to
    another origin (scheme, host or port): they were given for the first server only."""

    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: IO[bytes],
        code: int,
        msg: str,
        headers: http.client.HTTPMessage,
        newurl: str,
    ) -> urllib.request.Request | None:
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and _origin(new.full_url) != _origin(req.full_url):
            for name in [k for k in new.headers if k.lower() in ("authorization", "cookie")]:
                del new.headers[name]
        return new


def _describe(exc: BaseException, timeout: float) -> str:
    """One line for a network error: a timeout, a TLS failure, a refused connection..."""
    reason: object = exc.reason if isinstance(exc, urllib.error.URLError) else exc
    if isinstance(reason, (socket.timeout, TimeoutError)):
        return f"timed out after {timeout:g} s"
    if isinstance(reason, ssl.SSLCertVerificationError):
        return f"TLS certificate not trusted: {reason.verify_message or first_line(reason)}"
    if isinstance(reason, BaseException):
        return first_line(reason)
    return str(reason)


def _int_header(value: str | None) -> int | None:
    if value is None or not value.strip().isdigit():
        return None
    return int(value)


class _Download:
    """One :func:`download` call: the ``.part``, how much of it is there, its running hash."""

    def __init__(
        self,
        url: str,
        dest: Path,
        *,
        expected_size: int | None,
        sha256: str | None,
        timeout: float,
        max_bytes: int,
        opener: urllib.request.OpenerDirector,
        progress: Callable[[int, int | None], None] | None,
    ) -> None:
        self.url = url
        self.safe = redact_url(url)
        self.dest = dest
        self.part = dest.with_suffix(dest.suffix + ".part")
        self.expected_size = expected_size
        self.sha256 = sha256
        self.timeout = timeout
        self.max_bytes = max_bytes
        self.opener = opener
        self.progress = progress
        self.total: int | None = None  # the whole file's size, when the server said it
        self.offset = self.part.stat().st_size if self.part.is_file() else 0
        if self.offset > self._limit:  # left by another download: not a prefix of this file
            self.restart()
        self.digest = sha256_prefix(self.part, self.offset)[1] if self.offset else hashlib.sha256()

    @property
    def _limit(self) -> int:
        size = self.expected_size
        return self.max_bytes if size is None else min(size, self.max_bytes)

    def restart(self) -> None:
        """Forget the part: the next bytes written are the file's first."""
        self.part.unlink(missing_ok=True)
        self.offset = 0
        self.digest = hashlib.sha256()

    def fail(self, problem: str, *, discard: bool = False) -> NoReturn:
        """Raise the one-line error; ``discard`` deletes a part that can never become right."""
        if discard:
            self.part.unlink(missing_ok=True)
        raise UpdateError(f"{self.safe}: {problem}")

    def run(self) -> Path:
        # A second request only after dropping a part the server would not continue.
        if not self._request() and not self._request():
            self.fail("the server does not continue the download from the requested byte")
        size, sha = self.expected_size, self.sha256
        if size is not None and self.offset != size:
            self.fail(f"size mismatch: got {self.offset} bytes, expected {size}", discard=True)
        if sha is not None and self.digest.hexdigest() != sha:
            got = self.digest.hexdigest()
            self.fail(f"sha256 mismatch: got {got}, expected {sha}", discard=True)
        os.replace(self.part, self.dest)
        fsync_dir(self.dest.parent)
        return self.dest

    def _request(self) -> bool:
        """One GET (with a Range when resuming). True when the part is now complete; False when
        it was dropped and the download must start again from zero."""
        try:
            response = self.opener.open(_request(self.url, self.offset), timeout=self.timeout)
        except urllib.error.HTTPError as exc:
            with exc:
                if exc.code != 416 or not self.offset:
                    self.fail(f"HTTP {exc.code} {exc.reason}")
                match = _UNSATISFIED_RANGE.match(exc.headers.get("Content-Range", ""))
                total = int(match.group(1)) if match else self.expected_size
            if total != self.offset:
                self.restart()
                return False
            self.total = total  # 416 for bytes=<size>-: the part already has every byte
            self._report()
            return True
        except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as exc:
            self.fail(_describe(exc, self.timeout))  # ValueError: e.g. http.client.InvalidURL
        with response:
            status = response.status
            if status == 206:
                match = _CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
                if match is None or int(match.group(1)) != self.offset:
                    self.restart()
                    return False
                total = None if match.group(3) == "*" else int(match.group(3))
            elif status == 200:  # a full response: the server ignored (or was not sent) a Range
                if self.offset:
                    self.restart()
                total = _int_header(response.headers.get("Content-Length"))
            else:
                self.fail(f"unexpected HTTP {status} {response.reason}")
            if total is not None and self.expected_size is not None and total != self.expected_size:
                self.fail(
                    f"size mismatch: the server has {total} bytes, expected {self.expected_size}",
                    discard=True,
                )
            if total is not None and total > self.max_bytes:
                self.fail(f"too large: {total} bytes, the limit is {self.max_bytes}", discard=True)
            self.total = total
            with self.part.open("ab" if self.offset else "wb") as f:
                try:
                    self._stream(response, f)
                finally:
                    f.flush()
                    os.fsync(f.fileno())
        if total is not None and self.offset < total:
            self.fail(f"connection closed after {self.offset} of {total} bytes")
        return True

    def _stream(self, response: http.client.HTTPResponse, f: BinaryIO) -> None:
        while True:
            try:
                chunk = response.read1(CHUNK_SIZE)  # what has arrived, up to a chunk
            except http.client.IncompleteRead:  # closed inside a chunk (chunked encoding)
                self.fail(f"connection closed after {self.offset} bytes")
            except (OSError, http.client.HTTPException) as exc:
                self.fail(f"{_describe(exc, self.timeout)}, {self.offset} bytes received")
            if not chunk:
                return
            if self.offset + len(chunk) > self._limit:
                if self.expected_size is not None and self.expected_size <= self.max_bytes:
                    problem = f"size mismatch: more than the expected {self.expected_size} bytes"
                else:
                    problem = f"too large: more than {self.max_bytes} bytes"
                self.fail(problem, discard=True)
            f.write(chunk)
            f.flush()
            self.digest.update(chunk)
            self.offset += len(chunk)
            self._report()

    def _report(self) -> None:
        if self.progress is not None:
            self.progress(self.offset, self.total if self.total is not None else self.expected_size)


def download(
    url: str,
    dest: Path,
    *,
    expected_size: int | None = None,
    expected_sha256: str | None = None,
    timeout: float = 30.0,
    max_bytes: int = 512 * 2**20,
    ca_file: Path | None = None,
    progress: Callable[[int, int | None], None] | None = None,
) -> Path:
    """Download ``url`` to ``dest``, resuming ``<dest>.part`` when one is there; return ``dest``.

    ``expected_size`` and ``expected_sha256`` (64 hex digits) are checked before the rename;
    without them a transfer the server ends early without a ``Content-Length`` cannot be told
    from a complete one, so callers with a manifest should pass both. ``timeout`` bounds the
    connection and every read, in seconds. ``progress(done, total)`` is called after each chunk
    (``total`` is None when unknown). A resumed part that belonged to another version of the file
    fails the sha256 check and is deleted, so the next call starts from zero.

    Raises :class:`~edge_agent.errors.UpdateError`.
    """
    safe = redact_url(url)
    if safe == INVALID_URL:
        raise UpdateError(f"{INVALID_URL}: cannot parse the download URL")
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme not in ("http", "https"):
        raise UpdateError(f"{safe}: not an http:// or https:// URL")
    sha256 = expected_sha256.lower() if expected_sha256 is not None else None
    if sha256 is not None and not _SHA256.match(sha256):
        raise UpdateError(f"{safe}: the expected sha256 is not 64 hex digits: {expected_sha256!r}")
    if expected_size is not None and expected_size > max_bytes:
        raise UpdateError(
            f"{safe}: too large: {expected_size} bytes expected, the limit is {max_bytes}"
        )
    context: ssl.SSLContext | None = None
    if scheme == "https":
        try:
            context = ssl.create_default_context(cafile=None if ca_file is None else str(ca_file))
        except (OSError, ssl.SSLError) as exc:
            raise UpdateError(f"{safe}: cannot load CA file {ca_file}: {first_line(exc)}") from exc
    opener = urllib.request.build_opener(
        urllib.request.HTTPSHandler(context=context), _RedirectHandler()
    )
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    transfer = _Download(
        url,
        dest,
        expected_size=expected_size,
        sha256=sha256,
        timeout=timeout,
        max_bytes=max_bytes,
        opener=opener,
        progress=progress,
    )
    return transfer.run()
