"""Client certificates (issue 16, point 2): ``edgectl ca init``, ``edgectl ca server`` and
``edgectl provision --cert``, against a real Mosquitto with a mutual-TLS listener
(``require_certificate true``, ``use_identity_as_username true``) and the ACL ``edgectl acl``
prints: a device with its certificate works end to end, a client without one or with one from
another CA is refused, and the ACL applies to certificate identities."""

from __future__ import annotations

import stat
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from edge_agent.fleet import protocol
from edgectl.ca import init_ca, issue_client, load_ca
from edgectl.cli import main as edgectl_main
from tests.broker import Broker, Collector, TlsMaterial
from tests.fleet import (  # noqa: F401  (fleet_env_fixture: the `fleet_env` fixture)
    AgentProcess,
    doc_steps,
    edgectl,
    fleet_env_fixture,
    provisioned_config,
    run_doc_steps,
    wait_serving,
)

CAM1, CAM2 = protocol.Topics("cam-1"), protocol.Topics("cam-2")
NOT_AUTHORIZED = 0x87


def _ctl(*args: str) -> None:
    assert edgectl_main(["--broker", "mqtt://127.0.0.1:1", *args]) == 0, args


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """docs/security.md's certificate steps, run as written (a CA, the broker's certificate,
    certificates for cam-1 in group lobby, an operator and a consumer, the ACL), plus a second
    device for the attacks; then the ACL again from the register."""
    root = tmp_path_factory.mktemp("pki")
    steps = doc_steps("### With client certificates instead of passwords")
    assert len(steps) == 6 and steps[-1].endswith("> fleet/acl"), steps
    run_doc_steps(steps, cwd=root)
    fleet = root / "fleet"
    _ctl("provision", "cam-2", "--out", str(fleet), "--cert")
    run = edgectl("acl", "--mosquitto", "--devices-from", str(fleet), broker="mqtt://127.0.0.1:1")
    assert run.returncode == 0, run.stderr
    (fleet / "acl").write_text(run.stdout)
    return fleet


def _files(fleet: Path, name: str) -> tuple[Path, Path]:
    home = fleet / "users" / name
    return home / "client.crt", home / "client.key"


@pytest.fixture(scope="module")
def tls_broker(pki: Path) -> Iterator[Broker]:
    b = pki / "broker"
    tls = TlsMaterial(
        ca_cert=b / "ca.crt", server_cert=b / "server.crt", server_key=b / "server.key",
        client_cert=_files(pki, "ops")[0], client_key=_files(pki, "ops")[1],
        identity_as_username=True,
    )  # fmt: skip
    with Broker(pki.parent / "mosquitto", tls=tls, acl_file=pki / "acl") as broker:
        yield broker


def _as(broker: Broker, fleet: Path, name: str, topics: list[str] = [], **kw: Any) -> Collector:  # noqa: B006
    return Collector(broker, topics, cert_files=_files(fleet, name), **kw)


def test_the_ca_issues_what_mosquitto_and_the_agent_need(pki: Path, tmp_path: Path) -> None:
    for key in (pki / "ca" / "ca.key", pki / "broker" / "server.key", _files(pki, "cam-1")[1]):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    ca = x509.load_pem_x509_certificate((pki / "ca" / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((pki / "broker" / "server.crt").read_bytes())
    client = x509.load_pem_x509_certificate(_files(pki, "cam-1")[0].read_bytes())
    for cert in (server, client):
        cert.verify_directly_issued_by(ca)
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["broker.lan", "localhost"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    cn = client.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    usage = client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert cn == "cam-1" and list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    home = pki / "users" / "cam-1"
    assert not (home / "mqtt-password").exists()
    assert "cam-1" not in ((pki / "passwd").read_text() if (pki / "passwd").exists() else "")
    snippet = tomllib.loads((home / "agent.toml").read_text())
    assert snippet["mqtt"] == {"ca_file": "ca.crt", "cert_file": "client.crt",
                               "key_file": "client.key", "groups": ["lobby"]}  # fmt: skip
    # bad input: one line, exit 2, nothing written
    nowhere = "mqtt://127.0.0.1:1"
    for args, needle in (
        (["ca", "init", "--out", str(pki / "ca")], "already holds a CA"),
        (["ca", "server", "bad host", "--ca", str(pki / "ca"), "--out", str(tmp_path / "s")],
         "'bad host': not a DNS name or an IP address"),
        (["ca", "server", "h", "--ca", str(tmp_path), "--out", str(tmp_path / "s")],
         "ca.crt: no such file"),
        (["provision", "cam-9", "--out", str(tmp_path / "f"), "--cert"], "ca.crt: no such file"),
        (["provision", "cam-1", "--out", str(pki), "--cert"], "--rotate for a new certificate"),
    ):  # fmt: skip
        run = edgectl(*args, broker=nowhere)
        assert run.returncode == 2 and needle in run.stderr, (args, run.stderr)
        assert len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert not (tmp_path / "s").exists() and not (tmp_path / "f").exists()


def test_a_device_with_its_certificate_works_end_to_end(
    tls_broker: Broker, pki: Path, fleet_env: dict[str, Any], tmp_path: Path
) -> None:
    """The agent, configured with the snippet provision wrote: results and telemetry reach the
    consumer, an operator's ``edgectl ping`` (its own certificate) is answered, and the device
    reads its retained desired state."""
    home = pki / "users" / "cam-1"
    cfg = provisioned_config(home, broker=tls_broker.url, fleet_env=fleet_env,
                             state_dir=tmp_path / "state")  # fmt: skip
    ops = pki / "users" / "ops"
    ops_tls = ("--ca-file", str(ops / "ca.crt"), "--cert-file", str(ops / "client.crt"),
               "--key-file", str(ops / "client.key"))  # fmt: skip
    with (
        _as(tls_broker, pki, "reader", [CAM1.results, CAM1.telemetry]) as reader,
        AgentProcess(tmp_path, cfg, env={"CREDENTIALS_DIRECTORY": str(home)}) as agent,
    ):
        wait_serving(reader, agent)
        run = edgectl(*ops_tls, "ping", "cam-1", broker=tls_broker.url)
        assert run.returncode == 0 and "pong" in run.stdout, run.stdout + run.stderr
    with _as(tls_broker, pki, "ops") as operator:
        assert not operator.publish(CAM1.desired, b'{"probe": 1}', retain=True).is_failure
        try:
            with _as(tls_broker, pki, "cam-1", [CAM1.desired]) as device:
                device.wait_for(lambda m: any(x.payload == b'{"probe": 1}' for x in m))
        finally:
            operator.publish(CAM1.desired, b"", retain=True)
    assert "not authorized" not in agent.text().lower(), agent.text()[-2000:]


def test_no_certificate_or_another_cas_is_refused(
    tls_broker: Broker, pki: Path, tmp_path: Path
) -> None:
    with pytest.raises(ConnectionError):
        Collector(tls_broker, client_cert=False).connect()
    init_ca(tmp_path / "rogue", name="edge fleet CA")  # same name, another key
    issue_client(load_ca(tmp_path / "rogue"), "cam-1", tmp_path / "rogue-cam-1")
    rogue = (tmp_path / "rogue-cam-1" / "client.crt", tmp_path / "rogue-cam-1" / "client.key")
    with pytest.raises(ConnectionError):
        Collector(tls_broker, cert_files=rogue).connect()


def test_the_acl_applies_to_certificate_identities(tls_broker: Broker, pki: Path) -> None:
    attacked = (CAM2.desired, CAM2.command("update"), protocol.group_desired_topic("lobby"))
    with _as(tls_broker, pki, "ops", ["edge/#"]) as watcher:
        with _as(tls_broker, pki, "cam-1") as attacker:
            for topic in attacked:
                rc = attacker.publish(topic, b'{"allow_downgrade": true}')
                assert rc is not None and rc.value == NOT_AUTHORIZED, (topic, rc)
            assert not attacker.publish(CAM1.telemetry, b'{"sentinel": 1}').is_failure
        msgs = watcher.wait_for(lambda m: any(x.payload == b'{"sentinel": 1}' for x in m))
    assert not [m for m in msgs if m.topic in attacked], msgs
