"""The agent over MQTT against a real Mosquitto (started, killed and restarted by the tests):
payload schemas, nothing lost across broker restarts and agent restarts, TLS with client
certificates, refused credentials, commands (MQTT 5 request/response and the 3.1.1 reply
topic, fuzzed payloads)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import paho.mqtt.client as mqtt
import pytest

from edge_agent.fleet import protocol
from tests.broker import Broker, Collector, broker_fixture, make_tls_material  # noqa: F401
from tests.fleet import (  # noqa: F401  (fleet_env_fixture: the `fleet_env` fixture)
    AgentProcess,
    agent_config,
    digits_video,
    events,
    fleet_env_fixture,
    payloads,
    wait_until,
)

DEVICE = "cam-1"


class PersistentConsumer:
    """A consumer with a persistent session (MQTT 3.1.1, clean_session=False): the broker keeps
    its QoS 1 messages while it is away, including across broker restarts (persistence)."""

    def __init__(self, broker: Broker, topic: str) -> None:
        self.topic = topic
        self.received: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id="test-consumer",
            protocol=mqtt.MQTTv311,
            clean_session=False,
        )
        self.client.reconnect_delay_set(0.2, 1)
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, 1)
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port, keepalive=10)
        self.client.loop_start()

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        with self._lock:
            self.received.append(json.loads(msg.payload))

    def seqs(self) -> set[int]:
        with self._lock:
            return {int(r["seq"]) for r in self.received}

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _validate(kind: str, payload: dict[str, Any]) -> None:
    jsonschema.validate(payload, protocol.SCHEMAS[kind])


def test_every_payload_matches_its_schema(
    broker: Broker, fleet_env: dict[str, Any], tmp_path: Path
) -> None:
    jsonl = tmp_path / "results.jsonl"
    cfg = agent_config(
        broker=broker.url, device=DEVICE, state_dir=tmp_path / "state",
        model=fleet_env["root"] / "digits-1.0.0.edgebundle",
        source=f"file:{fleet_env['video']}", pace="native", keys=fleet_env["pub"],
        results=str(jsonl), telemetry_interval=0.5,
    )  # fmt: skip
    with Collector(broker, ["edge/#"]) as consumer, AgentProcess(tmp_path, cfg) as agent:
        assert agent.wait(60) == 0, agent.text()
        consumer.wait_for(lambda m: len(payloads(m, "/results")) >= 120, timeout=10)
        msgs = consumer.messages
    results = payloads(msgs, "/results")
    assert [r["seq"] for r in results] == list(range(120))
    # The MQTT result is the JSONL sink's object.
    lines = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert lines == results
    for r in results:
        _validate("result", r)
    telemetry = payloads(msgs, "/telemetry")
    assert len(telemetry) >= 2
    for t in telemetry:
        _validate("telemetry", t)
    last = telemetry[-1]
    assert last["pipeline"]["results"] == 120 and last["model"]["version"] == "1.0.0"
    assert last["system"]["ram_percent"] > 0 and last["system"]["process_rss_mb"] > 10
    assert any((t.get("monitoring") or {}).get("samples") for t in telemetry)
    evs = events(msgs)
    kinds = [e["kind"] for e in evs]
    assert kinds[:2] == ["agent_started", "model_loaded"] and kinds[-1] == "agent_stopping"
    for e in evs:
        _validate("event", e)
    statuses = payloads(msgs, "/status")
    for s in statuses:
        _validate("status", s)
    assert statuses[0]["state"] == "online" and statuses[-1]["state"] == "stopped"
    for r in payloads(msgs, "/reported"):
        _validate("reported", r)
    # The retained status says "stopped" after a clean exit.
    with Collector(broker, [f"edge/{DEVICE}/status"]) as late:
        retained = late.wait_for(lambda m: len(m) >= 1)[0]
    assert retained.retain and json.loads(retained.payload)["state"] == "stopped"


def test_broker_restarted_five_times_at_50_msgs_loses_nothing(
    broker: Broker, fleet_env: dict[str, Any], tmp_path: Path
) -> None:
    """120 frames at 50 fps (a paced file: none dropped at the source) while the broker is
    restarted 5 times: the consumer ends with every seq, after dropping duplicates."""
    video = digits_video(
        tmp_path / "v.mp4",
        np.repeat(np.linspace(0, 1, 8 * 8, dtype=np.float32).reshape(1, 1, 8, 8), 300, axis=0),
        fps=50.0,
    )
    consumer = PersistentConsumer(broker, f"edge/{DEVICE}/results")
    try:
        time.sleep(0.3)
        cfg = agent_config(
            broker=broker.url, device=DEVICE, state_dir=tmp_path / "state",
            model=fleet_env["root"] / "digits-1.0.0.edgebundle", source=f"file:{video}",
            pace="native", keys=fleet_env["pub"], telemetry_interval=1.0,
        )  # fmt: skip
        with AgentProcess(tmp_path, cfg) as agent:
            for _ in range(5):
                time.sleep(0.8)
                broker.restart()
            assert agent.wait(90) == 0, agent.text()
        wait_until(lambda: len(consumer.seqs()) >= 300, timeout=20, what="all 300 results")
        assert consumer.seqs() == set(range(300))
        assert len(consumer.received) >= 300  # duplicates allowed (at least once), none lost
    finally:
        consumer.close()
    assert "everything delivered" in agent.text()


def test_agent_restart_replays_a_spooled_backlog(
    broker: Broker, fleet_env: dict[str, Any], tmp_path: Path
) -> None:
    """Run 1 has no broker (stopped): its results stay in the spool and it says so. Run 2, with
    the broker back, sends that backlog first, then its own results, seq continuing."""
    broker.stop()
    state = tmp_path / "state"
    cfg = agent_config(
        broker=broker.url, device=DEVICE, state_dir=state,
        model=fleet_env["root"] / "digits-1.0.0.edgebundle", source=f"file:{fleet_env['video']}",
        keys=fleet_env["pub"],
    ).replace("flush_timeout = 20", "flush_timeout = 1")  # fmt: skip
    first = AgentProcess(tmp_path, cfg, name="run1").start()
    assert first.wait(60) == 0, first.text()
    assert "still spooled" in first.text()
    assert (state / "spool.sqlite").exists()
    broker.start()
    with Collector(broker, [f"edge/{DEVICE}/results", f"edge/{DEVICE}/events"]) as consumer:
        second = AgentProcess(tmp_path, cfg.replace("flush_timeout = 1", "flush_timeout = 20"),
                              name="run2").start()  # fmt: skip
        assert second.wait(60) == 0, second.text()
        msgs = consumer.wait_for(lambda m: len(payloads(m, "/results")) >= 240, timeout=20)
    seqs = [r["seq"] for r in payloads(msgs, "/results")]
    assert sorted(set(seqs)) == list(range(240))
    assert seqs[:120] == list(range(120))  # the backlog first, in order
    evs = events(msgs)
    starts = [e for e in evs if e["kind"] == "agent_started"]
    assert len(starts) == 2 and starts[0]["seq"] < starts[1]["seq"]  # run 1's event, replayed


def test_tls_with_client_certificates(fleet_env: dict[str, Any], tmp_path: Path) -> None:
    tls = make_tls_material(tmp_path / "tls")
    with Broker(tmp_path / "broker", tls=tls) as broker:
        tls_keys = (
            f'ca_file = "{tls.ca_cert}"\ncert_file = "{tls.client_cert}"\n'
            f'key_file = "{tls.client_key}"'
        )
        cfg = agent_config(
            broker=broker.url, device=DEVICE, state_dir=tmp_path / "state",
            model=fleet_env["root"] / "digits-1.0.0.edgebundle",
            source=f"file:{fleet_env['video']}", keys=fleet_env["pub"], mqtt_extra=tls_keys,
        )  # fmt: skip
        assert broker.url.startswith("mqtts://")
        with Collector(broker, [f"edge/{DEVICE}/results"]) as consumer:
            agent = AgentProcess(tmp_path, cfg).start()
            assert agent.wait(60) == 0, agent.text()
            consumer.wait_for(lambda m: len(m) >= 120, timeout=10)
        # Without a client certificate the broker refuses the handshake; the agent says so.
        no_cert = agent_config(
            broker=broker.url, device=DEVICE, state_dir=tmp_path / "state2",
            model=fleet_env["root"] / "digits-1.0.0.edgebundle",
            source=f"file:{fleet_env['video']}", keys=fleet_env["pub"],
            mqtt_extra=f'ca_file = "{tls.ca_cert}"',
        ).replace("flush_timeout = 20", "flush_timeout = 1")  # fmt: skip
        agent = AgentProcess(tmp_path, no_cert, name="nocert").start()
        assert agent.wait(60) == 0
        text = agent.text()
        assert "still spooled" in text and "connected to" not in text


def test_wrong_password_is_refused_with_its_reason(tmp_path: Path) -> None:
    from edge_agent.errors import BrokerError
    from edge_agent.fleet.mqtt import BrokerSettings, MqttLink, require_connected

    with Broker(tmp_path / "broker", users={"device": "right"}) as broker:
        (tmp_path / "pw-wrong").write_text("wrong\n")
        (tmp_path / "pw-right").write_text("right\n")
        bad = MqttLink(
            BrokerSettings(
                url=broker.url, username="device", password_file=str(tmp_path / "pw-wrong")
            ),
            client_id="t1",
        )
        bad.start()
        with pytest.raises(BrokerError) as err:
            require_connected(bad, 3.0)
        assert "refused" in str(err.value) and "authori" in str(err.value).lower()
        assert not bad.connected.is_set() and bad.connects == 0
        good = MqttLink(
            BrokerSettings(
                url=broker.url, username="device", password_file=str(tmp_path / "pw-right")
            ),
            client_id="t2",
        )
        good.start()
        require_connected(good, 5.0)
        assert good.protocol_in_use == "5"
        good.stop()


def test_broker_drops_what_exceeds_the_announced_packet_size(broker: Broker) -> None:
    """MQTT 5: the link announces a Maximum Packet Size; Mosquitto drops a larger message for
    that client (the link stays up) and delivers the next one within the limit."""
    from edge_agent.fleet.mqtt import PACKET_HEADER_ROOM, BrokerSettings, Message, MqttLink

    got: list[Message] = []
    limit = 8 * 1024
    link = MqttLink(
        BrokerSettings(url=broker.url, protocol="5"),
        client_id="dev1",
        subscriptions=["edge/dev1/cmd/+"],
        on_message=got.append,
        max_packet_bytes=limit + PACKET_HEADER_ROOM,
    )
    link.start()
    try:
        assert link.wait_connected(5)
        assert link.protocol_in_use == "5"
        pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        pub.connect("127.0.0.1", broker.port)
        pub.loop_start()
        deadline = time.monotonic() + 5
        # the subscription is made after CONNACK: send probes until one arrives
        while not got and time.monotonic() < deadline:
            pub.publish("edge/dev1/cmd/ping", b"probe", qos=1).wait_for_publish(2)
            time.sleep(0.05)
        assert got, "the link never received a message within the limit"
        got.clear()
        pub.publish("edge/dev1/cmd/ping", b"x" * (limit + 2 * PACKET_HEADER_ROOM), qos=1)
        pub.publish("edge/dev1/cmd/ping", b"y" * limit, qos=1).wait_for_publish(2)
        while not got and time.monotonic() < deadline:
            time.sleep(0.02)
        pub.loop_stop()
        pub.disconnect()
        assert [len(m.payload) for m in got] == [limit]  # the large one never came
        assert link.connected.is_set() and link.connects == 1
    finally:
        link.stop()


@pytest.mark.parametrize(
    ("url", "username", "password_file", "orders", "warned"),
    [
        ("mqtt://10.1.2.3:1883", "dev", "pw", False, "the password"),
        ("mqtt://broker.example:1883", "", "", True, "orders"),
        ("mqtt://10.1.2.3:1883", "", "", False, None),  # nothing worth reading travels
        ("mqtts://10.1.2.3:8883", "dev", "pw", True, None),
        ("mqtt://127.0.0.1:1883", "dev", "pw", True, None),
        ("mqtt://localhost:1883", "dev", "pw", True, None),
        ("mqtt://[::1]:1883", "dev", "pw", True, None),
    ],
)
def test_plain_mqtt_to_another_host_is_named(
    url: str, username: str, password_file: str, orders: bool, warned: str | None
) -> None:
    from edge_agent.fleet.mqtt import BrokerSettings

    settings = BrokerSettings(url=url, username=username, password_file=password_file)
    text = settings.plaintext_warning(orders=orders)
    if warned is None:
        assert text is None
    else:
        assert text is not None and warned in text and "mqtts://" in text
        assert settings.safe_url in text


def test_password_comes_from_the_credentials_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from edge_agent.errors import ConfigError
    from edge_agent.fleet.mqtt import credential_path, read_secret

    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "mqtt-password").write_text("s3cret\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    assert credential_path("mqtt-password") == creds / "mqtt-password"
    assert read_secret("mqtt-password", what="password_file") == "s3cret"
    with pytest.raises(ConfigError, match="no such file"):
        read_secret("other", what="[mqtt] password_file")
    (creds / "empty").write_text("\n")
    with pytest.raises(ConfigError, match="empty"):
        read_secret("empty", what="[mqtt] password_file")


@pytest.mark.parametrize(
    ("url", "needle"),
    [
        ("tcp://h:1", "expected mqtt://"),
        ("mqtt://user:pw@h:1", "no credentials in the URL"),
        ("mqtt://h:99999", "bad port"),
    ],
)
def test_bad_broker_urls(url: str, needle: str) -> None:
    from edge_agent.errors import ConfigError
    from edge_agent.fleet.mqtt import BrokerSettings

    with pytest.raises(ConfigError, match=needle):
        BrokerSettings(url=url)


def _live_agent(broker: Broker, fleet_env: dict[str, Any], tmp_path: Path, **kw: Any) -> str:
    return agent_config(
        broker=broker.url, device=DEVICE, state_dir=tmp_path / "state",
        model=fleet_env["root"] / "digits-1.0.0.edgebundle",
        source=f"file:{fleet_env['video']}?loop=1&live=1", keys=fleet_env["pub"], **kw,
    )  # fmt: skip


def test_commands_reply_on_mqtt5_response_topics_and_the_311_reply_topic(
    broker: Broker, fleet_env: dict[str, Any], tmp_path: Path
) -> None:
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    topics = protocol.Topics(DEVICE)
    with AgentProcess(tmp_path, _live_agent(broker, fleet_env, tmp_path)) as agent:
        with Collector(broker, [topics.status]) as watch:
            watch.wait_for(lambda m: any(b'"online"' in x.payload for x in m), timeout=20)
        # MQTT 5: our response topic and correlation data come back.
        with Collector(broker, ["replies/me"]) as v5:
            props = Properties(PacketTypes.PUBLISH)
            props.ResponseTopic = "replies/me"
            props.CorrelationData = b"corr-42"
            v5.publish(topics.command("ping"), b'{"id": "p1"}', properties=props)
            reply = v5.wait_for(lambda m: len(m) >= 1)[0]
        body = json.loads(reply.payload)
        jsonschema.validate(body, protocol.SCHEMAS["reply"])
        assert body["ok"] and body["id"] == "p1" and body["result"]["pong"] is True
        assert reply.properties is not None and reply.properties.CorrelationData == b"corr-42"
        # MQTT 3.1.1: no properties; the documented reply topic.
        with Collector(broker, [topics.reply("ping")], v311=True) as v3:
            v3.publish(topics.command("ping"), b'{"id": 7}')
            body = json.loads(v3.wait_for(lambda m: len(m) >= 1)[0].payload)
        assert body["ok"] and body["id"] == 7
        # Fuzzed and malformed commands: an error reply each, nothing changes, agent stays up.
        bad = [
            ("ping", b"not json"),
            ("ping", b"[1, 2]"),
            ("ping", b"\xff\xfe"),
            ("ping", b"{" * 10000),
            ("ping", b'{"id": "' + b"x" * 200_000 + b'"}'),
            ("update", b'{"bundle": 3}'),
            ("update", b'{"bundle": {"sha256": "../../etc"}}'),
            ("update", b'{"bundle": {"sha256": "' + b"a" * 64 + b'"}, "allow_downgrade": "yes"}'),
            ("rollback", b'{"version": 12}'),
            ("rollback", b"{}"),
            ("selfdestruct", b"{}"),
        ]
        with Collector(broker, [f"{topics.base}/cmd/+/reply"]) as fuzz:
            for name, payload in bad:
                fuzz.publish(topics.command(name), payload)
            replies = fuzz.wait_for(lambda m: len(m) >= len(bad), timeout=10)
        bodies = [json.loads(r.payload) for r in replies]
        assert all(b["ok"] is False and b["error"] for b in bodies), bodies
        errors = " | ".join(b["error"] for b in bodies)
        for needle in ("not valid JSON", "expected a JSON object", "larger than", "sha256",
                       "allow_downgrade", "version must be a string", "no rollback target",
                       "unknown command 'selfdestruct'"):  # fmt: skip
            assert needle in errors, (needle, errors)
        assert agent.alive()
        with Collector(broker, [topics.reply("ping")], v311=True) as v3:
            v3.publish(topics.command("ping"), b"{}")
            assert json.loads(v3.wait_for(lambda m: len(m) >= 1)[0].payload)["ok"]
        assert agent.stop() == 0


def test_will_marks_a_killed_agent_offline(
    broker: Broker, fleet_env: dict[str, Any], tmp_path: Path
) -> None:
    topics = protocol.Topics(DEVICE)
    cfg = _live_agent(broker, fleet_env, tmp_path, mqtt_extra="keepalive = 5")
    with Collector(broker, [topics.status]) as watch:
        agent = AgentProcess(tmp_path, cfg).start()
        watch.wait_for(lambda m: any(b'"online"' in x.payload for x in m), timeout=20)
        agent.kill()  # no clean exit: the broker publishes the Will
        msgs = watch.wait_for(lambda m: any(b'"offline"' in x.payload for x in m), timeout=15)
    offline = json.loads(msgs[-1].payload)
    jsonschema.validate(offline, protocol.SCHEMAS["status"])
    assert offline["state"] == "offline" and offline["device"] == DEVICE


def test_docs_hold_the_generated_schemas() -> None:
    doc = (Path(__file__).resolve().parent.parent / "docs" / "mqtt.md").read_text()
    assert protocol.markdown_schemas() in doc, (
        "regenerate: python -m edge_agent.fleet.protocol --markdown"
    )
    for name in protocol.COMMANDS:
        assert f"`{name}`" in doc
    for kind in ("status", "telemetry", "results", "events", "desired", "reported"):
        assert f"edge/<device>/{kind}" in doc


def test_topics_reject_names_that_would_break_the_topic_tree() -> None:
    for bad in ("a/b", "+", "#", "", "x" * 65, "dev ice"):
        with pytest.raises(protocol.ProtocolError):
            protocol.Topics(bad)
    t = protocol.Topics("cam-1", prefix="site/a")
    assert t.commands == "site/a/cam-1/cmd/+" and t.reply("ping") == "site/a/cam-1/cmd/ping/reply"
    assert protocol.device_of("site/a/cam-1/status", prefix="site/a") == "cam-1"
    assert protocol.device_of("edge/cam-1/status", prefix="site/a") is None
    assert protocol.device_of("edge/cam-1/status") == "cam-1"
    assert protocol.device_of("edge/bundles/x/meta") is None
    assert protocol.fleet_topic("telemetry", share="g1") == "$share/g1/edge/+/telemetry"


def test_falls_back_to_mqtt_311_on_a_broker_that_refuses_5(
    fleet_env: dict[str, Any], tmp_path: Path
) -> None:
    """amqtt speaks only 3.1.1: the agent's MQTT 5 CONNECT is refused, it falls back, and its
    results arrive; a 3.1.1 command gets its reply on the documented reply topic."""
    from tests.broker import Mqtt311Broker

    with Mqtt311Broker() as old:
        got: list[dict[str, Any]] = []
        replies: list[dict[str, Any]] = []
        consumer = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)

        def on_message(c: Any, u: Any, msg: Any) -> None:
            (replies if msg.topic.endswith("/reply") else got).append(json.loads(msg.payload))

        consumer.on_message = on_message
        consumer.connect(old.host, old.port)
        consumer.subscribe([(f"edge/{DEVICE}/results", 1), (f"edge/{DEVICE}/cmd/+/reply", 1)])
        consumer.loop_start()
        try:
            # A live loop: the agent must outlive both pings (each client spends up to 3 s
            # finding out that the broker will not answer MQTT 5).
            cfg = agent_config(
                broker=old.url, device=DEVICE, state_dir=tmp_path / "state",
                model=fleet_env["root"] / "digits-1.0.0.edgebundle",
                source=f"file:{fleet_env['video']}?loop=1&live=1", keys=fleet_env["pub"],
            )  # fmt: skip
            summary = tmp_path / "summary.json"
            with AgentProcess(tmp_path, cfg, args=["--summary", str(summary)]) as agent:
                wait_until(lambda: len(got) >= 5, timeout=30, what="results over 3.1.1")
                consumer.publish(f"edge/{DEVICE}/cmd/ping", b'{"id": "old"}', qos=1)
                wait_until(lambda: bool(replies), timeout=10, what="a reply on cmd/ping/reply")
                from tests.fleet import edgectl

                ping = edgectl("ping", DEVICE, broker=old.url)  # edgectl falls back too
                assert ping.returncode == 0, (ping.stderr, agent.text())
                assert json.loads(ping.stdout)["result"]["pong"]
                assert agent.stop() == 0, agent.text()  # a clean stop drains the spool
            sent = json.loads(summary.read_text())["next_seq"]
            assert sent > 5
            wait_until(lambda: len({r["seq"] for r in got}) >= sent, timeout=15, what="all results")
        finally:
            consumer.disconnect()
            consumer.loop_stop()
    assert {r["seq"] for r in got} == set(range(sent))
    assert replies[0]["ok"] and replies[0]["id"] == "old"
    assert len(replies) >= 2  # edgectl's ping came back on the reply topic as well
    text = agent.text()
    assert "(MQTT 3.1.1)" in text
    assert "falling back to 3.1.1" in text or "no answer to MQTT 5; trying 3.1.1" in text


def test_home_assistant_prometheus_and_edgectl_views(
    broker: Broker, fleet_env: dict[str, Any], tmp_path: Path
) -> None:
    import csv
    import io
    import socket
    import urllib.request

    from tests.fleet import edgectl

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = _live_agent(
        broker, fleet_env, tmp_path, mqtt_extra="home_assistant = true",
        telemetry_interval=0.5,
    ).replace("monitor_every = 2", f"monitor_every = 2\nprometheus_port = {port}")  # fmt: skip
    with AgentProcess(tmp_path, cfg) as agent:
        with Collector(broker, ["homeassistant/#"]) as ha:
            msgs = ha.wait_for(lambda m: len(m) >= 8, timeout=30)
        configs = {m.topic: json.loads(m.payload) for m in msgs}
        with Collector(broker, ["homeassistant/#"]) as late:  # retained for HA restarts
            stored = late.wait_for(lambda m: len(m) >= len(configs), timeout=10)
        assert all(m.retain for m in stored) and {m.topic for m in stored} == set(configs)
        fps = configs[f"homeassistant/sensor/{DEVICE}_fps/config"]
        assert fps["state_topic"] == f"edge/{DEVICE}/telemetry"
        assert fps["availability"][0]["topic"] == f"edge/{DEVICE}/status"
        assert fps["value_template"] == "{{ value_json.pipeline.fps }}"
        label = configs[f"homeassistant/sensor/{DEVICE}_last_label/config"]
        assert label["state_topic"] == f"edge/{DEVICE}/results"
        assert len({c["unique_id"] for c in configs.values()}) == len(configs)

        def metrics() -> str:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                return str(r.read().decode())

        wait_until(lambda: "edge_agent_fps{" in metrics(), timeout=20, what="prometheus metrics")
        text = metrics()
        assert f'device="{DEVICE}"' in text and 'version="1.0.0"' in text
        # a summary's quantiles are fractions, and prometheus_client sorts the labels
        assert "edge_agent_latency_ms{" in text and 'quantile="0.95",stage="inference"' in text
        assert "# TYPE edge_agent_fps gauge" in text
        assert "# TYPE edge_agent_latency_ms summary" in text

        run = edgectl("status", "--json", broker=broker.url)
        assert run.returncode == 0, run.stderr
        (row,) = json.loads(run.stdout)
        assert row["device"] == DEVICE and row["online"] and row["model"] == "digits 1.0.0"
        assert row["fps"] and row["fps"] > 5 and row["last_seen_s"] < 5
        run = edgectl("status", broker=broker.url)
        assert "1 devices, 1 online" in run.stdout and DEVICE in run.stdout

        run = edgectl("export", "--format", "csv", "--duration", "2.5", broker=broker.url)
        assert run.returncode == 0, run.stderr
        rows = list(csv.DictReader(io.StringIO(run.stdout)))
        assert len(rows) >= 3 and {r["device"] for r in rows} == {DEVICE}
        seqs = [int(r["seq"]) for r in rows]
        assert len(seqs) == len(set(seqs))  # duplicates dropped
        assert all(r["model_version"] == "1.0.0" for r in rows)

        run = edgectl("watch", DEVICE, "--count", "2", broker=broker.url, timeout=20)
        assert run.returncode == 0 and run.stdout.count(f"{DEVICE} digits 1.0.0") >= 1, run.stdout

        run = edgectl("ping", DEVICE, broker=broker.url)
        assert run.returncode == 0 and json.loads(run.stdout)["result"]["pong"] is True
        assert agent.stop() == 0
    run = edgectl("ping", "nobody", "--timeout", "1", broker=broker.url)
    assert run.returncode == 6 and "no reply" in run.stderr


def test_edgectl_errors_are_one_line_with_their_exit_codes(tmp_path: Path) -> None:
    from tests.fleet import edgectl

    run = edgectl("status", broker="mqtt://127.0.0.1:1")
    assert run.returncode == 5 and run.stderr.count("\n") == 1 and "cannot connect" in run.stderr
    run = edgectl("publish", str(tmp_path / "missing.edgebundle"), broker="mqtt://127.0.0.1:1")
    assert run.returncode in (2, 5)
    run = edgectl("status", broker="tcp://x")
    assert run.returncode == 2 and "expected mqtt://" in run.stderr


def test_drift_raises_an_event(broker: Broker, fleet_env: dict[str, Any], tmp_path: Path) -> None:
    """All-white frames: the model's predictions pile onto one class, far from the calibration
    class histogram, and the agent raises a drift event saying so."""
    bright = digits_video(tmp_path / "bright.mp4", np.full((60, 1, 8, 8), 1.0, np.float32))
    cfg = _live_agent(broker, fleet_env, tmp_path, telemetry_interval=0.5).replace(
        f"file:{fleet_env['video']}?loop=1&live=1", f"file:{bright}?loop=1&live=1"
    )
    with Collector(broker, [f"edge/{DEVICE}/events"]) as consumer, AgentProcess(tmp_path, cfg):
        consumer.wait_for(lambda m: bool(events(m, "drift")), timeout=30)
        time.sleep(2.0)  # four more telemetry intervals, still drifted
        msgs = consumer.messages
    drift = events(msgs, "drift")[0]
    assert "class histogram: total variation" in drift["reason"]
    assert drift["details"]["drifted"] is True and drift["details"]["output"] > 0.5
    assert len(events(msgs, "drift")) == 1  # once per episode, not every interval


def test_cli_contract_broker_device_id_and_state_dir_flags(
    broker: Broker, fleet_env: dict[str, Any], tmp_path: Path
) -> None:
    """The issue's form: flags only, no config file. Each result goes to edge/<ID>/results as
    the JSONL sink's object, QoS 1; the spool lives in --state-dir; seq keeps growing across
    runs."""
    import subprocess

    from tests.fleet import EDGE_AGENT

    jsonl = tmp_path / "r.jsonl"
    state = tmp_path / "st"
    argv = [
        EDGE_AGENT, "run", "--model", str(fleet_env["root"] / "digits-1.0.0.edgebundle"),
        "--trusted-key", str(fleet_env["pub"]), "--source", f"file:{fleet_env['video']}",
        "--max-frames", "40", "--results", f"jsonl:{jsonl}", "--broker", broker.url,
        "--device-id", "flag-dev", "--state-dir", str(state),
        "--config", str(tmp_path / "none.toml"),
    ]  # fmt: skip
    (tmp_path / "none.toml").write_text("")
    with Collector(broker, ["edge/flag-dev/results"]) as consumer:
        for _ in range(2):
            run = subprocess.run(argv, capture_output=True, text=True, timeout=60)
            assert run.returncode == 0, run.stderr
        msgs = consumer.wait_for(lambda m: len(m) >= 80, timeout=10)
    assert all(m.topic == "edge/flag-dev/results" for m in msgs)
    got = [json.loads(m.payload) for m in msgs]
    lines = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert got == lines and [r["seq"] for r in got] == list(range(80))  # run 2 continues at 40
    assert (state / "spool.sqlite").is_file() and (state / "models" / "digits-1.0.0").is_dir()


def test_result_modes_all_change_and_rate_limited(tmp_path: Path) -> None:
    from edge_agent.fleet.spool import Spool
    from edge_agent.io.sinks import MqttResultSink

    def result(seq: int, label: str) -> dict[str, Any]:
        return {"seq": seq, "output": {"kind": "classification", "class": 0, "label": label}}

    labels = ["a", "a", "b", "b", "b", "a", "c", "c"]
    with Spool(tmp_path / "s.sqlite") as spool:
        change = MqttResultSink(spool, "t/change", mode="change")
        for i, label in enumerate(labels):
            change.write(result(i, label))
        spool.flush()
        sent = [json.loads(m.payload)["seq"] for m in spool.pending()]
        assert sent == [0, 2, 5, 6] and change.skipped == 4
        assert spool.next_seq("results") == len(labels)  # skipped results still take their seq
        spool.ack([m.id for m in spool.pending()])
        limited = MqttResultSink(spool, "t/limited", mode="all", max_rate=5.0)
        t_end = time.monotonic() + 1.0
        n = 100
        while time.monotonic() < t_end:
            limited.write(result(n, "x"))
            n += 1
            time.sleep(0.01)
        spool.flush()
        kept = len(spool.pending(limit=10_000))
        assert 4 <= kept <= 7 and limited.skipped > 50


def test_source_lost_and_restored_events(
    broker: Broker, fleet_env: dict[str, Any], tmp_path: Path
) -> None:
    import os
    import shutil

    video = tmp_path / "cam.mp4"
    shutil.copy(fleet_env["video"], video)
    cfg = _live_agent(broker, fleet_env, tmp_path).replace(
        f"file:{fleet_env['video']}?loop=1&live=1", f"file:{video}?loop=1&live=1"
    )
    with Collector(broker, [f"edge/{DEVICE}/events"]) as consumer, AgentProcess(tmp_path, cfg):
        consumer.wait_for(lambda m: bool(events(m, "model_loaded")), timeout=30)
        time.sleep(4.5)  # the 4 s clip loops at least once
        os.replace(video, tmp_path / "unplugged.mp4")
        lost = consumer.wait_for(lambda m: bool(events(m, "source_lost")), timeout=20)
        os.replace(tmp_path / "unplugged.mp4", video)
        consumer.wait_for(lambda m: bool(events(m, "source_restored")), timeout=40)
    assert "no such file" in events(lost, "source_lost")[0]["reason"]


def test_shared_subscriptions_split_the_fleet_between_exporters(broker: Broker) -> None:
    """Two `edgectl export --share g` instances: together they see each telemetry message once."""
    import subprocess

    from tests.fleet import EDGECTL

    procs = [
        subprocess.Popen(
            [EDGECTL, "-v", "--broker", broker.url, "export", "--share", "g", "--duration", "6"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    for p in procs:  # both in the share group (SUBACK received) before the first message
        assert p.stderr is not None
        while "subscribed:" not in (line := p.stderr.readline()):
            assert line, "the exporter ended before it subscribed"
    with Collector(broker) as pub:
        for i in range(40):
            body = {"schema": 1, "seq": i, "device": f"d{i % 4}", "ts": time.time()}
            pub.publish(f"edge/d{i % 4}/telemetry", json.dumps(body).encode())
    outs = [p.communicate(timeout=20)[0] for p in procs]
    counts = [len(o.splitlines()) for o in outs]
    assert sum(counts) == 40 and all(c > 0 for c in counts), counts


def test_a_url_with_credentials_is_refused_without_echoing_them() -> None:
    from edge_agent.errors import ConfigError
    from edge_agent.fleet.mqtt import BrokerSettings

    for url in ("tcp://admin:s3cret@broker", "mqtt://admin:s3cret@broker:1883"):
        with pytest.raises(ConfigError) as err:
            BrokerSettings(url=url)
        assert "s3cret" not in str(err.value) and "no credentials in the URL" in str(err.value)


def test_home_assistant_shows_a_stopped_device_as_unavailable() -> None:
    from edge_agent.fleet.homeassistant import home_assistant_discovery

    configs = [json.loads(p) for _, p in home_assistant_discovery(protocol.Topics("d1"), "d1")]
    for c in configs:
        avail = c["availability"][0]
        assert avail["payload_available"] == "online"
        assert avail["payload_not_available"] == "offline"
        # stopped and offline both map to offline; HA ignores values it does not know
        assert "== 'online' else 'offline'" in avail["value_template"]


def test_a_broker_without_trusted_keys_runs_with_ota_disabled(
    broker: Broker, fleet_env: dict[str, Any], digits: Any, tmp_path: Path
) -> None:
    """Results and telemetry flow; OTA says once, in the log, an event and the reported state,
    why it is off, and refuses updates with that reason."""
    missing = tmp_path / "no-such-keys"
    cfg = agent_config(
        broker=broker.url, device=DEVICE, state_dir=tmp_path / "state", model=digits.onnx,
        source=f"file:{fleet_env['video']}?loop=1&live=1", keys=missing, telemetry_interval=0.5,
    )  # fmt: skip
    topics = protocol.Topics(DEVICE)
    with Collector(broker, [f"edge/{DEVICE}/#"]) as seen, AgentProcess(tmp_path, cfg) as agent:
        seen.wait_for(
            lambda m: len(payloads(m, "/results")) >= 5 and payloads(m, "/telemetry")
            and events(m, "ota_disabled") and payloads(m, "/reported"),
            timeout=30,
        )  # fmt: skip
        reported = payloads(seen.messages, "/reported")[-1]
        _validate("reported", reported)
        assert reported["ota"]["enabled"] is False
        assert str(missing) in reported["ota"]["reason"]
        assert "edge-convert keygen" in reported["ota"]["reason"]
        (event,) = events(seen.messages, "ota_disabled")
        _validate("event", event)
        desired = {
            "schema": protocol.SCHEMA_VERSION,
            "bundle": {"sha256": "ab" * 32, "name": "digits", "version": "2.0.0"},
        }
        seen.publish(topics.desired, json.dumps(desired).encode(), retain=True)
        seen.wait_for(lambda m: events(m, "update_failed"), timeout=20)
        (refused,) = events(seen.messages, "update_failed")
        assert refused["reason"].startswith("OTA is disabled: no trusted keys")
        with Collector(broker, [topics.reply("update")], v311=True) as replies:
            replies.publish(topics.command("update"), json.dumps(desired).encode())
            reply = json.loads(replies.wait_for(lambda m: len(m) >= 1)[0].payload)
        assert reply["ok"] is False and "no trusted keys" in reply["error"]
        assert agent.alive()
        assert agent.stop() == 0
        seen.publish(topics.desired, b"", retain=True)  # leave no retained desired state behind
    assert "ota: disabled (no trusted keys in" in agent.text()


def test_edgectl_names_its_password_over_plain_mqtt(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import argparse

    from edgectl.cli import Client

    secret = tmp_path / "pw"
    secret.write_text("s3cret\n")
    secret.chmod(0o600)
    args = argparse.Namespace(
        broker="mqtt://10.1.2.3:1883", username="ops", password_file=str(secret), ca_file=None,
        cert_file=None, key_file=None, prefix="edge", operator_key=None,
    )  # fmt: skip
    with caplog.at_level("WARNING"):
        Client(args)  # built, not connected
    assert "the password travels unencrypted" in caplog.text and "s3cret" not in caplog.text
    caplog.clear()
    args.broker = "mqtt://127.0.0.1:1883"
    with caplog.at_level("WARNING"):
        Client(args)
    assert "unencrypted" not in caplog.text
