"""The ``.edgebundle`` format, defined once: the converter writes it, the agent verifies it.

A bundle is a gzip-compressed tar whose members are, in this order:

``manifest.json``
    UTF-8 JSON with sorted keys. These exact bytes are what is signed; they are never re-serialized
    before verification.
``manifest.sig``
    JSON ``{"alg": "ed25519", "key_id": "<16 hex>", "signature": "<base64>"}``.
``artifacts/<file>`` and the other files the manifest lists.

The manifest is a JSON object with at least::

    schema    int, BUNDLE_SCHEMA_VERSION
    name      str
    version   semver string, e.g. "1.4.0"
    created   ISO 8601 UTC, e.g. "2025-01-31T12:00:00Z"
    artifacts [{path, format, precision, sha256, size, runtime, profiles: [...], ...extra}]
    files     [{path, sha256, size}]   other files, e.g. a golden input "golden.npz"

Optional, checked here when present::

    state     [{input, output, initial}]   a streaming model's state pairs: the output fed back
                                           into the input with the stream's next window
                                           (``initial``: the starting value, default 0.0)

Other top-level keys (inputs, outputs, preprocess, golden, calibration_stats, ...) belong to the
converter and pass through this module untouched.

Verification streams the archive once with bounded memory: every member's name and type is checked
before its data is read, the signature is checked before any file data is read, and every file is
hashed in chunks. Nothing is ever unpickled and ``tarfile.extractall`` is never used.

Errors (all :class:`~edge_agent.errors.BundleError`): :class:`UnsafeBundleError` for a member that
is a link, absolute, escapes, or too large; :class:`SignatureError` for a missing, malformed or
untrusted signature; :class:`IntegrityError` for a member that does not match the manifest.
"""

from __future__ import annotations

import base64
import binascii
import copy
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import tarfile
import tempfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any, NoReturn

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edge_agent.common.durable import fsync_dir
from edge_agent.common.hashing import sha256_prefix
from edge_agent.errors import (
    BundleError,
    ConfigError,
    EdgeError,
    IntegrityError,
    SignatureError,
    UnsafeBundleError,
)
from edge_agent.model.formats import ARTIFACT_FORMATS, RUNTIME_FOR_FORMAT
from edge_agent.model.keys import key_id as compute_key_id

BUNDLE_SCHEMA_VERSION = 1
BUNDLE_SUFFIX = ".edgebundle"
MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "manifest.sig"
SIGNATURE_ALG = "ed25519"
ARTIFACTS_DIR = "artifacts"

#: Default limits; every reading function takes keyword overrides.
MAX_MEMBER_BYTES = 2 * 1024**3
MAX_TOTAL_BYTES = 8 * 1024**3
MAX_MEMBERS = 10_000
MAX_MANIFEST_BYTES = 16 * 1024**2
MAX_SIGNATURE_BYTES = 4096

_CHUNK = 1024 * 1024
_HEADER_ALLOWANCE = 64 * 1024  # tar headers / pax records per member, for the read cap
_SEMVER_RE = re.compile(
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?$"
)
_CREATED_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?(Z|\+00:00)$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_DRIVE_RE = re.compile(r"^[A-Za-z]:")
_ARTIFACT_KEYS = ("path", "format", "precision", "sha256", "size", "runtime", "profiles")
_FILE_KEYS = ("path", "sha256", "size")
_FILLED_KEYS = ("schema", "artifacts", "files")
#: the keys of one ``state`` entry; ``initial`` may be left out (0.0)
STATE_KEYS = ("input", "output", "initial")


# --- values --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ArtifactInput:
    """One model file to put in a bundle (for :func:`write_bundle`)."""

    path: Path  # the file on disk
    format: str  # one of formats.ARTIFACT_FORMATS
    precision: str  # e.g. "fp32", "fp16", "int8"
    profiles: tuple[str, ...]  # device profiles this artifact is meant for
    extra: Mapping[str, Any] = field(default_factory=dict)  # more manifest keys, e.g. int8_scheme
    name: str | None = None  # name in the archive; default artifacts/<file name>

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))
        object.__setattr__(self, "profiles", tuple(self.profiles))
        if self.format not in ARTIFACT_FORMATS:
            raise ConfigError(
                f"{self.path}: format = {self.format!r}: unknown artifact format "
                f"(known: {', '.join(ARTIFACT_FORMATS)})"
            )
        if not isinstance(self.precision, str) or not self.precision:
            raise ConfigError(
                f"{self.path}: precision = {self.precision!r}: must be a non-empty string"
            )
        if not all(isinstance(p, str) and p for p in self.profiles):
            raise ConfigError(
                f"{self.path}: profiles = {list(self.profiles)!r}: must be profile names"
            )
        clash = sorted(set(self.extra) & set(_ARTIFACT_KEYS))
        if clash:
            raise ConfigError(
                f"{self.path}: extra key {clash[0]!r} is filled by write_bundle; "
                "remove it from extra"
            )
        try:
            _check_path(self.archive_name)
        except ValueError as exc:
            raise ConfigError(f"{self.path}: name = {self.archive_name!r}: {exc}") from None
        if not self.archive_name.startswith(f"{ARTIFACTS_DIR}/"):
            raise ConfigError(
                f"{self.path}: name = {self.archive_name!r}: artifacts live under "
                f"{ARTIFACTS_DIR}/, e.g. {ARTIFACTS_DIR}/{self.path.name}"
            )

    @property
    def archive_name(self) -> str:
        return self.name if self.name is not None else f"{ARTIFACTS_DIR}/{self.path.name}"


@dataclass(frozen=True)
class VerifiedBundle:
    """A bundle whose signature and every file checked out."""

    path: Path  # the .edgebundle file
    manifest: dict[str, Any]  # the signed manifest
    key_id: str  # the trusted key that signed it
    extracted: Path | None = None  # where extract_bundle put the files (None after verify)

    def artifact(self, fmt: str, *, profile: str | None = None) -> dict[str, Any] | None:
        """The first artifact entry of format ``fmt`` (and for ``profile``, if given), or None."""
        if fmt not in ARTIFACT_FORMATS:
            raise ConfigError(
                f"unknown artifact format {fmt!r} (known: {', '.join(ARTIFACT_FORMATS)})"
            )
        for entry in self.manifest["artifacts"]:
            if entry["format"] == fmt and (profile is None or profile in entry["profiles"]):
                return dict(entry)
        return None


# --- paths and members ---------------------------------------------------------------------


def _check_path(name: str) -> None:
    """Raise ValueError unless ``name`` is a plain relative POSIX path inside the bundle."""
    if not name:
        raise ValueError("empty path")
    if "\\" in name:
        raise ValueError("contains a backslash")
    if "\x00" in name:
        raise ValueError("contains a NUL byte")
    if name.startswith("/"):
        raise ValueError("is an absolute path")
    if _DRIVE_RE.match(name):
        raise ValueError("starts with a drive letter")
    for part in name.split("/"):
        if part == "..":
            raise ValueError("has a '..' component (escapes the bundle)")
        if part in ("", "."):
            raise ValueError("has an empty or '.' component")


def _check_member(bundle: Path, member: tarfile.TarInfo, *, max_member_bytes: int) -> None:
    name = member.name
    try:
        _check_path(name.rstrip("/") if member.isdir() else name)
    except ValueError as exc:
        raise UnsafeBundleError(f"{bundle}: member {name!r}: {exc}") from None
    if member.issym():
        raise UnsafeBundleError(f"{bundle}: member {name!r}: is a symlink (to {member.linkname!r})")
    if member.islnk():
        raise UnsafeBundleError(
            f"{bundle}: member {name!r}: is a hardlink (to {member.linkname!r})"
        )
    if member.isdev():
        raise UnsafeBundleError(f"{bundle}: member {name!r}: is a device or fifo")
    if member.isdir():
        return
    if not member.isreg() or member.issparse():
        raise UnsafeBundleError(
            f"{bundle}: member {name!r}: unsupported tar entry type {member.type!r}"
        )
    if member.size > max_member_bytes:
        raise UnsafeBundleError(
            f"{bundle}: member {name!r}: {member.size} bytes is over the limit of "
            f"{max_member_bytes} (max_member_bytes)"
        )


class _CappedReader:
    """A read-only stream that refuses to yield more than ``limit`` bytes in total, so a gzip
    bomb or a giant pax header cannot exhaust memory or disk."""

    def __init__(self, raw: io.BufferedIOBase, *, limit: int, bundle: Path) -> None:
        self._raw, self._left, self._bundle = raw, limit, bundle

    def read(self, size: int = -1) -> bytes:
        if size < 0 or size > self._left:
            size = self._left + 1
        data = self._raw.read(size)
        self._left -= len(data)
        if self._left < 0:
            raise UnsafeBundleError(
                f"{self._bundle}: decompresses to more than the limit "
                "(max_total_bytes plus headers); refusing to read further"
            )
        return data


@dataclass
class _Reader:
    """One sequential pass over a bundle's members."""

    bundle: Path
    tar: tarfile.TarFile

    def members(
        self, *, max_members: int, max_member_bytes: int, max_total_bytes: int
    ) -> Iterator[tarfile.TarInfo]:
        """Yield regular-file members after the safety checks (directories are skipped)."""
        seen: set[str] = set()
        count = total = 0
        while True:
            try:
                member = self.tar.next()
            except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
                raise BundleError(f"{self.bundle}: corrupt or truncated bundle: {exc}") from exc
            if member is None:
                return
            count += 1
            if count > max_members:
                raise UnsafeBundleError(
                    f"{self.bundle}: member {member.name!r}: more than {max_members} members "
                    "(max_members)"
                )
            _check_member(self.bundle, member, max_member_bytes=max_member_bytes)
            if member.isdir():
                continue
            if member.name in seen:
                raise UnsafeBundleError(f"{self.bundle}: member {member.name!r}: appears twice")
            seen.add(member.name)
            total += member.size
            if total > max_total_bytes:
                raise UnsafeBundleError(
                    f"{self.bundle}: member {member.name!r}: the members add up to more than "
                    f"{max_total_bytes} bytes (max_total_bytes)"
                )
            yield member

    def chunks(self, member: tarfile.TarInfo) -> Iterator[bytes]:
        f = self.tar.extractfile(member)
        if f is None:  # pragma: no cover - only regular files reach here
            raise BundleError(f"{self.bundle}: member {member.name!r}: cannot be read")
        left = member.size
        try:
            while left > 0:
                chunk = f.read(min(_CHUNK, left))
                if not chunk:
                    raise BundleError(f"{self.bundle}: member {member.name!r}: truncated")
                left -= len(chunk)
                yield chunk
        except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
            raise BundleError(f"{self.bundle}: member {member.name!r}: corrupt: {exc}") from exc

    def read_small(self, member: tarfile.TarInfo, *, limit: int) -> bytes:
        if member.size > limit:
            raise UnsafeBundleError(
                f"{self.bundle}: member {member.name!r}: {member.size} bytes is over the "
                f"{limit}-byte limit for it"
            )
        return b"".join(self.chunks(member))


@contextmanager
def _open(bundle: Path, *, max_members: int, max_total_bytes: int) -> Iterator[_Reader]:
    """Open a bundle for one sequential pass (the gzip stream is capped, see _CappedReader)."""
    try:
        raw = bundle.open("rb")
    except FileNotFoundError:
        raise BundleError(f"{bundle}: no such bundle file") from None
    except OSError as exc:
        raise BundleError(f"{bundle}: cannot read bundle: {exc.strerror or exc}") from exc
    with raw, gzip.GzipFile(fileobj=raw, mode="rb") as gz:
        if raw.read(2) != b"\x1f\x8b":
            raise BundleError(
                f"{bundle}: not a {BUNDLE_SUFFIX} (a gzip-compressed tar): it does not start "
                "with the gzip magic bytes"
            )
        raw.seek(0)
        limit = max_total_bytes + (max_members + 2) * _HEADER_ALLOWANCE
        capped = _CappedReader(gz, limit=limit, bundle=bundle)
        try:
            # closed by the `with tar` below; stream mode ("r|") reads strictly in order
            tar = tarfile.open(fileobj=capped, mode="r|")  # type: ignore[call-overload]  # noqa: SIM115
        except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
            raise BundleError(
                f"{bundle}: not a {BUNDLE_SUFFIX} (a gzip-compressed tar): {exc}"
            ) from exc
        with tar:
            yield _Reader(bundle, tar)


# --- the manifest --------------------------------------------------------------------------


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not valid JSON")


def _loads(data: bytes) -> Any:
    return json.loads(
        data.decode("utf-8"),
        object_pairs_hook=_no_duplicate_keys,
        parse_constant=_reject_constant,
    )


def _dumps(manifest: Mapping[str, Any]) -> bytes:
    text = json.dumps(manifest, sort_keys=True, indent=2, ensure_ascii=False, allow_nan=False)
    return (text + "\n").encode("utf-8")


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def validate_manifest(
    manifest: Any, *, error: type[EdgeError] = BundleError, where: str = ""
) -> None:
    """Check the keys this module defines (the rest pass through). Raises ``error``."""
    prefix = f"{where}: manifest" if where else "manifest"

    def fail(message: str) -> NoReturn:
        raise error(f"{prefix}: {message}")

    if not isinstance(manifest, dict):
        fail(f"must be a JSON object, not {type(manifest).__name__}")
    schema = manifest.get("schema")
    if not isinstance(schema, int) or isinstance(schema, bool) or schema < 1:
        fail(f"schema = {schema!r}: must be an integer >= 1")
    if schema > BUNDLE_SCHEMA_VERSION:
        fail(
            f"schema = {schema}: newer than this edge_agent understands "
            f"({BUNDLE_SCHEMA_VERSION}); upgrade edge_agent on the device"
        )
    name = manifest.get("name")
    if not isinstance(name, str) or not name.strip():
        fail(f"name = {name!r}: must be a non-empty string")
    version = manifest.get("version")
    if not isinstance(version, str) or not _SEMVER_RE.match(version):
        fail(f"version = {version!r}: must be a semantic version such as '1.2.0'")
    created = manifest.get("created")
    if not isinstance(created, str) or not _CREATED_RE.match(created):
        fail(f"created = {created!r}: must be ISO 8601 UTC such as '2025-01-31T12:00:00Z'")
    paths: set[str] = set()
    for list_key, required in (("artifacts", _ARTIFACT_KEYS), ("files", _FILE_KEYS)):
        entries = manifest.get(list_key)
        if not isinstance(entries, list):
            fail(f"{list_key} = {entries!r}: must be a list")
        for i, entry in enumerate(entries):
            where_entry = f"{list_key}[{i}]"
            if not isinstance(entry, dict):
                fail(f"{where_entry} = {entry!r}: must be an object")
            missing = [k for k in required if k not in entry]
            if missing:
                fail(f"{where_entry}: missing key {missing[0]!r}")
            if list_key == "files" and set(entry) != set(required):
                extra = sorted(set(entry) - set(required))
                fail(f"{where_entry}: unknown key {extra[0]!r} (known: {', '.join(required)})")
            path = entry["path"]
            try:
                if not isinstance(path, str):
                    raise ValueError("must be a string")
                _check_path(path)
            except ValueError as exc:
                fail(f"{where_entry}.path = {path!r}: {exc}")
            if path in (MANIFEST_NAME, SIGNATURE_NAME) or path in paths:
                fail(f"{where_entry}.path = {path!r}: listed twice or reserved")
            paths.add(path)
            if not isinstance(entry["sha256"], str) or not _SHA256_RE.match(entry["sha256"]):
                fail(f"{where_entry}.sha256 = {entry['sha256']!r}: must be 64 lowercase hex digits")
            if not _is_int(entry["size"]) or entry["size"] < 0:
                fail(f"{where_entry}.size = {entry['size']!r}: must be an integer >= 0")
            if list_key == "artifacts":
                _validate_artifact(entry, where_entry, fail)
    if "state" in manifest:
        _validate_state(manifest["state"], fail)


def _validate_state(entries: Any, fail: Callable[[str], NoReturn]) -> None:
    """The optional ``state`` list: a streaming model's state pairs (``edge_agent.model.state``;
    whether the names and shapes fit the model is checked when it is loaded)."""
    if not isinstance(entries, list):
        fail(
            f"state = {entries!r}: must be a list of {{input, output, initial}} objects "
            "(leave the key out for a model without declared state)"
        )
    seen: set[tuple[str, str]] = set()
    for i, entry in enumerate(entries):
        where = f"state[{i}]"
        if not isinstance(entry, dict):
            fail(f"{where} = {entry!r}: must be an object with keys {', '.join(STATE_KEYS)}")
        extra = sorted(set(entry) - set(STATE_KEYS))
        if extra:
            fail(f"{where}: unknown key {extra[0]!r} (known: {', '.join(STATE_KEYS)})")
        for key in ("input", "output"):
            value = entry.get(key)
            if not isinstance(value, str) or not value:
                fail(f"{where}.{key} = {value!r}: must be the name of a model {key}")
            if (key, value) in seen:
                fail(f"{where}.{key} = {value!r}: already in another state pair; keep one")
            seen.add((key, value))
        if entry["input"] == entry["output"]:
            fail(f"{where}: input and output are both {entry['input']!r}; they must differ")
        initial = entry.get("initial", 0.0)
        if not isinstance(initial, (int, float)) or isinstance(initial, bool):
            fail(f"{where}.initial = {initial!r}: must be a number (the state's starting value)")


def _validate_artifact(entry: dict[str, Any], where: str, fail: Callable[[str], NoReturn]) -> None:
    if not entry["path"].startswith(f"{ARTIFACTS_DIR}/"):
        fail(f"{where}.path = {entry['path']!r}: artifacts live under {ARTIFACTS_DIR}/")
    fmt = entry["format"]
    if fmt not in ARTIFACT_FORMATS:
        fail(f"{where}.format = {fmt!r}: unknown format (known: {', '.join(ARTIFACT_FORMATS)})")
    if entry["runtime"] != RUNTIME_FOR_FORMAT[fmt]:
        fail(f"{where}.runtime = {entry['runtime']!r}: {fmt} runs on {RUNTIME_FOR_FORMAT[fmt]!r}")
    if not isinstance(entry["precision"], str) or not entry["precision"]:
        fail(f"{where}.precision = {entry['precision']!r}: must be a non-empty string")
    profiles = entry["profiles"]
    if not isinstance(profiles, list) or not all(isinstance(p, str) for p in profiles):
        fail(f"{where}.profiles = {profiles!r}: must be a list of profile names")


def _listed(manifest: Mapping[str, Any]) -> dict[str, tuple[int, str]]:
    """path -> (size, sha256) for every file the manifest lists."""
    return {
        entry["path"]: (entry["size"], entry["sha256"])
        for entry in [*manifest["artifacts"], *manifest["files"]]
    }


def _check_signature(
    bundle: Path,
    manifest_bytes: bytes,
    sig_bytes: bytes,
    trusted: Mapping[str, Ed25519PublicKey],
) -> str:
    """Verify ``manifest_bytes`` against the signature; return the signing key's id."""
    try:
        sig = _loads(sig_bytes)
        if not isinstance(sig, dict) or set(sig) != {"alg", "key_id", "signature"}:
            raise ValueError("expected an object with keys alg, key_id, signature")
        if sig["alg"] != SIGNATURE_ALG:
            raise ValueError(f"alg = {sig['alg']!r}, expected {SIGNATURE_ALG!r}")
        if not isinstance(sig["key_id"], str) or not isinstance(sig["signature"], str):
            raise ValueError("key_id and signature must be strings")
        signature = base64.b64decode(sig["signature"], validate=True)
    except (ValueError, UnicodeDecodeError, RecursionError, binascii.Error) as exc:
        raise SignatureError(f"{bundle}: {SIGNATURE_NAME} is malformed: {exc}") from None
    # Index by the ids we compute ourselves, not by the caller's dict keys.
    by_id = {compute_key_id(k): k for k in trusted.values()}
    signer = sig["key_id"]
    if signer not in by_id:
        known = ", ".join(sorted(by_id)) or "none were given"
        raise SignatureError(
            f"{bundle}: manifest signed by key {signer} which is not trusted (trusted: {known}); "
            "add its .pub to the trusted keys if you trust it"
        )
    try:
        by_id[signer].verify(signature, manifest_bytes)
    except InvalidSignature:
        raise SignatureError(
            f"{bundle}: signature does not match manifest (key {signer}); the bundle was "
            "modified after signing"
        ) from None
    return signer


# --- reading -------------------------------------------------------------------------------


def _scan(
    bundle: Path,
    *,
    trusted_keys: Mapping[str, Ed25519PublicKey],
    max_member_bytes: int,
    max_total_bytes: int,
    max_members: int,
    out_dir: Path | None,
) -> VerifiedBundle:
    """One pass: safety checks, signature, then every file hashed (and written under out_dir)."""
    manifest_bytes: bytes | None = None
    sig_bytes: bytes | None = None
    manifest: dict[str, Any] | None = None
    signer = ""
    listed: dict[str, tuple[int, str]] = {}
    found: set[str] = set()
    with _open(bundle, max_members=max_members, max_total_bytes=max_total_bytes) as reader:
        for member in reader.members(
            max_members=max_members,
            max_member_bytes=max_member_bytes,
            max_total_bytes=max_total_bytes,
        ):
            name = member.name
            if manifest is None:
                if name == MANIFEST_NAME:
                    manifest_bytes = reader.read_small(member, limit=MAX_MANIFEST_BYTES)
                elif name == SIGNATURE_NAME:
                    sig_bytes = reader.read_small(member, limit=MAX_SIGNATURE_BYTES)
                elif manifest_bytes is None:
                    raise BundleError(
                        f"{bundle}: member {name!r} comes before {MANIFEST_NAME}; a bundle "
                        f"starts with {MANIFEST_NAME} and {SIGNATURE_NAME} (rebuild it with "
                        "write_bundle)"
                    )
                else:
                    raise SignatureError(
                        f"{bundle}: unsigned: no {SIGNATURE_NAME} before member {name!r}"
                    )
                if manifest_bytes is not None and sig_bytes is not None:
                    signer = _check_signature(bundle, manifest_bytes, sig_bytes, trusted_keys)
                    manifest = _parse_manifest(bundle, manifest_bytes)
                    listed = _listed(manifest)
                    if out_dir is not None:
                        _write_file(out_dir, MANIFEST_NAME, [manifest_bytes])
                        _write_file(out_dir, SIGNATURE_NAME, [sig_bytes])
                continue
            if name not in listed:
                raise IntegrityError(
                    f"{bundle}: member {name!r} is not listed in the signed manifest"
                )
            size, sha256 = listed[name]
            if member.size != size:
                raise IntegrityError(
                    f"{bundle}: member {name!r} is {member.size} bytes; the manifest says {size}"
                )
            digest = hashlib.sha256()
            chunks = _tee(reader.chunks(member), digest)
            if out_dir is not None:
                _write_file(out_dir, name, chunks)
            else:
                for _ in chunks:
                    pass
            if digest.hexdigest() != sha256:
                raise IntegrityError(
                    f"{bundle}: member {name!r}: sha256 {digest.hexdigest()[:16]}... does not "
                    f"match the manifest ({sha256[:16]}...)"
                )
            found.add(name)
    if manifest_bytes is None:
        raise BundleError(f"{bundle}: no {MANIFEST_NAME}; not a {BUNDLE_SUFFIX}")
    if manifest is None:
        raise SignatureError(f"{bundle}: unsigned: no {SIGNATURE_NAME}")
    missing = sorted(set(listed) - found)
    if missing:
        raise IntegrityError(
            f"{bundle}: member {missing[0]!r} is listed in the manifest but missing from the bundle"
        )
    return VerifiedBundle(path=bundle, manifest=manifest, key_id=signer, extracted=out_dir)


def _tee(chunks: Iterator[bytes], digest: Any) -> Iterator[bytes]:
    for chunk in chunks:
        digest.update(chunk)
        yield chunk


def _parse_manifest(bundle: Path, data: bytes) -> dict[str, Any]:
    try:
        manifest = _loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise BundleError(f"{bundle}: {MANIFEST_NAME} is not valid JSON: {exc}") from None
    validate_manifest(manifest, where=str(bundle))
    return manifest


def _write_file(root: Path, name: str, chunks: Iterable[bytes]) -> None:
    """Create ``root/name`` (name already checked safe) exclusively and fill it."""
    target = root.joinpath(*name.split("/"))
    target.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(target, flags, 0o644)
    with os.fdopen(fd, "wb") as f:
        for chunk in chunks:
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())


def verify_bundle(
    path: Path,
    *,
    trusted_keys: Mapping[str, Ed25519PublicKey],
    max_member_bytes: int = MAX_MEMBER_BYTES,
    max_total_bytes: int = MAX_TOTAL_BYTES,
    max_members: int = MAX_MEMBERS,
) -> VerifiedBundle:
    """Check a bundle without extracting it: member safety, the manifest signature against any
    one of ``trusted_keys``, and every listed file's size and sha256."""
    return _scan(
        Path(path),
        trusted_keys=trusted_keys,
        max_member_bytes=max_member_bytes,
        max_total_bytes=max_total_bytes,
        max_members=max_members,
        out_dir=None,
    )


def extract_bundle(
    path: Path,
    dest: Path,
    *,
    trusted_keys: Mapping[str, Ed25519PublicKey],
    max_member_bytes: int = MAX_MEMBER_BYTES,
    max_total_bytes: int = MAX_TOTAL_BYTES,
    max_members: int = MAX_MEMBERS,
) -> VerifiedBundle:
    """Verify and extract a bundle into ``dest``, which must not exist yet.

    Files are written into a temporary directory next to ``dest``, hashed as they are written,
    and the directory is renamed to ``dest`` only when everything checked out. The signature is
    checked before the first file byte is written. On any error ``dest`` does not exist.
    """
    path, dest = Path(path), Path(dest)
    if dest.exists() or dest.is_symlink():
        raise ConfigError(f"{dest}: already exists; remove it or extract somewhere else")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    except OSError as exc:
        raise ConfigError(f"{dest}: cannot create a directory next to it: {exc}") from exc
    try:
        verified = _scan(
            path,
            trusted_keys=trusted_keys,
            max_member_bytes=max_member_bytes,
            max_total_bytes=max_total_bytes,
            max_members=max_members,
            out_dir=tmp,
        )
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        if dest.exists() or dest.is_symlink():
            raise ConfigError(f"{dest}: appeared while extracting; not replacing it")
        os.rename(tmp, dest)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise BundleError(f"{path}: cannot extract into {dest}: {exc}") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(dest.parent)
    return VerifiedBundle(
        path=path, manifest=verified.manifest, key_id=verified.key_id, extracted=dest
    )


def read_manifest_unverified(
    path: Path, *, max_members: int = MAX_MEMBERS, max_total_bytes: int = MAX_TOTAL_BYTES
) -> dict[str, Any]:
    """The manifest as stored, for ``inspect``. UNTRUSTED: the signature and files are not
    checked, so never act on it; use :func:`verify_bundle` for that."""
    bundle = Path(path)
    with _open(bundle, max_members=max_members, max_total_bytes=max_total_bytes) as reader:
        for member in reader.members(
            max_members=max_members,
            max_member_bytes=MAX_MANIFEST_BYTES,
            max_total_bytes=max_total_bytes,
        ):
            if member.name == MANIFEST_NAME:
                data = reader.read_small(member, limit=MAX_MANIFEST_BYTES)
                try:
                    manifest = _loads(data)
                except (ValueError, UnicodeDecodeError, RecursionError) as exc:
                    raise BundleError(
                        f"{bundle}: {MANIFEST_NAME} is not valid JSON: {exc}"
                    ) from None
                if not isinstance(manifest, dict):
                    raise BundleError(f"{bundle}: {MANIFEST_NAME} is not a JSON object")
                return manifest
            if member.name != SIGNATURE_NAME:
                break
    raise BundleError(f"{bundle}: no {MANIFEST_NAME} at the start; not a {BUNDLE_SUFFIX}")


# --- writing -------------------------------------------------------------------------------


class _HashingReader:
    """Feeds tarfile from a file while hashing what it hands over."""

    def __init__(self, f: IO[bytes]) -> None:
        self._f, self.digest, self.size = f, hashlib.sha256(), 0

    def read(self, size: int = -1) -> bytes:
        data = self._f.read(size)
        self.digest.update(data)
        self.size += len(data)
        return data


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime, info.type = size, 0o644, 0, tarfile.REGTYPE
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _utc_now() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def write_bundle(
    out: Path,
    *,
    manifest: Mapping[str, Any],
    artifacts: Sequence[ArtifactInput],
    files: Mapping[str, Path] | None = None,
    signing_key: Ed25519PrivateKey,
) -> dict[str, Any]:
    """Write a signed bundle to ``out`` and return the final manifest.

    ``manifest`` holds ``name``, ``version`` and the converter's own keys; ``created`` is filled
    when absent, and ``schema``, ``artifacts`` and ``files`` are always filled here (passing them is
    an error). ``files`` maps archive names (e.g. ``"golden.npz"``) to files on disk. The bundle is
    written to a temporary file next to ``out`` and renamed over it, so ``out`` is never partial.
    """
    out = Path(out)
    files = dict(files or {})
    filled = sorted(set(manifest) & set(_FILLED_KEYS))
    if filled:
        raise ConfigError(
            f"{out}: manifest key {filled[0]!r} is filled by write_bundle; remove it (pass "
            "artifacts=[ArtifactInput(...)] and files={name: path} instead)"
        )
    final: dict[str, Any] = copy.deepcopy(dict(manifest))
    final["schema"] = BUNDLE_SCHEMA_VERSION
    final.setdefault("created", _utc_now())
    sources: dict[str, Path] = {}
    for item in artifacts:
        if not isinstance(item, ArtifactInput):
            raise ConfigError(f"{out}: artifacts must be ArtifactInput values, got {item!r}")
        sources[item.archive_name] = item.path
    for name, local in files.items():
        try:
            _check_path(name)
        except ValueError as exc:
            raise ConfigError(f"{out}: files[{name!r}]: {exc}") from None
        if name in sources or name in (MANIFEST_NAME, SIGNATURE_NAME):
            raise ConfigError(f"{out}: files[{name!r}]: name used twice or reserved")
        sources[name] = Path(local)
    if len(sources) != len(artifacts) + len(files):
        dup = [a.archive_name for a in artifacts]
        twice = next(n for n in dup if dup.count(n) > 1)
        raise ConfigError(f"{out}: artifact name {twice!r} used twice; give one a name=")
    hashes: dict[str, tuple[int, str]] = {}
    for name, local in sources.items():
        try:
            size, digest = sha256_prefix(local)
            hashes[name] = (size, digest.hexdigest())
        except OSError as exc:
            raise ConfigError(f"{local}: cannot read {name}: {exc.strerror or exc}") from exc
    final["artifacts"] = [
        {
            **copy.deepcopy(dict(item.extra)),
            "path": item.archive_name,
            "format": item.format,
            "precision": item.precision,
            "sha256": hashes[item.archive_name][1],
            "size": hashes[item.archive_name][0],
            "runtime": RUNTIME_FOR_FORMAT[item.format],
            "profiles": list(item.profiles),
        }
        for item in artifacts
    ]
    final["files"] = [
        {"path": name, "sha256": hashes[name][1], "size": hashes[name][0]} for name in files
    ]
    try:
        manifest_bytes = _dumps(final)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{out}: the manifest is not plain JSON: {exc}") from exc
    final = _loads(manifest_bytes)  # exactly what a verifier will see
    validate_manifest(final, error=ConfigError, where=str(out))
    public = signing_key.public_key()
    sig_bytes = _dumps(
        {
            "alg": SIGNATURE_ALG,
            "key_id": compute_key_id(public),
            "signature": base64.b64encode(signing_key.sign(manifest_bytes)).decode("ascii"),
        }
    )

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    except OSError as exc:
        raise ConfigError(f"{out}: cannot write here: {exc}") from exc
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as raw:
            with (
                gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz,
                tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar,
            ):
                for name, data in ((MANIFEST_NAME, manifest_bytes), (SIGNATURE_NAME, sig_bytes)):
                    tar.addfile(_tarinfo(name, len(data)), io.BytesIO(data))
                for name, local in sources.items():
                    size, sha256 = hashes[name]
                    with local.open("rb") as f:
                        reader = _HashingReader(f)
                        tar.addfile(_tarinfo(name, size), reader)
                    if reader.size != size or reader.digest.hexdigest() != sha256:
                        raise ConfigError(f"{local}: changed while the bundle was being written")
            raw.flush()
            os.fsync(raw.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ConfigError(f"{out}: cannot write bundle: {exc}") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return final


__all__ = [
    "BUNDLE_SCHEMA_VERSION",
    "BUNDLE_SUFFIX",
    "MAX_MEMBERS",
    "MAX_MEMBER_BYTES",
    "MAX_TOTAL_BYTES",
    "ArtifactInput",
    "VerifiedBundle",
    "extract_bundle",
    "read_manifest_unverified",
    "validate_manifest",
    "verify_bundle",
    "write_bundle",
]
