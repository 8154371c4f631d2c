"""The Pi's camera through rpicam-vid (a stand-in on PATH that writes what the real one writes:
strided YUV420 on a pipe), Picamera2 when it is missing, and network streams (MPEG-TS over TCP
and UDP) written with OpenCV's FFmpeg backend."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
import weakref
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest

from converters.demo_broker import free_port
from edge_agent.common.backoff import BackoffPolicy
from edge_agent.errors import AgentExit, ConfigError, SourceError, agent_exit_code
from edge_agent.io import Frame, open_source
from edge_agent.io.rpicam import RpicamSource, i420_to_bgr, yuv420_stride
from tests.fleet import wait_until

STANDIN = Path(__file__).resolve().parent / "bin"
FAST = BackoffPolicy(initial=0.05, maximum=0.2, factor=2.0, jitter=0.2)


@pytest.fixture
def standin(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("PATH", f"{STANDIN}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("RPICAM_STANDIN_FRAMES", raising=False)
    monkeypatch.delenv("RPICAM_STANDIN_NO_CAMERA", raising=False)
    monkeypatch.delenv("RPICAM_STANDIN_ERROR_AT_END", raising=False)
    yield


def expected_bgr(i: int, w: int, h: int) -> np.ndarray:
    """What frame i of the stand-in shows, converted by OpenCV from an unpadded I420 frame."""
    r, c = np.mgrid[0:h, 0:w]
    y = ((r + 2 * c + 3 * i) % 256).astype(np.uint8)
    u = np.full((h // 2, w // 2), 100 + i % 50, np.uint8)
    v = np.full((h // 2, w // 2), 150, np.uint8)
    packed = np.concatenate([y.ravel(), u.ravel(), v.ravel()]).reshape(h * 3 // 2, w)
    return cv2.cvtColor(packed, cv2.COLOR_YUV2BGR_I420)


def wait_frame(source: object, timeout: float = 20.0) -> Frame:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            frame = source.read(timeout=0.5)  # type: ignore[attr-defined]
        except SourceError:
            continue
        if frame is not None:
            return frame  # type: ignore[no-any-return]
    raise AssertionError("no frame in time")


def test_strides_follow_the_isp_alignment() -> None:
    assert [yuv420_stride(w) for w in (64, 100, 640, 1280, 1920, 1)] == [64, 128, 640, 1280, 1920,
                                                                         64]  # fmt: skip


def test_a_strided_yuv420_frame_decodes_like_an_unpadded_one() -> None:
    w, h, stride = 100, 60, 128
    want = expected_bgr(3, w, h)
    r, c = np.mgrid[0:h, 0:w]
    y = np.full((h, stride), 0xEE, np.uint8)
    y[:, :w] = (r + 2 * c + 9) % 256
    u = np.full((h // 2, stride // 2), 0xEE, np.uint8)
    u[:, : w // 2] = 103
    v = np.full((h // 2, stride // 2), 0xEE, np.uint8)
    v[:, : w // 2] = 150
    got = i420_to_bgr(np.concatenate([y.ravel(), u.ravel(), v.ravel()]).tobytes(), w, h, stride)
    np.testing.assert_array_equal(got, want)


def test_an_unpadded_yuv420_frame_decodes_in_place_into_the_buffer_given() -> None:
    """640, 1280 or 1920 wide: no padding, so the pipe's bytes are read as they are (no copy)
    and converted into the frame buffer handed in (a pooled one in RpicamSource)."""
    w, h = 128, 60
    want = expected_bgr(7, w, h)
    r, c = np.mgrid[0:h, 0:w]
    y = ((r + 2 * c + 21) % 256).astype(np.uint8)
    u = np.full((h // 2, w // 2), 107, np.uint8)
    v = np.full((h // 2, w // 2), 150, np.uint8)
    raw = bytearray(np.concatenate([y.ravel(), u.ravel(), v.ravel()]).tobytes())
    out = np.zeros((h, w, 3), np.uint8)
    got = i420_to_bgr(raw, w, h, yuv420_stride(w), out)
    assert got is out
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(i420_to_bgr(raw, w, h, w), want)  # and without one


def test_rpicam_frames_come_through_with_their_stride(standin: None) -> None:
    # 100 px wide: rows are padded to 128 bytes, the padding holds 0xEE
    source = open_source("rpicam:0?width=100&height=60&fps=30", reconnect=FAST)
    assert isinstance(source, RpicamSource) and source.live and source.stride == 128
    with source:
        frame = wait_frame(source)
        assert frame.data.shape == (60, 100, 3) and frame.data.dtype == np.uint8
        # the frame is one of the stand-in's: find which (the newest one wins on a live source)
        diffs = [np.abs(frame.data.astype(int) - expected_bgr(i, 100, 60)).max() for i in range(60)]
        assert min(diffs) == 0, min(diffs)
        assert source.stats.status == "ok"


def test_rpicam_frames_without_padding_come_through_in_reused_buffers(standin: None) -> None:
    """128 px wide: no padding, so the pipe's bytes are converted as they are, into BGR frames
    the source reuses once nobody holds them (a frame kept is never overwritten)."""
    source = open_source("rpicam:0?width=128&height=64&fps=30", reconnect=FAST)
    assert isinstance(source, RpicamSource) and source.stride == 128
    expected = [expected_bgr(i, 128, 64) for i in range(600)]  # 20 s of frames at 30 fps
    kept = None
    let_go: list[weakref.ref[np.ndarray]] = []  # alive only while the pool keeps them
    reused = 0
    with source:
        for n in range(12):
            frame = wait_frame(source)
            assert any(np.array_equal(frame.data, want) for want in expected)
            reused += any(ref() is frame.data for ref in let_go)
            if n == 0:
                kept = frame.data.copy(), frame.data
            else:
                let_go.append(weakref.ref(frame.data))
            del frame
    assert kept is not None and np.array_equal(kept[0], kept[1])  # held, never written over
    assert reused >= 1


def test_rpicam_comes_back_when_its_process_dies(
    standin: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RPICAM_STANDIN_FRAMES", "5")  # every run of it ends after 5 frames
    source = RpicamSource(0, width=64, height=48, fps=50, reconnect=FAST)
    with source:
        wait_until(lambda: source.stats.reconnects >= 2, timeout=30, what="two reconnects")
        stats = source.stats
    assert stats.reconnects >= 2 and stats.frames >= 10, stats
    assert "rpicam-vid exited (code 0)" in (stats.last_error or "")
    assert "INFO RPI pisp.cpp: Sensor" in (stats.last_error or "")  # no error: its last line


def test_rpicam_exit_quotes_its_error_not_a_later_info_line(
    standin: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """rpicam-vid says ``ERROR: …`` and libcamera then logs INFO lines as it stops: the reason
    quoted is the error."""
    monkeypatch.setenv("RPICAM_STANDIN_FRAMES", "3")
    monkeypatch.setenv("RPICAM_STANDIN_ERROR_AT_END", "1")
    source = RpicamSource(0, width=64, height=48, fps=50, reconnect=FAST)
    with source:
        wait_until(lambda: source.stats.last_error is not None, timeout=30, what="an exit")
        error = source.stats.last_error or ""
    assert error.endswith("rpicam-vid exited (code 0): ERROR: Device timeout detected, "
                          "attempting a restart!!!"), error  # fmt: skip


def test_no_camera_is_degraded_with_rpicam_vid_own_words(
    standin: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RPICAM_STANDIN_NO_CAMERA", "1")
    source = RpicamSource(0, width=64, height=48, reconnect=FAST)
    with source:
        wait_until(lambda: source.stats.status == "degraded", timeout=20, what="degraded")
        with pytest.raises(SourceError):
            source.read(timeout=0.3)
        stats = source.stats
    assert stats.status == "degraded"
    assert "no cameras available" in (stats.last_error or ""), stats


def test_without_rpicam_vid_the_error_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    source = RpicamSource(0, width=64, height=48, reconnect=FAST)
    with source:
        wait_until(lambda: source.stats.status == "degraded", timeout=20, what="degraded")
        error = source.stats.last_error or ""
    assert "rpicam-vid or libcamera-vid not found" in error and "apt install rpicam-apps" in error


def _without_picamera2() -> None:
    try:
        import picamera2  # type: ignore[import-not-found]  # noqa: F401
    except ImportError:
        return
    pytest.skip("picamera2 is installed here")


def test_picamera2_missing_fails_at_open_and_says_how_to_get_it() -> None:
    """A missing module is an install problem no retry fixes: open() raises ConfigError (exit
    78, not restarted by systemd) in the caller's thread, one line, instead of degrading."""
    _without_picamera2()
    source = open_source("picamera2:0?width=320&height=240", reconnect=FAST)
    with pytest.raises(ConfigError) as info:
        source.open()
    error = str(info.value)
    assert error.startswith("picamera2:0") and "\n" not in error
    assert "--system-site-packages" in error and "python3-picamera2" in error and "rpicam:" in error
    assert agent_exit_code(info.value) == AgentExit.CONFIG == 78
    assert source.stats.status == "ok" and source.stats.status_changes == 0  # nothing retried


def test_the_agent_exits_78_at_start_without_picamera2(digits: object, tmp_path: Path) -> None:
    import subprocess
    import sys

    _without_picamera2()
    run = subprocess.run(
        [str(Path(sys.executable).parent / "edge-agent"), "run",
         "--model", str(digits.onnx),  # type: ignore[attr-defined]
         "--source", "picamera2:0", "--state-dir", str(tmp_path), "--profile", "x86-64"],
        capture_output=True, text=True, timeout=60,  # retrying would serve until killed
    )  # fmt: skip
    assert run.returncode == 78, run.stderr
    assert "python3-picamera2" in run.stderr and "reconnecting" not in run.stderr, run.stderr
    # check-config says so too, without importing it (or starting any camera)
    config = tmp_path / "agent.toml"
    config.write_text(
        f'[model]\npath = "{digits.onnx}"\n'  # type: ignore[attr-defined]
        f'[agent]\nstate_dir = "{tmp_path}"\nprofile = "x86-64"\n'
        '[[sources]]\nname = "porch"\nuri = "picamera2:0"\n'
    )
    check = subprocess.run(
        [str(Path(sys.executable).parent / "edge-agent"), "check-config", "--config", str(config)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert check.returncode == 78, check.stderr
    assert "stream porch: picamera2:0: picamera2 cannot be imported" in check.stderr, check.stderr


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("rpicam:x", "expected rpicam:N"),
        ("rpicam:0?width=99", "even"),
        ("rpicam:0?colour=1", "unknown option"),
        ("picamera2:0?fps=0", "must be > 0"),
    ],
)
def test_bad_camera_uris_are_refused(uri: str, message: str) -> None:
    with pytest.raises(SourceError, match=message):
        open_source(uri)


def _mpegts(path: Path, frames: int) -> bytes:
    writer = cv2.VideoWriter(str(path), cv2.CAP_FFMPEG, cv2.VideoWriter_fourcc(*"mp4v"), 25,
                             (160, 120))  # fmt: skip
    assert writer.isOpened()
    for i in range(frames):
        writer.write(np.full((120, 160, 3), (i * 5) % 255, np.uint8))
    writer.release()
    return path.read_bytes()


def test_a_tcp_stream(tmp_path: Path) -> None:
    data = _mpegts(tmp_path / "s.ts", 100)
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]

    def serve() -> None:
        conn, _ = server.accept()
        with conn, contextlib.suppress(OSError):  # the reader hangs up once it has a frame
            for i in range(0, len(data), 1316):
                conn.sendall(data[i : i + 1316])
                time.sleep(0.002)
            time.sleep(1.0)

    threading.Thread(target=serve, daemon=True).start()
    source = open_source(f"tcp://127.0.0.1:{port}", reconnect=FAST)
    assert source.live
    with source:
        frame = wait_frame(source)
    server.close()
    assert frame.data.shape == (120, 160, 3)


def test_a_udp_stream(tmp_path: Path) -> None:
    data = _mpegts(tmp_path / "s.ts", 100)
    port = free_port()
    stop = threading.Event()

    def send() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx:
            while not stop.is_set():  # a camera streaming MPEG-TS to us, 7 TS packets a datagram
                for i in range(0, len(data), 1316):
                    tx.sendto(data[i : i + 1316], ("127.0.0.1", port))
                    time.sleep(0.001)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    source = open_source(f"udp://127.0.0.1:{port}", reconnect=FAST)
    try:
        with source:
            frame = wait_frame(source)
    finally:
        stop.set()
        sender.join(5)
    assert frame.data.shape == (120, 160, 3)


def test_the_agent_serves_a_model_on_the_pi_camera(
    standin: None, digits: object, tmp_path: Path
) -> None:
    import json
    import subprocess
    import sys

    results = tmp_path / "results.jsonl"
    run = subprocess.run(
        [str(Path(sys.executable).parent / "edge-agent"), "run",
         "--model", str(digits.onnx),  # type: ignore[attr-defined]
         "--source", "rpicam:0?width=64&height=48&fps=30", "--max-frames", "5",
         "--results", f"jsonl:{results}", "--state-dir", str(tmp_path), "--profile", "x86-64"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert [r["seq"] for r in rows] == [0, 1, 2, 3, 4]
    assert all("error" not in r["output"] for r in rows), rows[0]


def _notifications(tmp_path: Path, args: list[str], *, seconds: float, until: bytes) -> list[bytes]:
    """What ``edge-agent run ARGS`` tells a real notify socket in its first ``seconds``, or until
    it has said READY=1 and a message that starts with ``until``."""
    import subprocess
    import sys

    rx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    rx.bind(str(tmp_path / "notify"))
    rx.settimeout(0.2)
    env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "2000000"}
    env.pop("WATCHDOG_PID", None)
    agent = subprocess.Popen(
        [str(Path(sys.executable).parent / "edge-agent"), "run", *args,
         "--state-dir", str(tmp_path), "--profile", "x86-64"],
        env=env, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    got: list[bytes] = []
    try:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            with contextlib.suppress(socket.timeout):  # TimeoutError from 3.10 on
                got.append(rx.recv(4096))
            if b"READY=1" in got and any(m.startswith(until) for m in got):
                break
    finally:
        agent.terminate()
        agent.wait(30)
        rx.close()
    return got


@pytest.mark.parametrize("camera", ["absent", "present"])
def test_ready_says_degraded_or_serving_only_once_the_camera_says(
    standin: None, digits: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, camera: str
) -> None:
    """rpicam-vid starts, then finds no camera (or delivers frames): READY=1 comes with the
    state the camera gave, "degraded" or "serving", never "serving" before the camera is known
    to be there (it used to say serving for the moment rpicam-vid took to fail). The watchdog
    is pinged meanwhile."""
    if camera == "absent":
        monkeypatch.setenv("RPICAM_STANDIN_NO_CAMERA", "1")
    got = _notifications(
        tmp_path,
        ["--model", str(digits.onnx),  # type: ignore[attr-defined]
         "--source", "rpicam:0?width=64&height=48&fps=30"],
        seconds=30.0, until=b"STATUS=" + (b"degraded" if camera == "absent" else b"serving"),
    )  # fmt: skip
    states = [m.split(b"=", 1)[1].split(b":")[0] for m in got if m.startswith(b"STATUS=")]
    assert b"READY=1" in got and b"WATCHDOG=1" in got, got
    known = [s for s in states if s != b"starting"]  # starting: rpicam-vid not heard from yet
    expected = b"degraded" if camera == "absent" else b"serving"
    assert known and known[0] == expected, got
    if camera == "absent":
        assert b"serving" not in states, got


def test_a_camera_that_starts_and_stays_silent_is_degraded_after_the_limit(
    digits: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A camera process that starts and never sends a frame (its status says nothing is wrong):
    the pipeline is "starting", then "degraded" once STARTING_LIMIT_S has passed, so READY=1
    goes out before systemd's start timeout; serving only when a frame comes."""
    from edge_agent import pipeline as pipeline_module
    from edge_agent.io.sinks import CallbackSink
    from edge_agent.io.source import Source
    from edge_agent.model.loader import load_model
    from edge_agent.model.profiles import load_profile
    from edge_agent.pipeline import Pipeline, State

    speak = threading.Event()

    class QuietCamera(Source):  # a designed seam: a live source that connects in the background
        _connect_in_open = False

        def __init__(self) -> None:
            super().__init__("quiet:0", kind="image", live=True, reconnect=FAST)

        def _connect(self) -> None:
            pass

        def _capture(self, timeout: float | None) -> np.ndarray | None:
            if speak.wait(timeout):
                return np.zeros((8, 8, 3), np.uint8)
            return None

        def _disconnect(self) -> None:
            pass

    monkeypatch.setattr(pipeline_module, "STARTING_LIMIT_S", 1.0)
    model = load_model(
        digits.onnx,  # type: ignore[attr-defined]
        profile=load_profile("x86-64"), state_dir=tmp_path, threads=1,
    )  # fmt: skip
    pipe = Pipeline(source=QuietCamera(), model=model, sinks=[CallbackSink(lambda r: None)])
    runner = threading.Thread(target=pipe.run, daemon=True)
    runner.start()
    try:
        wait_until(lambda: pipe.state is State.STARTING, timeout=10, what="starting")
        wait_until(lambda: pipe.state is State.DEGRADED, timeout=30, what="degraded")
        time.sleep(1.5)  # three read timeouts: its status says ok, and still no frame
        assert pipe.state is State.DEGRADED
        speak.set()  # the first frame
        wait_until(lambda: pipe.state is State.SERVING, timeout=30, what="serving")
        wait_until(lambda: pipe.results > 0, timeout=30, what="a result")
    finally:
        pipe.stop()
        runner.join(30)
        model.close()
