"""What ``edgectl status``, ``export`` and ``history`` read from the fleet database.

Every query of one device's time range is a range scan of its table's primary key
``(device, time, seq)``; the fleet's latest state walks ``devices`` and takes each device's
newest row per stream through the same key (``LATERAL … ORDER BY time DESC LIMIT 1``).
``tests/test_fleetdb.py`` checks the plans with EXPLAIN.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Iterator, Sequence
from typing import Any

import psycopg
from psycopg import sql

from edge_agent.errors import ConfigError, DatabaseError, first_line
from edgectl.fleetdb import db
from edgectl.fleetdb.rows import DEFAULT_METRICS, METRICS


def parse_metrics(text: str) -> list[str]:
    """``fps,p95`` -> the names, each checked."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in METRICS]
    if bad or not names:
        raise ConfigError(
            f"--metric {text!r}: expected names among {', '.join(METRICS)} (comma-separated)"
        )
    return names


def utc(ts: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(ts, tz=datetime.timezone.utc)


def history_query(metrics: Sequence[str]) -> sql.Composed:
    cols = sql.SQL(", ").join(
        sql.SQL("{} AS {}").format(sql.Identifier(METRICS[m]), sql.Identifier(m)) for m in metrics
    )
    return sql.SQL(
        "SELECT time, seq, {} FROM telemetry WHERE device = %s AND time >= %s AND time < %s "
        "ORDER BY time LIMIT %s"
    ).format(cols)


def history(
    conn: psycopg.Connection,
    device: str,
    *,
    since: float,
    until: float,
    metrics: Sequence[str] = DEFAULT_METRICS,
    limit: int = 100_000,
) -> list[dict[str, Any]]:
    """One device's telemetry between two Unix times, oldest first: ``time`` (ISO 8601, UTC),
    ``seq`` and each metric."""
    rows = db.execute(conn, history_query(metrics), (device, utc(since), utc(until), limit))
    out = []
    for time, seq, *values in rows:
        item: dict[str, Any] = {"time": time.isoformat(), "seq": seq}
        item.update(zip(metrics, values))
        out.append(item)
    return out


LATEST = """
SELECT d.device, d.last_seen, s.payload, t.payload, r.payload
FROM devices d
LEFT JOIN LATERAL (SELECT payload FROM status WHERE device = d.device
                   ORDER BY received DESC, time DESC LIMIT 1) s ON true
LEFT JOIN LATERAL (SELECT payload FROM telemetry WHERE device = d.device
                   ORDER BY time DESC LIMIT 1) t ON true
LEFT JOIN LATERAL (SELECT payload FROM reported WHERE device = d.device
                   ORDER BY time DESC LIMIT 1) r ON true
ORDER BY d.device
"""


def fleet_latest(conn: psycopg.Connection) -> dict[str, dict[str, Any]]:
    """Every device's newest status, telemetry and reported state, in the shape
    ``edgectl.cli.fleet_snapshot`` builds from the broker's retained messages. Status is the
    newest *received* (an ``offline`` Will carries the time of the connection it watched)."""
    fleet: dict[str, dict[str, Any]] = {}
    for device, _last, status, telemetry, reported in db.execute(conn, LATEST):
        entry = fleet.setdefault(device, {})
        for kind, payload in (("status", status), ("telemetry", telemetry),
                              ("reported", reported)):  # fmt: skip
            if payload is not None:
                entry[kind] = payload
    return fleet


def telemetry_payloads(
    conn: psycopg.Connection, *, since: float, until: float, device: str | None = None
) -> Iterator[dict[str, Any]]:
    """Telemetry payloads between two Unix times, oldest first (a server-side cursor: an export
    of a long run does not sit in memory)."""
    where = "time >= %s AND time < %s" + (" AND device = %s" if device else "")
    params: tuple[Any, ...] = (utc(since), utc(until), *((device,) if device else ()))
    query = f"SELECT payload FROM telemetry WHERE {where} ORDER BY time, device, seq"
    try:
        with conn.cursor(name="edgectl_export") as cur:
            cur.itersize = 2000
            cur.execute(query.encode(), params)
            for (payload,) in cur:
                yield payload if isinstance(payload, dict) else json.loads(payload)
    except psycopg.Error as exc:
        raise DatabaseError(f"database query failed: {first_line(exc)}") from None


def explain(conn: psycopg.Connection, query: Any, params: Any) -> str:
    """EXPLAIN's plan of a query, as text."""
    rows = db.execute(conn, sql.SQL("EXPLAIN ") + sql.SQL(query) if isinstance(query, str)
                      else sql.SQL("EXPLAIN ") + query, params)  # fmt: skip
    return "\n".join(r[0] for r in rows)
