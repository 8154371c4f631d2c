"""The test broker itself: a real mosquitto, its persistence, TLS and password authentication."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.reasoncodes import ReasonCode

from tests.broker import (
    Broker,
    Collector,
    TlsMaterial,
    broker_fixture,  # noqa: F401  (the `broker` fixture)
    make_tls_material,
    write_password_file,
)


@pytest.fixture(scope="module")
def tls_material(tmp_path_factory: pytest.TempPathFactory) -> TlsMaterial:
    return make_tls_material(tmp_path_factory.mktemp("tls"))


def _connack(
    broker: Broker,
    *,
    username: str | None = None,
    password: str | None = None,
    client_cert: bool = True,
    v311: bool = False,
) -> ReasonCode | None:
    """Connect a paho client: the CONNACK's reason code, or None when the broker dropped the
    connection without one (a refused TLS client)."""
    client = Collector(
        broker, username=username, password=password, client_cert=client_cert, v311=v311
    )
    try:
        client.connect()
    except ConnectionRefusedError:
        assert client.connack is not None
        assert client.connack.is_failure
    except ConnectionError:
        assert client.connack is None
    finally:
        client.close()
    return client.connack


def test_publish_and_receive_qos1(broker: Broker) -> None:
    assert broker.url == f"mqtt://127.0.0.1:{broker.port}"
    with Collector(broker, ["edge/#"]) as consumer:
        consumer.publish("edge/a", b"hello")
        consumer.publish("other/b", b"ignored")
        msgs = consumer.wait_for(lambda m: len(m) >= 1)
    assert msgs[0].topic == "edge/a"
    assert msgs[0].payload == b"hello"
    assert not msgs[0].retain
    assert len(msgs) == 1


def test_mqtt311_collector(broker: Broker) -> None:
    with Collector(broker, ["t"], v311=True) as consumer:
        consumer.publish("t", "x")
        (msg,) = consumer.wait_for(lambda m: len(m) == 1)
    assert msg.payload == b"x"
    assert msg.properties is None


def test_stop_start_keeps_retained_message(broker: Broker) -> None:
    port = broker.port
    with Collector(broker) as producer:
        producer.publish("edge/status", b"online", retain=True)
    broker.stop()
    assert not broker.running
    broker.start()
    assert broker.port == port
    with Collector(broker, ["edge/status"]) as consumer:
        (msg,) = consumer.wait_for(lambda m: len(m) == 1)
    assert msg.payload == b"online"
    assert msg.retain


def test_restart_keeps_retained_message(broker: Broker) -> None:
    with Collector(broker) as producer:
        producer.publish("r", b"1", retain=True)
    broker.restart()
    with Collector(broker, ["r"]) as consumer:
        assert consumer.wait_for(lambda m: len(m) == 1)[0].payload == b"1"


def test_collector_resubscribes_after_a_restart(broker: Broker) -> None:
    with Collector(broker, ["again/#"]) as consumer:
        broker.restart()
        with Collector(broker) as producer:
            # paho reconnects within its reconnect delay (1 s); then the collector subscribes again.
            consumer.wait_for(lambda m: consumer.connects == 2, timeout=5)
            deadline = time.monotonic() + 5
            while not consumer.messages and time.monotonic() < deadline:
                producer.publish("again/1", b"back")
                time.sleep(0.1)
        assert consumer.messages[0].payload == b"back"


def test_kill_then_start(broker: Broker) -> None:
    port = broker.port
    broker.kill()
    assert not broker.running
    with pytest.raises(OSError), socket.create_connection((broker.host, port), timeout=1):
        pass
    broker.start()
    assert broker.port == port
    with Collector(broker, ["k"]) as consumer:
        consumer.publish("k", b"after crash")
        assert consumer.wait_for(lambda m: len(m) == 1)[0].payload == b"after crash"


def test_port_in_use_on_first_start_picks_another(tmp_path: Path) -> None:
    server = Broker(tmp_path)
    taken = server.port
    with socket.socket() as blocker:
        blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        blocker.bind(("127.0.0.1", taken))
        blocker.listen()
        with server:
            assert server.port != taken
            with Collector(server, ["p"]) as consumer:
                consumer.publish("p", b"1")
                consumer.wait_for(lambda m: len(m) == 1)


def test_start_failure_reports_the_log(tmp_path: Path) -> None:
    server = Broker(tmp_path, extra_conf="no_such_option 1")
    with pytest.raises(RuntimeError, match="no_such_option"):
        server.start()
    assert not server.running


def test_tls_accepts_client_cert(tmp_path: Path, tls_material: TlsMaterial) -> None:
    with Broker(tmp_path, tls=tls_material) as server:
        assert server.url.startswith("mqtts://127.0.0.1:")
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        client.tls_set(
            str(tls_material.ca_cert), str(tls_material.client_cert), str(tls_material.client_key)
        )
        connacks: list[ReasonCode] = []
        connected = threading.Event()

        def on_connect(c: Any, u: Any, flags: Any, rc: ReasonCode, props: Any) -> None:
            connacks.append(rc)
            connected.set()

        client.on_connect = on_connect
        assert client.connect(server.host, server.port) == mqtt.MQTT_ERR_SUCCESS
        client.loop_start()
        try:
            assert connected.wait(5)
            assert not connacks[0].is_failure
            with Collector(server, ["s/#"]) as consumer:  # presents the client cert too
                client.publish("s/1", b"secure", qos=1).wait_for_publish(5)
                assert consumer.wait_for(lambda m: len(m) == 1)[0].payload == b"secure"
        finally:
            client.disconnect()
            client.loop_stop()


def test_tls_refuses_client_without_cert(tmp_path: Path, tls_material: TlsMaterial) -> None:
    with Broker(tmp_path, tls=tls_material) as server:
        assert _connack(server, client_cert=False) is None
        # TLS 1.3: the client finishes its handshake, sends CONNECT, and the broker then drops
        # the connection ("peer did not return a certificate"): no CONNACK.
        with pytest.raises(ConnectionError), Collector(server, client_cert=False):
            pass
        assert "peer did not return a certificate" in server.log_path.read_text()


def test_tls_without_client_cert_requirement(tmp_path: Path) -> None:
    material = make_tls_material(tmp_path / "tls", require_client_cert=False)
    with Broker(tmp_path / "b", tls=material) as server:
        rc = _connack(server, client_cert=False)
        assert rc is not None
        assert not rc.is_failure


@pytest.mark.parametrize("v311", [False, True], ids=["v5", "v311"])
def test_users_refuse_wrong_password(tmp_path: Path, v311: bool) -> None:
    with Broker(tmp_path, users={"edge": "s3cret", "ops": "other"}) as server:
        wrong = _connack(server, username="edge", password="nope", v311=v311)
        assert wrong is not None
        assert wrong.is_failure
        assert str(wrong) in {"Not authorized", "Bad user name or password"}
        anonymous = _connack(server, v311=v311)
        assert anonymous is not None
        assert anonymous.is_failure
        right = _connack(server, username="edge", password="s3cret", v311=v311)
        assert right is not None
        assert not right.is_failure
        with Collector(server, ["u"], username="ops", password="other") as consumer:
            consumer.publish("u", b"1")
            consumer.wait_for(lambda m: len(m) == 1)
        with pytest.raises(ConnectionRefusedError), Collector(server, username="ops"):
            pass


def test_password_file_written_without_the_tool(tmp_path: Path) -> None:
    """The Python fallback writes the same $7$ format mosquitto_passwd does."""
    passwd = tmp_path / "fallback"
    write_password_file(passwd, {"edge": "pw"}, use_tool=False)
    assert passwd.read_text().startswith("edge:$7$101$")
    # allow_anonymous is given twice (true from users=None, then false): the last one wins.
    server = Broker(tmp_path / "b", extra_conf=f"allow_anonymous false\npassword_file {passwd}")
    with server:
        right = _connack(server, username="edge", password="pw")
        assert right is not None
        assert not right.is_failure
        wrong = _connack(server, username="edge", password="px")
        assert wrong is not None
        assert wrong.is_failure


def test_max_packet_size(tmp_path: Path) -> None:
    with Broker(tmp_path, max_packet_size=1024) as server, Collector(server, ["m"]) as c:
        c.publish("m", b"x" * 100)
        c.wait_for(lambda m: len(m) == 1)
    assert "max_packet_size 1024" in server.conf_path.read_text()
