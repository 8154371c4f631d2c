"""Resumable downloads against a real HTTP(S) server on a loopback socket, whose handler
implements Range itself and can drop, stall, ignore Range or serve the wrong bytes."""

from __future__ import annotations

import hashlib
import random
import re
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from edge_agent.common.urls import redact_url
from edge_agent.errors import UpdateError
from edge_agent.fleet.download import download
from tests.broker import make_tls_material

SIZE = 1_000_000
DATA = random.Random(0).randbytes(SIZE)
SHA = hashlib.sha256(DATA).hexdigest()
PATH = "/bundles/model.edgebundle"


@dataclass
class Seen:
    path: str
    range: str | None
    status: int
    sent: int
    authorization: str | None


@dataclass
class Knobs:
    data: bytes = DATA
    drop_after: int | None = None  # body bytes, then close the connection
    stall_after: int | None = None  # body bytes, then go silent until the test ends
    ignore_range: bool = False  # always 200 with the whole file
    wrong_range: bool = False  # a 206 that starts at 0 whatever was asked
    wrong_bytes: bool = False  # the right length, one byte flipped
    no_length: bool = False  # no Content-Length: the body ends when the connection closes
    redirects: dict[str, str] = field(default_factory=dict)  # path -> 302 Location
    seen: list[Seen] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)


class _Server(ThreadingHTTPServer):
    knobs: Knobs


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        k = self.server.knobs
        self.close_connection = True
        # Recorded before anything is sent: the client may look as soon as it has the bytes.
        seen = Seen(self.path, self.headers.get("Range"), 0, 0, self.headers.get("Authorization"))
        k.seen.append(seen)
        if self.path in k.redirects:
            seen.status = 302
            self.send_response(302)
            self.send_header("Location", k.redirects[self.path])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if self.path.split("?")[0] != PATH:
            seen.status = 404
            self.send_error(404)
            return
        data = k.data
        if k.wrong_bytes:
            data = data[:1000] + bytes([data[1000] ^ 0xFF]) + data[1001:]
        start, status = 0, 200
        requested = self.headers.get("Range")
        if requested and not k.ignore_range:
            match = re.fullmatch(r"bytes=(\d+)-", requested)
            assert match, requested
            start, status = (0 if k.wrong_range else int(match.group(1))), 206
            if start >= len(data):
                seen.status = 416
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
        body = data[start:]
        seen.status = status
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Connection", "close")
        if not k.no_length:
            self.send_header("Content-Length", str(len(body)))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        cut = min(n for n in (k.drop_after, k.stall_after, len(body)) if n is not None)
        try:
            while seen.sent < cut:
                chunk = body[seen.sent : min(seen.sent + 16384, cut)]
                seen.sent += len(chunk)  # counted first, for the same reason
                self.wfile.write(chunk)
            self.wfile.flush()
            if k.stall_after is not None and cut == k.stall_after:
                k.release.wait(10)
        except OSError:  # the client went away (too large, timed out)
            pass


@dataclass
class Server:
    httpd: _Server
    scheme: str

    @property
    def knobs(self) -> Knobs:
        return self.httpd.knobs

    @property
    def seen(self) -> list[Seen]:
        return self.httpd.knobs.seen

    def url(self, path: str = PATH) -> str:
        return f"{self.scheme}://127.0.0.1:{self.httpd.server_address[1]}{path}"


def _serve(context: ssl.SSLContext | None = None) -> Iterator[Server]:
    httpd = _Server(("127.0.0.1", 0), _Handler)
    httpd.knobs = Knobs()
    if context is not None:
        httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield Server(httpd, "https" if context else "http")
    finally:
        httpd.knobs.release.set()
        httpd.shutdown()
        thread.join(5)
        httpd.server_close()


@pytest.fixture
def server() -> Iterator[Server]:
    yield from _serve()


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    return tmp_path / "downloads" / "model.edgebundle"


def _part(dest: Path) -> Path:
    return dest.with_suffix(dest.suffix + ".part")


def test_full_download_verified(server: Server, dest: Path) -> None:
    calls: list[tuple[int, int | None]] = []
    got = download(
        server.url(),
        dest,
        expected_size=SIZE,
        expected_sha256=SHA,
        progress=lambda done, total: calls.append((done, total)),
    )
    assert got == dest
    assert dest.read_bytes() == DATA
    assert not _part(dest).exists()
    assert [(s.range, s.status, s.sent) for s in server.seen] == [(None, 200, SIZE)]
    assert calls[-1] == (SIZE, SIZE)
    assert [done for done, _ in calls] == sorted(done for done, _ in calls)


def test_interrupted_then_resumed(server: Server, dest: Path) -> None:
    server.knobs.drop_after = int(SIZE * 0.4)
    with pytest.raises(UpdateError, match=r"connection closed after 400000 of 1000000 bytes"):
        download(server.url(), dest, expected_size=SIZE, expected_sha256=SHA)
    assert not dest.exists()
    kept = _part(dest).stat().st_size
    assert 0 < kept <= int(SIZE * 0.4)
    assert _part(dest).read_bytes() == DATA[:kept]

    server.knobs.drop_after = None
    download(server.url(), dest, expected_size=SIZE, expected_sha256=SHA)
    assert dest.read_bytes() == DATA
    assert not _part(dest).exists()
    first, second = server.seen
    assert first.range is None
    assert (second.range, second.status, second.sent) == (f"bytes={kept}-", 206, SIZE - kept)
    assert first.sent + second.sent == SIZE  # resumed, not downloaded 1.4 times


def test_resume_without_expected_values(server: Server, dest: Path) -> None:
    """With no size or sha256 given, the Content-Length still tells a truncated transfer."""
    server.knobs.drop_after = 123_456
    with pytest.raises(UpdateError, match="connection closed after 123456 of 1000000"):
        download(server.url(), dest)
    server.knobs.drop_after = None
    download(server.url(), dest)
    assert dest.read_bytes() == DATA
    assert server.seen[1].range == "bytes=123456-"


def test_server_ignores_range_restarts_from_zero(server: Server, dest: Path) -> None:
    server.knobs.drop_after = 300_000
    with pytest.raises(UpdateError):
        download(server.url(), dest, expected_size=SIZE, expected_sha256=SHA)
    server.knobs.drop_after = None
    server.knobs.ignore_range = True
    download(server.url(), dest, expected_size=SIZE, expected_sha256=SHA)
    assert dest.read_bytes() == DATA
    assert (server.seen[1].range, server.seen[1].status) == ("bytes=300000-", 200)
    assert not _part(dest).exists()


def test_206_from_the_wrong_offset_restarts(server: Server, dest: Path) -> None:
    _part(dest).parent.mkdir(parents=True)
    _part(dest).write_bytes(DATA[:5000])
    server.knobs.wrong_range = True
    download(server.url(), dest, expected_size=SIZE, expected_sha256=SHA)
    assert dest.read_bytes() == DATA
    assert [(s.range, s.status) for s in server.seen] == [("bytes=5000-", 206), (None, 200)]


def test_416_when_the_part_is_complete(server: Server, dest: Path) -> None:
    _part(dest).parent.mkdir(parents=True)
    _part(dest).write_bytes(DATA)
    download(server.url(), dest, expected_size=SIZE, expected_sha256=SHA)
    assert dest.read_bytes() == DATA
    assert [(s.range, s.status) for s in server.seen] == [(f"bytes={SIZE}-", 416)]


def test_stale_part_longer_than_the_file_is_dropped(server: Server, dest: Path) -> None:
    _part(dest).parent.mkdir(parents=True)
    _part(dest).write_bytes(b"x" * (SIZE + 10))
    download(server.url(), dest, expected_size=SIZE, expected_sha256=SHA)
    assert dest.read_bytes() == DATA
    assert server.seen[0].range is None


def test_sha256_mismatch_leaves_nothing(server: Server, dest: Path) -> None:
    server.knobs.wrong_bytes = True
    with pytest.raises(UpdateError, match=f"sha256 mismatch: got [0-9a-f]{{64}}, expected {SHA}"):
        download(server.url(), dest, expected_size=SIZE, expected_sha256=SHA)
    assert not dest.exists()
    assert not _part(dest).exists()


def test_resumed_part_of_another_file_fails_the_hash(server: Server, dest: Path) -> None:
    _part(dest).parent.mkdir(parents=True)
    _part(dest).write_bytes(b"\0" * 1000)
    with pytest.raises(UpdateError, match="sha256 mismatch"):
        download(server.url(), dest, expected_sha256=SHA)
    assert not _part(dest).exists()
    download(server.url(), dest, expected_sha256=SHA)  # the next attempt starts from zero
    assert dest.read_bytes() == DATA


def test_size_mismatch_from_the_headers(server: Server, dest: Path) -> None:
    with pytest.raises(UpdateError, match="size mismatch: the server has 1000000 bytes"):
        download(server.url(), dest, expected_size=SIZE - 1)
    assert not _part(dest).exists()


def test_too_large_refused_from_content_length(server: Server, dest: Path) -> None:
    with pytest.raises(UpdateError, match=r"too large: 1000000 bytes, the limit is 999999\Z"):
        download(server.url(), dest, max_bytes=SIZE - 1)
    assert not dest.exists()
    assert not _part(dest).exists()


def test_too_large_refused_before_any_request(server: Server, dest: Path) -> None:
    with pytest.raises(UpdateError, match="too large: 1000000 bytes expected, the limit is 1000"):
        download(server.url(), dest, expected_size=SIZE, max_bytes=1000)
    assert server.seen == []


def test_too_large_stops_while_reading(server: Server, dest: Path) -> None:
    server.knobs.no_length = True
    done: list[int] = []
    limit = 200_000
    with pytest.raises(UpdateError, match="too large: more than 200000 bytes"):
        download(server.url(), dest, max_bytes=limit, progress=lambda n, _: done.append(n))
    assert max(done) <= limit
    assert not dest.exists()
    assert not _part(dest).exists()


def test_no_content_length_until_close(server: Server, dest: Path) -> None:
    server.knobs.no_length = True
    download(server.url(), dest, expected_size=SIZE, expected_sha256=SHA)
    assert dest.read_bytes() == DATA


def test_timeout_keeps_the_part_and_resumes(server: Server, dest: Path) -> None:
    server.knobs.stall_after = 100_000
    with pytest.raises(UpdateError, match=r"timed out after 0\.3 s, 100000 bytes received"):
        download(server.url(), dest, expected_sha256=SHA, timeout=0.3)
    assert _part(dest).stat().st_size == 100_000
    server.knobs.stall_after = None
    download(server.url(), dest, expected_sha256=SHA)
    assert dest.read_bytes() == DATA
    assert server.seen[-1].range == "bytes=100000-"


def test_404_is_a_clear_error(server: Server, dest: Path) -> None:
    url = server.url("/bundles/missing.edgebundle")
    with pytest.raises(UpdateError) as info:
        download(url, dest)
    assert str(info.value) == f"{url}: HTTP 404 Not Found"
    assert not dest.exists()
    assert not _part(dest).exists()


def test_credentials_and_query_stay_out_of_messages(server: Server, dest: Path) -> None:
    port = server.httpd.server_address[1]
    url = f"http://edge:s3cret@127.0.0.1:{port}/nope?token=hunter2#frag"
    with pytest.raises(UpdateError) as info:
        download(url, dest)
    message = str(info.value)
    assert message == f"http://127.0.0.1:{port}/nope?...: HTTP 404 Not Found"
    assert "s3cret" not in message
    assert "hunter2" not in message
    (seen,) = server.seen
    assert seen.path == "/nope?token=hunter2"
    assert seen.authorization == "Basic ZWRnZTpzM2NyZXQ="  # edge:s3cret
    assert redact_url("https://u:p@[::1]:8443/a?b=c") == "https://[::1]:8443/a?..."


def test_connection_refused(dest: Path) -> None:
    with pytest.raises(UpdateError, match=r"^http://127\.0\.0\.1:9/x: .*refused"):
        download("http://127.0.0.1:9/x", dest, timeout=2)


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("ftp://127.0.0.1/x", "not an http:// or https:// URL"),
        ("http://127.0.0.1:99999/x", "cannot parse the download URL"),
    ],
)
def test_bad_urls(url: str, problem: str, dest: Path) -> None:
    with pytest.raises(UpdateError, match=re.escape(problem)):
        download(url, dest)


def test_bad_expected_sha256(server: Server, dest: Path) -> None:
    with pytest.raises(UpdateError, match="not 64 hex digits"):
        download(server.url(), dest, expected_sha256="abc")


@pytest.fixture(scope="module")
def tls_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tls")


@pytest.fixture
def https_server(tls_dir: Path) -> Iterator[tuple[Server, Path]]:
    material = make_tls_material(tls_dir, require_client_cert=False)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(material.server_cert, material.server_key)
    for served in _serve(context):
        yield served, material.ca_cert


def test_https_with_ca_file(https_server: tuple[Server, Path], dest: Path) -> None:
    server, ca = https_server
    assert server.url().startswith("https://127.0.0.1:")
    server.knobs.drop_after = 250_000
    with pytest.raises(UpdateError, match="connection closed after"):
        download(server.url(), dest, expected_sha256=SHA, ca_file=ca)
    server.knobs.drop_after = None
    download(server.url(), dest, expected_size=SIZE, expected_sha256=SHA, ca_file=ca)
    assert dest.read_bytes() == DATA
    assert server.seen[-1].range == "bytes=250000-"


def test_https_untrusted_certificate(https_server: tuple[Server, Path], dest: Path) -> None:
    server, _ = https_server
    with pytest.raises(UpdateError, match="TLS certificate not trusted"):
        download(server.url(), dest, timeout=5)
    assert server.seen == []


def test_https_missing_ca_file(https_server: tuple[Server, Path], dest: Path) -> None:
    server, _ = https_server
    with pytest.raises(UpdateError, match="cannot load CA file"):
        download(server.url(), dest, ca_file=dest.parent / "nope.pem")


def test_credentials_are_not_forwarded_to_another_host(server: Server, dest: Path) -> None:
    """A redirect to another origin (here: another port) is followed without the URL's
    credentials; the second server records what it got."""
    for other in _serve():
        server.knobs.redirects["/old"] = other.url()
        url = server.url("/old").replace("://", "://edge:s3cret@")
        download(url, dest, expected_size=len(DATA), expected_sha256=SHA)
        assert dest.read_bytes() == DATA
        assert server.seen[0].authorization == "Basic ZWRnZTpzM2NyZXQ="  # edge:s3cret
        assert [s.path for s in other.seen] == [PATH]
        assert other.seen[0].authorization is None


def test_credentials_stay_on_a_redirect_within_the_server(server: Server, dest: Path) -> None:
    server.knobs.redirects["/old"] = PATH
    url = server.url("/old").replace("://", "://edge:s3cret@")
    download(url, dest, expected_size=len(DATA), expected_sha256=SHA)
    assert [(s.path, s.authorization) for s in server.seen] == [
        ("/old", "Basic ZWRnZTpzM2NyZXQ="),
        (PATH, "Basic ZWRnZTpzM2NyZXQ="),
    ]
