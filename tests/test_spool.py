"""The store-and-forward spool on real SQLite files: order, acks, paging, sequence numbers across
restarts and SIGKILL, the size and queue bounds, durable events, a full disk, a corrupt file."""

from __future__ import annotations

import logging
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from edge_agent.errors import ConfigError
from edge_agent.fleet import spool as spool_module
from edge_agent.fleet.spool import Spool, SpooledMessage

REPO = Path(__file__).resolve().parents[1]

OpenSpool = Callable[..., Spool]


@pytest.fixture
def open_spool(tmp_path: Path) -> Iterator[OpenSpool]:
    """Open spools (default file ``tmp_path/spool.db``); every one is closed at teardown."""
    opened: list[Spool] = []

    def make(path: Path | None = None, **kwargs: Any) -> Spool:
        spool = Spool(path or tmp_path / "spool.db", **kwargs)
        opened.append(spool)
        return spool

    yield make
    for spool in opened:
        spool.close()


def all_pending(spool: Spool) -> list[SpooledMessage]:
    rows: list[SpooledMessage] = []
    while True:
        page = spool.pending(after_id=rows[-1].id if rows else 0, limit=1000)
        if not page:
            return rows
        rows.extend(page)


def db_rows(path: Path, where: str = "1") -> list[tuple[Any, ...]]:
    """(stream, seq, payload) of the rows on disk, read with a connection of our own."""
    with closing(sqlite3.connect(path)) as conn:
        return conn.execute(
            f"SELECT stream, seq, payload FROM messages WHERE {where} ORDER BY id"
        ).fetchall()


def run_child(code: str, *args: object, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_round_trip_in_order_across_streams(open_spool: OpenSpool) -> None:
    spool = open_spool()
    sent = []
    for i in range(9):
        stream = ("results", "telemetry", "events")[i % 3]
        payload = f"{stream}-{i}".encode()
        spool.put(
            stream,
            f"edge/d1/{stream}",
            payload,
            seq=spool.allocate_seq(stream),
            qos=0 if stream == "telemetry" else 1,
            retain=stream == "telemetry",
        )
        sent.append((stream, payload))
    spool.flush()
    rows = spool.pending()
    assert [(r.stream, r.payload) for r in rows] == sent
    assert [r.id for r in rows] == sorted(r.id for r in rows)
    assert rows[1].topic == "edge/d1/telemetry" and rows[1].qos == 0 and rows[1].retain
    assert rows[0].qos == 1 and not rows[0].retain
    assert spool.depth() == 9
    assert spool.size_bytes() == sum(len(p) for _, p in sent)

    spool.ack([rows[0].id, rows[4].id])
    assert [r.id for r in spool.pending()] == [r.id for r in rows if r.id not in {1, 5}]
    spool.flush()
    assert len(db_rows(spool.path)) == 7  # the rows are gone from the file too
    assert spool.depth() == 7
    assert spool.stats.acked == 2 and spool.stats.committed == 9
    spool.ack(r.id for r in rows)
    spool.flush()
    assert spool.pending() == [] and spool.depth() == 0 and spool.size_bytes() == 0


def test_a_batch_larger_than_one_insert_statement_keeps_its_order(
    open_spool: OpenSpool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(spool_module, "_MAX_ROWS_PER_INSERT", 7)
    spool = open_spool(commit_interval=30.0)
    for i in range(100):
        stream = ("results", "telemetry", "events")[i % 3]
        spool.put(stream, "t", b"%d" % i, seq=i)
    spool.flush()
    rows = all_pending(spool)
    assert [int(r.payload) for r in rows] == list(range(100))
    assert spool.stats.commits == 1
    assert [r.id for r in rows] == list(range(rows[0].id, rows[0].id + 100))


def test_pending_pages_by_after_id(open_spool: OpenSpool) -> None:
    spool = open_spool()
    for i in range(25):
        spool.put("results", "t", b"%d" % i, seq=i)
    spool.flush()
    pages = []
    after = 0
    while page := spool.pending(after_id=after, limit=10):
        pages.append([int(r.payload) for r in page])
        after = page[-1].id
    assert pages == [list(range(10)), list(range(10, 20)), list(range(20, 25))]


def test_ids_are_never_reused_after_everything_was_acked(open_spool: OpenSpool) -> None:
    spool = open_spool()
    spool.put("events", "e", b"a", seq=0)
    spool.flush()
    (first,) = spool.pending()
    spool.ack([first.id])
    spool.close()
    spool = open_spool()
    spool.put("events", "e", b"b", seq=1)
    spool.flush()
    (second,) = spool.pending()
    assert second.id > first.id  # a sender paging by after_id must not miss it


def test_seq_persists_across_close_and_reopen(open_spool: OpenSpool) -> None:
    spool = open_spool()
    for _ in range(5):
        spool.put("results", "r", b"x", seq=spool.allocate_seq("results"))
    spool.put("events", "e", b"x", seq=spool.allocate_seq("events"))
    for _ in range(3):  # allocated, never put: persisted with the next commit anyway
        spool.allocate_seq("telemetry")
    spool.flush()
    spool.ack(r.id for r in spool.pending())  # rows gone: the counters table remembers
    spool.close()
    spool = open_spool()
    assert spool.pending() == []
    assert [spool.allocate_seq(s) for s in ("results", "telemetry", "events")] == [5, 3, 1]


def test_seq_at_open_is_above_both_the_stored_counter_and_the_stored_rows(
    open_spool: OpenSpool,
) -> None:
    spool = open_spool()
    for i in range(10):
        spool.put("results", "r", b"x", seq=i)
    spool.put("events", "e", b"x", seq=3)
    spool.close()
    with closing(sqlite3.connect(spool.path)) as conn, conn:
        conn.execute("DELETE FROM counters WHERE stream = 'results'")  # a counter that lags
        conn.execute("UPDATE counters SET next_seq = 50 WHERE stream = 'events'")
    spool = open_spool()
    assert spool.next_seq("results") == 10  # from the rows
    assert spool.next_seq("events") == 50  # from the counter


@pytest.mark.parametrize("death", ["os._exit", "SIGKILL"])
def test_seq_survives_a_killed_process(tmp_path: Path, open_spool: OpenSpool, death: str) -> None:
    path = tmp_path / "spool.db"
    code = """
        import os, signal, sys
        from pathlib import Path
        from edge_agent.fleet.spool import Spool
        spool = Spool(Path(sys.argv[1]), commit_interval=5.0)
        for i in range(300):
            stream = ("results", "telemetry", "events")[i % 3]
            spool.put(stream, "t/" + stream, b"%d" % i, seq=spool.allocate_seq(stream))
        for _ in range(7):
            spool.allocate_seq("telemetry")
        spool.flush()
        if sys.argv[2] == "SIGKILL":
            os.kill(os.getpid(), signal.SIGKILL)
        os._exit(0)  # no close(): the writer thread dies with the process
    """
    proc = run_child(code, path, death)
    assert proc.returncode == (-signal.SIGKILL if death == "SIGKILL" else 0), proc.stderr
    spool = open_spool(path)
    rows = all_pending(spool)
    assert [int(r.payload) for r in rows] == list(range(300))
    for stream in ("results", "events"):
        assert [s for st, s, _ in db_rows(path) if st == stream] == list(range(100))
    assert spool.allocate_seq("results") == 100
    assert spool.allocate_seq("telemetry") == 107
    assert spool.next_seq("events") == 100


def test_sigkill_mid_stream_keeps_a_contiguous_prefix(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    interval = 0.1
    code = """
        import sys, time
        from pathlib import Path
        from edge_agent.fleet.spool import Spool
        spool = Spool(Path(sys.argv[1]), commit_interval=float(sys.argv[2]))
        while True:
            seq = spool.allocate_seq("results")
            spool.put("results", "t", b"r" * 200, seq=seq)
            print(seq, flush=True)
            time.sleep(0.0005)
    """
    received: list[tuple[float, int]] = []
    with subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), str(path), str(interval)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    ) as proc:
        assert proc.stdout is not None
        stdout = proc.stdout

        def read() -> None:
            for line in stdout:
                received.append((time.monotonic(), int(line)))

        reader = threading.Thread(target=read)
        reader.start()
        deadline = time.monotonic() + 30
        while not received and time.monotonic() < deadline:
            time.sleep(0.01)
        assert received, "the child never started putting"
        time.sleep(0.5)
        killed_at = time.monotonic()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        reader.join(timeout=10)
    assert proc.returncode == -signal.SIGKILL

    with Spool(path) as spool:  # the file opens after the kill
        survivors = [s for _, s, _ in db_rows(path)]
        assert len(survivors) > 0
        assert survivors == list(range(len(survivors)))  # a prefix, no gaps
        assert spool.allocate_seq("results") >= len(survivors)
    window = 3 * interval + 0.1  # the batch being gathered, the one being committed, slack
    old = [seq for t, seq in received if t < killed_at - window]
    assert old and max(old) < len(survivors)  # everything put before the window survived
    lost = max(seq for _, seq in received) + 1 - len(survivors)
    assert lost <= sum(1 for t, _ in received if t >= killed_at - window) + 1


def test_size_bound_drops_oldest_results_and_keeps_every_event(open_spool: OpenSpool) -> None:
    spool = open_spool(max_bytes=10_000, commit_interval=0.01)
    for i in range(500):
        spool.put("results", "r", b"r" * 100, seq=i)
        if i % 50 == 0:
            spool.put("events", "e", b"e" * 100, seq=i // 50)
    spool.flush()
    events = [s for _, s, _ in db_rows(spool.path, "stream = 'events'")]
    results = [s for _, s, _ in db_rows(spool.path, "stream = 'results'")]
    assert events == list(range(10))
    assert results == list(range(500 - len(results), 500))  # the newest survive
    assert spool.stats.dropped["results"] == 500 - len(results) > 0
    assert spool.stats.dropped["events"] == 0
    assert spool.size_bytes() <= 10_000


@pytest.mark.parametrize("windows", [True, False], ids=["window-function", "scan"])
def test_size_bound_drops_results_then_telemetry_and_events_stay_over_it(
    open_spool: OpenSpool, monkeypatch: pytest.MonkeyPatch, windows: bool
) -> None:
    monkeypatch.setattr(spool_module, "_WINDOWS", windows)  # SQLite < 3.25 scans instead
    spool = open_spool(max_bytes=2000)
    for i in range(10):
        spool.put("telemetry", "t", b"t" * 100, seq=i)
    for i in range(10):
        spool.put("results", "r", b"r" * 100, seq=i)
    spool.flush()
    assert spool.size_bytes() == 2000 and spool.stats.dropped["results"] == 0

    for i in range(5):
        spool.put("events", "e", b"e" * 100, seq=i)
    spool.flush()
    assert [s for _, s, _ in db_rows(spool.path, "stream = 'results'")] == [5, 6, 7, 8, 9]
    assert len(db_rows(spool.path, "stream = 'telemetry'")) == 10

    for i in range(5, 15):
        spool.put("events", "e", b"e" * 100, seq=i)
    spool.flush()
    assert db_rows(spool.path, "stream = 'results'") == []
    assert [s for _, s, _ in db_rows(spool.path, "stream = 'telemetry'")] == [5, 6, 7, 8, 9]
    assert spool.stats.dropped == {"results": 10, "telemetry": 5, "events": 0}

    for i in range(15, 40):  # only events left: kept over the bound
        spool.put("events", "e", b"e" * 100, seq=i)
    spool.flush()
    assert [s for _, s, _ in db_rows(spool.path, "stream = 'events'")] == list(range(40))
    assert db_rows(spool.path, "stream != 'events'") == []
    assert spool.size_bytes() == 4000 > spool.max_bytes


def test_full_queue_drops_oldest_results_never_events(open_spool: OpenSpool) -> None:
    spool = open_spool(queue_size=10, commit_interval=30.0)  # the writer waits 30 s to commit
    spool.put("events", "e", b"e0", seq=0)
    for i in range(50):
        spool.put("results", "r", b"%d" % i, seq=i)
    spool.put("events", "e", b"e1", seq=1)
    for i in range(50, 100):
        spool.put("results", "r", b"%d" % i, seq=i)
    spool.put("events", "e", b"e2", seq=2)
    assert spool.size_bytes() == 0  # nothing committed yet: all of it was the queue
    assert spool.depth() == 10
    assert spool.stats.dropped == {"results": 93, "telemetry": 0, "events": 0}
    spool.flush()
    assert [r.payload for r in spool.pending()] == [
        b"e0",
        b"e1",
        *(b"%d" % i for i in range(93, 100)),
        b"e2",
    ]


def test_full_queue_of_events_makes_the_next_event_wait_not_drop(open_spool: OpenSpool) -> None:
    spool = open_spool(queue_size=2, commit_interval=30.0)
    spool.put("events", "e", b"a", seq=0)
    spool.put("events", "e", b"b", seq=1)
    spool.put("results", "r", b"r", seq=0)  # nothing it may displace: the result is dropped
    t0 = time.monotonic()
    spool.put("events", "e", b"c", seq=2)  # waits for the writer, which commits at once
    assert time.monotonic() - t0 < 2.0
    spool.flush()
    assert [r.payload for r in spool.pending()] == [b"a", b"b", b"c"]
    assert spool.stats.dropped == {"results": 1, "telemetry": 0, "events": 0}


def test_durable_event_is_on_disk_when_put_returns(open_spool: OpenSpool) -> None:
    spool = open_spool(commit_interval=30.0)
    spool.put("results", "r", b"before", seq=0)
    assert db_rows(spool.path) == []  # results wait for the commit interval
    spool.put("events", "e", b"update_committed", seq=spool.allocate_seq("events"), durable=True)
    assert db_rows(spool.path) == [("results", 0, b"before"), ("events", 0, b"update_committed")]


def test_wait_wakes_when_a_commit_lands(open_spool: OpenSpool) -> None:
    spool = open_spool(commit_interval=0.05)
    assert spool.wait(0.05) is False  # empty: times out
    timer = threading.Timer(0.2, lambda: spool.put("results", "r", b"x", seq=0))
    timer.start()
    try:
        t0 = time.monotonic()
        assert spool.wait(5.0) is True
        assert 0.15 < time.monotonic() - t0 < 2.0
    finally:
        timer.join()
    assert len(spool.pending()) == 1
    assert spool.wait(0.05) is False  # pending() has shown it
    spool.put("results", "r", b"y", seq=1)
    spool.flush()
    assert spool.wait(0) is True  # committed before wait() was called: not missed


def test_wait_sees_rows_left_from_the_last_run(open_spool: OpenSpool) -> None:
    spool = open_spool()
    spool.put("events", "e", b"x", seq=0)
    spool.close()
    spool = open_spool()
    assert spool.wait(0) is True


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_file_is_moved_aside_and_a_fresh_spool_works(
    tmp_path: Path, open_spool: OpenSpool, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    path = tmp_path / "spool.db"
    if damage == "garbage":
        path.write_bytes(b"this is not an SQLite file\n" * 200)
    else:
        with Spool(path) as spool:
            for i in range(2000):
                spool.put("results", "r", os.urandom(1000), seq=i)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    caplog.set_level(logging.WARNING, logger="edge_agent.fleet.spool")
    spool = open_spool(path)
    aside = list(tmp_path.glob("spool.db.corrupt-*"))
    assert len(aside) == 1 and aside[0].stat().st_size > 0
    assert any("corrupt-" in r.getMessage() for r in caplog.records)
    assert spool.pending() == [] and spool.next_seq("results") == 0
    spool.put("events", "e", b"fresh", seq=0, durable=True)
    assert [r.payload for r in spool.pending()] == [b"fresh"]


def test_missing_directory_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "no" / "such" / "spool.db"
    with pytest.raises(ConfigError, match=str(path.parent)):
        Spool(path)


def test_observe_seq_raises_the_counter(open_spool: OpenSpool) -> None:
    spool = open_spool()
    spool.observe_seq("results", 41)
    assert spool.next_seq("results") == 42
    spool.observe_seq("results", 7)  # never goes back
    assert spool.allocate_seq("results") == 42
    spool.put("results", "r", b"x", seq=99)  # a put's seq counts as observed too
    assert spool.next_seq("results") == 100
    assert spool.next_seq("events") == 0
    spool.close()
    spool = open_spool()
    assert spool.next_seq("results") == 100


def test_unknown_stream_is_refused(open_spool: OpenSpool) -> None:
    spool = open_spool()
    with pytest.raises(ValueError, match="stream 'logs'"):
        spool.put("logs", "t", b"x", seq=0)
    with pytest.raises(ValueError, match="stream 'logs'"):
        spool.allocate_seq("logs")


def test_concurrent_puts_keep_unique_seqs(open_spool: OpenSpool) -> None:
    spool = open_spool(commit_interval=0.01)

    def produce() -> None:
        for _ in range(1000):
            spool.put("telemetry", "t", b"x" * 50, seq=spool.allocate_seq("telemetry"))

    threads = [threading.Thread(target=produce) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    spool.flush()
    assert sorted(s for _, s, _ in db_rows(spool.path)) == list(range(4000))
    assert spool.stats.committed == 4000 and spool.depth() == 4000


def test_full_disk_drops_results_then_loses_events_with_one_warning(
    open_spool: OpenSpool, caplog: pytest.LogCaptureFixture
) -> None:
    spool = open_spool(commit_interval=0.01)
    spool.flush()  # the writer is idle now: its connection is free for the pragma below
    conn = spool._wconn
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.execute(f"PRAGMA max_page_count = {pages + 20}")  # ~80 KB more: SQLITE_FULL after
    caplog.set_level(logging.WARNING, logger="edge_agent.fleet.spool")

    for i in range(2000):
        spool.put("results", "r", b"r" * 300, seq=i)
        if i % 100 == 0:
            spool.put("events", "e", b"e" * 300, seq=i // 100, durable=True)
    spool.flush()
    stats = spool.stats
    assert stats.dropped["results"] > 0 and stats.events_lost == 0 and not stats.disk_full
    assert len(db_rows(spool.path, "stream = 'events'")) == 20  # results made room for them

    for i in range(20, 120):  # events alone fill it up
        spool.put("events", "e", b"E" * 3000, seq=i, durable=True)
    stats = spool.stats
    assert stats.disk_full and stats.events_lost > 0
    kept = len(db_rows(spool.path, "stream = 'events'"))
    assert kept + stats.events_lost == 120
    assert len([r for r in caplog.records if "disk full" in r.getMessage()]) == 1

    spool.flush()
    conn.execute("PRAGMA max_page_count = 1000000")  # space again
    spool.put("events", "e", b"back", seq=120, durable=True)
    assert not spool.stats.disk_full
    assert db_rows(spool.path, "seq = 120")[0][2] == b"back"


def test_close_is_idempotent_and_put_after_close_raises(open_spool: OpenSpool) -> None:
    spool = open_spool(commit_interval=30.0)
    spool.put("results", "r", b"queued", seq=0)
    spool.close()  # commits what was queued
    spool.close()
    assert db_rows(spool.path) == [("results", 0, b"queued")]
    assert spool.pending() == [] and spool.wait(1.0) is False
    with pytest.raises(RuntimeError, match="after close"):
        spool.put("results", "r", b"late", seq=1)


def test_commits_at_most_every_commit_interval(open_spool: OpenSpool) -> None:
    spool = open_spool(commit_interval=0.2)
    t0 = time.monotonic()
    for i in range(50):  # a put every 10 ms for 0.5 s
        spool.put("results", "r", b"x", seq=i)
        time.sleep(0.01)
    elapsed = time.monotonic() - t0
    commits = spool.stats.commits
    assert 1 <= commits <= elapsed / 0.2 + 1  # not one per put
    assert spool.stats.committed < 50  # the newest are still queued
    spool.flush()
    assert spool.stats.committed == 50


def test_throughput_20000_puts_are_batched(open_spool: OpenSpool) -> None:
    # The queue holds the whole burst: a tight loop puts far faster than one commit interval.
    spool = open_spool(queue_size=20_000)
    payload = b"p" * 300
    t0 = time.perf_counter()
    for _ in range(20_000):
        spool.put("results", "edge/d1/results", payload, seq=spool.allocate_seq("results"))
    spool.flush(timeout=10.0)
    elapsed = time.perf_counter() - t0
    stats = spool.stats
    assert elapsed < 10.0
    assert stats.committed == 20_000 and stats.dropped["results"] == 0
    assert stats.commits < 200  # batches, not one transaction per message
    assert spool.size_bytes() == 20_000 * 300
