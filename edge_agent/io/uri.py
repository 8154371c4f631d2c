"""Source URIs (a contract, listed in ``edge_agent.io.source``) → a ``Source``, unopened.

A URI that cannot be parsed (an unknown scheme or option, a bad option value) is a configuration
error, :class:`SourceURIError` (exit 78, not restarted): building a source does no I/O, so every
error raised before ``open()`` is the URI's. What fails when the source is opened (a missing
file, a camera that is not there, a refused connection) stays a ``SourceError`` (exit 66).
:func:`check_source_uri` validates a URI without opening anything (``edge-agent check-config``).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from edge_agent.common.backoff import DEFAULT_BACKOFF, BackoffPolicy
from edge_agent.common.urls import redact_uri
from edge_agent.errors import ConfigError, SourceError, SourceURIError
from edge_agent.io.audio import ALSA_FORMATS, DEFAULT_RATE, AlsaSource, WavSource
from edge_agent.io.images import ImageFilesSource
from edge_agent.io.network import UdpSensorSource
from edge_agent.io.opencv import STREAM_SCHEMES, CaptureSource, VideoFileSource
from edge_agent.io.rpicam import DEFAULT_FPS, DEFAULT_SIZE, Picamera2Source, RpicamSource
from edge_agent.io.sensors import FileSensorSource, StdinSensorSource
from edge_agent.io.source import (
    Source,
    WindowSpec,
    check_fps,
    check_pace,
)
from edge_agent.io.streams import Stream
from edge_agent.io.synthetic import DEFAULT_SYNTHETIC_FPS, PATTERNS, SyntheticSource

_USAGE = (
    "use camera:N, /dev/videoN, rpicam:N, picamera2:N, rtsp://…, http(s)://…, udp://…, tcp://…, "
    "file:PATH, images:GLOB, sensor:stdin, sensor:file:PATH, sensor:udp://HOST:PORT, "
    "wav:PATH?size=N&hop=N, alsa:DEVICE?size=N&hop=N or "
    "synthetic:?…"
)

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+$")
_QUERY = re.compile(r"^[A-Za-z_]+=[^&=]*(&[A-Za-z_]+=[^&=]*)*$")


def _split_query(text: str) -> tuple[str, dict[str, str]]:
    head, sep, query = text.rpartition("?")
    if sep and (query == "" or _QUERY.match(query)):
        return head, dict(parse_qsl(query, keep_blank_values=True))
    return text, {}


class _Options:
    """The ``?key=value`` options of one URI, typed and checked; unknown keys are an error."""

    def __init__(self, uri: str, query: dict[str, str]) -> None:
        self.label = redact_uri(uri)
        self.values = query
        self.known: list[str] = []

    def _raw(self, key: str) -> str | None:
        self.known.append(key)
        return self.values.get(key)

    def _bad(self, key: str, raw: str, rule: str) -> SourceError:
        return SourceError(f"{self.label}: {key} = {raw!r}: {rule}")

    def integer(self, key: str, default: int | None, minimum: int) -> int | None:
        raw = self._raw(key)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            raise self._bad(key, raw, "expected an integer") from None
        if value < minimum:
            raise self._bad(key, raw, f"must be >= {minimum}")
        return value

    def number(self, key: str, default: float | None) -> float | None:
        raw = self._raw(key)
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError:
            raise self._bad(key, raw, "expected a number") from None
        if not (value > 0 and math.isfinite(value)):
            raise self._bad(key, raw, "must be > 0")
        return value

    def flag(self, key: str) -> bool:
        raw = self._raw(key)
        if raw is None:
            return False
        value = raw.strip().lower()
        if value in ("1", "true", "yes", "on"):
            return True
        if value in ("0", "false", "no", "off", ""):
            return False
        raise self._bad(key, raw, "expected 1 or 0")

    def choice(self, key: str, default: str, choices: tuple[str, ...]) -> str:
        raw = self._raw(key)
        if raw is None:
            return default
        if raw not in choices:
            raise self._bad(key, raw, f"expected one of {'|'.join(choices)}")
        return raw

    def finish(self) -> None:
        unknown = sorted(set(self.values) - set(self.known))
        if unknown:
            known = ", ".join(self.known) or "none"
            raise SourceError(f"{self.label}: unknown option(s) {unknown}; known here: {known}")


def open_source(
    uri: str,
    *,
    pace: str = "none",
    fps: float | None = None,
    window: WindowSpec | None = None,
    reconnect: BackoffPolicy = DEFAULT_BACKOFF,
    password_file: str = "",
) -> Source:
    """Parse ``uri`` and build its source, without opening it.

    ``pace`` ("none" | "native") times the finite image sources (files, images, synthetic);
    ``fps`` overrides their native frame rate (and requests a rate from a camera); ``window``
    is the sensors' windowing; ``reconnect`` the backoff of live sources; ``password_file`` the
    password of a network stream's user, read when it is opened. Raises
    :class:`SourceURIError` (a ``ConfigError``, exit 78) for an unparsable URI, an unknown
    scheme or option, or a bad option value; a missing file is reported by ``open()``
    (``SourceError``, exit 66). The sources' constructors do no I/O: only ``open()`` does."""
    try:
        return _build_source(uri, pace=pace, fps=fps, window=window, reconnect=reconnect,
                             password_file=password_file)  # fmt: skip
    except SourceError as exc:  # built, not opened: every error here is the URI's
        raise SourceURIError(str(exc)) from exc


def check_source_uri(
    uri: str, *, window: WindowSpec | None = None, password_file: str = ""
) -> None:
    """Validate ``uri`` as :func:`open_source` does, opening nothing (no file, camera, process
    or socket): :class:`SourceURIError` naming the URI and its bad part, else None."""
    open_source(uri, window=window, password_file=password_file)


def _build_source(
    uri: str,
    *,
    pace: str,
    fps: float | None,
    window: WindowSpec | None,
    reconnect: BackoffPolicy,
    password_file: str,
) -> Source:
    label = redact_uri(uri)
    check_pace(label, pace)
    check_fps(label, "fps", fps)
    text = uri.strip()
    if not text:
        raise SourceError(f"source: empty URI; {_USAGE}")
    if text.lower().startswith(STREAM_SCHEMES):
        # the query belongs to the server
        return CaptureSource(text, uri=uri, reconnect=reconnect, password_file=password_file)
    if password_file:
        raise SourceError(
            f"{label}: password_file is only for network streams (rtsp://, http://...)"
        )
    if text.startswith("/dev/video"):
        return CaptureSource(text, uri=uri, fps=fps, reconnect=reconnect)
    scheme, sep, rest = text.partition(":")
    if not sep or not _SCHEME.match(scheme):  # a plain path (also C:\… on Windows)
        path, query = _split_query(text)
        opts = _Options(uri, query)
        if Path(path).is_dir() or any(c in path for c in "*?["):
            return _images(uri, path, opts, pace=pace, fps=fps)
        return _video_file(uri, path, opts, pace=pace, fps=fps, reconnect=reconnect)
    scheme = scheme.lower()
    rest, query = _split_query(rest)
    opts = _Options(uri, query)
    if scheme == "camera":
        if not rest.isdigit():
            raise SourceError(
                f"{label}: expected camera:N with N a camera index (0, 1, …), or /dev/videoN"
            )
        cam_fps = opts.number("fps", fps)
        opts.finish()
        return CaptureSource(int(rest), uri=uri, fps=cam_fps, reconnect=reconnect)
    if scheme in ("rpicam", "picamera2"):
        return _pi_camera(uri, scheme, rest, opts, fps=fps, reconnect=reconnect)
    if scheme == "file":
        path = rest[2:] if rest.startswith("//") else rest
        return _video_file(uri, path, opts, pace=pace, fps=fps, reconnect=reconnect)
    if scheme == "images":
        return _images(uri, rest, opts, pace=pace, fps=fps)
    if scheme == "synthetic":
        if rest:
            raise SourceError(f"{label}: expected synthetic:?width=…&height=…&fps=…&frames=…")
        source = SyntheticSource(
            uri=uri,
            width=opts.integer("width", 640, 1) or 640,
            height=opts.integer("height", 480, 1) or 480,
            fps=opts.number("fps", fps) or DEFAULT_SYNTHETIC_FPS,
            frames=opts.integer("frames", None, 0),
            pattern=opts.choice("pattern", "gradient", PATTERNS),
            live=opts.flag("live"),
            pace=pace,
            seed=opts.integer("seed", 0, 0) or 0,
        )
        opts.finish()
        return source
    if scheme == "sensor":
        return _sensor(uri, rest, opts, window=window, reconnect=reconnect)
    if scheme == "wav":
        return _wav(uri, rest, opts, window=window, pace=pace)
    if scheme == "alsa":
        return _alsa(uri, rest, opts, window=window, reconnect=reconnect)
    raise SourceError(f"{label}: unknown source scheme {scheme!r}; {_USAGE}")


def _pi_camera(
    uri: str,
    scheme: str,
    rest: str,
    opts: _Options,
    *,
    fps: float | None,
    reconnect: BackoffPolicy,
) -> Source:
    if rest and not rest.isdigit():
        raise SourceError(f"{opts.label}: expected {scheme}:N with N a camera index (0, 1, …)")
    camera = int(rest or 0)
    width = opts.integer("width", DEFAULT_SIZE[0], 2) or DEFAULT_SIZE[0]
    height = opts.integer("height", DEFAULT_SIZE[1], 2) or DEFAULT_SIZE[1]
    rate = opts.number("fps", fps) or DEFAULT_FPS
    source: Source
    if scheme == "rpicam":
        stride = opts.integer("stride", None, 2)
        source = RpicamSource(camera, uri=uri, width=width, height=height, fps=rate,
                              stride=stride, reconnect=reconnect)  # fmt: skip
    else:
        source = Picamera2Source(camera, uri=uri, width=width, height=height, fps=rate,
                                 reconnect=reconnect)  # fmt: skip
    opts.finish()
    return source


def _video_file(
    uri: str,
    path: str,
    opts: _Options,
    *,
    pace: str,
    fps: float | None,
    reconnect: BackoffPolicy,
) -> Source:
    if not path:
        raise SourceError(f"{opts.label}: no path; expected file:PATH")
    source = VideoFileSource(
        path,
        uri=uri,
        loop=opts.flag("loop"),
        live=opts.flag("live"),
        pace=pace,
        fps=opts.number("fps", fps),
        reconnect=reconnect,
    )
    opts.finish()
    return source


def _images(uri: str, pattern: str, opts: _Options, *, pace: str, fps: float | None) -> Source:
    if not pattern:
        raise SourceError(f"{opts.label}: no folder or pattern; expected images:GLOB")
    source = ImageFilesSource(pattern, uri=uri, pace=pace, fps=opts.number("fps", fps))
    opts.finish()
    return source


def _wav(uri: str, path: str, opts: _Options, *, window: WindowSpec | None, pace: str) -> Source:
    """``wav:PATH?size=N&hop=N`` (``channels`` comes from the file; when a window is given its
    channel count must match)."""
    size = opts.integer("size", window.size if window else None, 1)
    hop = opts.integer("hop", window.hop if window else size, 1)
    if not path:
        raise SourceError(f"{opts.label}: no path; expected wav:PATH?size=N&hop=N")
    if size is None or hop is None:
        raise SourceError(
            f"{opts.label}: an audio file needs a window: add ?size=N&hop=N (samples), "
            "or pass --window SIZE,HOP"
        )
    source = WavSource(path, uri=uri, size=size, hop=hop,
                       channels=window.channels if window else None, pace=pace)  # fmt: skip
    opts.finish()
    return source


def _alsa(
    uri: str, device: str, opts: _Options, *, window: WindowSpec | None, reconnect: BackoffPolicy
) -> Source:
    """``alsa:DEVICE?rate=R&channels=C&format=F&size=N&hop=N`` (DEVICE defaults to ``default``;
    ``hw:1,0`` and ``plughw:CARD=Mic`` are ALSA's own spellings)."""
    size = opts.integer("size", window.size if window else None, 1)
    hop = opts.integer("hop", window.hop if window else size, 1)
    if size is None or hop is None:
        raise SourceError(
            f"{opts.label}: a microphone needs a window: add ?size=N&hop=N (samples), "
            "or pass --window SIZE,HOP"
        )
    channels = opts.integer("channels", window.channels if window else 1, 1) or 1
    if window is not None and channels != window.channels:
        raise SourceError(
            f"{opts.label}: channels = {channels}, the window expects {window.channels}"
        )
    source = AlsaSource(
        device or "default",
        uri=uri,
        size=size,
        hop=hop,
        rate=opts.integer("rate", DEFAULT_RATE, 1) or DEFAULT_RATE,
        channels=channels,
        sample_format=opts.choice("format", "S16_LE", tuple(ALSA_FORMATS)),
        reconnect=reconnect,
    )
    opts.finish()
    return source


def _sensor(
    uri: str,
    rest: str,
    opts: _Options,
    *,
    window: WindowSpec | None,
    reconnect: BackoffPolicy,
) -> Source:
    label = opts.label
    size = opts.integer("size", window.size if window else None, 1)
    hop = opts.integer("hop", window.hop if window else size, 1)
    channels = opts.integer("channels", window.channels if window else None, 1)
    if size is None or hop is None or channels is None:
        raise SourceError(
            f"{label}: a sensor needs a window: pass window=WindowSpec(size, hop, channels) "
            "or add ?size=N&hop=N&channels=N"
        )
    spec = WindowSpec(size=size, hop=hop, channels=channels)
    source: Source
    if rest == "stdin":
        source = StdinSensorSource(window=spec, uri=uri)
    elif rest.startswith("file:"):
        path = rest[len("file:") :]
        if not path:
            raise SourceError(f"{label}: no path; expected sensor:file:PATH")
        source = FileSensorSource(path, window=spec, uri=uri, idle=opts.number("idle", None))
    elif rest.startswith("udp://"):
        parts = urlsplit(rest)
        try:
            port = parts.port
        except ValueError:
            port = None
        if not parts.hostname or port is None:
            raise SourceError(f"{label}: expected sensor:udp://HOST:PORT (e.g. 127.0.0.1:9000)")
        source = UdpSensorSource(parts.hostname, port, window=spec, uri=uri, reconnect=reconnect)
    else:
        raise SourceError(
            f"{label}: unknown sensor input; use sensor:stdin, sensor:file:PATH "
            "or sensor:udp://HOST:PORT"
        )
    opts.finish()
    return source


def _open_section(s: Any) -> Source:
    """The source one ``[source]`` or ``[[sources]]`` table names (uri, pace, window), unopened."""
    window = None
    if s.window_size:
        window = WindowSpec(
            size=s.window_size, hop=s.window_hop or s.window_size, channels=s.window_channels or 1
        )
    return open_source(s.uri, pace=s.pace, window=window, password_file=s.password_file)


def check_sources_of(config: Any) -> None:
    """Validate every source URI a config names (``[source]`` or each ``[[sources]]``), opening
    nothing: :class:`SourceURIError` (exit 78) for the first bad one, naming its stream."""
    if config.sources:
        for s in config.sources:
            try:
                _check_installed(_open_section(s))
            except SourceURIError as exc:
                raise SourceURIError(f"stream {s.name}: {exc}") from exc
            except ConfigError as exc:
                raise ConfigError(f"stream {s.name}: {exc}") from exc
    elif config.source.uri:
        _check_installed(_open_section(config.source))


def _check_installed(source: Source) -> None:
    """What a source needs installed besides us (Picamera2), or ConfigError."""
    if isinstance(source, Picamera2Source):
        source.check_installed()


def open_source_from(config: Any) -> Source:
    """The source a config's ``[source]`` section names (uri, pace, window), unopened."""
    return _open_section(config.source)


def open_streams_from(config: Any) -> list[Stream]:
    """The named streams a config's ``[[sources]]`` list names, unopened, with their options
    (fps cap, region of interest). A bad URI names its stream."""
    out = []
    for s in config.sources:
        try:
            source = _open_section(s)
        except SourceURIError as exc:
            raise SourceURIError(f"stream {s.name}: {exc}") from exc
        roi = (s.roi[0], s.roi[1], s.roi[2], s.roi[3]) if s.roi else None
        if len(config.sources) > 1 and isinstance(source, VideoFileSource):
            source.decode_threads = 1  # the streams decode side by side already
        out.append(Stream(s.name, source, max_fps=s.fps, roi=roi))
    return out


__all__ = [
    "check_source_uri",
    "check_sources_of",
    "open_source",
    "open_source_from",
    "open_streams_from",
]
