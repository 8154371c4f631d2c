"""The MQTT transport: one connection to the broker, owned by one network thread.

paho-mqtt 2.x, MQTT 5 with a fallback to 3.1.1 (``protocol = "auto"``), TLS (CA, client
certificate and key), a username with its password read from a file (systemd ``LoadCredential``
puts it in ``$CREDENTIALS_DIRECTORY``; a bare file name is looked up there), keepalive, and
reconnection with exponential backoff and full jitter.

Delivery through outages is ours, not paho's (paho 2.2 fails a QoS 1 publish made while
disconnected, and re-sends its own in-flight messages on reconnect). So:

- Everything that must arrive (results, telemetry, events) goes into the on-disk
  :class:`~edge_agent.fleet.spool.Spool` first; the network thread sends committed rows in order,
  QoS 1, and deletes a row only when its PUBACK arrives. A connection that drops loses nothing: the
  next one starts again from the oldest unacked row (duplicates are possible; every message carries
  a ``seq`` to drop them by).
- Every connection attempt uses a fresh paho client, so no half-sent state survives into the next
  session; subscriptions are made again on each CONNACK.
- State topics (retained status, reported, command replies) are sent directly while connected
  (:meth:`MqttLink.send`) and re-sent on reconnect by the caller's ``on_connect`` hook.

- Samples from the field (``[capture]``) go at the lowest priority: ``low_priority`` (a
  :class:`~edge_agent.fleet.samples.SampleOutbox`) is asked for its next chunks only when the
  spool has no row waiting, with at most ``samples.MAX_INFLIGHT`` of them in flight, so results,
  telemetry and events always go first.

Publishing never blocks the caller: the spool's ``put`` is a bounded in-memory queue, and
:meth:`MqttLink.send` only appends to a deque the network thread drains.

What comes in is bounded by the broker, not by paho: with MQTT 5 the CONNECT announces a Maximum
Packet Size (``max_packet_bytes``, which the agent sizes from its largest payload cap plus
``PACKET_HEADER_ROOM``), so a compliant broker drops a larger message for this client instead of
sending it. paho 2.2 itself has no cap on incoming packets: it reads a packet's whole remaining
length (up to 256 MiB) into memory before any callback, and ``max_inflight_messages_set`` /
``max_queued_messages_set`` bound only outgoing messages. With MQTT 3.1.1 nothing is announced;
the broker's own limit (Mosquitto ``max_packet_size``) is the only bound.

A refused CONNACK is an error with its reason (``last_error``: ``"broker refused the
connection: Not authorized"``), never "connected"; the link keeps retrying with backoff (a
daemon must come back when the operator fixes the broker), and ``edgectl`` turns it into an exit.
"""

from __future__ import annotations

import ipaddress
import logging
import random
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from edge_agent.common.backoff import BackoffPolicy
from edge_agent.common.secrets import credential_path, read_secret
from edge_agent.errors import BrokerError, ConfigError
from edge_agent.fleet.spool import Spool

log = logging.getLogger(__name__)

PROTOCOLS = ("auto", "5", "3.1.1")
#: Topics per SUBSCRIBE packet (AWS IoT Core accepts at most 8 per request).
SUBSCRIBE_BATCH = 8
#: PUBACK reason codes after which resending cannot help: the row is dropped (and counted).
#: Any other failure (quota exceeded, unspecified) keeps the row for the next connection.
PERMANENT_PUBACK_FAILURES = frozenset({0x87, 0x90, 0x99})  # not authorized, topic, payload
MAX_INFLIGHT = 100  # QoS 1 messages sent and not yet acknowledged, per connection
CONNACK_TIMEOUT_S = 10.0
AUTO_V5_CONNACK_S = 3.0  # protocol "auto": how long an MQTT 5 CONNECT may go unanswered
_LOOP_S = 0.01  # one paho loop() wait while there is work: the send latency bound
_IDLE_LOOP_S = 0.05  # while nothing is queued or in flight (spool commits come every 0.1 s)
_COALESCE_S = 0.005  # while messages are in flight: gather PUBACKs before reading them
#: Room above the largest payload for the rest of a PUBLISH packet (fixed header, topic,
#: packet id, MQTT 5 properties such as a response topic and correlation data).
PACKET_HEADER_ROOM = 4096


@dataclass(frozen=True)
class Message:
    """An incoming message, with the MQTT 5 request/response properties when present."""

    topic: str
    payload: bytes
    retain: bool
    response_topic: str | None = None
    correlation_data: bytes | None = None


@dataclass(frozen=True)
class BrokerSettings:
    """Where and how to connect (built from the ``[mqtt]`` config section or ``--broker``)."""

    url: str
    protocol: str = "auto"
    keepalive: int = 30
    client_id: str = ""
    username: str = ""
    password_file: str = ""
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 30.0

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        if parts.username or parts.password:  # first: the message must not echo the password
            raise ConfigError(
                f"broker {parts.scheme}://{parts.hostname}: no credentials in the URL; set "
                "[mqtt] username and password_file (secrets come from files)"
            )
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
            raise ConfigError(
                f"broker {self.url!r}: expected mqtt://HOST[:PORT] or mqtts://HOST[:PORT]"
            )
        try:
            parts.port  # noqa: B018 - validates the port
        except ValueError:
            raise ConfigError(f"broker {self.url!r}: bad port") from None
        if self.protocol not in PROTOCOLS:
            raise ConfigError(
                f"broker protocol {self.protocol!r}: expected one of {', '.join(PROTOCOLS)}"
            )
        if self.keepalive < 5:
            raise ConfigError(f"broker keepalive {self.keepalive}: must be >= 5 seconds")
        if bool(self.cert_file) != bool(self.key_file):
            raise ConfigError("broker TLS: cert_file and key_file go together")
        if self.password_file and not self.username:
            raise ConfigError("broker: password_file needs a username")
        self.backoff  # noqa: B018 - validates the reconnect delays

    @classmethod
    def from_section(cls, m: Any) -> BrokerSettings:
        """From the config's ``[mqtt]`` section (checks its form; connects to nothing)."""
        return cls(url=m.broker, protocol=m.protocol, keepalive=m.keepalive,
                   client_id=m.client_id, username=m.username, password_file=m.password_file,
                   ca_file=m.ca_file, cert_file=m.cert_file, key_file=m.key_file)  # fmt: skip

    @property
    def backoff(self) -> BackoffPolicy:
        """Reconnect delays: doubling from ``reconnect_min_s`` up to ``reconnect_max_s``, with
        full jitter (many devices losing one broker do not come back in step)."""
        return BackoffPolicy(
            initial=self.reconnect_min_s, maximum=self.reconnect_max_s, full_jitter=True
        )

    @property
    def host(self) -> str:
        return str(urlsplit(self.url).hostname)

    @property
    def port(self) -> int:
        parts = urlsplit(self.url)
        return parts.port or (8883 if parts.scheme == "mqtts" else 1883)

    @property
    def tls(self) -> bool:
        return urlsplit(self.url).scheme == "mqtts"

    @property
    def safe_url(self) -> str:
        return f"{urlsplit(self.url).scheme}://{self.host}:{self.port}"

    @property
    def loopback(self) -> bool:
        """The broker is this machine (``localhost`` or a loopback address; no DNS lookup)."""
        host = self.host.lower()
        if host == "localhost" or host.endswith(".localhost"):
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False

    def plaintext_warning(self, *, orders: bool) -> str | None:
        """What travels unencrypted over this connection, as a warning, or None: credentials
        (``username``/``password_file``) or orders (``orders``: the caller receives or sends
        desired states and commands) over plain ``mqtt://`` to a host other than this one."""
        if self.tls or self.loopback:
            return None
        what = []
        if self.username or self.password_file:
            what.append("the password" if self.password_file else "the username")
        if orders:
            what.append("orders (desired states, commands)")
        if not what:
            return None
        return (
            f"{self.safe_url} is plain MQTT to another host: {' and '.join(what)} "
            f"{'travels' if len(what) == 1 else 'travel'} unencrypted and can be read or altered "
            "on the way; use mqtts://"
        )

    def password(self, *, what: str = "[mqtt] password_file") -> str | None:
        """The password from ``password_file`` (or None without one); ``what`` names the
        setting in an error."""
        if not self.password_file:
            return None
        return read_secret(self.password_file, what=what)

    def new_client(
        self,
        *,
        client_id: str,
        password: str | None,
        protocol: str = "5",
        max_inflight: int = 20,
        manual_ack: bool = False,
        reconnect_delay: tuple[int, int] | None = None,
    ) -> Any:
        """A paho client for this broker, not yet connected: the one place its setup is
        written (the agent's :class:`MqttLink`, ``edgectl``'s client, collector and simulator).

        MQTT ``protocol`` "5" or "3.1.1" (with a clean session), ``client_id`` as given (a
        caller applies ``self.client_id`` where it may override), the ``username`` with
        ``password`` (read once by the caller with :meth:`password`, so an unreadable file is
        said before any connection), the TLS context for mqtts://, at most ``max_inflight``
        QoS 1 messages unacknowledged (paho's default is 20), ``manual_ack`` (PUBACKs sent by
        the caller), and paho's own reconnect delays (``reconnect_delay``, seconds min and max;
        None: paho's). Callbacks, a Will and the CONNECT itself are the caller's."""
        if protocol not in ("5", "3.1.1"):
            raise ValueError(f"protocol {protocol!r}: expected '5' or '3.1.1'")
        import paho.mqtt.client as mqtt

        kwargs: dict[str, Any] = {}
        if protocol != "5":
            kwargs["clean_session"] = True
        client = mqtt.Client(
            callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv5 if protocol == "5" else mqtt.MQTTv311,
            manual_ack=manual_ack,
            **kwargs,
        )
        client.max_inflight_messages_set(max_inflight)
        if self.username:
            client.username_pw_set(self.username, password)
        ctx = self.ssl_context()
        if ctx is not None:
            client.tls_set_context(ctx)
        if reconnect_delay is not None:
            client.reconnect_delay_set(*reconnect_delay)
        return client

    def ssl_context(self) -> ssl.SSLContext | None:
        """For mqtts://: the CA (else the system's) and the client certificate, if any."""
        if not self.tls:
            return None
        ctx = ssl.create_default_context(
            cafile=str(credential_path(self.ca_file)) if self.ca_file else None
        )
        if self.cert_file:
            ctx.load_cert_chain(
                str(credential_path(self.cert_file)), str(credential_path(self.key_file))
            )
        return ctx


def _reason_text(reason: Any) -> str:
    text = str(getattr(reason, "getName", lambda: reason)())
    return text if text else str(reason)


class MqttLink:
    """One broker connection, kept up by a network thread; sends the spool in order.

    ``subscriptions`` are (re)made on every CONNACK and incoming messages go to ``on_message``
    (called in the network thread: hand work off, do not block). ``on_connect`` runs after each
    CONNACK, also in the network thread, typically to :meth:`send` retained state.
    """

    def __init__(
        self,
        settings: BrokerSettings,
        *,
        client_id: str,
        spool: Spool | None = None,
        will: tuple[str, bytes] | None = None,
        subscriptions: Sequence[str] = (),
        on_message: Callable[[Message], None] | None = None,
        on_connect: Callable[[MqttLink], None] | None = None,
        rng: random.Random | None = None,
        low_priority: Any = None,
        max_packet_bytes: int | None = None,
    ) -> None:
        self.settings = settings
        #: MQTT 5: announced in CONNECT as Maximum Packet Size, so a compliant broker never
        #: sends a larger packet (it drops it for this client). None: no limit announced.
        if max_packet_bytes is not None and not 128 <= max_packet_bytes <= 268_435_455:
            raise ValueError(f"max_packet_bytes {max_packet_bytes}: expected 128 to 268435455")
        self.max_packet_bytes = max_packet_bytes
        self.client_id = settings.client_id or client_id
        self.spool = spool
        self.will = will
        self.subscriptions = list(subscriptions)
        self.on_message = on_message
        self.on_connect = on_connect
        #: sent only when the spool has nothing waiting (samples: ``SampleOutbox``)
        self.low_priority = low_priority
        self._rng = rng or random.Random()
        self._password = settings.password()
        for key in ("ca_file", "cert_file", "key_file"):
            value = getattr(settings, key)
            if value and not credential_path(value).is_file():
                raise ConfigError(f"[mqtt] {key} = {value!r}: no such file")
        self.protocol_in_use: str | None = None
        self._protocol_next = "5" if settings.protocol in ("auto", "5") else "3.1.1"
        self._v5_refused = False  # the broker said "unsupported protocol version" to MQTT 5
        self.connected = threading.Event()
        self.last_error: str | None = None
        self.connects = 0
        self.sent = 0
        self.acked = 0
        self.rejected = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._direct: deque[tuple[str, bytes, int, bool, Any]] = deque(maxlen=1000)
        self._subscribe_extra: deque[list[str]] = deque()
        self._lock = threading.Lock()
        # per-connection state, reset on each connect (network thread only)
        self._inflight: dict[int, int] = {}
        self._low_inflight: dict[int, Any] = {}  # mid -> low_priority key
        self._acks: list[int] = []
        self._last_sent_id = 0
        self._conn_state = "idle"
        self._refused: str | None = None

    # --- control --------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("MqttLink.start() was already called")
        self._thread = threading.Thread(target=self._run, name="edge-mqtt", daemon=True)
        self._thread.start()

    def stop(self, *, final: tuple[str, bytes] | None = None, timeout: float = 5.0) -> None:
        """Disconnect cleanly (after publishing ``final`` retained, e.g. status "stopped",
        which replaces the Will) and stop the network thread."""
        if final is not None and self.connected.is_set():
            self.send(final[0], final[1], retain=True)
            deadline = time.monotonic() + min(timeout, 2.0)
            while self._direct and time.monotonic() < deadline:
                time.sleep(0.01)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def wait_connected(self, timeout: float) -> bool:
        return self.connected.wait(timeout)

    def send(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        properties: Any = None,
    ) -> bool:
        """Publish outside the spool (state and replies) on the current connection; False when
        not connected (the caller re-sends state from ``on_connect``)."""
        if not self.connected.is_set():
            return False
        self._direct.append((topic, payload, qos, retain, properties))
        return True

    def subscribe(self, topics: Sequence[str]) -> None:
        """Add subscriptions now (if connected) and on every later connect."""
        with self._lock:  # the same lock as the connect-time snapshot: none slips between
            new = [t for t in topics if t not in self.subscriptions]
            self.subscriptions.extend(new)
            if new:
                self._subscribe_extra.append(new)

    def unsubscribe(self, topics: Sequence[str]) -> None:
        with self._lock:
            self.subscriptions = [t for t in self.subscriptions if t not in topics]
            self._subscribe_extra.append([f"-{t}" for t in topics])

    def drained(self) -> bool:
        """Nothing spooled is waiting and nothing is in flight."""
        return (self.spool is None or self.spool.depth() == 0) and not self._inflight

    # --- the network thread ----------------------------------------------------------------

    def _new_client(self, protocol: str) -> Any:
        client = self.settings.new_client(
            client_id=self.client_id,
            password=self._password,
            protocol=protocol,
            max_inflight=MAX_INFLIGHT,
        )
        if self.will is not None:
            client.will_set(self.will[0], self.will[1], qos=1, retain=True)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        return client

    def _connect_properties(self) -> Any:
        """MQTT 5 CONNECT properties: the Maximum Packet Size, when set."""
        if self.max_packet_bytes is None:
            return None
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        props = Properties(PacketTypes.CONNECT)
        props.MaximumPacketSize = self.max_packet_bytes
        return props

    def _backoff(self, attempt: int) -> None:
        self._stop.wait(self.settings.backoff.delay(attempt, self._rng))

    def _error(self, text: str) -> None:
        if text != self.last_error:
            log.warning("mqtt %s: %s", self.settings.safe_url, text)
        self.last_error = text

    def _run(self) -> None:
        attempt = 0
        while not self._stop.is_set():
            protocol = self._protocol_next
            try:
                ok = self._session(protocol)
            except Exception as exc:  # a bug or an unexpected paho error: keep the link alive
                log.exception("mqtt: session failed")
                self._error(f"internal error: {type(exc).__name__}: {exc}")
                ok = False
            if self._stop.is_set():
                break
            attempt = 0 if ok else attempt + 1
            self._backoff(attempt)

    def _session(self, protocol: str) -> bool:
        """One connection: connect, wait for CONNACK, then loop until it drops. True when the
        connection was established (so backoff restarts from the minimum)."""
        import paho.mqtt.client as mqtt

        s = self.settings
        client = self._new_client(protocol)
        self._conn_state, self._refused = "connecting", None
        self._inflight, self._acks, self._last_sent_id = {}, [], 0
        self._low_inflight = {}
        if self.low_priority is not None:
            self.low_priority.reset()  # what was in flight goes again on this connection
        try:
            try:
                if protocol == "5":
                    client.connect(
                        s.host,
                        s.port,
                        keepalive=s.keepalive,
                        clean_start=True,
                        properties=self._connect_properties(),
                    )
                else:
                    client.connect(s.host, s.port, keepalive=s.keepalive)
            except ssl.SSLError as exc:
                self._error(f"TLS handshake failed: {exc.reason or exc}")
                return False
            except OSError as exc:
                self._error(f"cannot connect: {exc.strerror or exc}")
                return False
            probing = self.settings.protocol == "auto" and protocol == "5"
            wait = AUTO_V5_CONNACK_S if probing else CONNACK_TIMEOUT_S
            deadline = time.monotonic() + wait
            while self._conn_state == "connecting" and not self._stop.is_set():
                rc = client.loop(timeout=0.05)
                if rc != mqtt.MQTT_ERR_SUCCESS and self._conn_state == "connecting":
                    self._conn_state = "lost"
                if time.monotonic() > deadline and self._conn_state == "connecting":
                    self._conn_state = "lost"
                    if not probing:
                        self._error(f"no CONNACK within {wait:g} s")
            if self._conn_state != "up":
                if self._refused:
                    unsupported = "protocol" in self._refused.lower()
                    if self.settings.protocol == "auto" and unsupported and protocol == "5":
                        log.info("mqtt: broker refused MQTT 5; falling back to 3.1.1")
                        self._protocol_next = "3.1.1"
                        self._v5_refused = True  # an explicit answer: stay on 3.1.1
                        return True  # retry at once with 3.1.1
                    self._error(f"broker refused the connection: {self._refused}")
                elif probing:
                    # A 3.1.1-only broker may close the socket on a v5 CONNECT, or not answer.
                    log.info("mqtt: no answer to MQTT 5; trying 3.1.1")
                    self._protocol_next = "3.1.1"
                    return True  # at once
                elif self.settings.protocol == "auto":
                    self._protocol_next = "5"
                    self._error(self.last_error or "connection closed before CONNACK")
                return False
            self.protocol_in_use = protocol
            # After a fallback that was only a guess (no answer to MQTT 5), try 5 again next
            # time: one dropped first connection must not pin the link to 3.1.1.
            auto = self.settings.protocol == "auto"
            self._protocol_next = "5" if auto and not self._v5_refused else protocol
            self.connects += 1
            self.last_error = None
            with self._lock:
                subs = list(self.subscriptions)
                self._subscribe_extra.clear()
            for start in range(0, len(subs), SUBSCRIBE_BATCH):
                client.subscribe([(t, 1) for t in subs[start : start + SUBSCRIBE_BATCH]])
            self.connected.set()
            log.info("mqtt: connected to %s (MQTT %s) as %s", s.safe_url, protocol, self.client_id)
            if self.on_connect is not None:
                try:
                    self.on_connect(self)
                except Exception:
                    log.exception("mqtt: on_connect hook failed")
            while not self._stop.is_set() and self._conn_state == "up":
                busy = self._pump(client)
                if busy and self._inflight and not self._direct:
                    # Only acknowledgements to wait for: let a few arrive, then read them in one
                    # go (one wake-up per batch, not per PUBACK: measured cheaper on 2 cores).
                    self._stop.wait(_COALESCE_S)
                rc = client.loop(timeout=_LOOP_S if busy else _IDLE_LOOP_S)
                if rc != mqtt.MQTT_ERR_SUCCESS:
                    self._conn_state = "lost"
            if self._stop.is_set() and self._conn_state == "up":
                self._pump(client)  # the last direct messages (status "stopped")
                self._flush_acks()
                client.loop(timeout=0.05)
                client.disconnect()
                client.loop(timeout=0.05)
            elif not self._stop.is_set():
                self._error("connection lost")
            return True
        finally:
            self.connected.clear()
            self._flush_acks()
            self._inflight = {}
            self._conn_state = "idle"
            try:
                sock = client.socket()
                if sock is not None:
                    sock.close()
            except Exception:
                pass

    def _pump(self, client: Any) -> bool:
        """Send direct messages, new subscriptions and the next spooled rows. True while there
        is work in hand (rows in flight or waiting), so the loop waits less on the socket."""
        while self._direct:
            topic, payload, qos, retain, props = self._direct.popleft()
            client.publish(topic, payload, qos=qos, retain=retain, properties=props)
        while self._subscribe_extra:
            with self._lock:
                if not self._subscribe_extra:
                    break
                topics = self._subscribe_extra.popleft()
            subs = [(t, 1) for t in topics if not t.startswith("-")]
            unsubs = [t[1:] for t in topics if t.startswith("-")]
            for start in range(0, len(subs), SUBSCRIBE_BATCH):
                client.subscribe(subs[start : start + SUBSCRIBE_BATCH])
            for start in range(0, len(unsubs), SUBSCRIBE_BATCH):
                client.unsubscribe(unsubs[start : start + SUBSCRIBE_BATCH])
        self._flush_acks()
        spool = self.spool
        if spool is None:
            return False
        room = MAX_INFLIGHT - len(self._inflight)
        if room <= 0:
            return True
        if not spool.has_pending(after_id=self._last_sent_id):  # no query when nothing is new
            return self._pump_low(client) or bool(self._inflight)
        for row in spool.pending(after_id=self._last_sent_id, limit=room):
            info = client.publish(row.topic, row.payload, qos=row.qos, retain=row.retain)
            if info.rc != 0:  # the socket went away mid-batch: resend from here next time
                break
            self._last_sent_id = row.id
            if row.qos == 0:
                self._acks.append(row.id)
            else:
                self._inflight[info.mid] = row.id
            self.sent += 1
        return True

    def _pump_low(self, client: Any) -> bool:
        """With no spool row waiting: the next low-priority messages (sample chunks), a few in
        flight at a time. True while any are in flight."""
        low = self.low_priority
        if low is None:
            return False
        from edge_agent.fleet.samples import MAX_INFLIGHT as LOW_INFLIGHT

        room = LOW_INFLIGHT - len(self._low_inflight)
        if room > 0:
            for key, topic, payload in low.take(room):
                info = client.publish(topic, payload, qos=1, retain=True)
                if info.rc != 0:
                    low.retry(key)
                    break
                self._low_inflight[info.mid] = key
                self.sent += 1
        return bool(self._low_inflight)

    def _flush_acks(self) -> None:
        if self._acks and self.spool is not None:
            self.spool.ack(self._acks)
            self._acks = []

    # --- paho callbacks (network thread) -----------------------------------------------------

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if getattr(reason, "is_failure", False):
            self._refused = _reason_text(reason)
            self._conn_state = "refused"
        else:
            self._conn_state = "up"

    def _on_disconnect(
        self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any
    ) -> None:
        if self._conn_state == "up" or self._conn_state == "connecting":
            self._conn_state = "lost"

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        if mid in self._low_inflight:
            self._on_low_publish(self._low_inflight.pop(mid), reason)
            return
        row = self._inflight.pop(mid, None)
        if row is None:
            return
        if getattr(reason, "is_failure", False):
            code = int(getattr(reason, "value", 0))
            if code not in PERMANENT_PUBACK_FAILURES:
                # Transient (quota exceeded, unspecified): keep the row; the next connection
                # sends it again from the oldest unacknowledged row.
                log.info("mqtt: broker deferred a message (%s)", _reason_text(reason))
                self._last_sent_id = min(self._last_sent_id, row - 1)  # send it again
                return
            # The broker will never take this one (e.g. not authorized for the topic): drop it
            # rather than resend it forever, and say so.
            self.rejected += 1
            if self.rejected in (1, 10, 100) or self.rejected % 1000 == 0:
                log.warning("mqtt: broker rejected a message (%s)", _reason_text(reason))
        self.acked += 1
        self._acks.append(row)

    def _on_low_publish(self, key: Any, reason: Any) -> None:
        low = self.low_priority
        if low is None:
            return
        if getattr(reason, "is_failure", False):
            if int(getattr(reason, "value", 0)) not in PERMANENT_PUBACK_FAILURES:
                low.retry(key)
                return
            log.warning("mqtt: broker rejected a sample (%s); dropped", _reason_text(reason))
            low.acked(key, ok=False)
            return
        self.acked += 1
        low.acked(key)

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        if self.on_message is None:
            return
        props = getattr(msg, "properties", None)
        response = getattr(props, "ResponseTopic", None) if props is not None else None
        corr = getattr(props, "CorrelationData", None) if props is not None else None
        try:
            self.on_message(
                Message(
                    topic=msg.topic,
                    payload=bytes(msg.payload),
                    retain=bool(msg.retain),
                    response_topic=response or None,
                    correlation_data=corr,
                )
            )
        except Exception:
            log.exception("mqtt: message handler failed for %s", msg.topic)


def reply_properties(correlation_data: bytes | None) -> Any:
    """MQTT 5 PUBLISH properties carrying a request's correlation data back."""
    if correlation_data is None:
        return None
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    props = Properties(PacketTypes.PUBLISH)
    props.CorrelationData = correlation_data
    return props


def require_connected(link: MqttLink, timeout: float) -> None:
    """For command-line tools: wait for the CONNACK, else raise BrokerError with the reason."""
    if not link.wait_connected(timeout):
        reason = link.last_error or f"no connection within {timeout:g} s"
        link.stop()
        raise BrokerError(f"mqtt {link.settings.safe_url}: {reason}")
