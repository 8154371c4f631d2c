"""The agent's configuration: ``/etc/edge-agent/agent.toml`` by default, validated into typed,
frozen dataclasses. Unknown sections and keys are errors; every error names the key and the
value: ``config: [source] pace = 'fast': expected one of 'none', 'native'``. Command-line flags
override the file. Secrets never come from here or from flags: files only (systemd
``LoadCredential`` puts them in ``$CREDENTIALS_DIRECTORY``).

Every field is documented once, in the ``doc`` metadata below; ``docs/agent-config.md`` is
generated from it (``python -m edge_agent.config --markdown``).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import socket
import sys
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_agent.common.files import read_text
from edge_agent.common.names import stream_name_problem
from edge_agent.common.urls import url_host
from edge_agent.errors import ConfigError
from edge_agent.model.formats import POSTPROCESS_CHOICES, SOFTMAX_CHOICES

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DEFAULT_CONFIG = Path("/etc/edge-agent/agent.toml")
DEFAULT_STATE_DIR = Path("/var/lib/edge-agent")


def _doc(text: str, **kw: Any) -> Any:
    return field(metadata={"doc": text}, **kw)


def _at_least(section: str, obj: Any, minimum: int, *keys: str, strict: bool = False) -> None:
    """``config: [section] key = value: must be >= minimum`` (``> minimum`` when ``strict``) for
    the first of ``keys`` that breaks it, in order."""
    for key in keys:
        value = getattr(obj, key)
        if value < minimum or (strict and value == minimum):
            rule = f"> {minimum}" if strict else f">= {minimum}"
            raise ConfigError(f"config: [{section}] {key} = {value}: must be {rule}")


@dataclass(frozen=True)
class AgentSection:
    device_id: str = _doc(
        "Device name used in topics and results (default: the hostname).", default=""
    )
    profile: str = _doc(
        "Device profile name or .toml path; `auto` detects a Raspberry Pi or Jetson from "
        "/proc/device-tree/model and /etc/nv_tegra_release, else this CPU.",
        default="auto",
    )
    state_dir: str = _doc(
        "Where installed models (and later the MQTT spool) live; systemd's StateDirectory.",
        default=str(DEFAULT_STATE_DIR),
    )


@dataclass(frozen=True)
class ModelSection:
    path: str = _doc("A signed .edgebundle, or a bare .onnx / .tflite file.", default="")
    trusted_keys: tuple[str, ...] = _doc(
        "Public keys (.pub files or directories of them) a bundle's signature must match.",
        default=("/etc/edge-agent/trusted-keys",),
    )
    threads: int = _doc("Runtime threads; 0 = the profile's plan (see docs/agent.md).", default=0)
    labels: str = _doc(
        "Class labels file (one per line) for a bare model; bundles carry their own.", default=""
    )
    softmax: str = _doc(
        "A bare model's class scores (with labels): auto (a softmax when they are logits, "
        "outside [0, 1]), yes or no.",
        default="auto",
    )
    postprocess: str = _doc(
        "A bare model's outputs: auto (detections from a detector it recognises, classes with "
        "labels) or raw (reported as they are).",
        default="auto",
    )

    def __post_init__(self) -> None:
        _at_least("model", self, 0, "threads")
        if self.softmax not in SOFTMAX_CHOICES:
            raise ConfigError(
                f"config: [model] softmax = {self.softmax!r}: expected auto, yes or no"
            )
        if self.postprocess not in POSTPROCESS_CHOICES:
            raise ConfigError(
                f"config: [model] postprocess = {self.postprocess!r}: expected auto or raw"
            )


@dataclass(frozen=True)
class PreprocessSection:
    """Overrides for a bare model's image preprocessing (bundles carry their own)."""

    mean: tuple[float, ...] = _doc("Per-channel mean subtracted after scaling.", default=())
    std: tuple[float, ...] = _doc("Per-channel std divided by after the mean.", default=())
    scale: float = _doc(
        "Pixel scale applied first (0 = the default: 1/255; for a bare "
        "model's 8-bit image input, the pixels as its integers).",
        default=0.0,
    )
    channels: str = _doc("Channel order: rgb, bgr or gray ('' = from the model).", default="")
    resize: str = _doc("stretch, letterbox, crop or pad-right ('' = stretch).", default="")
    width: int = _doc(
        "Input width in pixels for a model whose width is dynamic (an OCR recognizer's; "
        "0 = from the model).",
        default=0,
    )
    height: int = _doc(
        "Input height in pixels for a model whose height is dynamic (0 = from the model).",
        default=0,
    )

    def __post_init__(self) -> None:
        _at_least("preprocess", self, 0, "width", "height")

    def overrides(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.mean:
            out["mean"] = self.mean
        if self.std:
            out["std"] = self.std
        if self.scale:
            out["scale"] = self.scale
        if self.channels:
            out["channels"] = self.channels
        if self.resize:
            out["resize"] = self.resize
        for key in ("width", "height"):
            if getattr(self, key):
                out[key] = getattr(self, key)
        return out


_PASSWORD_SCHEMES = ("rtsp", "rtsps", "http", "https")


def _allowed_host(host: str) -> str:
    """One ``[ota] allowed_hosts`` entry, as ``url_host`` gives a URL's host, or ConfigError: a
    name or an IPv4 address without a port, or an IPv6 address bare (``::1``) or bracketed
    (``[::1]``) but without a port (``[::1]:443`` is refused, as ``example.com:443`` is)."""
    bracketed = host.startswith("[") and host.endswith("]")
    inner = host[1:-1] if bracketed else host
    ok = bool(inner) and "/" not in inner and "[" not in inner and "]" not in inner
    if ok and (":" in inner or bracketed):
        try:  # a colon is only an IPv6 address's, never a port's; brackets only hold IPv6
            ipaddress.IPv6Address(inner)
        except ValueError:
            ok = False
    if not ok:
        raise ConfigError(
            f"config: [ota] allowed_hosts: {host!r}: expected a bare host name or IP address "
            "(no scheme, port or path; an IPv6 address as ::1 or [::1])"
        )
    return url_host(host)


def _check_password_file(where: str, uri: str, password_file: str) -> None:
    """``password_file`` goes with a network stream URI that names a user and no password."""
    if not password_file:
        return
    try:
        parts = urllib.parse.urlsplit(uri.strip())
        password = parts.password
    except ValueError:
        raise ConfigError(f"config: {where} uri: cannot parse it") from None
    if parts.scheme.lower() not in _PASSWORD_SCHEMES:
        raise ConfigError(
            f"config: {where} password_file is set: only rtsp://, rtsps://, http:// and "
            "https:// stream URIs take one"
        )
    if password is not None:
        raise ConfigError(
            f"config: {where} uri holds a password and password_file is set: remove the "
            "password from the uri (rtsp://USER@HOST/...)"
        )
    if not parts.username:
        raise ConfigError(
            f"config: {where} password_file needs a user in the uri (rtsp://USER@HOST/...)"
        )


@dataclass(frozen=True)
class SourceSection:
    uri: str = _doc(
        "camera:0, /dev/video0, rtsp://..., file:PATH, images:GLOB, sensor:stdin, "
        "sensor:file:PATH, sensor:udp://HOST:PORT, wav:PATH, alsa:DEVICE, synthetic:",
        default="",
    )
    pace: str = _doc(
        "Files: none (as fast as possible) or native (their own frame rate).", default="none"
    )
    window_size: int = _doc("Sensor sources: samples per window.", default=0)
    window_hop: int = _doc("Sensor sources: samples between window starts.", default=0)
    window_channels: int = _doc("Sensor sources: values per sample.", default=0)
    password_file: str = _doc(
        "Network streams: file holding the password of the user in uri (rtsp://USER@HOST/...), "
        "put into the URI only when the stream is opened, so config, logs and telemetry never "
        "hold it. A bare name is looked up in $CREDENTIALS_DIRECTORY; chmod 600 the file.",
        default="",
    )

    def __post_init__(self) -> None:
        if self.pace not in ("none", "native"):
            raise ConfigError(
                f"config: [source] pace = {self.pace!r}: expected one of 'none', 'native'"
            )
        _at_least("source", self, 0, "window_size", "window_hop", "window_channels")
        _check_password_file("[source]", self.uri, self.password_file)


@dataclass(frozen=True)
class StreamSection:
    """One of several streams one agent serves with one model (``[[sources]]``, a list)."""

    name: str = _doc(
        "The stream's name: 1-64 letters, digits, '_', '-' or '.'; results carry it as "
        "`stream`, telemetry and Prometheus label by it.",
        default="",
    )
    uri: str = _doc("What [source] uri takes.", default="")
    pace: str = _doc("Files: none or native, as [source] pace.", default="none")
    fps: float = _doc(
        "Most frames a second taken from this stream (0 = every frame); a live camera at 30 "
        "served at 15 skips every other frame in its reader.",
        default=0.0,
    )
    roi: tuple[int, ...] = _doc(
        "Region of interest [x, y, width, height] in source pixels: images are cropped to it "
        "before preprocessing ([] = the whole frame).",
        default=(),
    )
    window_size: int = _doc("Sensor and audio streams: samples per window.", default=0)
    window_hop: int = _doc("Sensor and audio streams: samples between window starts.", default=0)
    window_channels: int = _doc("Sensor and audio streams: values per sample.", default=0)
    password_file: str = _doc("Network streams: what [source] password_file takes.", default="")

    def __post_init__(self) -> None:
        where = f"[[sources]] {self.name or '(unnamed)'}:"
        if not self.name:
            raise ConfigError(f"config: {where} name is not set (every stream needs one)")
        problem = stream_name_problem(self.name)
        if problem:
            raise ConfigError(f"config: [[sources]] {problem}")
        if not self.uri:
            raise ConfigError(f"config: {where} uri is not set")
        if self.pace not in ("none", "native"):
            raise ConfigError(
                f"config: {where} pace = {self.pace!r}: expected one of 'none', 'native'"
            )
        if self.fps < 0:
            raise ConfigError(f"config: {where} fps = {self.fps}: must be >= 0")
        if self.roi and (len(self.roi) != 4 or min(self.roi[2:]) < 1 or min(self.roi[:2]) < 0):
            raise ConfigError(
                f"config: {where} roi = {list(self.roi)}: expected [x, y, width, height], "
                "x and y >= 0, width and height >= 1"
            )
        for key in ("window_size", "window_hop", "window_channels"):
            if getattr(self, key) < 0:
                raise ConfigError(f"config: {where} {key} = {getattr(self, key)}: must be >= 0")
        _check_password_file(where.rstrip(":"), self.uri, self.password_file)


@dataclass(frozen=True)
class ResultsSection:
    sinks: tuple[str, ...] = _doc(
        "Where results go: jsonl:PATH and/or stdout.", default=("stdout",)
    )


@dataclass(frozen=True)
class PipelineSection:
    max_frames: int = _doc(
        "Stop after this many results (0 = run until the source ends).", default=0
    )
    motion_gate: float = _doc(
        "Skip inference while the scene is static: mean abs change of a 32x32 grey thumbnail "
        "below this (0-255; 0 = off).",
        default=0.0,
    )
    drain_timeout: float = _doc("Seconds to finish the current frame on SIGTERM.", default=10.0)
    tune: bool = _doc(
        "Measure the fastest threads/workers plan at start when none is cached for this model, "
        "device and kind of source: the agent serves from the first frame with the rule's plan "
        "and tries the others on the running pipeline (about 3 s), keeping and caching the "
        "fastest; `edge-agent tune` does it on demand, before serving.",
        default=True,
    )
    stall_timeout: float = _doc(
        "Seconds an inference call (or the capture loop) may be stuck before the systemd "
        "watchdog pings stop; 0 = the watchdog's own timeout (WatchdogSec).",
        default=0.0,
    )
    workers: int = _doc(
        "Frames inferred at once, each with threads/workers runtime threads. 0 = auto: one per "
        "runtime thread for a file or image source at pace none (throughput), else 1 (latency). "
        "onnxruntime only; LiteRT always uses 1.",
        default=0,
    )

    def __post_init__(self) -> None:
        _at_least("pipeline", self, 0, "workers", "max_frames", "stall_timeout")
        _at_least("pipeline", self, 0, "drain_timeout", strict=True)
        if not 0 <= self.motion_gate <= 255:
            raise ConfigError(
                f"config: [pipeline] motion_gate = {self.motion_gate:g}: must be 0-255 (0 = off)"
            )


@dataclass(frozen=True)
class RestSection:
    """A local REST endpoint with TensorFlow Serving's request/response shapes (off by default)."""

    enabled: bool = _doc(
        "Serve POST /v1/models/<name>:predict for programs on this device.", default=False
    )
    host: str = _doc("Bind address; loopback only (127.0.0.1 or ::1).", default="127.0.0.1")
    port: int = _doc(
        "TCP port (TF Serving's REST default is 8501); 0 = any free port (the log says which).",
        default=8501,
    )

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ConfigError(
                f"config: [rest] port = {self.port}: must be 0-65535 (0 = any free port)"
            )


@dataclass(frozen=True)
class MqttSection:
    """The broker (results, telemetry, events, commands, OTA). Off while ``broker`` is empty."""

    broker: str = _doc("mqtt://HOST:PORT or mqtts://HOST:PORT (TLS); '' = no MQTT.", default="")
    protocol: str = _doc(
        "MQTT version: auto (5, falling back to 3.1.1), 5 or 3.1.1.", default="auto"
    )
    keepalive: int = _doc("Keepalive in seconds.", default=30)
    client_id: str = _doc("Client id ('' = edge-agent-<device id>).", default="")
    username: str = _doc("User name, if the broker wants one.", default="")
    password_file: str = _doc(
        "File holding the password (a bare name is looked up in $CREDENTIALS_DIRECTORY, where "
        "systemd's LoadCredential= puts it). Never on the command line.",
        default="",
    )
    ca_file: str = _doc("CA certificate (PEM) for mqtts:// ('' = the system's CAs).", default="")
    cert_file: str = _doc("Client certificate (PEM) for mutual TLS.", default="")
    key_file: str = _doc(
        "Client key (PEM); like password_file, a bare name is found in $CREDENTIALS_DIRECTORY.",
        default="",
    )
    topic_prefix: str = _doc("First topic level: <prefix>/<device>/...", default="edge")
    groups: tuple[str, ...] = _doc(
        "Fleet groups this device belongs to: it follows <prefix>/groups/<group>/desired.",
        default=(),
    )
    results: str = _doc(
        "Which results to publish: all, change (when the top class or label changes) or none.",
        default="all",
    )
    results_max_rate: float = _doc(
        "At most this many results per second (0 = no limit).", default=0.0
    )
    spool_max_mb: float = _doc(
        "On-disk spool bound (results are dropped oldest first above it; events never).",
        default=64.0,
    )
    flush_timeout: float = _doc(
        "When a finite source ends: seconds to wait for the spool to drain before exiting.",
        default=30.0,
    )
    home_assistant: bool = _doc(
        "Publish Home Assistant MQTT discovery (homeassistant/...): sensors and availability.",
        default=False,
    )

    def __post_init__(self) -> None:
        if self.protocol not in ("auto", "5", "3.1.1"):
            raise ConfigError(
                f"config: [mqtt] protocol = {self.protocol!r}: expected one of 'auto', '5', '3.1.1'"
            )
        if self.results not in ("all", "change", "none"):
            raise ConfigError(
                f"config: [mqtt] results = {self.results!r}: "
                "expected one of 'all', 'change', 'none'"
            )
        _at_least("mqtt", self, 0, "results_max_rate", "spool_max_mb", "flush_timeout")
        _at_least("mqtt", self, 5, "keepalive")
        from edge_agent.errors import ProtocolError
        from edge_agent.fleet.protocol import check_name

        for group in self.groups:
            try:
                check_name(group, "group")
            except ProtocolError as exc:
                raise ConfigError(f"config: [mqtt] groups: {exc}") from None


@dataclass(frozen=True)
class TelemetrySection:
    interval: float = _doc("Seconds between telemetry messages.", default=10.0)
    monitor_every: int = _doc(
        "Sample the input/output statistics of every Nth frame (0 = off).", default=10
    )
    drift_threshold: float = _doc(
        "Input drift: a channel mean this many calibration standard deviations away raises a "
        "drift event.",
        default=3.0,
    )
    output_drift_threshold: float = _doc(
        "Output drift: total variation distance of the class histogram from calibration's.",
        default=0.5,
    )
    prometheus_port: int = _doc(
        "Serve Prometheus text metrics on 127.0.0.1:PORT/metrics (0 = off).", default=0
    )

    def __post_init__(self) -> None:
        _at_least("telemetry", self, 0, "interval", strict=True)
        _at_least("telemetry", self, 0, "monitor_every")
        if not 0 <= self.prometheus_port < 65536:
            raise ConfigError(
                f"config: [telemetry] prometheus_port = {self.prometheus_port}: must be 0-65535"
            )


@dataclass(frozen=True)
class OtaSection:
    """Over-the-air model updates (pull-based: the device follows its desired state)."""

    enabled: bool = _doc("Follow desired state and accept update/rollback commands.", default=True)
    health_window: float = _doc(
        "Seconds a new model is watched after the swap before it is committed.", default=20.0
    )
    health_min_frames: int = _doc(
        "Results the new model must produce in the window (fewer: the window is extended once, "
        "then it fails).",
        default=10,
    )
    max_error_rate: float = _doc(
        "Fraction of frames in the window allowed to fail (inference errors, NaN/inf outputs).",
        default=0.0,
    )
    latency_budget: float = _doc(
        "Inference p95 in the window may be at most this many times the reference: the larger "
        "of the bundle's measured latency and the previous model's p95 on this device.",
        default=3.0,
    )
    latency_slack_ms: float = _doc(
        "...plus this many milliseconds: a "
        "sub-millisecond model's p95 on a busy device is scheduler jitter (seen: 2.6 ms against "
        "a 0.82 ms reference, four agents on 2 cores, tests/test_ota.py rollout test).",
        default=5.0,
    )
    check_collapse: bool = _doc(
        "Fail a classifier whose predictions collapse to one class when calibration had many.",
        default=True,
    )
    keep_models: int = _doc("Committed models kept on disk for instant rollback.", default=3)
    transfer_timeout: float = _doc(
        "Seconds without progress before a bundle transfer is given up.", default=60.0
    )
    max_bundle_mb: float = _doc("Largest bundle accepted.", default=512.0)
    ca_file: str = _doc("CA certificate for https:// bundle URLs ('' = the system's).", default="")
    allowed_hosts: tuple[str, ...] = _doc(
        "Hosts an unsigned order's bundle URL may name ([] = any host, as before): names or IP "
        "addresses, without a port; an IPv6 address as ::1 or [::1]. A signed order ([fleet] "
        "operator_keys) may name any host.",
        default=(),
    )

    def __post_init__(self) -> None:
        hosts = tuple(_allowed_host(host) for host in self.allowed_hosts)
        object.__setattr__(self, "allowed_hosts", hosts)  # as the OTA check compares them
        keys = ("health_window", "transfer_timeout", "max_bundle_mb", "latency_budget")
        _at_least("ota", self, 0, *keys, strict=True)
        if not 0 <= self.max_error_rate <= 1:
            raise ConfigError(
                f"config: [ota] max_error_rate = {self.max_error_rate}: must be between 0 and 1"
            )
        _at_least("ota", self, 1, "keep_models", "health_min_frames")
        _at_least("ota", self, 0, "latency_slack_ms")


@dataclass(frozen=True)
class CaptureSection:
    """Samples from the field for the next model: frames (JPEG) or sensor windows the model
    struggled with, kept in a bounded store and sent at the lowest priority. Every policy is
    off by default; capture runs while at least one is on (and ``edgectl capture --device D
    --off`` has not stopped it: see docs/security.md)."""

    low_confidence: float = _doc(
        "Capture when the top score (classification) or a detection's score is below this "
        "(0 = off).",
        default=0.0,
    )
    near_threshold: float = _doc(
        "Capture when that score is within near_margin of this decision threshold (0 = off).",
        default=0.0,
    )
    near_margin: float = _doc(
        "The margin d of near_threshold: T - d <= score <= T + d.", default=0.05
    )
    drift: bool = _doc("Capture while telemetry's monitor reports drift.", default=False)
    disagreement: bool = _doc(
        "Capture the frames where a shadow model disagrees with the serving one (the shadow "
        "calls the sampler's hook; see docs/mqtt.md).",
        default=False,
    )
    random_every: int = _doc("Capture 1 frame in N, whatever its output (0 = off).", default=0)
    class_quota: int = _doc(
        "At most this many samples per predicted class in 24 hours (0 = no quota).", default=0
    )
    max_per_minute: int = _doc("Most samples in any minute (0 = no limit).", default=6)
    max_per_hour: int = _doc("Most samples in any hour (0 = no limit).", default=60)
    max_per_day: int = _doc("Most samples in any 24 hours (0 = no limit).", default=500)
    max_mb: float = _doc(
        "On-disk store bound (<state_dir>/samples): above it the oldest samples go first.",
        default=256.0,
    )
    disk_share: float = _doc(
        "...and never more than this share of the file system (its size as free space plus "
        "the store).",
        default=0.1,
    )
    jpeg_quality: int = _doc("JPEG quality of captured frames (1-100).", default=90)
    chunk_kb: int = _doc("Chunk size over MQTT, KiB (1-1024).", default=32)
    upload_url: str = _doc(
        "Send samples by HTTP(S) PUT to <url>/<device>/<id>.jpg|.npy and then <id>.json "
        "instead of MQTT ('' = over MQTT).",
        default="",
    )
    token_file: str = _doc(
        "File holding the bearer token for upload_url (a bare name is looked up in "
        "$CREDENTIALS_DIRECTORY). Never on the command line.",
        default="",
    )
    ca_file: str = _doc(
        "CA certificate for an https:// upload_url ('' = the system's).", default=""
    )

    def __post_init__(self) -> None:
        for key in ("low_confidence", "near_threshold", "near_margin", "disk_share"):
            value = getattr(self, key)
            if not 0 <= value <= 1:
                raise ConfigError(f"config: [capture] {key} = {value}: must be between 0 and 1")
        if self.disk_share == 0:
            raise ConfigError("config: [capture] disk_share = 0: must be > 0")
        _at_least("capture", self, 0, "random_every", "class_quota", "max_per_minute")
        _at_least("capture", self, 0, "max_per_hour", "max_per_day")
        _at_least("capture", self, 0, "max_mb", strict=True)
        if not 1 <= self.jpeg_quality <= 100:
            raise ConfigError(
                f"config: [capture] jpeg_quality = {self.jpeg_quality}: must be 1-100"
            )
        if not 1 <= self.chunk_kb <= 1024:
            raise ConfigError(f"config: [capture] chunk_kb = {self.chunk_kb}: must be 1-1024")
        if self.upload_url and not self.upload_url.startswith(("http://", "https://")):
            raise ConfigError(
                f"config: [capture] upload_url = {self.upload_url!r}: expected http:// or https://"
            )
        if self.token_file and not self.upload_url:
            raise ConfigError("config: [capture] token_file is set without upload_url")

    @property
    def enabled(self) -> bool:
        """Whether any policy is on."""
        return bool(
            self.low_confidence
            or self.near_threshold
            or self.drift
            or self.disagreement
            or self.random_every
        )


@dataclass(frozen=True)
class ShadowSection:
    """A candidate model run in shadow beside the serving one (the desired state's ``shadow``,
    ``edgectl shadow``): on a share of the frames, in a low-priority thread, never served."""

    max_share: float = _doc(
        "CPU budget: the shadow's time (preprocessing, inference, postprocessing, comparison) "
        "stays within this share of the serving model's inference time; frames beyond it, or "
        "arriving while the shadow is busy, are not shadowed (counted). 0 refuses shadows.",
        default=0.25,
    )
    threads: int = _doc("Runtime threads of the shadow model.", default=1)

    def __post_init__(self) -> None:
        if not 0 <= self.max_share <= 1:
            raise ConfigError(
                f"config: [shadow] max_share = {self.max_share}: must be between 0 and 1"
            )
        _at_least("shadow", self, 1, "threads")


@dataclass(frozen=True)
class FleetSection:
    """Who may give this device orders (desired states and commands; docs/security.md)."""

    operator_keys: tuple[str, ...] = _doc(
        "Operator public keys (.pub files or directories of them) an order must be signed by. "
        "Set: unsigned, expired, replayed, mis-targeted or unknown-key orders are refused. "
        "Empty: orders are accepted unsigned (as before), and the agent says so at start.",
        default=(),
    )
    command_rate: float = _doc(
        "Orders (commands and desired states) taken per second, sustained, before any parsing "
        "or signature check; beyond it commands are dropped and a desired state waits (the "
        "latest per topic), said in one `command_rate_limited` event per 10 s. 0 = no limit.",
        default=5.0,
    )
    command_burst: int = _doc(
        "Orders taken at once above `command_rate` (a reconnect brings every retained "
        "desired state together).",
        default=20,
    )

    def __post_init__(self) -> None:
        if not math.isfinite(self.command_rate):
            raise ConfigError(
                f"config: [fleet] command_rate = {self.command_rate}: must be a finite number"
            )
        _at_least("fleet", self, 0, "command_rate")
        _at_least("fleet", self, 1, "command_burst")


@dataclass(frozen=True)
class AgentConfig:
    agent: AgentSection = field(default_factory=AgentSection)
    model: ModelSection = field(default_factory=ModelSection)
    preprocess: PreprocessSection = field(default_factory=PreprocessSection)
    source: SourceSection = field(default_factory=SourceSection)
    results: ResultsSection = field(default_factory=ResultsSection)
    pipeline: PipelineSection = field(default_factory=PipelineSection)
    rest: RestSection = field(default_factory=RestSection)
    mqtt: MqttSection = field(default_factory=MqttSection)
    telemetry: TelemetrySection = field(default_factory=TelemetrySection)
    ota: OtaSection = field(default_factory=OtaSection)
    capture: CaptureSection = field(default_factory=CaptureSection)
    shadow: ShadowSection = field(default_factory=ShadowSection)
    fleet: FleetSection = field(default_factory=FleetSection)
    #: ``[[sources]]``: several named streams served by one model (instead of ``[source]``)
    sources: tuple[StreamSection, ...] = ()
    path: str = ""

    def __post_init__(self) -> None:
        names = [s.name for s in self.sources]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigError(f"config: [[sources]] name {dupes[0]!r} is used twice")
        if self.sources and self.source.uri:
            raise ConfigError(
                "config: [source] uri and [[sources]] are both set: one source, or a list of "
                "named streams, not both"
            )

    @property
    def device_id(self) -> str:
        return self.agent.device_id or socket.gethostname()

    def require_runnable(self) -> None:
        if not self.model.path:
            raise ConfigError("config: [model] path is not set (or pass --model PATH)")
        if not self.source.uri and not self.sources:
            raise ConfigError(
                "config: [source] uri is not set (or pass --source URI, or name several "
                "streams: [[sources]] / --source NAME=URI)"
            )


_SECTION_CLASSES: dict[str, type] = {
    "agent": AgentSection,
    "model": ModelSection,
    "preprocess": PreprocessSection,
    "source": SourceSection,
    "results": ResultsSection,
    "pipeline": PipelineSection,
    "rest": RestSection,
    "mqtt": MqttSection,
    "telemetry": TelemetrySection,
    "ota": OtaSection,
    "capture": CaptureSection,
    "shadow": ShadowSection,
    "fleet": FleetSection,
}


def _coerce(section: str, key: str, value: Any, default: Any) -> Any:
    where = f"config: [{section}] {key} = {value!r}"
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false")
        return value
    if isinstance(default, int) and not isinstance(default, bool):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected a whole number")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number")
        return float(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string")
        return value
    if isinstance(default, tuple):
        items = [value] if isinstance(value, (str, int, float)) else value
        if not isinstance(items, (list, tuple)):
            raise ConfigError(f"{where}: expected a list")
        want: type = float if key in ("mean", "std") else int if key == "roi" else str
        if want is int and any(isinstance(v, bool) or not isinstance(v, int) for v in items):
            raise ConfigError(f"{where}: expected a list of whole numbers")
        try:
            return tuple(want(v) for v in items)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a list of {want.__name__}s") from None
    return value  # pragma: no cover


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    factory: Any = f.default_factory
    return factory()


def _section(name: str, data: Any, cls: type | None = None) -> Any:
    cls = cls or _SECTION_CLASSES[name]
    if not isinstance(data, Mapping):
        raise ConfigError(f"config: [{name}] must be a table, not {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"config: [{name}] unknown key {unknown[0]!r} (known: {', '.join(fields)})"
        )
    values = {}
    for key, value in data.items():
        f = fields[key]
        values[key] = _coerce(name, key, value, _default(f))
    return cls(**values)


def parse_streams(items: Any) -> tuple[StreamSection, ...]:
    """``[[sources]]``: a list of tables, one per stream."""
    if not isinstance(items, list) or not all(isinstance(i, Mapping) for i in items):
        raise ConfigError(
            f"config: sources = {items!r}: expected [[sources]] tables (name = ..., uri = ...)"
        )
    return tuple(_section("[sources]", item, StreamSection) for item in items)


def parse_config(data: Mapping[str, Any], *, path: str = "") -> AgentConfig:
    known = [*_SECTION_CLASSES, "sources"]
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"config: unknown section [{unknown[0]}] (known: {', '.join(known)})")
    sections = {name: _section(name, data.get(name, {})) for name in _SECTION_CLASSES}
    streams = parse_streams(data["sources"]) if "sources" in data else ()
    return AgentConfig(**sections, sources=streams, path=path)


def load_config(path: str | Path | None) -> AgentConfig:
    """Load and validate; ``None`` means the default path if it exists, else all defaults."""
    if path is None:
        if not DEFAULT_CONFIG.exists():
            return AgentConfig()
        path = DEFAULT_CONFIG
    path = Path(path)
    text = read_text(path, what="config:")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config: {path}: not valid TOML ({exc})") from None
    try:
        return parse_config(data, path=str(path))
    except ConfigError as exc:
        raise ConfigError(str(exc).replace("config:", f"config {path}:", 1)) from None


def check_without_side_effects(config: AgentConfig) -> None:
    """What ``edge-agent run`` would reject as a configuration error, checked without connecting,
    opening a camera or writing anything (``edge-agent check-config``): the model file (and a
    bundle's trusted keys), the labels file, each source URI, the broker URL's form, each result
    sink's form and a file sink's directory, the operator keys. ConfigError for the first bad
    key, naming the file, the key and its value."""
    try:
        _check_without_side_effects(config)
    except ConfigError as exc:
        where = f"config {config.path}:" if config.path else "config:"
        raise ConfigError(str(exc).replace("config:", where, 1)) from exc


def _check_without_side_effects(config: AgentConfig) -> None:
    from edge_agent.errors import SourceError
    from edge_agent.io.sinks import jsonl_problem, parse_sink
    from edge_agent.io.uri import check_sources_of
    from edge_agent.model.keys import load_trusted_keys

    model = config.model
    if model.path:
        if not Path(model.path).is_file():
            why = "not a file" if Path(model.path).exists() else "no such file"
            raise ConfigError(f"config: [model] path = {model.path!r}: {why}")
        if Path(model.path).suffix == ".edgebundle":  # as edge_agent.model.plan.open_model
            try:
                load_trusted_keys([Path(k) for k in model.trusted_keys])
            except ConfigError as exc:
                raise ConfigError(f"config: [model] trusted_keys: {exc}") from None
    if model.labels:  # the message run gives (edge_agent.model.plan.open_model reads it so)
        read_text(model.labels, what="config: [model] labels")
    state_dir = Path(config.agent.state_dir)
    if state_dir.exists() and not state_dir.is_dir():  # as edge_agent.service refuses it
        raise ConfigError(f"config: [agent] state_dir = {str(state_dir)!r}: not a directory")
    try:
        check_sources_of(config)
    except SourceError as exc:
        where = "[[sources]]" if config.sources else "[source] uri:"
        raise ConfigError(f"config: {where} {exc}") from None
    for spec in config.results.sinks:
        try:
            kind, path = parse_sink(spec)
        except ConfigError as exc:
            raise ConfigError(
                f"config: [results] sinks: {str(exc).removeprefix('results = ')}"
            ) from None
        problem = jsonl_problem(Path(path)) if kind == "jsonl" else None
        if problem:  # what JsonlSink refuses at run
            raise ConfigError(f"config: [results] sinks: {spec!r}: {problem}")
    if config.mqtt.broker:
        from edge_agent.fleet.mqtt import BrokerSettings

        try:  # what edge_agent.service builds: it checks the URL's form, connects to nothing
            BrokerSettings.from_section(config.mqtt)
        except ConfigError as exc:
            raise ConfigError(f"config: [mqtt] {exc}") from None
        if config.fleet.operator_keys:  # as the service's order guard loads them
            try:
                load_trusted_keys(config.fleet.operator_keys)
            except ConfigError as exc:
                raise ConfigError(f"config: [fleet] operator_keys: {exc}") from None


def with_overrides(config: AgentConfig, **sections: Mapping[str, Any]) -> AgentConfig:
    """Apply command-line overrides (``None`` values are ignored), validating them like the file."""
    updated = {}
    for name, values in sections.items():
        given = {k: v for k, v in values.items() if v is not None}
        if not given:
            continue
        current = dataclasses.asdict(getattr(config, name))
        current.update(given)
        updated[name] = _section(name, current)
    return dataclasses.replace(config, **updated)


def markdown_reference() -> str:
    """The configuration reference, generated from the dataclasses above."""
    lines = [
        "# Agent configuration reference",
        "",
        f"Default file: `{DEFAULT_CONFIG}`. Generated by "
        "`python -m edge_agent.config --markdown`; do not edit by hand.",
        "",
    ]
    for name, cls in [*_SECTION_CLASSES.items(), ("[sources]", StreamSection)]:
        lines += [f"## [{name}]", ""]
        if cls is StreamSection:
            lines += [
                "Several named streams served by one model, instead of `[source]`: one "
                "`[[sources]]` table per stream (or `--source NAME=URI`, repeated).",
                "",
            ]
        lines += ["| key | default | meaning |", "|---|---|---|"]
        for f in dataclasses.fields(cls):
            default = _default(f)
            if isinstance(default, tuple):
                default = list(default)
            lines.append(f"| `{f.name}` | `{default!r}` | {f.metadata.get('doc', '')} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    if sys.argv[1:] == ["--markdown"]:
        print(markdown_reference())
