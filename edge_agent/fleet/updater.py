"""Over-the-air model updates: pull-based, verified, health-gated, rolled back by themselves.

The device reconciles towards its desired state (``edge/<device>/desired``, or a group's): when
the desired bundle differs from the committed one, :class:`Updater` runs, in its own thread:

1. **fetch**: a bundle kept on disk from before (a rollback is instant); else the ``url`` of the
   desired state over HTTP(S), resumed with Range requests (``edge_agent.fleet.download``); else the
   retained chunks ``edgectl publish`` left on the broker (:class:`ChunkFetcher`), each checked
   against its sha256 as it arrives, kept on disk so an interrupted transfer resumes. Whatever
   the route, the whole file must hash to the desired sha256.
2. **verify** before anything is loaded: the Ed25519 signature against the trusted keys and each
   artifact's sha256 (``edge_agent.model.bundle``), compatibility (an artifact for this profile
   whose runtime is installed, and the agent version the bundle requires), anti-rollback (the
   version may not go below the floor, the highest version ever committed, unless the desired state
   says ``allow_downgrade``: what ``edgectl rollback`` sets).
3. **stage**: the pending update is written to ``state.json`` first, then the bundle is extracted
   into the state directory, loaded and warmed beside the running model, and its golden input
   smoke-tested.
4. **swap** between two frames (``Pipeline.swap_model``), then a **health window**: no inference
   errors or NaN/inf outputs beyond ``max_error_rate``, inference p95 at most ``latency_budget``
   times the reference (the larger of the bundle's measured latency and the previous model's p95
   here) plus ``latency_slack_ms`` (scheduler jitter), enough frames, and predictions that did
   not collapse to one class where the previous
   model's were spread. Pass: **commit**. Fail: swap back to the previous model (still loaded),
   and an event that says why.

Crash safety (``state.json`` is replaced atomically: temp file, fsync, rename, fsync of the
directory): a SIGKILL or power loss during download leaves chunks or a ``.part`` file that the
next attempt resumes; during stage or swap, ``state.json`` still names the old model as current
and the update as pending, so the next start runs the old model, records the update as failed
("the agent restarted during the update") and does not retry it for the same deployment; during
commit, the rename either happened or it did not. The device never starts on a half-installed
model. The last ``keep_models`` committed bundles stay on disk.

``EDGE_AGENT_CRASH_AT=download|stage|swap|commit`` makes the agent SIGKILL itself at that step:
the fault-injection point the crash tests use (a designed seam, like a synthetic Source).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import queue
import re
import shutil
import signal
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import edge_agent
from edge_agent.common.durable import atomic_write, fsync_dir
from edge_agent.common.hashing import sha256_file
from edge_agent.errors import BundleError, EdgeError, ModelError, UpdateError
from edge_agent.fleet.protocol import (
    SCHEMA_VERSION,
    Desired,
    ProtocolError,
    bundle_chunk_topic,
    bundle_meta_topic,
    loads,
)

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
#: A transfer missing at most this many chunks subscribes to each; more, to one wildcard.
MAX_CHUNK_SUBSCRIPTIONS = 24
_CRASH_ENV = "EDGE_AGENT_CRASH_AT"
STOPPING = "the agent is stopping"


def crash_point(step: str) -> None:
    """Fault injection for the crash tests: SIGKILL ourselves at ``step`` when asked to."""
    if os.environ.get(_CRASH_ENV) == step:
        log.warning("crash point %s: killing the agent (%s is set)", step, _CRASH_ENV)
        os.kill(os.getpid(), signal.SIGKILL)


def version_key(version: str) -> tuple[Any, ...]:
    """Orders ``1.2.10`` after ``1.2.9``: numeric parts as numbers, the rest as text."""
    parts = re.split(r"[.+-]", version)
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts)


# --- the committed pointer -------------------------------------------------------------------


class ModelStore:
    """``<state_dir>/ota/``: ``state.json`` (current, floor, history, pending, failed) and the
    kept bundles (``bundles/<sha256>.edgebundle``)."""

    def __init__(self, state_dir: Path, *, keep: int = 3) -> None:
        self.root = Path(state_dir) / "ota"
        self.bundles = self.root / "bundles"
        self.downloads = self.root / "downloads"
        self.keep = keep
        for d in (self.root, self.bundles, self.downloads):
            d.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self.state = self._load()

    def _load(self) -> dict[str, Any]:
        path = self.root / STATE_FILE
        empty: dict[str, Any] = {
            "schema": SCHEMA_VERSION,
            "current": None,
            "floor": None,
            "history": [],
            "pending": None,
            "failed": {},
        }
        if not path.exists():
            return empty
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(data, dict):
                raise ValueError("not an object")
        except (OSError, ValueError) as exc:
            aside = path.with_name(f"{STATE_FILE}.corrupt-{int(time.time())}")
            path.rename(aside)
            log.warning("ota: %s unreadable (%s); moved to %s, starting afresh", path, exc, aside)
            return empty
        return {**empty, **data}

    def _save(self) -> None:
        atomic_write(self.root / STATE_FILE, json.dumps(self.state, indent=2).encode() + b"\n")

    @property
    def current(self) -> dict[str, Any] | None:
        cur = self.state.get("current")
        return dict(cur) if isinstance(cur, dict) else None

    @property
    def floor(self) -> str | None:
        return self.state.get("floor")

    @property
    def history(self) -> list[dict[str, Any]]:
        return [dict(h) for h in self.state.get("history", [])]

    def bundle_path(self, sha256: str) -> Path | None:
        path = self.bundles / f"{sha256}.edgebundle"
        return path if path.is_file() else None

    def failed_reason(self, desired: Desired) -> str | None:
        entry = self.state.get("failed", {}).get(desired.sha256)
        if not isinstance(entry, dict):
            return None
        return (
            str(entry.get("reason")) if entry.get("deployment", "") == desired.deployment else None
        )

    def keep_bundle(self, src: Path, sha256: str) -> Path:
        dest = self.bundles / f"{sha256}.edgebundle"
        if dest.exists():
            if src != dest:
                src.unlink(missing_ok=True)
            return dest
        os.replace(src, dest)
        fsync_dir(self.bundles)
        return dest

    def begin(self, entry: Mapping[str, Any]) -> None:
        with self._lock:
            self.state["pending"] = dict(entry, started=time.time())
            self._save()

    def commit(self, entry: Mapping[str, Any]) -> None:
        with self._lock:
            committed = dict(entry, committed=time.time())
            self.state["current"] = committed
            floor = self.state.get("floor")
            if floor is None or version_key(str(entry["version"])) > version_key(str(floor)):
                self.state["floor"] = str(entry["version"])
            history = [
                h for h in self.state.get("history", []) if h.get("sha256") != entry["sha256"]
            ]
            history.append(committed)
            self.state["history"] = history[-self.keep :]
            self.state["pending"] = None
            self.state.get("failed", {}).pop(entry["sha256"], None)
            self._save()
        self.prune()

    def abort(self, sha256: str, *, reason: str, deployment: str = "") -> None:
        with self._lock:
            self.state["pending"] = None
            self.state.setdefault("failed", {})[sha256] = {
                "reason": reason,
                "deployment": deployment,
                "ts": time.time(),
            }
            self._save()

    def forget_failure(self, sha256: str) -> None:
        with self._lock:
            if self.state.get("failed", {}).pop(sha256, None) is not None:
                self._save()

    def cancel(self) -> None:
        """The update did not finish for a reason that is not the bundle's (the agent stopped):
        no longer pending, and not recorded as failed, so it is tried again."""
        with self._lock:
            self.state["pending"] = None
            self._save()

    def recover(self) -> dict[str, Any] | None:
        """At start-up: an update still pending means the agent died during it. It is recorded
        as failed; the caller runs the committed model and reports the rollback."""
        pending = self.state.get("pending")
        if not isinstance(pending, dict):
            return None
        self.abort(
            str(pending.get("sha256")),
            reason="the agent restarted during the update (crash or power loss)",
            deployment=str(pending.get("deployment", "")),
        )
        return dict(pending)

    def prune(self) -> None:
        """Keep the bundles of the history (and the current one); drop the rest."""
        keep = {h.get("sha256") for h in self.state.get("history", [])}
        cur = self.current
        if cur:
            keep.add(cur.get("sha256"))
        for path in self.bundles.glob("*.edgebundle"):
            if path.stem not in keep:
                path.unlink(missing_ok=True)


# --- MQTT chunk transfer -----------------------------------------------------------------------


@dataclass
class _Transfer:
    sha256: str
    directory: Path
    meta: dict[str, Any] | None = None
    have: set[int] = field(default_factory=set)
    bad: dict[int, str] = field(default_factory=dict)
    last_progress: float = field(default_factory=time.monotonic)
    received: int = 0
    event: threading.Event = field(default_factory=threading.Event)


class ChunkFetcher:
    """Fetches a bundle from retained chunks on the broker. ``handle`` is fed every message on
    ``<prefix>/bundles/#`` (from the network thread); ``fetch`` runs in the updater's thread."""

    def __init__(
        self,
        *,
        subscribe: Callable[[list[str]], None],
        unsubscribe: Callable[[list[str]], None],
        downloads: Path,
        prefix: str,
        timeout: float,
        max_bytes: int,
    ) -> None:
        self._subscribe, self._unsubscribe = subscribe, unsubscribe
        self.downloads = downloads
        self.prefix = prefix
        self.timeout = timeout
        self.max_bytes = max_bytes
        self._active: _Transfer | None = None
        self._lock = threading.Lock()
        self.chunks_received = 0  # over the fetcher's life: how much a resume saved

    def handle(self, topic: str, payload: bytes) -> None:
        t = self._active
        if t is None:
            return
        base = f"{self.prefix}/bundles/{t.sha256}/"
        if not topic.startswith(base):
            return
        rest = topic[len(base) :]
        with self._lock:
            if rest == "meta":
                try:
                    t.meta = self._check_meta(
                        t.sha256, loads(payload, what="bundle meta", limit=1 << 22)
                    )
                except (ProtocolError, UpdateError) as exc:
                    t.meta = {"error": str(exc)}
                t.last_progress = time.monotonic()
                t.event.set()
                return
            m = re.fullmatch(r"chunk/(\d{1,7})", rest)
            if m is None or t.meta is None or "error" in t.meta:
                return
            index = int(m.group(1))
            chunks = t.meta["chunks"]
            if index >= len(chunks) or index in t.have:
                return
            size, chunk_size = t.meta["size"], t.meta["chunk_size"]
            want = chunk_size if index < len(chunks) - 1 else size - chunk_size * (len(chunks) - 1)
            if len(payload) != want:  # checked before anything is written: no disk filling
                if payload:  # an empty retained payload is a deleted chunk: still missing
                    t.bad[index] = f"{len(payload)} bytes, expected {want}"
                    t.event.set()
                return
            if hashlib.sha256(payload).hexdigest() != chunks[index]:
                t.bad[index] = "sha256 mismatch"
                t.event.set()
                return
            path = t.directory / f"{index}.chunk"
            tmp = path.with_suffix(".tmp")
            with open(tmp, "wb") as fh:
                fh.write(payload)
            os.replace(tmp, path)
            t.have.add(index)
            t.received += 1
            self.chunks_received += 1
            t.last_progress = time.monotonic()
            t.event.set()
        if len(t.have) == len(t.meta["chunks"]) // 2 + 1:
            crash_point("download")

    def _check_meta(self, sha256: str, meta: dict[str, Any]) -> dict[str, Any]:
        size, chunk_size, chunks = meta.get("size"), meta.get("chunk_size"), meta.get("chunks")
        ok = (
            meta.get("sha256") == sha256
            and isinstance(size, int)
            and isinstance(chunk_size, int)
            and size > 0
            and chunk_size > 0
            and isinstance(chunks, list)
            and all(isinstance(c, str) and re.fullmatch(r"[0-9a-f]{64}", c) for c in chunks)
        )
        if not ok:
            raise UpdateError(f"bundle {sha256[:12]}: its meta message is malformed")
        assert isinstance(size, int) and isinstance(chunk_size, int) and isinstance(chunks, list)
        if size > self.max_bytes:
            raise UpdateError(
                f"bundle {sha256[:12]}: {size} bytes is larger than [ota] max_bundle_mb allows"
            )
        if len(chunks) != math.ceil(size / chunk_size):
            raise UpdateError(
                f"bundle {sha256[:12]}: meta lists {len(chunks)} chunks for {size} bytes"
            )
        return meta

    def fetch(self, sha256: str, *, cancel: threading.Event) -> Path:
        final = self.downloads / f"{sha256}.edgebundle"
        if final.is_file() and sha256_file(final) == sha256:
            return final
        directory = self.downloads / sha256
        directory.mkdir(parents=True, exist_ok=True)
        t = _Transfer(sha256=sha256, directory=directory)
        meta_topic = bundle_meta_topic(sha256, prefix=self.prefix)
        subscribed = [meta_topic]
        self._active = t
        self._subscribe([meta_topic])
        try:
            self._wait(t, cancel, lambda: t.meta is not None, what="the bundle's meta message")
            assert t.meta is not None
            if "error" in t.meta:
                raise UpdateError(str(t.meta["error"]))
            chunks = t.meta["chunks"]
            with self._lock:  # chunks kept from an interrupted transfer count, if still good
                for i, want in enumerate(chunks):
                    path = directory / f"{i}.chunk"
                    if path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() == want:
                        t.have.add(i)
            missing = [i for i in range(len(chunks)) if i not in t.have]
            log.info(
                "ota: bundle %s: %d chunks, %d on disk already, fetching %d",
                sha256[:12], len(chunks), len(chunks) - len(missing), len(missing),
            )  # fmt: skip
            if len(missing) <= MAX_CHUNK_SUBSCRIPTIONS:  # a resume: only what is missing
                topics = [bundle_chunk_topic(sha256, i, prefix=self.prefix) for i in missing]
            else:  # one wildcard (brokers cap subscriptions per connection: AWS IoT, 50)
                topics = [f"{self.prefix}/bundles/{sha256}/chunk/+"]
            if topics:
                self._subscribe(topics)
                subscribed += topics
            self._wait(
                t,
                cancel,
                lambda: len(t.have) == len(chunks) or bool(t.bad),
                what=lambda: (
                    f"chunks: {len(t.have)} of {len(chunks)} received (truncated transfer)"
                ),
            )
            if t.bad:
                index = min(t.bad)
                what = t.bad[index]
                check = "its sha256 check" if what == "sha256 mismatch" else f"its size ({what})"
                raise UpdateError(
                    f"bundle {sha256[:12]}: chunk {index} of {len(chunks)} failed {check} "
                    "(corrupted on the broker or in transit); republish it with edgectl publish"
                )
            return self._assemble(t, final)
        finally:
            self._active = None
            self._unsubscribe(subscribed)

    def _wait(
        self,
        t: _Transfer,
        cancel: threading.Event,
        done: Callable[[], bool],
        *,
        what: str | Callable[[], str],
    ) -> None:
        while not done():
            if cancel.is_set():
                raise UpdateError("update cancelled: the agent is stopping")
            if time.monotonic() - t.last_progress > self.timeout:
                text = what() if callable(what) else f"no {what} within {self.timeout:g} s"
                raise UpdateError(
                    f"bundle {t.sha256[:12]}: {text}, nothing new for {self.timeout:g} s "
                    "(is it published? edgectl publish BUNDLE)"
                )
            t.event.wait(0.2)
            t.event.clear()

    def _assemble(self, t: _Transfer, final: Path) -> Path:
        assert t.meta is not None
        part = final.with_suffix(".edgebundle.part")
        digest = hashlib.sha256()
        with open(part, "wb") as out:
            for i in range(len(t.meta["chunks"])):
                data = (t.directory / f"{i}.chunk").read_bytes()
                digest.update(data)
                out.write(data)
            out.flush()
            os.fsync(out.fileno())
        if digest.hexdigest() != t.sha256 or part.stat().st_size != t.meta["size"]:
            part.unlink(missing_ok=True)
            shutil.rmtree(t.directory, ignore_errors=True)
            raise UpdateError(
                f"bundle {t.sha256[:12]}: the assembled file does not hash to its sha256"
            )
        os.replace(part, final)
        shutil.rmtree(t.directory, ignore_errors=True)
        return final


# --- the updater -------------------------------------------------------------------------------


@dataclass
class HealthVerdict:
    ok: bool
    reason: str | None
    frames: int
    errors: int
    p95_ms: float | None
    reference_ms: float | None


class HealthProbe:
    """A result sink that remembers, per model version, recent inference latency, errors and
    top classes: what the health window judges a new model by."""

    def __init__(self, *, keep: int = 500) -> None:
        self.keep = keep
        self._lock = threading.Lock()
        self._by_model: dict[tuple[str, str], dict[str, list[Any]]] = {}

    def write(self, result: dict[str, Any]) -> None:
        ident = result.get("model") or {}
        key = (str(ident.get("name")), str(ident.get("version")))
        out = result.get("output") or {}
        with self._lock:
            rec = self._by_model.setdefault(key, {"lat": [], "err": [], "cls": []})
            rec["lat"].append(float(result["latency_ms"]["inference"]))
            rec["err"].append("error" in out)
            rec["cls"].append(out.get("class"))
            if len(rec["lat"]) > self.keep:
                for k in rec:
                    del rec[k][: len(rec[k]) - self.keep]

    def close(self) -> None:
        pass

    def reset(self, key: tuple[str, str]) -> None:
        with self._lock:
            self._by_model.pop(key, None)

    def snapshot(self, key: tuple[str, str]) -> dict[str, list[Any]]:
        with self._lock:
            rec = self._by_model.get(key, {"lat": [], "err": [], "cls": []})
            return {k: list(v) for k, v in rec.items()}


def _p95(values: list[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]


def _top_fraction(classes: list[Any]) -> float | None:
    known = [c for c in classes if c is not None]
    if len(known) < 20:
        return None
    counts: dict[Any, int] = {}
    for c in known:
        counts[c] = counts.get(c, 0) + 1
    return max(counts.values()) / len(known)


def bundle_latency_ms(model: Any) -> float | None:
    """The converter's measured latency for the artifact this device runs."""
    manifest = model.manifest or {}
    for entry in manifest.get("validation", []) or []:
        if str(model.artifact).endswith(str(entry.get("artifact", "\0"))):
            value = entry.get("latency_ms")
            return float(value) if isinstance(value, (int, float)) else None
    return None


def check_compatible(manifest: Mapping[str, Any], profile: Any) -> None:
    """Raises UpdateError when the bundle is not for this device or needs a newer agent."""
    from edge_agent.model.loader import choose_artifact

    named = {p for a in manifest.get("artifacts", []) for p in a.get("profiles", [])}
    if named and profile.name not in named:
        raise UpdateError(
            f"bundle {manifest.get('name')} {manifest.get('version')} is built for "
            f"{sorted(named)}, not this device's profile {profile.name}"
        )
    try:
        choose_artifact(manifest, profile)
    except ModelError as exc:
        raise UpdateError(f"bundle is not compatible: {exc}") from None
    need = (manifest.get("requires") or {}).get("agent")
    if isinstance(need, str) and version_key(edge_agent.__version__) < version_key(
        need.lstrip(">=")
    ):
        raise UpdateError(
            f"bundle needs edge-agent {need}; this is {edge_agent.__version__}: upgrade the agent"
        )


@dataclass(frozen=True)
class _Job:
    kind: str  # "update" | "rollback"
    desired: Desired | None = None
    version: str | None = None
    origin: str = "desired"


class Updater:
    """Runs update and rollback jobs one at a time in its own thread (latest request wins)."""

    def __init__(
        self,
        *,
        store: ModelStore,
        settings: Any,  # config.OtaSection
        profile: Any,
        trusted_keys: Mapping[str, Any],
        fetch_mqtt: Callable[[str, threading.Event], Path] | None,
        load: Callable[[Path], Any],
        pipeline: Any,
        probe: HealthProbe,
        event: Callable[..., None],
        report: Callable[[dict[str, Any] | None], None],
    ) -> None:
        self.store = store
        self.settings = settings
        self.profile = profile
        self.trusted_keys = trusted_keys
        self.fetch_mqtt = fetch_mqtt
        self.load = load
        self.pipeline = pipeline
        self.probe = probe
        self.event = event
        self.report = report
        self.last_update: dict[str, Any] | None = None
        self.busy = threading.Event()
        self._jobs: queue.Queue[_Job] = queue.Queue(maxsize=1)  # only the newest request matters
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="edge-ota", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._submit(_Job("stop"))
        self._thread.join(timeout)

    def _submit(self, job: _Job) -> None:
        """Replace whatever waits (a flood of commands holds one job, not a queue of them)."""
        while True:
            try:
                self._jobs.put_nowait(job)
                return
            except queue.Full:
                with contextlib.suppress(queue.Empty):
                    self._jobs.get_nowait()

    def request(self, desired: Desired, *, origin: str = "desired") -> None:
        self._submit(_Job("update", desired=desired, origin=origin))

    def request_rollback(self, version: str | None = None) -> dict[str, Any]:
        """Queue a rollback to ``version`` (default: the committed model before the current
        one); returns the target, or raises UpdateError when there is none on disk."""
        target = self.rollback_target(version)
        self._submit(_Job("rollback", version=str(target["version"]), origin="command"))
        return target

    def rollback_target(self, version: str | None) -> dict[str, Any]:
        current = self.store.current
        history = [h for h in self.store.history if not current or h["sha256"] != current["sha256"]]
        if version is not None:
            history = [h for h in history if h.get("version") == version]
        history = [h for h in history if self.store.bundle_path(str(h["sha256"]))]
        if not history:
            which = f"version {version}" if version else "an earlier committed model"
            raise UpdateError(f"no rollback target: {which} is not kept on this device")
        return history[-1]

    # --- the thread ------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            job = self._jobs.get()
            if job.kind == "stop":
                return
            self.busy.set()
            try:
                if job.kind == "rollback":
                    target = self.rollback_target(job.version)
                    desired = Desired(
                        sha256=str(target["sha256"]),
                        name=str(target.get("name", "")),
                        version=str(target.get("version", "")),
                        allow_downgrade=True,
                        deployment=f"rollback-{int(time.time())}",
                    )
                    self._update(desired, origin="rollback")
                elif job.desired is not None:
                    self._update(job.desired, origin=job.origin)
            except Exception:  # a bug: report it, keep the updater alive
                log.exception("ota: job failed")
                self.event("error", reason="internal error in the updater; see the agent log")
            finally:
                self.busy.clear()

    def _state(self, desired: Desired, state: str, reason: str | None = None, **extra: Any) -> None:
        self.last_update = {
            "sha256": desired.sha256,
            "version": desired.version,
            "state": state,
            "reason": reason,
            "deployment": desired.deployment,
            **extra,
        }
        self.report(self.last_update)

    def _update(self, desired: Desired, *, origin: str) -> None:
        current = self.store.current
        if current and current.get("sha256") == desired.sha256:
            return
        failed = self.store.failed_reason(desired)
        if failed is not None and origin == "desired":
            log.info("ota: %s already failed here (%s); not retrying", desired.sha256[:12], failed)
            return
        self.event(
            "update_started",
            reason=origin,
            sha256=desired.sha256,
            version=desired.version,
            deployment=desired.deployment,
        )
        self._state(desired, "downloading")
        try:
            path = self._fetch(desired)
            self._state(desired, "verifying")
            manifest = self._verify(path, desired)
        except (UpdateError, BundleError, EdgeError) as exc:
            self._fail(desired, f"{exc}", kind="update_failed")
            return
        entry = {
            "sha256": desired.sha256,
            "name": str(manifest["name"]),
            "version": str(manifest["version"]),
            "deployment": desired.deployment,
        }
        desired = Desired(
            sha256=desired.sha256,
            name=entry["name"],
            version=entry["version"],
            url=desired.url,
            allow_downgrade=desired.allow_downgrade,
            deployment=desired.deployment,
        )
        self.event("update_verified", sha256=desired.sha256, version=entry["version"])
        kept = self.store.keep_bundle(path, desired.sha256)
        self.store.begin(entry)
        crash_point("stage")
        try:
            new = self.load(kept)
        except EdgeError as exc:
            self._fail(desired, f"the new model failed to load: {exc}", kind="update_failed")
            return
        old_model = self.pipeline.model
        reference = self._reference_ms(old_model, new)
        key = (new.name, new.version)
        self.probe.reset(key)
        before = (self.pipeline.results, 0)
        crash_point("swap")
        try:
            old = self.pipeline.swap_model(new)
        except EdgeError as exc:
            new.close()
            self._fail(desired, f"swap failed: {exc}", kind="update_failed")
            return
        self._state(desired, "health_check")
        verdict = self._health(key, before, reference, old_model, new)
        if not verdict.ok:
            try:
                back = self.pipeline.swap_model(old)
            except EdgeError as exc:  # the pipeline is stuck: systemd's watchdog restarts us,
                log.error("ota: swap back failed: %s", exc)  # and state.json says pending
                return
            back.close()
            if verdict.reason == STOPPING:
                self.store.cancel()  # not the bundle's fault: try again after the restart
                self._state(desired, "failed", "interrupted: the agent stopped")
                return
            self._fail(
                desired,
                f"health window failed: {verdict.reason}",
                kind="rolled_back",
                frames=verdict.frames,
                errors=verdict.errors,
                p95_ms=verdict.p95_ms,
                reference_ms=verdict.reference_ms,
            )
            return
        crash_point("commit")
        self.store.commit(entry)
        old.close()
        self._prune_models()
        self.event(
            "update_committed",
            sha256=desired.sha256,
            version=entry["version"],
            frames=verdict.frames,
            p95_ms=verdict.p95_ms,
        )
        self._state(desired, "committed")

    def _fail(self, desired: Desired, reason: str, *, kind: str, **details: Any) -> None:
        log.warning("ota: %s %s: %s", desired.sha256[:12], kind, reason)
        self.store.abort(desired.sha256, reason=reason, deployment=desired.deployment)
        self.event(kind, reason=reason, sha256=desired.sha256, version=desired.version, **details)
        self._state(desired, "rolled_back" if kind == "rolled_back" else "failed", reason)

    def _fetch(self, desired: Desired) -> Path:
        kept = self.store.bundle_path(desired.sha256)
        if kept is not None:
            return kept
        max_bytes = int(self.settings.max_bundle_mb * 2**20)
        if desired.url:
            from edge_agent.fleet.download import download

            dest = self.store.downloads / f"{desired.sha256}.edgebundle"
            ca = Path(self.settings.ca_file) if self.settings.ca_file else None
            path = download(
                desired.url,
                dest,
                expected_sha256=desired.sha256,
                timeout=self.settings.transfer_timeout,
                max_bytes=max_bytes,
                ca_file=ca,
            )
            return Path(path)
        if self.fetch_mqtt is None:
            raise UpdateError("no route to the bundle: no url in the desired state and no broker")
        return self.fetch_mqtt(desired.sha256, self._stop)

    def _verify(self, path: Path, desired: Desired) -> dict[str, Any]:
        from edge_agent.model.bundle import verify_bundle

        if sha256_file(path) != desired.sha256:
            path.unlink(missing_ok=True)
            raise UpdateError(f"bundle {desired.sha256[:12]}: the file does not hash to it")
        try:
            verified = verify_bundle(path, trusted_keys=self.trusted_keys)
        except BundleError as exc:
            path.unlink(missing_ok=True)
            raise UpdateError(f"bundle rejected: {exc}") from None
        manifest = dict(verified.manifest)
        check_compatible(manifest, self.profile)
        floor = self.store.floor
        version = str(manifest["version"])
        if floor and version_key(version) < version_key(floor) and not desired.allow_downgrade:
            raise UpdateError(
                f"version {version} is below the anti-rollback floor {floor}; only an explicit "
                "rollback (edgectl rollback) may go below it"
            )
        return manifest

    def _reference_ms(self, old: Any, new: Any) -> float | None:
        candidates = [bundle_latency_ms(new)]
        prev = self.probe.snapshot((old.name, old.version))["lat"]
        candidates.append(_p95(prev[-200:]))
        known = [c for c in candidates if c]
        return max(known) if known else None

    def _health(
        self,
        key: tuple[str, str],
        before: tuple[int, int],
        reference: float | None,
        old_model: Any,
        new_model: Any = None,
    ) -> HealthVerdict:
        s = self.settings
        deadline = time.monotonic() + s.health_window
        extended = False
        while True:
            if self._stop.wait(0.1):
                break
            rec = self.probe.snapshot(key)
            errors_now = self._errors(new_model, before)
            if time.monotonic() >= deadline:
                if len(rec["lat"]) >= s.health_min_frames or extended:
                    break
                extended, deadline = True, time.monotonic() + s.health_window
            if errors_now and s.max_error_rate == 0:
                break  # the first failure decides: no need to watch a broken model longer
        rec = self.probe.snapshot(key)
        frames = len(rec["lat"])
        errors = max(self._errors(new_model, before), sum(rec["err"]))
        p95 = _p95(rec["lat"])
        verdict = HealthVerdict(True, None, frames, errors, p95, reference)
        if self._stop.is_set():
            verdict.ok, verdict.reason = False, STOPPING
        elif frames + errors == 0 or (frames < s.health_min_frames and errors == 0):
            verdict.ok = False
            verdict.reason = f"only {frames} results in the window (need {s.health_min_frames})"
        elif errors > s.max_error_rate * max(frames, 1):
            verdict.ok = False
            verdict.reason = (
                f"{errors} of {max(frames, errors)} frames failed (inference errors or NaN/inf "
                f"outputs; allowed rate {s.max_error_rate:g})"
            )
        elif (
            p95 is not None
            and reference
            and p95 > s.latency_budget * reference + s.latency_slack_ms
        ):
            verdict.ok = False
            verdict.reason = (
                f"inference p95 {p95:.2f} ms is over {s.latency_budget:g}x the reference "
                f"{reference:.2f} ms plus {s.latency_slack_ms:g} ms"
            )
        elif s.check_collapse:
            new_top = _top_fraction(rec["cls"])
            old_top = _top_fraction(self.probe.snapshot((old_model.name, old_model.version))["cls"])
            if new_top is not None and old_top is not None and new_top >= 0.99 and old_top < 0.8:
                verdict.ok = False
                verdict.reason = (
                    f"predictions collapsed: one class in {new_top:.0%} of frames, where the "
                    f"previous model's top class had {old_top:.0%}"
                )
        return verdict

    def _errors(self, model: Any, before: tuple[int, int]) -> int:
        """The new model's own failed frames (not the old model's, still in flight)."""
        errors_of = getattr(self.pipeline, "errors_of", None)
        if model is not None and errors_of is not None:
            return int(errors_of(model))
        return int(self.pipeline.inference_errors - before[1])

    def _prune_models(self) -> None:
        """Extracted models no kept bundle refers to go (the bundle can be extracted again)."""
        models = Path(self.store.root).parent / "models"
        keep = {f"{h.get('name')}-{h.get('version')}" for h in self.store.history}
        current = self.pipeline.model
        keep.add(f"{current.name}-{current.version}")
        if not models.is_dir():
            return
        for d in models.iterdir():
            if d.is_dir() and not d.name.startswith(".") and d.name not in keep:
                shutil.rmtree(d, ignore_errors=True)
