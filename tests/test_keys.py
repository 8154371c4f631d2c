from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_agent.errors import ConfigError
from edge_agent.model.keys import (
    PRIVATE_KEY_NAME,
    PUBLIC_KEY_NAME,
    generate_keypair,
    key_id,
    load_private_key,
    load_public_key,
    load_trusted_keys,
)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_generate_keypair(tmp_path: Path) -> None:
    private_path, public_path = generate_keypair(tmp_path / "keys")
    assert (private_path.name, public_path.name) == (PRIVATE_KEY_NAME, PUBLIC_KEY_NAME)
    assert _mode(private_path) == 0o600
    assert private_path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert public_path.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    private, public = load_private_key(private_path), load_public_key(public_path)
    assert key_id(private.public_key()) == key_id(public)
    assert re.fullmatch(r"[0-9a-f]{16}", key_id(public))
    signature = private.sign(b"manifest")
    public.verify(signature, b"manifest")
    assert sorted(p.name for p in (tmp_path / "keys").iterdir()) == [
        PRIVATE_KEY_NAME,
        PUBLIC_KEY_NAME,
    ]


def test_private_key_is_0600_even_with_an_open_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        private_path, public_path = generate_keypair(tmp_path)
    finally:
        os.umask(old)
    assert _mode(private_path) == 0o600
    assert _mode(public_path) == 0o644


def test_refuses_to_overwrite(tmp_path: Path) -> None:
    private_path, _ = generate_keypair(tmp_path)
    before = private_path.read_bytes()
    with pytest.raises(ConfigError, match=re.escape(f"{private_path}: already exists")):
        generate_keypair(tmp_path)
    assert private_path.read_bytes() == before
    generate_keypair(tmp_path, overwrite=True)
    assert private_path.read_bytes() != before
    assert _mode(private_path) == 0o600
    assert len(list(tmp_path.iterdir())) == 2  # no temp files left behind


def test_refuses_when_only_the_public_key_exists(tmp_path: Path) -> None:
    (tmp_path / PUBLIC_KEY_NAME).write_text("keep me", encoding="utf-8")
    with pytest.raises(ConfigError, match=PUBLIC_KEY_NAME):
        generate_keypair(tmp_path)
    assert not (tmp_path / PRIVATE_KEY_NAME).exists()


def test_missing_key_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.key: no such private key file"):
        load_private_key(tmp_path / "nope.key")
    with pytest.raises(ConfigError, match=r"nope\.pub: no such public key file"):
        load_public_key(tmp_path / "nope.pub")


def test_garbage_key_file(tmp_path: Path) -> None:
    path = tmp_path / "garbage.key"
    path.write_bytes(b"not a key at all\n")
    with pytest.raises(ConfigError, match=r"garbage\.key: not a PEM private key") as info:
        load_private_key(path)
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match=r"garbage\.key: not a PEM public key"):
        load_public_key(path)


def test_public_and_private_files_swapped(tmp_path: Path) -> None:
    private_path, public_path = generate_keypair(tmp_path)
    with pytest.raises(ConfigError, match=re.escape(str(public_path))):
        load_private_key(public_path)
    with pytest.raises(ConfigError, match=re.escape(str(private_path))):
        load_public_key(private_path)


def test_rsa_key_is_rejected(tmp_path: Path) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private_path, public_path = tmp_path / "rsa.key", tmp_path / "rsa.pub"
    private_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    public_path.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    with pytest.raises(ConfigError, match=r"rsa\.key: is not an Ed25519 key \(it holds RSA\)"):
        load_private_key(private_path)
    with pytest.raises(ConfigError, match=r"rsa\.pub: is not an Ed25519 key \(it holds RSA\)"):
        load_public_key(public_path)


def test_encrypted_key_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "enc.key"
    path.write_bytes(
        Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    with pytest.raises(ConfigError, match=r"enc\.key: the private key is encrypted"):
        load_private_key(path)


def test_load_trusted_keys_from_files_and_directories(tmp_path: Path) -> None:
    _, old_pub = generate_keypair(tmp_path / "old")
    _, new_pub = generate_keypair(tmp_path / "new")
    trusted_dir = tmp_path / "trusted"
    trusted_dir.mkdir()
    (trusted_dir / "old.pub").write_bytes(old_pub.read_bytes())
    (trusted_dir / "new.pub").write_bytes(new_pub.read_bytes())
    (trusted_dir / "README").write_text("not a key", encoding="utf-8")  # ignored: not *.pub
    keys = load_trusted_keys([trusted_dir])
    expected = {key_id(load_public_key(old_pub)), key_id(load_public_key(new_pub))}
    assert set(keys) == expected
    assert set(load_trusted_keys([old_pub, new_pub])) == expected
    assert all(key_id(k) == kid for kid, k in keys.items())
    assert load_trusted_keys([]) == {}


def test_empty_trusted_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=re.escape("no *.pub files")):
        load_trusted_keys([tmp_path])
