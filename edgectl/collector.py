"""``edgectl collect fleet``: the fleet's MQTT streams into PostgreSQL, exactly once.

A long-running service. Its life, top to bottom: :meth:`FleetCollector.startup` (connect to the
database, apply the schema's migrations, connect to the broker) -> :meth:`main_loop` (batches
until ``should_exit``) -> :meth:`shutdown` (a bounded drain: what was received is written and
acknowledged, then a clean DISCONNECT that keeps the session). SIGTERM and SIGINT only set the
flag.

**Delivery.** MQTT 5, QoS 1, a persistent session (``clean_start`` false, a session expiry),
and **manual acknowledgement**: paho's thread turns each message into a row
(:func:`edgectl.fleetdb.rows.to_row`) and queues it with its packet id; the main loop writes a
batch (:class:`~edgectl.fleetdb.writer.Writer`, one transaction) and only after the commit
sends the PUBACKs, in the order the messages came. A collector killed at any point has
acknowledged only committed messages: the broker keeps the rest in the session and sends them
again when the collector comes back (same ``--client-id``), and the idempotency key makes the
second copy a no-op. PUBACKs are sent only on the connection the message came on (a message of
an earlier connection is redelivered anyway). The broker never has more than
``receive_maximum`` messages unacknowledged with us, which bounds the queue (MQTT 5 flow
control: a slow database slows the broker's sending, it does not fill our memory).

**Several collectors** subscribe in one shared-subscription group
(``$share/<group>/edge/+/telemetry``, events, results): the broker splits the messages between
them. Status and reported states are subscribed without a share: they are retained, and
retained messages are not sent to shared subscriptions, so each collector reads the current
ones at start; their derived seq (a hash of the bytes) stores each once.

A database that goes away is retried with backoff (0.5 s doubling to 30 s) while the batch
waits, unacknowledged; a batch the database refuses for its data is split until the rows at
fault are found, and those are counted as rejected (and acknowledged: they would fail again).
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import random
import signal
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg

from edge_agent.common.backoff import BackoffPolicy
from edge_agent.errors import BrokerError, DatabaseError, first_line
from edge_agent.fleet import protocol
from edgectl.fleetdb import db
from edgectl.fleetdb.metrics import CollectorMetrics
from edgectl.fleetdb.rows import Rejected, Row, split_topic, to_row
from edgectl.fleetdb.writer import BatchResult, Writer

log = logging.getLogger("edgectl.collector")

#: The streams read through the share group, and those read by every collector (retained).
SHARED_STREAMS = ("telemetry", "events")
RETAINED_STREAMS = ("status", "reported")

#: How often ``--retention-days`` deletes old rows from plain tables (TimescaleDB: its policy).
PRUNE_EVERY_S = 3600.0


def default_client_id(share_group: str) -> str:
    return f"edgectl-collect-{share_group}-{socket.gethostname()}"[:64]


@dataclass(frozen=True)
class CollectorSettings:
    db: str
    db_password_file: str = ""
    share_group: str = "edge-collectors"
    client_id: str = ""
    results: bool = False
    prefix: str = protocol.DEFAULT_PREFIX
    prometheus_port: int = 0
    batch_rows: int = 1000
    batch_ms: float = 200.0
    session_expiry_s: int = 7 * 86400
    receive_maximum: int = 5000
    retention_days: float = 0.0
    duration: float = 0.0  # 0: until stopped
    retire: bool = False  # drain this collector's session, then end it (see retire_loop)
    idle_s: float = 0.0  # stop after this long without a message (0: never; --retire: 2 s)

    def __post_init__(self) -> None:
        protocol.check_name(self.share_group, "--share-group")
        if not 1 <= self.batch_rows <= 100_000:
            raise ValueError(f"--batch-rows {self.batch_rows}: must be 1..100000")
        if not 1 <= self.receive_maximum <= 65535:
            raise ValueError(f"--receive-maximum {self.receive_maximum}: must be 1..65535")

    def topics(self) -> list[tuple[str, bool]]:
        """``(filter, shared)`` for every subscription."""
        shared = [*SHARED_STREAMS, *(("results",) if self.results else ())]
        out = [(protocol.fleet_topic(s, prefix=self.prefix, share=self.share_group), True)
               for s in shared]  # fmt: skip
        out += [(protocol.fleet_topic(s, prefix=self.prefix), False) for s in RETAINED_STREAMS]
        return out


@dataclass
class Item:
    """A received message: its row (None when rejected), and what acknowledges it."""

    generation: int
    mid: int
    qos: int
    stream: str
    row: Row | None


@dataclass
class Totals:
    messages: int = 0
    rows: int = 0
    duplicates: int = 0
    rejected: int = 0
    batches: int = 0
    db_errors: int = 0
    per_stream: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "messages": self.messages, "rows": self.rows, "duplicates": self.duplicates,
            "rejected": self.rejected, "batches": self.batches, "db_errors": self.db_errors,
            "per_stream": dict(sorted(self.per_stream.items())),
        }  # fmt: skip


class FleetCollector:
    """One collector: a broker connection (``broker``: ``edge_agent.fleet.mqtt.BrokerSettings``)
    and a database connection, see the module's docstring."""

    def __init__(self, settings: CollectorSettings, broker: Any) -> None:
        self.settings = settings
        self.broker = broker
        self.client_id = settings.client_id or default_client_id(settings.share_group)
        self.metrics = CollectorMetrics()
        self.totals = Totals()
        self.should_exit = threading.Event()
        self._queue: queue.Queue[Item] = queue.Queue()
        self._generation = 0
        self._gen_lock = threading.Lock()
        self._connected = threading.Event()
        self._subscribed = threading.Event()
        self._refused: str | None = None
        self._conn: psycopg.Connection | None = None
        self._writer: Writer | None = None
        self._client: Any = None
        self._end_session = False

    # --- startup ------------------------------------------------------------------------------

    def startup(self) -> None:
        s = self.settings
        self._conn = db.connect(s.db, password_file=s.db_password_file)
        applied = db.migrate(self._conn, retention_days=s.retention_days)
        if applied:
            log.warning("fleet database: applied %s", ", ".join(applied))
        self._writer = Writer(self._conn)
        if s.prometheus_port:
            self.metrics.serve(s.prometheus_port)
        self._connect_broker()

    def _connect_broker(self) -> None:
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        b = self.broker
        client = b.new_client(
            client_id=self.client_id, password=b.password(what="--password-file"),
            manual_ack=True, reconnect_delay=(1, 30),
        )  # fmt: skip
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self.settings.session_expiry_s
        props.ReceiveMaximum = self.settings.receive_maximum
        self._client = client
        try:
            client.connect(b.host, b.port, keepalive=30, clean_start=False, properties=props)
        except OSError as exc:
            raise BrokerError(f"mqtt {b.safe_url}: cannot connect: {exc.strerror or exc}") from None
        client.loop_start()
        if not self._connected.wait(10.0):
            client.loop_stop()
            raise BrokerError(f"mqtt {b.safe_url}: no CONNACK within 10 s")
        if self._refused:
            client.loop_stop()
            raise BrokerError(f"mqtt {b.safe_url}: broker refused the connection: {self._refused}")
        if not self._subscribed.wait(10.0):
            client.loop_stop()
            raise BrokerError(f"mqtt {b.safe_url}: no SUBACK within 10 s")
        if self._refused:
            client.loop_stop()
            raise BrokerError(f"mqtt {b.safe_url}: {self._refused}")

    # --- paho's thread ------------------------------------------------------------------------

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if getattr(reason, "is_failure", False):
            self._refused = str(reason)
            self._connected.set()
            return
        from paho.mqtt.subscribeoptions import SubscribeOptions

        with self._gen_lock:
            self._generation += 1
        session = bool(getattr(flags, "session_present", False))
        log.info("connected as %s (session %s)", self.client_id, "resumed" if session else "new")
        client.subscribe([(t, SubscribeOptions(qos=1)) for t, _ in self.settings.topics()])
        self._connected.set()

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, codes: Any, props: Any) -> None:
        refused = [str(c) for c in codes if getattr(c, "is_failure", False)]
        if refused:  # e.g. a broker without shared subscriptions, or an ACL
            topics = ", ".join(t for t, _ in self.settings.topics())
            self._refused = f"subscription to {topics} refused: {', '.join(refused)}"
        self._subscribed.set()

    def _on_disconnect(
        self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any
    ) -> None:
        if not self.should_exit.is_set():
            log.warning("broker connection lost (%s): reconnecting", reason)

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        with self._gen_lock:
            generation = self._generation
        where = split_topic(msg.topic, prefix=self.settings.prefix)
        row: Row | None = None
        stream = where[1] if where else "other"
        if where is None or not msg.payload:  # not ours, or a retained message cleared
            pass
        else:
            try:
                row = to_row(where[0], where[1], msg.payload)
            except Rejected as exc:
                log.warning("%s: rejected: %s", msg.topic, exc)
                stream = "rejected"
            except Exception:  # a bug: say so, and never stop paho's thread over one message
                log.exception("%s: cannot make a row of it: rejected", msg.topic)
                stream = "rejected"
        self._queue.put(Item(generation, msg.mid, msg.qos, stream, row))

    # --- the loop -----------------------------------------------------------------------------

    def _take_batch(self, *, wait: float) -> list[Item]:
        """Up to ``batch_rows`` items: block up to ``wait`` for the first, then gather for up
        to ``batch_ms`` more."""
        try:
            first = self._queue.get(timeout=wait)
        except queue.Empty:
            return []
        batch = [first]
        deadline = time.monotonic() + self.settings.batch_ms / 1000
        while len(batch) < self.settings.batch_rows:
            left = deadline - time.monotonic()
            try:
                batch.append(
                    self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
                )
            except queue.Empty:
                break
        return batch

    def main_loop(self) -> None:
        if self.settings.retire:
            self.retire_loop()
            return
        end = time.monotonic() + self.settings.duration if self.settings.duration else None
        next_prune = time.monotonic()
        while not self.should_exit.is_set():
            now = time.monotonic()
            if end is not None and now >= end:
                break
            if self.settings.retention_days > 0 and now >= next_prune:
                next_prune = now + PRUNE_EVERY_S
                self._prune()
            batch = self._take_batch(wait=0.2)
            if batch:
                self._process(batch)

    def _prune(self) -> None:
        """``--retention-days`` without TimescaleDB: delete the rows past it (at start, then
        hourly). A failure is logged and tried again at the next round."""
        if self._conn is None:  # away: the writer reconnects it; prune at the next round
            return
        try:
            n = db.prune(self._conn, retention_days=self.settings.retention_days)
        except DatabaseError as exc:
            log.warning("fleet database: %s", exc)
            return
        if n:
            log.info("fleet database: deleted %d rows older than %g days", n,
                     self.settings.retention_days)  # fmt: skip

    def _drain_until_idle(self) -> None:
        idle_since = time.monotonic()
        while (
            not self.should_exit.is_set() and time.monotonic() - idle_since < self.settings.idle_s
        ):
            batch = self._take_batch(wait=0.1)
            if batch:
                self._process(batch)
                idle_since = time.monotonic()

    def retire_loop(self) -> None:
        """``--retire``: store what the broker kept in this collector's session (its share while
        it was away), unsubscribe, store what was still on its way, then end the session
        (DISCONNECT with a session expiry of 0) so the broker stops giving it a share."""
        self._drain_until_idle()
        done = threading.Event()
        self._client.on_unsubscribe = lambda *a: done.set()
        self._client.unsubscribe([t for t, _ in self.settings.topics()])
        if not done.wait(10.0):
            raise BrokerError("mqtt: no UNSUBACK within 10 s: the session was kept")
        self._drain_until_idle()
        if self.should_exit.is_set():
            raise BrokerError("interrupted: the session was kept (run --retire again)")
        self._end_session = True

    def _process(self, batch: Sequence[Item]) -> None:
        rows = [item.row for item in batch if item.row is not None]
        result = self._write(rows)
        self._acknowledge(batch)
        t = self.totals
        t.batches += 1
        t.messages += len(batch)
        t.rows += result.rows - result.duplicates
        t.duplicates += result.duplicates
        for item in batch:
            t.per_stream[item.stream] = t.per_stream.get(item.stream, 0) + 1
            if item.stream == "rejected":
                t.rejected += 1
                self.metrics.rejected.inc()
            elif item.row is not None:
                self.metrics.messages.labels(item.stream).inc()
        for stream, n in result.offered.items():
            inserted = result.inserted.get(stream, 0)
            self.metrics.rows.labels(stream).inc(inserted)
            self.metrics.duplicates.labels(stream).inc(n - inserted)
        self.metrics.committed(rows)

    def _acknowledge(self, batch: Sequence[Item]) -> None:
        with self._gen_lock:
            current = self._generation
        for item in batch:  # in the order received
            if item.qos > 0 and item.generation == current:
                self._client.ack(item.mid, item.qos)

    def _write(self, rows: list[Row]) -> BatchResult:
        """Write until committed: reconnect (with backoff) while the database is away; split a
        batch it refuses for its data, rejecting the rows at fault."""
        backoff, rng = BackoffPolicy(initial=0.5, maximum=30.0), random.Random()
        attempt = 0
        while True:
            try:
                if self._writer is None:
                    self._reconnect_db()
                assert self._writer is not None
                t0 = time.monotonic()
                result = self._writer.write(rows)
                self.metrics.batch_seconds.observe(time.monotonic() - t0)
                return result
            except (psycopg.OperationalError, DatabaseError) as exc:
                if isinstance(exc, psycopg.errors.DeadlockDetected):
                    continue  # the other collector won; ours goes again
                self._db_error(exc)
                self._close_db()
            except psycopg.Error as exc:  # the data: find the rows at fault
                self._db_error(exc)
                if self._conn is not None and self._conn.closed:
                    self._close_db()
                    continue
                return self._split(rows)
            delay = backoff.delay(attempt, rng)
            attempt += 1
            if self.should_exit.wait(delay) and attempt > 3:
                raise DatabaseError(f"database unreachable while stopping: {len(rows)} rows left")

    def _split(self, rows: list[Row]) -> BatchResult:
        if len(rows) == 1:
            log.warning("%s/%s seq %s: refused by the database: rejected",
                        rows[0].device, rows[0].stream, rows[0].seq)  # fmt: skip
            self.totals.rejected += 1
            self.metrics.rejected.inc()
            return BatchResult(offered={rows[0].stream: 0})
        half = len(rows) // 2
        a, b = self._write(rows[:half]), self._write(rows[half:])
        merged = BatchResult()
        for part in (a, b):
            for stream, n in part.offered.items():
                merged.offered[stream] = merged.offered.get(stream, 0) + n
            for stream, n in part.inserted.items():
                merged.inserted[stream] = merged.inserted.get(stream, 0) + n
        return merged

    def _db_error(self, exc: Exception) -> None:
        self.totals.db_errors += 1
        self.metrics.db_errors.inc()
        log.warning("fleet database: %s", first_line(exc))

    def _reconnect_db(self) -> None:
        s = self.settings
        self._conn = db.connect(s.db, password_file=s.db_password_file)
        self._writer = Writer(self._conn)
        log.warning("fleet database: connected again")

    def _close_db(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(psycopg.Error):
                self._conn.close()
        self._conn, self._writer = None, None

    # --- shutdown -----------------------------------------------------------------------------

    def shutdown(self, *, drain_s: float = 5.0) -> None:
        """Write and acknowledge what was received (for up to ``drain_s``), then DISCONNECT
        (the session stays on the broker, with whatever is still unacknowledged)."""
        self.should_exit.set()
        deadline = time.monotonic() + drain_s
        while time.monotonic() < deadline:
            batch = self._take_batch(wait=0.05)
            if not batch:
                break
            try:
                self._process(batch)
            except DatabaseError:
                break
        if self._client is not None:
            props = None
            if self._end_session:
                from paho.mqtt.packettypes import PacketTypes
                from paho.mqtt.properties import Properties

                props = Properties(PacketTypes.DISCONNECT)
                props.SessionExpiryInterval = 0
            self._client.disconnect(properties=props)
            self._client.loop_stop()
        self._close_db()

    def run(self, *, ready: Callable[[str], None] | None = None) -> dict[str, Any]:
        """startup -> main_loop -> shutdown, with SIGTERM/SIGINT setting the flag; the totals.
        ``ready`` gets a line once the subscriptions are acknowledged."""
        previous = {
            sig: signal.signal(sig, lambda *_: self.should_exit.set())
            for sig in (signal.SIGTERM, signal.SIGINT)
        }
        try:
            try:
                self.startup()
            except BaseException:
                self._close_db()
                if self._client is not None:
                    self._client.loop_stop()
                raise
            if ready is not None:
                ready(
                    f"collecting as {self.client_id} (share group {self.settings.share_group}) "
                    f"into {db.safe_url(self.settings.db)}"
                )
            try:
                self.main_loop()
            finally:
                self.shutdown()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return self.totals.as_dict()


def summary_line(totals: dict[str, Any]) -> str:
    return json.dumps(totals, separators=(",", ":"))
