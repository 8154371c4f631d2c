"""A small certificate authority for the broker's mutual TLS: ``edgectl ca`` and
``edgectl provision --cert``.

::

    edgectl ca init --out fleet/ca                         fleet/ca/ca.crt, ca.key (0600)
    edgectl ca server broker.example 10.0.0.5 --out fleet/broker
                                                           server.crt, server.key (0600), ca.crt
    edgectl provision cam-1 --out fleet --cert             fleet/users/cam-1/client.crt, ...

Keys are ECDSA P-256 (what Mosquitto's OpenSSL and every TLS stack on a device speak), written
only to 0600 files, atomically. Certificates are X.509 v3 signed with SHA-256:

- the CA: ``CN = <name>``, ``BasicConstraints(ca=True, path_length=0)``, key usage cert and CRL
  signing; 10 years by default.
- the broker: ``CN`` = the first host name, a ``subjectAltName`` per host name (an IP address
  becomes an ``iPAddress`` entry, anything else a ``dNSName``), extended key usage serverAuth.
- a device (or an operator, a consumer): ``CN`` = its MQTT user name, extended key usage
  clientAuth. With Mosquitto's ``use_identity_as_username true`` the CN *is* the user name, so
  the same ACL (``edgectl acl``) applies to certificate identities.

There is no revocation list: to shut a device out, remove it from the register and regenerate
the ACL (it then may publish and read nothing), and issue the CA anew when its key is lost.
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edge_agent.common.durable import atomic_write
from edge_agent.errors import EdgeError

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
SERVER_CERT = "server.crt"
SERVER_KEY = "server.key"
CLIENT_CERT = "client.crt"
CLIENT_KEY = "client.key"
CA_DAYS = 3650
LEAF_DAYS = 825  # the longest a public CA may issue; a fleet rotates with --rotate
_BACKDATE = datetime.timedelta(hours=1)  # devices whose clock lags a little still accept it


@dataclass(frozen=True)
class Authority:
    """A CA's certificate and private key, as loaded from its directory."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    directory: Path

    @property
    def cert_path(self) -> Path:
        return self.directory / CA_CERT


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=not ca, key_cert_sign=ca, crl_sign=ca,
        encipher_only=False, decipher_only=False,
    )  # fmt: skip


def subject_alt_names(hosts: Sequence[str]) -> list[x509.GeneralName]:
    """``dNSName`` per host name, ``iPAddress`` per address (EdgeError for an empty or bad one)."""
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
            continue
        except ValueError:
            pass
        label = host.rstrip(".")
        ok = bool(label) and len(label) <= 253 and all(
            part and len(part) <= 63 and part.replace("-", "").replace("*", "").isalnum()
            and part.isascii() for part in label.split(".")
        )  # fmt: skip
        if not ok:
            raise EdgeError(f"host {host!r}: not a DNS name or an IP address")
        names.append(x509.DNSName(label))
    return names


def issue(
    *,
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: Authority | None,
    days: int,
    role: str,
    hosts: Sequence[str] = (),
) -> x509.Certificate:
    """A certificate for ``key``: ``role`` is ``ca`` (self-signed when ``issuer`` is None),
    ``server`` (with ``hosts`` as subjectAltNames) or ``client``."""
    if days < 1:
        raise EdgeError(f"--days {days}: must be at least 1")
    now = datetime.datetime.now(datetime.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    signer_key = key if issuer is None else issuer.key
    is_ca = role == "ca"
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name if issuer is None else issuer.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(
            x509.BasicConstraints(ca=is_ca, path_length=0 if is_ca else None), critical=True
        )
        .add_extension(_key_usage(ca=is_ca), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signer_key.public_key()),
            critical=False,
        )
    )
    if role == "server":
        builder = builder.add_extension(
            x509.SubjectAlternativeName(subject_alt_names(hosts)), critical=False
        ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    elif role == "client":
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
    return builder.sign(signer_key, hashes.SHA256())


def _write_pair(
    directory: Path,
    cert_name: str,
    key_name: str,
    cert: x509.Certificate,
    key: ec.EllipticCurvePrivateKey,
) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    atomic_write(directory / key_name, _pem_key(key), mode=0o600)
    atomic_write(directory / cert_name, _pem_cert(cert), mode=0o644)
    return [directory / key_name, directory / cert_name]


def init_ca(out: Path, *, name: str = "edge fleet CA", days: int = CA_DAYS) -> list[Path]:
    """A new CA in ``out`` (``ca.crt``, ``ca.key`` 0600); refused where one exists."""
    if (out / CA_KEY).exists() or (out / CA_CERT).exists():
        raise EdgeError(
            f"{out}: already holds a CA ({CA_CERT}, {CA_KEY}); every certificate it issued "
            "depends on it: remove it yourself to start again"
        )
    if not name.strip():
        raise EdgeError("--name: the CA's name is empty")
    key = ec.generate_private_key(ec.SECP256R1())
    cert = issue(subject=name, key=key, issuer=None, days=days, role="ca")
    return _write_pair(out, CA_CERT, CA_KEY, cert, key)


def load_ca(directory: Path) -> Authority:
    """The CA in ``directory`` (EdgeError naming the file when it is missing or not a CA)."""
    cert_path, key_path = directory / CA_CERT, directory / CA_KEY
    for path in (cert_path, key_path):
        if not path.is_file():
            raise EdgeError(
                f"{path}: no such file (make the CA with edgectl ca init --out {directory})"
            )
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise EdgeError(f"{directory}: not a CA made by edgectl ca init ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise EdgeError(f"{key_path}: not an EC private key")
    if cert.public_key().public_numbers() != key.public_key().public_numbers():  # type: ignore[union-attr]
        raise EdgeError(f"{directory}: {CA_CERT} and {CA_KEY} do not belong together")
    return Authority(cert=cert, key=key, directory=directory)


def issue_server(
    ca: Authority, hosts: Sequence[str], out: Path, *, days: int = LEAF_DAYS
) -> list[Path]:
    """The broker's certificate for ``hosts`` in ``out`` (``server.crt``, ``server.key``), with a
    copy of the CA certificate beside it (Mosquitto's ``cafile``)."""
    if not hosts:
        raise EdgeError("no host names: name the broker as the devices reach it")
    subject_alt_names(hosts)  # every name checked before anything is written
    key = ec.generate_private_key(ec.SECP256R1())
    cert = issue(subject=hosts[0], key=key, issuer=ca, days=days, role="server", hosts=hosts)
    written = _write_pair(out, SERVER_CERT, SERVER_KEY, cert, key)
    atomic_write(out / CA_CERT, _pem_cert(ca.cert), mode=0o644)
    return [*written, out / CA_CERT]


def issue_client(ca: Authority, name: str, out: Path, *, days: int = LEAF_DAYS) -> list[Path]:
    """A client certificate with ``CN = name`` in ``out`` (``client.crt``, ``client.key``,
    and ``ca.crt`` to check the broker with)."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = issue(subject=name, key=key, issuer=ca, days=days, role="client")
    written = _write_pair(out, CLIENT_CERT, CLIENT_KEY, cert, key)
    atomic_write(out / CA_CERT, _pem_cert(ca.cert), mode=0o644)
    return [*written, out / CA_CERT]


def mosquitto_listener(server_dir: Path, *, port: int = 8883) -> str:
    """The ``mosquitto.conf`` lines of a mutual-TLS listener using ``server_dir``'s files."""
    d = server_dir.resolve()
    return (
        f"listener {port}\n"
        f"cafile {d / CA_CERT}\n"
        f"certfile {d / SERVER_CERT}\n"
        f"keyfile {d / SERVER_KEY}\n"
        "require_certificate true\n"
        "use_identity_as_username true\n"
    )


__all__ = [
    "CA_CERT",
    "CA_KEY",
    "CLIENT_CERT",
    "CLIENT_KEY",
    "SERVER_CERT",
    "SERVER_KEY",
    "Authority",
    "init_ca",
    "issue",
    "issue_client",
    "issue_server",
    "load_ca",
    "mosquitto_listener",
    "subject_alt_names",
]
