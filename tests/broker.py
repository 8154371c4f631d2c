"""A real Mosquitto broker for tests (no mocks), TLS material, and a paho "consumer".

::

    from tests.broker import Broker, Collector, broker_fixture  # noqa: F401  (the `broker` fixture)

    def test_x(broker: Broker) -> None:
        with Collector(broker, ["edge/#"]) as consumer:
            consumer.publish("edge/a", b"1")
            consumer.wait_for(lambda msgs: len(msgs) == 1)

:class:`Broker` runs ``mosquitto -c <workdir>/mosquitto.conf`` on a free loopback port that is
kept across :meth:`Broker.restart`, with persistence in ``<workdir>/data/`` (saved on SIGTERM and
every second), so tests can check what survives a broker restart or a crash (:meth:`Broker.kill`).
When the tests run as root, the config says ``user root``: mosquitto would otherwise drop to the
``mosquitto`` user and could not write its log or database under pytest's 0700 ``tmp_path``.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from converters.demo_broker import AMQTT_SCRIPT as _AMQTT_SCRIPT  # one copy, the demo's
from converters.demo_broker import free_port as _free_port
from edgectl.provision import mosquitto_password_hash

__all__ = [
    "Broker",
    "Collector",
    "Received",
    "TlsMaterial",
    "broker_fixture",
    "dynsec_plugin",
    "make_tls_material",
    "mosquitto_binary",
    "write_password_file",
]

HOST = "127.0.0.1"
_BIND_ATTEMPTS = 5
_RUNNING = re.compile(r"mosquitto version \S+ running")


def dynsec_plugin() -> Path | None:
    """Mosquitto's dynamic-security plugin, where Debian and Ubuntu install it (or None)."""
    return next(iter(sorted(Path("/usr/lib").glob("*/mosquitto_dynamic_security.so"))), None)


def mosquitto_binary() -> str:
    return shutil.which("mosquitto") or "/usr/sbin/mosquitto"


# --- TLS material ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TlsMaterial:
    """PEM files: a CA, a server cert for 127.0.0.1/localhost and a client cert, both CA-signed."""

    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    require_client_cert: bool = True
    #: Mosquitto's ``use_identity_as_username``: a client cert's CN is its user name (the ACL's)
    identity_as_username: bool = False


def make_tls_material(directory: Path, *, require_client_cert: bool = True) -> TlsMaterial:
    """A fresh CA, a server cert (CN 127.0.0.1, SAN 127.0.0.1 + localhost) and a client cert
    (CN edge-client), EC P-256, made by ``edgectl.ca`` (one copy); PEM files in ``directory``."""
    from edgectl.ca import init_ca, issue_client, issue_server, load_ca

    for old in ("ca.crt", "ca.key"):  # a fresh CA each time (init_ca refuses to replace one)
        (directory / old).unlink(missing_ok=True)
    init_ca(directory, name="edge-test-ca", days=30)
    ca = load_ca(directory)
    issue_server(ca, [HOST, "localhost"], directory, days=30)
    issue_client(ca, "edge-client", directory, days=30)
    return TlsMaterial(
        ca_cert=directory / "ca.crt",
        server_cert=directory / "server.crt",
        server_key=directory / "server.key",
        client_cert=directory / "client.crt",
        client_key=directory / "client.key",
        require_client_cert=require_client_cert,
    )


# --- the broker -----------------------------------------------------------------------------


def write_password_file(path: Path, users: dict[str, str], *, use_tool: bool = True) -> None:
    """Write a mosquitto password file, with ``mosquitto_passwd -b`` when it is installed (and
    ``use_tool``), else by hashing in Python (the same ``$7$`` format)."""
    tool = shutil.which("mosquitto_passwd") if use_tool else None
    path.unlink(missing_ok=True)
    if tool is None:
        lines = [
            f"{user}:{mosquitto_password_hash(password)}\n" for user, password in users.items()
        ]
        path.write_text("".join(lines))
    else:
        for i, (user, password) in enumerate(users.items()):
            flags = ["-b", "-c"] if i == 0 else ["-b"]
            subprocess.run(
                [tool, *flags, str(path), user, password], check=True, capture_output=True
            )
    path.chmod(0o600)


class Broker:
    """A Mosquitto process on a free loopback port, with persistence in its own directory."""

    host: str
    port: int

    def __init__(
        self,
        workdir: Path,
        *,
        tls: TlsMaterial | None = None,
        users: dict[str, str] | None = None,
        max_packet_size: int = 0,
        extra_conf: str = "",
        password_file: Path | None = None,
        acl_file: Path | None = None,
        dynsec: Path | None = None,
        autosave_interval: int = 1,
        log_types: Sequence[str] = ("all",),
    ) -> None:
        if users is not None and password_file is not None:
            raise ValueError("pass users or a password_file, not both")
        self.workdir = workdir
        self.tls = tls
        self.users = dict(users) if users is not None else None
        self.password_file = password_file
        self.acl_file = acl_file
        self.dynsec = dynsec  # the dynamic-security plugin's JSON (its users and roles)
        self.max_packet_size = max_packet_size
        self.extra_conf = extra_conf
        self.autosave_interval = autosave_interval
        self.log_types = tuple(log_types)
        self.host = HOST
        self.port = _free_port()
        self.conf_path = workdir / "mosquitto.conf"
        self.log_path = workdir / "mosquitto.log"
        self.data_dir = workdir / "data"
        self._stderr_path = workdir / "mosquitto.stderr"
        self._proc: subprocess.Popen[bytes] | None = None
        self._started_once = False
        workdir.mkdir(parents=True, exist_ok=True)
        self.data_dir.mkdir(exist_ok=True)

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        """The running mosquitto's process id (None when stopped)."""
        return self._proc.pid if self.running and self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _config(self) -> str:
        lines = [
            f"listener {self.port} {self.host}",
            "persistence true",
            f"persistence_location {self.data_dir}/",
            f"autosave_interval {self.autosave_interval}",
            f"log_dest file {self.log_path}",
            *(f"log_type {t}" for t in self.log_types),
        ]
        if os.name == "posix" and os.geteuid() == 0:
            lines.append("user root")  # else it drops to `mosquitto`, who cannot write workdir
        if self.dynsec is not None:
            lines += ["allow_anonymous false", f"plugin {dynsec_plugin()}",
                      f"plugin_opt_config_file {self.dynsec}"]  # fmt: skip
        elif self.tls is not None and self.tls.identity_as_username:
            lines.append("allow_anonymous false")  # every client has a cert CN as its name
        elif self.users is not None:
            password_file = self.workdir / "passwd"
            write_password_file(password_file, self.users)
            lines += ["allow_anonymous false", f"password_file {password_file}"]
        elif self.password_file is not None:  # e.g. the one edgectl provision keeps
            lines += ["allow_anonymous false", f"password_file {self.password_file}"]
        else:
            lines.append("allow_anonymous true")
        if self.acl_file is not None:
            lines.append(f"acl_file {self.acl_file}")
        if self.tls is not None:
            lines += [
                f"cafile {self.tls.ca_cert}",
                f"certfile {self.tls.server_cert}",
                f"keyfile {self.tls.server_key}",
                f"require_certificate {'true' if self.tls.require_client_cert else 'false'}",
                f"use_identity_as_username {'true' if self.tls.identity_as_username else 'false'}",
            ]
        if self.max_packet_size > 0:
            lines.append(f"max_packet_size {self.max_packet_size}")
        if self.extra_conf:
            lines.append(self.extra_conf.rstrip("\n"))
        return "\n".join(lines) + "\n"

    def _log_since(self, offset: int) -> str:
        text = ""
        if self.log_path.exists():
            with self.log_path.open("rb") as f:
                f.seek(offset)
                text = f.read().decode(errors="replace")
        if self._stderr_path.exists():
            text += self._stderr_path.read_text(errors="replace")
        return text

    def start(self, timeout: float = 10.0) -> None:
        """Write the config, start mosquitto, wait until the port accepts TCP connections."""
        if self.running:
            raise RuntimeError(f"mosquitto is already running on port {self.port}")
        attempts = 1 if self._started_once else _BIND_ATTEMPTS
        for attempt in range(attempts):
            offset = self.log_path.stat().st_size if self.log_path.exists() else 0
            error = self._try_start(timeout, offset)
            if error is None:
                self._started_once = True
                return
            log = self._log_since(offset)
            if "Address already in use" in log and attempt + 1 < attempts:
                self.port = _free_port()
                continue
            tail = "\n".join(log.strip().splitlines()[-20:])
            raise RuntimeError(f"mosquitto did not start on port {self.port}: {error}\n{tail}")

    def _try_start(self, timeout: float, log_offset: int) -> str | None:
        self.conf_path.write_text(self._config())
        with self._stderr_path.open("wb") as stderr:
            self._proc = subprocess.Popen(
                [mosquitto_binary(), "-c", str(self.conf_path)],
                stdin=subprocess.DEVNULL,
                stdout=stderr,
                stderr=stderr,
                cwd=self.workdir,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code = self._proc.poll()
            if code is not None:
                self._proc = None
                return f"exited with code {code}"
            # The log line first: a TCP connect alone could reach another process on the port.
            if not _RUNNING.search(self._log_since(log_offset)):
                time.sleep(0.02)
                continue
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    pass
            except OSError:
                time.sleep(0.02)
                continue
            if self._proc.poll() is None:
                return None
        self.kill()
        return f"port not accepting connections after {timeout:g} s"

    def _signal(self, sig: signal.Signals) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def stop(self) -> None:
        """SIGTERM (mosquitto saves its persistence database on SIGTERM) and wait. Idempotent."""
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL: a crash; only what the last autosave (every second) wrote survives."""
        self._signal(signal.SIGKILL)

    def restart(self) -> None:
        self.stop()
        self.start()

    def __enter__(self) -> Broker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"Broker({self.url}, running={self.running})"


@pytest.fixture(name="broker")
def broker_fixture(tmp_path: Path) -> Iterator[Broker]:
    """The ``broker`` fixture: a started anonymous broker in ``tmp_path / "broker"``, stopped at
    teardown. Import it as ``broker_fixture`` (a test's ``broker`` argument would otherwise
    shadow the import, ruff F811)."""
    with Broker(tmp_path / "broker") as started:
        yield started


# --- a paho consumer ------------------------------------------------------------------------


class Received(NamedTuple):
    topic: str
    payload: bytes
    retain: bool
    properties: Properties | None


class Collector:
    """A paho client (MQTT v5, or 3.1.1 with ``v311=True``) subscribed to ``topics``, collecting
    every message it receives. Use as a context manager (connects, subscribes and waits for the
    SUBACK on enter; disconnects on exit). With a TLS broker it presents the client cert unless
    ``client_cert=False`` (or the ``cert_files`` given)."""

    def __init__(
        self,
        broker: Broker,
        topics: Sequence[str] = (),
        *,
        v311: bool = False,
        qos: int = 1,
        client_id: str = "",
        username: str | None = None,
        password: str | None = None,
        client_cert: bool = True,
        cert_files: tuple[Path, Path] | None = None,
        ca_file: Path | None = None,
        timeout: float = 5.0,
    ) -> None:
        self.broker = broker
        self.topics = list(topics)
        self.qos = qos
        self.timeout = timeout
        self.v311 = v311
        protocol = mqtt.MQTTv311 if v311 else mqtt.MQTTv5
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol
        )
        if username is not None:
            self.client.username_pw_set(username, password)
        if broker.tls is not None:
            tls = broker.tls
            ca = str(ca_file or tls.ca_cert)
            if cert_files is not None:  # this cert and key (another device's, another CA's)
                self.client.tls_set(ca, str(cert_files[0]), str(cert_files[1]))
            elif client_cert:
                self.client.tls_set(ca, str(tls.client_cert), str(tls.client_key))
            else:
                self.client.tls_set(ca)
        self._messages: list[Received] = []
        self._cond = threading.Condition()
        self.connack: ReasonCode | None = None  # the first CONNACK
        self._subacks: dict[int, list[ReasonCode]] = {}
        self._pubacks: dict[int, ReasonCode] = {}
        self._lost: ReasonCode | None = None
        self.connects = 0  # successful CONNACKs: 2 after one reconnect
        self._subscribed: dict[str, int] = {}
        self.client.reconnect_delay_set(1, 2)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_publish

    # callbacks (paho's network thread)
    def _on_connect(
        self, client: Any, userdata: Any, flags: Any, rc: ReasonCode, props: Any
    ) -> None:
        with self._cond:
            reconnect = self.connack is not None and not self.connack.is_failure
            if not reconnect:
                self.connack = rc  # the first CONNACK
            if not rc.is_failure:
                self.connects += 1
            self._cond.notify_all()
            subscribed = list(self._subscribed.items())
        if not reconnect and rc.is_failure:
            client.disconnect()  # refused: stop paho's thread from retrying
        elif reconnect and not rc.is_failure:  # after a broker restart: the session is gone
            for topic, qos in subscribed:
                client.subscribe(topic, qos)

    def _on_disconnect(
        self, client: Any, userdata: Any, flags: Any, rc: ReasonCode, props: Any
    ) -> None:
        with self._cond:
            first = self.connack is None
            self._lost = rc
            self._cond.notify_all()
        if first:
            client.disconnect()  # dropped before any CONNACK (a TLS refusal): no retries

    def _on_subscribe(
        self, client: Any, userdata: Any, mid: int, rcs: list[ReasonCode], props: Any
    ) -> None:
        with self._cond:
            self._subacks[mid] = rcs
            self._cond.notify_all()

    def _on_publish(self, client: Any, userdata: Any, mid: int, rc: ReasonCode, props: Any) -> None:
        with self._cond:
            self._pubacks[mid] = rc
            self._cond.notify_all()

    def _on_message(self, client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        props = None if self.v311 else getattr(msg, "properties", None)
        received = Received(msg.topic, bytes(msg.payload), bool(msg.retain), props)
        with self._cond:
            self._messages.append(received)
            self._cond.notify_all()

    def _wait(self, ready: Callable[[], bool], what: str, timeout: float | None = None) -> None:
        with self._cond:
            if not self._cond.wait_for(ready, timeout or self.timeout):
                raise TimeoutError(f"{self.broker.url}: no {what} in {timeout or self.timeout} s")

    def connect(self) -> Collector:
        """Connect and wait for the CONNACK (ConnectionRefusedError when it is a failure,
        ConnectionError when the broker drops the connection first, e.g. a refused TLS client
        cert), then subscribe to ``topics``. paho's thread reconnects after a broker restart and
        the collector subscribes again."""
        url = self.broker.url
        rc = self.client.connect(self.broker.host, self.broker.port, keepalive=30)
        if rc != mqtt.MQTT_ERR_SUCCESS:  # e.g. the TLS handshake failed inside connect()
            raise ConnectionError(f"{url}: connect failed: {rc}")
        self.client.loop_start()
        try:
            self._wait(lambda: self.connack is not None or self._lost is not None, "CONNACK")
        except TimeoutError:
            self.close()
            raise
        if self.connack is None or self.connack.is_failure:
            self.client.loop_stop()
            if self.connack is None:
                raise ConnectionError(f"{url}: connection lost before the CONNACK: {self._lost}")
            raise ConnectionRefusedError(f"{url}: CONNACK {self.connack}")
        for topic in self.topics:
            self.subscribe(topic)
        return self

    def subscribe(self, topic: str, qos: int | None = None) -> None:
        """Subscribe and wait for the SUBACK (raises when the broker refused the filter)."""
        rc, mid = self.client.subscribe(topic, self.qos if qos is None else qos)
        if rc != mqtt.MQTT_ERR_SUCCESS or mid is None:
            raise ConnectionError(f"{self.broker.url}: subscribe {topic!r} failed: {rc}")
        self._wait(lambda: mid in self._subacks, f"SUBACK for {topic!r}")
        codes = self._subacks[mid]
        if any(code.is_failure for code in codes):
            raise ConnectionError(f"{self.broker.url}: subscribe {topic!r} refused: {codes}")
        with self._cond:
            self._subscribed[topic] = self.qos if qos is None else qos

    def publish(
        self,
        topic: str,
        payload: bytes | str,
        retain: bool = False,
        qos: int = 1,
        properties: Properties | None = None,
    ) -> ReasonCode | None:
        """Publish and wait until it is acknowledged (PUBACK for QoS 1) or sent (QoS 0); return
        the PUBACK's reason code (MQTT 5: "Not authorized" when the broker's ACL refused it)."""
        info = self.client.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise ConnectionError(f"{self.broker.url}: publish {topic!r} failed: {info.rc}")
        info.wait_for_publish(self.timeout)
        if not info.is_published():
            raise TimeoutError(f"{self.broker.url}: no PUBACK for {topic!r} in {self.timeout} s")
        self._wait(lambda: info.mid in self._pubacks, f"on_publish for {topic!r}")
        with self._cond:
            return self._pubacks.pop(info.mid)

    @property
    def messages(self) -> list[Received]:
        with self._cond:
            return list(self._messages)

    def clear(self) -> None:
        with self._cond:
            self._messages.clear()

    def wait_for(
        self, predicate: Callable[[list[Received]], bool], timeout: float = 5.0
    ) -> list[Received]:
        """Wait until ``predicate(messages so far)`` is true; return those messages. Raises
        AssertionError (listing what did arrive) on timeout."""
        with self._cond:
            if self._cond.wait_for(lambda: predicate(list(self._messages)), timeout):
                return list(self._messages)
            seen = [(m.topic, m.payload[:80]) for m in self._messages]
        raise AssertionError(f"condition not met in {timeout} s; received {seen}")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def __enter__(self) -> Collector:
        return self.connect()

    def __exit__(self, *exc: object) -> None:
        self.close()


class Mqtt311Broker:
    """amqtt (MQTT 3.1.1 only: it refuses an MQTT 5 CONNECT) in a child process on a free port:
    a real broker of the other protocol version, for the agent's fallback."""

    def __init__(self) -> None:
        self.host = "127.0.0.1"
        self.port = _free_port()
        self.proc: subprocess.Popen[str] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def __enter__(self) -> Mqtt311Broker:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _AMQTT_SCRIPT, str(self.port)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if line.strip() != "ready":
            self.proc.kill()
            raise RuntimeError(f"amqtt did not start: {line!r}")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            if self.proc.stdout is not None:
                self.proc.stdout.close()
