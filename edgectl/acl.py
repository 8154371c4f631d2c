"""The broker ACL that fits the protocol: ``edgectl acl --mosquitto``.

Who may do what (``edge_agent.fleet.protocol`` defines the topics; prefix ``edge`` here):

- **device D** publishes ``edge/D/{status,telemetry,results,events,reported}``,
  ``edge/D/samples/#``, ``edge/D/cmd/+/reply`` and ``edge/edgectl/+`` (its MQTT 5 replies to
  edgectl's Response Topic); reads ``edge/D/desired``, ``edge/D/cmd/+``,
  ``edge/groups/<its groups>/desired`` and ``edge/bundles/#``.
- **operator** publishes ``edge/+/desired``, ``edge/groups/+/desired``, ``edge/+/cmd/+``,
  ``edge/bundles/#`` and ``edge/+/samples/#`` (``collect`` clears what it took); reads ``edge/#``.
- **consumer** publishes nothing; reads ``edge/+/{status,telemetry,results,events,reported}``,
  also through MQTT 5 shared subscriptions (``$share/<group>/edge/+/telemetry``).

A device's own rules are Mosquitto ``pattern`` lines with ``%u`` (its username is its device id);
Mosquitto applies patterns to every authenticated user, so operators and consumers must not share
a name with a device (refused). Group membership and the operator and consumer rights are
``user`` blocks. Everything not granted is denied, including a device's own ``desired`` and
``cmd/+`` (writing them) and every topic of another device.

Two forms of the same rules: ``edgectl acl --mosquitto`` (:func:`mosquitto_acl`, an
``acl_file``) and ``edgectl acl --dynsec`` (:func:`dynsec_config`, the JSON file of Mosquitto's
dynamic-security plugin). Mosquitto 2.0's plugin has no ``%u`` in its ACLs, so each device gets
its own role (``edge-device-<name>``); operators share ``edge-operator``, consumers
``edge-consumer``, and ``--admin-user`` operators also get ``edge-dynsec-admin`` (the plugin's
``$CONTROL`` topics, for ``mosquitto_ctrl``). With an ``acl_file``, Mosquitto 2.0 checks a
subscription only when a message is delivered, so ``$share/<group>/...`` needs no rule of its
own; the plugin checks the filter at SUBSCRIBE, so its roles also allow the ``$share/+/...``
forms of what may be read.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edge_agent.errors import EdgeError
from edge_agent.fleet.protocol import (
    DEFAULT_PREFIX,
    RESERVED_LEVELS,
    STREAMS,
    fleet_topic,
    group_desired_topic,
    response_topic,
)
from edgectl.provision import BROKER_PASSWD, User, load_users

#: What a device publishes under its own ``<prefix>/<device>/``.
DEVICE_WRITES = ("status", *STREAMS, "reported", "samples/#", "cmd/+/reply")
#: What it reads under its own ``<prefix>/<device>/``.
DEVICE_READS = ("desired", "cmd/+")
#: What a consumer reads of every device.
CONSUMER_READS = ("status", *STREAMS, "reported")


def users_from(
    *,
    devices_from: Path | None = None,
    devices: Sequence[str] = (),
    groups: Sequence[str] = (),
    operators: Sequence[str] = (),
    consumers: Sequence[str] = (),
) -> list[User]:
    """The users an ACL is written for: those provisioned in ``devices_from``, then the devices
    named (``devices``, and any named in a ``DEVICE=GROUP`` of ``groups``, with those groups),
    the operators and the consumers. EdgeError for a malformed group or no user at all."""
    users = load_users(devices_from) if devices_from else []
    member: dict[str, list[str]] = {}
    for value in groups:
        device, sep, group = value.partition("=")
        if not sep or not device or not group:
            raise EdgeError(f"--group {value!r}: expected DEVICE=GROUP")
        member.setdefault(device, []).append(group)
    named = set(devices) | set(member)
    users += [User(name=d, groups=tuple(member.get(d, ()))) for d in sorted(named)]
    users += [User(name=n, role="operator") for n in operators]
    users += [User(name=n, role="consumer") for n in consumers]
    if not users:
        raise EdgeError(
            "no users: pass --devices-from DIR or --device/--operator-user/--consumer-user"
        )
    return users


def check_users(users: Sequence[User]) -> None:
    """One role per name, no device named like a reserved topic level."""
    seen: dict[str, str] = {}
    for user in users:
        if user.name in RESERVED_LEVELS:
            raise EdgeError(f"user {user.name!r}: a reserved topic level; choose another name")
        if user.name in seen and seen[user.name] != user.role:
            raise EdgeError(
                f"user {user.name!r} is both {seen[user.name]} and {user.role}: "
                "device rules apply to every user named like the device; use distinct names"
            )
        seen[user.name] = user.role


def merge_users(users: Sequence[User]) -> list[User]:
    """Users by name (a device named twice gets the union of its groups), sorted."""
    check_users(users)
    merged: dict[str, User] = {}
    for user in users:
        old = merged.get(user.name)
        groups = tuple(dict.fromkeys((*(old.groups if old else ()), *user.groups)))
        merged[user.name] = User(name=user.name, role=user.role, groups=groups)
    return [merged[name] for name in sorted(merged)]


def device_rules(user: User, *, prefix: str) -> tuple[list[str], list[str]]:
    """``(writes, reads)``: the topics device ``user`` may publish and read."""
    base = f"{prefix}/{user.name}"
    writes = [f"{base}/{t}" for t in DEVICE_WRITES] + [response_topic("+", prefix=prefix)]
    reads = [f"{base}/{t}" for t in DEVICE_READS]
    reads += [group_desired_topic(g, prefix=prefix) for g in user.groups] + [f"{prefix}/bundles/#"]
    return writes, reads


def operator_rules(*, prefix: str) -> tuple[list[str], list[str]]:
    """``(writes, reads)`` of an operator: orders, bundles and clearing samples; everything."""
    p = prefix
    writes = [f"{p}/+/desired", f"{p}/groups/+/desired", f"{p}/+/cmd/+", f"{p}/bundles/#",
              f"{p}/+/samples/#"]  # fmt: skip
    return writes, [f"{p}/#"]


def consumer_rules(*, prefix: str) -> tuple[list[str], list[str]]:
    """``(writes, reads)`` of a consumer: nothing; every device's state and streams."""
    return [], [fleet_topic(t, prefix=prefix) for t in CONSUMER_READS]


def mosquitto_acl(users: Sequence[User], *, prefix: str = DEFAULT_PREFIX) -> str:
    """The text of a Mosquitto ``acl_file`` for ``users``."""
    users = merge_users(users)
    p = prefix
    lines = [
        "# Mosquitto acl_file written by edgectl acl --mosquitto (regenerate, do not edit).",
        "# Anything not granted here is denied. %u is the username: a device's id.",
        "",
        "# Every device: its own state, samples and command replies ...",
        *(f"pattern write {p}/%u/{t}" for t in DEVICE_WRITES),
        "# ... replies to edgectl's MQTT 5 Response Topic,",
        f"pattern write {response_topic('+', prefix=p)}",
        "# ... its own orders and the published bundles (read only).",
        *(f"pattern read {p}/%u/{t}" for t in DEVICE_READS),
        f"pattern read {p}/bundles/#",
    ]
    for user in users:
        if user.role == "device" and user.groups:
            lines += ["", f"user {user.name}"]
            lines += [f"topic read {group_desired_topic(g, prefix=p)}" for g in user.groups]
        elif user.role in ("operator", "consumer"):
            rules = operator_rules if user.role == "operator" else consumer_rules
            writes, reads = rules(prefix=p)
            lines += ["", f"user {user.name}"]
            lines += [f"topic read {t}" for t in reads] + [f"topic write {t}" for t in writes]
    return "\n".join(lines) + "\n"


# --- Mosquitto's dynamic-security plugin ------------------------------------------------------

#: Role names: one per device (the plugin of Mosquitto 2.0 has no %u), one per other role.
OPERATOR_ROLE = "edge-operator"
CONSUMER_ROLE = "edge-consumer"
#: What ``mosquitto_ctrl dynsec`` needs: the plugin's own control topics, nothing else.
ADMIN_ROLE = "edge-dynsec-admin"
CONTROL_TOPIC = "$CONTROL/dynamic-security/#"


def device_role(name: str) -> str:
    return f"edge-device-{name}"


def _acl(acltype: str, topic: str) -> dict[str, Any]:
    return {"acltype": acltype, "topic": topic, "priority": 0, "allow": True}


def dynsec_role(rolename: str, writes: Sequence[str], reads: Sequence[str]) -> dict[str, Any]:
    """A role that may publish ``writes`` and subscribe to (and receive) ``reads``, directly or
    through a shared subscription."""
    acls = [_acl("publishClientSend", t) for t in writes]
    for topic in reads:
        acls += [_acl("subscribePattern", topic), _acl("subscribePattern", f"$share/+/{topic}"),
                 _acl("publishClientReceive", topic)]  # fmt: skip
    return {"rolename": rolename, "textdescription": "written by edgectl acl --dynsec",
            "acls": acls}  # fmt: skip


def password_hashes(provisioned: Path) -> dict[str, dict[str, Any]]:
    """The dynsec ``password``/``salt``/``iterations`` of each user in ``provisioned/passwd``,
    taken from its Mosquitto ``$7$`` entry (the same PBKDF2-SHA512 hash, 12-byte salt): the
    passwords themselves are not read."""
    path = provisioned / BROKER_PASSWD
    if not path.exists():
        return {}  # every user has a certificate
    hashes: dict[str, dict[str, Any]] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        name, _, entry = line.partition(":")
        fields = entry.split("$")
        if len(fields) != 5 or fields[1] != "7" or not fields[2].isdigit():
            raise EdgeError(f"{path}:{number}: not a Mosquitto $7$ (PBKDF2-SHA512) entry")
        hashes[name] = {"password": fields[4], "salt": fields[3], "iterations": int(fields[2])}
    return hashes


def dynsec_config(
    users: Sequence[User],
    *,
    prefix: str = DEFAULT_PREFIX,
    provisioned: Path | None = None,
    admins: Sequence[str] = (),
) -> str:
    """The JSON of Mosquitto's dynamic-security plugin (``plugin_opt_config_file``): the same
    rules as :func:`mosquitto_acl`, everything else denied. Users provisioned with a password
    in ``provisioned`` carry its hash; the others have none (a certificate's CN, with
    ``use_identity_as_username``, or a password set later: ``mosquitto_ctrl dynsec
    setClientPassword NAME``). ``admins``: operators who may also run ``mosquitto_ctrl
    dynsec`` (the plugin's ``$CONTROL/dynamic-security/#`` topics)."""
    users = merge_users(users)
    roles_of = {u.name: u.role for u in users}
    for name in admins:
        if roles_of.get(name) != "operator":
            raise EdgeError(f"--admin-user {name}: not an operator here (provision it with "
                            "--role operator, or name it with --operator-user)")  # fmt: skip
    hashes = password_hashes(provisioned) if provisioned is not None else {}
    roles: list[dict[str, Any]] = []
    if admins:
        roles.append({"rolename": ADMIN_ROLE, "textdescription": "mosquitto_ctrl dynsec",
                      "acls": [_acl(t, CONTROL_TOPIC) for t in ("publishClientSend",
                               "publishClientReceive", "subscribePattern")]})  # fmt: skip
    clients: list[dict[str, Any]] = []
    for rolename, rules in ((OPERATOR_ROLE, operator_rules), (CONSUMER_ROLE, consumer_rules)):
        if any(u.role == rolename.removeprefix("edge-") for u in users):
            roles.append(dynsec_role(rolename, *rules(prefix=prefix)))
    for user in users:
        if user.role == "device":
            rolename = device_role(user.name)
            roles.append(dynsec_role(rolename, *device_rules(user, prefix=prefix)))
        else:
            rolename = OPERATOR_ROLE if user.role == "operator" else CONSUMER_ROLE
        assigned = [{"rolename": rolename}]
        if user.name in admins:
            assigned.append({"rolename": ADMIN_ROLE})
        client = {"username": user.name, "textname": f"{user.role} {user.name}",
                  "roles": assigned, **hashes.get(user.name, {})}  # fmt: skip
        clients.append(client)
    config = {
        "defaultACLAccess": {"publishClientSend": False, "publishClientReceive": False,
                             "subscribe": False, "unsubscribe": True},
        "clients": clients,
        "groups": [],
        "roles": sorted(roles, key=lambda r: r["rolename"]),
    }  # fmt: skip
    return json.dumps(config, indent=2) + "\n"
