"""An MJPEG-over-HTTP camera on loopback (what many IP cameras serve), for tests and
benchmarks: start it, stop it mid-stream (the camera unplugged), start it again on the same
port. Frames are 160x120 by default, a grey level that changes every frame (or one static
frame), at ``fps``."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import cv2
import numpy as np


class _Mjpeg(BaseHTTPRequestHandler):
    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        server: Any = self.server
        self.send_response(200)
        self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
        self.end_headers()
        i = 0
        w, h = server.size
        try:
            while not server.stopping:
                level = 90 if server.static else (i * 7) % 255
                ok, jpg = cv2.imencode(".jpg", np.full((h, w, 3), level, np.uint8))
                assert ok
                head = b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n" % len(
                    jpg
                )
                self.wfile.write(head + jpg.tobytes() + b"\r\n")
                i += 1
                time.sleep(1.0 / server.fps)
        except (BrokenPipeError, ConnectionResetError):
            pass


def serve_mjpeg(
    port: int, *, static: bool = False, fps: float = 50.0, size: tuple[int, int] = (160, 120)
) -> ThreadingHTTPServer:
    """An MJPEG camera on 127.0.0.1:``port`` (0: a free one), serving in a daemon thread;
    ``static``: the same frame over and over."""
    server = ThreadingHTTPServer(("127.0.0.1", port), _Mjpeg)
    server.stopping = False  # type: ignore[attr-defined]
    server.static = static  # type: ignore[attr-defined]
    server.fps = fps  # type: ignore[attr-defined]
    server.size = size  # type: ignore[attr-defined]
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def stop_mjpeg(server: ThreadingHTTPServer) -> None:
    """The camera goes away: open connections end, the port closes."""
    server.stopping = True  # type: ignore[attr-defined]
    server.shutdown()
    server.server_close()
