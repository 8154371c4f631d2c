"""An MQTT message -> a row of its stream's table. Pure Python (no psycopg): the collector
calls :func:`to_row` on paho's thread, and ``edgectl export`` uses :func:`telemetry_row`.

The idempotency key is ``(device, time, seq)`` in the stream's table (so ``(device, stream,
seq)`` across the database, with the time the device itself stamped): a message delivered
twice is stored once.

- ``device`` comes from the topic (what the broker's ACL vouches for), not from the payload.
- ``seq`` is the payload's ``seq`` for telemetry, events and results. Status and reported carry
  none: their seq is :func:`content_seq`, derived from the payload's bytes. A retained status
  delivered again (every collector start, every reconnect, to every collector that reads it) is
  the same bytes and stored once; a new one differs at least in its ``ts``. Two different
  payloads share a derived seq with probability about n² / 2⁶⁴.
- ``time`` is the device's timestamp in the payload (``ts``; ``result_ts`` for results), so a
  redelivered message has the same time. A message without one breaks the protocol's schema and
  is rejected (counted, acknowledged, not stored), since no deterministic key can be made.
"""

from __future__ import annotations

import csv
import datetime
import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any

from edge_agent.fleet import protocol

#: Stream (topic's last level) -> the typed columns of its table, after device, seq and time.
COLUMNS: dict[str, tuple[str, ...]] = {
    "telemetry": (
        "model_name", "model_version", "state", "fps", "results", "dropped", "inference_errors",
        "p50_ms", "p95_ms", "p99_ms", "c2r_p95_ms", "cpu_percent", "ram_percent", "cpu_temp_c",
        "spool_depth", "drift_input", "drift_output", "drifted", "shadow_agreement",
    ),
    "events": ("kind", "reason"),
    "results": ("stream", "model_name", "model_version", "latency_ms", "label", "score"),
    "status": ("state", "agent_version", "model_version"),
    "reported": ("model_version", "update_state", "update_version", "deployment", "floor"),
}  # fmt: skip
#: Streams that carry a seq of their own (the others get :func:`content_seq`).
SEQ_STREAMS = frozenset(protocol.STREAMS)
#: The largest payload the collector stores (larger ones are rejected).
MAX_PAYLOAD_BYTES = 1 << 20


#: ``edgectl history --metric`` names -> telemetry columns.
METRICS: dict[str, str] = {
    "fps": "fps",
    "p50": "p50_ms",
    "p95": "p95_ms",
    "p99": "p99_ms",
    "latency": "c2r_p95_ms",
    "cpu": "cpu_percent",
    "ram": "ram_percent",
    "temp": "cpu_temp_c",
    "drift": "drift_input",
    "drift_output": "drift_output",
    "drifted": "drifted",
    "dropped": "dropped",
    "errors": "inference_errors",
    "results": "results",
    "spool": "spool_depth",
    "shadow": "shadow_agreement",
    "model": "model_version",
    "state": "state",
}
DEFAULT_METRICS = ("fps", "p95", "cpu", "temp", "drift", "model")


class Rejected(ValueError):
    """A message that cannot be stored (its reason is the message): counted and acknowledged."""


@dataclass(frozen=True)
class Row:
    stream: str
    device: str
    seq: int
    time: datetime.datetime
    values: tuple[Any, ...]  # COLUMNS[stream], in order
    payload: str  # the JSON text, as received

    def as_tuple(self) -> tuple[Any, ...]:
        return (self.device, self.seq, self.time, *self.values, self.payload)

    def column(self, name: str) -> Any:
        return self.values[COLUMNS[self.stream].index(name)]


def content_seq(payload: bytes) -> int:
    """A deterministic 63-bit seq for a message that has none: the first 8 bytes of the
    sha256 of its bytes, as a non-negative bigint."""
    return int.from_bytes(hashlib.sha256(payload).digest()[:8], "big") >> 1


def split_topic(topic: str, *, prefix: str = protocol.DEFAULT_PREFIX) -> tuple[str, str] | None:
    """``(device, stream)`` of ``<prefix>/<device>/<stream>`` for a stream the collector keeps."""
    device = protocol.device_of(topic, prefix=prefix)
    if device is None:
        return None
    rest = topic[len(prefix) + 1 :].split("/")
    if len(rest) != 2 or rest[1] not in COLUMNS:
        return None
    return device, rest[1]


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _int(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value if -(2**63) <= value < 2**63 else None


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _obj(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


EXPORT_FIELDS = (
    "device", "seq", "ts", "model_name", "model_version", "fps", "results", "dropped",
    "inference_errors", "inference_p50_ms", "inference_p95_ms", "inference_p99_ms",
    "capture_to_result_p95_ms", "cpu_percent", "ram_percent", "cpu_temp_c", "spool_depth",
)  # fmt: skip


def telemetry_row(data: dict[str, Any]) -> dict[str, Any]:
    """A telemetry payload flattened to :data:`EXPORT_FIELDS` (``edgectl export``'s CSV)."""
    p = _obj(data.get("pipeline"))
    lat = _obj(p.get("latency_ms"))
    inf, c2r = _obj(lat.get("inference")), _obj(lat.get("capture_to_result"))
    s = _obj(data.get("system"))
    m = _obj(data.get("model"))
    return {
        "device": data.get("device"),
        "seq": data.get("seq"),
        "ts": data.get("ts"),
        "model_name": m.get("name"),
        "model_version": m.get("version"),
        "fps": p.get("fps"),
        "results": p.get("results"),
        "dropped": p.get("dropped"),
        "inference_errors": p.get("inference_errors"),
        "inference_p50_ms": inf.get("p50"),
        "inference_p95_ms": inf.get("p95"),
        "inference_p99_ms": inf.get("p99"),
        "capture_to_result_p95_ms": c2r.get("p95"),
        "cpu_percent": s.get("cpu_percent"),
        "ram_percent": s.get("ram_percent"),
        "cpu_temp_c": s.get("cpu_temp_c"),
        "spool_depth": data.get("spool_depth"),
    }


def telemetry_writer(out: IO[str], fmt: str) -> Callable[[dict[str, Any]], object]:
    """Writes one telemetry payload to ``out`` as a JSON line or a CSV row of
    :data:`EXPORT_FIELDS` (header first)."""
    if fmt == "csv":
        writer = csv.DictWriter(out, fieldnames=EXPORT_FIELDS)
        writer.writeheader()
        return lambda data: writer.writerow(telemetry_row(data))
    return lambda data: out.write(json.dumps(data, separators=(",", ":")) + "\n")


def _telemetry(data: dict[str, Any]) -> tuple[Any, ...]:
    flat = telemetry_row(data)
    drift = _obj(_obj(data.get("monitoring")).get("drift"))
    drifted = drift.get("drifted")
    return (
        _str(flat["model_name"]), _str(flat["model_version"]), _str(data.get("state")),
        _num(flat["fps"]), _int(flat["results"]), _int(flat["dropped"]),
        _int(flat["inference_errors"]), _num(flat["inference_p50_ms"]),
        _num(flat["inference_p95_ms"]), _num(flat["inference_p99_ms"]),
        _num(flat["capture_to_result_p95_ms"]), _num(flat["cpu_percent"]),
        _num(flat["ram_percent"]), _num(flat["cpu_temp_c"]), _int(flat["spool_depth"]),
        _num(drift.get("input")), _num(drift.get("output")),
        drifted if isinstance(drifted, bool) else None,
        _num(_obj(data.get("shadow")).get("agreement")),
    )  # fmt: skip


def _events(data: dict[str, Any]) -> tuple[Any, ...]:
    return _str(data.get("kind")), _str(data.get("reason"))


def _results(data: dict[str, Any]) -> tuple[Any, ...]:
    m, out = _obj(data.get("model")), _obj(data.get("output"))
    label = out.get("label")
    return (
        _str(data.get("stream")), _str(m.get("name")), _str(m.get("version")),
        _num(_obj(data.get("latency_ms")).get("capture_to_result")),
        str(label) if isinstance(label, (str, int)) and not isinstance(label, bool) else None,
        _num(out.get("score")),
    )  # fmt: skip


def _status(data: dict[str, Any]) -> tuple[Any, ...]:
    return (
        _str(data.get("state")), _str(data.get("agent_version")),
        _str(_obj(data.get("model")).get("version")),
    )  # fmt: skip


def _reported(data: dict[str, Any]) -> tuple[Any, ...]:
    update = _obj(data.get("update"))
    return (
        _str(_obj(data.get("model")).get("version")), _str(update.get("state")),
        _str(update.get("version")), _str(update.get("deployment")), _str(data.get("floor")),
    )  # fmt: skip


_EXTRACT = {
    "telemetry": _telemetry,
    "events": _events,
    "results": _results,
    "status": _status,
    "reported": _reported,
}


def _lone_surrogate(data: Any) -> bool:
    try:
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


_TIME_KEY = {"results": "result_ts"}
_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)


def to_row(device: str, stream: str, payload: bytes) -> Row:
    """The row for one message of ``stream`` from ``device``; Rejected with the reason."""
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise Rejected(f"{len(payload)} bytes, over the {MAX_PAYLOAD_BYTES}-byte limit")
    try:
        text = payload.decode("utf-8")
        data = json.loads(text)
    except (UnicodeDecodeError, ValueError) as exc:
        raise Rejected(f"not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise Rejected(f"expected a JSON object, got {type(data).__name__}")
    if "\\u0000" in text:
        raise Rejected("a \\u0000 in a string (PostgreSQL's jsonb cannot hold it)")
    if ("\\ud" in text or "\\uD" in text) and _lone_surrogate(data):
        raise Rejected("a lone UTF-16 surrogate escape in a string (not Unicode text)")
    if stream in SEQ_STREAMS:
        seq = _int(data.get("seq"))
        if seq is None or seq < 0:
            raise Rejected(f"seq {data.get('seq')!r}: expected a whole number >= 0")
    else:
        seq = content_seq(payload)
    key = _TIME_KEY.get(stream, "ts")
    ts = _num(data.get(key))
    if ts is None or not 0 <= ts < 253402300800:  # up to the year 9999
        raise Rejected(f"{key} {data.get(key)!r}: expected a Unix time")
    time = _EPOCH + datetime.timedelta(microseconds=round(ts * 1e6))
    return Row(stream, device, seq, time, _EXTRACT[stream](data), text)
