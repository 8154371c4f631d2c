"""Signed orders (issue 16, point 1) against a real Mosquitto and real ``edge-agent`` processes:
a deploy signed by ``edgectl`` with an encrypted operator key works end to end; unsigned,
altered, expired, replayed, mis-targeted and unknown-key orders, a downgrade and a URL without a
signature are each refused with an ``order_refused`` event and change nothing; the last serial
survives a restart; without operator keys the agent says so and takes unsigned orders."""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from edge_agent.common.urls import url_host
from edge_agent.config import load_config
from edge_agent.errors import ConfigError, OrderRefused
from edge_agent.fleet import protocol
from edge_agent.fleet.orders import OrderGuard, SerialLedger, sign_order
from edge_agent.model.keys import generate_keypair, load_private_key, load_trusted_keys
from tests.broker import Broker, Collector, broker_fixture  # noqa: F401
from tests.fleet import (  # noqa: F401  (fleet_env_fixture: the `fleet_env` fixture)
    EDGECTL,
    AgentProcess,
    agent_config,
    checkout_env,
    edgectl,
    events,
    fleet_env_fixture,
    payloads,
)

DEVICE = "cam-1"
TOPICS = protocol.Topics(DEVICE)
PASSPHRASE = "correct horse battery staple"


@pytest.fixture(scope="module")
def operator(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """An encrypted operator key pair made by ``edgectl keygen``, and a second, untrusted one."""
    root = tmp_path_factory.mktemp("operator")
    (root / "pass").write_text(PASSPHRASE + "\n")
    (root / "pass").chmod(0o600)  # a secret file: readable by others would be warned about
    run = edgectl("keygen", "--out", str(root / "op"), "--passphrase-file", str(root / "pass"),
                  broker="mqtt://127.0.0.1:1")  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert b"ENCRYPTED" in (root / "op" / "edge-operator.key").read_bytes()
    other_key, _ = generate_keypair(root / "other", stem="edge-operator")
    return {
        "key_file": root / "op" / "edge-operator.key",
        "pub": root / "op" / "edge-operator.pub",
        "pass": root / "pass",
        "key": load_private_key(root / "op" / "edge-operator.key", passphrase=PASSPHRASE.encode()),
        "other": load_private_key(other_key),
    }


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _config(broker: Broker, env: dict[str, Any], tmp: Path, *, fleet: str, ota: str = "") -> str:
    return agent_config(
        broker=broker.url, device=DEVICE, state_dir=tmp / "state",
        model=env["root"] / "digits-1.0.0.edgebundle", keys=env["pub"],
        source=f"file:{env['video']}?loop=1&live=1", mqtt_extra='groups = ["lobby"]',
        extra=f"{ota}\n\n[fleet]\n{fleet}\n",
    )  # fmt: skip


def _online(consumer: Collector, agent: AgentProcess, after: int = 0) -> None:
    def up(msgs: list[Any]) -> bool:
        return any(e["kind"] == "agent_started" for e in events(msgs[after:]))

    try:
        consumer.wait_for(up, timeout=30)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; log: {agent.text()[-2000:]}") from None


def _refused(consumer: Collector, *needles: str, timeout: float = 10.0) -> dict[str, Any]:
    """The order_refused event whose reason holds every needle."""

    def match(e: dict[str, Any]) -> bool:
        return all(n in (e.get("reason") or "") for n in needles)

    msgs = consumer.wait_for(lambda m: any(map(match, events(m, "order_refused"))), timeout)
    return next(e for e in events(msgs, "order_refused") if match(e))


def _signed(payload: dict[str, Any], key: Any, topic: str, **kw: Any) -> bytes:
    scope, target, order = protocol.order_target(topic) or ("", "", "")
    fields = {"scope": scope, "target": target, "order": order, "ttl": 60,
              "serial": time.time_ns() // 1_000_000, "issued": int(time.time()), **kw}  # fmt: skip
    return protocol.dumps(sign_order(payload, key=key, **fields))


def _desired(sha: str, **kw: Any) -> dict[str, Any]:
    return protocol.Desired(sha256=sha, **kw).to_payload(ts=time.time())


def test_signed_orders_are_followed_and_every_bad_order_is_refused(
    broker: Broker, fleet_env: dict[str, Any], operator: dict[str, Any], tmp_path: Path
) -> None:
    v100 = _sha(fleet_env["root"] / "digits-1.0.0.edgebundle")
    v110 = fleet_env["root"] / "digits-1.1.0.edgebundle"
    cfg = _config(broker, fleet_env, tmp_path, fleet=f'operator_keys = ["{operator["pub"]}"]',
                  ota='allowed_hosts = ["127.0.0.1"]')  # fmt: skip
    signed = ("--operator-key", str(operator["key_file"]),
              "--operator-key-passphrase-file", str(operator["pass"]))  # fmt: skip
    key, desired_topic = operator["key"], TOPICS.desired
    with Collector(broker, [f"{TOPICS.base}/#"]) as consumer:
        agent = AgentProcess(tmp_path, cfg).start()
        try:
            _online(consumer, agent)
            # A deploy signed by edgectl (encrypted key, passphrase from a file) is followed.
            run = edgectl(*signed, "deploy", str(v110), "--device", DEVICE, broker=broker.url)
            assert run.returncode == 0, run.stderr

            def committed(msgs: list[Any]) -> bool:
                return any((r.get("update") or {}).get("state") == "committed"
                           for r in payloads(msgs, "/reported"))  # fmt: skip

            consumer.wait_for(committed, timeout=40)
            assert not events(consumer.messages, "orders_unsigned")
            retained = json.loads(
                next(m.payload for m in consumer.messages if m.topic == desired_topic)
            )
            serial = retained["signed"]["serial"]

            # Each attack: refused with a reason, nothing changes.
            attacker = Collector(broker).connect()
            try:
                down = _desired(v100, version="1.0.0", allow_downgrade=True)
                attacker.publish(desired_topic, protocol.dumps(down))
                _refused(consumer, "unsigned", "allow_downgrade")
                far = _desired(v100, url="http://evil.example/b.edgebundle")
                attacker.publish(desired_topic, protocol.dumps(far))
                _refused(consumer, "unsigned", "URL http://evil.example/b.edgebundle")
                group = protocol.group_desired_topic("lobby")
                attacker.publish(group, protocol.dumps(_desired(v100)))
                _refused(consumer, "desired for group lobby: unsigned")
                old = _signed(_desired(v100, allow_downgrade=True), key, desired_topic,
                              serial=serial - 1)  # fmt: skip
                attacker.publish(desired_topic, old)
                _refused(consumer, "replayed", f"serial {serial - 1}")
                expired = _signed(_desired(v100), key, desired_topic,
                                  issued=int(time.time()) - 4000)  # fmt: skip
                attacker.publish(desired_topic, expired)
                _refused(consumer, "expired")
                for_other = _signed(_desired(v100), key, protocol.Topics("cam-2").desired)
                attacker.publish(desired_topic, for_other)
                _refused(consumer, "mis-targeted", "device cam-2")
                for_group = _signed(_desired(v100), key, group)
                attacker.publish(desired_topic, for_group)
                _refused(consumer, "mis-targeted", "group lobby")
                stranger = _signed(_desired(v100), operator["other"], desired_topic)
                attacker.publish(desired_topic, stranger)
                _refused(consumer, "which is not trusted")
                altered = json.loads(_signed(_desired(v100), key, desired_topic))
                altered["allow_downgrade"] = True
                attacker.publish(desired_topic, protocol.dumps(altered))
                _refused(consumer, "bad signature")
                # An unsigned command naming a response topic: refused, answered on the fixed
                # reply topic (never on the topic it names).
                from paho.mqtt.packettypes import PacketTypes
                from paho.mqtt.properties import Properties

                props = Properties(PacketTypes.PUBLISH)
                props.ResponseTopic = protocol.Topics("cam-2").desired
                attacker.publish(TOPICS.command("rollback"), b'{"schema":1,"id":"r1"}',
                                 properties=props)  # fmt: skip
                _refused(consumer, "rollback for device cam-1: unsigned")
                replies = consumer.wait_for(
                    lambda m: bool(payloads(m, "/cmd/rollback/reply")), timeout=10
                )
                reply = payloads(replies, "/cmd/rollback/reply")[-1]
                assert reply["ok"] is False and "unsigned" in reply["error"], reply
                ping = _signed({"schema": 1, "id": "p1"}, key, TOPICS.command("ping"))
                attacker.publish(TOPICS.command("ping"), ping)
                consumer.wait_for(lambda m: any(r.get("id") == "p1" and r["ok"]
                                  for r in payloads(m, "/cmd/ping/reply")), timeout=10)  # fmt: skip
                # Oversized. Past the agent's order limit (64 KiB), within the packet size it
                # announced: refused with the reason. Past that packet size (4 MiB + 4 KiB with
                # OTA on): the broker never delivers it, so the agent says nothing of it, and
                # the small unsigned order sent after it is the next one it refuses.
                pad = "x" * protocol.MAX_COMMAND_BYTES
                attacker.publish(TOPICS.command("ping"), protocol.dumps({"schema": 1, "p": pad}))
                limit = f"larger than the {protocol.MAX_COMMAND_BYTES}-byte limit"
                consumer.wait_for(lambda m: any(not r["ok"] and limit in r["error"]
                                  for r in payloads(m, "/cmd/ping/reply")), timeout=10)  # fmt: skip
                before = len(consumer.messages)
                huge = {**_desired(v100, version="0.0.1"), "note": "y" * (5 * 2**20)}
                attacker.publish(desired_topic, protocol.dumps(huge))
                attacker.publish(desired_topic, protocol.dumps(_desired(v100, version="0.0.2")))
                msgs = consumer.wait_for(
                    lambda m: bool(events(m[before:], "order_refused")), timeout=10
                )
                said = events(msgs[before:], "order_refused") + events(msgs[before:], "error")
                assert len(said) == 1 and "unsigned" in said[0]["reason"], said
            finally:
                attacker.close()

            # A signed ping from edgectl: the agent answers, and nothing has changed.
            run = edgectl(*signed, "ping", DEVICE, broker=broker.url)
            assert run.returncode == 0, run.stderr
            reported = payloads(consumer.messages, "/reported")[-1]
            assert reported["model"]["version"] == "1.1.0", reported
            assert reported["update"]["state"] == "committed", reported
            assert len(events(consumer.messages, "update_started")) == 1
            assert agent.stop() == 0, agent.text()[-2000:]

            # After a restart: the retained signed desired state is the same order (accepted
            # again, quietly); the ping already seen is a replay.
            seen = len(consumer.messages)
            agent = AgentProcess(tmp_path, cfg, name="again").start()
            _online(consumer, agent, after=seen)
            attacker = Collector(broker).connect()
            try:
                attacker.publish(TOPICS.command("ping"), ping)
            finally:
                attacker.close()
            _refused(consumer, "ping for device cam-1: replayed")
            later = consumer.messages[seen:]
            refused = [e["reason"] for e in events(later, "order_refused")]
            assert not [r for r in refused if r.startswith("desired")], refused
            assert payloads(later, "/reported")[-1]["model"]["version"] == "1.1.0"
            assert not events(later, "update_started")
            assert agent.stop() == 0, agent.text()[-2000:]
        finally:
            agent.kill()


def test_without_operator_keys_orders_are_unsigned_but_allowed_hosts_hold(
    broker: Broker, fleet_env: dict[str, Any], tmp_path: Path
) -> None:
    cfg = _config(broker, fleet_env, tmp_path, fleet="", ota='allowed_hosts = ["127.0.0.1"]')
    v110 = _sha(fleet_env["root"] / "digits-1.1.0.edgebundle")
    with Collector(broker, [f"{TOPICS.base}/#"]) as consumer, AgentProcess(tmp_path, cfg) as agent:
        _online(consumer, agent)
        said = consumer.wait_for(lambda m: bool(events(m, "orders_unsigned")), timeout=10)
        assert "operator_keys" in events(said, "orders_unsigned")[0]["reason"]
        run = edgectl("ping", DEVICE, broker=broker.url)  # unsigned, as before
        assert run.returncode == 0, run.stderr
        far = _desired(v110, url="http://evil.example/b.edgebundle")
        consumer.publish(TOPICS.desired, protocol.dumps(far))
        _refused(consumer, "'evil.example' is not in [ota] allowed_hosts")
        assert not events(consumer.messages, "update_started")
        assert agent.stop() == 0
        assert (
            "operator_keys: orders (desired states, commands) are accepted unsigned" in agent.text()
        )


@pytest.mark.parametrize(
    ("entry", "url"),
    [
        ("[::1]", "http://[::1]:8443/b.edgebundle"),
        ("::1", "https://[::1]/b.edgebundle"),
        ("[0:0::1]", "http://[::1]:80/b.edgebundle"),  # the same address, written out
        ("::1", "http://[0::0:1]:80/b.edgebundle"),
        ("FD00::A", "http://[fd00::a]/b.edgebundle"),
        ("Models.Example.com", "https://models.example.com:8443/b.edgebundle"),
        ("10.0.0.1", "http://10.0.0.1:8080/b.edgebundle"),
    ],
)
def test_allowed_hosts_take_ipv6_literals_and_match_the_url_host(
    entry: str, url: str, tmp_path: Path
) -> None:
    """An IPv6 literal, bracketed or bare, is taken and compares equal with the host of a URL
    naming that address (``urlsplit(url).hostname``); the guard lets the unsigned order
    through, and refuses the same URL on another host."""
    path = tmp_path / "agent.toml"
    path.write_text(f"[ota]\nallowed_hosts = [{json.dumps(entry)}]\n")
    hosts = load_config(path).ota.allowed_hosts
    assert hosts == (url_host(entry),) and "[" not in hosts[0]
    guard = OrderGuard(keys={}, ledger=None, allowed_hosts=hosts)
    where = {"scope": "device", "target": DEVICE, "order": "desired"}
    assert not guard.check(_desired("ab" * 32, url=url), **where).signed
    with pytest.raises(OrderRefused, match="'::2' is not in"):
        guard.check(_desired("ab" * 32, url="http://[::2]/b.edgebundle"), **where)


@pytest.mark.parametrize(
    "entry", ["example.com:443", "10.0.0.1:80", "[::1]:443", "[example.com]", "[10.0.0.1]",
              "[::1", "https://example.com", "example.com/bundles", ""],
)  # fmt: skip
def test_allowed_hosts_refuse_ports_schemes_and_paths_in_one_line(
    entry: str, tmp_path: Path
) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(f"[ota]\nallowed_hosts = [{json.dumps(entry)}]\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"config {path}: [ota] allowed_hosts: {entry!r}: "), message
    assert "no scheme, port or path; an IPv6 address as ::1 or [::1]" in message
    assert "\n" not in message


def test_guard_refuses_orders_from_the_future_and_keeps_serials(
    operator: dict[str, Any], tmp_path: Path
) -> None:
    """The ledger outlives the guard (a restart); a clock far behind the order refuses it."""
    keys = load_trusted_keys([operator["pub"]])
    topic = TOPICS.command("ping")
    now = int(time.time())
    order = json.loads(_signed({"schema": 1}, operator["key"], topic, serial=7, issued=now))
    where = {"scope": "device", "target": DEVICE, "order": "ping"}
    ledger = SerialLedger(tmp_path / "orders.sqlite")
    behind = OrderGuard(keys=keys, ledger=ledger, clock=lambda: now - 3600)
    with pytest.raises(OrderRefused, match="in the future"):
        behind.check(order, **where)
    assert OrderGuard(keys=keys, ledger=ledger).check(order, **where).serial == 7
    ledger.close()
    again = OrderGuard(keys=keys, ledger=SerialLedger(tmp_path / "orders.sqlite"))
    with pytest.raises(OrderRefused, match="replayed: serial 7"):
        again.check(order, **where)


def test_edgectl_operator_key_errors_are_one_line(operator: dict[str, Any], tmp_path: Path) -> None:
    """Read before the broker is reached: exit 2 and one line, with no terminal to ask on."""
    bad = tmp_path / "bad"
    bad.write_text("wrong\n")
    bad.chmod(0o600)
    for extra, needle in (
        (("--operator-key-passphrase-file", str(bad)), "wrong passphrase"),
        ((), "encrypted; give --operator-key-passphrase-file"),
        (("--operator-key-passphrase-file", str(tmp_path / "none")), "none"),
    ):
        run = subprocess.run(
            [EDGECTL, "--broker", "mqtt://127.0.0.1:1", "--operator-key",
             str(operator["key_file"]), *extra, "ping", DEVICE],
            capture_output=True, text=True, timeout=60, env=checkout_env(),
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
        assert run.returncode == 2, run.stderr
        assert needle in run.stderr and run.stderr.count("\n") == 1, run.stderr


FLOOD = 2000


def test_a_command_flood_is_rate_limited_and_the_loop_is_unaffected(
    fleet_env: dict[str, Any], operator: dict[str, Any], tmp_path: Path
) -> None:
    """2,000 unsigned commands at once: at most the burst (plus the refill) is read, the rest is
    dropped unread and said in one ``command_rate_limited`` event with the count; results keep
    flowing without a seq gap, a signed ping afterwards is answered, and nothing changes."""
    rate, burst = 2.0, 10
    # max_queued_messages 0: the broker itself drops nothing, so every command reaches the agent
    with Broker(tmp_path / "broker", extra_conf="max_queued_messages 0") as broker:
        cfg = _config(broker, fleet_env, tmp_path, fleet=f'operator_keys = ["{operator["pub"]}"]\n'
                      f"command_rate = {rate}\ncommand_burst = {burst}")  # fmt: skip
        with (
            Collector(broker, [f"{TOPICS.base}/#"]) as consumer,
            AgentProcess(tmp_path, cfg) as agent,
        ):
            _online(consumer, agent)
            consumer.wait_for(lambda m: len(payloads(m, "/results")) >= 5, timeout=20)
            before = len(payloads(consumer.messages, "/results"))
            names = ("ping", "reload", "rollback", "update")
            attacker = Collector(broker)
            attacker.client.max_inflight_messages_set(500)
            attacker.connect()
            t0 = time.monotonic()
            try:
                for i in range(FLOOD):
                    name = names[i % len(names)]
                    body = {"schema": 1, "id": f"flood-{i}", "sha256": "ab" * 32,
                            "allow_downgrade": True}  # fmt: skip
                    info = attacker.client.publish(TOPICS.command(name), protocol.dumps(body), 1)
                info.wait_for_publish(30)
                assert info.is_published()
                # a desired state in the flood's wake waits for the bucket, it is not lost
                attacker.publish(TOPICS.desired, protocol.dumps(_desired("cd" * 32)))
            finally:
                attacker.close()

            def flood_replies(msgs: list[Any]) -> list[dict[str, Any]]:
                return [
                    r for r in payloads(msgs, "/reply") if str(r.get("id")).startswith("flood-")
                ]

            def accounted(msgs: list[Any]) -> bool:
                dropped = sum(e["details"]["dropped"] for e in events(msgs, "command_rate_limited"))
                return dropped + len(flood_replies(msgs)) == FLOOD

            try:
                msgs = consumer.wait_for(accounted, timeout=30)
            except AssertionError:
                said = events(consumer.messages, "command_rate_limited")
                raise AssertionError(f"{said}; replies {len(flood_replies(consumer.messages))}; "
                                     f"log: {agent.text()[-2000:]}") from None  # fmt: skip
            elapsed = time.monotonic() - t0
            said = events(msgs, "command_rate_limited")
            assert len(said) == 1, said  # one event for the whole burst, not one per drop
            assert "[fleet] command_rate" in said[0]["reason"]
            replies = flood_replies(msgs)
            # what was read: at most the burst and what refilled meanwhile (a bound, not a timing)
            assert len(replies) <= burst + rate * elapsed + 1, (len(replies), elapsed)
            assert all(r["ok"] is False and "unsigned" in r["error"] for r in replies), replies[:3]
            _refused(consumer, "desired for device cam-1: unsigned")

            # Later, a legitimate (signed) command is answered.
            signed = ("--operator-key", str(operator["key_file"]),
                      "--operator-key-passphrase-file", str(operator["pass"]))  # fmt: skip
            run = edgectl(*signed, "ping", DEVICE, broker=broker.url)
            assert run.returncode == 0 and "pong" in run.stdout, run.stdout + run.stderr
            # The loop went on: more results, every seq once, none missing.
            consumer.wait_for(lambda m: len(payloads(m, "/results")) >= before + 10, timeout=20)
            assert agent.stop() == 0, agent.text()[-2000:]
    msgs = consumer.messages
    seqs = sorted({r["seq"] for r in payloads(msgs, "/results")})
    assert seqs == list(range(seqs[0], seqs[-1] + 1)), "a gap in the results"
    assert not events(msgs, "update_started") and not events(msgs, "rolled_back")
    assert payloads(msgs, "/reported")[-1]["model"]["version"] == "1.0.0"


def test_token_bucket_refills_and_reports_once_per_window() -> None:
    from edge_agent.common.ratelimit import QUIET_S, TokenBucket

    now = [100.0]
    bucket = TokenBucket(rate=2.0, burst=3, window=10.0, clock=lambda: now[0])
    assert [bucket.take() for _ in range(5)] == [True, True, True, False, False]
    assert not bucket.take(count=False)  # to be retried (a desired state): not a drop
    assert bucket.report() is None  # still flooding: wait until it settles
    now[0] += QUIET_S
    assert bucket.report() == 2 and bucket.report() is None
    assert bucket.take() and bucket.take() and not bucket.take()  # 2 tokens refilled in 1 s
    now[0] += QUIET_S
    assert bucket.report() is None  # one report per window
    for _ in range(100):  # a flood that never stops is said once the window has passed
        now[0] += 0.1
        bucket.take()
    assert bucket.report() is not None
    assert TokenBucket(rate=0, burst=1).take() and TokenBucket(rate=0, burst=1).take()
    with pytest.raises(ValueError, match="burst = 0"):
        TokenBucket(rate=1, burst=0)
    from edge_agent.config import FleetSection

    for bad, needle in (({"command_rate": -1.0}, "command_rate = -1.0: must be >= 0"),
                        ({"command_burst": 0}, "command_burst = 0: must be >= 1")):  # fmt: skip
        with pytest.raises(ConfigError, match=needle):
            FleetSection(**bad)


def test_the_response_topic_is_covered_by_the_signature(
    broker: Broker, fleet_env: dict[str, Any], operator: dict[str, Any], tmp_path: Path
) -> None:
    """A signed ``reply_to`` is where the reply goes; a Response Topic changed in transit is
    refused; one no signature covers gets the reply on the fixed reply topic only."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    def props(topic: str) -> Properties:
        p = Properties(PacketTypes.PUBLISH)
        p.ResponseTopic = topic
        return p

    cfg = _config(broker, fleet_env, tmp_path, fleet=f'operator_keys = ["{operator["pub"]}"]')
    key, ping = operator["key"], TOPICS.command("ping")
    signed_to, unsigned_to = protocol.response_topic("t1"), protocol.response_topic("t2")
    watched = [f"{TOPICS.base}/#", "edge/edgectl/#", protocol.Topics("cam-2").desired]
    with Collector(broker, watched) as consumer, AgentProcess(tmp_path, cfg) as agent:
        _online(consumer, agent)
        order = _signed({"schema": 1, "id": "a"}, key, ping, reply_to=signed_to)
        consumer.publish(ping, order, properties=props(signed_to))
        consumer.wait_for(lambda m: any(x.topic == signed_to for x in m), timeout=10)
        order = _signed({"schema": 1, "id": "b"}, key, ping)  # signed without a reply_to
        consumer.publish(ping, order, properties=props(unsigned_to))
        consumer.wait_for(lambda m: any(r["id"] == "b" for r in payloads(m, "/cmd/ping/reply")),
                          timeout=10)  # fmt: skip
        order = _signed({"schema": 1, "id": "c"}, key, ping, reply_to=signed_to)
        consumer.publish(ping, order, properties=props(protocol.Topics("cam-2").desired))
        _refused(consumer, "is not the one signed")
        assert agent.stop() == 0, agent.text()[-2000:]
    msgs = consumer.messages
    assert not [m for m in msgs if m.topic in (unsigned_to, protocol.Topics("cam-2").desired)]
    assert [json.loads(m.payload)["id"] for m in msgs if m.topic == signed_to] == ["a"]
