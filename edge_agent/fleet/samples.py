"""Captured samples on the device: the bounded on-disk store, and their delivery (over MQTT at the
lowest priority, chunked and resumable like bundles, or by HTTP(S) PUT).

::

    Sampler (capture.py) ──add──► SampleStore ──► SampleOutbox ──► MqttLink (only when the
                                  <state_dir>/     next chunk /      spool has nothing waiting)
                                  samples/         meta, acked
                                              └──► HttpUploader ──► PUT <url>/<device>/<id>.*

**The store.** One sample is two files: ``<id>.jpg`` (or ``.npy``) and ``<id>.json`` (its meta
message, :func:`~edge_agent.fleet.protocol.sample_meta_payload`), each written atomically, the
meta last: a sample without its meta is an interrupted write and is removed at open. Ids start
with the capture time in microseconds, so their order is the capture order. Bound: ``max_bytes``,
and never more than ``disk_share`` of the file system (free space plus the store); above it the
oldest samples go first, delivered or not.

**Over MQTT.** Chunks are retained on ``<prefix>/<device>/samples/<id>/chunk/<i>``, the meta
message (with every chunk's sha256) on ``.../meta`` once every chunk is acknowledged, so a
collector that sees a meta finds the chunks on the broker. The acknowledged chunks of the
current sample are written to ``<id>.sent``: after a restart it resumes at the next chunk. A
sample leaves the store when its meta is acknowledged. ``edgectl collect`` assembles, checks and
writes each sample once, then clears its retained messages. A sample that leaves the store
undelivered while it was being sent (evicted, purged) has its retained chunks cleared by the
outbox (empty retained payloads) before the next sample goes.
"""

from __future__ import annotations

import logging
import os
import random
import ssl
import threading
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_agent.common.backoff import BackoffPolicy
from edge_agent.common.durable import atomic_write
from edge_agent.errors import ConfigError, first_line
from edge_agent.fleet import protocol
from edge_agent.fleet.protocol import Topics
from edge_agent.model.formats import DATASET_EXTENSIONS

log = logging.getLogger(__name__)

EXTENSIONS = DATASET_EXTENSIONS
#: Sample chunks (and metas) in flight at once: a chunk ahead of a result delays it only briefly.
MAX_INFLIGHT = 2


@dataclass
class StoreStats:
    stored: int = 0
    """Samples written to the store."""
    evicted: int = 0
    """Samples removed (oldest first) to stay within the bound, before they were delivered."""
    delivered: int = 0
    """Samples the broker (or the HTTP server) acknowledged, and removed."""
    purged: int = 0
    """Samples removed by ``edgectl capture --off --purge``."""


class SampleStore:
    """The bounded on-disk store (see the module docstring). Thread-safe."""

    def __init__(self, directory: Path, *, max_bytes: int, disk_share: float = 0.1) -> None:
        if max_bytes <= 0:
            raise ConfigError(f"sample store {directory}: max_bytes = {max_bytes}: must be > 0")
        self.directory = Path(directory)
        self.max_bytes = int(max_bytes)
        self.disk_share = float(disk_share)
        self.stats = StoreStats()
        self._lock = threading.Lock()
        self._sizes: dict[str, int] = {}  # id -> bytes on disk (data + meta)
        self._added = threading.Condition(self._lock)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(
                f"sample store {self.directory}: cannot create it ({exc.strerror})"
            ) from None
        self._scan()

    def _scan(self) -> None:
        files = {p.name: p for p in self.directory.iterdir() if p.is_file()}
        for name, path in files.items():
            if name.startswith("."):  # a temporary file of an interrupted atomic write
                path.unlink(missing_ok=True)
        for name, path in sorted(files.items()):
            stem, _, ext = name.partition(".")
            if ext == "json":
                data = self._data_path(stem, path)
                if data is None:  # a meta without its data: unusable
                    path.unlink(missing_ok=True)
                    continue
                self._sizes[stem] = path.stat().st_size + data.stat().st_size
        for name, path in files.items():
            stem = name.partition(".")[0]
            if not name.startswith(".") and stem not in self._sizes:
                path.unlink(missing_ok=True)  # data without meta: an interrupted capture

    def _data_path(self, sample_id: str, meta: Path | None = None) -> Path | None:
        for ext in EXTENSIONS.values():
            path = self.directory / f"{sample_id}{ext}"
            if path.is_file():
                return path
        return None

    # --- writing ------------------------------------------------------------------------------

    def bound(self) -> int:
        """The store's byte bound now: ``max_bytes``, or its share of the disk if smaller."""
        try:
            st = os.statvfs(self.directory)
        except OSError:
            return self.max_bytes
        free = st.f_bavail * st.f_frsize
        with self._lock:
            used = sum(self._sizes.values())
        return min(self.max_bytes, int(self.disk_share * (free + used)))

    def add(self, meta: Mapping[str, Any], data: bytes) -> bool:
        """Store one sample, removing the oldest ones to make room. False when it alone is larger
        than the bound (it is not stored)."""
        sample_id = str(meta["id"])
        encoded = protocol.dumps(meta)
        size = len(encoded) + len(data)
        bound = self.bound()
        if size > bound:
            return False
        with self._lock:
            while self._sizes and sum(self._sizes.values()) + size > bound:
                oldest = min(self._sizes)
                self._remove(oldest)
                self.stats.evicted += 1
        atomic_write(self.directory / f"{sample_id}{EXTENSIONS[str(meta['kind'])]}", data)
        atomic_write(self.directory / f"{sample_id}.json", encoded)  # last: the sample is whole
        with self._lock:
            self._sizes[sample_id] = size
            self.stats.stored += 1
            self._added.notify_all()
        return True

    def _remove(self, sample_id: str) -> None:
        """With the lock held."""
        self._sizes.pop(sample_id, None)
        (self.directory / f"{sample_id}.json").unlink(missing_ok=True)  # first: no longer whole
        for ext in (*EXTENSIONS.values(), ".sent"):
            (self.directory / f"{sample_id}{ext}").unlink(missing_ok=True)

    def remove(self, sample_id: str, *, delivered: bool = True) -> None:
        with self._lock:
            if sample_id in self._sizes:
                self._remove(sample_id)
                if delivered:
                    self.stats.delivered += 1

    def purge(self) -> int:
        """Remove every stored sample (privacy: ``edgectl capture --off --purge``)."""
        with self._lock:
            ids = list(self._sizes)
            for sample_id in ids:
                self._remove(sample_id)
            self.stats.purged += len(ids)
            return len(ids)

    # --- reading ------------------------------------------------------------------------------

    def ids(self) -> list[str]:
        """Stored samples, oldest first."""
        with self._lock:
            return sorted(self._sizes)

    def oldest(self) -> str | None:
        with self._lock:
            return min(self._sizes) if self._sizes else None

    def wait(self, timeout: float) -> bool:
        """Block until a sample is stored (True) or ``timeout`` passes."""
        with self._lock:
            if self._sizes:
                return True
            return self._added.wait(timeout)

    def __len__(self) -> int:
        with self._lock:
            return len(self._sizes)

    def __contains__(self, sample_id: object) -> bool:
        with self._lock:
            return sample_id in self._sizes

    def size_bytes(self) -> int:
        with self._lock:
            return sum(self._sizes.values())

    def load(self, sample_id: str) -> tuple[dict[str, Any], bytes] | None:
        """(meta, data), or None when the sample is gone (evicted or purged meanwhile)."""
        try:
            meta = protocol.loads(
                (self.directory / f"{sample_id}.json").read_bytes(),
                what=f"sample {sample_id}",
                limit=1 << 24,
            )
            path = self._data_path(sample_id)
            if path is None:
                return None
            return meta, path.read_bytes()
        except (OSError, protocol.ProtocolError):
            return None

    def progress(self, sample_id: str) -> int:
        """Chunks of this sample the broker acknowledged in an earlier session (0 if none)."""
        try:
            return int((self.directory / f"{sample_id}.sent").read_text() or 0)
        except (OSError, ValueError):
            return 0

    def set_progress(self, sample_id: str, chunks: int) -> None:
        with self._lock:
            if sample_id not in self._sizes:
                return
            atomic_write(self.directory / f"{sample_id}.sent", str(chunks).encode())


class SampleOutbox:
    """The MQTT side of the store: the messages :class:`~edge_agent.fleet.mqtt.MqttLink` sends
    at the lowest priority (only when the spool has nothing waiting), one sample at a time, in
    capture order. Called from the network thread only."""

    def __init__(self, store: SampleStore, topics: Topics) -> None:
        self.store = store
        self.topics = topics
        self._current: str | None = None
        self._meta: dict[str, Any] | None = None
        self._data = b""
        self._acked: set[int] = set()  # chunk indices acknowledged (-1: the meta)
        self._sent: set[int] = set()  # sent on this connection, not acknowledged yet
        self.rejected = 0
        #: retained chunks of a sample that left the store undelivered (evicted, purged) while
        #: it was being sent: cleared with empty retained payloads, so the broker keeps nothing
        #: that no meta will ever point to
        self._clear: set[tuple[str, int]] = set()
        self._clearing: set[tuple[str, int]] = set()  # sent, not acknowledged yet
        self.cleared = 0

    def reset(self) -> None:
        """A new connection: what was in flight is sent again."""
        self._sent.clear()
        self._clear |= self._clearing
        self._clearing.clear()

    def _load_current(self) -> bool:
        if self._current is not None and self._current not in self.store:
            # gone undelivered while being sent: its chunks on the broker go too
            self._clear |= {(self._current, i) for i in self._acked | self._sent if i >= 0}
            self._current = self._meta = None
        while True:
            sample_id = self.store.oldest()
            if sample_id is None:
                self._current = None
                return False
            if sample_id == self._current and self._meta is not None:
                return True
            loaded = self.store.load(sample_id)
            if loaded is None:  # unreadable: never let one bad file stop delivery
                self.store.remove(sample_id, delivered=False)
                continue
            self._current, (self._meta, self._data) = sample_id, loaded
            done = self.store.progress(sample_id)
            self._acked = set(range(min(done, len(self._meta["chunks"]))))
            self._sent = set()
            return True

    def take(self, room: int) -> list[tuple[Any, str, bytes]]:
        """Up to ``room`` messages to publish now: ``(key, topic, payload)``, retained, QoS 1."""
        out: list[tuple[Any, str, bytes]] = []
        if room <= 0:
            return out
        has_sample = self._load_current()
        while self._clear and len(out) < room:
            gone, i = self._clear.pop()
            self._clearing.add((gone, i))
            out.append((("clear", gone, i), self.topics.sample_chunk(gone, i), b""))
        if not has_sample:
            return out
        meta, sample_id = self._meta, self._current
        assert meta is not None and sample_id is not None
        chunk_size = int(meta["chunk_size"])
        count = len(meta["chunks"])
        for i in range(count):
            if len(out) >= room:
                return out
            if i in self._acked or i in self._sent:
                continue
            self._sent.add(i)
            payload = self._data[i * chunk_size : (i + 1) * chunk_size]
            out.append(((sample_id, i), self.topics.sample_chunk(sample_id, i), payload))
        if len(self._acked) == count and -1 not in self._sent and len(out) < room:
            self._sent.add(-1)
            out.append(((sample_id, -1), self.topics.sample_meta(sample_id), protocol.dumps(meta)))
        return out

    def acked(self, key: Any, *, ok: bool = True) -> None:
        """The broker acknowledged ``key`` (``ok=False``: it refused it for good, e.g. not
        authorized: the sample is dropped rather than sent forever)."""
        if key[0] == "clear":
            self._clearing.discard(key[1:])
            self.cleared += ok
            return
        sample_id, index = key
        if sample_id != self._current:
            return
        self._sent.discard(index)
        if not ok:
            self.rejected += 1
            self.store.remove(sample_id, delivered=False)
            self._current = self._meta = None
            return
        if index == -1:
            self.store.remove(sample_id)
            self._current, self._meta, self._data = None, None, b""
            return
        self._acked.add(index)
        done = 0
        while done in self._acked:
            done += 1
        self.store.set_progress(sample_id, done)

    def retry(self, key: Any) -> None:
        """The broker deferred ``key``: send it again."""
        if key[0] == "clear":
            self._clearing.discard(key[1:])
            self._clear.add(key[1:])
        elif key[0] == self._current:
            self._sent.discard(key[1])


class HttpUploader:
    """Samples by HTTP(S) PUT, oldest first: ``<url>/<device>/<id>.jpg|.npy`` and then
    ``<url>/<device>/<id>.json`` (the meta, whose arrival completes the sample), with
    ``Authorization: Bearer <token>`` from a credential file. A sample leaves the store when both
    PUTs answered 2xx; a failure is retried with backoff."""

    def __init__(
        self,
        store: SampleStore,
        *,
        url: str,
        device: str,
        token: str | None = None,
        ca_file: str = "",
        timeout: float = 30.0,
    ) -> None:
        self.store = store
        self.url = url.rstrip("/")
        self.device = protocol.check_name(device)
        self._token = token
        self._ctx = ssl.create_default_context(cafile=ca_file or None) if url.startswith(
            "https://"
        ) else None  # fmt: skip
        self.timeout = timeout
        self.last_error: str | None = None
        self.uploads = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="edge-samples-http", daemon=True)
        self._rng = random.Random()
        self._backoff = BackoffPolicy(initial=1.0, maximum=60.0, full_jitter=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _put(self, name: str, data: bytes, content_type: str) -> None:
        request = urllib.request.Request(
            f"{self.url}/{self.device}/{name}", data=data, method="PUT"
        )
        request.add_header("Content-Type", content_type)
        if self._token:
            request.add_header("Authorization", f"Bearer {self._token}")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout, context=self._ctx) as resp:
                if not 200 <= resp.status < 300:
                    raise OSError(f"PUT {name}: HTTP {resp.status}")
        except urllib.error.HTTPError as exc:
            exc.close()  # its response holds the socket
            raise OSError(f"PUT {name}: HTTP {exc.code} {exc.reason}") from None

    def _run(self) -> None:
        attempt = 0
        while not self._stop.is_set():
            sample_id = self.store.oldest()
            if sample_id is None:
                self.store.wait(0.5)
                continue
            loaded = self.store.load(sample_id)
            if loaded is None:
                self.store.remove(sample_id, delivered=False)
                continue
            meta, data = loaded
            kind = str(meta["kind"])
            try:
                ctype = "image/jpeg" if kind == "jpeg" else "application/octet-stream"
                self._put(f"{sample_id}{EXTENSIONS[kind]}", data, ctype)
                self._put(f"{sample_id}.json", protocol.dumps(meta), "application/json")
            except (OSError, urllib.error.URLError, ValueError) as exc:
                text = first_line(exc)
                if text != self.last_error:
                    log.warning("samples: upload to %s failed: %s", self.url, text)
                self.last_error = text
                attempt += 1
                self._stop.wait(self._backoff.delay(attempt, self._rng))
                continue
            attempt, self.last_error = 0, None
            self.uploads += 1
            self.store.remove(sample_id)


def sample_stats(store: SampleStore | None) -> dict[str, Any]:
    """The store's part of telemetry's ``capture`` section."""
    if store is None:
        return {}
    s = store.stats
    return {
        "waiting": len(store),
        "store_bytes": store.size_bytes(),
        "stored": s.stored,
        "evicted": s.evicted,
        "delivered": s.delivered,
    }


__all__ = ["HttpUploader", "SampleOutbox", "SampleStore", "sample_stats"]
