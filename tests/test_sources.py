"""Sources against real things: video files written with OpenCV, PNGs, real pipes, files being
appended, UDP sockets on 127.0.0.1, a closed TCP port. The synthetic source is the only fake,
and it is a ``Source`` (the designed seam), not a patched ``cv2``."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

import edge_agent.io as sources
from converters.demo_broker import free_port
from edge_agent.errors import ConfigError, EdgeError, SourceError
from edge_agent.io import (
    BackoffPolicy,
    CaptureSource,
    FileSensorSource,
    Frame,
    ImageFilesSource,
    Source,
    SourceTimeout,
    StdinSensorSource,
    SyntheticSource,
    UdpSensorSource,
    VideoFileSource,
    WindowSpec,
    open_source,
)

REPO = Path(__file__).resolve().parents[1]
FAST = BackoffPolicy(initial=0.05, maximum=0.2, factor=2.0, jitter=0.2)
W, H = 64, 48


def write_video(path: Path, frames: int, fps: float, *, fourcc: str = "mp4v") -> Path:
    """Flat frames whose grey level is 8 * index, so the order can be checked after decoding."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*fourcc), fps, (W, H))
    assert writer.isOpened()
    rng = np.random.default_rng(0)
    for i in range(frames):
        if fourcc == "MJPG":  # noise: the file's size is its frames, so truncation cuts frames
            writer.write(rng.integers(0, 256, (H, W, 3), dtype=np.uint8))
        else:
            writer.write(np.full((H, W, 3), (8 * i) % 256, np.uint8))
    writer.release()
    return path


def wait_until(condition: Callable[[], bool], timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def read_all(source: Source, timeout: float = 2.0) -> list[Frame]:
    frames = []
    while (frame := source.read(timeout=timeout)) is not None:
        frames.append(frame)
    return frames


def reference_windows(samples: np.ndarray, size: int, hop: int) -> np.ndarray:
    count = (len(samples) - size) // hop + 1
    return np.stack([samples[i * hop : i * hop + size] for i in range(count)])


# -- URIs ----------------------------------------------------------------------------------------


def test_every_uri_form_parses_to_the_right_source(tmp_path: Path) -> None:
    video = tmp_path / "clip.mp4"
    (tmp_path / "frames").mkdir()
    cases: list[tuple[str, type, str, bool]] = [
        ("camera:0", CaptureSource, "image", True),
        ("/dev/video0", CaptureSource, "image", True),
        ("rtsp://user:secret@10.0.0.2:554/stream", CaptureSource, "image", True),
        ("http://cam.local/video.mjpg?resolution=640x480", CaptureSource, "image", True),
        ("https://cam.local/video.mjpg", CaptureSource, "image", True),
        (f"file:{video}", VideoFileSource, "image", False),
        (str(video), VideoFileSource, "image", False),
        (f"file:{video}?loop=1&live=1", VideoFileSource, "image", True),
        (f"images:{tmp_path}/frames/*.png", ImageFilesSource, "image", False),
        (str(tmp_path / "frames"), ImageFilesSource, "image", False),
        ("sensor:stdin?size=4&channels=2", StdinSensorSource, "sensor", False),
        (f"sensor:file:{tmp_path}/s.csv?size=4&hop=2&channels=2&idle=1", FileSensorSource,
         "sensor", False),
        ("sensor:udp://127.0.0.1:9000?size=4&channels=2", UdpSensorSource, "sensor", True),
        ("synthetic:?width=32&height=24&fps=30&frames=100&pattern=digits", SyntheticSource,
         "image", False),
        ("synthetic:?live=1", SyntheticSource, "image", True),
    ]  # fmt: skip
    for uri, cls, kind, live in cases:
        source = open_source(uri)  # parsing only: nothing exists, nothing is opened
        assert type(source) is cls, uri
        assert (source.uri, source.kind, source.live) == (uri, kind, live)
        assert source.stats.status == "ok" and source.stats.frames == 0
    assert open_source("camera:2").target == 2  # type: ignore[attr-defined]
    http = open_source("http://cam.local/video.mjpg?resolution=640x480")
    assert http.target.endswith("?resolution=640x480")  # type: ignore[attr-defined]
    assert "secret" not in repr(open_source("rtsp://user:secret@10.0.0.2:554/stream"))
    looped = open_source(f"file:{video}?loop=1&live=1")
    assert isinstance(looped, VideoFileSource) and looped.loop
    sensor = open_source(f"sensor:file:{tmp_path}/s.csv?size=4&hop=2&channels=2&idle=1")
    assert isinstance(sensor, FileSensorSource)
    assert sensor.window == WindowSpec(size=4, hop=2, channels=2) and sensor.idle == 1.0
    udp = open_source("sensor:udp://127.0.0.1:9000", window=WindowSpec(8, 4, 3))
    assert isinstance(udp, UdpSensorSource) and (udp.host, udp.port) == ("127.0.0.1", 9000)
    assert udp.window == WindowSpec(8, 4, 3)
    synth = open_source("synthetic:?width=32&height=24&frames=100&pattern=digits")
    assert isinstance(synth, SyntheticSource)
    assert (synth.width, synth.height, synth.frames, synth.pattern) == (32, 24, 100, "digits")


@pytest.mark.parametrize(
    ("uri", "kwargs", "words"),
    [
        ("ftp://host/video", {}, ["unknown source scheme 'ftp'", "camera:N"]),
        ("webcam:0", {}, ["unknown source scheme 'webcam'", "file:PATH"]),
        ("camera:front", {}, ["expected camera:N"]),
        ("synthetic:?width=0", {}, ["width = '0'", ">= 1"]),
        ("synthetic:?pattern=stripes", {}, ["pattern = 'stripes'", "noise|gradient|digits"]),
        ("synthetic:?colour=red", {}, ["unknown option(s) ['colour']", "known here"]),
        ("synthetic:", {"pace": "fast"}, ["pace = 'fast'"]),
        ("synthetic:", {"fps": -3}, ["fps = -3", "must be > 0"]),
        ("file:clip.mp4?loop=maybe", {}, ["loop = 'maybe'", "expected 1 or 0"]),
        ("sensor:stdin", {}, ["needs a window", "WindowSpec", "?size=N"]),
        ("sensor:tcp://1.2.3.4:5", {"window": WindowSpec(4, 4, 1)}, ["unknown sensor input"]),
        ("sensor:udp://127.0.0.1", {"window": WindowSpec(4, 4, 1)}, ["udp://HOST:PORT"]),
        ("", {}, ["empty URI"]),
    ],
)
def test_bad_uris_raise_a_one_line_source_error(
    uri: str, kwargs: dict[str, object], words: list[str]
) -> None:
    with pytest.raises(SourceError) as info:
        open_source(uri, **kwargs)  # type: ignore[arg-type]
    message = str(info.value)
    assert "\n" not in message and message.startswith(uri or "source")
    for word in words:
        assert word in message


def test_missing_and_corrupt_inputs_fail_at_open(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(os.urandom(4096))
    (tmp_path / "empty").mkdir()
    cases = [
        (f"file:{tmp_path}/missing.mp4", "no such file"),
        (str(tmp_path / "missing.mp4"), "no such file"),
        (f"file:{garbage}", "cannot decode"),
        (f"images:{tmp_path}/empty", "no image files"),
        (f"images:{tmp_path}/*.png", "no image files"),
        (f"sensor:file:{tmp_path}/missing.csv?size=2&channels=1", "no such file"),
        (f"file:{tmp_path}/missing.mp4?loop=1&live=1", "no such file"),
        (f"file:{tmp_path}/empty", "is not a regular file or a FIFO"),  # it exists: say what
    ]
    for uri, words in cases:
        source = open_source(uri)
        with pytest.raises(SourceError) as info:
            source.open()
        message = str(info.value)
        assert message.startswith(uri) and words in message and "\n" not in message
        assert isinstance(info.value, EdgeError) and info.value.exit_code == 2


def test_misuse_is_explained() -> None:
    source = open_source("synthetic:?frames=1&width=8&height=8")
    with pytest.raises(SourceError, match="before open"):
        source.read()
    source.open()
    with pytest.raises(SourceError, match="opened only once"):
        source.open()
    source.close()
    source.close()  # idempotent
    assert source.read() is None and source.stats.status == "ended"


def test_option_values_check_themselves() -> None:
    for kwargs in ({"initial": 0}, {"maximum": 0.1}, {"factor": 0.5}, {"jitter": 1.0}):
        with pytest.raises(ConfigError):
            BackoffPolicy(**kwargs)
    for size, hop, channels in ((0, 1, 1), (4, 0, 1), (4, 4, -1)):
        with pytest.raises(ConfigError, match="must be an integer >= 1"):
            WindowSpec(size, hop, channels)
    import random

    rng = random.Random(1)
    exact = BackoffPolicy(initial=0.5, maximum=30.0, factor=2.0, jitter=0.0)
    assert [exact.delay(a, rng) for a in range(8)] == [0.5, 1, 2, 4, 8, 16, 30, 30]
    assert exact.delay(10_000, rng) == 30.0
    jittered = BackoffPolicy()
    delays = [jittered.delay(2, rng) for _ in range(200)]
    assert 1.6 <= min(delays) < 1.8 and 2.2 < max(delays) <= 2.4  # 2 s ± 20 %


# -- video files and images ----------------------------------------------------------------------


def test_video_file_as_fast_as_possible(tmp_path: Path) -> None:
    video = write_video(tmp_path / "clip.mp4", 30, 20.0)
    with open_source(f"file:{video}") as source:
        frames = read_all(source)
        assert source.read() is None  # ended stays ended
        stats = source.stats
    assert [f.index for f in frames] == list(range(30))
    assert all(f.data.shape == (H, W, 3) and f.data.dtype == np.uint8 for f in frames)
    levels = [float(f.data.mean()) for f in frames]
    assert all(abs(level - 8 * i) < 4 for i, level in enumerate(levels))  # in order
    ns = [f.capture_ns for f in frames]
    assert all(b > a for a, b in zip(ns, ns[1:]))
    assert abs(frames[0].capture_ts - time.time()) < 60
    assert (stats.frames, stats.dropped, stats.status, stats.last_error) == (30, 0, "ended", None)


def test_video_file_paced_at_its_native_rate(tmp_path: Path) -> None:
    video = write_video(tmp_path / "clip.mp4", 12, 20.0)
    with open_source(str(video), pace="native") as source:
        assert not source.live  # camera timing, but every frame, in order
        start = time.monotonic()
        frames = read_all(source)
        elapsed = time.monotonic() - start
    assert [f.index for f in frames] == list(range(12))
    assert 0.45 <= elapsed <= 1.2, elapsed  # 11 intervals of 50 ms
    gaps = np.diff([f.capture_ns for f in frames]) / 1e9
    assert gaps.min() > 0.03


def test_video_truncated_midway_ends_with_an_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A video cannot skip what it cannot decode (OpenCV's read fails only at the end or after
    thousands of bad packets): it ends there, and says so once, not silently."""
    video = write_video(tmp_path / "clip.avi", 30, 20.0, fourcc="MJPG")
    data = video.read_bytes()
    video.write_bytes(data[: len(data) // 2])
    statuses: list[str] = []
    with caplog.at_level("WARNING", logger="edge_agent.io"), open_source(f"file:{video}") as source:
        source.on_status(lambda stats: statuses.append(stats.status))
        frames = read_all(source)
        stats = source.stats
    assert 0 < len(frames) < 30
    assert stats.status == "ended" and stats.last_error is not None
    assert "truncated or corrupt" in stats.last_error and str(video) in stats.last_error
    assert statuses == ["ended"]
    said = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(said) == 1 and "truncated or corrupt" in said[0] and "ended" in said[0], said


def test_images_by_glob_and_by_directory(tmp_path: Path) -> None:
    folder = tmp_path / "frames"
    folder.mkdir()
    for i in (3, 0, 2, 1, 4):  # written out of order: read sorted by name
        assert cv2.imwrite(str(folder / f"{i:03d}.png"), np.full((H, W, 3), 40 * i, np.uint8))
    (folder / "notes.txt").write_text("not an image")
    for uri in (f"images:{folder}/*.png", f"images:{folder}", str(folder)):
        with open_source(uri) as source:
            frames = read_all(source)
            assert source.stats.status == "ended" and source.stats.last_error is None
        assert [int(f.data[0, 0, 0]) for f in frames] == [0, 40, 80, 120, 160], uri
        assert all(f.data.shape == (H, W, 3) for f in frames)
    with open_source(f"images:{folder}?fps=50", pace="native") as source:
        start = time.monotonic()
        assert len(read_all(source)) == 5
        assert time.monotonic() - start >= 0.07  # 4 intervals of 20 ms


def test_images_that_cannot_be_decoded_are_skipped_and_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Garbage bytes and a truncated PNG among good ones: every good image is read, in order,
    each bad one is passed over with one warning naming it and counted; the run goes on."""
    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(5):
        assert cv2.imwrite(str(folder / f"{i}.png"), np.full((H, W, 3), 40 * i, np.uint8))
    (folder / "2b.png").write_bytes(b"not an image\n" * 50)  # garbage
    noisy = np.random.default_rng(1).integers(0, 256, (H, W, 3), dtype=np.uint8)
    assert cv2.imwrite(str(folder / "3b.png"), noisy)
    whole = (folder / "3b.png").read_bytes()
    (folder / "3b.png").write_bytes(whole[: len(whole) // 2])  # truncated
    with caplog.at_level("WARNING", logger="edge_agent.io"), open_source(f"images:{folder}") as src:
        frames = read_all(src)
        stats = src.stats
    assert [int(f.data[0, 0, 0]) for f in frames] == [0, 40, 80, 120, 160]
    assert [f.index for f in frames] == [0, 1, 2, 3, 4]
    assert (stats.frames, stats.unreadable, stats.status) == (5, 2, "ended")
    assert stats.last_error is not None and "3b.png" in stats.last_error
    said = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(said) == 2 and all("\n" not in line for line in said), said
    assert str(folder / "2b.png") in said[0] and str(folder / "3b.png") in said[1]


def test_an_images_source_of_only_bad_files_ends_with_them_counted(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(b"not a png at all")
    with open_source(f"images:{tmp_path}") as source:
        assert source.read(timeout=1.0) is None
        stats = source.stats
    assert (stats.frames, stats.unreadable, stats.status) == (0, 1, "ended")


def _ts_clip(tmp_path: Path, frames: int = 20) -> bytes:
    """An MPEG-TS clip of ``frames`` frames, frame i filled with 8 * i."""
    clip = tmp_path / "clip.ts"
    writer = cv2.VideoWriter(str(clip), cv2.CAP_FFMPEG, cv2.VideoWriter.fourcc(*"mp4v"), 25,
                             (W, H))  # fmt: skip
    assert writer.isOpened()
    for i in range(frames):
        writer.write(np.full((H, W, 3), 8 * i, np.uint8))
    writer.release()
    return clip.read_bytes()


def test_a_fifo_is_read_as_a_video_file(tmp_path: Path) -> None:
    """``file:PATH`` on a named pipe: the frames as a writer pushes them (MPEG-TS), to its end."""
    data = _ts_clip(tmp_path)
    fifo = tmp_path / "fifo.ts"
    os.mkfifo(fifo)

    def feed() -> None:
        with open(fifo, "wb") as pipe, contextlib.suppress(BrokenPipeError):
            pipe.write(data)

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    with open_source(f"file:{fifo}") as source:
        frames = read_all(source)
        stats = source.stats
    feeder.join(5)
    assert len(frames) == 20 and stats.last_error is None, stats
    assert all(abs(float(f.data.mean()) - 8 * i) < 4 for i, f in enumerate(frames))


def test_a_fifo_with_no_writer_yet_opens_at_once_and_starts_at_its_first_frame(
    digits: Any, tmp_path: Path
) -> None:
    """Opening a FIFO nobody writes to yet returns at once (FFmpeg's own open would block the
    agent before READY=1, saying nothing): the pipeline is "starting", each read times out, and
    the frames flow once a writer comes."""
    from edge_agent.io.sinks import CallbackSink
    from edge_agent.model.loader import load_model
    from edge_agent.model.profiles import load_profile
    from edge_agent.pipeline import Pipeline, State

    data = _ts_clip(tmp_path)
    fifo = tmp_path / "fifo.ts"
    os.mkfifo(fifo)
    source = open_source(f"file:{fifo}")
    assert source.connects_in_background
    results: list[dict[str, Any]] = []
    ended = threading.Event()
    model = load_model(digits.onnx, profile=load_profile("x86-64"), state_dir=tmp_path, threads=1)
    pipe = Pipeline(source=source, model=model, sinks=[CallbackSink(results.append)])
    runner = threading.Thread(target=lambda: (pipe.run(), ended.set()), daemon=True)
    runner.start()
    try:
        wait_until(lambda: pipe.started_mono > 0, timeout=20)  # the source opened
        time.sleep(1.2)  # two read timeouts: still no writer, still starting, nothing read
        assert pipe.state is State.STARTING and pipe.frames == 0
        assert pipe.stalled_s() < 1.0  # the capture loop goes round meanwhile
        with open(fifo, "wb") as writer, contextlib.suppress(BrokenPipeError):
            writer.write(data)
        runner.join(30)
    finally:
        pipe.stop()
        runner.join(10)
        model.close()
    assert ended.is_set() and len(results) == 20
    assert source.stats.last_error is None


def test_synthetic_finite_patterns() -> None:
    for pattern in ("noise", "gradient", "digits"):
        uri = f"synthetic:?width=40&height=30&frames=5&pattern={pattern}"
        with open_source(uri) as source:
            frames = read_all(source)
            assert source.stats.status == "ended"
        assert [f.index for f in frames] == [0, 1, 2, 3, 4]
        assert all(f.data.shape == (30, 40, 3) and f.data.dtype == np.uint8 for f in frames)
        assert not np.array_equal(frames[0].data, frames[1].data), pattern


# -- live sources --------------------------------------------------------------------------------


def test_live_source_keeps_only_the_newest_frame() -> None:
    with open_source("synthetic:?width=32&height=24&fps=400&live=1") as source:
        last = -1
        for _ in range(8):
            time.sleep(0.03)  # a slow reader: about 12 frames arrive per read
            before = source.stats.frames
            frame = source.read(timeout=1.0)
            assert frame is not None
            assert frame.index > last  # never repeated, never older
            assert frame.index >= before - 1  # the newest when read() took it
            last = frame.index
        stats = source.stats
    assert stats.dropped > 20
    assert stats.frames - 8 - stats.dropped in (0, 1)  # read, dropped, or still in the slot


def test_live_read_waits_for_a_newer_frame() -> None:
    with open_source("synthetic:?width=16&height=16&fps=5&live=1") as source:
        first = source.read(timeout=1.0)
        assert first is not None
        with pytest.raises(SourceTimeout, match=r"no new frame within 0\.05 s"):
            source.read(timeout=0.05)  # the next frame is 200 ms away; the old one is not resent
        second = source.read(timeout=1.0)
        assert second is not None and second.index == first.index + 1
        assert second.capture_ns - first.capture_ns > 150e6


def test_live_finite_synthetic_ends() -> None:
    with open_source("synthetic:?width=16&height=16&fps=200&frames=5&live=1") as source:
        wait_until(lambda: source.stats.status == "ended")
        last = source.read(timeout=1.0)
        assert last is not None and last.index == 4  # the newest frame is still handed over
        assert source.read(timeout=1.0) is None
        assert source.stats.frames == 5


def test_close_is_prompt_idempotent_and_wakes_a_blocked_reader() -> None:
    source = open_source("synthetic:?width=16&height=16&fps=1&live=1")
    source.open()
    assert source.read(timeout=2.0) is not None
    result: list[object] = []
    reader = threading.Thread(target=lambda: result.append(source.read()))
    reader.start()
    time.sleep(0.05)
    start = time.monotonic()
    source.close()
    source.close()
    assert time.monotonic() - start < 1.0
    reader.join(1.0)
    assert not reader.is_alive() and result == [None]
    assert source.read() is None and source.stats.status == "ended"
    assert not any(t.name.startswith("source synthetic") for t in threading.enumerate())


def test_camera_that_disappears_and_comes_back(tmp_path: Path) -> None:
    """A looping video file run live stands in for a camera; taking the file away is unplugging
    it (the capture fails when the loop re-opens it), putting it back is plugging it in."""
    video = write_video(tmp_path / "cam.mp4", 10, 50.0)  # a 0.2 s loop
    hidden = tmp_path / "unplugged.mp4"
    source = open_source(f"file:{video}?loop=1&live=1", reconnect=FAST)
    changes: list[tuple[str, int]] = []
    source.on_status(lambda stats: changes.append((stats.status, stats.reconnects)))
    with source:
        first = source.read(timeout=2.0)
        assert first is not None and first.data.shape == (H, W, 3)
        os.replace(video, hidden)
        wait_until(lambda: source.stats.status == "degraded")
        assert "no such file" in (source.stats.last_error or "")
        with contextlib.suppress(SourceTimeout):
            source.read(timeout=0)  # the last frame captured before the loss, if unread
        with pytest.raises(SourceTimeout, match="degraded"):
            source.read(timeout=0.15)
        time.sleep(0.3)  # a few reconnection attempts fail meanwhile; none escapes
        os.replace(hidden, video)
        wait_until(lambda: source.stats.status == "ok")
        again = source.read(timeout=2.0)
        assert again is not None and again.index > first.index
        stats = source.stats
    assert stats.reconnects == 1 and stats.status_changes == 2
    assert changes == [("degraded", 0), ("ok", 1), ("ended", 1)]


@pytest.mark.parametrize("scheme", ["rtsp", "http"])
def test_stream_on_a_closed_port_degrades_and_retries(scheme: str) -> None:
    port = free_port()  # nothing listens there
    uri = f"{scheme}://admin:secret@127.0.0.1:{port}/live"
    source = open_source(uri, reconnect=FAST)
    start = time.monotonic()
    source.open()  # never fails for want of the camera
    assert time.monotonic() - start < 0.5
    wait_until(lambda: source.stats.status == "degraded")
    with pytest.raises(SourceTimeout, match="degraded"):
        source.read(timeout=0.1)
    time.sleep(0.3)
    stats = source.stats
    assert stats.status == "degraded" and stats.reconnects == 0 and stats.frames == 0
    assert stats.last_error is not None and "cannot connect" in stats.last_error
    assert "secret" not in stats.last_error
    start = time.monotonic()
    source.close()
    assert time.monotonic() - start < 1.0
    assert source.stats.status == "ended"


_REFUSED_STREAM_CHILD = """
import logging, sys, time
logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(message)s")
from edge_agent.io import BackoffPolicy, open_source
source = open_source(sys.argv[1], reconnect=BackoffPolicy(initial=5.0, maximum=5.0, jitter=0.0))
source.open()
deadline = time.monotonic() + 20
while source.stats.status != "degraded" and time.monotonic() < deadline:
    time.sleep(0.02)
source.close()
"""


@pytest.mark.parametrize(
    ("user_env", "theirs"),
    [
        ({}, []),
        ({"OPENCV_LOG_LEVEL": "WARNING"}, ["VIDEOIO(FFMPEG)"]),
        ({"OPENCV_LOG_LEVEL": "INFO", "OPENCV_FFMPEG_LOGLEVEL": "24"}, ["Connection to tcp"]),
    ],
)
def test_a_refused_stream_is_said_once_in_our_words(
    user_env: dict[str, str], theirs: list[str]
) -> None:
    """OpenCV's and FFmpeg's own lines (``[tcp @ 0x…] Connection to … failed: Connection
    refused``, ``[ WARN…] VIDEOIO(FFMPEG) …``) stay off standard error; our one line says why.
    A user's own OPENCV_LOG_LEVEL / OPENCV_FFMPEG_LOGLEVEL is left alone: their lines come back."""
    uri = f"tcp://127.0.0.1:{free_port()}"  # nothing listens there
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENCV_")} | user_env
    run = subprocess.run([sys.executable, "-c", _REFUSED_STREAM_CHILD, uri], env=env, cwd=REPO,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         timeout=60)  # fmt: skip
    out = run.stdout  # both: OpenCV writes its INFO lines (FFmpeg's, routed) to stdout
    assert run.returncode == 0, out
    lines = out.splitlines()
    ours = [line for line in lines if line.startswith(f"{uri}: lost:")]
    assert len(ours) == 1 and "refused the connection" in ours[0], out
    if not theirs:
        assert lines == ours, out  # no "[tcp @", no "VIDEOIO(FFMPEG)", nothing else
    for needle in theirs:
        assert needle in out, out


# -- sensors -------------------------------------------------------------------------------------


def _sensor_text(samples: np.ndarray, form: str) -> str:
    names = [f"ch{c}" for c in range(samples.shape[1])]
    rows = [[float(v) for v in row] for row in samples]
    if form == "json-list":
        return "".join(json.dumps(row) + "\n" for row in rows)
    if form == "json-object":
        return "".join(json.dumps(dict(zip(names, row))) + "\n" for row in rows)
    header = ",".join(names) + "\n"
    return header + "".join(",".join(repr(v) for v in row) + "\n" for row in rows)


@pytest.mark.parametrize("form", ["json-list", "json-object", "csv"])
@pytest.mark.parametrize(("size", "hop"), [(8, 3), (5, 5), (3, 7)])
def test_sensor_windows_match_a_numpy_reference(
    tmp_path: Path, form: str, size: int, hop: int
) -> None:
    samples = np.random.default_rng(size * 10 + hop).normal(size=(2500, 3)).astype(np.float32)
    path = tmp_path / "samples.txt"
    path.write_text(_sensor_text(samples, form))
    uri = f"sensor:file:{path}?size={size}&hop={hop}&channels=3&idle=0.05"
    with open_source(uri) as source:
        frames = read_all(source)
        stats = source.stats
    expected = reference_windows(samples, size, hop)
    assert len(frames) == len(expected)
    got = np.stack([f.data for f in frames])
    assert got.dtype == np.float32 and got.shape == (len(expected), size, 3)
    np.testing.assert_array_equal(got, expected)
    assert [f.index for f in frames] == list(range(len(expected)))
    assert (stats.bad_lines, stats.status, stats.frames) == (0, "ended", len(expected))


def test_sensor_bad_lines_are_counted_and_skipped(tmp_path: Path) -> None:
    path = tmp_path / "s.csv"
    path.write_text(
        'x,y,z\n1,2,3\n4,5\nabc,1,2\n\n7,8,9\n[1, 2]\n{"x": 1}\n10,11,12\n["a", 1, 2]\n13,14,15\n'
    )
    with open_source(f"sensor:file:{path}?size=2&hop=1&channels=3&idle=0.05") as source:
        frames = read_all(source)
        assert source.stats.bad_lines == 5
        assert isinstance(source, FileSensorSource) and source.header == ["x", "y", "z"]
    good = np.array([[1, 2, 3], [7, 8, 9], [10, 11, 12], [13, 14, 15]], np.float32)
    np.testing.assert_array_equal(np.stack([f.data for f in frames]), reference_windows(good, 2, 1))


def test_sensor_json_objects_keep_the_first_key_order(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    path.write_text('{"b": 1, "a": 2}\n{"a": 4, "b": 3}\n{"c": 5, "b": 6}\n')
    with open_source(f"sensor:file:{path}?size=2&channels=2&idle=0.05") as source:
        frames = read_all(source)
        assert source.stats.bad_lines == 1  # a key the first line did not have
    assert len(frames) == 1
    np.testing.assert_array_equal(frames[0].data, [[1, 2], [3, 4]])


def test_sensor_file_is_tailed_until_deleted(tmp_path: Path) -> None:
    path = tmp_path / "live.csv"
    path.write_text("")
    with open_source(f"sensor:file:{path}?size=2&hop=2&channels=1") as source:
        with pytest.raises(SourceTimeout):
            source.read(timeout=0.1)
        with path.open("a") as f:
            f.write("1\n2\n3")  # "3" has no newline yet: the writer is mid-line
        first = source.read(timeout=1.0)
        assert first is not None
        np.testing.assert_array_equal(first.data, [[1], [2]])
        with pytest.raises(SourceTimeout):
            source.read(timeout=0.1)
        with path.open("a") as f:
            f.write(".5\n4\n")
        second = source.read(timeout=1.0)
        assert second is not None
        np.testing.assert_array_equal(second.data, [[3.5], [4]])
        with path.open("a") as f:
            f.write("5\n6\n")
        path.unlink()  # what was written before the file went is still read
        third = source.read(timeout=1.0)
        assert third is not None
        np.testing.assert_array_equal(third.data, [[5], [6]])
        assert source.read(timeout=1.0) is None
        assert source.stats.status == "ended"


def test_sensor_stdin_in_a_real_process() -> None:
    samples = np.random.default_rng(7).uniform(-5, 5, size=(41, 2)).astype(np.float32)
    code = (
        "import json\n"
        "from edge_agent.io import open_source\n"
        "with open_source('sensor:stdin?size=6&hop=4&channels=2') as source:\n"
        "    while (frame := source.read()) is not None:\n"
        "        print(json.dumps([frame.index, frame.data.tolist()]))\n"
        "    print(json.dumps(source.stats.bad_lines))\n"
    )
    lines = _sensor_text(samples, "csv").splitlines()
    lines.insert(5, "not,a,sample")
    text = "\n".join(lines)  # and no newline after the last sample
    out = subprocess.run(
        [sys.executable, "-c", code], input=text, capture_output=True, text=True,
        timeout=60, check=True, cwd=REPO,
    )  # fmt: skip
    printed = [json.loads(line) for line in out.stdout.splitlines()]
    expected = reference_windows(samples, 6, 4)
    assert [index for index, _ in printed[:-1]] == list(range(len(expected)))
    np.testing.assert_array_equal(np.array([w for _, w in printed[:-1]], np.float32), expected)
    assert printed[-1] == 1


def test_sensor_stdin_source_on_a_pipe_times_out_and_ends() -> None:
    read_fd, write_fd = os.pipe()
    try:
        with StdinSensorSource(window=WindowSpec(2, 1, 1), fd=read_fd) as source:
            with pytest.raises(SourceTimeout):
                source.read(timeout=0.05)
            os.write(write_fd, b"1\n2\n3\n")
            os.close(write_fd)
            write_fd = -1
            frames = read_all(source)
        np.testing.assert_array_equal(np.stack([f.data for f in frames]), [[[1], [2]], [[2], [3]]])
    finally:
        os.close(read_fd)
        if write_fd >= 0:
            os.close(write_fd)


def test_udp_sensor_windows(tmp_path: Path) -> None:
    samples = np.random.default_rng(3).normal(size=(24, 2)).astype(np.float32)
    expected = reference_windows(samples, 4, 4)
    source = open_source("sensor:udp://127.0.0.1:0?size=4&hop=4&channels=2")
    assert isinstance(source, UdpSensorSource)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with source, tx:
        host, port = source.address
        assert host == "127.0.0.1" and port > 0
        for k in range(len(expected)):  # one window per datagram, several lines each
            rows = samples[k * 4 : (k + 1) * 4]
            tx.sendto("".join(json.dumps(r.tolist()) + "\n" for r in rows).encode(), (host, port))
            frame = source.read(timeout=2.0)
            assert frame is not None and frame.index == k
            np.testing.assert_array_equal(frame.data, expected[k])
        tx.sendto(b"[1, 2, 3]\n", (host, port))
        wait_until(lambda: source.stats.bad_lines == 1)
        # a burst in one datagram: the reader gets the newest window, the rest count as dropped
        burst = np.arange(40, dtype=np.float32).reshape(20, 2)
        tx.sendto("".join(f"{a},{b}\n" for a, b in burst).encode(), (host, port))
        wait_until(lambda: source.stats.frames == len(expected) + 5)
        newest = source.read(timeout=1.0)
        assert newest is not None and newest.index == len(expected) + 4
        np.testing.assert_array_equal(newest.data, burst[16:20])
        stats = source.stats
    assert stats.dropped == 4 and stats.status == "ok"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        busy = open_source(f"sensor:udp://127.0.0.1:{taken.getsockname()[1]}?size=2&channels=1")
        with pytest.raises(SourceError, match="cannot bind"):
            busy.open()


def test_public_names_are_exported() -> None:
    for name in sources.__all__:
        assert hasattr(sources, name), name
    assert issubclass(SourceTimeout, SourceError) and issubclass(SourceError, EdgeError)


def test_closing_a_finite_source_while_another_thread_reads_it(tmp_path: Path) -> None:
    video = write_video(tmp_path / "clip.mp4", 30, 20.0)
    source = open_source(f"file:{video}", pace="native")
    source.open()
    got: list[Frame] = []
    reader = threading.Thread(target=lambda: got.extend(read_all(source)))
    reader.start()
    wait_until(lambda: source.stats.frames >= 3)
    start = time.monotonic()
    source.close()
    assert time.monotonic() - start < 1.0
    reader.join(1.0)
    assert not reader.is_alive() and 3 <= len(got) < 30
    assert source.stats.status == "ended" and source.read() is None


# --- RTSP credentials from a file ------------------------------------------------------------


def _rtsp_config(tmp_path: Path, **source: str) -> Any:
    from edge_agent.config import parse_config

    return parse_config({"source": source}, path=str(tmp_path / "agent.toml"))


def test_rtsp_password_comes_from_its_file_and_stays_out_of_the_uri(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from edge_agent.io.opencv import CaptureSource
    from edge_agent.io.uri import open_source_from, open_streams_from

    secret = tmp_path / "cam-password"
    secret.write_text("p@ss:w/rd\n")
    secret.chmod(0o644)
    uri = "rtsp://viewer@10.0.0.7:554/stream1"
    config = _rtsp_config(tmp_path, uri=uri, password_file=str(secret))
    assert config.source.uri == uri
    source = open_source_from(config)
    assert isinstance(source, CaptureSource)
    with caplog.at_level("WARNING"):
        target = source.stream_target()
    # percent-encoded, so '@', ':' and '/' in the password cannot move the host
    assert target == "rtsp://viewer:p%40ss%3Aw%2Frd@10.0.0.7:554/stream1"
    assert "readable by others" in caplog.text and "p@ss" not in caplog.text
    assert source.uri == uri and "p@ss" not in repr(source) and "p%40" not in repr(source)
    from edge_agent.config import parse_config

    multi = parse_config(
        {"sources": [{"name": "door", "uri": uri, "password_file": str(secret)}]},
        path=str(tmp_path / "agent.toml"),
    )
    (stream,) = open_streams_from(multi)
    assert isinstance(stream.source, CaptureSource)
    assert stream.source.stream_target() == target
    assert stream.source.uri == uri


@pytest.mark.parametrize(
    ("uri", "needle"),
    [
        ("rtsp://viewer:hunter2@10.0.0.7/s", "uri holds a password and password_file is set"),
        ("rtsp://10.0.0.7/s", "password_file needs a user in the uri"),
        ("file:video.mp4", "only rtsp://, rtsps://, http:// and https://"),
    ],
)
def test_rtsp_password_file_misuse_is_one_line(tmp_path: Path, uri: str, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        _rtsp_config(tmp_path, uri=uri, password_file="cam-password")
    message = str(err.value)
    assert needle in message and "\n" not in message and "hunter2" not in message
    assert message.startswith("config: [source]")


def test_rtsp_password_file_missing_is_a_source_error(tmp_path: Path) -> None:
    from edge_agent.io.uri import open_source

    source = open_source("rtsp://viewer@10.0.0.7/s", password_file=str(tmp_path / "nope"))
    with pytest.raises(SourceError, match="no such file"):
        source.stream_target()  # type: ignore[attr-defined]
    with pytest.raises(SourceError, match="only for network streams"):
        open_source("camera:0", password_file=str(tmp_path / "nope"))


def test_a_frame_from_before_a_loss_is_not_served_after_it() -> None:
    """A live source lost with a frame waiting in its slot: once it is back, the first read is
    a frame captured after the loss; the stale one is counted as dropped."""
    captured = threading.Event()
    failed = threading.Event()
    steps = iter(["frame", "fail"])

    class Flaky(Source):  # a designed seam: a live source that fails once, after one frame
        def __init__(self) -> None:
            super().__init__("flaky:0", kind="image", live=True, reconnect=FAST)

        def _capture(self, timeout: float | None) -> np.ndarray | None:
            step = next(steps, "after")
            if step == "frame":
                captured.set()
                return np.zeros((4, 4, 3), np.uint8)
            if step == "fail":
                failed.set()
                raise OSError("unplugged")
            time.sleep(0.01)
            return np.full((4, 4, 3), 9, np.uint8)

    with Flaky() as source:
        assert captured.wait(5) and failed.wait(5)
        frame = source.read(timeout=5.0)
        assert frame is not None and frame.index >= 1 and int(frame.data[0, 0, 0]) == 9
        assert source.stats.dropped >= 1 and source.stats.reconnects == 1
