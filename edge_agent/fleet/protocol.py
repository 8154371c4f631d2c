"""The MQTT protocol between the agent and ``edgectl``: topics and payloads (a contract).

One module defines it and both sides import it; ``docs/mqtt.md`` documents it and its JSON
Schemas come from :data:`SCHEMAS` below (``python -m edge_agent.fleet.protocol --markdown``).

Topics, under a configurable prefix (default ``edge``)::

    edge/<device>/status            retained  online | offline (the Will) | stopped
    edge/<device>/telemetry         retained  every N seconds: rates, latency, system, monitoring
    edge/<device>/results           QoS 1     each result, the same object as the JSONL sink
    edge/<device>/events            QoS 1     model loaded, update started/verified/committed/...
    edge/<device>/cmd/<name>        in        ping | update | rollback | reload | capture
    edge/<device>/cmd/<name>/reply  out       the reply for MQTT 3.1.1 clients (MQTT 5 clients
                                              get it on their response topic, with their
                                              correlation data)
    edge/<device>/desired           retained  set by the operator: the model this device should run
                                              (and a ``shadow`` candidate to compare it with)
    edge/<device>/reported          retained  what the device runs, and how its last update went
    edge/groups/<group>/desired     retained  the same, for every device that declares the group
    edge/bundles/<sha256>/meta      retained  a published bundle: size, chunk size, chunk hashes
    edge/bundles/<sha256>/chunk/<i> retained  its bytes, in chunks (binary payloads)
    edge/<device>/samples/<id>/meta      retained  a captured sample: why, output, chunk hashes
    edge/<device>/samples/<id>/chunk/<i> retained  its frame (JPEG) or window (.npy), in chunks

Every JSON payload carries ``"schema": SCHEMA_VERSION``. Results, telemetry and events carry a
per-device ``seq`` that only grows, kept across restarts (one counter per stream: ``results``,
``telemetry``, ``events``), so consumers drop duplicates by ``(device, stream, seq)``: delivery is
at least once.

Orders (desired states and commands) may carry a ``"signed"`` envelope (:class:`OrderEnvelope`):
an Ed25519 signature by an operator key over :func:`canonical` of the order, its target, a
serial that only grows per target, an issue time and an expiry. Devices with ``[fleet]
operator_keys`` refuse orders without a valid one (``edge_agent.fleet.orders``).

Device ids and group names are one topic level: letters, digits, ``-``, ``_`` and ``.``, at most
64 characters (:func:`check_name`); AWS IoT Core allows 7 levels below the root, and the deepest
topic here has 5 (``edge/<device>/cmd/<name>/reply``).
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from edge_agent.errors import ProtocolError

SCHEMA_VERSION = 1
DEFAULT_PREFIX = "edge"
COMMANDS = ("ping", "update", "rollback", "reload", "capture")
STREAMS = ("results", "telemetry", "events")
#: Default bundle chunk size: under AWS IoT Core's 128 KB payload limit, with room for headers.
DEFAULT_CHUNK_SIZE = 96 * 1024
#: Commands larger than this are refused unread (a fuzzed or hostile payload).
MAX_COMMAND_BYTES = 64 * 1024
#: A bundle's meta message (its chunk hashes) is read up to this size: the largest payload a
#: device takes, so with OTA over MQTT its announced Maximum Packet Size is sized from it.
MAX_BUNDLE_META_BYTES = 4 * 2**20

_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_SAMPLE_ID = re.compile(r"^[0-9]{16}-[0-9a-f]{6}$")
#: Why a sample was captured (``[capture]`` policies; ``disagreement`` is the shadow's).
SAMPLE_REASONS = ("low_confidence", "near_threshold", "drift", "disagreement", "random")
#: Frames a shadow compares before ``edgectl`` reads its agreement (``--frames``).
DEFAULT_SHADOW_FRAMES = 200
#: Default sample chunk: small, so a chunk on a slow uplink holds a result back only briefly.
DEFAULT_SAMPLE_CHUNK = 32 * 1024

#: Event kinds (``edge/<device>/events``), each with a ``reason`` where one applies.
EVENT_KINDS = (
    "agent_started",
    "agent_stopping",
    "model_loaded",
    "update_started",
    "update_verified",
    "update_committed",
    "update_failed",
    "rolled_back",
    "shadow_started",
    "shadow_failed",
    "shadow_completed",
    "shadow_stopped",
    "source_lost",
    "source_restored",
    "ota_disabled",
    "plan_tuned",
    "drift",
    "spool_full",
    "order_refused",
    "orders_unsigned",
    "plaintext_mqtt",
    "command_rate_limited",
    "error",
)

#: Where an order is aimed (:class:`OrderEnvelope`'s ``scope``).
ORDER_SCOPES = ("device", "group")
#: Default lifetime of a signed desired state and of a signed command, seconds.
DESIRED_TTL_S = 3600
COMMAND_TTL_S = 300
#: How far an order's issue time may lie ahead of the device's clock.
MAX_CLOCK_SKEW_S = 300
_KEY_ID = re.compile(r"^[0-9a-f]{16}$")
_SIGNATURE = re.compile(r"^[A-Za-z0-9+/]{86}==$")  # base64 of 64 bytes


def check_name(value: str, what: str = "device id") -> str:
    if not isinstance(value, str) or not _NAME.match(value):
        raise ProtocolError(
            f"{what} {value!r}: use 1-64 letters, digits, '-', '_' or '.' (one topic level)"
        )
    return value


def check_sha256(value: Any) -> str:
    if not isinstance(value, str) or not _SHA256.match(value):
        raise ProtocolError(f"sha256 {value!r}: expected 64 lowercase hex digits")
    return value


def check_sample_id(value: Any) -> str:
    if not isinstance(value, str) or not _SAMPLE_ID.match(value):
        raise ProtocolError(
            f"sample id {value!r}: expected 16 digits (capture time, us), '-', 6 hex digits"
        )
    return value


# --- chunks: bundles and samples travel the same way --------------------------------------------


def split_chunks(data: bytes, chunk_size: int) -> list[bytes]:
    """``data`` cut into ``chunk_size`` pieces (the last one shorter)."""
    if chunk_size < 1:
        raise ProtocolError(f"chunk size {chunk_size}: must be >= 1")
    return [data[i : i + chunk_size] for i in range(0, len(data), chunk_size)]


def chunk_hashes(chunks: list[bytes]) -> list[str]:
    return [hashlib.sha256(c).hexdigest() for c in chunks]


def chunk_problem(
    payload: bytes, *, index: int, size: int, chunk_size: int, hashes: list[str]
) -> str | None:
    """Why chunk ``index`` is not the one a meta message lists (its size, then its sha256), or
    None when it is. Checked before anything is written."""
    count = len(hashes)
    want = chunk_size if index < count - 1 else size - chunk_size * (count - 1)
    if len(payload) != want:
        return f"{len(payload)} bytes, expected {want}"
    if hashlib.sha256(payload).hexdigest() != hashes[index]:
        return "sha256 mismatch"
    return None


@dataclass(frozen=True)
class Topics:
    """Every topic of one device (and the fleet-wide ones), built in one place."""

    device: str
    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        check_name(self.device)
        if not self.prefix or any(c in self.prefix for c in "+#") or self.prefix.endswith("/"):
            raise ProtocolError(f"topic prefix {self.prefix!r}: no '+', '#' or trailing '/'")

    @property
    def base(self) -> str:
        return f"{self.prefix}/{self.device}"

    @property
    def status(self) -> str:
        return f"{self.base}/status"

    @property
    def telemetry(self) -> str:
        return f"{self.base}/telemetry"

    @property
    def results(self) -> str:
        return f"{self.base}/results"

    @property
    def events(self) -> str:
        return f"{self.base}/events"

    @property
    def desired(self) -> str:
        return f"{self.base}/desired"

    @property
    def reported(self) -> str:
        return f"{self.base}/reported"

    @property
    def commands(self) -> str:
        """The subscription for every command (``+`` matches one level, so not the replies)."""
        return f"{self.base}/cmd/+"

    def command(self, name: str) -> str:
        return f"{self.base}/cmd/{name}"

    def reply(self, name: str) -> str:
        return f"{self.base}/cmd/{name}/reply"

    def stream(self, name: str) -> str:
        if name not in STREAMS:
            raise ProtocolError(f"stream {name!r}: expected one of {', '.join(STREAMS)}")
        return f"{self.base}/{name}"

    def group_desired(self, group: str) -> str:
        return group_desired_topic(group, prefix=self.prefix)

    @property
    def samples(self) -> str:
        """Every sample topic of this device (a subscription)."""
        return f"{self.base}/samples/#"

    def sample_meta(self, sample_id: str) -> str:
        return f"{self.base}/samples/{check_sample_id(sample_id)}/meta"

    def sample_chunk(self, sample_id: str, index: int) -> str:
        return f"{self.base}/samples/{check_sample_id(sample_id)}/chunk/{int(index)}"


def parse_sample_topic(topic: str, *, prefix: str = DEFAULT_PREFIX) -> tuple[str, str, int] | None:
    """``(device, sample id, chunk index)`` for ``<prefix>/<device>/samples/<id>/chunk/<i>``,
    index -1 for ``.../meta``; None for any other topic."""
    parts = topic.split("/")
    head = prefix.split("/")
    if parts[: len(head)] != head:
        return None
    rest = parts[len(head) :]
    if len(rest) < 4 or rest[1] != "samples" or not _SAMPLE_ID.match(rest[2]):
        return None
    if rest[3:] == ["meta"]:
        return rest[0], rest[2], -1
    if len(rest) == 5 and rest[3] == "chunk" and rest[4].isdigit() and len(rest[4]) <= 7:
        return rest[0], rest[2], int(rest[4])
    return None


def group_desired_topic(group: str, *, prefix: str = DEFAULT_PREFIX) -> str:
    return f"{prefix}/groups/{check_name(group, 'group')}/desired"


def bundle_meta_topic(sha256: str, *, prefix: str = DEFAULT_PREFIX) -> str:
    return f"{prefix}/bundles/{check_sha256(sha256)}/meta"


def bundle_chunk_topic(sha256: str, index: int, *, prefix: str = DEFAULT_PREFIX) -> str:
    return f"{prefix}/bundles/{check_sha256(sha256)}/chunk/{int(index)}"


def fleet_topic(kind: str, *, prefix: str = DEFAULT_PREFIX, share: str | None = None) -> str:
    """``edge/+/<kind>`` for a fleet-wide consumer; with ``share``, an MQTT 5 shared subscription
    (``$share/<share>/edge/+/<kind>``) so several consumers split the fleet."""
    topic = f"{prefix}/+/{kind}"
    return f"$share/{check_name(share, 'share group')}/{topic}" if share else topic


#: First levels under the prefix that are not device ids (so no device may be named so).
RESERVED_LEVELS = ("groups", "bundles", "edgectl")


def response_topic(token: str, *, prefix: str = DEFAULT_PREFIX) -> str:
    """``<prefix>/edgectl/<token>``: where ``edgectl`` asks (MQTT 5 Response Topic) for a command's
    reply; ``<prefix>/edgectl/+`` is what a device must be allowed to publish to answer it."""
    return f"{prefix}/edgectl/{token}"


def device_of(topic: str, *, prefix: str = DEFAULT_PREFIX) -> str | None:
    """The device id in ``<prefix>/<device>/...``, or None for another topic."""
    if not topic.startswith(prefix + "/"):
        return None
    parts = topic[len(prefix) + 1 :].split("/")
    if len(parts) >= 2 and parts[0] not in RESERVED_LEVELS:
        return parts[0]
    return None


def order_target(topic: str, *, prefix: str = DEFAULT_PREFIX) -> tuple[str, str, str] | None:
    """``(scope, target, order)`` of an order topic: ``("device", id, "desired")`` for
    ``<prefix>/<id>/desired``, ``("group", g, "desired")`` for ``<prefix>/groups/<g>/desired``,
    ``("device", id, name)`` for ``<prefix>/<id>/cmd/<name>``; None for any other topic."""
    if not topic.startswith(prefix + "/"):
        return None
    parts = topic[len(prefix) + 1 :].split("/")
    if len(parts) == 3 and parts[0] == "groups" and parts[2] == "desired":
        return ("group", parts[1], "desired") if _NAME.match(parts[1]) else None
    if not _NAME.match(parts[0]) or parts[0] in RESERVED_LEVELS:
        return None
    if parts[1:] == ["desired"]:
        return "device", parts[0], "desired"
    if len(parts) == 3 and parts[1] == "cmd" and parts[2] in COMMANDS:
        return "device", parts[0], parts[2]
    return None


# --- payloads -----------------------------------------------------------------------------


def dumps(payload: Mapping[str, Any]) -> bytes:
    """Compact JSON, no NaN (not JSON; consumers choke on it)."""
    return json.dumps(payload, separators=(",", ":"), allow_nan=False).encode()


def canonical(value: Any) -> bytes:
    """The bytes an order's signature covers: JSON with sorted keys, no spaces, UTF-8 (not
    ASCII-escaped), no NaN. Numbers as Python writes them (floats: shortest round-trip)."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def _int_field(data: Mapping[str, Any], key: str, what: str) -> int:
    value = data.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ProtocolError(f"{what}: signed.{key} {value!r}: expected a whole number >= 0")
    return value


@dataclass(frozen=True)
class OrderEnvelope:
    """The ``"signed"`` object of a signed order. ``key``: the operator key's id
    (``edge_agent.model.keys.key_id``); ``scope``/``target``/``order``: where it is aimed
    (:func:`order_target` of the topic it must arrive on); ``serial``: grows per target (edgectl:
    milliseconds since the epoch); ``issued``/``expires``: Unix seconds; ``reply_to``: a
    command's MQTT 5 Response Topic, covered by the signature (absent: none was signed, and the
    encoding is the one without it); ``signature``: base64 of the Ed25519 signature over
    :meth:`signed_bytes`."""

    key: str
    scope: str
    target: str
    order: str
    serial: int
    issued: int
    expires: int
    signature: str = ""
    reply_to: str = ""

    def __post_init__(self) -> None:
        what = "signed order"
        if not isinstance(self.reply_to, str) or "+" in self.reply_to or "#" in self.reply_to:
            raise ProtocolError(f"{what}: reply_to {self.reply_to!r}: expected a topic name")
        if self.reply_to and self.order == "desired":
            raise ProtocolError(f"{what}: reply_to: a desired state has no reply")
        if not isinstance(self.key, str) or not _KEY_ID.match(self.key):
            raise ProtocolError(f"{what}: key {self.key!r}: expected a 16-hex-digit key id")
        if self.scope not in ORDER_SCOPES:
            raise ProtocolError(f"{what}: scope {self.scope!r}: expected 'device' or 'group'")
        check_name(self.target, "signed order target")
        if self.order != "desired" and self.order not in COMMANDS:
            raise ProtocolError(
                f"{what}: order {self.order!r}: expected 'desired' or one of {', '.join(COMMANDS)}"
            )
        if self.expires <= self.issued:
            raise ProtocolError(f"{what}: expires {self.expires} is not after issued {self.issued}")
        if self.signature and not _SIGNATURE.match(self.signature):
            raise ProtocolError(f"{what}: signature: expected base64 of 64 bytes")

    @property
    def ledger_key(self) -> str:
        """Whose serials this one is compared with: desired states and commands apart (a
        retained desired state comes again on every reconnect; a command never does)."""
        kind = "desired" if self.order == "desired" else "cmd"
        return f"{self.scope}/{self.target}/{kind}"

    @classmethod
    def from_payload(cls, data: Mapping[str, Any], *, what: str) -> OrderEnvelope | None:
        """The envelope of an order, None when it has none (an unsigned order)."""
        raw = data.get("signed")
        if raw is None:
            return None
        if not isinstance(raw, Mapping):
            raise ProtocolError(f"{what}: 'signed' must be an object")
        for key in ("key", "scope", "target", "order", "signature"):
            if not isinstance(raw.get(key), str):
                raise ProtocolError(f"{what}: signed.{key} must be a string")
        return cls(
            key=raw["key"], scope=raw["scope"], target=raw["target"], order=raw["order"],
            serial=_int_field(raw, "serial", what), issued=_int_field(raw, "issued", what),
            expires=_int_field(raw, "expires", what), signature=raw["signature"],
            reply_to=raw.get("reply_to", ""),
        )  # fmt: skip

    def header(self) -> dict[str, Any]:
        """The signed fields; ``reply_to`` only when set (so that orders signed without one,
        by an older edgectl, verify as before)."""
        head = {
            "key": self.key, "scope": self.scope, "target": self.target, "order": self.order,
            "serial": self.serial, "issued": self.issued, "expires": self.expires,
        }  # fmt: skip
        if self.reply_to:
            head["reply_to"] = self.reply_to
        return head

    def signed_bytes(self, body: Mapping[str, Any]) -> bytes:
        """What the signature covers: :func:`canonical` of ``{"body": <the order without
        "signed">, ...the header}``."""
        return canonical({"body": order_body(body), **self.header()})

    def to_payload(self) -> dict[str, Any]:
        return {**self.header(), "signature": self.signature}


def order_body(payload: Mapping[str, Any]) -> dict[str, Any]:
    """An order without its envelope."""
    return {k: v for k, v in payload.items() if k != "signed"}


def order_urls(payload: Mapping[str, Any]) -> list[str]:
    """Every bundle URL an order names (its bundle's, its shadow's)."""
    urls = []
    for holder in (payload, payload.get("shadow")):
        bundle = holder.get("bundle") if isinstance(holder, Mapping) else None
        url = bundle.get("url") if isinstance(bundle, Mapping) else None
        if isinstance(url, str) and url:
            urls.append(url)
    return urls


def loads(data: bytes | str, *, what: str, limit: int = MAX_COMMAND_BYTES) -> dict[str, Any]:
    """A JSON object from the wire, or ProtocolError naming what is wrong."""
    if len(data) > limit:
        raise ProtocolError(f"{what}: {len(data)} bytes, larger than the {limit}-byte limit")
    try:
        value = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"{what}: not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ProtocolError(f"{what}: expected a JSON object, got {type(value).__name__}")
    return value


def status_payload(
    state: str,
    *,
    device: str,
    agent_version: str,
    model: Mapping[str, str] | None = None,
    profile: str | None = None,
    groups: tuple[str, ...] = (),
    ts: float,
) -> dict[str, Any]:
    return {
        "schema": SCHEMA_VERSION,
        "state": state,
        "device": device,
        "agent_version": agent_version,
        "model": dict(model) if model else None,
        "profile": profile,
        "groups": list(groups),
        "ts": ts,
    }


def event_payload(
    kind: str, *, device: str, seq: int, ts: float, reason: str | None = None, **details: Any
) -> dict[str, Any]:
    if kind not in EVENT_KINDS:
        raise ProtocolError(f"event kind {kind!r}: expected one of {', '.join(EVENT_KINDS)}")
    return {
        "schema": SCHEMA_VERSION,
        "seq": seq,
        "device": device,
        "kind": kind,
        "reason": reason,
        "ts": ts,
        "details": details,
    }


def reply_payload(
    command: str, *, ok: bool, request_id: Any = None, result: Any = None, error: str | None = None
) -> dict[str, Any]:
    return {
        "schema": SCHEMA_VERSION,
        "command": command,
        "id": request_id if isinstance(request_id, (str, int)) else None,
        "ok": ok,
        "result": result,
        "error": error,
    }


def _bundle_fields(data: Mapping[str, Any], *, what: str) -> dict[str, Any]:
    """``{"sha256", "name", "version", "url"}`` from a desired state's ``bundle`` object."""
    bundle = data.get("bundle")
    if not isinstance(bundle, Mapping):
        raise ProtocolError(f"{what}: 'bundle' must be an object with a sha256")
    fields: dict[str, Any] = {"sha256": check_sha256(bundle.get("sha256"))}
    for key in ("name", "version", "url"):
        value = bundle.get(key, "")
        if not isinstance(value, str):
            raise ProtocolError(f"{what}: bundle.{key} must be a string")
        fields[key] = value
    return fields


def _bundle_payload(sha256: str, name: str, version: str, url: str) -> dict[str, str]:
    bundle = {"sha256": sha256, "name": name, "version": version}
    if url:
        bundle["url"] = url
    return bundle


def _check_url(url: str, what: str) -> None:
    if url and not url.startswith(("http://", "https://")):
        raise ProtocolError(f"{what} {url!r}: expected http:// or https://")


@dataclass(frozen=True)
class ShadowSpec:
    """A candidate bundle the device runs in shadow beside the serving one (the desired
    state's ``shadow``): fetched and verified as an update, never served. ``frames``: how many
    frames the operator wants compared (``edgectl shadow --frames``); the shadow goes on after
    them until it is withdrawn. ``deployment`` tells one request from the next (a failed shadow
    is not retried for the same one)."""

    sha256: str
    name: str = ""
    version: str = ""
    url: str = ""
    frames: int = DEFAULT_SHADOW_FRAMES
    deployment: str = ""

    def __post_init__(self) -> None:
        check_sha256(self.sha256)
        _check_url(self.url, "desired shadow url")
        if isinstance(self.frames, bool) or not isinstance(self.frames, int) or self.frames < 1:
            raise ProtocolError(f"desired: shadow.frames {self.frames!r}: expected an integer >= 1")

    @classmethod
    def from_payload(cls, data: Any) -> ShadowSpec:
        if not isinstance(data, Mapping):
            raise ProtocolError("desired: 'shadow' must be an object with a bundle")
        frames = data.get("frames", DEFAULT_SHADOW_FRAMES)
        deployment = data.get("deployment", "")
        if not isinstance(deployment, str):
            raise ProtocolError("desired: shadow.deployment must be a string")
        return cls(
            **_bundle_fields(data, what="desired: shadow"), frames=frames, deployment=deployment
        )

    def to_payload(self) -> dict[str, Any]:
        return {
            "bundle": _bundle_payload(self.sha256, self.name, self.version, self.url),
            "frames": self.frames,
            "deployment": self.deployment,
        }

    def as_desired(self) -> Desired:
        """The update-shaped request the updater fetches and verifies it by (the anti-rollback
        floor does not apply: a shadow is never served)."""
        return Desired(
            sha256=self.sha256, name=self.name, version=self.version, url=self.url,
            allow_downgrade=True, deployment=self.deployment,
        )  # fmt: skip


@dataclass(frozen=True)
class Desired:
    """The model a device should run (``desired`` topics). ``allow_downgrade`` lets the version
    go below the device's anti-rollback floor (what ``edgectl rollback`` sets); ``shadow``, a
    candidate to run beside it without serving it (``edgectl shadow``)."""

    sha256: str
    name: str = ""
    version: str = ""
    url: str = ""
    allow_downgrade: bool = False
    deployment: str = ""
    shadow: ShadowSpec | None = None

    def __post_init__(self) -> None:
        check_sha256(self.sha256)
        _check_url(self.url, "desired url")

    @classmethod
    def from_payload(cls, data: Mapping[str, Any]) -> Desired:
        fields = _bundle_fields(data, what="desired")
        allow = data.get("allow_downgrade", False)
        if not isinstance(allow, bool):
            raise ProtocolError("desired: allow_downgrade must be true or false")
        deployment = data.get("deployment", "")
        if not isinstance(deployment, str):
            raise ProtocolError("desired: deployment must be a string")
        raw = data.get("shadow")
        shadow = None if raw is None else ShadowSpec.from_payload(raw)
        return cls(**fields, allow_downgrade=allow, deployment=deployment, shadow=shadow)

    def to_payload(self, *, ts: float) -> dict[str, Any]:
        payload = {
            "schema": SCHEMA_VERSION,
            "bundle": _bundle_payload(self.sha256, self.name, self.version, self.url),
            "allow_downgrade": self.allow_downgrade,
            "deployment": self.deployment,
            "ts": ts,
        }
        if self.shadow is not None:
            payload["shadow"] = self.shadow.to_payload()
        return payload


def reported_payload(
    *,
    device: str,
    model: Mapping[str, str] | None,
    bundle_sha256: str | None,
    update: Mapping[str, Any] | None,
    floor: str | None,
    history: list[Mapping[str, Any]],
    ts: float,
    ota: Mapping[str, Any] | None = None,
    shadow: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """``update`` is the last update attempt: ``{"sha256", "version", "state", "reason",
    "deployment"}`` with state one of downloading, verifying, health_check, committed, failed,
    rolled_back. ``ota`` is ``{"enabled", "reason"}``: whether this device follows updates, and
    why not (no trusted keys, or ``[ota] enabled = false``). ``shadow``: the shadow model's
    state (``{"sha256", "version", "state", "reason", "deployment", "frames", "agreement"}``),
    None when there is none."""
    return {
        "schema": SCHEMA_VERSION,
        "device": device,
        "model": dict(model) if model else None,
        "bundle_sha256": bundle_sha256,
        "update": dict(update) if update else None,
        "ota": dict(ota) if ota else {"enabled": True, "reason": None},
        "shadow": dict(shadow) if shadow else None,
        "floor": floor,
        "history": [dict(h) for h in history],
        "ts": ts,
    }


def bundle_meta_payload(
    *, sha256: str, size: int, chunk_size: int, chunks: list[str], name: str, version: str
) -> dict[str, Any]:
    return {
        "schema": SCHEMA_VERSION,
        "sha256": sha256,
        "size": size,
        "chunk_size": chunk_size,
        "chunks": chunks,
        "name": name,
        "version": version,
    }


def sample_meta_payload(
    *,
    device: str,
    sample_id: str,
    kind: str,
    reasons: list[str],
    capture_ts: float,
    stream: str | None,
    frame: int | None,
    model: Mapping[str, str] | None,
    output: Mapping[str, Any],
    data: bytes,
    chunk_size: int,
    shape: list[int],
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A captured sample's meta message: everything but its bytes, with the hashes of the chunks
    they travel in. ``kind``: ``jpeg`` (an image frame) or ``npy`` (a sensor or audio window,
    float32 ``[size, channels]``, numpy's format without pickle)."""
    if kind not in ("jpeg", "npy"):
        raise ProtocolError(f"sample kind {kind!r}: expected 'jpeg' or 'npy'")
    for reason in reasons:
        if reason not in SAMPLE_REASONS:
            raise ProtocolError(
                f"sample reason {reason!r}: expected one of {', '.join(SAMPLE_REASONS)}"
            )
    chunks = split_chunks(data, chunk_size)
    return {
        "schema": SCHEMA_VERSION,
        "device": device,
        "id": check_sample_id(sample_id),
        "kind": kind,
        "reasons": list(reasons),
        "capture_ts": capture_ts,
        "stream": stream,
        "frame": frame,
        "model": dict(model) if model else None,
        "output": dict(output),
        "shape": list(shape),
        "sha256": hashlib.sha256(data).hexdigest(),
        "size": len(data),
        "chunk_size": chunk_size,
        "chunks": chunk_hashes(chunks),
        **(dict(extra) if extra else {}),
    }


# --- JSON Schemas (docs/mqtt.md and the tests use these) ------------------------------------

_NUM = {"type": "number"}
_NUM_OR_NULL = {"type": ["number", "null"]}
_STR_OR_NULL = {"type": ["string", "null"]}
_MODEL = {
    "type": ["object", "null"],
    "required": ["name", "version"],
    "properties": {"name": {"type": "string"}, "version": {"type": "string"}},
}
_PCTL = {
    "type": "object",
    "properties": {"p50": _NUM_OR_NULL, "p95": _NUM_OR_NULL, "p99": _NUM_OR_NULL},
}
_SEQ = {"type": "integer", "minimum": 0}
_BUNDLE = {
    "type": "object",
    "required": ["sha256"],
    "properties": {
        "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
        "name": {"type": "string"},
        "version": {"type": "string"},
        "url": {"type": "string"},
    },
}
_SHADOW_STATES = ["loading", "running", "failed", "stopped"]
_ORDER = {
    "type": "object",
    "required": ["key", "scope", "target", "order", "serial", "issued", "expires", "signature"],
    "properties": {
        "key": {"type": "string", "pattern": _KEY_ID.pattern},
        "scope": {"enum": list(ORDER_SCOPES)},
        "target": {"type": "string", "pattern": _NAME.pattern},
        "order": {"enum": ["desired", *COMMANDS]},
        "serial": {"type": "integer", "minimum": 0},
        "issued": {"type": "integer", "minimum": 0},
        "expires": {"type": "integer", "minimum": 0},
        "signature": {"type": "string", "pattern": _SIGNATURE.pattern},
        "reply_to": {"type": "string"},
    },
}
_SCHEMA = {"const": SCHEMA_VERSION}

SCHEMAS: dict[str, dict[str, Any]] = {
    "status": {
        "title": "edge/<device>/status (retained)",
        "type": "object",
        "required": ["schema", "state", "device", "agent_version", "ts"],
        "properties": {
            "schema": _SCHEMA,
            "state": {"enum": ["online", "offline", "stopped"]},
            "device": {"type": "string"},
            "agent_version": {"type": "string"},
            "model": _MODEL,
            "profile": _STR_OR_NULL,
            "groups": {"type": "array", "items": {"type": "string"}},
            "ts": _NUM,
        },
    },
    "result": {
        "title": "edge/<device>/results: the JSONL sink's object, with the persistent seq",
        "type": "object",
        "required": ["seq", "capture_ts", "result_ts", "model", "latency_ms", "output"],
        "properties": {
            "seq": _SEQ,
            "stream": {"type": "string"},
            "stream_seq": {"type": "integer", "minimum": 0},
            "capture_ts": _NUM,
            "result_ts": _NUM,
            "frame": {"type": "integer"},
            "model": _MODEL,
            "latency_ms": {
                "type": "object",
                "required": ["capture_to_result", "preprocess", "inference", "postprocess"],
                "properties": {
                    k: _NUM for k in ("capture_to_result", "preprocess", "inference", "postprocess")
                },
            },
            "output": {"type": "object"},
        },
    },
    "telemetry": {
        "title": "edge/<device>/telemetry (retained, every interval)",
        "type": "object",
        "required": ["schema", "seq", "device", "ts", "interval_s", "model", "pipeline", "system"],
        "properties": {
            "schema": _SCHEMA,
            "seq": _SEQ,
            "device": {"type": "string"},
            "ts": _NUM,
            "interval_s": _NUM,
            "uptime_s": _NUM,
            "state": {"type": "string"},
            "model": _MODEL,
            "spool_depth": {"type": "integer", "minimum": 0},
            "pipeline": {
                "type": "object",
                "required": ["fps", "results", "dropped", "inference_errors", "latency_ms"],
                "properties": {
                    "fps": _NUM,
                    "results": {"type": "integer"},
                    "dropped": {"type": "integer"},
                    "inference_errors": {"type": "integer"},
                    "latency_ms": {"type": "object", "additionalProperties": _PCTL},
                    "plan": {
                        "type": ["object", "null"],
                        "properties": {
                            "threads": {"type": "integer"},
                            "workers": {"type": "integer"},
                            "how": {"enum": ["requested", "rule", "cached", "tuned"]},
                            "mode": {"enum": ["throughput", "live"]},
                            "fps": _NUM_OR_NULL,
                            "latency_ms": _NUM_OR_NULL,
                        },
                    },
                    "streams": {
                        "type": "object",
                        "additionalProperties": {
                            "type": "object",
                            "required": ["state", "fps", "results", "dropped", "latency_ms"],
                            "properties": {
                                "state": {"enum": ["starting", "serving", "degraded", "ended"]},
                                "fps": _NUM,
                                "results": {"type": "integer"},
                                "frames": {"type": "integer"},
                                "dropped": {"type": "integer"},
                                "skipped": {"type": "integer"},
                                "gated": {"type": "integer"},
                                "errors": {"type": "integer"},
                                "reconnects": {"type": "integer"},
                                "latency_ms": {"type": "object", "additionalProperties": _PCTL},
                            },
                        },
                    },
                },
            },
            "system": {
                "type": "object",
                "properties": {
                    "cpu_percent": _NUM_OR_NULL,
                    "load": {"type": ["array", "null"], "items": _NUM},
                    "ram_percent": _NUM_OR_NULL,
                    "ram_used_mb": _NUM_OR_NULL,
                    "disk_percent": _NUM_OR_NULL,
                    "cpu_temp_c": _NUM_OR_NULL,
                    "throttled": {"type": ["object", "null"]},
                    "process_rss_mb": _NUM_OR_NULL,
                },
            },
            "monitoring": {
                "type": ["object", "null"],
                "properties": {
                    "samples": {"type": "integer"},
                    "input": {"type": ["object", "null"]},
                    "output": {"type": ["object", "null"]},
                    "drift": {"type": ["object", "null"]},
                },
            },
            "shadow": {
                "type": "object",
                "required": ["state", "sha256", "frames", "agreement", "errors", "nans"],
                "properties": {
                    "state": {"enum": _SHADOW_STATES},
                    "sha256": {"type": "string"},
                    "model": _MODEL,
                    "deployment": {"type": "string"},
                    "reason": _STR_OR_NULL,
                    "metric": _STR_OR_NULL,
                    "target_frames": {"type": "integer"},
                    "frames": {"type": "integer"},
                    "agreement": _NUM_OR_NULL,
                    "disagreements": {"type": "integer"},
                    "offered": {"type": "integer"},
                    "skipped_busy": {"type": "integer"},
                    "skipped_budget": {"type": "integer"},
                    "errors": {"type": "integer"},
                    "nans": {"type": "integer"},
                    "latency_ms": _PCTL,
                    "serving_latency_ms": _PCTL,
                    "latency_ratio": _NUM_OR_NULL,
                    "share": _NUM_OR_NULL,
                    "max_share": _NUM,
                },
            },
        },
    },
    "event": {
        "title": "edge/<device>/events",
        "type": "object",
        "required": ["schema", "seq", "device", "kind", "ts"],
        "properties": {
            "schema": _SCHEMA,
            "seq": _SEQ,
            "device": {"type": "string"},
            "kind": {"enum": list(EVENT_KINDS)},
            "reason": _STR_OR_NULL,
            "ts": _NUM,
            "details": {"type": "object"},
        },
    },
    "command": {
        "title": "edge/<device>/cmd/<name> (in)",
        "type": "object",
        "properties": {
            "schema": _SCHEMA,
            "id": {"type": ["string", "integer"]},
            "bundle": {"type": "object"},
            "allow_downgrade": {"type": "boolean"},
            "version": {"type": "string"},
            "enabled": {"type": "boolean"},
            "purge": {"type": "boolean"},
            "signed": _ORDER,
        },
    },
    "reply": {
        "title": "the reply: MQTT 5 response topic, or edge/<device>/cmd/<name>/reply",
        "type": "object",
        "required": ["schema", "command", "ok"],
        "properties": {
            "schema": _SCHEMA,
            "command": {"type": "string"},
            "id": {"type": ["string", "integer", "null"]},
            "ok": {"type": "boolean"},
            "result": {},
            "error": _STR_OR_NULL,
        },
    },
    "desired": {
        "title": "edge/<device>/desired and edge/groups/<group>/desired (retained)",
        "type": "object",
        "required": ["schema", "bundle"],
        "properties": {
            "schema": _SCHEMA,
            "bundle": _BUNDLE,
            "allow_downgrade": {"type": "boolean"},
            "deployment": {"type": "string"},
            "shadow": {
                "type": ["object", "null"],
                "required": ["bundle"],
                "properties": {
                    "bundle": _BUNDLE,
                    "frames": {"type": "integer", "minimum": 1},
                    "deployment": {"type": "string"},
                },
            },
            "ts": _NUM,
            "signed": _ORDER,
        },
    },
    "order_envelope": {
        "title": "the 'signed' object of a desired state or a command (see 'Signed orders')",
        **_ORDER,
    },
    "reported": {
        "title": "edge/<device>/reported (retained)",
        "type": "object",
        "required": ["schema", "device", "model", "update", "ts"],
        "properties": {
            "schema": _SCHEMA,
            "device": {"type": "string"},
            "model": _MODEL,
            "bundle_sha256": _STR_OR_NULL,
            "update": {
                "type": ["object", "null"],
                "properties": {
                    "sha256": {"type": "string"},
                    "version": {"type": "string"},
                    "state": {
                        "enum": [
                            "downloading",
                            "verifying",
                            "health_check",
                            "committed",
                            "failed",
                            "rolled_back",
                        ]
                    },
                    "reason": _STR_OR_NULL,
                    "deployment": {"type": "string"},
                },
            },
            "ota": {
                "type": "object",
                "properties": {"enabled": {"type": "boolean"}, "reason": _STR_OR_NULL},
            },
            "shadow": {
                "type": ["object", "null"],
                "properties": {
                    "sha256": {"type": "string"},
                    "version": {"type": "string"},
                    "state": {"enum": _SHADOW_STATES},
                    "reason": _STR_OR_NULL,
                    "deployment": {"type": "string"},
                    "frames": {"type": "integer"},
                    "agreement": _NUM_OR_NULL,
                },
            },
            "floor": _STR_OR_NULL,
            "history": {"type": "array", "items": {"type": "object"}},
            "ts": _NUM,
        },
    },
    "bundle_meta": {
        "title": "edge/bundles/<sha256>/meta (retained)",
        "type": "object",
        "required": ["schema", "sha256", "size", "chunk_size", "chunks"],
        "properties": {
            "schema": _SCHEMA,
            "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
            "size": {"type": "integer", "minimum": 1},
            "chunk_size": {"type": "integer", "minimum": 1},
            "chunks": {"type": "array", "items": {"type": "string", "pattern": "^[0-9a-f]{64}$"}},
            "name": {"type": "string"},
            "version": {"type": "string"},
        },
    },
    "sample_meta": {
        "title": "edge/<device>/samples/<id>/meta (retained; its chunks first, then this)",
        "type": "object",
        "required": [
            "schema",
            "device",
            "id",
            "kind",
            "reasons",
            "capture_ts",
            "model",
            "output",
            "sha256",
            "size",
            "chunk_size",
            "chunks",
        ],
        "properties": {
            "schema": _SCHEMA,
            "device": {"type": "string"},
            "id": {"type": "string", "pattern": _SAMPLE_ID.pattern},
            "kind": {"enum": ["jpeg", "npy"]},
            "reasons": {"type": "array", "items": {"enum": list(SAMPLE_REASONS)}},
            "capture_ts": _NUM,
            "stream": _STR_OR_NULL,
            "frame": {"type": ["integer", "null"]},
            "model": _MODEL,
            "output": {"type": "object"},
            "shadow_output": {"type": "object"},
            "shape": {"type": "array", "items": {"type": "integer"}},
            "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
            "size": {"type": "integer", "minimum": 1},
            "chunk_size": {"type": "integer", "minimum": 1},
            "chunks": {"type": "array", "items": {"type": "string", "pattern": "^[0-9a-f]{64}$"}},
        },
    },
}


def markdown_schemas() -> str:
    lines = []
    for name, schema in SCHEMAS.items():
        lines += [f"### `{name}`: {schema.get('title', '')}", "", "```json"]
        lines += [json.dumps(schema, indent=2), "```", ""]
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    if sys.argv[1:] == ["--markdown"]:
        print(markdown_schemas())
