"""Connecting to the fleet database, and its versioned schema.

``--db`` is a libpq connection string (``postgresql://collector@db.example.net/fleet`` or
``host=… dbname=…``, or a ``service=NAME`` of ``~/.pg_service.conf``) **without a password**;
the password comes from ``--db-password-file`` (a bare name is looked up in
``$CREDENTIALS_DIRECTORY``) or from libpq's own ``PGPASSFILE`` (``~/.pgpass``). Default:
``$EDGECTL_DB``.

Migrations are the ordered SQL files ``migrations/NNNN_name.sql`` of this package. At start,
:func:`migrate` takes a transaction-scoped advisory lock (two collectors starting together wait
for each other instead of racing), reads ``schema_version``, refuses a database newer than
this edgectl (:class:`DatabaseError`), and applies what is missing, each file and its
``schema_version`` row in the one transaction. With the TimescaleDB extension installed in the
database, the stream tables become hypertables (and get a retention policy when asked); that
path is untested here (no TimescaleDB on the test machine).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from importlib import resources
from typing import Any

import psycopg
from psycopg import conninfo, sql
from psycopg.pq import TransactionStatus

from edge_agent.errors import ConfigError, DatabaseError, first_line

log = logging.getLogger(__name__)

#: The stream tables (each: device, seq, time, payload and typed columns).
STREAM_TABLES = ("telemetry", "events", "results", "status", "reported")
#: pg_advisory_xact_lock key of the migrations: "edgectl" in ASCII.
MIGRATION_LOCK = 0x6564676563746C
_MIGRATION = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def migrations() -> list[Migration]:
    """Every migration shipped with this edgectl, in order (versions 1, 2, … without gaps)."""
    found = []
    for entry in resources.files("edgectl.fleetdb").joinpath("migrations").iterdir():
        m = _MIGRATION.match(entry.name)
        if m:
            found.append(Migration(int(m.group(1)), entry.name, entry.read_text(encoding="utf-8")))
    found.sort(key=lambda mig: mig.version)
    if [mig.version for mig in found] != list(range(1, len(found) + 1)):
        raise RuntimeError(f"fleetdb migrations are not numbered 1..N: {[m.name for m in found]}")
    return found


def latest_version() -> int:
    return len(migrations())


def safe_url(url: str) -> str:
    """The connection string as it may be printed: host, port, database and user only."""
    try:
        parts = conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "<unparsable --db>"
    keys = ("host", "port", "dbname", "user", "service")
    return " ".join(f"{k}={parts[k]}" for k in keys if parts.get(k))


def connection_string(url: str, *, password_file: str = "") -> str:
    """``url`` checked (no password in it) with the password from ``password_file`` added."""
    if not url:
        raise ConfigError("--db: empty; give a PostgreSQL URL, e.g. postgresql://user@host/fleet")
    try:
        parts = conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError as exc:
        raise ConfigError(f"--db: not a PostgreSQL connection string ({first_line(exc)})") from None
    if parts.get("password"):
        raise ConfigError(
            "--db: the URL holds a password; put it in a file (--db-password-file FILE, or "
            "PGPASSFILE) and leave it out of the URL"
        )
    if password_file:
        from edge_agent.common.secrets import read_secret

        parts["password"] = read_secret(password_file, what="--db-password-file")
    parts.setdefault("application_name", "edgectl")
    parts.setdefault("connect_timeout", "10")
    return conninfo.make_conninfo("", **parts)


def connect(url: str, *, password_file: str = "", autocommit: bool = False) -> psycopg.Connection:
    """A connection, or DatabaseError naming the database (never the password) and why."""
    dsn = connection_string(url, password_file=password_file)
    try:
        return psycopg.connect(dsn, autocommit=autocommit)
    except psycopg.Error as exc:
        raise DatabaseError(
            f"database {safe_url(url)}: cannot connect: {first_line(exc)}"
        ) from None


def current_version(conn: psycopg.Connection) -> int:
    """The schema version of the database (0: never migrated)."""
    rows = execute(conn, "SELECT to_regclass('schema_version') IS NOT NULL")
    if not rows or not rows[0][0]:
        return 0
    got = execute(conn, "SELECT coalesce(max(version), 0) FROM schema_version")
    return int(got[0][0]) if got else 0


def migrate(conn: psycopg.Connection, *, retention_days: float = 0.0) -> list[str]:
    """Bring the schema up to this edgectl's version; the names of the migrations applied.
    Raises DatabaseError when the database's schema is newer than this edgectl's."""
    shipped = migrations()
    applied: list[str] = []
    try:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_version (version integer PRIMARY KEY, "
                "name text NOT NULL, applied timestamptz NOT NULL DEFAULT now())"
            )
            have = current_version(conn)
            if have > len(shipped):
                raise DatabaseError(
                    f"database schema version {have} is newer than this edgectl's "
                    f"({len(shipped)}): upgrade edgectl"
                )
            for mig in shipped[have:]:
                conn.execute(mig.sql.encode())
                conn.execute(
                    "INSERT INTO schema_version (version, name) VALUES (%s, %s)",
                    (mig.version, mig.name),
                )
                applied.append(mig.name)
            _timescale(conn, retention_days=retention_days)
    except psycopg.Error as exc:
        raise DatabaseError(f"database migration failed: {first_line(exc)}") from None
    for name in applied:
        log.info("fleetdb: applied %s", name)
    return applied


def check_version(conn: psycopg.Connection) -> None:
    """For readers (status, export, history): the schema must be there and not newer."""
    have, want = current_version(conn), latest_version()
    if have == 0:
        raise DatabaseError(
            "the database has no fleet schema yet: start the collector once "
            "(edgectl collect fleet --db …), it creates it"
        )
    if have > want:
        raise DatabaseError(
            f"database schema version {have} is newer than this edgectl's ({want}): upgrade edgectl"
        )


def connect_checked(url: str, *, password_file: str = "") -> psycopg.Connection:
    """A connection (autocommit) to a fleet database whose schema this edgectl can read
    (:func:`check_version`); closed again when it cannot."""
    conn = connect(url, password_file=password_file, autocommit=True)
    try:
        check_version(conn)
    except BaseException:
        conn.close()
        raise
    return conn


def timescale_installed(conn: psycopg.Connection) -> bool:
    row = conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'timescaledb'").fetchone()
    return row is not None


def _timescale(conn: psycopg.Connection, *, retention_days: float) -> None:
    """Hypertables (and retention) when TimescaleDB is installed in this database.

    UNTESTED: no TimescaleDB on the machine the tests run on. The primary keys already hold
    ``time`` (a hypertable's unique indexes must), so the conversion needs no other change."""
    if not timescale_installed(conn):
        return
    for table in STREAM_TABLES:
        conn.execute(
            "SELECT create_hypertable(%s, 'time', if_not_exists => TRUE, migrate_data => TRUE)",
            (table,),
        )
        if retention_days > 0:
            conn.execute(
                "SELECT add_retention_policy(%s, %s::interval, if_not_exists => TRUE)",
                (table, f"{retention_days} days"),
            )


#: Rows per heap page assumed for a table without statistics (never analyzed): the most an
#: 8 kB page holds (MaxHeapTuplesPerPage), so a window never holds many more than ``batch``.
_MAX_ROWS_PER_PAGE = 291


def prune_query(table: str) -> sql.Composed:
    """One batch of :func:`prune`: at most ``limit`` rows of ``table`` older than ``cutoff``,
    in the pages from ``first`` up to (not including) ``end`` (``'(page,0)'`` TIDs). A TID
    range scan reads only those pages (``tests/test_fleetdb.py`` checks the plan)."""
    return sql.SQL(
        "DELETE FROM {t} WHERE ctid = ANY(ARRAY(SELECT ctid FROM {t} "
        "WHERE ctid >= %(first)s::tid AND ctid < %(end)s::tid AND time < %(cutoff)s "
        "LIMIT %(limit)s))"
    ).format(t=sql.Identifier(table))


def prune(conn: psycopg.Connection, *, retention_days: float, batch: int = 50_000) -> int:
    """Without TimescaleDB: delete the stream rows older than ``retention_days`` (by the
    device's time); the number of rows deleted. With TimescaleDB its retention policy does
    this (nothing here).

    Every transaction deletes at most ``batch`` rows and commits, so none holds its locks for
    long; ``conn`` (autocommit or not) must therefore not be inside a transaction. Each table
    is walked once, a window of pages (about ``batch`` rows by its statistics) at a time: a
    batch never scans again what earlier batches emptied, so a large backlog costs a pass over
    the table, not one per batch. Pages added while it runs hold rows received meanwhile;
    older rows that arrive late go at the next prune."""
    if conn.info.transaction_status in (TransactionStatus.INTRANS, TransactionStatus.INERROR):
        raise DatabaseError("database retention: the connection is inside a transaction")
    if retention_days <= 0:
        return 0
    deleted = 0
    try:
        with conn.transaction():
            if timescale_installed(conn):
                return 0
            cutoff = execute(conn, "SELECT now() - make_interval(secs => %s)",
                             (retention_days * 86400.0,))[0][0]  # fmt: skip
            sizes = {
                table: execute(
                    conn,
                    "SELECT pg_relation_size(oid) / current_setting('block_size')::int, "
                    "CASE WHEN relpages > 0 AND reltuples > 0 THEN reltuples / relpages END "
                    "FROM pg_class WHERE oid = %s::regclass",
                    (table,),
                )[0]
                for table in STREAM_TABLES
            }
        for table, (pages, per_page) in sizes.items():
            window = max(1, int(batch / (per_page or _MAX_ROWS_PER_PAGE)))
            if conn.info.server_version < 140000:  # no TID range scan: one window, as before
                window = max(pages, 1)
            query = prune_query(table)
            for first in range(0, pages, window):
                params = {"first": f"({first},0)", "end": f"({first + window},0)",
                          "cutoff": cutoff, "limit": batch}  # fmt: skip
                while True:  # the window again until a batch finds fewer than it may take
                    with conn.transaction():
                        n = conn.execute(query, params).rowcount
                    deleted += max(n, 0)
                    if n < batch:
                        break
    except psycopg.Error as exc:
        raise DatabaseError(f"database retention failed: {first_line(exc)}") from None
    return deleted


def execute(conn: psycopg.Connection, query: Any, params: Any = None) -> list[tuple[Any, ...]]:
    """A query's rows, or DatabaseError with the server's one-line reason."""
    try:
        return conn.execute(query, params).fetchall()
    except psycopg.Error as exc:
        raise DatabaseError(f"database query failed: {first_line(exc)}") from None
