"""The store-and-forward spool: every outgoing MQTT message (results, telemetry, events) goes
through a bounded SQLite file in the state directory before it is sent, so a broker outage loses
nothing.

::

    put() ──► in-memory queue ──► writer thread ──► SQLite file ──► pending() ──► MQTT sender
    (any thread, never waits      (one; owns every   (WAL)           (in id order) │
     for the disk)                 write, batches)                                 ▼
                                   ◄────────────────── ack(ids) ◄──────────── PUBACK

- :meth:`Spool.put` only appends to a bounded in-memory queue (one per stream, so dropping the
  oldest result is O(1)); the inference loop never waits for the disk. ONE writer thread drains
  the queue in batches, one transaction per batch, at most every ``commit_interval`` seconds.
  ``durable=True`` (events) asks for a commit now, and ``put`` waits for it (at most 2 s).
- The sender reads committed rows with :meth:`Spool.pending` (a second, read-only connection:
  WAL lets it read while the writer writes), publishes them QoS 1 in id order and acks each row
  when its PUBACK arrives. An acked id disappears from ``pending()`` at once and its row is
  deleted with the next commit. On reconnect the sender starts again from the oldest unacked
  row: delivery is at least once, and consumers drop duplicates by ``(device, stream, seq)``.
- Ids come from ``AUTOINCREMENT``, so they grow in insertion order across streams and are never
  reused, even after every row was acked.
- Sequence numbers: :meth:`Spool.allocate_seq` hands out one counter per stream. The counters
  are written in the same transaction as the rows that carry them, so a ``seq`` that reached the
  broker is never handed out again. At open each counter is ``max(stored counter, max seq of the
  stored rows of that stream + 1)``. A seq allocated but not committed before a crash may be
  handed out again; no message with it was ever sent.

**Bounds.** The in-memory queue holds ``queue_size`` messages. When it is full, the oldest queued
result makes room (for telemetry and events, the oldest queued telemetry next); a result or
telemetry message with nothing it may displace is dropped itself; an event never is: it waits
for the writer, which is told to commit at once, and goes in past the bound after 2 s. On disk
the spool holds ``max_bytes`` of payload: a commit that would go over deletes the oldest results
first, then the oldest telemetry, never events (when only events remain they are kept over the
bound). Every drop is counted per stream in :attr:`Spool.stats`.

**Disk full** (``SQLITE_FULL``): the writer rolls back, makes room by deleting results (then
telemetry, then all of both) and retries. If even that fails, the batch is lost: its events are
counted in ``stats.events_lost``, ``stats.disk_full`` is True until a commit succeeds again, and
one warning is logged per episode (the agent reports it as a ``spool_full`` event). The writer
never dies: any other exception is logged (at most once a minute) and the writer goes on.

**Durability policy.**

- The file is in WAL mode (``PRAGMA journal_mode=WAL``) and the writer's connection uses
  ``PRAGMA synchronous=FULL``: a batch is on stable storage when its commit returns, so a
  committed row survives a power loss.
- On SIGKILL or power loss, at most the last ``commit_interval`` (default 0.1 s) of queued
  results and telemetry is lost, plus the batch being committed at that instant. Events are
  committed at once (``durable=True``): when ``put`` returns, the event is on disk.
- A crash never corrupts the file: SQLite's commit is atomic; a transaction cut short leaves no
  valid commit record in the WAL, and the next open ignores it.
- A file that cannot be read (not a database, or failing ``PRAGMA quick_check`` at open, e.g.
  after SD-card damage) is renamed aside to ``<name>.corrupt-<unix time>`` (its WAL beside it)
  and a fresh spool is started, with a warning: the device must keep running.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from edge_agent.errors import ConfigError, ProtocolError, first_line
from edge_agent.fleet.protocol import STREAMS

log = logging.getLogger(__name__)

_SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    stream TEXT NOT NULL,
    seq INTEGER NOT NULL,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL,
    retain INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_by_stream ON messages (stream);
CREATE TABLE IF NOT EXISTS counters (
    stream TEXT PRIMARY KEY,
    next_seq INTEGER NOT NULL
);
"""
#: Streams whose rows may be deleted to stay within the bounds, in that order. Never events.
_DROPPABLE = ("results", "telemetry")
#: How long a durable put waits for its commit, and an event for room in a full queue.
_DURABLE_WAIT = 2.0
#: The WAL is truncated back to this size after a checkpoint (it is reused, not regrown).
_WAL_LIMIT = 8 * 2**20
#: Ids per ``IN (...)`` (SQLite before 3.32 allows 999 parameters).
_CHUNK = 500
#: Rows go in with multi-row INSERTs, not ``executemany``: sqlite3 releases the GIL around each
#: statement step, and a thread that releases it waits up to ``sys.getswitchinterval()`` (5 ms)
#: to get it back from a busy inference loop. One step per row made a 10,000-row batch take
#: seconds under load; a few statements per batch take tens of ms.
_INSERT = "INSERT INTO messages (stream, seq, topic, payload, qos, retain) VALUES "
_ROW = "(?, ?, ?, ?, ?, ?)"
_MAX_ROWS_PER_INSERT = 5000
#: Window functions (one statement to find the trim cut-off) arrived in SQLite 3.25.
_WINDOWS = sqlite3.sqlite_version_info >= (3, 25, 0)
_ERROR_LOG_EVERY = 60.0
_ERROR_BACKOFF = 0.5


@dataclass(frozen=True)
class SpooledMessage:
    """A committed, unacked row, as :meth:`Spool.pending` returns it."""

    id: int
    stream: str
    topic: str
    payload: bytes
    qos: int
    retain: bool


@dataclass
class SpoolStats:
    """Counters since the spool was opened (:attr:`Spool.stats` returns a copy)."""

    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STREAMS, 0))
    """Messages dropped per stream: from the full queue, over ``max_bytes``, or on a full disk."""
    events_lost: int = 0
    """Events lost because the disk was full even after dropping every result and telemetry."""
    disk_full: bool = False
    """True while commits fail for lack of space; cleared by the next commit that succeeds."""
    committed: int = 0
    """Rows committed."""
    acked: int = 0
    """Rows deleted by :meth:`Spool.ack`."""
    commits: int = 0
    """Write transactions committed (each one batch: rows, acks and counters)."""


class _Item(NamedTuple):
    qseq: int  # queue order across the per-stream queues
    stream: str
    seq: int
    topic: str
    payload: bytes
    qos: int
    retain: bool


@dataclass
class _Batch:
    items: list[_Item]
    acks: list[int]
    counters: dict[str, int] | None
    ticket: int


@dataclass
class _Outcome:
    """What a committed transaction did, applied to the in-memory state once COMMIT returned."""

    disk_bytes: int
    disk_rows: int
    max_id: int
    inserted: int = 0
    acked: int = 0
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STREAMS, 0))


class _Corrupt(Exception):
    """The spool file cannot be used as it is (the message says why)."""


def _is_full(exc: BaseException) -> bool:
    return isinstance(exc, sqlite3.DatabaseError) and "full" in str(exc).lower()


def _looks_corrupt(exc: sqlite3.DatabaseError) -> bool:
    text = str(exc).lower()
    if any(word in text for word in ("not a database", "malformed", "corrupt")):
        return True
    # SQLITE_CORRUPT / NOTADB / FORMAT are plain DatabaseError; OperationalError is the state of
    # the file system (missing, read-only, locked), where setting the file aside would not help.
    return type(exc) is sqlite3.DatabaseError


def _rows_per_insert(conn: sqlite3.Connection) -> int:
    getlimit = getattr(conn, "getlimit", None)  # Python >= 3.11
    if getlimit is not None:
        limit = int(getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER))
    else:
        limit = 32766 if sqlite3.sqlite_version_info >= (3, 32, 0) else 999
    return max(1, min(limit // 6, _MAX_ROWS_PER_INSERT))


def _check_stream(stream: str) -> None:
    if stream not in STREAMS:
        raise ProtocolError(f"stream {stream!r}: expected one of {', '.join(STREAMS)}")


class Spool:
    """The on-disk store-and-forward queue of outgoing MQTT messages (see the module docstring).

    Every method is thread-safe. ``put``, ``allocate_seq``, ``observe_seq``, ``next_seq`` and
    ``ack`` never touch the disk; ``pending`` reads it.
    """

    def __init__(
        self,
        path: Path,
        *,
        max_bytes: int = 64 * 2**20,
        commit_interval: float = 0.1,
        queue_size: int = 10000,
    ) -> None:
        self.path = Path(path)
        if max_bytes <= 0:
            raise ConfigError(f"spool {self.path}: max_bytes = {max_bytes}: must be > 0")
        if commit_interval < 0:
            raise ConfigError(
                f"spool {self.path}: commit_interval = {commit_interval}: must be >= 0"
            )
        if queue_size < 1:
            raise ConfigError(f"spool {self.path}: queue_size = {queue_size}: must be >= 1")
        if not self.path.parent.is_dir():
            raise ConfigError(f"spool {self.path}: the directory {self.path.parent} does not exist")
        self.max_bytes = int(max_bytes)
        self.commit_interval = float(commit_interval)
        self.queue_size = int(queue_size)

        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)  # the writer waits on it
        self._done = threading.Condition(self._lock)  # commit waiters: flush, durable, wait()
        self._read_lock = threading.Lock()  # the reader connection
        self._queues: dict[str, deque[_Item]] = {s: deque() for s in STREAMS}
        self._queued = 0
        self._qseq = 0
        self._acks: set[int] = set()  # acked ids whose rows are not deleted yet
        self._seq: dict[str, int] = dict.fromkeys(STREAMS, 0)
        self._seq_dirty = False
        self._ticket = 0  # bumped by every change the writer must commit
        self._grabbed = 0  # the ticket the writer's current batch covers
        self._committed_ticket = 0  # ... and the one it has finished
        self._urgent = 0  # commit up to this ticket now, without waiting for the interval
        self._stopping = False
        self._closed = False
        self._seen_id = 0  # the newest id pending() has shown (for wait())
        self._stats = SpoolStats()
        self._last_error_log = -_ERROR_LOG_EVERY
        self._errors = 0

        # The writer's state of the file; only the writer changes it (under the lock).
        self._disk_bytes = 0
        self._disk_rows = 0
        self._max_id = 0
        self._rows_per_insert = 1

        self._wconn, self._rconn = self._open()
        self._last_commit = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="edge-spool-writer", daemon=True)
        self._thread.start()

    # --- opening ---------------------------------------------------------------------------

    def _open(self) -> tuple[sqlite3.Connection, sqlite3.Connection]:
        try:
            return self._try_open()
        except _Corrupt as exc:
            aside = self._set_aside()
            log.warning(
                "spool %s: unreadable (%s); moved it to %s and started a fresh spool",
                self.path,
                exc,
                aside.name,
            )
        try:
            return self._try_open()
        except _Corrupt as exc:
            raise ConfigError(f"spool {self.path}: a fresh spool is unreadable: {exc}") from exc

    def _try_open(self) -> tuple[sqlite3.Connection, sqlite3.Connection]:
        wconn = rconn = None
        try:
            wconn = sqlite3.connect(
                str(self.path), timeout=5.0, isolation_level=None, check_same_thread=False
            )
            mode = str(wconn.execute("PRAGMA journal_mode=WAL").fetchone()[0]).lower()
            if mode != "wal":
                log.warning("spool %s: journal_mode is %s, not wal (file system?)", self.path, mode)
            wconn.execute("PRAGMA synchronous=FULL")
            wconn.execute(f"PRAGMA journal_size_limit={_WAL_LIMIT}")
            check = str(wconn.execute("PRAGMA quick_check").fetchone()[0])
            if check != "ok":
                raise _Corrupt(f"quick_check: {check.splitlines()[0]}")
            version = int(wconn.execute("PRAGMA user_version").fetchone()[0])
            if version not in (0, _SCHEMA_VERSION):
                raise _Corrupt(f"schema version {version}, expected {_SCHEMA_VERSION}")
            wconn.executescript(
                f"BEGIN IMMEDIATE;{_SCHEMA}PRAGMA user_version={_SCHEMA_VERSION};COMMIT;"
            )
            self._load_state(wconn)
            self._rows_per_insert = _rows_per_insert(wconn)
            rconn = sqlite3.connect(
                str(self.path), timeout=5.0, isolation_level=None, check_same_thread=False
            )
            rconn.execute("PRAGMA query_only=ON")
            return wconn, rconn
        except sqlite3.DatabaseError as exc:
            for conn in (rconn, wconn):
                if conn is not None:
                    conn.close()
            if _looks_corrupt(exc):
                raise _Corrupt(first_line(exc)) from exc
            raise ConfigError(f"spool {self.path}: cannot open: {first_line(exc)}") from exc
        except BaseException:
            for conn in (rconn, wconn):
                if conn is not None:
                    conn.close()
            raise

    def _load_state(self, conn: sqlite3.Connection) -> None:
        stored = dict(conn.execute("SELECT stream, next_seq FROM counters").fetchall())
        in_rows = dict(conn.execute("SELECT stream, MAX(seq) FROM messages GROUP BY stream"))
        for stream in STREAMS:
            top = in_rows.get(stream)
            value = max(int(stored.get(stream, 0)), -1 if top is None else int(top) + 1, 0)
            self._seq[stream] = value
            if value != stored.get(stream):
                self._seq_dirty = True
        rows, size, top_id = conn.execute(
            "SELECT COUNT(*), COALESCE(SUM(length(payload)), 0), COALESCE(MAX(id), 0) FROM messages"
        ).fetchone()
        self._disk_rows, self._disk_bytes, self._max_id = int(rows), int(size), int(top_id)
        if self._seq_dirty:
            self._ticket += 1

    def _set_aside(self) -> Path:
        stamp = int(time.time())
        aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        n = 1
        while aside.exists():
            aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}-{n}")
            n += 1
        try:
            os.replace(self.path, aside)
            wal = self.path.with_name(self.path.name + "-wal")
            if wal.exists():  # never replay an old WAL onto the fresh file
                os.replace(wal, aside.with_name(aside.name + "-wal"))
            shm = self.path.with_name(self.path.name + "-shm")
            if shm.exists():
                shm.unlink()
        except OSError as exc:
            raise ConfigError(
                f"spool {self.path}: unreadable, and cannot be moved aside: {exc.strerror}"
            ) from exc
        return aside

    # --- sequence numbers -------------------------------------------------------------------

    def allocate_seq(self, stream: str) -> int:
        """The next sequence number of ``stream`` (taken; persisted with the next commit)."""
        _check_stream(stream)
        with self._lock:
            value = self._seq[stream]
            self._seq[stream] = value + 1
            self._mark_seq_dirty()
            return value

    def observe_seq(self, stream: str, seq: int) -> None:
        """A seq assigned elsewhere (results: the pipeline's own): counter = max(counter, seq+1)."""
        _check_stream(stream)
        with self._lock:
            self._observe(stream, int(seq))

    def next_seq(self, stream: str) -> int:
        """The value :meth:`allocate_seq` would return, without taking it."""
        _check_stream(stream)
        with self._lock:
            return self._seq[stream]

    def _observe(self, stream: str, seq: int) -> None:
        if seq + 1 > self._seq[stream]:
            self._seq[stream] = seq + 1
            self._mark_seq_dirty()

    def _mark_seq_dirty(self) -> None:
        self._ticket += 1
        if not self._seq_dirty:
            self._seq_dirty = True
            self._work.notify()

    # --- the producer side ------------------------------------------------------------------

    def put(
        self,
        stream: str,
        topic: str,
        payload: bytes,
        *,
        seq: int,
        qos: int = 1,
        retain: bool = False,
        durable: bool = False,
    ) -> None:
        """Queue one message; never waits for the disk (except ``durable=True``: see above).

        ``seq`` also raises the stream's counter (as :meth:`observe_seq`), so a restart never
        hands it out again. Raises ``RuntimeError`` after :meth:`close`.
        """
        _check_stream(stream)
        if qos not in (0, 1, 2):
            raise ValueError(f"qos {qos!r}: expected 0, 1 or 2")
        data = bytes(payload)
        with self._lock:
            if self._closed:
                raise RuntimeError(f"spool {self.path}: put() after close()")
            self._observe(stream, int(seq))
            if self._queued >= self.queue_size and not self._make_queue_room(stream):
                self._stats.dropped[stream] += 1
                return
            self._qseq += 1
            self._queues[stream].append(
                _Item(self._qseq, stream, int(seq), topic, data, qos, bool(retain))
            )
            self._queued += 1
            self._ticket += 1
            ticket = self._ticket
            if durable:
                self._urgent = max(self._urgent, ticket)
            if self._queued == 1 or durable:
                self._work.notify()
            if durable:
                self._wait_committed(ticket, _DURABLE_WAIT)

    def _make_queue_room(self, stream: str) -> bool:
        """With the lock held and the queue full: drop the oldest queued result (or telemetry,
        for telemetry and events). False when the incoming message itself is to be dropped.
        An event with nothing to displace waits for the writer, then goes in over the bound."""
        if self._queues["results"]:
            self._queues["results"].popleft()
            self._queued -= 1
            self._stats.dropped["results"] += 1
            return True
        if stream != "results" and self._queues["telemetry"]:
            self._queues["telemetry"].popleft()
            self._queued -= 1
            self._stats.dropped["telemetry"] += 1
            return True
        if stream != "events":
            return False
        deadline = time.monotonic() + _DURABLE_WAIT
        while self._queued >= self.queue_size and not self._closed:
            self._urgent = max(self._urgent, self._ticket)
            self._work.notify()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._done.wait(remaining)
        if self._closed:
            raise RuntimeError(f"spool {self.path}: put() after close()")
        return True

    def _wait_committed(self, ticket: int, timeout: float) -> bool:
        """With the lock held: wait until the writer has committed up to ``ticket``."""
        deadline = time.monotonic() + timeout
        while self._committed_ticket < ticket:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._thread.is_alive():
                return False
            self._done.wait(remaining)
        return True

    # --- the sender side --------------------------------------------------------------------

    def pending(self, *, after_id: int = 0, limit: int = 500) -> list[SpooledMessage]:
        """Committed, unacked rows with ``id > after_id``, in id (insertion) order."""
        if limit <= 0:
            return []
        with self._lock:
            if self._closed:
                return []
            newest = self._max_id
            skip = {i for i in self._acks if i > after_id}
        with self._read_lock:
            if self._closed:
                return []
            rows = self._rconn.execute(
                "SELECT id, stream, topic, payload, qos, retain FROM messages"
                " WHERE id > ? ORDER BY id LIMIT ?",
                (int(after_id), limit + len(skip)),
            ).fetchall()
        out = [
            SpooledMessage(int(r[0]), r[1], r[2], bytes(r[3]), int(r[4]), bool(r[5]))
            for r in rows
            if r[0] not in skip
        ][:limit]
        with self._lock:
            seen = newest if len(out) < limit else out[-1].id
            self._seen_id = max(self._seen_id, seen)
        return out

    def has_pending(self, *, after_id: int = 0) -> bool:
        """Whether a committed row with ``id > after_id`` may exist: an in-memory check, so a
        sender can skip :meth:`pending`'s query when nothing new was committed."""
        with self._lock:
            return self._max_id > after_id and not self._closed

    def ack(self, ids: Iterable[int]) -> None:
        """Rows the broker has acknowledged: gone from :meth:`pending` now, deleted by the writer
        with its next commit. Never waits for the disk."""
        new = [int(i) for i in ids]
        if not new:
            return
        with self._lock:
            if self._closed:
                return
            was_idle = not self._has_work()
            self._acks.update(new)
            self._ticket += 1
            if was_idle:
                self._work.notify()

    def wait(self, timeout: float) -> bool:
        """Block until rows are committed that no :meth:`pending` call has returned yet (True),
        or until ``timeout`` seconds pass or the spool closes (False). Rows that were committed
        before the call count: no commit is missed between ``pending()`` and ``wait()``."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._max_id <= self._seen_id and not self._closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._done.wait(remaining)
            return self._max_id > self._seen_id and not self._closed

    # --- state ------------------------------------------------------------------------------

    def depth(self) -> int:
        """Rows not yet deleted (committed and unacked, or acked and awaiting the next commit)
        plus messages queued and not committed yet."""
        with self._lock:
            return self._disk_rows + self._queued

    def size_bytes(self) -> int:
        """Payload bytes held on disk."""
        with self._lock:
            return self._disk_bytes

    @property
    def stats(self) -> SpoolStats:
        with self._lock:
            s = self._stats
            return SpoolStats(
                dropped=dict(s.dropped),
                events_lost=s.events_lost,
                disk_full=s.disk_full,
                committed=s.committed,
                acked=s.acked,
                commits=s.commits,
            )

    def flush(self, timeout: float = 5.0) -> None:
        """Commit everything queued (messages, acks, counters) now, and wait for it."""
        with self._lock:
            target = self._ticket
            if self._committed_ticket >= target or self._stopping:
                return
            self._urgent = max(self._urgent, target)
            self._work.notify()
            done = self._wait_committed(target, timeout)
        if not done:
            log.warning("spool %s: flush did not finish within %.1f s", self.path, timeout)

    def close(self) -> None:
        """Commit what is queued, stop the writer and close the file. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._stopping = True
            self._urgent = self._ticket
            self._work.notify()
            self._done.notify_all()  # wake wait() and events waiting for room
        self._thread.join(timeout=30.0)
        if self._thread.is_alive():  # stuck in the file system: leave its connection alone
            log.warning("spool %s: the writer did not stop; closing without it", self.path)
        else:
            self._wconn.close()
        with self._read_lock:
            self._rconn.close()

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the writer thread ------------------------------------------------------------------

    def _has_work(self) -> bool:
        return self._queued > 0 or bool(self._acks) or self._seq_dirty

    def _run(self) -> None:
        while True:
            with self._lock:
                while True:
                    if self._has_work():
                        if self._stopping or self._urgent > self._grabbed:
                            break
                        remaining = self._last_commit + self.commit_interval - time.monotonic()
                        if remaining <= 0:
                            break
                        self._work.wait(remaining)
                    elif self._stopping:
                        return
                    else:
                        self._work.wait()
                batch = self._grab()
                stopping = self._stopping
            failed = False
            try:
                self._commit(batch)
            except Exception as exc:  # never let the writer die
                failed = True
                self._on_error(batch, exc)
            with self._lock:
                self._committed_ticket = batch.ticket
                self._done.notify_all()
            if stopping:  # close(): everything was in this batch; acks that come later are moot
                return
            if failed:  # the acks and counters are retried: not in a tight loop
                time.sleep(_ERROR_BACKOFF)

    def _grab(self) -> _Batch:
        """With the lock held: take everything queued, in put() order across streams."""
        items: list[_Item] = []
        for q in self._queues.values():
            items.extend(q)
            q.clear()
        items.sort(key=lambda item: item.qseq)
        self._queued = 0
        counters = dict(self._seq) if self._seq_dirty else None
        self._seq_dirty = False
        self._grabbed = self._ticket
        self._last_commit = time.monotonic()
        # Acked ids stay in self._acks (hidden from pending()) until their rows are deleted.
        return _Batch(items, sorted(self._acks), counters, self._ticket)

    def _commit(self, batch: _Batch) -> None:
        items = batch.items
        batch_bytes = sum(len(item.payload) for item in items)
        before = self._disk_bytes
        tight = max(0, before - batch_bytes)  # frees about twice the batch's size
        attempts = [
            (self.max_bytes, _DROPPABLE),
            (min(self.max_bytes, tight), ("results",)),
            (min(self.max_bytes, tight), _DROPPABLE),
            (0, _DROPPABLE),
        ]
        last: BaseException | None = None
        for cap, streams in attempts:
            try:
                outcome = self._transaction(items, batch.acks, batch.counters, cap, streams)
            except sqlite3.DatabaseError as exc:
                self._rollback()
                if not _is_full(exc):
                    raise
                last = exc
                self._checkpoint()
                continue
            self._applied(batch, outcome, lost=None)
            return
        # Not even events alone fit: the batch is lost. Deleting acked rows may still work.
        rest: _Outcome | None = None
        if batch.acks or batch.counters:
            try:
                rest = self._transaction([], batch.acks, batch.counters, self.max_bytes, ())
            except sqlite3.DatabaseError:
                self._rollback()
        self._applied(batch, rest, lost=items, reason=last)

    def _transaction(
        self,
        items: list[_Item],
        acks: Sequence[int],
        counters: dict[str, int] | None,
        cap: int,
        streams: Sequence[str],
    ) -> _Outcome:
        """One write transaction: delete acked rows, make room under ``cap`` (deleting the
        oldest rows of ``streams`` on disk, then in the batch), insert, store the counters."""
        conn = self._wconn
        out = _Outcome(self._disk_bytes, self._disk_rows, self._max_id)
        conn.execute("BEGIN IMMEDIATE")
        for i in range(0, len(acks), _CHUNK):
            chunk = acks[i : i + _CHUNK]
            marks = ",".join("?" * len(chunk))
            n, size = conn.execute(
                "SELECT COUNT(*), COALESCE(SUM(length(payload)), 0)"
                f" FROM messages WHERE id IN ({marks})",
                chunk,
            ).fetchone()
            conn.execute(f"DELETE FROM messages WHERE id IN ({marks})", chunk)
            out.acked += int(n)
            out.disk_rows -= int(n)
            out.disk_bytes -= int(size)
        excess = out.disk_bytes + sum(len(item.payload) for item in items) - cap
        for stream in streams:
            if excess <= 0:
                break
            n, freed = self._delete_oldest(stream, excess)
            out.dropped[stream] += n
            out.disk_rows -= n
            out.disk_bytes -= freed
            excess -= freed
            if excess > 0:  # every row of it on disk is gone: the batch's oldest go next
                kept = []
                for item in items:
                    if excess > 0 and item.stream == stream:
                        excess -= len(item.payload)
                        out.dropped[stream] += 1
                    else:
                        kept.append(item)
                items = kept
        if items:
            per = self._rows_per_insert
            for i in range(0, len(items), per):
                rows = items[i : i + per]
                values: list[object] = []
                for m in rows:
                    values += (m.stream, m.seq, m.topic, m.payload, m.qos, int(m.retain))
                conn.execute(_INSERT + ",".join([_ROW] * len(rows)), values)
            out.max_id = int(conn.execute("SELECT last_insert_rowid()").fetchone()[0])
            out.inserted = len(items)
            out.disk_rows += len(items)
            out.disk_bytes += sum(len(m.payload) for m in items)
        if counters is not None:
            conn.executemany(
                "INSERT OR REPLACE INTO counters (stream, next_seq) VALUES (?, ?)",
                sorted(counters.items()),
            )
        conn.execute("COMMIT")
        return out

    def _delete_oldest(self, stream: str, excess: int) -> tuple[int, int]:
        """Delete the oldest rows of ``stream`` holding at least ``excess`` payload bytes (or
        all of them); returns (rows, bytes) deleted."""
        conn = self._wconn
        if _WINDOWS:  # one statement: finding the cut-off never waits for the GIL per row
            found = conn.execute(
                "SELECT id FROM (SELECT id, SUM(length(payload)) OVER"
                " (ORDER BY id ROWS UNBOUNDED PRECEDING) AS upto"
                " FROM messages WHERE stream = ?) WHERE upto >= ? LIMIT 1",
                (stream, excess),
            ).fetchone()
            last = None if found is None else int(found[0])
        else:  # SQLite < 3.25
            last = self._cut_off_by_scan(stream, excess)
        bound = "" if last is None else " AND id <= ?"
        args: tuple[object, ...] = (stream,) if last is None else (stream, last)
        n, freed = conn.execute(
            "SELECT COUNT(*), COALESCE(SUM(length(payload)), 0) FROM messages"
            f" WHERE stream = ?{bound}",
            args,
        ).fetchone()
        if n:
            conn.execute(f"DELETE FROM messages WHERE stream = ?{bound}", args)
        return int(n), int(freed)

    def _cut_off_by_scan(self, stream: str, excess: int) -> int | None:
        cur = self._wconn.execute(
            "SELECT id, length(payload) FROM messages WHERE stream = ? ORDER BY id", (stream,)
        )
        freed = 0
        try:
            for row_id, size in cur:
                freed += int(size)
                if freed >= excess:
                    return int(row_id)
        finally:
            cur.close()
        return None

    def _rollback(self) -> None:
        try:
            if self._wconn.in_transaction:
                self._wconn.execute("ROLLBACK")
        except sqlite3.Error as exc:
            log.debug("spool %s: rollback: %s", self.path, first_line(exc))

    def _checkpoint(self) -> None:
        """After SQLITE_FULL: move the WAL into the file so the next transaction reuses the WAL
        from its start instead of growing it."""
        try:
            self._wconn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        except sqlite3.Error as exc:
            log.debug("spool %s: checkpoint: %s", self.path, first_line(exc))

    def _applied(
        self,
        batch: _Batch,
        outcome: _Outcome | None,
        *,
        lost: list[_Item] | None,
        reason: BaseException | None = None,
    ) -> None:
        """Bring the in-memory state in line with what was (or was not) committed."""
        with self._lock:
            s = self._stats
            if outcome is not None:
                self._disk_bytes, self._disk_rows = outcome.disk_bytes, outcome.disk_rows
                self._max_id = max(self._max_id, outcome.max_id)
                s.committed += outcome.inserted
                s.acked += outcome.acked
                s.commits += 1
                for stream, n in outcome.dropped.items():
                    s.dropped[stream] += n
                self._acks.difference_update(batch.acks)
            else:
                self._seq_dirty = self._seq_dirty or batch.counters is not None
            if lost is None:
                if s.disk_full:
                    log.info("spool %s: commits succeed again", self.path)
                s.disk_full = False
                return
            events = sum(1 for item in lost if item.stream == "events")
            for item in lost:
                if item.stream != "events":
                    s.dropped[item.stream] += 1
            s.events_lost += events
            if not s.disk_full:
                s.disk_full = True
                log.warning(
                    "spool %s: disk full (%s); dropping every message until there is room again"
                    " (%d events lost so far)",
                    self.path,
                    first_line(reason) if reason is not None else "SQLITE_FULL",
                    s.events_lost,
                )

    def _on_error(self, batch: _Batch, exc: BaseException) -> None:
        """An exception that is not a full disk: count the batch as lost, keep the acks and the
        counters for the next commit, and log (with the traceback at most once a minute)."""
        self._rollback()
        with self._lock:
            s = self._stats
            for item in batch.items:
                if item.stream == "events":
                    s.events_lost += 1
                else:
                    s.dropped[item.stream] += 1
            if batch.counters is not None:
                self._seq_dirty = True
            self._errors += 1
            now = time.monotonic()
            loud = now - self._last_error_log >= _ERROR_LOG_EVERY
            if loud:
                self._last_error_log = now
        if loud:
            log.error(
                "spool %s: commit failed (%d so far), %d messages lost: %s",
                self.path,
                self._errors,
                len(batch.items),
                first_line(exc),
                exc_info=exc,
            )
