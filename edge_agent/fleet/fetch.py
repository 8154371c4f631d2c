"""Bundles over MQTT: the retained chunks ``edgectl publish`` leaves on the broker, fetched,
checked against their sha256 one by one, kept on disk so that an interrupted transfer resumes,
and assembled into the bundle file."""

import hashlib
import logging
import math
import os
import re
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_agent.common.hashing import sha256_file
from edge_agent.errors import UpdateError
from edge_agent.fleet.protocol import (
    MAX_BUNDLE_META_BYTES,
    ProtocolError,
    bundle_chunk_topic,
    bundle_meta_topic,
    chunk_problem,
    loads,
)
from edge_agent.fleet.store import crash_point

log = logging.getLogger(__name__)

#: A transfer missing at most this many chunks subscribes to each; more, to one wildcard.
MAX_CHUNK_SUBSCRIPTIONS = 24


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
                        t.sha256, loads(payload, what="bundle meta", limit=MAX_BUNDLE_META_BYTES)
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
            if not payload:  # an empty retained payload is a deleted chunk: still missing
                return
            problem = chunk_problem(  # checked before anything is written: no disk filling
                payload, index=index, size=t.meta["size"], chunk_size=t.meta["chunk_size"],
                hashes=chunks,
            )  # fmt: skip
            if problem is not None:
                t.bad[index] = problem
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
