from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import re
import tarfile
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edge_agent.errors import (
    BundleError,
    ConfigError,
    IntegrityError,
    SignatureError,
    UnsafeBundleError,
)
from edge_agent.model.bundle import (
    BUNDLE_SCHEMA_VERSION,
    ArtifactInput,
    extract_bundle,
    read_manifest_unverified,
    verify_bundle,
    write_bundle,
)
from edge_agent.model.keys import key_id

MODEL = b"ONNXMODEL" * 1000
GOLDEN = b"golden-input-bytes"


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def trust(*keys: Ed25519PrivateKey) -> dict[str, Ed25519PublicKey]:
    return {key_id(k.public_key()): k.public_key() for k in keys}


def make_bundle(tmp_path: Path, key: Ed25519PrivateKey, name: str = "m.edgebundle") -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    model, golden = tmp_path / "model.onnx", tmp_path / "golden.npz"
    model.write_bytes(MODEL)
    golden.write_bytes(GOLDEN)
    out = tmp_path / "out" / name
    write_bundle(
        out,
        manifest={"name": "detector", "version": "1.2.0-rc.1", "inputs": [{"name": "x"}]},
        artifacts=[
            ArtifactInput(
                path=model,
                format="onnx-int8",
                precision="int8",
                profiles=("raspberry-pi-4", "x86-64"),
                extra={"int8_scheme": "u8s8-qop"},
            )
        ],
        files={"golden.npz": golden},
        signing_key=key,
    )
    return out


# --- helpers that build archives by hand ---------------------------------------------------


def reg(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def link(name: str, target: str, kind: bytes) -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info, None


def signed_head(
    key: Ed25519PrivateKey, listed: dict[str, bytes]
) -> list[tuple[tarfile.TarInfo, bytes | None]]:
    """manifest.json + manifest.sig listing ``listed`` (artifacts/* as artifacts, the rest as
    files), signed with ``key``."""
    manifest: dict[str, Any] = {
        "schema": BUNDLE_SCHEMA_VERSION,
        "name": "handmade",
        "version": "0.1.0",
        "created": "2025-01-31T12:00:00Z",
        "artifacts": [],
        "files": [],
    }
    for path, data in listed.items():
        entry: dict[str, Any] = {
            "path": path,
            "sha256": hashlib.sha256(data).hexdigest(),
            "size": len(data),
        }
        if path.startswith("artifacts/"):
            entry.update(format="onnx-fp32", precision="fp32", runtime="onnxruntime", profiles=[])
            manifest["artifacts"].append(entry)
        else:
            manifest["files"].append(entry)
    manifest_bytes = json.dumps(manifest, sort_keys=True).encode("utf-8")
    sig = {
        "alg": "ed25519",
        "key_id": key_id(key.public_key()),
        "signature": base64.b64encode(key.sign(manifest_bytes)).decode("ascii"),
    }
    return [reg("manifest.json", manifest_bytes), reg("manifest.sig", json.dumps(sig).encode())]


def write_tar(path: Path, entries: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def rewrite(path: Path, old: bytes, new: bytes) -> None:
    """Replace bytes inside the (decompressed) tar, keeping every length the same."""
    assert len(old) == len(new)
    data = gzip.decompress(path.read_bytes())
    assert data.count(old) >= 1
    path.write_bytes(gzip.compress(data.replace(old, new, 1)))


# --- round trip ----------------------------------------------------------------------------


def test_round_trip(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    out = make_bundle(tmp_path, key)
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]  # no temp file left
    verified = verify_bundle(out, trusted_keys=trust(key))
    manifest = verified.manifest
    assert verified.key_id == key_id(key.public_key()) and verified.extracted is None
    assert manifest["schema"] == BUNDLE_SCHEMA_VERSION
    assert manifest["inputs"] == [{"name": "x"}]  # passed through untouched
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", manifest["created"])
    artifact = verified.artifact("onnx-int8")
    assert artifact is not None
    assert artifact["path"] == "artifacts/model.onnx"
    assert artifact["sha256"] == hashlib.sha256(MODEL).hexdigest()
    assert artifact["size"] == len(MODEL)
    assert artifact["runtime"] == "onnxruntime" and artifact["int8_scheme"] == "u8s8-qop"
    assert artifact["profiles"] == ["raspberry-pi-4", "x86-64"]
    assert verified.artifact("onnx-int8", profile="jetson-nano") is None
    assert verified.artifact("onnx-fp32") is None
    assert manifest["files"] == [
        {"path": "golden.npz", "sha256": hashlib.sha256(GOLDEN).hexdigest(), "size": len(GOLDEN)}
    ]

    dest = tmp_path / "models" / "detector-1.2.0"
    extracted = extract_bundle(out, dest, trusted_keys=trust(key))
    assert extracted.extracted == dest and extracted.manifest == manifest
    assert (dest / "artifacts" / "model.onnx").read_bytes() == MODEL
    assert (dest / "golden.npz").read_bytes() == GOLDEN
    assert json.loads((dest / "manifest.json").read_bytes()) == manifest
    assert sorted(p.name for p in dest.parent.iterdir()) == [dest.name]
    assert read_manifest_unverified(out) == manifest


def test_manifest_is_signed_as_stored(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    out = make_bundle(tmp_path, key)
    with tarfile.open(out, "r:gz") as tar:
        names = tar.getnames()
        manifest_file = tar.extractfile("manifest.json")
        sig_file = tar.extractfile("manifest.sig")
        assert manifest_file is not None and sig_file is not None
        manifest_bytes, sig = manifest_file.read(), json.loads(sig_file.read())
    assert names[:2] == ["manifest.json", "manifest.sig"]
    assert sig["alg"] == "ed25519" and sig["key_id"] == key_id(key.public_key())
    key.public_key().verify(base64.b64decode(sig["signature"]), manifest_bytes)
    assert list(json.loads(manifest_bytes)) == sorted(json.loads(manifest_bytes))


def test_write_bundle_rejects_filled_keys(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    out = tmp_path / "x.edgebundle"
    with pytest.raises(ConfigError, match="manifest key 'artifacts' is filled by write_bundle"):
        write_bundle(
            out,
            manifest={"name": "n", "version": "1.0.0", "artifacts": []},
            artifacts=[],
            signing_key=key,
        )
    with pytest.raises(ConfigError, match=r"version = '1\.0': must be a semantic version"):
        write_bundle(out, manifest={"name": "n", "version": "1.0"}, artifacts=[], signing_key=key)
    assert list(tmp_path.iterdir()) == []


def test_write_bundle_leaves_nothing_on_error(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    out = tmp_path / "x.edgebundle"
    missing = ArtifactInput(
        path=tmp_path / "missing.onnx", format="onnx-fp32", precision="fp32", profiles=()
    )
    with pytest.raises(ConfigError, match=r"missing\.onnx: cannot read artifacts/missing\.onnx"):
        write_bundle(
            out, manifest={"name": "n", "version": "1.0.0"}, artifacts=[missing], signing_key=key
        )
    assert list(tmp_path.iterdir()) == []


def test_artifact_input_validates(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="format = 'onnx-int4': unknown artifact format"):
        ArtifactInput(path=tmp_path / "m", format="onnx-int4", precision="int4", profiles=())
    with pytest.raises(ConfigError, match=r"name = '\.\./m\.onnx': has a '\.\.' component"):
        ArtifactInput(
            path=tmp_path / "m", format="onnx-fp32", precision="fp32", profiles=(), name="../m.onnx"
        )


# --- tampering and trust -------------------------------------------------------------------


def test_changed_artifact_byte(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    out = make_bundle(tmp_path, key)
    rewrite(out, b"ONNXMODELONNX", b"ONNXMODELONNY")
    with pytest.raises(IntegrityError, match=r"member 'artifacts/model\.onnx': sha256 .* does not"):
        verify_bundle(out, trusted_keys=trust(key))


def test_changed_manifest_byte(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    out = make_bundle(tmp_path, key)
    rewrite(out, b'"detector"', b'"detectoR"')
    with pytest.raises(SignatureError, match="signature does not match manifest"):
        verify_bundle(out, trusted_keys=trust(key))


def test_untrusted_key(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    out = make_bundle(tmp_path, key)
    other = Ed25519PrivateKey.generate()
    with pytest.raises(SignatureError) as info:
        verify_bundle(out, trusted_keys=trust(other))
    message = str(info.value)
    assert f"manifest signed by key {key_id(key.public_key())} which is not trusted" in message
    assert f"(trusted: {key_id(other.public_key())})" in message
    with pytest.raises(SignatureError, match="none were given"):
        verify_bundle(out, trusted_keys={})


def test_trusted_keys_are_indexed_by_their_real_id(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    out = make_bundle(tmp_path, key)
    other = Ed25519PrivateKey.generate()
    # A caller's mislabelled dict must not let another key stand in for the signer.
    with pytest.raises(SignatureError, match="not trusted"):
        verify_bundle(out, trusted_keys={key_id(key.public_key()): other.public_key()})


def test_key_rotation(tmp_path: Path) -> None:
    old, new = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    old_bundle = make_bundle(tmp_path / "a", old)
    new_bundle = make_bundle(tmp_path / "b", new)
    both = trust(old, new)
    assert verify_bundle(old_bundle, trusted_keys=both).key_id == key_id(old.public_key())
    assert verify_bundle(new_bundle, trusted_keys=both).key_id == key_id(new.public_key())
    with pytest.raises(SignatureError):
        verify_bundle(old_bundle, trusted_keys=trust(new))


def test_unsigned_bundle(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    head = signed_head(key, {"artifacts/m.onnx": MODEL})
    path = write_tar(tmp_path / "b.edgebundle", [head[0], reg("artifacts/m.onnx", MODEL)])
    with pytest.raises(
        SignatureError,
        match=re.escape("unsigned: no manifest.sig before member 'artifacts/m.onnx'"),
    ):
        verify_bundle(path, trusted_keys=trust(key))


def test_malformed_signature(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    head = signed_head(key, {})
    path = write_tar(tmp_path / "b.edgebundle", [head[0], reg("manifest.sig", b"{not json")])
    with pytest.raises(SignatureError, match=re.escape("manifest.sig is malformed")):
        verify_bundle(path, trusted_keys=trust(key))


# --- unsafe archives -----------------------------------------------------------------------


def _unsafe(
    tmp_path: Path, key: Ed25519PrivateKey, extra: tuple[tarfile.TarInfo, bytes | None]
) -> Path:
    entries = [*signed_head(key, {"artifacts/m.onnx": MODEL}), reg("artifacts/m.onnx", MODEL)]
    return write_tar(tmp_path / "bad.edgebundle", [*entries, extra])


@pytest.mark.parametrize(
    ("member", "message"),
    [
        (reg("../x", b"evil"), "member '../x': has a '..' component"),
        (reg("artifacts/../../x", b"evil"), "member 'artifacts/../../x': has a '..' component"),
        (reg("/etc/x", b"evil"), "member '/etc/x': is an absolute path"),
        (reg("artifacts\\..\\x", b"evil"), "member 'artifacts\\\\..\\\\x': contains a backslash"),
        (reg("C:/x", b"evil"), "member 'C:/x': starts with a drive letter"),
        (link("artifacts/l", "/etc/passwd", tarfile.SYMTYPE), "member 'artifacts/l': is a symlink"),
        (
            link("artifacts/h", "artifacts/m.onnx", tarfile.LNKTYPE),
            "member 'artifacts/h': is a hardlink",
        ),
        (link("artifacts/f", "", tarfile.FIFOTYPE), "member 'artifacts/f': is a device or fifo"),
        (link("artifacts/d", "", tarfile.CHRTYPE), "member 'artifacts/d': is a device or fifo"),
    ],
)
def test_unsafe_member(
    tmp_path: Path,
    key: Ed25519PrivateKey,
    member: tuple[tarfile.TarInfo, bytes | None],
    message: str,
) -> None:
    path = _unsafe(tmp_path, key, member)
    with pytest.raises(UnsafeBundleError) as info:
        verify_bundle(path, trusted_keys=trust(key))
    assert message in str(info.value)
    dest = tmp_path / "dest"
    with pytest.raises(UnsafeBundleError):
        extract_bundle(path, dest, trusted_keys=trust(key))
    assert not dest.exists()
    assert not (tmp_path.parent / "x").exists() and not (tmp_path / "x").exists()


def test_unsafe_member_before_the_manifest_is_refused_too(
    tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    path = write_tar(tmp_path / "b.edgebundle", [reg("../x", b"evil"), *signed_head(key, {})])
    with pytest.raises(UnsafeBundleError, match=re.escape("member '../x'")):
        verify_bundle(path, trusted_keys=trust(key))


def test_directories_are_ignored(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    directory = tarfile.TarInfo("artifacts")
    directory.type = tarfile.DIRTYPE
    entries = [
        *signed_head(key, {"artifacts/m.onnx": MODEL}),
        (directory, None),
        reg("artifacts/m.onnx", MODEL),
    ]
    path = write_tar(tmp_path / "b.edgebundle", entries)
    assert verify_bundle(path, trusted_keys=trust(key)).manifest["name"] == "handmade"


def test_oversize_member(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    out = make_bundle(tmp_path, key)
    with pytest.raises(UnsafeBundleError) as info:
        verify_bundle(out, trusted_keys=trust(key), max_member_bytes=len(MODEL) - 1)
    assert f"member 'artifacts/model.onnx': {len(MODEL)} bytes is over the limit" in str(info.value)


def test_total_over_limit(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    out = make_bundle(tmp_path, key)
    with pytest.raises(UnsafeBundleError, match="max_total_bytes"):
        verify_bundle(out, trusted_keys=trust(key), max_total_bytes=len(MODEL))


def test_too_many_members(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    out = make_bundle(tmp_path, key)  # manifest, signature, artifact, golden
    with pytest.raises(UnsafeBundleError, match="more than 3 members"):
        verify_bundle(out, trusted_keys=trust(key), max_members=3)


def test_duplicate_member(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    path = _unsafe(tmp_path, key, reg("artifacts/m.onnx", MODEL))
    with pytest.raises(
        UnsafeBundleError, match=re.escape("member 'artifacts/m.onnx': appears twice")
    ):
        verify_bundle(path, trusted_keys=trust(key))


def test_unlisted_member(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    path = _unsafe(tmp_path, key, reg("artifacts/extra.bin", b"surprise"))
    with pytest.raises(
        IntegrityError, match=re.escape("member 'artifacts/extra.bin' is not listed")
    ):
        verify_bundle(path, trusted_keys=trust(key))


def test_missing_member(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    listed = {"artifacts/m.onnx": MODEL, "golden.npz": GOLDEN}
    path = write_tar(
        tmp_path / "b.edgebundle", [*signed_head(key, listed), reg("artifacts/m.onnx", MODEL)]
    )
    with pytest.raises(
        IntegrityError, match=re.escape("member 'golden.npz' is listed in the manifest but missing")
    ):
        verify_bundle(path, trusted_keys=trust(key))


def test_wrong_size_member(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    entries = [
        *signed_head(key, {"artifacts/m.onnx": MODEL}),
        reg("artifacts/m.onnx", MODEL + b"!"),
    ]
    path = write_tar(tmp_path / "b.edgebundle", entries)
    with pytest.raises(
        IntegrityError, match=f"member 'artifacts/m.onnx' is {len(MODEL) + 1} bytes"
    ):
        verify_bundle(path, trusted_keys=trust(key))


def test_not_a_gzip_file(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    path = tmp_path / "model.edgebundle"
    path.write_bytes(b"PK\x03\x04 this is a zip, not a bundle")
    with pytest.raises(BundleError, match=re.escape("model.edgebundle: not a .edgebundle")) as info:
        verify_bundle(path, trusted_keys=trust(key))
    assert type(info.value) is BundleError
    with pytest.raises(BundleError, match=re.escape("not a .edgebundle")):
        read_manifest_unverified(path)


def test_gzip_but_not_tar(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    path = tmp_path / "model.edgebundle"
    path.write_bytes(gzip.compress(b"just some text, not a tar archive\n" * 20))
    with pytest.raises(BundleError, match=re.escape("model.edgebundle: ")):
        verify_bundle(path, trusted_keys=trust(key))


def test_truncated_bundle(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    out = make_bundle(tmp_path, key)
    data = out.read_bytes()
    out.write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleError) as info:
        verify_bundle(out, trusted_keys=trust(key))
    assert str(out) in str(info.value)


def test_missing_file(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    with pytest.raises(BundleError, match="no such bundle file"):
        verify_bundle(tmp_path / "nope.edgebundle", trusted_keys=trust(key))


# --- extraction ----------------------------------------------------------------------------


def test_extract_leaves_no_dest_on_failure(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    out = make_bundle(tmp_path, key)
    rewrite(out, b"ONNXMODELONNX", b"ONNXMODELONNY")
    parent = tmp_path / "models"
    parent.mkdir()
    dest = parent / "detector"
    with pytest.raises(IntegrityError):
        extract_bundle(out, dest, trusted_keys=trust(key))
    assert list(parent.iterdir()) == []  # neither dest nor a temp directory


def test_extract_refuses_existing_dest(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    out = make_bundle(tmp_path, key)
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "keep").write_text("mine", encoding="utf-8")
    with pytest.raises(ConfigError, match="already exists"):
        extract_bundle(out, dest, trusted_keys=trust(key))
    assert [p.name for p in dest.iterdir()] == ["keep"]


def test_read_manifest_unverified_does_not_check_the_signature(
    tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    out = make_bundle(tmp_path, key)
    rewrite(out, b'"detector"', b'"detectoR"')
    assert read_manifest_unverified(out)["name"] == "detectoR"
