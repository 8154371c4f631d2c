"""Per-device broker credentials: ``edgectl provision``.

A provisioning directory (``--out DIR``) is the operator's register of broker users::

    DIR/passwd                       the broker's password_file (mosquitto format, 0600)
    DIR/users/<name>/user.json       name, role (device | operator | consumer), groups
    DIR/users/<name>/mqtt-password   the password (0600): copy it to the device (or operator)
    DIR/users/<name>/agent.toml      devices only: the [agent] and [mqtt] lines that go with it

With ``--cert`` (``cert=`` here) the user gets a client certificate from the fleet's CA
(``edgectl.ca``; ``DIR/ca`` unless ``--ca`` names another) instead of a password::

    DIR/users/<name>/client.crt      CN = <name>: with use_identity_as_username, its MQTT user
    DIR/users/<name>/client.key      its private key (0600)
    DIR/users/<name>/ca.crt          the CA, to check the broker's certificate with

``edgectl acl --devices-from DIR`` reads the register back (:func:`load_users`). Passwords are
random (:func:`secrets.token_urlsafe`), written only to 0600 files and never printed. The broker
entry is Mosquitto 2's ``$7$`` PBKDF2-SHA512 hash, computed here rather than by
``mosquitto_passwd -b`` (which would put the password in the process list).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from edge_agent.common.durable import atomic_write
from edge_agent.errors import EdgeError, ProtocolError
from edge_agent.fleet.protocol import DEFAULT_PREFIX, check_name

if TYPE_CHECKING:
    from edgectl.ca import Authority

ROLES = ("device", "operator", "consumer")
PASSWORD_FILE = "mqtt-password"
BROKER_PASSWD = "passwd"
#: mosquitto_passwd's defaults (Mosquitto 2): 101 PBKDF2 rounds, a 12-byte salt.
HASH_ITERATIONS = 101
_SALT_BYTES = 12


@dataclass(frozen=True)
class User:
    """One broker user: a device (username = device id), an operator or a consumer."""

    name: str
    role: str = "device"
    groups: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        try:
            check_name(self.name, "user name")
            for group in self.groups:
                check_name(group, "group")
        except ProtocolError as exc:
            raise EdgeError(str(exc)) from None
        if self.role not in ROLES:
            raise EdgeError(f"role {self.role!r}: expected one of {', '.join(ROLES)}")
        if self.groups and self.role != "device":
            raise EdgeError(f"{self.name}: only devices have groups (role {self.role})")


def mosquitto_password_hash(password: str, *, iterations: int = HASH_ITERATIONS) -> str:
    """Mosquitto 2's ``$7$<iterations>$<salt>$<hash>`` (PBKDF2-HMAC-SHA512, base64 fields)."""
    salt = os.urandom(_SALT_BYTES)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    b64 = base64.b64encode
    return f"$7${iterations}${b64(salt).decode()}${b64(digest).decode()}"


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically, mode 0600 from the start."""
    atomic_write(path, text.encode(), mode=0o600)


def set_password_entry(passwd: Path, user: str, password: str | None) -> None:
    """Add or replace ``user``'s line in a mosquitto password file (kept 0600); remove it
    when ``password`` is None."""
    lines: list[str] = []
    if passwd.exists():
        lines = [
            line
            for line in passwd.read_text().splitlines()
            if line.strip() and line.split(":", 1)[0] != user
        ]
    if password is not None:
        lines.append(f"{user}:{mosquitto_password_hash(password)}")
    elif not passwd.exists():
        return
    write_private(passwd, "\n".join(lines) + "\n")


def agent_snippet(user: User, *, prefix: str, cert: bool = False, broker: str = "") -> str:
    """The agent.toml lines that go with a device's credentials (a password, or with ``cert``
    a client certificate; ``broker``: an ``mqtts://`` URL to name, else a placeholder)."""
    from edgectl.ca import CA_CERT, CLIENT_CERT, CLIENT_KEY

    groups = ", ".join(json.dumps(g) for g in user.groups)
    prefix_line = f'topic_prefix = "{prefix}"\n' if prefix != DEFAULT_PREFIX else ""
    if cert:
        url = (
            f'broker = "{broker}"\n'
            if broker.startswith("mqtts://")
            else '# broker = "mqtts://BROKER:8883"  (a host name in the broker\'s certificate)\n'
        )
        auth = (
            f"{url}"
            f"# bare names are looked up in $CREDENTIALS_DIRECTORY (systemd:\n"
            f"# LoadCredential={CLIENT_KEY}:/etc/edge-agent/credentials/{CLIENT_KEY}, ...)\n"
            f'ca_file = "{CA_CERT}"\n'
            f'cert_file = "{CLIENT_CERT}"\n'
            f'key_file = "{CLIENT_KEY}"\n'
        )
    else:
        auth = (
            f'username = "{user.name}"\n'
            f"# a bare name is looked up in $CREDENTIALS_DIRECTORY (systemd:\n"
            f"# LoadCredential={PASSWORD_FILE}:/etc/edge-agent/credentials/{PASSWORD_FILE})\n"
            f'password_file = "{PASSWORD_FILE}"\n'
        )
    return (
        f"# written by edgectl provision: merge into /etc/edge-agent/agent.toml\n"
        f"[agent]\n"
        f'device_id = "{user.name}"\n\n'
        f"[mqtt]\n"
        f"{auth}"
        f"groups = [{groups}]\n"
        f"{prefix_line}"
    )


def provision(
    out: Path,
    user: User,
    *,
    prefix: str = DEFAULT_PREFIX,
    rotate: bool = False,
    cert: Authority | None = None,
    broker: str = "",
    days: int = 825,
) -> tuple[Path, list[Path]]:
    """Give ``user`` a random password (its files under ``out/users/<name>/``, its entry in
    ``out/passwd``), or with ``cert`` a client certificate from that CA instead. Returns
    ``(user directory, files written)``. An existing user is refused unless ``rotate`` (a new
    password or certificate; a rotated password stops working when the broker reloads)."""
    from edgectl.ca import issue_client

    home = out / "users" / user.name
    what = "certificate" if cert is not None else "password"
    if (home / "user.json").exists() and not rotate:
        raise EdgeError(
            f"{user.name}: already provisioned in {out}; pass --rotate for a new {what}"
        )
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    written: list[Path] = []
    password = ""
    if cert is not None:
        written += issue_client(cert, user.name, home, days=days)
        if (home / PASSWORD_FILE).exists():  # from password to certificate: the password goes
            (home / PASSWORD_FILE).unlink()
            set_password_entry(out / BROKER_PASSWD, user.name, None)
    else:
        password = secrets.token_urlsafe(24)
        write_private(home / PASSWORD_FILE, password + "\n")
        written.append(home / PASSWORD_FILE)
    record = {"name": user.name, "role": user.role, "groups": list(user.groups),
              "auth": "cert" if cert is not None else "password"}  # fmt: skip
    write_private(home / "user.json", json.dumps(record, indent=2) + "\n")
    written.append(home / "user.json")
    if user.role == "device":
        snippet = agent_snippet(user, prefix=prefix, cert=cert is not None, broker=broker)
        atomic_write(home / "agent.toml", snippet.encode(), mode=0o644)
        written.append(home / "agent.toml")
    if password:
        set_password_entry(out / BROKER_PASSWD, user.name, password)
        written.append(out / BROKER_PASSWD)
    return home, written


def load_users(out: Path) -> list[User]:
    """Every user provisioned in ``out`` (sorted by name)."""
    users_dir = out / "users"
    if not users_dir.is_dir():
        raise EdgeError(
            f"{out}: no provisioned users (expected {users_dir}/; run edgectl provision)"
        )
    users = []
    for record in sorted(users_dir.glob("*/user.json")):
        try:
            data = json.loads(record.read_text())
            users.append(
                User(name=data["name"], role=data["role"], groups=tuple(data.get("groups", ())))
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise EdgeError(f"{record}: not a user record ({exc})") from None
    return users
