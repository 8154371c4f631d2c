"""Batched, idempotent writes of :class:`~edgectl.fleetdb.rows.Row` s.

A batch is written in one transaction: per stream, ``INSERT … ON CONFLICT DO NOTHING`` through
psycopg's ``executemany`` (pipelined: one round trip per batch, not per row); the difference
between the rows offered and the rows inserted is the duplicates skipped (a message delivered
again, or twice in one batch). ``devices`` is upserted once per device of the batch, in one
statement. Only after the commit does the caller acknowledge the batch's messages.

``executemany`` was measured against COPY into a temporary staging table followed by ``INSERT …
SELECT … ON CONFLICT DO NOTHING``: on PostgreSQL 15 here it was as fast or faster (telemetry
rows, batches of 500-1000: 25-28k rows/s against 19-26k), and simpler; see ``docs/fleet.md``.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import dataclass, field

import psycopg
from psycopg import sql

from edgectl.fleetdb.rows import COLUMNS, Row


@dataclass
class BatchResult:
    offered: dict[str, int] = field(default_factory=dict)  # rows per stream
    inserted: dict[str, int] = field(default_factory=dict)  # per stream

    @property
    def rows(self) -> int:
        return sum(self.offered.values())

    @property
    def duplicates(self) -> int:
        return self.rows - sum(self.inserted.values())


def columns(stream: str) -> list[str]:
    """The columns of a stream's table in :meth:`Row.as_tuple` order."""
    return ["device", "seq", "time", *COLUMNS[stream], "payload"]


def insert_statement(stream: str) -> sql.Composed:
    cols = columns(stream)
    return sql.SQL("INSERT INTO {} ({}) VALUES ({}) ON CONFLICT DO NOTHING").format(
        sql.Identifier(stream),
        sql.SQL(", ").join(map(sql.Identifier, cols)),
        sql.SQL(", ").join(sql.Placeholder() * len(cols)),
    )


class Writer:
    """Writes batches on one connection (not thread-safe: one writer thread owns it)."""

    def __init__(self, conn: psycopg.Connection) -> None:
        self.conn = conn
        self._insert = {stream: insert_statement(stream) for stream in COLUMNS}

    def write(self, rows: Sequence[Row]) -> BatchResult:
        """Write ``rows`` in one transaction (committed on return); psycopg.Error on failure,
        with the transaction rolled back and nothing written."""
        result = BatchResult()
        by_stream: dict[str, list[tuple[object, ...]]] = {}
        last_seen: dict[str, datetime.datetime] = {}
        for row in rows:
            by_stream.setdefault(row.stream, []).append(row.as_tuple())
            if row.device not in last_seen or row.time > last_seen[row.device]:
                last_seen[row.device] = row.time
        with self.conn.transaction():
            with self.conn.cursor() as cur:
                for stream, items in by_stream.items():
                    items.sort(key=lambda t: (t[0], t[2], t[1]))  # key order: no deadlock
                    cur.executemany(self._insert[stream], items)
                    result.offered[stream] = len(items)
                    result.inserted[stream] = max(cur.rowcount, 0)
            if last_seen:
                devices = sorted(last_seen)  # one order for every collector: no deadlock
                self.conn.execute(
                    "INSERT INTO devices (device, first_seen, last_seen) "
                    "SELECT d, t, t FROM unnest(%s::text[], %s::timestamptz[]) AS u(d, t) "
                    "ON CONFLICT (device) DO UPDATE SET last_seen = "
                    "greatest(devices.last_seen, EXCLUDED.last_seen)",
                    (devices, [last_seen[d] for d in devices]),
                )
        return result
