"""Per-device credentials and the generated ACL (issue 16, point 2), against a real Mosquitto
started with the password file ``edgectl provision`` keeps and the ACL ``edgectl acl --mosquitto``
prints (``allow_anonymous false``): the provisioning steps of docs/security.md, as written; a
provisioned device works end to end; an attacker holding one device's credentials is refused by
the broker, each attack a test (MQTT 5 PUBACK "Not authorized", and a second, authorized
subscriber sees nothing)."""

from __future__ import annotations

import json
import stat
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from edge_agent.fleet import protocol
from edgectl.acl import mosquitto_acl
from edgectl.provision import User, load_users
from tests.broker import Broker, Collector
from tests.fleet import (  # noqa: F401  (fleet_env_fixture: the `fleet_env` fixture)
    AgentProcess,
    doc_steps,
    edgectl,
    events,
    fleet_env_fixture,
    payloads,
    provisioned_config,
    run_doc_steps,
    wait_serving,
)

NOWHERE = "mqtt://127.0.0.1:1"  # provision and acl never connect
CAM1, CAM2 = protocol.Topics("cam-1"), protocol.Topics("cam-2")
NOT_AUTHORIZED = 0x87
SHA = "ab" * 32


def _run(*args: str, broker: str = NOWHERE) -> str:
    run = edgectl(*args, broker=broker)
    assert run.returncode == 0, run.stderr
    return run.stdout


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """docs/security.md's steps, run as written (in a scratch directory), plus a second device
    for the attacks; then the ACL again from the register."""
    root = tmp_path_factory.mktemp("acl")
    steps = doc_steps("### A new device, from nothing")
    assert len(steps) == 4 and steps[-1].endswith("> fleet/acl"), steps
    run_doc_steps(steps, cwd=root)
    out = root / "fleet"
    _run("provision", "cam-2", "--out", str(out))
    (out / "acl").write_text(_run("acl", "--mosquitto", "--devices-from", str(out)))
    return out


@pytest.fixture(scope="module")
def secure_broker(fleet: Path) -> Iterator[Broker]:
    with Broker(
        fleet.parent / "broker", password_file=fleet / "passwd", acl_file=fleet / "acl"
    ) as b:
        yield b


def _password(fleet: Path, name: str) -> str:
    return (fleet / "users" / name / "mqtt-password").read_text().strip()


def _client(broker: Broker, fleet: Path, name: str, topics: list[str] = [], **kw: Any) -> Collector:  # noqa: B006
    return Collector(broker, topics, username=name, password=_password(fleet, name), **kw)


# --- provisioning ----------------------------------------------------------------------------


def test_provision_writes_secrets_0600_and_never_prints_them(fleet: Path) -> None:
    home = fleet / "users" / "cam-1"
    for secret in (home / "mqtt-password", fleet / "passwd"):
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600, secret
    password = _password(fleet, "cam-1")
    assert len(password) >= 32
    passwd = (fleet / "passwd").read_text()
    assert password not in passwd and "cam-1:$7$101$" in passwd
    assert sorted(line.split(":")[0] for line in passwd.splitlines()) == [
        "cam-1", "cam-2", "ops", "reader"
    ]  # fmt: skip
    snippet = tomllib.loads((home / "agent.toml").read_text())
    assert snippet == {
        "agent": {"device_id": "cam-1"},
        "mqtt": {"username": "cam-1", "password_file": "mqtt-password", "groups": ["lobby"]},
    }
    again = edgectl("provision", "cam-1", "--out", str(fleet), broker=NOWHERE)
    assert again.returncode == 2 and "already provisioned" in again.stderr
    assert password not in again.stdout + again.stderr


def test_rotate_replaces_the_password_entry(tmp_path: Path) -> None:
    out = tmp_path / "f"
    printed = _run("provision", "cam-9", "--out", str(out))
    first = _password(out, "cam-9")
    printed += _run("provision", "cam-9", "--out", str(out), "--rotate")
    assert _password(out, "cam-9") != first
    assert (out / "passwd").read_text().count("cam-9:") == 1
    assert first not in printed and _password(out, "cam-9") not in printed


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["provision", "bad/name", "--out", "x"], "user name 'bad/name'"),
        (["provision", "ops", "--role", "operator", "--group", "g", "--out", "x"], "only devices"),
        (["acl", "--mosquitto", "--group", "cam-1"], "expected DEVICE=GROUP"),
        (["acl", "--mosquitto", "--device", "edgectl"], "reserved topic level"),
        (
            ["acl", "--mosquitto", "--device", "ops", "--operator-user", "ops"],
            "both device and operator",
        ),
        (["acl", "--mosquitto"], "no users"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args: list[str], needle: str, tmp_path: Path) -> None:
    run = edgectl(*[a.replace("x", str(tmp_path / "x")) if a == "x" else a for a in args],
                  broker=NOWHERE)  # fmt: skip
    assert run.returncode == 2, run
    assert needle in run.stderr and len(run.stderr.strip().splitlines()) == 1, run.stderr


def test_acl_options_match_the_register(fleet: Path) -> None:
    from_register = mosquitto_acl(load_users(fleet))
    from_options = mosquitto_acl(
        [User(name="cam-1", groups=("lobby",)), User(name="cam-2"),
         User(name="ops", role="operator"), User(name="reader", role="consumer")]
    )  # fmt: skip
    assert from_register == from_options == (fleet / "acl").read_text()
    assert "pattern write edge/%u/#" not in from_register  # the old, wrong suggestion


# --- the broker refuses ----------------------------------------------------------------------


def test_anonymous_and_wrong_password_are_refused(secure_broker: Broker) -> None:
    with pytest.raises(ConnectionRefusedError):
        Collector(secure_broker).connect()
    with pytest.raises(ConnectionRefusedError):
        Collector(secure_broker, username="cam-1", password="guess").connect()


@pytest.fixture(scope="module")
def watcher(secure_broker: Broker, fleet: Path) -> Iterator[Collector]:
    """The operator, reading everything: it must never see what the broker refused."""
    with _client(secure_broker, fleet, "ops", ["edge/#"]) as c:
        yield c


ATTACKS = {
    "another device's desired": (CAM2.desired, True),
    "a group's desired": (protocol.group_desired_topic("lobby"), True),
    "a command to another device": (CAM2.command("update"), False),
    "its own desired": (CAM1.desired, True),
    "a command to itself": (CAM1.command("rollback"), False),
    "a bundle's meta": (protocol.bundle_meta_topic(SHA), True),
    "a bundle's chunk": (protocol.bundle_chunk_topic(SHA, 0), True),
    "another device's telemetry": (CAM2.telemetry, True),
    "another device's status": (CAM2.status, True),
    "another device's command reply": (CAM2.reply("ping"), False),
    "another device's samples": (f"{CAM2.base}/samples/0000000000000001-abcdef/meta", True),
}


@pytest.mark.parametrize("what", list(ATTACKS))
def test_device_credentials_cannot_publish(
    what: str, secure_broker: Broker, fleet: Path, watcher: Collector
) -> None:
    topic, retain = ATTACKS[what]
    payload = json.dumps({"schema": 1, "bundle": {"sha256": SHA}, "allow_downgrade": True})
    with _client(secure_broker, fleet, "cam-1") as attacker:
        rc = attacker.publish(topic, payload, retain=retain)
        assert rc is not None and rc.value == NOT_AUTHORIZED, rc
        attacker.publish(CAM1.events, b'{"sentinel": 1}')  # same connection: delivered after
    msgs = watcher.wait_for(lambda m: any(x.payload == b'{"sentinel": 1}' for x in m))
    assert not [m for m in msgs if m.topic == topic], f"{what}: the broker delivered it"
    watcher.clear()


def test_consumer_cannot_publish_orders(secure_broker: Broker, fleet: Path) -> None:
    with _client(secure_broker, fleet, "reader") as consumer:
        for topic in (CAM1.desired, CAM1.command("ping"), protocol.bundle_meta_topic(SHA)):
            rc = consumer.publish(topic, b"{}")
            assert rc is not None and rc.value == NOT_AUTHORIZED, (topic, rc)


@pytest.mark.parametrize(
    "subscription",
    [CAM2.commands, CAM2.desired, "edge/#", "edge/+/cmd/+", "#",
     f"$share/x/{CAM2.commands}", f"$share/x/{CAM2.desired}", "$share/x/edge/#"],
)  # fmt: skip
def test_device_credentials_cannot_read_another_device(
    subscription: str, secure_broker: Broker, fleet: Path
) -> None:
    """Refused at SUBACK, or subscribed and never delivered: either way nothing arrives."""
    with _client(secure_broker, fleet, "cam-1", [CAM1.commands]) as attacker:
        try:
            attacker.subscribe(subscription)
        except ConnectionError as exc:
            assert "refused" in str(exc)
        with _client(secure_broker, fleet, "ops", [CAM2.command("ping")]) as ops:
            ops.publish(CAM2.command("ping"), b'{"id": "secret"}')
            ops.publish(CAM2.desired, b'{"secret": 1}', retain=True)
            ops.wait_for(lambda m: len(m) >= 1)  # delivered to an authorized reader
            ops.publish(CAM2.desired, b"", retain=True)
            with _client(secure_broker, fleet, "cam-2") as cam2:
                cam2.publish(CAM2.telemetry, b'{"secret": 2}')
            ops.publish(CAM1.command("ping"), b"sentinel")  # after the rest, on its own topic
        msgs = attacker.wait_for(lambda m: any(x.payload == b"sentinel" for x in m))
    assert not [m for m in msgs if m.topic.startswith(CAM2.base)], msgs


def test_a_consumer_reads_through_a_shared_subscription(secure_broker: Broker, fleet: Path) -> None:
    """``$share/<group>/edge/+/telemetry`` (a collector's): the consumer's read rights apply to
    what is delivered, so it receives telemetry and none of the orders."""
    shared = ["$share/db/edge/+/telemetry", "$share/db/edge/+/desired", "$share/db/edge/+/cmd/+"]
    with _client(secure_broker, fleet, "reader", shared) as reader:
        with _client(secure_broker, fleet, "ops") as ops:
            ops.publish(CAM2.command("ping"), b'{"id": "secret"}')
            ops.publish(CAM2.desired, b'{"secret": 1}')
        with _client(secure_broker, fleet, "cam-2") as cam2:
            cam2.publish(CAM2.telemetry, b'{"t": 1}')
        msgs = reader.wait_for(lambda m: any(x.topic == CAM2.telemetry for x in m))
    assert [m.topic for m in msgs] == [CAM2.telemetry], msgs


# --- a provisioned device works --------------------------------------------------------------


def test_provisioned_device_works_end_to_end_under_the_acl(
    secure_broker: Broker, fleet: Path, fleet_env: dict[str, Any], tmp_path: Path
) -> None:
    """Telemetry and results reach the consumer, `edgectl ping` is answered over MQTT 5 and on
    the 3.1.1 reply topic, and an OTA to its group over MQTT chunks commits."""
    home = fleet / "users" / "cam-1"
    cfg = provisioned_config(home, broker=secure_broker.url, fleet_env=fleet_env,
                             state_dir=tmp_path / "state")  # fmt: skip
    ops = ("--username", "ops", "--password-file", str(fleet / "users" / "ops" / "mqtt-password"))
    reader_topics = [
        protocol.fleet_topic(k) for k in ("results", "telemetry", "events", "reported")
    ]
    with (
        _client(secure_broker, fleet, "reader", reader_topics) as reader,
        AgentProcess(tmp_path, cfg, env={"CREDENTIALS_DIRECTORY": str(home)}) as agent,
    ):
        wait_serving(reader, agent)
        run = edgectl(*ops, "ping", "cam-1", broker=secure_broker.url)
        assert run.returncode == 0 and "pong" in run.stdout, run.stdout + run.stderr
        with _client(secure_broker, fleet, "ops", [CAM1.reply("ping")], v311=True) as old:
            old.publish(CAM1.command("ping"), b'{"id": "v311"}')
            replies = old.wait_for(lambda m: bool(payloads(m, "/cmd/ping/reply")), timeout=10)
            assert payloads(replies, "/cmd/ping/reply")[0]["id"] == "v311"
        v110 = fleet_env["root"] / "digits-1.1.0.edgebundle"
        run = edgectl(*ops, "deploy", str(v110), "--group", "lobby", broker=secure_broker.url)
        assert run.returncode == 0, run.stderr

        def committed(msgs: list[Any]) -> bool:
            return bool(events(msgs, "update_committed")) and any(
                (r.get("update") or {}).get("state") == "committed"
                for r in payloads(msgs, "/reported")
            )

        try:
            reader.wait_for(committed, timeout=30)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; log: {agent.text()[-3000:]}") from None
    assert "not authorized" not in agent.text().lower(), agent.text()[-2000:]
