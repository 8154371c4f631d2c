"""Audio files as sensor streams: ``wav:PATH?size=N&hop=N`` reads PCM WAV with the standard
library's ``wave`` (8, 16, 24 or 32-bit integer samples, any number of channels) and cuts it
into windows ``[size, channels]`` of float32 in [-1, 1], a new one every ``hop`` samples, as the
sensor sources do. Finite: every window in order; ``pace="native"`` delivers one window every
``hop / rate`` seconds, so a recording can stand in for a microphone."""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np

from edge_agent.errors import SourceError
from edge_agent.io.source import EndOfStream, Pacer, Source

#: Samples read per call (then windows are cut from the buffer with numpy).
CHUNK_SAMPLES = 4096


def pcm_to_float(raw: bytes, width: int, channels: int) -> np.ndarray:
    """Interleaved little-endian PCM -> float32 ``[samples, channels]`` in [-1, 1]."""
    if width == 1:  # WAV's 8-bit samples are unsigned
        data = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width == 2:
        data = np.frombuffer(raw, "<i2").astype(np.float32) / 32768.0
    elif width == 3:
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        value = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        value = np.where(value >= 1 << 23, value - (1 << 24), value)
        data = value.astype(np.float32) / float(1 << 23)
    elif width == 4:
        data = (np.frombuffer(raw, "<i4").astype(np.float64) / float(1 << 31)).astype(np.float32)
    else:
        raise ValueError(f"{8 * width}-bit samples")
    return data.reshape(-1, channels)


class WavSource(Source):
    def __init__(
        self,
        path: str | Path,
        *,
        uri: str,
        size: int,
        hop: int,
        channels: int | None = None,
        pace: str = "none",
    ) -> None:
        super().__init__(uri, kind="sensor", live=False)
        if size < 1 or hop < 1:
            raise SourceError(f"{self._label}: size = {size}, hop = {hop}: must be >= 1")
        self.path = Path(path)
        self.size, self.hop = size, hop
        self.expected_channels = channels
        self._paced = pace == "native"
        self._wav: wave.Wave_read | None = None
        self._buf = np.empty((0, 1), np.float32)  # samples read, not yet past a window: _connect
        self.rate = self.channels = self._width = 0  # the file's, known once opened

    def _connect(self) -> None:
        try:
            wav = wave.open(str(self.path), "rb")  # noqa: SIM115 - open across reads; _disconnect closes it
        except FileNotFoundError:
            raise SourceError(f"{self._label}: no such file: {self.path}") from None
        except (wave.Error, EOFError, OSError) as exc:
            raise SourceError(f"{self._label}: not a PCM WAV file ({exc})") from None
        channels, width, rate = wav.getnchannels(), wav.getsampwidth(), wav.getframerate()
        if width not in (1, 2, 3, 4):
            wav.close()
            raise SourceError(f"{self._label}: {8 * width}-bit samples; expected 8, 16, 24 or 32")
        if self.expected_channels is not None and channels != self.expected_channels:
            wav.close()
            raise SourceError(
                f"{self._label}: the file has {channels} channel(s), the window expects "
                f"{self.expected_channels}"
            )
        self._wav, self.rate, self.channels, self._width = wav, rate, channels, width
        self._buf = np.empty((0, channels), np.float32)
        if self._paced:
            self._pacer = Pacer(rate / self.hop)

    def _capture(self, timeout: float | None) -> np.ndarray | None:
        wav = self._wav
        if wav is None:
            raise EndOfStream
        while len(self._buf) < self.size:
            raw = wav.readframes(max(CHUNK_SAMPLES, self.size))
            if not raw:
                raise EndOfStream  # a last partial window is not a window
            chunk = pcm_to_float(raw, self._width, self.channels)
            self._buf = np.concatenate([self._buf, chunk]) if len(self._buf) else chunk
        window = self._buf[: self.size].copy()
        self._buf = self._buf[self.hop :]
        return window

    def _disconnect(self) -> None:
        if self._wav is not None:
            self._wav.close()
            self._wav = None


__all__ = ["CHUNK_SAMPLES", "WavSource", "pcm_to_float"]
