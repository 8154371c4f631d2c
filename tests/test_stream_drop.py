"""A real network stream that goes away and comes back: an MJPEG-over-HTTP server (what many IP
cameras serve) on loopback, stopped mid-stream and restarted on the same port. The source must
go degraded without raising, reconnect, and deliver frames again."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import cv2
import numpy as np
import pytest

from edge_agent.io import open_source


class _Mjpeg(BaseHTTPRequestHandler):
    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
        self.end_headers()
        i = 0
        try:
            while not self.server.stopping:  # type: ignore[attr-defined]
                ok, jpg = cv2.imencode(".jpg", np.full((120, 160, 3), (i * 7) % 255, np.uint8))
                assert ok
                head = b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n" % len(
                    jpg
                )
                self.wfile.write(head + jpg.tobytes() + b"\r\n")
                i += 1
                time.sleep(0.02)
        except (BrokenPipeError, ConnectionResetError):
            pass


def _serve(port: int) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer(("127.0.0.1", port), _Mjpeg)
    server.stopping = False  # type: ignore[attr-defined]
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _stop(server: ThreadingHTTPServer) -> None:
    server.stopping = True  # type: ignore[attr-defined]
    server.shutdown()
    server.server_close()


def _wait(predicate: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


@pytest.mark.slow
def test_stream_server_stopped_and_restarted() -> None:
    server = _serve(0)
    port = server.server_address[1]
    source = open_source(f"http://127.0.0.1:{port}/stream.mjpg")
    source.open()
    try:
        first = source.read(timeout=10.0)
        assert first is not None and first.data.shape == (120, 160, 3)
        _stop(server)  # the camera goes away mid-stream
        assert _wait(lambda: source.stats.status == "degraded", 10.0), source.stats
        before = source.stats.frames
        server = _serve(port)  # ...and comes back
        assert _wait(lambda: source.stats.status == "ok", 20.0), source.stats
        frame = source.read(timeout=10.0)
        assert frame is not None and frame.index >= before
        assert source.stats.reconnects >= 1
    finally:
        source.close()
        _stop(server)
