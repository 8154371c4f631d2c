"""Audio as sensor streams, cut into windows ``[size, channels]`` of float32 in [-1, 1], a new one
every ``hop`` samples, as the sensor sources do.

- ``wav:PATH?size=N&hop=N`` reads PCM WAV with the standard library's ``wave`` (8, 16, 24 or
  32-bit integer samples, any number of channels). Finite: every window in order;
  ``pace="native"`` delivers one window every ``hop / rate`` seconds, so a recording can stand
  in for a microphone.
- ``alsa:DEVICE?rate=16000&channels=1&format=S16_LE&size=N&hop=N`` records from a microphone
  through ALSA's ``arecord`` (package alsa-utils) writing raw interleaved PCM to a pipe
  (``arecord -D DEVICE -f FORMAT -r RATE -c CHANNELS -t raw -q``), so no Python audio package is
  needed. Live: the newest window is kept, a window the loop had no time for is dropped
  (counted), and a device that is missing or unplugged is retried with backoff.
"""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np

from edge_agent.common.backoff import DEFAULT_BACKOFF, BackoffPolicy
from edge_agent.errors import SourceError
from edge_agent.io.process import PipeProcess, find_binary, wait_for_output
from edge_agent.io.source import POLL_S, EndOfStream, Pacer, Source

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


class PcmWindows:
    """Samples in (float32 ``[n, channels]``, any chunk size), windows out: ``size`` samples, a
    new one every ``hop``. A hop longer than what has arrived carries its skip into the samples
    still to come, so windows always start at multiples of ``hop``."""

    def __init__(self, size: int, hop: int, channels: int) -> None:
        self.size, self.hop = size, hop
        self._buf = np.empty((0, channels), np.float32)
        self._skip = 0  # samples still to drop before the next window starts

    def feed(self, chunk: np.ndarray) -> None:
        if self._skip:
            dropped = min(self._skip, len(chunk))
            chunk, self._skip = chunk[dropped:], self._skip - dropped
        self._buf = np.concatenate([self._buf, chunk]) if len(self._buf) else chunk

    def next(self) -> np.ndarray | None:
        """The next whole window, or None until enough samples have arrived."""
        if len(self._buf) < self.size:
            return None
        window = self._buf[: self.size].copy()
        self._skip = max(self.hop - len(self._buf), 0)
        self._buf = self._buf[self.hop :]
        return window


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
        self._windows = PcmWindows(size, hop, 1)  # for the file's channel count: _connect
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
        self._windows = PcmWindows(self.size, self.hop, channels)
        if self._paced:
            self._pacer = Pacer(rate / self.hop)

    def _capture(self, timeout: float | None) -> np.ndarray | None:
        wav = self._wav
        if wav is None:
            raise EndOfStream
        while (window := self._windows.next()) is None:
            raw = wav.readframes(max(CHUNK_SAMPLES, self.size))
            if not raw:
                raise EndOfStream  # a last partial window is not a window
            self._windows.feed(pcm_to_float(raw, self._width, self.channels))
        return window

    def _disconnect(self) -> None:
        if self._wav is not None:
            self._wav.close()
            self._wav = None


#: arecord's sample formats that we read, and their bytes per sample (8-bit is unsigned).
ALSA_FORMATS = {"U8": 1, "S16_LE": 2, "S24_3LE": 3, "S32_LE": 4}
ARECORD_BINARIES = ("arecord",)
DEFAULT_RATE = 16000
FIRST_SAMPLES_TIMEOUT_S = 5.0  # a USB microphone starts in well under a second


class AlsaSource(Source):
    """A microphone through ``arecord`` on a pipe: live, reconnecting (the process is started
    again when the device is missing, busy or unplugged)."""

    _connect_in_open = False

    def __init__(
        self,
        device: str = "default",
        *,
        uri: str | None = None,
        size: int,
        hop: int,
        rate: int = DEFAULT_RATE,
        channels: int = 1,
        sample_format: str = "S16_LE",
        binary: str | None = None,
        reconnect: BackoffPolicy = DEFAULT_BACKOFF,
    ) -> None:
        super().__init__(uri or f"alsa:{device}", kind="sensor", live=True, reconnect=reconnect)
        if sample_format not in ALSA_FORMATS:
            raise SourceError(
                f"{self._label}: format = {sample_format!r}: expected one of {list(ALSA_FORMATS)}"
            )
        for key, value in (("size", size), ("hop", hop), ("rate", rate), ("channels", channels)):
            if value < 1:
                raise SourceError(f"{self._label}: {key} = {value}: must be >= 1")
        self.device, self.size, self.hop = device, size, hop
        self.rate, self.channels, self.sample_format = rate, channels, sample_format
        self.binary = binary
        self._width = ALSA_FORMATS[sample_format]
        self._sample_bytes = self._width * channels
        self._proc: PipeProcess | None = None
        self._raw = bytearray(max(CHUNK_SAMPLES, size) * self._sample_bytes)
        self._have = 0  # bytes in _raw
        self._windows = PcmWindows(size, hop, channels)

    def command(self, binary: str) -> list[str]:
        """The command line: raw interleaved PCM on stdout, nothing else."""
        return [
            binary, "-D", self.device, "-f", self.sample_format, "-r", str(self.rate),
            "-c", str(self.channels), "-t", "raw", "-q",
        ]  # fmt: skip

    def _connect(self) -> None:
        names = (self.binary,) if self.binary else ARECORD_BINARIES
        binary = find_binary(self._label, names, "install alsa-utils (sudo apt install alsa-utils)")
        self._proc, self._have = PipeProcess(self._label, self.command(binary)), 0
        self._windows = PcmWindows(self.size, self.hop, self.channels)
        try:
            wait_for_output(self._label, "arecord", self._read_some, self._stop,
                            FIRST_SAMPLES_TIMEOUT_S, POLL_S)  # fmt: skip
        except SourceError:
            self._disconnect()
            raise

    def _read_some(self, timeout: float | None) -> bool:
        if self._proc is None:
            raise SourceError(f"{self._label}: not connected")
        n = self._proc.read_into(memoryview(self._raw)[self._have :], timeout)
        self._have += n
        whole = self._have - self._have % self._sample_bytes
        if whole:
            self._windows.feed(pcm_to_float(bytes(self._raw[:whole]), self._width, self.channels))
            rest = self._have - whole
            self._raw[:rest] = self._raw[whole : self._have]
            self._have = rest
        return n > 0

    def _capture(self, timeout: float | None) -> np.ndarray | None:
        while (window := self._windows.next()) is None:
            if not self._read_some(timeout):
                return None  # nothing within the poll interval: the base loop checks for close
        return window

    def _disconnect(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            proc.stop()


__all__ = ["ALSA_FORMATS", "CHUNK_SAMPLES", "AlsaSource", "PcmWindows", "WavSource", "pcm_to_float"]
