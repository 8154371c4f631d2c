"""The operator's signing key: every order ``edgectl`` publishes is signed with it.

The key file comes from ``--operator-key FILE`` or ``$EDGECTL_OPERATOR_KEY``; an encrypted key's
passphrase from ``--operator-key-passphrase-file FILE`` or, on a terminal, a prompt (never a
flag). The key is loaded on the first order, so commands that send none never ask for it.

Serials are milliseconds since the epoch at issue time, and never repeat or go back within one
``edgectl`` run (two orders in the same millisecond get consecutive serials). The envelope and
its checks: ``edge_agent.fleet.protocol.OrderEnvelope``, ``edge_agent.fleet.orders``.
"""

from __future__ import annotations

import getpass
import logging
import os
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_agent.errors import ConfigError
from edge_agent.fleet.orders import default_ttl, sign_order
from edge_agent.fleet.protocol import order_target

log = logging.getLogger("edgectl")

KEY_ENV = "EDGECTL_OPERATOR_KEY"


def read_passphrase(path: str | None, *, key_path: Path) -> bytes:
    """The passphrase of an encrypted key: from ``path``, or typed at the terminal."""
    from edge_agent.common.secrets import read_secret

    if path:
        return read_secret(path, what="--operator-key-passphrase-file").encode()
    if not sys.stdin.isatty():
        raise ConfigError(
            f"{key_path}: the operator key is encrypted; give --operator-key-passphrase-file "
            "FILE (no terminal to ask on)"
        )
    return getpass.getpass(f"passphrase for {key_path}: ").encode()


class OrderSigner:
    """Signs orders for the topic they are published on (see the module docstring)."""

    def __init__(
        self, key_path: Path, *, passphrase_file: str | None = None, ttl: float | None = None
    ) -> None:
        self.key_path = key_path
        self.passphrase_file = passphrase_file
        self.ttl = ttl
        self._key: Ed25519PrivateKey | None = None
        self._last_serial = 0
        self._lock = threading.Lock()

    @classmethod
    def from_args(cls, args: Any) -> OrderSigner | None:
        """The signer the command line (or ``$EDGECTL_OPERATOR_KEY``) names, or None."""
        path = getattr(args, "operator_key", None) or os.environ.get(KEY_ENV, "")
        if not path:
            if getattr(args, "operator_key_passphrase_file", None):
                raise ConfigError("--operator-key-passphrase-file without --operator-key FILE")
            return None
        return cls(
            Path(path),
            passphrase_file=getattr(args, "operator_key_passphrase_file", None),
            ttl=getattr(args, "order_ttl", None),
        )

    def key(self) -> Ed25519PrivateKey:
        if self._key is None:
            from edge_agent.model.keys import load_private_key, private_key_encrypted

            passphrase = None
            if private_key_encrypted(self.key_path):
                passphrase = read_passphrase(self.passphrase_file, key_path=self.key_path)
            self._key = load_private_key(self.key_path, passphrase=passphrase)
        return self._key

    def serial(self) -> int:
        with self._lock:
            self._last_serial = max(int(time.time() * 1000), self._last_serial + 1)
            return self._last_serial

    def sign(
        self, topic: str, payload: Mapping[str, Any], *, prefix: str, reply_to: str = ""
    ) -> dict[str, Any]:
        """``payload`` signed for ``topic`` (an order topic: ConfigError otherwise), and for a
        command sent with an MQTT 5 Response Topic, that topic (``reply_to``)."""
        aimed = order_target(topic, prefix=prefix)
        if aimed is None:
            raise ConfigError(f"{topic}: not an order topic; nothing to sign")
        scope, target, order = aimed
        ttl = int(self.ttl) if self.ttl is not None else default_ttl(order)
        return sign_order(
            payload, key=self.key(), scope=scope, target=target, order=order,
            serial=self.serial(), issued=int(time.time()), ttl=ttl, reply_to=reply_to,
        )  # fmt: skip
