"""Audio files as windowed sensor streams: real WAV files written here with the standard
library, read back through ``wav:PATH`` and compared with windows cut by hand."""

from __future__ import annotations

import time
import wave
from pathlib import Path

import numpy as np
import pytest

from edge_agent.errors import SourceError
from edge_agent.io import WavSource, WindowSpec, open_source


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
