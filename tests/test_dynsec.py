"""The dynamic-security form of the ACL (issue 16): ``edgectl acl --dynsec`` against a real
Mosquitto running its dynamic-security plugin with the generated JSON (users, password hashes
and roles from ``edgectl provision``): a representative subset of the ACL attacks is refused,
shared subscriptions work for a consumer and not across devices, and a provisioned device works
end to end."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edge_agent.fleet import protocol
from edgectl.cli import main as edgectl_main
from tests.broker import Broker, Collector, dynsec_plugin
from tests.fleet import (  # noqa: F401  (fleet_env_fixture: the `fleet_env` fixture)
    AgentProcess,
    edgectl,
    fleet_env_fixture,
    provisioned_config,
    wait_serving,
)

pytestmark = pytest.mark.skipif(dynsec_plugin() is None, reason="no mosquitto_dynamic_security.so")

CAM1, CAM2 = protocol.Topics("cam-1"), protocol.Topics("cam-2")
NOT_AUTHORIZED = 0x87
NOWHERE = "mqtt://127.0.0.1:1"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dynsec") / "fleet"
    for args in (["cam-1", "--group", "lobby"], ["cam-2"], ["ops", "--role", "operator"],
                 ["reader", "--role", "consumer"]):  # fmt: skip
        assert edgectl_main(["--broker", NOWHERE, "provision", *args, "--out", str(out)]) == 0
    run = edgectl("acl", "--dynsec", "--devices-from", str(out), "--admin-user", "ops",
                  broker=NOWHERE)  # fmt: skip
    assert run.returncode == 0, run.stderr
    (out / "dynsec.json").write_text(run.stdout)
    return out


@pytest.fixture(scope="module")
def dynsec_broker(fleet: Path) -> Iterator[Broker]:
    with Broker(fleet.parent / "broker", dynsec=fleet / "dynsec.json") as broker:
        yield broker


def _password(fleet: Path, name: str) -> str:
    return (fleet / "users" / name / "mqtt-password").read_text().strip()


def _as(broker: Broker, fleet: Path, name: str, topics: list[str] = [], **kw: Any) -> Collector:  # noqa: B006
    return Collector(broker, topics, username=name, password=_password(fleet, name), **kw)


def test_the_json_holds_roles_and_the_provisioned_hashes(fleet: Path) -> None:
    config = json.loads((fleet / "dynsec.json").read_text())
    assert config["defaultACLAccess"] == {"publishClientSend": False,
        "publishClientReceive": False, "subscribe": False, "unsubscribe": True}  # fmt: skip
    clients = {c["username"]: c for c in config["clients"]}
    assert sorted(clients) == ["cam-1", "cam-2", "ops", "reader"]
    assert clients["cam-1"]["roles"] == [{"rolename": "edge-device-cam-1"}]
    assert clients["ops"]["roles"] == [{"rolename": "edge-operator"},
                                       {"rolename": "edge-dynsec-admin"}]  # fmt: skip
    for args, needle in (
        (["--dynsec", "--admin-user", "cam-1"], "not an operator"),
        (["--mosquitto", "--admin-user", "ops"], "only with --dynsec"),
    ):
        run = edgectl("acl", *args, "--devices-from", str(fleet), broker=NOWHERE)
        assert run.returncode == 2 and needle in run.stderr and run.stderr.count("\n") == 1, run
    assert clients["cam-1"]["iterations"] == 101 and len(clients["cam-1"]["salt"]) == 16
    assert _password(fleet, "cam-1") not in (fleet / "dynsec.json").read_text()
    role = next(r for r in config["roles"] if r["rolename"] == "edge-device-cam-1")
    reads = {a["topic"] for a in role["acls"] if a["acltype"] == "publishClientReceive"}
    assert reads == {CAM1.desired, CAM1.commands, "edge/groups/lobby/desired", "edge/bundles/#"}


def test_wrong_password_and_anonymous_are_refused(dynsec_broker: Broker) -> None:
    for kw in ({}, {"username": "cam-1", "password": "guess"}):
        with pytest.raises(ConnectionRefusedError):
            Collector(dynsec_broker, **kw).connect()


@pytest.fixture(scope="module")
def watcher(dynsec_broker: Broker, fleet: Path) -> Iterator[Collector]:
    with _as(dynsec_broker, fleet, "ops", ["edge/#"]) as c:
        yield c


ATTACKS = {
    "another device's desired": CAM2.desired,
    "a group's desired": protocol.group_desired_topic("lobby"),
    "a command to another device": CAM2.command("update"),
    "its own desired": CAM1.desired,
}


@pytest.mark.parametrize("what", list(ATTACKS))
def test_device_credentials_cannot_publish_orders(
    what: str, dynsec_broker: Broker, fleet: Path, watcher: Collector
) -> None:
    topic = ATTACKS[what]
    with _as(dynsec_broker, fleet, "cam-1") as attacker:
        rc = attacker.publish(topic, b'{"allow_downgrade": true}', retain=True)
        assert rc is not None and rc.value == NOT_AUTHORIZED, (what, rc)
        attacker.publish(CAM1.events, b'{"sentinel": 1}')
    msgs = watcher.wait_for(lambda m: any(x.payload == b'{"sentinel": 1}' for x in m))
    assert not [m for m in msgs if m.topic == topic], f"{what}: the broker delivered it"
    watcher.clear()


def test_shared_subscriptions_for_consumers_not_across_devices(
    dynsec_broker: Broker, fleet: Path
) -> None:
    """A consumer reads telemetry through ``$share``; a device's ``$share`` filter on another
    device's orders is refused at SUBACK (and would deliver nothing)."""
    with _as(dynsec_broker, fleet, "reader", ["$share/db/edge/+/telemetry"]) as reader:
        with _as(dynsec_broker, fleet, "cam-1", [CAM1.commands]) as attacker:
            for stolen in ("$share/x/edge/cam-2/cmd/+", "$share/x/edge/cam-2/desired",
                           "$share/x/edge/#"):  # fmt: skip
                with pytest.raises(ConnectionError, match="refused"):
                    attacker.subscribe(stolen)
            with _as(dynsec_broker, fleet, "cam-2") as cam2:
                cam2.publish(CAM2.telemetry, b'{"t": 1}')
            with _as(dynsec_broker, fleet, "ops") as ops:
                ops.publish(CAM2.command("ping"), b'{"id": "secret"}')
                ops.publish(CAM1.command("ping"), b"sentinel")  # after the rest, its own topic
            reader.wait_for(lambda m: any(x.topic == CAM2.telemetry for x in m))
            msgs = attacker.wait_for(lambda m: any(x.payload == b"sentinel" for x in m))
        assert not [m for m in msgs if m.topic.startswith(CAM2.base)], msgs


def test_a_device_works_end_to_end_under_dynsec(
    dynsec_broker: Broker, fleet: Path, fleet_env: dict[str, Any], tmp_path: Path
) -> None:
    """The agent with provision's snippet: results and telemetry reach the consumer, and an
    operator's ``edgectl ping`` (MQTT 5, reply on edgectl's Response Topic) is answered."""
    home = fleet / "users" / "cam-1"
    cfg = provisioned_config(home, broker=dynsec_broker.url, fleet_env=fleet_env,
                             state_dir=tmp_path / "state")  # fmt: skip
    ops = ("--username", "ops", "--password-file", str(fleet / "users" / "ops" / "mqtt-password"))
    with (
        _as(dynsec_broker, fleet, "reader", [CAM1.results, CAM1.telemetry]) as reader,
        AgentProcess(tmp_path, cfg, env={"CREDENTIALS_DIRECTORY": str(home)}) as agent,
    ):
        wait_serving(reader, agent)
        run = edgectl(*ops, "ping", "cam-1", broker=dynsec_broker.url)
        assert run.returncode == 0 and "pong" in run.stdout, run.stdout + run.stderr
    assert "not authorized" not in agent.text().lower(), agent.text()[-2000:]


def test_an_admin_operator_runs_mosquitto_ctrl_and_a_device_cannot(
    dynsec_broker: Broker, fleet: Path
) -> None:
    """``--admin-user ops``: ops changes cam-2's password with ``mosquitto_ctrl dynsec`` (the
    new one works, the old one no longer); a device's publish to the plugin's control topic is
    refused. Last in the module: it changes cam-2's password."""
    ctrl = shutil.which("mosquitto_ctrl")
    if ctrl is None:
        pytest.skip("no mosquitto_ctrl (package mosquitto-clients)")
    old, new = _password(fleet, "cam-2"), "rotated-by-mosquitto-ctrl"
    with _as(dynsec_broker, fleet, "cam-1") as device:
        rc = device.publish("$CONTROL/dynamic-security/v1", b'{"commands": []}')
        assert rc is not None and rc.value == NOT_AUTHORIZED, rc
    run = subprocess.run(
        [ctrl, "-h", dynsec_broker.host, "-p", str(dynsec_broker.port), "-u", "ops",
         "-P", _password(fleet, "ops"), "dynsec", "setClientPassword", "cam-2", new],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert run.returncode == 0 and "Error" not in run.stdout + run.stderr, run
    Collector(dynsec_broker, username="cam-2", password=new).connect().close()
    with pytest.raises(ConnectionRefusedError):
        Collector(dynsec_broker, username="cam-2", password=old).connect()
