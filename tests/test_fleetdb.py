"""The fleet collector (issue 17): MQTT streams into PostgreSQL, exactly once.

Against the PostgreSQL on 127.0.0.1:5432 (trust auth, user ``postgres``: this module creates a
uniquely named database and drops it) and a real Mosquitto (``tests.broker``), with simulated
devices publishing real protocol payloads (``edgectl.simulate``) and ``edgectl collect fleet``
run as a real process (killed with SIGKILL where the test says so).
"""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import psycopg
import pytest
from psycopg.pq import TransactionStatus

from converters.demo_broker import free_port
from edge_agent.errors import CtlExit, DatabaseError
from edge_agent.fleet.mqtt import BrokerSettings
from edge_agent.fleet.protocol import SCHEMAS, Topics
from edgectl import simulate
from edgectl.fleetdb import db, queries
from edgectl.fleetdb.rows import Rejected, content_seq, to_row
from tests.broker import Broker, Collector, make_tls_material
from tests.fleet import (
    EDGECTL,
    CollectorProcess,
    Database,
    admin_connection,
    checkout_env,
    doc_steps,
    edgectl,
    wait_until,
)

#: Queued messages per offline session: the default (1000) would drop what a killed collector
#: misses. docs/fleet.md asks the same of a production broker.
BROKER_CONF = "max_queued_messages 1000000"


@pytest.fixture(scope="module")
def database() -> Iterator[Database]:
    d = Database()
    with d.connect() as conn:
        db.migrate(conn)
    yield d
    d.drop()


@pytest.fixture(scope="module")
def fleet_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    with Broker(tmp_path_factory.mktemp("fleetdb-broker"), extra_conf=BROKER_CONF) as b:
        yield b


def ctl(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """``edgectl ARGV`` in this process (the exit code, stdout, stderr): the CLI's own paths
    without a second Python start each."""
    from edgectl.cli import main

    code = main(["--broker", "mqtt://127.0.0.1:1", *argv])
    got = capsys.readouterr()
    return code, got.out, got.err


def on(broker: Broker) -> BrokerSettings:
    """The broker settings of ``broker`` (anonymous, plain MQTT) for a Simulator."""
    return BrokerSettings(url=broker.url)


def rows_of(database: Database, table: str, stem: str) -> list[tuple[str, int]]:
    with database.connect() as conn:
        got = conn.execute(
            f"SELECT device, seq FROM {table} WHERE device LIKE %s ORDER BY device, seq",
            (stem + "-%",),
        ).fetchall()
    return [(d, s) for d, s in got]


def expected_keys(devices: list[str], count: int, every: int) -> list[tuple[str, int]]:
    """The (device, seq) a Simulator of ``devices`` sends, ``count`` telemetry each, one
    message every ``every`` of them (events' phases spread over the fleet)."""
    return sorted((d, s) for i, d in enumerate(devices) for s in range(count)
                  if simulate.has_event(s, i, every))  # fmt: skip


# --- rows -------------------------------------------------------------------------------------


def test_simulate_for_a_duration_reports_what_the_broker_acknowledged(tmp_path: Path) -> None:
    """``--duration`` stops mid-period, with messages still in paho's queue: they are
    acknowledged before the disconnect, so ``published`` is what the broker took. Events come
    with phases spread over the fleet (a quarter of the devices each period, not all in one)."""
    with Broker(tmp_path / "broker") as broker:
        done = edgectl("simulate", "--devices", "400", "--rate", "4", "--duration", "2",
                       "--events-every", "4", "--connections", "2", broker=broker.url)  # fmt: skip
    assert done.returncode == 0, done.stderr
    stats = json.loads(done.stdout.strip().splitlines()[-1])
    assert stats["published"]["telemetry"] >= 400 * 4, stats
    assert stats["acked"] == sum(stats["published"].values()), stats
    assert stats["refused"] == stats["failed"] == 0, stats
    assert [sum(simulate.has_event(seq, i, 4) for i in range(400)) for seq in range(8)] == [100] * 8


def _secret(path: Path, text: str) -> Path:
    path.write_text(text + "\n")
    path.chmod(0o600)
    return path


def test_simulate_logs_in_with_the_edgectl_credentials_and_stops_when_refused(
    tmp_path: Path,
) -> None:
    """A broker with a password file: a wrong password is the broker's refusal, one line and
    exit 5 (nothing published); the right one (``--username``/``--password-file``, as every
    edgectl command takes them) gets every message to a subscriber."""
    count, devices = 3, 4
    with Broker(tmp_path / "broker", users={"sim": "right", "ops": "ops"}) as broker:
        wrong = _secret(tmp_path / "wrong", "guess")
        refused = edgectl("--username", "sim", "--password-file", str(wrong), "simulate",
                          "--devices", str(devices), "--rate", "20", "--count", str(count),
                          broker=broker.url)  # fmt: skip
        assert refused.returncode == CtlExit.BROKER, (refused.returncode, refused.stderr)
        assert refused.stderr.count("\n") == 1, refused.stderr
        assert f"error: mqtt {broker.url}: broker refused the connection:" in refused.stderr
        assert "guess" not in refused.stderr and refused.stdout == ""
        right = _secret(tmp_path / "right", "right")
        with Collector(broker, ["edge/+/telemetry"], username="ops", password="ops") as seen:
            done = edgectl("--username", "sim", "--password-file", str(right), "simulate",
                           "--devices", str(devices), "--rate", "20", "--count", str(count),
                           "--connections", "2", broker=broker.url)  # fmt: skip
            assert done.returncode == 0, done.stderr
            msgs = seen.wait_for(lambda m: len(m) >= devices * count, timeout=10)
    stats = json.loads(done.stdout.strip().splitlines()[-1])
    assert stats["published"]["telemetry"] == devices * count, stats
    assert stats["acked"] == sum(stats["published"].values()) and stats["failed"] == 0, stats
    assert sorted({m.topic for m in msgs}) == [Topics(d).telemetry
                                               for d in simulate.device_names(devices)]  # fmt: skip


def test_simulate_over_tls_with_a_client_certificate(tmp_path: Path) -> None:
    """``mqtts://`` with ``--ca-file``, ``--cert-file`` and ``--key-file``, as for every edgectl
    command: the simulated devices' messages arrive over TLS."""
    tls = make_tls_material(tmp_path / "tls")
    with Broker(tmp_path / "broker", tls=tls) as broker:
        assert broker.url.startswith("mqtts://")
        with Collector(broker, ["edge/+/telemetry"]) as seen:
            done = edgectl("--ca-file", str(tls.ca_cert), "--cert-file", str(tls.client_cert),
                           "--key-file", str(tls.client_key), "simulate", "--devices", "2",
                           "--rate", "20", "--count", "3", broker=broker.url)  # fmt: skip
            assert done.returncode == 0, done.stderr
            seen.wait_for(lambda m: len(m) >= 6, timeout=10)
        untrusted = edgectl("simulate", "--devices", "1", "--count", "1", broker=broker.url)
    assert untrusted.returncode == CtlExit.BROKER and untrusted.stderr.count("\n") == 1, (
        untrusted.stderr
    )
    assert "TLS handshake failed" in untrusted.stderr, untrusted.stderr


def test_simulated_payloads_follow_the_protocol_and_become_typed_rows() -> None:
    now = 1_800_000_000.25
    tel = simulate.telemetry_payload("cam-1", 7, now, 60.0, drift=3.4)
    for name, payload in (
        ("telemetry", tel), ("result", simulate.result_payload(3, now)),
        ("status", simulate.status_payload("cam-1", now)),
        ("reported", simulate.reported_payload("cam-1", now)),
        ("event", simulate.event_payload("cam-1", 9, now)),
    ):  # fmt: skip
        jsonschema.validate(payload, SCHEMAS[name])
    row = to_row("cam-1", "telemetry", json.dumps(tel).encode())
    assert (row.device, row.seq, row.time.timestamp()) == ("cam-1", 7, now)
    assert row.column("fps") == tel["pipeline"]["fps"]
    assert row.column("p95_ms") == tel["pipeline"]["latency_ms"]["inference"]["p95"]
    assert (row.column("drift_input"), row.column("drifted")) == (3.4, True)
    assert row.column("model_version") == "1.4.2"
    event = to_row("cam-1", "events", json.dumps(simulate.event_payload("cam-1", 9, now)).encode())
    assert (event.seq, event.column("kind")) == (9, "drift")
    # no seq of its own: one derived from the bytes, the same for the same bytes
    status = json.dumps(simulate.status_payload("cam-1", now)).encode()
    assert to_row("cam-1", "status", status).seq == content_seq(status) == content_seq(status)
    assert content_seq(status) != content_seq(status.replace(b"online", b"stopped"))
    assert 0 <= content_seq(status) < 2**63


@pytest.mark.parametrize(
    ("stream", "payload", "reason"),
    [
        ("telemetry", b"{not json", "not JSON"),
        ("telemetry", b"[1, 2]", "expected a JSON object"),
        ("telemetry", b'{"ts": 1800000000}', "seq None"),
        ("events", b'{"seq": -1, "ts": 1800000000}', "seq -1"),
        ("telemetry", b'{"seq": 1}', "ts None"),
        ("results", b'{"seq": 1, "ts": 1800000000}', "result_ts None"),
        ("status", b'{"state": "online", "ts": "yesterday"}', "ts 'yesterday'"),
        ("events", b'{"seq": 1, "ts": 1800000000, "reason": "a\\u0000b"}', "u0000"),
        ("events", b'{"seq": 1, "ts": 1800000000, "details": {"r": "a\\ud800"}}', "surrogate"),
    ],
)
def test_a_message_without_a_key_is_rejected_with_its_reason(
    stream: str, payload: bytes, reason: str
) -> None:
    with pytest.raises(Rejected, match=re.escape(reason)):
        to_row("cam-1", stream, payload)


# --- the schema -------------------------------------------------------------------------------


def test_migrations_apply_once_race_safely_and_refuse_a_newer_schema() -> None:
    fresh = Database()
    try:
        results: list[Any] = []

        def migrate() -> None:
            try:
                with fresh.connect() as conn:
                    results.append(db.migrate(conn))
            except Exception as exc:  # collected: the assertion below shows it
                results.append(exc)

        threads = [threading.Thread(target=migrate) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert sorted(map(str, results)) == sorted([str(["0001_streams.sql"]), "[]", "[]"]), (
            results
        )  # two collectors starting together: one migrates, the others wait
        assert fresh.scalar("SELECT count(*) FROM schema_version") == db.latest_version()
        with fresh.connect() as conn:
            assert db.migrate(conn) == []
            conn.execute("INSERT INTO schema_version (version, name) VALUES (99, '0099_x.sql')")
            with pytest.raises(DatabaseError, match="schema version 99 is newer"):
                db.migrate(conn)
        run = edgectl("status", "--db", fresh.url)  # a real process: the real exit code
        assert run.returncode == CtlExit.DATABASE == 7, run.stderr
        assert run.stderr.strip().splitlines() == [
            "edgectl: error: database schema version 99 is newer than this edgectl's "
            f"({db.latest_version()}): upgrade edgectl"
        ]
    finally:
        fresh.drop()


def test_bad_database_options_are_one_line_errors(
    database: Database, capsys: pytest.CaptureFixture[str]
) -> None:
    cases = [
        (["status", "--db", "postgresql://postgres@127.0.0.1:1/x"], 7, "cannot connect"),
        (["history", "cam-1", "--db", "postgresql://postgres:secret@127.0.0.1/x"], 2,
         "holds a password"),
        (["history", "cam-1", "--db", database.url, "--metric", "fps,bogus"], 2, "--metric"),
        (["history", "cam-1", "--db", database.url, "--since", "soon"], 2, "--since 'soon'"),
        (["collect", "fleet"], 2, "--db URL is required"),
        (["collect", "fleet", "--db", database.url, "--out", "x"], 2, "are for samples"),
        (["collect", "fleet", "--db", database.url, "--retire"], 2, "with --client-id"),
        (["collect"], 2, "--out DIR is required"),
        (["export", "--since", "2h"], 2, "add --db"),
        (["collect", "fleet", "--db", database.url, "--share-group", "no/slash"], 2,
         "--share-group 'no/slash'"),
    ]  # fmt: skip
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    cases.append((["collect", "fleet", "--db", database.url, "--prometheus",
                   str(taken.getsockname()[1])], 2, "cannot listen on 127.0.0.1"))  # fmt: skip
    for argv, code, message in cases:
        got, _, err = ctl(capsys, *argv)
        assert got == code, (argv, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], (argv, err)
        assert "secret" not in err
    taken.close()


# --- the collector ----------------------------------------------------------------------------


def test_every_message_is_stored_exactly_once(
    fleet_broker: Broker, database: Database, tmp_path: Path
) -> None:
    """Telemetry, events, results, status and reported of 20 simulated devices, then 120 of
    the same messages delivered again: one row each; the Prometheus endpoint says so."""
    port = free_port()
    collector = CollectorProcess(tmp_path, fleet_broker, database, "once-1", "--results",
                                 "--prometheus", str(port), group="once")  # fmt: skip
    collector.start()
    try:
        devices = simulate.device_names(20, stem="once")
        sim = simulate.Simulator(
            on(fleet_broker), devices, rate=20, count=12, events_every=3,
            results_every=2, client_id="sim-once",
        )  # fmt: skip
        with sim:
            assert sim.wait(60)
        total = sum(sim.published().values())
        assert total == 20 * (2 + 12 + 4 + 6)
        wait_until(
            lambda: (
                len(rows_of(database, "telemetry", "once")) == 240
                and len(rows_of(database, "results", "once")) == 120
            ),
            timeout=30.0,
            what="every telemetry row",
        )
        # at-least-once: the same messages again (read back from the table: same device, seq
        # and time), on their topics, as a broker redelivering would
        with database.connect() as conn:
            again = conn.execute(
                "SELECT device, payload FROM telemetry WHERE device LIKE 'once-%' "
                "ORDER BY seq, device LIMIT 120"
            ).fetchall()
        with Collector(fleet_broker, client_id="redeliver") as pub:
            for device, payload in again:
                pub.publish(Topics(device).telemetry, json.dumps(payload))
        time.sleep(0.3)
        metrics = ""

        def scraped() -> bool:
            nonlocal metrics
            metrics = (
                urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5)
                .read()
                .decode()
            )
            return 'edge_collector_duplicates_total{stream="telemetry"} 120.0' in metrics

        wait_until(what="120 duplicates counted", timeout=30.0, predicate=scraped)
        totals = collector.stop()
    finally:
        collector.close()
    assert rows_of(database, "telemetry", "once") == expected_keys(devices, 12, 1)
    assert rows_of(database, "events", "once") == expected_keys(devices, 12, 3)
    assert rows_of(database, "results", "once") == expected_keys(devices, 12, 2)
    for table in ("status", "reported"):
        assert [d for d, _ in rows_of(database, table, "once")] == devices
    assert database.scalar("SELECT count(*) FROM devices WHERE device LIKE 'once-%'") == 20
    assert totals["messages"] == total + 120 and totals["duplicates"] == 120, totals
    assert totals["rows"] == total and totals["rejected"] == 0, totals
    assert 'edge_fleet_fps{device="once-0007"}' in metrics
    assert 'edge_collector_rows_total{stream="telemetry"} 240.0' in metrics
    assert re.search(r'edge_fleet_last_seen_seconds\{device="once-0000"\} 1\.\d+e\+09', metrics)
    assert "edge_collector_batch_seconds_count" in metrics


def test_a_collector_killed_mid_stream_loses_and_duplicates_nothing(
    fleet_broker: Broker, database: Database, tmp_path: Path
) -> None:
    # a share group per test: a stopped collector's session keeps its share (see docs/fleet.md)
    collector = CollectorProcess(tmp_path, fleet_broker, database, "kill-1", group="kill")
    collector.start()
    devices = simulate.device_names(25, stem="kill")
    sim = simulate.Simulator(on(fleet_broker), devices, rate=12, count=40,
                             events_every=4, client_id="sim-kill").start()  # fmt: skip
    try:
        wait_until(
            what="rows arriving",
            timeout=30.0,
            predicate=lambda: len(rows_of(database, "telemetry", "kill")) >= 150,
        )
        collector.kill()  # SIGKILL, mid-stream: some messages received, not yet committed
        killed_at = len(rows_of(database, "telemetry", "kill"))
        assert killed_at < 1000, "the stream ended before the kill: nothing was tested"
        time.sleep(0.5)  # the stream goes on into the collector's session on the broker
        collector.start()
        assert sim.wait(60)
        wait_until(
            what="every row",
            timeout=30.0,
            predicate=lambda: len(rows_of(database, "telemetry", "kill")) == 1000,
        )
        totals = collector.stop()
    finally:
        sim.stop()
        collector.close()
    assert rows_of(database, "telemetry", "kill") == expected_keys(devices, 40, 1)
    assert rows_of(database, "events", "kill") == expected_keys(devices, 40, 4)
    # the restarted collector got the retained status again: stored once all the same
    for table in ("status", "reported"):
        assert [d for d, _ in rows_of(database, table, "kill")] == devices
    assert totals["rejected"] == 0 and totals["duplicates"] >= 50, totals


def test_a_broker_restart_mid_batch_loses_and_duplicates_nothing(
    database: Database, tmp_path: Path
) -> None:
    """The broker restarts while a batch is received but not committed: the collector
    reconnects to its session, does not acknowledge the old connection's messages on the new
    one, and the broker's redelivery is stored once."""
    broker = Broker(tmp_path / "broker", extra_conf=BROKER_CONF).__enter__()
    collector = CollectorProcess(tmp_path, broker, database, "restart-1", "--batch-ms", "1500",
                                 group="restart")  # fmt: skip
    try:
        collector.start()
        devices = simulate.device_names(10, stem="restart")
        with simulate.Simulator(on(broker), devices, rate=50, count=20,
                                events_every=0, client_id="sim-restart") as sim:  # fmt: skip
            assert sim.wait(30)
        broker.restart()  # SIGTERM (it saves the sessions), then the same port again
        wait_until(
            what="every row",
            timeout=30.0,
            predicate=lambda: len(rows_of(database, "telemetry", "restart")) == 200,
        )
        time.sleep(0.5)
        totals = collector.stop()
    finally:
        collector.close()
        broker.stop()
    assert rows_of(database, "telemetry", "restart") == expected_keys(devices, 20, 1)
    assert [d for d, _ in rows_of(database, "status", "restart")] == devices
    assert totals["rejected"] == 0, totals


def test_two_collectors_in_a_share_group_split_the_load(database: Database, tmp_path: Path) -> None:
    # A broker of its own: Mosquitto 2.0 sends retained telemetry to a shared subscription when
    # it is made, so the other tests' devices would count in the shares.
    broker = Broker(tmp_path / "broker", extra_conf=BROKER_CONF).__enter__()
    pair = [CollectorProcess(tmp_path, broker, database, f"pair-{k}", group="pair")
            for k in range(2)]  # fmt: skip
    try:
        for c in pair:
            c.start()
        devices = simulate.device_names(30, stem="pair")
        with simulate.Simulator(on(broker), devices, rate=15, count=20,
                                events_every=5, client_id="sim-pair") as sim:  # fmt: skip
            assert sim.wait(60)
        wait_until(
            what="every row",
            timeout=30.0,
            predicate=lambda: len(rows_of(database, "telemetry", "pair")) == 600,
        )
        time.sleep(0.3)
        totals = [c.stop() for c in pair]
    finally:
        for c in pair:
            c.close()
        broker.stop()
    shares = [t["per_stream"].get("telemetry", 0) for t in totals]
    assert all(share > 0 for share in shares) and sum(shares) == 600, totals
    assert rows_of(database, "telemetry", "pair") == expected_keys(devices, 20, 1)
    assert rows_of(database, "events", "pair") == expected_keys(devices, 20, 5)
    # status and reported are read by both (retained): each stored once
    assert [d for d, _ in rows_of(database, "status", "pair")] == devices


def test_a_row_the_database_refuses_is_rejected_and_the_rest_are_stored(
    fleet_broker: Broker, database: Database
) -> None:
    """A trigger refuses one message (as a data error): the batch is split until that row is
    found; it is rejected and acknowledged, every other row is stored, and the collector
    goes on (in this process: FleetCollector itself)."""
    from edgectl.cli import broker_settings, build_parser
    from edgectl.collector import CollectorSettings, FleetCollector

    with database.connect() as conn:
        conn.execute(
            "CREATE FUNCTION refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            "IF NEW.device = 'poison-0001' AND NEW.seq = 3 THEN RAISE EXCEPTION 'poisoned' "
            "USING ERRCODE = 'data_exception'; END IF; RETURN NEW; END $$; "
            "CREATE TRIGGER refuse_poison BEFORE INSERT ON telemetry FOR EACH ROW "
            "EXECUTE FUNCTION refuse_poison()"
        )
    settings = CollectorSettings(db=database.url, share_group="poison", client_id="poison-1",
                                 batch_ms=300)  # fmt: skip
    args = build_parser().parse_args(["--broker", fleet_broker.url, "status"])
    collector = FleetCollector(settings, broker_settings(args))
    collector.startup()
    loop = threading.Thread(target=collector.main_loop)
    loop.start()
    try:
        devices = simulate.device_names(3, stem="poison")
        with simulate.Simulator(on(fleet_broker), devices, rate=20, count=6,
                                events_every=0, client_id="sim-poison") as sim:  # fmt: skip
            assert sim.wait(30)
        wait_until(
            what="the other rows",
            timeout=30.0,
            predicate=lambda: collector.totals.messages >= 3 * (6 + 2),
        )
    finally:
        collector.should_exit.set()
        loop.join(10)
        collector.shutdown()
    want = [key for key in expected_keys(devices, 6, 1) if key != ("poison-0001", 3)]
    assert rows_of(database, "telemetry", "poison") == want
    assert collector.totals.rejected == 1 and collector.totals.db_errors >= 1, collector.totals


def test_a_stopped_collector_keeps_its_share_until_retired(
    database: Database, tmp_path: Path
) -> None:
    """Mosquitto goes on giving a stopped collector's session its share; ``--retire`` stores
    what waits there and ends the session, after which the other collector gets everything."""
    broker = Broker(tmp_path / "broker", extra_conf=BROKER_CONF).__enter__()
    a, b = (CollectorProcess(tmp_path, broker, database, f"retire-{k}", group="retire")
            for k in "ab")  # fmt: skip
    devices = simulate.device_names(10, stem="retire")

    def publish(seq_start: int, count: int) -> None:
        with simulate.Simulator(on(broker), devices, rate=40, count=count,
                                events_every=0, seq_start=seq_start, retained_state=False,
                                client_id="sim-retire") as sim:  # fmt: skip
            assert sim.wait(30)

    try:
        a.start()
        b.start()
        a.stop()  # its session stays, subscribed
        publish(0, 20)  # a's share waits in its session
        run = edgectl("collect", "fleet", "--db", database.url, "--client-id", "retire-a",
                      "--share-group", "retire", "--retire", "--idle", "0.5",
                      broker=broker.url)  # fmt: skip
        assert run.returncode == 0, run.stderr
        # its share of the 200 (the broker alternates), beyond the 10 retained copies that
        # Mosquitto sends a shared subscription as it is made
        assert json.loads(run.stdout.splitlines()[-1])["per_stream"]["telemetry"] >= 60, run
        wait_until(
            what="a's share",
            timeout=30.0,
            predicate=lambda: len(rows_of(database, "telemetry", "retire")) == 200,
        )
        publish(20, 10)  # only b is left in the group
        wait_until(
            what="everything at b",
            timeout=30.0,
            predicate=lambda: len(rows_of(database, "telemetry", "retire")) == 300,
        )
        b.stop()
    finally:
        a.close()
        b.close()
        broker.stop()
    assert rows_of(database, "telemetry", "retire") == expected_keys(devices, 30, 1)


# --- reading it back --------------------------------------------------------------------------


HIST_T0 = 1_790_000_000


@pytest.fixture(scope="module")
def long_run(database: Database) -> list[str]:
    """100 devices, 500 telemetry rows each a minute apart (8 h 20 min), made in SQL: the
    planner sees one device as 1 % of the table, as in a fleet. The payloads hold what status
    and export read (a subset of a real telemetry payload)."""
    devices = simulate.device_names(100, stem="hist")
    with database.connect() as conn:
        conn.execute(
            f"""
            INSERT INTO telemetry (device, seq, time, fps, p95_ms, cpu_percent, cpu_temp_c,
                                   drift_input, model_version, payload)
            SELECT d, s, to_timestamp({HIST_T0} + s * 60), 29.9, 4.8, 41.5, 54.2,
                   (s %% 50) / 10.0, '1.4.2',
                   jsonb_build_object('schema', 1, 'device', d, 'seq', s,
                       'ts', {HIST_T0} + s * 60, 'model', %s::jsonb,
                       'pipeline', jsonb_build_object('fps', 29.9, 'latency_ms',
                           '{{"inference": {{"p50": 3.0, "p95": 4.8, "p99": 6.9}}}}'::jsonb),
                       'system', '{{"cpu_percent": 41.5, "cpu_temp_c": 54.2}}'::jsonb)
            FROM unnest(%s::text[]) AS d, generate_series(0, 499) AS s
            """,
            (json.dumps(simulate.MODEL), devices),
        )  # fmt: skip
        conn.execute(
            "INSERT INTO devices SELECT device, min(time), max(time) FROM telemetry "
            "WHERE device LIKE 'hist-%' GROUP BY device"
        )
        conn.execute("ANALYZE telemetry")
    return devices


def test_history_of_one_device_is_an_index_range_scan(
    database: Database, long_run: list[str]
) -> None:
    device = long_run[42]
    since, until = HIST_T0, HIST_T0 + 86_400.0
    with database.connect() as conn:
        params = (device, queries.utc(since), queries.utc(until), 100_000)
        plan = queries.explain(conn, queries.history_query(["fps", "p95"]), params)
        assert "Index Scan using telemetry_pkey" in plan and "Seq Scan" not in plan, plan
        t0 = time.perf_counter()
        rows = queries.history(conn, device, since=since, until=until, metrics=["fps", "p95"])
        took = time.perf_counter() - t0
    assert [r["seq"] for r in rows] == list(range(500))
    assert took < 5.0  # generous; the bench's target (0.2 s at 10,000 devices) is timed there


def test_history_status_and_export_read_the_database(
    database: Database, long_run: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    device = long_run[5]
    db_ = ["--db", database.url]
    window = ["--since", "2026-09-21T14:13:20", "--until", str(HIST_T0 + 600)]  # 10 minutes
    code, out, err = ctl(capsys, "history", device, *db_, *window, "--metric", "fps,drift",
                         "--format", "json")  # fmt: skip
    assert code == 0, err
    rows = json.loads(out)
    assert [r["seq"] for r in rows] == list(range(10))
    assert set(rows[0]) == {"time", "seq", "fps", "drift"} and rows[3]["drift"] == 0.3
    assert rows[0]["time"] == "2026-09-21T14:13:20+00:00"
    code, out, _ = ctl(capsys, "history", device, *db_, *window, "--format", "csv")
    assert out.splitlines()[0] == "time,seq,fps,p95,cpu,temp,drift,model"
    assert len(out.splitlines()) == 11
    code, out, _ = ctl(capsys, "history", device, *db_, *window, "--metric", "p95,model")
    assert code == 0 and out.rstrip().endswith("10 rows") and "1.4.2" in out, out

    export = tmp_path / "export.csv"
    code, _, err = ctl(capsys, "export", *db_, *window, "--device", device, "--format", "csv",
                       "-o", str(export))  # fmt: skip
    assert code == 0, err
    lines = export.read_text().splitlines()
    assert lines[0].startswith("device,seq,ts,") and len(lines) == 11
    assert lines[1].startswith(f"{device},0,{HIST_T0}")

    code, out, err = ctl(capsys, "status", *db_, "--json")
    assert code == 0, err
    status = {r["device"]: r for r in json.loads(out)}
    assert set(long_run) <= set(status)
    assert status[device]["model"] == "resnet-small 1.4.2" and status[device]["fps"] > 29


# --- the dashboards ---------------------------------------------------------------------------

GRAFANA = Path(__file__).resolve().parents[1] / "deploy" / "grafana"
_GROUP = re.compile(r"\$__timeGroupAlias\((\w+),\s*\$__interval\)")
_FILTER = re.compile(r"\$__timeFilter\((\w+)\)")


def grafana_sql(text: str, *, device: str) -> str:
    """A dashboard query with Grafana's macros and variables put in, as Grafana would for
    the last 1,000 days and a 1-minute interval."""
    text = _GROUP.sub(r"""to_timestamp(floor(extract(epoch FROM \1) / 60) * 60) AS "time\"""", text)
    text = _FILTER.sub(r"\1 BETWEEN now() - interval '1000 days' AND now()", text)
    text = text.replace("$device", device)
    assert "$" not in text, f"a macro or variable the test does not know: {text}"
    return text


def test_every_dashboard_query_runs_against_the_schema(
    database: Database, long_run: list[str]
) -> None:
    """So a dashboard can never query a column that does not exist."""
    datasource = (GRAFANA / "provisioning/datasources/edge-fleet.yaml").read_text()
    assert "uid: edge-fleet" in datasource and "type: grafana-postgresql-datasource" in datasource
    queries_run = 0
    dashboards = sorted((GRAFANA / "dashboards").glob("*.json"))
    assert {p.stem for p in dashboards} == {"fleet-overview", "device", "rollouts", "drift"}
    with database.connect() as conn:
        conn.execute("SET statement_timeout = '10s'")
        for path in dashboards:
            board = json.loads(path.read_text())
            assert board["uid"].startswith("edge-fleet") and board["panels"], path
            texts = [v["query"] for v in board["templating"]["list"]]
            for p in board["panels"]:
                assert p["datasource"]["uid"] == "edge-fleet", (path.name, p["title"])
                texts += [t["rawSql"] for t in p["targets"]]
            for text in texts:
                try:
                    conn.execute(grafana_sql(text, device=long_run[3]).encode()).fetchall()
                except psycopg.Error as exc:
                    raise AssertionError(f"{path.name}: {exc}\n{text}") from None
                queries_run += 1
    assert queries_run >= 25


# --- docs/fleet.md ----------------------------------------------------------------------------

FLEET_DOC = Path(__file__).resolve().parents[1] / "docs" / "fleet.md"


def _wait_for_simulated(database: str, line: str) -> None:
    want = 1
    for flag in ("--devices", "--count"):
        found = re.search(flag + r" (\d+)", line)
        assert found, line
        want *= int(found.group(1))
    with psycopg.connect(f"host=127.0.0.1 user=postgres dbname={database}") as conn:
        query = "SELECT count(*) FROM telemetry"
        wait_until(
            what="the simulated telemetry",
            timeout=30.0,
            predicate=lambda: conn.execute(query).fetchone() == (want,),
        )


def test_the_fleet_doc_steps_run_as_written(tmp_path: Path) -> None:
    """Each line as written, in a shell, but on this test's broker port, database and
    Prometheus port; a line ending in ``&`` runs in the background (stopped at the end)."""
    steps = doc_steps("## From an empty PostgreSQL to a dashboard", doc=FLEET_DOC)
    assert len(steps) == 6 and steps[0].startswith("psql") and steps[1].endswith("&"), steps
    name = f"edge_test_{uuid.uuid4().hex[:12]}"
    port = str(free_port())
    venv_bin = str(Path(EDGECTL).parent)
    env = checkout_env()
    env["PATH"] = f"{venv_bin}:{env.get('PATH', '')}"
    outputs: list[str] = []
    background: subprocess.Popen[str] | None = None
    with Broker(tmp_path / "broker", extra_conf=BROKER_CONF) as broker:
        try:
            for line in steps:
                line = (line.replace("127.0.0.1:1883", f"127.0.0.1:{broker.port}")
                        .replace("/fleet", f"/{name}").replace("DATABASE fleet", f"DATABASE {name}")
                        .replace("9108", port))  # fmt: skip
                if line.endswith("&"):
                    log = tmp_path / "collector.log"
                    with log.open("w") as err:
                        background = subprocess.Popen(
                            ["bash", "-c", f"exec {line[:-1]}"], stdout=subprocess.PIPE,
                            stderr=err, text=True, env=env, cwd=tmp_path,
                        )  # fmt: skip
                    wait_until(
                        what="the collector",
                        timeout=30.0,
                        predicate=lambda: "collecting as" in log.read_text(),  # noqa: B023
                    )
                    continue
                run = subprocess.run(["bash", "-c", line], capture_output=True, text=True,
                                     env=env, cwd=tmp_path, timeout=60)  # fmt: skip
                assert run.returncode == 0, (line, run.stdout, run.stderr)
                outputs.append(run.stdout)
                if " simulate " in line:  # let the collector commit what was just acknowledged
                    _wait_for_simulated(name, line)
        finally:
            if background is not None:
                background.send_signal(signal.SIGTERM)
                background.communicate(timeout=30)
            with admin_connection() as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    assert background is not None and background.returncode == 0
    _create, simulated, status, history, metrics = outputs
    assert json.loads(simulated)["acked"] == 20 * (2 + 10 + 2)
    assert status.rstrip().endswith("20 devices, 20 online"), status
    assert history.rstrip().endswith("10 rows") and "sim-0007" not in history, history
    assert history.splitlines()[0].split() == ["time", "seq", "fps", "p95", "drift"]
    assert metrics.startswith('edge_fleet_fps{device="sim-0007"} 29.')


@pytest.fixture
def own_database() -> Iterator[Database]:
    """A migrated database of the test's own, for retention: the module's holds other tests'
    rows of fixed dates (``long_run``), which age past any limit as the calendar moves on."""
    d = Database()
    try:
        with d.connect() as conn:
            db.migrate(conn)
        yield d
    finally:
        d.drop()


def test_retention_deletes_old_rows_from_plain_tables(own_database: Database) -> None:
    """``--retention-days`` without TimescaleDB, on a connection like the collector's (not in
    autocommit mode): rows older than the limit (by the device's time) go, in batches of at
    most ``batch`` rows, each committed (another session sees them gone, and the connection is
    left outside any transaction, so the collector's next batch write commits too); newer rows
    and other devices' stay. The old rows are spread over pages of newer ones (padded
    payloads: a few rows a page), so the batches walk many windows of pages."""
    with own_database.connect() as conn:
        conn.execute(
            "INSERT INTO telemetry (device, seq, time, payload) "
            "SELECT 'ret-1', s, now() - make_interval(days => CASE WHEN s % 2 = 0 THEN 10 "
            "ELSE 1 END), jsonb_build_object('pad', repeat('x', 900)) "
            "FROM generate_series(1, 200) AS s"
        )
        conn.execute(
            "INSERT INTO events (device, seq, time, payload) VALUES "
            "('ret-1', 1, now() - interval '30 days', '{}'), ('ret-2', 1, now(), '{}')"
        )
        conn.execute("ANALYZE telemetry")
        # which transaction deleted each row
        conn.execute(
            "CREATE TABLE pruned (xid text NOT NULL); "
            "CREATE FUNCTION note_prune() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            "INSERT INTO pruned VALUES (pg_current_xact_id()::text); RETURN OLD; END $$; "
            "CREATE TRIGGER note_prune AFTER DELETE ON telemetry FOR EACH ROW "
            "EXECUTE FUNCTION note_prune()"
        )
        pages = conn.execute("SELECT relpages FROM pg_class WHERE relname = 'telemetry'")
        assert pages.fetchone()[0] >= 20  # type: ignore[index]
    conn = db.connect(own_database.url)  # as the collector's: autocommit off
    try:
        assert db.prune(conn, retention_days=0) == 0  # 0: keep everything
        assert db.prune(conn, retention_days=5, batch=2) == 100 + 1
        assert conn.info.transaction_status is TransactionStatus.IDLE
        with conn.transaction(), pytest.raises(DatabaseError, match="inside a transaction"):
            db.prune(conn, retention_days=5)
    finally:
        conn.close()  # without a commit of its own
    with own_database.connect() as conn:
        kept = conn.execute("SELECT seq FROM telemetry ORDER BY seq").fetchall()
        events = conn.execute("SELECT device FROM events").fetchall()
        per_xact = conn.execute(
            "SELECT max(n), count(*) FROM (SELECT count(*) AS n FROM pruned GROUP BY xid) AS x"
        ).fetchone()
    assert [k for (k,) in kept] == list(range(1, 201, 2)) and events == [("ret-2",)]
    assert per_xact is not None and per_xact[0] <= 2 and per_xact[1] >= 50, per_xact


def test_a_prune_batch_reads_only_its_window_of_pages(
    database: Database, long_run: list[str]
) -> None:
    """So a batch never scans again the pages earlier batches emptied (one per batch, it made
    a large backlog's prune quadratic)."""
    with database.connect() as conn:
        params = {"first": "(10,0)", "end": "(20,0)", "cutoff": queries.utc(HIST_T0),
                  "limit": 50_000}  # fmt: skip
        plan = queries.explain(conn, db.prune_query("telemetry"), params)
    assert "Tid Range Scan on telemetry" in plan and "Seq Scan" not in plan, plan


def test_a_collector_with_retention_prunes_and_commits_what_it_stores(
    fleet_broker: Broker, own_database: Database, tmp_path: Path
) -> None:
    """``collect fleet --retention-days``: the rows past the limit go at start, and every row
    it stores afterwards is committed (seen from another session), as without retention."""
    with own_database.connect() as conn:
        conn.execute(
            "INSERT INTO telemetry (device, seq, time, payload) "
            "VALUES ('prune-old', 1, now() - interval '30 days', '{}')"
        )
    collector = CollectorProcess(tmp_path, fleet_broker, own_database, "prune-1",
                                 "--retention-days", "5", group="prune")  # fmt: skip
    collector.start()
    try:
        devices = simulate.device_names(3, stem="prune")
        with simulate.Simulator(on(fleet_broker), devices, rate=20, count=4,
                                events_every=0, client_id="sim-prune") as sim:  # fmt: skip
            assert sim.wait(30)
        wait_until(
            what="every row, committed",
            timeout=30.0,
            predicate=lambda: len(rows_of(own_database, "telemetry", "prune")) == 12,
        )
        totals = collector.stop()
    finally:
        collector.close()
    # and prune-old (30 days old) gone
    assert rows_of(own_database, "telemetry", "prune") == expected_keys(devices, 4, 1)
    assert totals["rows"] >= 12 and totals["rejected"] == 0, totals
