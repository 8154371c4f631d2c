"""``edgectl``: the operator's side of the protocol (``edge_agent.fleet.protocol``).

::

    edgectl [--broker URL] [--prefix edge] [--username U --password-file F]
            [--ca-file F --cert-file F --key-file F]
            [--operator-key FILE [--operator-key-passphrase-file F] [--order-ttl DURATION]]
            COMMAND ...
    edgectl keygen --out DIR [--passphrase-file F] [--force]
    edgectl provision NAME --out DIR [--role device|operator|consumer] [--group G ...] [--rotate]
            [--cert [--ca DIR] [--days N]]
    edgectl ca init --out DIR [--name NAME] [--days N]
    edgectl ca server HOST ... --out DIR [--ca DIR] [--days N]
    edgectl acl (--mosquitto | --dynsec [--admin-user NAME ...]) [--devices-from DIR]
            [--device D ...] [--group D=G ...] [--operator-user NAME ...] [--consumer-user NAME ...]
    edgectl publish BUNDLE [--chunk-size BYTES] [--public-key KEY]
    edgectl deploy BUNDLE (--device ID | --group NAME) [--url URL]
    edgectl rollout BUNDLE --group NAME --canary PCT --wait DURATION --max-failures PCT
            [--require-shadow AGREEMENT [--frames N] [--shadow-timeout DURATION]]
    edgectl shadow BUNDLE (--device ID | --group NAME) [--frames N] [--url URL]
    edgectl shadow --status [--device ID | --group NAME] [--json]
    edgectl shadow --stop (--device ID | --group NAME)
    edgectl rollback (--device ID | --group NAME) [--version V]
    edgectl ping DEVICE
    edgectl status [--timeout S] [--json] [--db URL [--db-password-file F]]
    edgectl watch [DEVICE] [--count N]
    edgectl export --format jsonl|csv [--duration S] [--share GROUP] [-o FILE]
    edgectl export --db URL [--since WHEN] [--until WHEN] [--device D] --format jsonl|csv [-o FILE]
    edgectl history DEVICE --db URL [--since WHEN] [--until WHEN] [--metric fps,p95,…]
            [--format table|json|csv]
    edgectl collect [samples] --out DIR [--device D | --group G] [--since WHEN] [--duration S]
            [--idle S]
    edgectl collect fleet --db URL [--db-password-file F] [--share-group G] [--client-id ID]
            [--results] [--prometheus PORT] [--duration S] [--retire]
    edgectl simulate --devices N --rate HZ [--count N | --duration S]
    edgectl capture --device D (--off [--purge] | --on)

Nothing but the broker is central: bundles are stored on it as retained chunks
(``edge/bundles/<sha256>/…``), desired states are retained, and the fleet view is built from
retained status and telemetry. ``watch`` and ``export`` take ``--share GROUP`` to use an MQTT 5
shared subscription (``$share/GROUP/edge/+/telemetry``), so several instances split a large
fleet between them.

With ``--operator-key FILE`` (or ``$EDGECTL_OPERATOR_KEY``) every order edgectl publishes (a
desired state, a command) is signed for its topic (``edgectl.signer``); devices with ``[fleet]
operator_keys`` refuse anything else. ``keygen`` makes such a key pair.

``--db`` (default ``$EDGECTL_DB``) names the fleet database that ``collect fleet`` fills
(``edgectl.collector``): ``status`` and ``export`` then read it instead of the broker, and
``history`` needs it. A libpq URL without a password: that comes from ``--db-password-file`` or
``PGPASSFILE``.

Exit codes: 0 ok, 1 internal error, 2 bad input, 3 a rollout aborted (canaries failed, or their
shadow did not agree enough) or a device reported a failed update, 4 the bundle failed
verification, 5 the broker refused us or could not be reached, 6 a device did not answer in time,
7 the fleet database cannot be reached, refused us, or its schema is newer than this edgectl.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

from edge_agent.errors import (
    BrokerError,
    CtlExit,
    EdgeError,
    NoAnswer,
    RolloutAborted,
    edgectl_exit_code,
)
from edge_agent.fleet import protocol
from edge_agent.fleet.protocol import Desired, ShadowSpec, Topics
from edgectl.fleetdb.rows import DEFAULT_METRICS as DEFAULT_HISTORY_METRICS
from edgectl.fleetdb.rows import METRICS as HISTORY_METRICS
from edgectl.fleetdb.rows import telemetry_writer
from edgectl.tables import FORMATS, aligned, cell
from edgectl.when import time_range

PROG = "edgectl"
#: The commands that publish orders (desired states, commands): they need the operator key.
SENDS_ORDERS = frozenset(("deploy", "rollout", "rollback", "shadow", "ping", "capture"))

log = logging.getLogger(PROG)


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``5m``, ``1h`` -> seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"duration {text!r}: expected e.g. 30s, 5m or 1h")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]


def parse_agreement(text: str) -> float:
    """``0.95`` or ``95%`` -> 0.95."""
    try:
        value = float(text.rstrip("%")) / (100.0 if text.endswith("%") else 1.0)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"agreement {text!r}: expected a fraction 0-1 (or a percentage: 95%)"
        ) from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"agreement {text!r}: must be between 0 and 1")
    return value


def parse_frames(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"frames {text!r}: expected a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"frames {text!r}: must be at least 1")
    return value


def parse_percent(text: str) -> float:
    try:
        value = float(text.rstrip("%"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"percentage {text!r}: expected a number 0-100") from None
    if not 0 <= value <= 100:
        raise argparse.ArgumentTypeError(f"percentage {text!r}: must be between 0 and 100")
    return value


# --- the client -----------------------------------------------------------------------------


def broker_settings(args: argparse.Namespace) -> Any:
    """The broker options (``--broker``, ``--username``, ``--password-file``, TLS files) as
    ``edge_agent.fleet.mqtt.BrokerSettings``."""
    from edge_agent.fleet.mqtt import BrokerSettings

    return BrokerSettings(
        url=args.broker,
        username=args.username or "",
        password_file=args.password_file or "",
        ca_file=args.ca_file or "",
        cert_file=args.cert_file or "",
        key_file=args.key_file or "",
    )


class Client:
    """A blocking paho client for a command-line tool: connect (or raise BrokerError with the
    CONNACK reason), publish and wait for PUBACK, subscribe and collect."""

    def __init__(self, args: argparse.Namespace, *, client_id: str | None = None) -> None:
        import paho.mqtt.client as mqtt

        self.settings = broker_settings(args)
        self.prefix = args.prefix
        self._mqtt = mqtt
        self._client_id = client_id or f"edgectl-{uuid.uuid4().hex[:10]}"
        self._password = self.settings.password(what="--password-file")
        from edgectl.signer import OrderSigner

        self.signer = OrderSigner.from_args(args)
        plaintext = self.settings.plaintext_warning(orders=False)  # credentials only
        if plaintext:
            log.warning("%s", plaintext)
        if self.signer is not None and getattr(args, "command", "") in SENDS_ORDERS:
            self.signer.key()  # a bad key or passphrase: said before the broker is reached
        self.protocol = "5"
        self._build()

    def _build(self) -> None:
        self.client = self.settings.new_client(
            client_id=self._client_id,
            password=self._password,
            protocol=self.protocol,
            max_inflight=200,
        )
        self._connected = threading.Event()
        self._refused: str | None = None
        self._handlers: list[Callable[[Any], None]] = []
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if getattr(reason, "is_failure", False):
            self._refused = str(reason)
        self._connected.set()

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        for handler in list(self._handlers):
            handler(msg)

    def __enter__(self) -> Client:
        s = self.settings
        try:
            self.client.connect(s.host, s.port, keepalive=30)
        except OSError as exc:
            raise BrokerError(f"mqtt {s.safe_url}: cannot connect: {exc.strerror or exc}") from None
        self.client.loop_start()
        answered = self._connected.wait(3.0)
        unsupported = self._refused is not None and "protocol" in self._refused.lower()
        if not answered or unsupported:  # an MQTT 3.1.1-only broker: refused or silent
            self.client.loop_stop()
            self.client.disconnect()
            self.protocol = "3.1.1"
            self._build()
            try:
                self.client.connect(s.host, s.port, keepalive=30)
            except OSError as exc:
                raise BrokerError(
                    f"mqtt {s.safe_url}: cannot connect: {exc.strerror or exc}"
                ) from None
            self.client.loop_start()
            answered = self._connected.wait(10.0)
        if not answered:
            self.client.loop_stop()
            raise BrokerError(f"mqtt {s.safe_url}: no CONNACK within 10 s")
        if self._refused:
            self.client.loop_stop()
            raise BrokerError(f"mqtt {s.safe_url}: broker refused the connection: {self._refused}")
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def publish(
        self, topic: str, payload: bytes, *, retain: bool = False, properties: Any = None
    ) -> Any:
        """Publish QoS 1; an order (a desired state, a command) is signed first when we hold an
        operator key, whichever command sends it."""
        if self.signer is not None and payload and protocol.order_target(topic, prefix=self.prefix):
            order = protocol.loads(payload, what=topic, limit=1 << 20)
            reply_to = getattr(properties, "ResponseTopic", "") or ""
            payload = protocol.dumps(
                self.signer.sign(topic, order, prefix=self.prefix, reply_to=reply_to)
            )
        info = self.client.publish(topic, payload, qos=1, retain=retain, properties=properties)
        if info.rc != 0:
            raise BrokerError(
                f"mqtt: publish to {topic} failed: {self._mqtt.error_string(info.rc)}"
            )
        return info

    def subscribe(self, topics: Sequence[str], handler: Callable[[Any], None]) -> None:
        self._handlers.append(handler)
        done = threading.Event()
        self.client.on_subscribe = lambda *a: done.set()
        self.client.subscribe([(t, 1) for t in topics])
        if done.wait(5.0):
            log.debug("subscribed: %s", " ".join(topics))

    def collect(self, topics: Sequence[str], *, seconds: float) -> list[Any]:
        got: list[Any] = []
        lock = threading.Lock()

        def keep(msg: Any) -> None:
            with lock:
                got.append(msg)

        self.subscribe(topics, keep)
        time.sleep(seconds)
        with lock:
            return list(got)

    def request(self, device: str, command: str, body: dict[str, Any], *, timeout: float) -> Any:
        """An MQTT 5 request/response: our own response topic, with correlation data."""
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        topics = Topics(device, prefix=self.prefix)
        corr = uuid.uuid4().bytes
        request_id = uuid.uuid4().hex[:12]
        body = {**body, "id": request_id}
        response = protocol.response_topic(uuid.uuid4().hex, prefix=self.prefix)
        answer: list[dict[str, Any]] = []
        got = threading.Event()

        def on_reply(msg: Any) -> None:
            props = getattr(msg, "properties", None)
            ours = msg.topic == response and getattr(props, "CorrelationData", None) == corr
            if not ours and msg.topic == topics.reply(command):
                # a device on MQTT 3.1.1 gets no response topic: it answers on the reply topic
                try:
                    ours = json.loads(msg.payload).get("id") == request_id
                except (ValueError, AttributeError):
                    ours = False
            if ours:
                answer.append(json.loads(msg.payload))
                got.set()

        self.subscribe([response, topics.reply(command)], on_reply)
        props = None
        if self.protocol == "5":
            props = Properties(PacketTypes.PUBLISH)
            props.ResponseTopic = response
            props.CorrelationData = corr
        self.publish(
            topics.command(command), protocol.dumps({**body, "schema": 1}), properties=props
        )
        if not got.wait(timeout):
            raise NoAnswer(f"{device}: no reply to {command} within {timeout:g} s (is it online?)")
        return answer[0]


# --- fleet view -------------------------------------------------------------------------------


def fleet_snapshot(client: Client, *, seconds: float) -> dict[str, dict[str, Any]]:
    """Every device's retained status, telemetry and reported state."""
    p = client.prefix
    msgs = client.collect([f"{p}/+/status", f"{p}/+/telemetry", f"{p}/+/reported"], seconds=seconds)
    fleet: dict[str, dict[str, Any]] = {}
    for msg in msgs:
        device = protocol.device_of(msg.topic, prefix=p)
        if device is None or not msg.payload:
            continue
        kind = msg.topic.rsplit("/", 1)[-1]
        try:
            fleet.setdefault(device, {})[kind] = json.loads(msg.payload)
        except ValueError:
            continue
    return fleet


def status_rows(fleet: dict[str, dict[str, Any]], *, now: float) -> list[dict[str, Any]]:
    rows = []
    for device in sorted(fleet):
        d = fleet[device]
        st, tel = d.get("status") or {}, d.get("telemetry") or {}
        model = tel.get("model") or st.get("model") or {}
        lat = ((tel.get("pipeline") or {}).get("latency_ms") or {}).get("inference") or {}
        last = max(float(st.get("ts") or 0), float(tel.get("ts") or 0))
        update = (d.get("reported") or {}).get("update") or {}
        rows.append(
            {
                "device": device,
                "online": st.get("state") == "online",
                "state": st.get("state", "?"),
                "model": f"{model.get('name', '?')} {model.get('version', '?')}",
                "fps": (tel.get("pipeline") or {}).get("fps"),
                "p95_ms": lat.get("p95"),
                "temp_c": (tel.get("system") or {}).get("cpu_temp_c"),
                "last_seen_s": round(now - last, 1) if last else None,
                "update": update.get("state"),
                "groups": st.get("groups", []),
            }
        )
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    cols = ("device", "state", "model", "fps", "p95_ms", "temp_c", "last_seen_s", "update")
    heads = ("device", "status", "model", "fps", "p95 ms", "temp °C", "last seen s", "update")

    lines = aligned(heads, [[cell(r[c]) for c in cols] for r in rows])
    online = sum(1 for r in rows if r["online"])
    lines.append(f"{len(rows)} devices, {online} online")
    return "\n".join(lines)


# --- bundles ----------------------------------------------------------------------------------


def bundle_identity(path: Path, public_keys: Sequence[str]) -> tuple[str, str, str, bytes]:
    """(sha256, name, version, bytes); verified first when keys are given."""
    from edge_agent.model.bundle import read_manifest_unverified, verify_bundle

    if not path.is_file():
        raise EdgeError(f"{path}: no such bundle")
    data = path.read_bytes()
    if public_keys:
        from edge_agent.model.keys import load_trusted_keys

        manifest = verify_bundle(path, trusted_keys=load_trusted_keys(list(public_keys))).manifest
    else:
        manifest = read_manifest_unverified(path)
    return hashlib.sha256(data).hexdigest(), str(manifest["name"]), str(manifest["version"]), data


def publish_bundle(
    client: Client, path: Path, *, chunk_size: int, public_keys: Sequence[str] = ()
) -> tuple[str, str, str]:
    """Retained, individually hashed chunks, then the meta message; waits for every PUBACK."""
    sha, name, version, data = bundle_identity(path, public_keys)
    chunks = protocol.split_chunks(data, chunk_size)
    infos = []
    for i, chunk in enumerate(chunks):
        topic = protocol.bundle_chunk_topic(sha, i, prefix=client.prefix)
        infos.append(client.publish(topic, chunk, retain=True))
    meta = protocol.bundle_meta_payload(
        sha256=sha,
        size=len(data),
        chunk_size=chunk_size,
        chunks=protocol.chunk_hashes(chunks),
        name=name,
        version=version,
    )
    infos.append(
        client.publish(
            protocol.bundle_meta_topic(sha, prefix=client.prefix), protocol.dumps(meta), retain=True
        )
    )
    deadline = time.monotonic() + 60 + len(data) / 1e6
    for info in infos:
        info.wait_for_publish(max(0.1, deadline - time.monotonic()))
        if not info.is_published():
            raise BrokerError("mqtt: the broker did not acknowledge every chunk in time")
    return sha, name, version


def set_desired(
    client: Client, desired: Desired, *, device: str | None = None, group: str | None = None
) -> str:
    if device:
        topic = Topics(device, prefix=client.prefix).desired
    else:
        assert group
        topic = protocol.group_desired_topic(group, prefix=client.prefix)
    client.publish(
        topic, protocol.dumps(desired.to_payload(ts=time.time())), retain=True
    ).wait_for_publish(10)
    return topic


# --- commands -----------------------------------------------------------------------------


def add_db_arguments(parser: Any) -> None:
    parser.add_argument(
        "--db", default=os.environ.get("EDGECTL_DB", ""), metavar="URL",
        help="the fleet database: a PostgreSQL URL without a password (default: $EDGECTL_DB)",
    )  # fmt: skip
    parser.add_argument(
        "--db-password-file", default="", metavar="FILE",
        help="its password (else libpq's PGPASSFILE / ~/.pgpass)",
    )  # fmt: skip


def _database(args: argparse.Namespace) -> Any:
    from edgectl.fleetdb import db

    return db.connect_checked(args.db, password_file=args.db_password_file)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Operate a fleet of edge agents over MQTT.",
        epilog="exit codes: 0 ok, 1 internal error, 2 bad input, 3 rollout aborted or update "
        "failed, 4 bundle failed verification, 5 broker refused or unreachable, 6 no answer, "
        "7 fleet database unreachable or newer",
    )
    parser.add_argument(
        "--broker", default="mqtt://127.0.0.1:1883", metavar="URL",
        help="mqtt://HOST[:PORT], or mqtts://HOST[:PORT] for TLS; no credentials in it "
        "(default: mqtt://127.0.0.1:1883)",
    )  # fmt: skip
    parser.add_argument(
        "--prefix", default=protocol.DEFAULT_PREFIX,
        help="the first topic level, as the devices' [mqtt] topic_prefix "
        f"(default: {protocol.DEFAULT_PREFIX})",
    )  # fmt: skip
    parser.add_argument("--username", help="the broker user (default: none, anonymous)")
    parser.add_argument(
        "--password-file",
        help="a file holding the password (never the password); needs --username (default: none)",
    )
    parser.add_argument(
        "--ca-file", metavar="FILE",
        help="CA certificate (PEM) that signed an mqtts:// broker's (default: the system's CAs)",
    )  # fmt: skip
    parser.add_argument(
        "--cert-file", metavar="FILE",
        help="client certificate (PEM) for mutual TLS, with --key-file (default: none)",
    )  # fmt: skip
    parser.add_argument(
        "--key-file", metavar="FILE",
        help="the client certificate's private key (PEM), with --cert-file (default: none)",
    )  # fmt: skip
    parser.add_argument(
        "--operator-key", metavar="FILE",
        help="sign every order with this operator key (default: $EDGECTL_OPERATOR_KEY)",
    )  # fmt: skip
    parser.add_argument(
        "--operator-key-passphrase-file", metavar="FILE",
        help="the encrypted operator key's passphrase (default: asked on the terminal)",
    )  # fmt: skip
    parser.add_argument(
        "--order-ttl", type=parse_duration, metavar="DURATION",
        help="signed orders expire after this (default: 1h desired states, 5m commands)",
    )  # fmt: skip
    parser.add_argument(
        "-v", "--verbose", action="store_true",
        help="debug logging and the traceback of an internal error (default: warnings only)",
    )  # fmt: skip
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("keygen", help="write an operator key pair (signs orders)")
    p.add_argument(
        "--out", type=Path, required=True, metavar="DIR",
        help="where edge-operator.key (private, 0600) and edge-operator.pub are written",
    )  # fmt: skip
    p.add_argument("--passphrase-file", metavar="FILE", help="encrypt the private key with this")
    p.add_argument("--force", action="store_true", help="overwrite an existing key pair")

    p = sub.add_parser("provision", help="broker credentials for a device (or operator, consumer)")
    p.add_argument("name", metavar="NAME", help="the device id (its MQTT username)")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="the provisioning dir")
    p.add_argument(
        "--role", choices=("device", "operator", "consumer"), default="device",
        help="device: its own topics; operator: gives orders, reads the fleet; consumer: reads "
        "results and telemetry (default: device)",
    )  # fmt: skip
    p.add_argument(
        "--group", action="append", default=[],
        help="a fleet group the device belongs to (repeatable; devices only; default: none)",
    )  # fmt: skip
    p.add_argument("--rotate", action="store_true", help="a new password for an existing user")
    p.add_argument("--cert", action="store_true",
                   help="a client certificate (CN = NAME) instead of a password")  # fmt: skip
    p.add_argument("--ca", type=Path, metavar="DIR", help="the CA (default: OUT/ca)")
    p.add_argument("--days", type=int, default=825, help="certificate validity (default 825)")

    p = sub.add_parser("ca", help="a small CA for the broker's mutual TLS")
    ca_sub = p.add_subparsers(dest="ca_command", metavar="ACTION")
    ca_sub.required = True
    q = ca_sub.add_parser("init", help="make the CA (ca.crt, ca.key)")
    q.add_argument("--out", type=Path, required=True, metavar="DIR",
                   help="where ca.crt and ca.key (0600) are written")  # fmt: skip
    q.add_argument("--name", default="edge fleet CA",
                   help="the CA's common name (default: edge fleet CA)")  # fmt: skip
    q.add_argument("--days", type=int, default=3650, help="validity (default 3650)")
    q = ca_sub.add_parser("server", help="the broker's certificate")
    q.add_argument("hosts", nargs="+", metavar="HOST", help="DNS names and IP addresses")
    q.add_argument("--out", type=Path, required=True, metavar="DIR",
                   help="where server.crt and server.key are written")  # fmt: skip
    q.add_argument("--ca", type=Path, required=True, metavar="DIR",
                   help="the CA's directory (edgectl ca init --out)")  # fmt: skip
    q.add_argument("--days", type=int, default=825, help="validity (default 825)")

    p = sub.add_parser("acl", help="print the broker ACL that fits the protocol")
    form = p.add_mutually_exclusive_group(required=True)
    form.add_argument("--mosquitto", action="store_true", help="a Mosquitto acl_file")
    form.add_argument("--dynsec", action="store_true",
                      help="Mosquitto's dynamic-security plugin JSON")  # fmt: skip
    p.add_argument("--devices-from", type=Path, metavar="DIR", help="every user provisioned there")
    p.add_argument("--device", action="append", default=[], help="a device id (repeatable)")
    p.add_argument("--group", action="append", default=[], metavar="DEVICE=GROUP",
                   help="a device's fleet group (repeatable)")  # fmt: skip
    p.add_argument("--operator-user", action="append", default=[], metavar="NAME",
                   help="an operator's broker user (repeatable)")  # fmt: skip
    p.add_argument("--consumer-user", action="append", default=[], metavar="NAME",
                   help="a consumer's broker user: reads results and telemetry "
                   "(repeatable)")  # fmt: skip
    p.add_argument("--admin-user", action="append", default=[], metavar="NAME",
                   help="--dynsec: an operator who may also run mosquitto_ctrl dynsec")  # fmt: skip

    p = sub.add_parser("publish", help="store a bundle on the broker as retained chunks")
    p.add_argument("bundle", type=Path, help="the .edgebundle")
    p.add_argument("--chunk-size", type=int, default=protocol.DEFAULT_CHUNK_SIZE, metavar="BYTES",
                   help=f"bytes per retained chunk on the broker "
                   f"(default: {protocol.DEFAULT_CHUNK_SIZE})")  # fmt: skip
    p.add_argument("--public-key", action="append", default=[], metavar="PUB|DIR",
                   help="verify the bundle's signature with this key (a .pub file or a directory "
                   "of them) first; repeatable (default: not verified here; devices always "
                   "verify)")  # fmt: skip

    p = sub.add_parser("deploy", help="publish a bundle and make it a device's or group's desired")
    p.add_argument("bundle", type=Path, help="the .edgebundle")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--device", metavar="ID", help="set this device's desired state")
    target.add_argument("--group", metavar="NAME",
                        help="set this group's desired state: every device that declares the "
                        "group follows it")  # fmt: skip
    p.add_argument("--url", help="devices fetch it from this HTTP(S) URL instead of the broker "
                   "(default: published on the broker)")  # fmt: skip
    p.add_argument("--chunk-size", type=int, default=protocol.DEFAULT_CHUNK_SIZE, metavar="BYTES",
                   help=f"bytes per retained chunk on the broker "
                   f"(default: {protocol.DEFAULT_CHUNK_SIZE})")  # fmt: skip
    p.add_argument("--public-key", action="append", default=[], metavar="PUB|DIR",
                   help="verify the bundle's signature with this key (a .pub file or a directory "
                   "of them) first; repeatable (default: not verified here; devices always "
                   "verify)")  # fmt: skip
    p.add_argument("--allow-downgrade", action="store_true",
                   help="let devices install a version below their anti-rollback floor (the "
                   "highest they ever committed) (default: refused there)")  # fmt: skip

    p = sub.add_parser("rollout", help="staged rollout to a group: canaries first, then waves")
    p.add_argument("bundle", type=Path, help="the .edgebundle")
    p.add_argument("--group", required=True, metavar="NAME",
                   help="the devices that declare this group")  # fmt: skip
    p.add_argument("--canary", type=parse_percent, default=10.0, metavar="PCT",
                   help="share of the group updated first, at least one device "
                   "(default: 10%%)")  # fmt: skip
    p.add_argument("--wait", type=parse_duration, default=120.0, metavar="DURATION",
                   help="how long each wave's devices have to commit (default: 2m)")  # fmt: skip
    p.add_argument("--max-failures", type=parse_percent, default=0.0, metavar="PCT",
                   help="abort, reverting every device touched, when more of a wave fails "
                   "(default: 0%%)")  # fmt: skip
    p.add_argument("--waves", type=int, default=2,
                   help="waves after the canaries (default: 2)")  # fmt: skip
    p.add_argument("--chunk-size", type=int, default=protocol.DEFAULT_CHUNK_SIZE, metavar="BYTES",
                   help=f"bytes per retained chunk on the broker "
                   f"(default: {protocol.DEFAULT_CHUNK_SIZE})")  # fmt: skip
    p.add_argument("--public-key", action="append", default=[], metavar="PUB|DIR",
                   help="verify the bundle's signature with this key (a .pub file or a directory "
                   "of them) first; repeatable (default: not verified here; devices always "
                   "verify)")  # fmt: skip
    p.add_argument("--discover", type=parse_duration, default=2.0, metavar="DURATION",
                   help="how long to gather retained status to find the group's devices "
                   "(default: 2s)")  # fmt: skip
    p.add_argument(
        "--require-shadow",
        type=parse_agreement,
        metavar="AGREEMENT",
        help="run the candidate in shadow on the canaries first; go on only when "
        "each one's agreement over --frames frames is at least this (0-1 or 95%%)",
    )
    p.add_argument(
        "--frames",
        type=parse_frames,
        default=protocol.DEFAULT_SHADOW_FRAMES,
        help="frames each canary's shadow compares (with --require-shadow; default: "
        f"{protocol.DEFAULT_SHADOW_FRAMES})",
    )
    p.add_argument("--shadow-timeout", type=parse_duration, default=300.0, metavar="DURATION",
                   help="longest wait for the canaries' shadow frames (default: 5m)")  # fmt: skip

    p = sub.add_parser(
        "shadow", help="run a candidate bundle in shadow beside the serving model (never served)"
    )
    p.add_argument("bundle", type=Path, nargs="?", help="the candidate (not with --status/--stop)")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--device", metavar="ID",
                        help="this device (with --status: only this one)")  # fmt: skip
    target.add_argument("--group", metavar="NAME",
                        help="this group's devices (with --status: only these)")  # fmt: skip
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--status", action="store_true", help="a table of the devices' shadows")
    mode.add_argument("--stop", action="store_true", help="end the shadow (it is unloaded)")
    p.add_argument(
        "--frames",
        type=parse_frames,
        default=protocol.DEFAULT_SHADOW_FRAMES,
        help="frames to compare (shadow_completed when reached; it goes on after; default: "
        f"{protocol.DEFAULT_SHADOW_FRAMES})",
    )
    p.add_argument("--url", help="devices fetch it from this HTTP(S) URL instead of the broker "
                   "(default: published on the broker)")  # fmt: skip
    p.add_argument("--chunk-size", type=int, default=protocol.DEFAULT_CHUNK_SIZE, metavar="BYTES",
                   help=f"bytes per retained chunk on the broker "
                   f"(default: {protocol.DEFAULT_CHUNK_SIZE})")  # fmt: skip
    p.add_argument("--public-key", action="append", default=[], metavar="PUB|DIR",
                   help="verify the bundle's signature with this key (a .pub file or a directory "
                   "of them) first; repeatable (default: not verified here; devices always "
                   "verify)")  # fmt: skip
    p.add_argument(
        "--timeout",
        type=parse_duration,
        default=1.5,
        metavar="DURATION",
        help="--status: how long to gather retained telemetry (default: 1.5s)",
    )
    p.add_argument("--json", action="store_true", help="--status as JSON")  # fmt: skip

    p = sub.add_parser("rollback", help="return a device or group to its previous model")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--device", metavar="ID", help="this device")
    target.add_argument("--group", metavar="NAME",
                        help="every device that declares this group (found from retained "
                        "status)")  # fmt: skip
    p.add_argument("--version", help="the version to return to (default: the previous one)")
    p.add_argument("--timeout", type=parse_duration, default=10.0, metavar="DURATION",
                   help="how long to wait for each device's answer (default: 10s)")  # fmt: skip

    p = sub.add_parser("ping", help="ask a device to answer")
    p.add_argument("device", help="the device id")
    p.add_argument("--timeout", type=parse_duration, default=5.0, metavar="DURATION",
                   help="how long to wait for the answer (default: 5s)")  # fmt: skip

    p = sub.add_parser("status", help="the fleet table from retained status and telemetry")
    p.add_argument("--timeout", type=parse_duration, default=1.5, metavar="DURATION",
                   help="how long to gather retained status and telemetry; not with --db "
                   "(default: 1.5s)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="the rows as JSON (default: a table)")
    add_db_arguments(p)

    p = sub.add_parser("watch", help="telemetry and events, live")
    p.add_argument("device", nargs="?", help="only this device (default: every device)")
    p.add_argument("--count", type=int, default=0, help="stop after N messages (0 = never)")
    p.add_argument("--share", help="MQTT 5 shared subscription group")

    p = sub.add_parser("export", help="telemetry as JSON lines or CSV")
    p.add_argument("--format", choices=("jsonl", "csv"), default="jsonl",
                   help="JSON lines or CSV (default: jsonl)")  # fmt: skip
    p.add_argument("--duration", type=parse_duration, default=0.0, help="0 = until interrupted")
    p.add_argument("--share", help="MQTT 5 shared subscription group")
    p.add_argument("-o", "--output", type=Path, metavar="FILE",
                   help="write here (default: standard output)")  # fmt: skip
    add_db_arguments(p)
    p.add_argument("--since", help="with --db: from (30m, 2h, 7d, a Unix time, an ISO date)")
    p.add_argument("--until", help="with --db: until (the same forms; default now)")
    p.add_argument("--device", help="with --db: this device only")

    p = sub.add_parser("history", help="one device's telemetry over time, from the database")
    p.add_argument("device", help="the device id")
    add_db_arguments(p)
    p.add_argument("--since", default="24h", help="from: 30m, 2h, 7d, a Unix time or an ISO "
                   "date, UTC (default 24h)")  # fmt: skip
    p.add_argument("--until", help="until (the same forms; default now)")
    p.add_argument("--metric", default=",".join(DEFAULT_HISTORY_METRICS),
                   help=f"comma-separated: {', '.join(HISTORY_METRICS)} "
                   f"(default: {','.join(DEFAULT_HISTORY_METRICS)})")  # fmt: skip
    p.add_argument("--format", choices=FORMATS, default="table",
                   help="a table, JSON or CSV (default: table)")  # fmt: skip
    p.add_argument("--limit", type=int, default=100_000,
                   help="at most this many rows (default: 100000)")  # fmt: skip

    p = sub.add_parser(
        "collect",
        help="samples from the field into a dataset folder; `collect fleet`: the fleet's "
        "streams into PostgreSQL",
    )
    p.add_argument("what", nargs="?", choices=("samples", "fleet"), default="samples",
                   help="samples (the default): --out DIR; fleet: --db URL")  # fmt: skip
    p.add_argument("--out", type=Path, help="samples: the dataset folder (created)")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--device", metavar="ID",
                        help="samples: only this device's (default: every device's)")  # fmt: skip
    target.add_argument("--group", metavar="NAME",
                        help="samples: only the devices that declare this group")  # fmt: skip
    p.add_argument("--since", help="captured since: 2h, 7d, a Unix time or 2026-12-01T10:30 (UTC)")
    p.add_argument("--duration", type=parse_duration, default=0.0, help="0 = until interrupted")
    p.add_argument("--idle", type=parse_duration, default=0.0,
                   help="stop after this long without a new sample, or message with fleet "
                   "(0 = never; fleet --retire: 2s)")  # fmt: skip
    p.add_argument("--keep", action="store_true", help="leave collected samples on the broker")
    p.add_argument("--discover", type=parse_duration, default=2.0, metavar="DURATION",
                   help="with --group: how long to gather retained status to find its devices "
                   "(default: 2s)")  # fmt: skip
    fleet = p.add_argument_group("collect fleet (the streams into PostgreSQL)")
    add_db_arguments(fleet)
    fleet.add_argument("--share-group", default="edge-collectors", metavar="G",
                       help="MQTT 5 shared-subscription group: collectors in one group "
                       "split the fleet (default: edge-collectors)")  # fmt: skip
    fleet.add_argument("--client-id", default="", metavar="ID",
                       help="this collector's MQTT session (stable, one per collector; default "
                       "edgectl-collect-G-HOSTNAME)")  # fmt: skip
    fleet.add_argument("--results", action="store_true", help="keep every result too")
    fleet.add_argument("--retire", action="store_true",
                       help="store what waits in this --client-id's session, then end the "
                       "session: the share group no longer gives it a share")  # fmt: skip
    fleet.add_argument("--prometheus", type=int, default=0, metavar="PORT",
                       help="serve fleet gauges and the collector's counters on "
                       "127.0.0.1:PORT")  # fmt: skip
    fleet.add_argument("--batch-rows", type=int, default=1000, metavar="N",
                       help="most rows written to the database at once, 1-100000 "
                       "(default: 1000)")  # fmt: skip
    fleet.add_argument("--batch-ms", type=float, default=200.0, metavar="MS",
                       help="how long a batch gathers rows after its first, in ms "
                       "(default: 200)")  # fmt: skip
    fleet.add_argument("--retention-days", type=float, default=0.0, metavar="DAYS",
                       help="delete rows older than this, by the device's time: a TimescaleDB "
                       "retention policy, or hourly batched deletes on plain tables "
                       "(0 = keep everything)")  # fmt: skip

    p = sub.add_parser(
        "simulate", help="simulated devices on the broker (size a broker, a database)"
    )
    p.add_argument("--devices", type=int, required=True, metavar="N",
                   help="how many simulated devices, >= 1")  # fmt: skip
    p.add_argument("--rate", type=float, default=0.2, metavar="HZ",
                   help="telemetry messages a second per device (default: 0.2)")  # fmt: skip
    p.add_argument(
        "--count", type=int, default=0, help="telemetry messages per device (0: --duration)"
    )
    p.add_argument("--duration", type=parse_duration, default=0.0, help="0 = until interrupted")
    p.add_argument(
        "--events-every",
        type=int,
        default=5,
        metavar="K",
        help="an event every K telemetry (default: 5)",
    )
    p.add_argument(
        "--results-every", type=int, default=0, metavar="K", help="a result every K (0: none)"
    )
    p.add_argument("--connections", type=int, default=4,
                   help="MQTT connections the devices are spread over (default: 4)")  # fmt: skip
    p.add_argument("--stem", default="sim",
                   help="device ids: STEM-0000, STEM-0001, … (default: sim)")  # fmt: skip
    p.add_argument("--first", type=int, default=0,
                   help="the first device's number (default: 0)")  # fmt: skip

    p = sub.add_parser("capture", help="switch a device's sample capture off (privacy) or on")
    p.add_argument("--device", required=True, metavar="ID", help="the device")
    switch = p.add_mutually_exclusive_group(required=True)
    switch.add_argument("--off", action="store_true", help="stop capturing at once")
    switch.add_argument("--on", action="store_true", help="capture again (per its [capture])")
    p.add_argument("--purge", action="store_true", help="with --off: delete samples not sent yet")
    p.add_argument("--timeout", type=parse_duration, default=5.0, metavar="DURATION",
                   help="how long to wait for the device's answer (default: 5s)")  # fmt: skip
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, stream=sys.stderr)
    try:
        return COMMANDS[args.command](args)
    except (RolloutAborted, NoAnswer) as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return edgectl_exit_code(exc)
    except EdgeError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return edgectl_exit_code(exc)
    except KeyboardInterrupt:
        return CtlExit.OK
    except Exception as exc:
        if args.verbose:
            raise
        print(f"{PROG}: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return CtlExit.INTERNAL


def cmd_keygen(args: argparse.Namespace) -> int:
    from edge_agent.common.secrets import read_secret
    from edge_agent.model.keys import OPERATOR_KEY_STEM, generate_keypair, key_id, load_public_key

    passphrase = (
        read_secret(args.passphrase_file, what="--passphrase-file").encode()
        if args.passphrase_file
        else None
    )
    private, public = generate_keypair(
        args.out, overwrite=args.force, stem=OPERATOR_KEY_STEM, passphrase=passphrase
    )
    print(f"wrote {private} (private{', encrypted' if passphrase else ''}, mode 0600: "
          "keep it with the operator: edgectl --operator-key)")  # fmt: skip
    print(f"wrote {public} (public: list it in the devices' [fleet] operator_keys)")
    print(f"key id {key_id(load_public_key(public))}")
    return CtlExit.OK


def cmd_provision(args: argparse.Namespace) -> int:
    from edgectl.ca import load_ca
    from edgectl.provision import User, provision

    user = User(name=args.name, role=args.role, groups=tuple(args.group))
    if args.ca and not args.cert:
        raise EdgeError("--ca DIR without --cert: a CA only issues certificates")
    ca = load_ca(args.ca or args.out / "ca") if args.cert else None
    home, written = provision(args.out, user, prefix=args.prefix, rotate=args.rotate, cert=ca,
                              broker=args.broker, days=args.days)  # fmt: skip
    for path in written:
        print(f"wrote {path}")
    broker = "a TLS listener (edgectl ca server)" if ca else f"{args.out}/passwd"
    print(f"{user.role} {user.name}: copy {home}/ to it; give the broker {broker} and "
          f"the ACL (edgectl acl --mosquitto --devices-from {args.out})")  # fmt: skip
    return CtlExit.OK


def cmd_ca(args: argparse.Namespace) -> int:
    from edgectl.ca import init_ca, issue_server, load_ca, mosquitto_listener

    if args.ca_command == "init":
        written = init_ca(args.out, name=args.name, days=args.days)
    else:
        written = issue_server(load_ca(args.ca), args.hosts, args.out, days=args.days)
    for path in written:
        print(f"wrote {path}")
    if args.ca_command == "init":
        print(f"keep {args.out}/ca.key with the operator; devices and the broker get ca.crt")
    else:
        print("# mosquitto.conf: a listener that takes device certificates only")
        print(mosquitto_listener(args.out), end="")
    return CtlExit.OK


def cmd_acl(args: argparse.Namespace) -> int:
    from edgectl.acl import mosquitto_acl, users_from

    users = users_from(
        devices_from=args.devices_from,
        devices=args.device,
        groups=args.group,
        operators=args.operator_user,
        consumers=args.consumer_user,
    )
    if args.admin_user and not args.dynsec:
        raise EdgeError("--admin-user: only with --dynsec (an acl_file has no admin topics)")
    if args.dynsec:
        from edgectl.acl import dynsec_config

        text = dynsec_config(users, prefix=args.prefix, provisioned=args.devices_from,
                             admins=args.admin_user)  # fmt: skip
        sys.stdout.write(text)
    else:
        sys.stdout.write(mosquitto_acl(users, prefix=args.prefix))
    return CtlExit.OK


def cmd_publish(args: argparse.Namespace) -> int:
    if args.chunk_size < 1024:
        raise EdgeError(f"--chunk-size {args.chunk_size}: must be at least 1024 bytes")
    with Client(args) as client:
        t0 = time.monotonic()
        sha, name, version = publish_bundle(
            client, args.bundle, chunk_size=args.chunk_size, public_keys=args.public_key
        )
        size = args.bundle.stat().st_size
        print(
            f"published {name} {version}: sha256 {sha}, {size} bytes in "
            f"{math.ceil(size / args.chunk_size)} chunks, {time.monotonic() - t0:.2f} s"
        )
    return CtlExit.OK


def cmd_deploy(args: argparse.Namespace) -> int:
    with Client(args) as client:
        if args.url:
            sha, name, version, _ = bundle_identity(args.bundle, args.public_key)
        else:
            sha, name, version = publish_bundle(
                client, args.bundle, chunk_size=args.chunk_size, public_keys=args.public_key
            )
        desired = Desired(
            sha256=sha,
            name=name,
            version=version,
            url=args.url or "",
            allow_downgrade=args.allow_downgrade,
            deployment=f"deploy-{uuid.uuid4().hex[:12]}",
        )
        topic = set_desired(client, desired, device=args.device, group=args.group)
        print(f"desired {name} {version} ({sha[:12]}) on {topic}")
    return CtlExit.OK


def _wait_for(
    client: Client, devices: Sequence[str], sha: str, deployment: str, *, timeout: float
) -> dict[str, str]:
    """Each device's outcome for this deployment: committed, failed, rolled_back or timeout."""
    outcome: dict[str, str] = {}
    lock = threading.Lock()
    wanted = set(devices)

    def on_reported(msg: Any) -> None:
        device = protocol.device_of(msg.topic, prefix=client.prefix)
        if device not in wanted or not msg.payload:
            return
        try:
            rep = json.loads(msg.payload)
        except ValueError:
            return
        update = rep.get("update") or {}
        if rep.get("bundle_sha256") == sha and device not in outcome:
            with lock:  # already running it (a rollout run again): nothing to do, not a failure
                outcome[device] = "committed"
            return
        if update.get("sha256") != sha or update.get("deployment") != deployment:
            return
        if update.get("state") in ("committed", "failed", "rolled_back"):
            with lock:
                outcome[device] = str(update["state"])

    client.subscribe([f"{client.prefix}/{d}/reported" for d in devices], on_reported)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with lock:
            if len(outcome) == len(wanted):
                break
        time.sleep(0.1)
    with lock:
        return {d: outcome.get(d, "timeout") for d in devices}


def cmd_rollout(args: argparse.Namespace) -> int:
    with Client(args) as client:
        fleet = fleet_snapshot(client, seconds=args.discover)
        members = sorted(
            d
            for d, v in fleet.items()
            if args.group in ((v.get("status") or {}).get("groups") or [])
        )
        if not members:
            raise EdgeError(f"group {args.group!r}: no device declares it (edgectl status)")
        previous = {d: (fleet[d].get("reported") or {}).get("bundle_sha256") for d in members}
        sha, name, version = publish_bundle(
            client, args.bundle, chunk_size=args.chunk_size, public_keys=args.public_key
        )
        deployment = f"rollout-{uuid.uuid4().hex[:12]}"
        desired = Desired(sha256=sha, name=name, version=version, deployment=deployment)
        n_canary = max(1, math.ceil(len(members) * args.canary / 100))
        rest = members[n_canary:]
        waves = [members[:n_canary]]
        if args.require_shadow is not None:
            _shadow_gate(client, args, waves[0], previous, sha, name, version, deployment)
        per_wave = max(1, math.ceil(len(rest) / max(args.waves, 1))) if rest else 0
        waves += (
            [rest[i : i + per_wave] for i in range(0, len(rest), per_wave or 1)] if rest else []
        )
        done: list[str] = []
        report: dict[str, str] = {}
        for number, wave in enumerate(waves):
            label = "canaries" if number == 0 else f"wave {number}"
            print(f"{label}: {', '.join(wave)}", flush=True)
            for device in wave:
                set_desired(client, desired, device=device)
            outcome = _wait_for(client, wave, sha, deployment, timeout=args.wait)
            report.update(outcome)
            done += wave
            failed = [d for d, o in outcome.items() if o != "committed"]
            pct = 100.0 * len(failed) / len(wave)
            print(
                f"{label}: {len(wave) - len(failed)} committed, {len(failed)} failed "
                f"({', '.join(f'{d}: {outcome[d]}' for d in failed) or 'none'})",
                flush=True,
            )
            if pct > args.max_failures:
                for device in done:  # revert everyone this rollout touched
                    old = previous.get(device)
                    if old:
                        back = Desired(
                            sha256=old,
                            allow_downgrade=True,
                            deployment=f"revert-{deployment}",
                        )
                        set_desired(client, back, device=device)
                    else:  # it ran no bundle we know: withdraw the wish instead
                        clear_desired(client, device)
                raise RolloutAborted(
                    f"rollout of {name} {version} aborted at {label}: {pct:.0f}% failed "
                    f"(limit {args.max_failures:g}%); {len(done)} devices reverted"
                )
        set_desired(client, desired, group=args.group)  # devices that join later follow it
        for device in done:  # a device's own desired would shadow later group deploys
            clear_desired(client, device)
        print(f"rollout of {name} {version} to {args.group}: {len(done)} devices committed")
    return CtlExit.OK


def _shadow_gate(
    client: Client,
    args: argparse.Namespace,
    canaries: list[str],
    previous: dict[str, Any],
    sha: str,
    name: str,
    version: str,
    deployment: str,
) -> None:
    """``rollout --require-shadow``: the candidate in shadow on the canaries (beside what they
    serve), until each compared ``--frames`` frames; their own desired states are then put back
    as they were. RolloutAborted (one line, exit 3) unless every canary's agreement holds."""
    from edgectl.shadow import desired_topic, retained, wait_for_shadows

    missing = [d for d in canaries if not previous.get(d)]
    if missing:
        raise EdgeError(
            f"--require-shadow: {', '.join(missing)} report no bundle they run (OTA off?): a "
            "shadow runs beside a bundle the device follows"
        )
    topics = {d: desired_topic(client.prefix, device=d, group=None) for d in canaries}
    saved = retained(client, list(topics.values()))
    spec = ShadowSpec(sha256=sha, name=name, version=version, frames=args.frames,
                      deployment=deployment)  # fmt: skip
    for d in canaries:
        own = saved.get(topics[d])
        base = (
            Desired.from_payload(protocol.loads(own, what=topics[d], limit=1 << 20))
            if own is not None
            else Desired(sha256=str(previous[d]), deployment=f"shadow-{deployment}")
        )
        set_desired(client, dataclasses.replace(base, shadow=spec), device=d)
    print(f"shadow on canaries: {', '.join(canaries)} ({args.frames} frames each)", flush=True)
    try:
        outcome = wait_for_shadows(
            client, canaries, sha, frames=args.frames, timeout=args.shadow_timeout
        )
    finally:
        for d in canaries:  # back as they were: the shadow stops and is unloaded
            own = saved.get(topics[d])
            client.publish(
                topics[d], own if own is not None else b"", retain=True
            ).wait_for_publish(10)
    problems = []
    for d in canaries:
        o = outcome[d]
        if o.state == "failed":
            problems.append(f"{d}: the shadow failed ({o.reason})")
        elif o.state == "timeout":
            problems.append(
                f"{d}: compared {o.frames} of {args.frames} frames in {args.shadow_timeout:g} s"
            )
        elif o.agreement is None or o.agreement < args.require_shadow:
            problems.append(
                f"{d}: agreement {o.agreement if o.agreement is not None else float('nan'):.3f} "
                f"< {args.require_shadow:g} over {o.frames} frames"
            )
    if problems:
        raise RolloutAborted(
            f"rollout of {name} {version} aborted in shadow, nothing served from it: "
            + "; ".join(problems)
        )
    print(
        "shadow on canaries: "
        + ", ".join(
            f"{d} agreement {outcome[d].agreement:.3f} over {outcome[d].frames} frames"
            + (f" (latency x{outcome[d].latency_ratio:g})" if outcome[d].latency_ratio else "")
            for d in canaries
        ),
        flush=True,
    )


def cmd_shadow(args: argparse.Namespace) -> int:
    from edgectl.shadow import (
        format_shadow_table,
        new_deployment,
        shadow_rows,
        with_shadow,
        without_shadow,
    )

    if args.status or args.stop:
        if args.bundle is not None:
            raise EdgeError(f"shadow: no BUNDLE with --{'status' if args.status else 'stop'}")
    elif args.bundle is None:
        raise EdgeError("shadow: name a BUNDLE (or --status, or --stop)")
    if not args.status and not (args.device or args.group):
        raise EdgeError("shadow: --device ID or --group NAME is required")
    with Client(args) as client:
        if args.status:
            fleet = fleet_snapshot(client, seconds=args.timeout)
            if args.device:
                fleet = {d: v for d, v in fleet.items() if d == args.device}
            elif args.group:
                fleet = {
                    d: v for d, v in fleet.items()
                    if args.group in ((v.get("status") or {}).get("groups") or [])
                }  # fmt: skip
            rows = shadow_rows(fleet)
            print(json.dumps(rows, indent=2) if args.json else format_shadow_table(rows))
            return CtlExit.OK
        if args.stop:
            print(without_shadow(client, device=args.device, group=args.group))
            return CtlExit.OK
        bundle = args.bundle
        if bundle is None:  # checked above; for the type checker
            raise EdgeError("shadow: name a BUNDLE")
        if args.url:
            sha, name, version, _ = bundle_identity(bundle, args.public_key)
        else:
            sha, name, version = publish_bundle(
                client, bundle, chunk_size=args.chunk_size, public_keys=args.public_key
            )
        spec = ShadowSpec(
            sha256=sha, name=name, version=version, url=args.url or "", frames=args.frames,
            deployment=f"shadow-{new_deployment()}",
        )  # fmt: skip
        topic, desired = with_shadow(client, spec, device=args.device, group=args.group)
        client.publish(
            topic, protocol.dumps(desired.to_payload(ts=time.time())), retain=True
        ).wait_for_publish(10)
        print(f"shadow {name} {version} ({sha[:12]}) beside {desired.sha256[:12]} on {topic}")
    return CtlExit.OK


def clear_desired(client: Client, device: str) -> None:
    """Remove a device's own retained desired state (it then follows its groups')."""
    topic = Topics(device, prefix=client.prefix).desired
    client.publish(topic, b"", retain=True).wait_for_publish(10)


def cmd_rollback(args: argparse.Namespace) -> int:
    with Client(args) as client:
        if args.device:
            devices = [args.device]
        else:
            fleet = fleet_snapshot(client, seconds=1.5)
            devices = sorted(
                d
                for d, v in fleet.items()
                if args.group in ((v.get("status") or {}).get("groups") or [])
            )
            if not devices:
                raise EdgeError(f"group {args.group!r}: no device declares it")
        failures = 0
        for device in devices:
            body: dict[str, Any] = {"id": uuid.uuid4().hex[:8]}
            if args.version:
                body["version"] = args.version
            try:
                reply = client.request(device, "rollback", body, timeout=args.timeout)
            except NoAnswer as exc:  # one offline device must not stop the others
                failures += 1
                print(f"{device}: {exc}", file=sys.stderr)
                continue
            if reply.get("ok"):
                result = reply.get("result") or {}
                print(f"{device}: rolling back to {result.get('version')}")
                # and make it the desired state, so the device does not update back
                desired = Desired(
                    sha256=str(result["sha256"]),
                    version=str(result.get("version") or ""),
                    allow_downgrade=True,
                    deployment=f"rollback-{uuid.uuid4().hex[:12]}",
                )
                set_desired(client, desired, device=device)
            else:
                failures += 1
                print(f"{device}: {reply.get('error')}", file=sys.stderr)
    return CtlExit.FAILED if failures else CtlExit.OK


def cmd_ping(args: argparse.Namespace) -> int:
    with Client(args) as client:
        t0 = time.monotonic()
        reply = client.request(args.device, "ping", {"id": "ping"}, timeout=args.timeout)
        print(json.dumps({**reply, "rtt_ms": round((time.monotonic() - t0) * 1000, 2)}))
    return CtlExit.OK if reply.get("ok") else CtlExit.FAILED


def cmd_status(args: argparse.Namespace) -> int:
    if args.db:  # the fleet database, as the collector keeps it
        from edgectl.fleetdb.queries import fleet_latest

        with _database(args) as conn:
            rows = status_rows(fleet_latest(conn), now=time.time())
    else:
        with Client(args) as client:
            rows = status_rows(fleet_snapshot(client, seconds=args.timeout), now=time.time())
    print(json.dumps(rows, indent=2) if args.json else format_table(rows))
    return CtlExit.OK


def _telemetry_topics(args: argparse.Namespace, device: str | None) -> list[str]:
    if device:
        t = Topics(device, prefix=args.prefix)
        return [t.telemetry, t.events]
    return [
        protocol.fleet_topic("telemetry", prefix=args.prefix, share=args.share),
        protocol.fleet_topic("events", prefix=args.prefix, share=args.share),
    ]


def cmd_watch(args: argparse.Namespace) -> int:
    seen = threading.Semaphore(0)
    with Client(args) as client:

        def show(msg: Any) -> None:
            try:
                data = json.loads(msg.payload)
            except ValueError:
                return
            device = protocol.device_of(msg.topic, prefix=args.prefix) or "?"
            if msg.topic.endswith("/events"):
                line = f"{device} event {data.get('kind')}" + (
                    f": {data.get('reason')}" if data.get("reason") else ""
                )
            else:
                p = data.get("pipeline") or {}
                inf = (p.get("latency_ms") or {}).get("inference") or {}
                sysm = data.get("system") or {}
                model = data.get("model") or {}
                line = (
                    f"{device} {model.get('name')} {model.get('version')}: {p.get('fps')} fps, "
                    f"inference p50 {inf.get('p50')} p95 {inf.get('p95')} ms, dropped "
                    f"{p.get('dropped')}, cpu {sysm.get('cpu_percent')}%, temp "
                    f"{sysm.get('cpu_temp_c')} °C, spool {data.get('spool_depth')}"
                )
            print(line, flush=True)
            seen.release()

        client.subscribe(_telemetry_topics(args, args.device), show)
        count = 0
        while args.count == 0 or count < args.count:
            seen.acquire()
            count += 1
    return CtlExit.OK


def cmd_export(args: argparse.Namespace) -> int:
    if not args.db and (args.since or args.until or args.device):
        raise EdgeError("export: --since, --until and --device read the fleet database: add --db")
    if args.db:
        from edgectl.fleetdb.queries import telemetry_payloads

        since, until = time_range(args.since, args.until, since_default=None)
        conn = _database(args)
        conn.autocommit = False  # a server-side cursor lives in a transaction
    out: IO[str] = (
        args.output.open("w", encoding="utf-8", newline="") if args.output else sys.stdout
    )
    write_one = telemetry_writer(out, args.format)
    try:
        if args.db:  # the history the collector kept
            try:
                for data in telemetry_payloads(conn, since=since, until=until, device=args.device):
                    write_one(data)
            finally:
                conn.close()
            return CtlExit.OK
        lock = threading.Lock()
        seen: set[tuple[str, int]] = set()
        with Client(args) as client:

            def write(msg: Any) -> None:
                try:
                    data = json.loads(msg.payload)
                except ValueError:
                    return
                key = (str(data.get("device")), int(data.get("seq") or -1))
                with lock:
                    if key in seen:  # at-least-once delivery: drop duplicates by seq
                        return
                    seen.add(key)
                    write_one(data)
                    out.flush()

            client.subscribe(
                [protocol.fleet_topic("telemetry", prefix=args.prefix, share=args.share)], write
            )
            deadline = time.monotonic() + args.duration if args.duration else None
            while deadline is None or time.monotonic() < deadline:
                time.sleep(0.1)
    finally:
        if args.output:
            out.close()
    return CtlExit.OK


def cmd_history(args: argparse.Namespace) -> int:
    from edgectl.fleetdb.queries import history, parse_metrics
    from edgectl.tables import write_rows

    metrics = parse_metrics(args.metric)
    protocol.check_name(args.device)
    since, until = time_range(args.since, args.until, since_default="24h")
    with _database(args) as conn:
        rows = history(conn, args.device, since=since, until=until, metrics=metrics,
                       limit=args.limit)  # fmt: skip
    write_rows(rows, ["time", "seq", *metrics], fmt=args.format, out=sys.stdout)
    return CtlExit.OK


def cmd_collect_fleet(args: argparse.Namespace) -> int:
    from edgectl.collector import CollectorSettings, FleetCollector, summary_line

    if args.out or args.device or args.group or args.since or args.keep:
        raise EdgeError("collect fleet: --out, --device, --group, --since and --keep "
                        "are for samples (edgectl collect --out DIR)")  # fmt: skip
    if not args.db:
        raise EdgeError("collect fleet: --db URL is required (or $EDGECTL_DB)")
    if args.retire and not args.client_id:
        raise EdgeError("collect fleet --retire: name the collector to retire with --client-id")
    try:
        settings = CollectorSettings(
            db=args.db, db_password_file=args.db_password_file, share_group=args.share_group,
            client_id=args.client_id, results=args.results, prefix=args.prefix,
            prometheus_port=args.prometheus, batch_rows=args.batch_rows,
            batch_ms=args.batch_ms, retention_days=args.retention_days, duration=args.duration,
            retire=args.retire, idle_s=args.idle,
        )  # fmt: skip
    except ValueError as exc:
        raise EdgeError(str(exc)) from None
    collector = FleetCollector(settings, broker_settings(args))
    totals = collector.run(ready=lambda line: print(f"{PROG}: {line}", file=sys.stderr, flush=True))
    print(summary_line(totals), flush=True)
    return CtlExit.OK


def cmd_simulate(args: argparse.Namespace) -> int:
    from edgectl.simulate import Simulator, device_names

    if args.devices < 1:
        raise EdgeError(f"--devices {args.devices}: must be at least 1")
    settings = broker_settings(args)
    plaintext = settings.plaintext_warning(orders=False)  # credentials only, as Client says
    if plaintext:
        log.warning("%s", plaintext)
    sim = Simulator(
        settings, device_names(args.devices, start=args.first, stem=args.stem),
        rate=args.rate, count=args.count, events_every=args.events_every,
        results_every=args.results_every, connections=args.connections, prefix=args.prefix,
        client_id=f"edgectl-simulate-{uuid.uuid4().hex[:8]}",
    )  # fmt: skip
    t0 = time.monotonic()
    with sim:
        sim.run_for(args.duration)
    stats = {**sim.stats(), "seconds": round(time.monotonic() - t0, 2)}
    print(json.dumps(stats), flush=True)
    return CtlExit.OK


def cmd_collect(args: argparse.Namespace) -> int:
    if args.what == "fleet":
        return cmd_collect_fleet(args)
    from edgectl.collect import DatasetFolder, SampleAssembler, collect
    from edgectl.when import parse_since

    if args.out is None:
        raise EdgeError("collect: --out DIR is required (samples), or `collect fleet --db URL`")
    if args.db:
        raise EdgeError("collect: --db is for `collect fleet`")
    since = parse_since(args.since) if args.since else None
    folder = DatasetFolder(args.out)
    with Client(args) as client:
        p = client.prefix
        devices: list[str] | None = None
        if args.group:
            fleet = fleet_snapshot(client, seconds=args.discover)
            devices = sorted(
                d for d, v in fleet.items()
                if args.group in ((v.get("status") or {}).get("groups") or [])
            )  # fmt: skip
            if not devices:
                raise EdgeError(f"group {args.group!r}: no device declares it (edgectl status)")
        elif args.device:
            devices = [protocol.check_name(args.device)]
        topics = [Topics(d, prefix=p).samples for d in devices] if devices else [f"{p}/+/samples/#"]
        assembler = SampleAssembler(folder, prefix=p, since=since, devices=devices)
        clear = None if args.keep else (lambda t: client.publish(t, b"", retain=True))
        stats = collect(
            subscribe=client.subscribe, clear=clear, assembler=assembler, topics=topics,
            duration=args.duration, idle=args.idle,
        )  # fmt: skip
        time.sleep(0.2)  # let the last clears leave before disconnecting
    print(
        f"{stats.written} samples written to {args.out}, {stats.duplicates} already there, "
        f"{stats.older} older than --since left on the broker, {stats.bad} failed their check, "
        f"{assembler.incomplete()} incomplete"
    )
    return CtlExit.OK


def cmd_capture(args: argparse.Namespace) -> int:
    body = {"enabled": bool(args.on), "purge": bool(args.purge)}
    with Client(args) as client:
        reply = client.request(args.device, "capture", body, timeout=args.timeout)
    if not reply.get("ok"):
        print(f"{args.device}: {reply.get('error')}", file=sys.stderr)
        return CtlExit.FAILED
    print(json.dumps(reply.get("result")))
    return CtlExit.OK


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "keygen": cmd_keygen,
    "provision": cmd_provision,
    "ca": cmd_ca,
    "acl": cmd_acl,
    "publish": cmd_publish,
    "deploy": cmd_deploy,
    "rollout": cmd_rollout,
    "rollback": cmd_rollback,
    "ping": cmd_ping,
    "status": cmd_status,
    "watch": cmd_watch,
    "export": cmd_export,
    "collect": cmd_collect,
    "history": cmd_history,
    "simulate": cmd_simulate,
    "capture": cmd_capture,
    "shadow": cmd_shadow,
}


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
