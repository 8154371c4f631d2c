"""Ed25519 signing keys, for bundles and for operator orders: generate, load, and identify them.

The converter signs a bundle's manifest with a private key (PKCS#8 PEM, mode 0600); devices
trust one or more public keys (SubjectPublicKeyInfo PEM, ``*.pub``). Trusting the old and the new
public key at the same time is how keys are rotated. A key is named by :func:`key_id`.

Operator keys (``edgectl keygen``, files ``edge-operator.key`` / ``.pub``) sign orders the same way
(``edge_agent.fleet.orders``); their private key may be encrypted with a passphrase.

Every failure is a :class:`~edge_agent.errors.ConfigError` naming the file.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edge_agent.common.durable import write_temp
from edge_agent.errors import ConfigError, first_line

PRIVATE_KEY_NAME = "edge-signing.key"
PUBLIC_KEY_NAME = "edge-signing.pub"
#: The file stem of an operator key pair (``edgectl keygen``).
OPERATOR_KEY_STEM = "edge-operator"


def key_id(public_key: Ed25519PublicKey) -> str:
    """The first 16 hex characters of the sha256 of the raw 32-byte public key."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def generate_keypair(
    out_dir: Path,
    *,
    overwrite: bool = False,
    stem: str = "edge-signing",
    passphrase: bytes | None = None,
) -> tuple[Path, Path]:
    """Create ``out_dir/<stem>.key`` (private, 0600; encrypted when a ``passphrase`` is given)
    and ``out_dir/<stem>.pub``.

    Returns ``(private_path, public_path)``. Refuses to replace existing files unless
    ``overwrite``; both files appear together or not at all.
    """
    out_dir = Path(out_dir)
    private_path, public_path = out_dir / f"{stem}.key", out_dir / f"{stem}.pub"
    if not overwrite:
        for path in (private_path, public_path):
            if path.exists() or path.is_symlink():
                raise ConfigError(
                    f"{path}: already exists; choose another directory, or overwrite it (bundles "
                    "signed with the old key then verify only where its .pub stays trusted)"
                )
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{out_dir}: cannot create key directory: {exc}") from exc
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(passphrase)
        if passphrase
        else serialization.NoEncryption(),
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    temps: list[Path] = []
    try:
        temps.append(write_temp(private_path, private_pem, mode=0o600, exact=True))
        temps.append(write_temp(public_path, public_pem, mode=0o644, exact=True))
        os.replace(temps[0], private_path)
        os.replace(temps[1], public_path)
    except OSError as exc:
        raise ConfigError(f"{out_dir}: cannot write the key pair: {exc}") from exc
    finally:
        for tmp in temps:
            tmp.unlink(missing_ok=True)
    return private_path, public_path


def _read(path: Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: no such {what} file (create a key pair with `edge-convert keygen --out DIR`, "
            "or `edgectl keygen` for operator keys)"
        ) from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read {what}: {exc.strerror or exc}") from exc


def private_key_encrypted(path: Path | str) -> bool:
    """Whether a PEM private key file is encrypted (it then needs a passphrase)."""
    return b"ENCRYPTED" in _read(Path(path), "private key").split(b"\n", 1)[0]


def load_private_key(path: Path | str, *, passphrase: bytes | None = None) -> Ed25519PrivateKey:
    """Load a PKCS#8 PEM Ed25519 private key (encrypted ones need their ``passphrase``)."""
    data = _read(Path(path), "private key")
    try:
        key = serialization.load_pem_private_key(data, password=passphrase)
    except TypeError as exc:  # a key that needs a password, or a password for a plain key
        if passphrase is None:
            raise ConfigError(
                f"{path}: the private key is encrypted and no passphrase was given; give one, "
                "or an unencrypted PKCS#8 key (openssl pkcs8 -topk8 -nocrypt)"
            ) from exc
        raise ConfigError(f"{path}: the private key is not encrypted; give no passphrase") from exc
    except ValueError as exc:
        if passphrase is not None and b"ENCRYPTED" in data:
            raise ConfigError(f"{path}: wrong passphrase for this private key") from exc
        raise ConfigError(
            f"{path}: not a PEM private key ({first_line(exc)}); expected an Ed25519 key from "
            "`edge-convert keygen` (bundles) or `edgectl keygen` (orders)"
        ) from exc
    except UnsupportedAlgorithm as exc:
        raise ConfigError(
            f"{path}: not a PEM private key ({first_line(exc)}); expected an Ed25519 key from "
            "`edge-convert keygen` (bundles) or `edgectl keygen` (orders)"
        ) from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(
            f"{path}: is not an Ed25519 key (it holds {_kind(key)}); bundles and orders are "
            "signed with Ed25519 (`edge-convert keygen` for bundles, `edgectl keygen` for orders)"
        )
    return key


def load_public_key(path: Path | str) -> Ed25519PublicKey:
    """Load a SubjectPublicKeyInfo PEM Ed25519 public key (a ``.pub`` file)."""
    data = _read(Path(path), "public key")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ConfigError(
            f"{path}: not a PEM public key ({first_line(exc)}); expected the {PUBLIC_KEY_NAME} "
            "written by `edge-convert keygen` (bundles) or `edgectl keygen` (orders)"
        ) from exc
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(
            f"{path}: is not an Ed25519 key (it holds {_kind(key)}); bundles are verified with "
            "Ed25519 keys"
        )
    return key


def load_trusted_keys(paths: Iterable[Path | str]) -> dict[str, Ed25519PublicKey]:
    """Load trusted public keys, keyed by :func:`key_id`.

    Each path is a ``.pub`` file or a directory whose ``*.pub`` files are all trusted.
    """
    keys: dict[str, Ed25519PublicKey] = {}
    for entry in paths:
        path = Path(entry)
        if path.is_dir():
            files = sorted(p for p in path.glob("*.pub") if p.is_file())
            if not files:
                raise ConfigError(f"{path}: no *.pub files in this trusted-keys directory")
        else:
            files = [path]
        for file in files:
            public_key = load_public_key(file)
            keys[key_id(public_key)] = public_key
    return keys


def _kind(key: object) -> str:
    """'RSA', 'EllipticCurve', 'Ed448', ... from the key's class name."""
    return re.sub(r"(Private|Public)Key$", "", type(key).__name__.lstrip("_")) or "another key"


__all__ = [
    "OPERATOR_KEY_STEM",
    "PRIVATE_KEY_NAME",
    "PUBLIC_KEY_NAME",
    "generate_keypair",
    "key_id",
    "load_private_key",
    "load_public_key",
    "load_trusted_keys",
    "private_key_encrypted",
]
