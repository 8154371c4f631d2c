"""``edgectl collect``: samples from the field, received from the broker into a dataset folder.

Devices leave each sample on the broker as retained chunks and then a retained meta message
(``<prefix>/<device>/samples/<id>/...``, :mod:`edge_agent.fleet.protocol`). The collector
subscribes to them, checks every chunk against the sha256 its meta lists and the whole against
its sha256, writes the sample, and then clears its retained messages (empty retained payloads),
so the broker does not keep what was collected.

The dataset folder (``edge-convert quantize --calibration DIR`` and ``--eval DIR`` read it)::

    DIR/samples.jsonl        one JSON object a line: id, device, file, kind, shape, reasons,
                             capture_ts, stream, frame, model, output, sha256, label (null)
    DIR/images/<device>-<id>.jpg      frames, JPEG
    DIR/windows/<device>-<id>.npy     sensor or audio windows, float32 [size, channels]

**Exactly once.** A sample's file is written atomically, then its line is appended to
``samples.jsonl`` and fsynced; only then are its retained messages cleared. A sample already
in the index (a collector that crashed before clearing, a device that sent it again) is not
written twice: its messages are only cleared. A half-written last line (a crash mid-append) is
cut off when the folder is opened again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_agent.common.durable import atomic_write, fsync_dir
from edge_agent.errors import EdgeError, ProtocolError
from edge_agent.fleet import protocol
from edge_agent.model.formats import DATASET_EXTENSIONS, DATASET_FOLDERS, DATASET_INDEX
from edgectl.when import parse_since  # re-exported: its home before edgectl.when

log = logging.getLogger("edgectl")

#: Fields of a sample's meta message copied into its line of ``samples.jsonl``.
_FIELDS = ("kind", "shape", "reasons", "capture_ts", "stream", "frame", "model", "output",
           "shadow_output", "sha256")  # fmt: skip
_MAX_CHUNKS = 1 << 16


class DatasetFolder:
    """The dataset folder (see the module docstring): which samples it has, and writing one."""

    def __init__(self, out: Path) -> None:
        self.out = Path(out)
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise EdgeError(f"--out {self.out}: cannot create it ({exc.strerror})") from None
        self.index = self.out / DATASET_INDEX
        self.keys: set[tuple[str, str]] = set()
        self._repair_and_load()

    def _repair_and_load(self) -> None:
        if not self.index.exists():
            return
        data = self.index.read_bytes()
        end = data.rfind(b"\n") + 1
        if end != len(data):  # a line cut short by a crash: never appended to
            with open(self.index, "r+b") as fh:
                fh.truncate(end)
                os.fsync(fh.fileno())
            data = data[:end]
        for n, line in enumerate(data.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                self.keys.add((str(row["device"]), str(row["id"])))
            except (ValueError, KeyError, TypeError):
                raise EdgeError(
                    f"{self.index}:{n}: not a sample line (fix or remove it; the label field is "
                    "the only one to edit)"
                ) from None

    def __contains__(self, key: tuple[str, str]) -> bool:
        return key in self.keys

    def write(self, meta: dict[str, Any], data: bytes) -> dict[str, Any]:
        device, sample_id, kind = str(meta["device"]), str(meta["id"]), str(meta["kind"])
        folder = self.out / DATASET_FOLDERS[kind]
        folder.mkdir(exist_ok=True)
        name = f"{device}-{sample_id}{DATASET_EXTENSIONS[kind]}"
        atomic_write(folder / name, data)
        row: dict[str, Any] = {"id": sample_id, "device": device}
        row["file"] = f"{DATASET_FOLDERS[kind]}/{name}"
        row.update({k: meta[k] for k in _FIELDS if k in meta})
        row["label"] = None
        created = not self.index.exists()
        with open(self.index, "ab") as fh:
            fh.write(json.dumps(row, separators=(",", ":")).encode() + b"\n")
            fh.flush()
            os.fsync(fh.fileno())
        if created:
            fsync_dir(self.out)
        self.keys.add((device, sample_id))
        return row


@dataclass
class _Partial:
    meta: dict[str, Any] | None = None
    chunks: dict[int, bytes] = field(default_factory=dict)


@dataclass
class CollectStats:
    written: int = 0
    duplicates: int = 0
    """Samples already in the folder (sent again, or a collector that stopped before clearing)."""
    older: int = 0
    """Samples captured before ``--since``: left on the broker."""
    bad: int = 0
    """Chunks or samples that failed their sha256 or size check (not written)."""


class SampleAssembler:
    """Fed every message on ``<prefix>/<device or +>/samples/#``; writes each complete, checked
    sample once into the folder. :meth:`handle` returns the topics to clear."""

    def __init__(
        self,
        folder: DatasetFolder,
        *,
        prefix: str = protocol.DEFAULT_PREFIX,
        since: float | None = None,
        devices: Sequence[str] | None = None,
    ) -> None:
        self.folder = folder
        self.prefix = prefix
        self.since = since
        self.devices = set(devices) if devices is not None else None
        self.stats = CollectStats()
        self._partial: dict[tuple[str, str], _Partial] = {}
        self._older: set[tuple[str, str]] = set()
        self.last_written = 0.0  # time.monotonic() of the last sample written

    def handle(self, topic: str, payload: bytes) -> list[str]:
        parsed = protocol.parse_sample_topic(topic, prefix=self.prefix)
        if parsed is None or not payload:  # not a sample, or a cleared retained message
            return []
        device, sample_id, index = parsed
        if self.devices is not None and device not in self.devices:
            return []
        key = (device, sample_id)
        if key in self.folder:
            if index == -1:
                self.stats.duplicates += 1
            return [topic]
        if key in self._older:
            return []
        part = self._partial.setdefault(key, _Partial())
        if index == -1:
            try:
                meta = self._check_meta(key, protocol.loads(payload, what=topic, limit=1 << 24))
            except ProtocolError as exc:
                log.warning("%s", exc)
                self.stats.bad += 1
                return []
            if self.since is not None and float(meta["capture_ts"]) < self.since:
                self._older.add(key)
                self._partial.pop(key, None)
                self.stats.older += 1
                return []
            part.meta = meta
        elif index < _MAX_CHUNKS:
            part.chunks[index] = bytes(payload)
        return self._complete(key, part)

    def _check_meta(self, key: tuple[str, str], meta: dict[str, Any]) -> dict[str, Any]:
        size, chunk_size, chunks = meta.get("size"), meta.get("chunk_size"), meta.get("chunks")
        ok = (
            meta.get("device") == key[0]
            and meta.get("id") == key[1]
            and meta.get("kind") in DATASET_FOLDERS
            and isinstance(size, int)
            and isinstance(chunk_size, int)
            and size > 0
            and chunk_size > 0
            and isinstance(chunks, list)
            and len(chunks) == -(-size // chunk_size)
            and isinstance(meta.get("capture_ts"), (int, float))
        )
        if not ok:
            raise ProtocolError(f"sample {key[0]}/{key[1]}: its meta message is malformed")
        return meta

    def _complete(self, key: tuple[str, str], part: _Partial) -> list[str]:
        meta = part.meta
        if meta is None:
            return []
        hashes = list(meta["chunks"])
        if len(part.chunks) < len(hashes) or any(i not in part.chunks for i in range(len(hashes))):
            return []
        for i in range(len(hashes)):
            problem = protocol.chunk_problem(
                part.chunks[i], index=i, size=meta["size"], chunk_size=meta["chunk_size"],
                hashes=hashes,
            )  # fmt: skip
            if problem is not None:
                log.warning("sample %s/%s: chunk %d: %s", *key, i, problem)
                self.stats.bad += 1
                del part.chunks[i]  # a good copy may come again
                return []
        data = b"".join(part.chunks[i] for i in range(len(hashes)))
        if hashlib.sha256(data).hexdigest() != meta.get("sha256"):
            log.warning("sample %s/%s: the assembled bytes do not hash to its sha256", *key)
            self.stats.bad += 1
            self._partial.pop(key, None)
            return []
        self.folder.write(meta, data)
        self._partial.pop(key, None)
        self.stats.written += 1
        self.last_written = time.monotonic()
        topics = protocol.Topics(key[0], prefix=self.prefix)
        return [topics.sample_meta(key[1])] + [
            topics.sample_chunk(key[1], i) for i in range(len(hashes))
        ]

    def incomplete(self) -> int:
        """Samples seen in part (a meta without all its chunks, or chunks without a meta)."""
        return len(self._partial)


def collect(
    *,
    subscribe: Callable[[list[str], Callable[[Any], None]], None],
    clear: Callable[[str], None] | None,
    assembler: SampleAssembler,
    topics: list[str],
    duration: float = 0.0,
    idle: float = 0.0,
    stop: threading.Event | None = None,
) -> CollectStats:
    """Subscribe to ``topics`` and feed the assembler until ``duration`` seconds pass (0 = no
    limit), ``idle`` seconds pass without a new sample written (0 = no limit) or ``stop`` is
    set. ``clear(topic)`` publishes an empty retained payload (None: ``--keep``)."""
    lock = threading.Lock()
    stop = stop or threading.Event()

    def on_message(msg: Any) -> None:
        with lock:
            try:
                done = assembler.handle(msg.topic, bytes(msg.payload))
            except EdgeError as exc:  # e.g. the folder cannot be written: stop, say why
                log.error("%s", exc)
                stop.set()
                return
            except OSError as exc:
                log.error("collect: cannot write: %s", exc)
                stop.set()
                return
        if clear is not None:
            for topic in done:
                clear(topic)

    start = time.monotonic()
    subscribe(topics, on_message)
    while not stop.is_set():
        now = time.monotonic()
        if duration and now - start >= duration:
            break
        if idle and now - max(start, assembler.last_written) >= idle:
            break
        stop.wait(0.1)
    return assembler.stats


__all__ = ["CollectStats", "DatasetFolder", "SampleAssembler", "collect", "parse_since"]
