"""The broker ACL that fits the protocol: ``edgectl acl --mosquitto``.

Who may do what (``edge_agent.fleet.protocol`` defines the topics; prefix ``edge`` here):

- **device D** publishes ``edge/D/{status,telemetry,results,events,reported}``,
  ``edge/D/samples/#``, ``edge/D/cmd/+/reply`` and ``edge/edgectl/+`` (its MQTT 5 replies to
  edgectl's Response Topic); reads ``edge/D/desired``, ``edge/D/cmd/+``,
  ``edge/groups/<its groups>/desired`` and ``edge/bundles/#``.
- **operator** publishes ``edge/+/desired``, ``edge/groups/+/desired``, ``edge/+/cmd/+``,
  ``edge/bundles/#`` and ``edge/+/samples/#`` (``collect`` clears what it took); reads ``edge/#``.
- **consumer** publishes nothing; reads ``edge/+/{status,telemetry,results,events,reported}``.

A device's own rules are Mosquitto ``pattern`` lines with ``%u`` (its username is its device id);
Mosquitto applies patterns to every authenticated user, so operators and consumers must not share
a name with a device (refused). Group membership and the operator and consumer rights are
``user`` blocks. Everything not granted is denied, including a device's own ``desired`` and
``cmd/+`` (writing them) and every topic of another device.
"""

from __future__ import annotations

from collections.abc import Sequence

from edge_agent.errors import EdgeError
from edge_agent.fleet.protocol import DEFAULT_PREFIX, RESERVED_LEVELS, STREAMS, response_topic
from edgectl.provision import User

#: What a device publishes under its own ``<prefix>/<device>/``.
DEVICE_WRITES = ("status", *STREAMS, "reported", "samples/#", "cmd/+/reply")
#: What it reads under its own ``<prefix>/<device>/``.
DEVICE_READS = ("desired", "cmd/+")
#: What a consumer reads of every device.
CONSUMER_READS = ("status", *STREAMS, "reported")


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
            lines += [f"topic read {p}/groups/{g}/desired" for g in user.groups]
        elif user.role == "operator":
            lines += [
                "",
                f"user {user.name}",
                f"topic read {p}/#",
                f"topic write {p}/+/desired",
                f"topic write {p}/groups/+/desired",
                f"topic write {p}/+/cmd/+",
                f"topic write {p}/bundles/#",
                f"topic write {p}/+/samples/#",
            ]
        elif user.role == "consumer":
            lines += ["", f"user {user.name}"]
            lines += [f"topic read {p}/+/{t}" for t in CONSUMER_READS]
    return "\n".join(lines) + "\n"
