"""A real network stream that goes away and comes back: an MJPEG-over-HTTP server (what many IP
cameras serve) on loopback, stopped mid-stream and restarted on the same port. The source must
go degraded without raising, reconnect, and deliver frames again."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_agent.io import open_source
from tests.fleet import fleet_env_fixture  # noqa: F401  (the `fleet_env` fixture)
from tests.mjpeg import serve_mjpeg, stop_mjpeg


def _wait(predicate: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


@pytest.mark.slow
def test_stream_server_stopped_and_restarted() -> None:
    server = serve_mjpeg(0)
    port = server.server_address[1]
    source = open_source(f"http://127.0.0.1:{port}/stream.mjpg")
    source.open()
    try:
        first = source.read(timeout=10.0)
        assert first is not None and first.data.shape == (120, 160, 3)
        stop_mjpeg(server)  # the camera goes away mid-stream
        assert _wait(lambda: source.stats.status == "degraded", 10.0), source.stats
        before = source.stats.frames
        server = serve_mjpeg(port)  # ...and comes back
        assert _wait(lambda: source.stats.status == "ok", 20.0), source.stats
        frame = source.read(timeout=10.0)
        assert frame is not None and frame.index >= before
        assert source.stats.reconnects >= 1
    finally:
        source.close()
        stop_mjpeg(server)


#: How long the camera stays unplugged. 10 s in the suite: 5 watchdog timeouts, through the
#: source's reconnect waits of 2, 4 and 8 s (each at least a watchdog timeout; the pings come
#: from the main loop, which goes round on read timeouts whatever the capture thread sleeps),
#: and it ends inside the 8 s wait, so the next attempt (about 15.5 s after the loss) finds the
#: camera back. 30 s ended near the attempt after the 16 s wait, and the jitter decided whether
#: serving came back seconds later or a whole 30 s wait later (41-61 s a run). ``make bench``
#: runs the issue's field case, 90 s, far past the longest reconnect backoff (30 s), with
#: ``EDGE_TEST_OUTAGE_S=90``.
OUTAGE_S = float(os.environ.get("EDGE_TEST_OUTAGE_S", "10"))


@pytest.mark.slow
def test_the_watchdog_feeds_on_a_static_scene_and_a_lost_camera(
    fleet_env: dict[str, Any], tmp_path: Path
) -> None:
    """A real notify socket and watchdog (2 s): the motion gate skips every frame of a static
    scene, then the stream is gone for ``OUTAGE_S`` and comes back. READY comes before any
    result, the pings never stop, the agent is never restarted, and the state goes degraded,
    then serving."""
    import socket
    import subprocess

    from tests.fleet import EDGE_AGENT

    rx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    rx.bind(str(tmp_path / "notify"))
    rx.settimeout(0.2)
    server = serve_mjpeg(0, static=True)
    port = server.server_address[1]
    env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "2000000"}
    env.pop("WATCHDOG_PID", None)
    results = tmp_path / "results.jsonl"
    log_file = (tmp_path / "agent.log").open("wb")
    agent = subprocess.Popen(
        [EDGE_AGENT, "run", "--model", str(fleet_env["root"] / "digits-1.0.0.edgebundle"),
         "--trusted-key", str(fleet_env["pub"]), "--source", f"http://127.0.0.1:{port}/s.mjpg",
         "--motion-gate", "2", "--results", f"jsonl:{results}", "--state-dir", str(tmp_path),
         "--profile", "x86-64"],
        env=env, stderr=log_file,
    )  # fmt: skip
    log_file.close()  # the child has its own descriptor
    got: list[tuple[float, bytes]] = []

    def collect(seconds: float, until: bytes | None = None) -> bool:
        """Notifications for ``seconds``, or until one starting with ``until`` arrives."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            with contextlib.suppress(TimeoutError):
                got.append((time.monotonic(), rx.recv(4096)))
                if until is not None and got[-1][1].startswith(until):
                    return True
        return until is None

    try:
        assert collect(30.0, until=b"READY=1"), (tmp_path / "agent.log").read_text()
        collect(4.0)  # the static scene: the gate skips every frame after the first
        stop_mjpeg(server)  # the camera is unplugged ...
        assert collect(20.0, until=b"STATUS=degraded"), (tmp_path / "agent.log").read_text()
        collect(OUTAGE_S - (time.monotonic() - got[-1][0]))  # ... for OUTAGE_S in all
        unplugged_until = time.monotonic()
        server = serve_mjpeg(port, static=True)
        # the longest backoff (30 s, +20 % jitter) and a reconnect: then serving again
        assert collect(60.0, until=b"STATUS=serving"), (tmp_path / "agent.log").read_text()
        collect(3.0)
        assert agent.poll() is None, (tmp_path / "agent.log").read_text()
    finally:
        agent.terminate()
        agent.wait(30)
        stop_mjpeg(server)
        rx.close()
    log = (tmp_path / "agent.log").read_text()
    kinds = [m for _, m in got]
    assert kinds.count(b"READY=1") == 1, log  # one start: never restarted, never re-readied
    # the gate passes the first frame (and the first after the reconnect), then skips the rest
    assert len(results.read_text().splitlines()) <= 3
    pings = [t for t, m in got if m == b"WATCHDOG=1"]
    ready_at = next(t for t, m in got if m == b"READY=1")
    assert pings and pings[0] - ready_at < 2.0
    assert max(np.diff([ready_at, *pings])) < 2.0, "a watchdog timeout passed without a ping"
    assert pings[-1] > unplugged_until  # pinged through the outage and after it
    degraded = next(t for t, m in got if m.startswith(b"STATUS=degraded"))
    serving_again = next(t for t, m in got if m.startswith(b"STATUS=serving") and t > degraded)
    assert serving_again - degraded >= OUTAGE_S - 5.0, log
