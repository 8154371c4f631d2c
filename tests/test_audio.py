"""Audio files as windowed sensor streams: real WAV files written here with the standard
library, read back through ``wav:PATH`` and compared with windows cut by hand."""

from __future__ import annotations

import os
import time
import wave
from pathlib import Path

import numpy as np
import pytest

from edge_agent.common.backoff import BackoffPolicy
from edge_agent.errors import SourceError
from edge_agent.io import AlsaSource, SourceTimeout, WavSource, WindowSpec, open_source
from tests.fleet import wait_until


def _write(path: Path, samples: np.ndarray, *, rate: int = 16000, width: int = 2) -> None:
    """``samples``: int values [n, channels] in the sample width's range."""
    channels = samples.shape[1]
    if width == 1:
        raw = (samples + 128).astype(np.uint8).tobytes()
    elif width == 2:
        raw = samples.astype("<i2").tobytes()
    elif width == 3:
        v = samples.astype(np.int32).reshape(-1) & 0xFFFFFF
        raw = np.stack([v & 0xFF, (v >> 8) & 0xFF, v >> 16], axis=1).astype(np.uint8).tobytes()
    else:
        raw = samples.astype("<i4").tobytes()
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(raw)


def _windows(path: str, **kw: object) -> list[np.ndarray]:
    out = []
    with open_source(path, **kw) as src:  # type: ignore[arg-type]
        while (frame := src.read(timeout=5.0)) is not None:
            out.append(frame.data)
    return out


@pytest.mark.parametrize(("width", "full"), [(1, 128), (2, 32768), (3, 1 << 23), (4, 1 << 31)])
def test_windows_match_a_hand_cut_reference(tmp_path: Path, width: int, full: int) -> None:
    rng = np.random.default_rng(width)
    n = 10_000  # more than one read chunk, not a whole number of hops
    ints = rng.integers(-full, full, size=(n, 2), dtype=np.int64)
    path = tmp_path / f"s{width}.wav"
    _write(path, ints, width=width)
    got = _windows(f"wav:{path}?size=400&hop=160")
    expected = ints.astype(np.float64) / full
    count = (n - 400) // 160 + 1
    assert len(got) == count
    for k in (0, 1, count // 2, count - 1):
        assert got[k].shape == (400, 2) and got[k].dtype == np.float32
        np.testing.assert_allclose(got[k], expected[k * 160 : k * 160 + 400], atol=1e-6)
    assert all(w.min() >= -1.0 and w.max() < 1.0 for w in got)


def test_the_window_from_the_command_line_and_its_channel_check(tmp_path: Path) -> None:
    path = tmp_path / "mono.wav"
    _write(path, np.arange(1000, dtype=np.int64).reshape(-1, 1))
    got = _windows(f"wav:{path}", window=WindowSpec(size=100, hop=100, channels=1))
    assert len(got) == 10 and got[3][0, 0] == pytest.approx(300 / 32768)
    stereo = open_source(f"wav:{path}", window=WindowSpec(size=100, hop=100, channels=2))
    with pytest.raises(SourceError, match=r"1 channel\(s\), the window expects 2"):
        stereo.open()


def test_bad_input_gets_one_line(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="needs a window"):
        open_source(f"wav:{tmp_path / 'x.wav'}")
    with pytest.raises(SourceError, match="no such file"):
        open_source(f"wav:{tmp_path / 'missing.wav'}?size=10").open()
    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"not a wav at all" * 10)
    with pytest.raises(SourceError, match="not a PCM WAV file") as err:
        open_source(f"wav:{junk}?size=10").open()
    assert "\n" not in str(err.value)
    with pytest.raises(SourceError, match="unknown option"):
        open_source(f"wav:{junk}?size=10&rate=8000")


def test_native_pace_plays_at_the_recording_rate(tmp_path: Path) -> None:
    path = tmp_path / "slow.wav"
    _write(path, np.zeros((800, 1), np.int64), rate=800)  # 1 s of audio, hop 100: 8 windows/s
    source = open_source(f"wav:{path}?size=100&hop=100", pace="native")
    assert isinstance(source, WavSource)
    t0 = time.monotonic()
    got = _windows(f"wav:{path}?size=100&hop=100", pace="native")
    elapsed = time.monotonic() - t0
    assert len(got) == 8
    assert elapsed >= 7 / 8 - 0.05  # never faster than the recording (a lower bound only)


def test_a_hop_longer_than_a_read_skips_exactly_hop_samples(tmp_path: Path) -> None:
    """hop > the samples read so far: the skip carries over into samples not yet read."""
    n, size, hop = 10_000, 100, 4500  # a hop longer than one read chunk (4096 samples)
    ints = np.arange(n, dtype=np.int64).reshape(-1, 1) % 30000
    path = tmp_path / "skip.wav"
    _write(path, ints)
    got = _windows(f"wav:{path}?size={size}&hop={hop}")
    starts = list(range(0, n - size + 1, hop))  # 0, 4500, 9000
    assert len(got) == len(starts)
    for window, start in zip(got, starts):
        np.testing.assert_allclose(window[:, 0], ints[start : start + size, 0] / 32768, atol=1e-6)


# --- microphones through arecord: a stand-in on PATH writes raw PCM as the real one does ---

STANDIN = Path(__file__).resolve().parent / "bin"
FAST = BackoffPolicy(initial=0.05, maximum=0.2, factor=2.0, jitter=0.2)


@pytest.fixture
def arecord(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """The stand-in on PATH; returns the file its command lines are logged to."""
    monkeypatch.setenv("PATH", f"{STANDIN}{os.pathsep}{os.environ['PATH']}")
    for key in ("ARECORD_STANDIN_SECONDS", "ARECORD_STANDIN_NO_DEVICE"):
        monkeypatch.delenv(key, raising=False)
    log = tmp_path / "arecord.log"
    monkeypatch.setenv("ARECORD_STANDIN_LOG", str(log))
    return log


def _standin_signal(n: np.ndarray, rate: int, channels: int, full: int) -> np.ndarray:
    """What the stand-in records, as float in [-1, 1]: [len(n), channels]."""
    c = np.arange(channels)
    v = np.round(0.375 * full * np.sin(2 * np.pi * 440 * n[:, None] / rate + c[None, :]))
    return v / full


def _live_window(source: AlsaSource, timeout: float = 20.0) -> np.ndarray:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            frame = source.read(timeout=0.5)
        except SourceError:
            continue
        if frame is not None:
            return frame.data
    raise AssertionError(f"no window in time: {source.stats}")


@pytest.mark.parametrize(("fmt", "full"), [("S16_LE", 32768), ("S24_3LE", 1 << 23),
                                           ("S32_LE", 1 << 31), ("U8", 128)])  # fmt: skip
def test_a_microphone_gives_the_windows_arecord_records(arecord: Path, fmt: str, full: int) -> None:
    rate, size, hop = 8000, 400, 400
    source = open_source(f"alsa:hw:1,0?rate={rate}&channels=2&format={fmt}&size={size}&hop={hop}")
    assert isinstance(source, AlsaSource)
    with source:
        window = _live_window(source)
    assert window.shape == (size, 2) and window.dtype == np.float32
    # a live source may have dropped windows before this one: find where it starts
    reference = _standin_signal(np.arange(rate * 30), rate, 2, full)
    starts = [k * hop for k in range(len(reference) // hop - 1)]
    errors = [np.abs(reference[s : s + size] - window).max() for s in starts[: rate // hop * 20]]
    assert min(errors) < 2.0 / full + 1e-6, min(errors)
    assert arecord.read_text().split("\n")[0] == (f"-D hw:1,0 -f {fmt} -r {rate} -c 2 -t raw -q")


def test_windows_start_every_hop(arecord: Path) -> None:
    rate = 16000  # the default; 440 Hz repeats every 400 samples (11 periods)
    with open_source("alsa:default", window=WindowSpec(size=320, hop=80, channels=1)) as source:
        a = _live_window(source)
        b = _live_window(source)
    assert a.shape == b.shape == (320, 1) and not np.array_equal(a, b)
    reference = _standin_signal(np.arange(1200), rate, 1, 32768)[:, 0]

    def offsets(w: np.ndarray) -> list[int]:
        return [s for s in range(400) if np.abs(reference[s : s + 320] - w[:, 0]).max() < 1e-4]

    # each window starts a whole number of hops into the recording
    assert offsets(a) and all(s % 80 == 0 for s in offsets(a)), offsets(a)
    assert offsets(b) and all(s % 80 == 0 for s in offsets(b)), offsets(b)


def test_an_unplugged_microphone_comes_back(arecord: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ARECORD_STANDIN_SECONDS", "0.3")
    source = open_source("alsa:default?size=160&hop=160", reconnect=FAST)
    with source:
        _live_window(source)
        wait_until(lambda: source.stats.reconnects >= 2, timeout=30, what="two reconnects")
        _live_window(source)
        stats = source.stats
    assert "arecord exited (code 1): arecord: pcm_read:2221: read error: No such device" in (
        stats.last_error or ""
    ), stats
    assert len(arecord.read_text().splitlines()) >= 3


def test_a_missing_microphone_is_degraded_in_arecords_words(
    arecord: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ARECORD_STANDIN_NO_DEVICE", "1")
    source = open_source("alsa:hw:9,0?size=160", reconnect=FAST)
    with source:
        wait_until(lambda: source.stats.status == "degraded", timeout=20, what="degraded")
        with pytest.raises(SourceTimeout):
            source.read(timeout=0.2)
        stats = source.stats
    assert "audio open error: No such file or directory" in (stats.last_error or ""), stats


def test_without_arecord_the_error_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    source = open_source("alsa:default?size=160", reconnect=FAST)
    with source:
        wait_until(lambda: source.stats.last_error is not None, timeout=20, what="an error")
        error = source.stats.last_error or ""
    assert "arecord not found" in error and "alsa-utils" in error


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("alsa:default", "needs a window"),
        ("alsa:default?size=160&format=F32_LE", "expected one of"),
        ("alsa:default?size=160&rate=0", "rate"),
        ("alsa:default?size=160&gain=2", "unknown option"),
    ],
)
def test_bad_microphone_uris_are_refused_in_one_line(uri: str, message: str) -> None:
    with pytest.raises(SourceError, match=message) as info:
        open_source(uri)
    assert "\n" not in str(info.value)


def test_the_agent_serves_a_model_on_a_microphone(arecord: Path, tmp_path: Path) -> None:
    """End to end: edge-agent run over alsa: (the stand-in), a model that takes the loudest
    sample of each window; the stand-in's sine peaks at 0.375 of full scale."""
    import json
    import subprocess
    import sys

    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("ReduceMax", ["x"], ["peak"], axes=[1], keepdims=0)],
        "peak",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 160, 1])],
        [helper.make_tensor_value_info("peak", TensorProto.FLOAT, [1, 1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "peak.onnx"))
    results = tmp_path / "results.jsonl"
    run = subprocess.run(
        [str(Path(sys.executable).parent / "edge-agent"), "run",
         "--model", str(tmp_path / "peak.onnx"), "--source", "alsa:default?rate=16000",
         "--window", "160,160,1", "--max-frames", "5", "--results", f"jsonl:{results}",
         "--state-dir", str(tmp_path), "--profile", "x86-64"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert [r["seq"] for r in rows] == [0, 1, 2, 3, 4]
    peaks = [next(iter(r["output"]["outputs"].values())) for r in rows]
    assert all(abs(np.asarray(p).item() - 0.375) < 0.01 for p in peaks), peaks
