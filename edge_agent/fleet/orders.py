"""Signed orders: who may tell a device what to do (desired states and commands).

The envelope is defined in ``edge_agent.fleet.protocol`` (:class:`OrderEnvelope`); this module
signs it (``edgectl``, with an operator's private key) and checks it (the agent, with
``[fleet] operator_keys``):

- :func:`sign_order` adds ``"signed"`` to an order for the topic it will be published on.
- :class:`SerialLedger` keeps the last serial accepted per target in
  ``<state_dir>/orders.sqlite`` (synchronous commits: a serial accepted is never accepted again,
  even after a power loss).
- :class:`OrderGuard` accepts or refuses an order where it arrived. With operator keys, an order
  must carry an envelope by one of them, for this very topic, not expired, not issued in the
  future (beyond :data:`~edge_agent.fleet.protocol.MAX_CLOCK_SKEW_S`), with a serial above the
  last one accepted for its target. A retained desired state comes again on every reconnect: the
  same order (same serial, same signature) is accepted again, even once expired, since it was
  accepted while valid. Without operator keys every order is accepted as before, except that
  an unsigned order may name bundle URLs only on ``[ota] allowed_hosts`` when that list is set.

A refusal is an :class:`~edge_agent.errors.OrderRefused` whose text is the reason (the agent
sends it as an ``order_refused`` event and, for a command, in the reply).
"""

from __future__ import annotations

import base64
import hashlib
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edge_agent.common.urls import url_host
from edge_agent.errors import ConfigError, OrderRefused
from edge_agent.fleet.protocol import (
    COMMAND_TTL_S,
    DESIRED_TTL_S,
    MAX_CLOCK_SKEW_S,
    OrderEnvelope,
    order_body,
    order_urls,
)
from edge_agent.model.keys import key_id

LEDGER_FILE = "orders.sqlite"


def default_ttl(order: str) -> int:
    """Seconds a signed order stays valid unless told otherwise (``edgectl --order-ttl``)."""
    return DESIRED_TTL_S if order == "desired" else COMMAND_TTL_S


def sign_order(
    payload: Mapping[str, Any],
    *,
    key: Ed25519PrivateKey,
    scope: str,
    target: str,
    order: str,
    serial: int,
    issued: int,
    ttl: int,
    reply_to: str = "",
) -> dict[str, Any]:
    """``payload`` with a fresh ``"signed"`` envelope (any old one is replaced); ``reply_to``:
    the command's MQTT 5 Response Topic, signed with it."""
    envelope = OrderEnvelope(
        key=key_id(key.public_key()), scope=scope, target=target, order=order,
        serial=serial, issued=issued, expires=issued + ttl, reply_to=reply_to,
    )  # fmt: skip
    body = order_body(payload)
    signature = base64.b64encode(key.sign(envelope.signed_bytes(body))).decode("ascii")
    return {**body, "signed": {**envelope.to_payload(), "signature": signature}}


class SerialLedger:
    """The last serial accepted per target (and the digest of that order's signature), in a
    small SQLite file of the state directory."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            self._conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.execute(
                "CREATE TABLE IF NOT EXISTS serials "
                "(target TEXT PRIMARY KEY, serial INTEGER NOT NULL, digest TEXT NOT NULL)"
            )
        except sqlite3.Error as exc:
            raise ConfigError(f"{self.path}: cannot open the order ledger: {exc}") from exc

    def last(self, target: str) -> tuple[int, str] | None:
        with self._lock:
            row = self._conn.execute(
                "SELECT serial, digest FROM serials WHERE target = ?", (target,)
            ).fetchone()
        return (int(row[0]), str(row[1])) if row else None

    def record(self, target: str, serial: int, digest: str) -> None:
        with self._lock:
            self._conn.execute(
                "INSERT INTO serials (target, serial, digest) VALUES (?, ?, ?) "
                "ON CONFLICT(target) DO UPDATE SET serial = excluded.serial, "
                "digest = excluded.digest",
                (target, serial, digest),
            )

    def close(self) -> None:
        with self._lock:
            self._conn.close()


@dataclass(frozen=True)
class Accepted:
    """An order let through: signed or not, its serial when signed, and the Response Topic its
    signature covers ("" for none)."""

    signed: bool
    serial: int | None = None
    reply_to: str = ""


class OrderGuard:
    """Accepts or refuses each order where it arrived (see the module docstring)."""

    def __init__(
        self,
        *,
        keys: Mapping[str, Ed25519PublicKey],
        ledger: SerialLedger | None,
        allowed_hosts: Sequence[str] = (),
        clock: Callable[[], float] = time.time,
    ) -> None:
        if keys and ledger is None:
            raise ValueError("an OrderGuard with operator keys needs a SerialLedger")
        self.keys = dict(keys)
        self.ledger = ledger
        self.allowed_hosts = {url_host(h) for h in allowed_hosts}
        self.clock = clock
        self._lock = threading.Lock()  # check-then-record is one step

    @property
    def enforcing(self) -> bool:
        return bool(self.keys)

    def check(
        self,
        payload: Mapping[str, Any],
        *,
        scope: str,
        target: str,
        order: str,
        response_topic: str | None = None,
    ) -> Accepted:
        """Accepted, or OrderRefused naming why; ``(scope, target, order)``: where it arrived
        (``protocol.order_target`` of its topic); ``response_topic``: the MQTT 5 Response Topic
        it came with. A signed ``reply_to`` must be that very topic (a Response Topic changed
        in transit is refused); a Response Topic the signature does not cover is not refused,
        but :attr:`Accepted.reply_to` is then empty and the reply goes to the fixed reply topic."""
        what = f"{order} for {scope} {target}"
        if not self.enforcing:
            self._check_hosts(payload, what)
            return Accepted(signed=False)
        envelope = OrderEnvelope.from_payload(payload, what=what)
        if envelope is None:
            raise OrderRefused(f"{what}: unsigned{_dangers(payload)}; orders must be signed by "
                               "an operator key ([fleet] operator_keys)")  # fmt: skip
        public = self.keys.get(envelope.key)
        if public is None:
            raise OrderRefused(f"{what}: signed by key {envelope.key}, which is not trusted "
                               "here ([fleet] operator_keys)")  # fmt: skip
        signature = base64.b64decode(envelope.signature)
        try:
            public.verify(signature, envelope.signed_bytes(payload))
        except InvalidSignature:
            raise OrderRefused(
                f"{what}: bad signature (key {envelope.key}): altered in transit, or not signed "
                "for this content"
            ) from None
        aimed = (envelope.scope, envelope.target, envelope.order)
        if aimed != (scope, target, order):
            raise OrderRefused(
                f"{what}: mis-targeted: signed for {envelope.order} to {envelope.scope} "
                f"{envelope.target}"
            )
        if envelope.reply_to and envelope.reply_to != (response_topic or ""):
            raise OrderRefused(
                f"{what}: its Response Topic {response_topic!r} is not the one signed "
                f"({envelope.reply_to!r}): altered in transit"
            )
        digest = hashlib.sha256(signature).hexdigest()[:32]
        assert self.ledger is not None
        with self._lock:
            last = self.ledger.last(envelope.ledger_key)
            if order == "desired" and last == (envelope.serial, digest):
                return Accepted(signed=True, serial=envelope.serial)  # the same one, again
            now = self.clock()
            if now >= envelope.expires:
                raise OrderRefused(
                    f"{what}: expired {now - envelope.expires:.0f} s ago (serial "
                    f"{envelope.serial}); send it again (edgectl signs a fresh one)"
                )
            if envelope.issued > now + MAX_CLOCK_SKEW_S:
                raise OrderRefused(
                    f"{what}: issued {envelope.issued - now:.0f} s in the future (clock skew "
                    f"over {MAX_CLOCK_SKEW_S} s?)"
                )
            if last is not None and envelope.serial <= last[0]:
                raise OrderRefused(
                    f"{what}: replayed: serial {envelope.serial} is not above the last "
                    f"accepted, {last[0]}"
                )
            self.ledger.record(envelope.ledger_key, envelope.serial, digest)
        return Accepted(signed=True, serial=envelope.serial, reply_to=envelope.reply_to)

    def _check_hosts(self, payload: Mapping[str, Any], what: str) -> None:
        if not self.allowed_hosts:
            return
        for url in order_urls(payload):
            host = url_host(urlsplit(url).hostname or "")
            if host not in self.allowed_hosts:
                raise OrderRefused(
                    f"{what}: URL host {host!r} is not in [ota] allowed_hosts; only a signed "
                    "order may name it"
                )


def _dangers(payload: Mapping[str, Any]) -> str:
    """What an unsigned order asked for that only a signed one may: said in the refusal."""
    asks = []
    if payload.get("allow_downgrade") is True:
        asks.append("allow_downgrade")
    asks += [f"URL {u}" for u in order_urls(payload)]
    return f" (it asks for {', '.join(asks)})" if asks else ""


__all__ = [
    "LEDGER_FILE",
    "Accepted",
    "OrderGuard",
    "SerialLedger",
    "default_ttl",
    "sign_order",
]
