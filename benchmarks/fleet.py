"""Fleet collector benchmark (``make bench``, issue 17): 10,000 simulated devices at 0.2 Hz
telemetry plus events on a loopback Mosquitto, two ``edgectl collect fleet`` processes in one
share group, into a PostgreSQL database of its own.

1. A private Mosquitto on a free loopback port (``tests.broker.Broker``) configured as
   docs/fleet.md asks of a production broker: ``persistence true``, ``max_queued_messages
   2000000``, Mosquitto's default autosave (every 1800 s) and default log types (not every
   packet). A fresh database on 127.0.0.1:5432 (``tests.fleet.Database``, dropped at the end).
2. Two collectors (``tests.fleet.CollectorProcess``: ``edgectl collect fleet``, real processes,
   their default batches: 1000 rows or 200 ms) in one share group.
3. ``edgectl simulate --devices 10000 --rate 0.2 --events-every 30`` as a separate process for
   ``--seconds`` (60): 2,000 telemetry messages/s and an event per device every 150 s (67/s),
   after a retained status and reported state per device at start. It prints what it handed to
   the broker and what the broker acknowledged (QoS 1 PUBACKs; it waits for them all before
   disconnecting).
4. The collectors are left to store everything (bounded); then every table is counted against
   what was published, duplicates are looked for per ``(device, seq)``, and the ingestion is
   read back from the rows themselves (``received``: when the collector's transaction stored
   it; ``time``: when the device sent it), so nothing polls the database during the run.
5. CPU (user + system, psutil) of each collector, Mosquitto, the collectors' PostgreSQL
   backends (``pg_stat_activity.pid``) and the simulator, from the simulator's start until the
   last row was stored. CPU seconds per 1,000 messages is also cores per 1,000 messages/s.
6. ``edgectl history DEVICE`` as a fresh process (median of 5) and the query alone in this
   process (median of 5).

Writes ``benchmarks/results/fleet.json`` and ``fleet.md``; exits 1 when a target is missed.
``--seconds 15`` is a quick run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from benchmarks.convert import RESULTS, _cpu_name, save_results, targets_markdown
from edgectl.collector import RETAINED_STREAMS, SHARED_STREAMS
from edgectl.fleetdb import queries
from edgectl.fleetdb.rows import DEFAULT_METRICS
from edgectl.simulate import device_names
from tests.broker import Broker, mosquitto_binary
from tests.fleet import EDGECTL, CollectorProcess, Database, checkout_env

DEVICES = 10_000
RATE = 0.2  # telemetry per device per second
EVENTS_EVERY = 30  # an event every 30 telemetry messages: one per device every 150 s
CONNECTIONS = 8  # the simulator's MQTT connections
COLLECTORS = 2
GROUP = "bench-fleet"
BROKER_CONF = "max_queued_messages 2000000"  # docs/fleet.md: a collector's absence
BROKER_AUTOSAVE_S = 1800  # Mosquitto's default
BROKER_LOG_TYPES = ("error", "warning", "notice", "information")  # Mosquitto's default
LAG_SKIP_S = 15.0  # the steady-state latency: telemetry sent this long after the first (at
# most half the run)
STORE_TIMEOUT_S = 180.0  # after the simulator stopped: every row stored within this
HISTORY_RUNS = 5
HISTORY_TARGET_S = 0.2
SHARED = SHARED_STREAMS  # the collector's: read through the share group
STREAMS = (*RETAINED_STREAMS, *SHARED_STREAMS)


# --- measuring --------------------------------------------------------------------------------


def cpu_s(proc: psutil.Process) -> float:
    try:
        t = proc.cpu_times()
    except psutil.Error:
        return float("nan")
    return float(t.user + t.system)


def backend_pids(conn: Any) -> list[int]:
    """The PostgreSQL backends of this database's other connections (the collectors')."""
    rows = conn.execute(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
        "AND pid <> pg_backend_pid() AND backend_type = 'client backend' ORDER BY pid"
    ).fetchall()
    return [int(r[0]) for r in rows]


def stored(conn: Any) -> dict[str, int]:
    return {t: int(conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0]) for t in STREAMS}


def duplicate_keys(conn: Any) -> dict[str, int]:
    """Per table, the (device, seq) that have more than one row."""
    return {
        t: int(
            conn.execute(
                f"SELECT count(*) FROM (SELECT 1 FROM {t} GROUP BY device, seq "
                "HAVING count(*) > 1) d"
            ).fetchone()[0]
        )
        for t in STREAMS
    }


def ingestion(conn: Any, *, seconds: float) -> dict[str, Any]:
    """From the rows: rows stored per second (every stream; telemetry and events), the
    sustained rate of telemetry and events (their rows over the time from the first one's
    sending to the last one's storing: the offered rate when the collectors keep up), and how
    long after its device sent it a telemetry row was stored."""

    def per_second(tables: tuple[str, ...]) -> list[int]:
        union = " UNION ALL ".join(f"SELECT received FROM {t}" for t in tables)
        return [int(n) for (n,) in conn.execute(
            f"SELECT count(*) FROM ({union}) r GROUP BY date_trunc('second', received) "
            "ORDER BY date_trunc('second', received)"
        ).fetchall()]  # fmt: skip

    shared = " UNION ALL ".join(f"SELECT time, received FROM {t}" for t in SHARED)
    n, first, last = conn.execute(
        f"SELECT count(*), min(time), max(received) FROM ({shared}) r"
    ).fetchone()
    span = (last - first).total_seconds() if n else 0.0

    def lag(where: str) -> dict[str, float | None]:
        p50, p99, worst = conn.execute(
            "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY d), "
            "percentile_cont(0.99) WITHIN GROUP (ORDER BY d), max(d) "
            f"FROM (SELECT extract(epoch FROM received - time) AS d FROM telemetry {where}) x"
        ).fetchone()
        return {k: None if v is None else round(float(v), 3)
                for k, v in (("p50", p50), ("p99", p99), ("max", worst))}  # fmt: skip

    every, streams = per_second(STREAMS), per_second(SHARED)
    skip = min(LAG_SKIP_S, seconds / 2)
    return {
        "stream_rows": int(n),
        "stream_span_s": round(span, 2),
        "sustained_per_s": round(n / span, 1) if span > 0 else None,
        "peak_per_s": max(every, default=0),
        "peak_stream_per_s": max(streams, default=0),
        "stored_per_second": every,
        "lag_s": lag(""),
        "lag_skip_s": skip,
        # past the start, when every device's retained states arrive at once
        "lag_after_start_s": lag(
            f"WHERE time > (SELECT min(time) FROM telemetry) + interval '{skip:g} s'"
        ),
    }


def import_cost(argv: list[str], env: dict[str, str], *, runs: int = 3) -> dict[str, float]:
    """Where a fresh ``edgectl history`` spends its imports (``python -X importtime``, the
    fastest of ``runs``), in ms: the interpreter's start-up (``site``, ``encodings``), psycopg
    (with what it imports: asyncio, its C module), and everything else (edgectl, edge_agent,
    the standard library they use)."""
    best: dict[str, float] = {}
    for _ in range(runs):
        done = subprocess.run([sys.executable, "-X", "importtime", "-m", "edgectl.cli", *argv[1:]],
                              capture_output=True, text=True, env=env, timeout=60)  # fmt: skip
        total = startup = psycopg = 0.0
        for line in done.stderr.splitlines():
            if not line.startswith("import time:") or "cumulative" in line:
                continue
            _, cumulative, name = line.split("|")
            us, top = float(cumulative), name.startswith(" ") and not name.startswith("  ")
            total += us if top else 0.0
            startup += us if top and name.strip() in ("site", "encodings") else 0.0
            psycopg = max(psycopg, us) if name.strip() == "psycopg" else psycopg
        got = {"all": total, "interpreter_startup": startup, "psycopg": psycopg,
               "edgectl_and_rest": total - startup - psycopg}  # fmt: skip
        if not best or got["all"] < best["all"]:
            best = got
    return {k: round(v / 1000, 1) for k, v in best.items()}


def time_history(database: Database, device: str, since: float) -> dict[str, Any]:
    """``edgectl history DEVICE`` as a new process, and the query alone in this one."""
    argv = [EDGECTL, "history", device, "--db", database.url, "--since", str(int(since)),
            "--format", "csv"]  # fmt: skip
    env = checkout_env()
    fresh, fresh_cpu, rows = [], [], 0
    # interleaved, so that each sees the same load: a bare interpreter, and one that imports
    # psycopg and nothing else (the floor of any Python client of PostgreSQL)
    python, floor = [], []
    for _ in range(HISTORY_RUNS):
        t0, c0 = time.perf_counter(), _children_cpu_s()
        done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60)
        fresh.append(time.perf_counter() - t0)
        fresh_cpu.append(_children_cpu_s() - c0)  # its own CPU: what the load does not change
        if done.returncode != 0:
            raise RuntimeError(f"edgectl history: exit {done.returncode}: {done.stderr.strip()}")
        rows = len(done.stdout.strip().splitlines()) - 1
        for code, into in (("pass", python), ("import psycopg", floor)):
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-c", code], check=True, env=env)
            into.append(time.perf_counter() - t0)
    imports = import_cost(argv, env)
    query = []
    with database.connect() as conn:
        for _ in range(HISTORY_RUNS):
            t0 = time.perf_counter()
            got = queries.history(conn, device, since=since, until=time.time() + 60,
                                  metrics=DEFAULT_METRICS)  # fmt: skip
            query.append(time.perf_counter() - t0)
        plan = queries.explain(
            conn,
            queries.history_query(DEFAULT_METRICS),
            (device, queries.utc(since), queries.utc(time.time()), 100_000),
        )
    return {
        "device": device,
        "rows": rows,
        "rows_in_process": len(got),
        "fresh_process_s": [round(x, 4) for x in fresh],
        "fresh_process_median_s": round(statistics.median(fresh), 4),
        "fresh_process_cpu_median_s": round(statistics.median(fresh_cpu), 4),
        "load_1min": round(os.getloadavg()[0], 2),
        "python_start_median_s": round(statistics.median(python), 4),
        "python_psycopg_median_s": round(statistics.median(floor), 4),
        "imports_ms": imports,
        "query_s": [round(x, 5) for x in query],
        "query_median_s": round(statistics.median(query), 5),
        "plan_uses_pkey": "telemetry_pkey" in plan,
    }


# --- the run ----------------------------------------------------------------------------------


def bench(*, seconds: float, devices: int, rate: float, events_every: int) -> dict[str, Any]:
    load_before = os.getloadavg()
    database = Database()
    tmp = tempfile.TemporaryDirectory(prefix="bench-fleet-")
    work = Path(tmp.name)
    collectors: list[CollectorProcess] = []
    sim: subprocess.Popen[str] | None = None
    try:
        broker = Broker(work / "broker", extra_conf=BROKER_CONF,
                        autosave_interval=BROKER_AUTOSAVE_S, log_types=BROKER_LOG_TYPES)  # fmt: skip
        with broker:
            collectors = [
                CollectorProcess(
                    work, broker, database, f"bench-collector-{k}", "--batch-ms", "200", group=GROUP
                )
                for k in range(1, COLLECTORS + 1)
            ]
            for c in collectors:
                c.start()
            conn: Any = database.connect()
            pg_version = str(conn.execute("SHOW server_version").fetchone()[0]).split()[0]
            backends = [psutil.Process(pid) for pid in backend_pids(conn)]
            assert broker.pid is not None
            procs = {
                **{
                    f"collector {k}": psutil.Process(c.proc.pid)
                    for k, c in enumerate(collectors, 1)
                    if c.proc
                },
                "mosquitto": psutil.Process(broker.pid),
                **{f"postgres backend {p.pid}": p for p in backends},
            }
            cpu0 = {name: cpu_s(p) for name, p in procs.items()}
            children0 = _children_cpu_s()
            since = time.time() - 1
            t0 = time.monotonic()
            sim = subprocess.Popen(
                [EDGECTL, "--broker", broker.url, "simulate", "--devices", str(devices),
                 "--rate", str(rate), "--duration", str(seconds), "--events-every",
                 str(events_every), "--connections", str(CONNECTIONS)],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=checkout_env(),
            )  # fmt: skip
            out, err = sim.communicate(timeout=seconds + 120)
            sim_done = time.monotonic()
            # the only child reaped meanwhile: its CPU is what our children's CPU grew by
            sim_cpu = _children_cpu_s() - children0
            if sim.returncode != 0:
                raise RuntimeError(f"edgectl simulate: exit {sim.returncode}: {err.strip()}")
            sim_stats = json.loads(out.strip().splitlines()[-1])
            published = sim_stats["published"]
            want = sum(published.get(s, 0) for s in STREAMS)
            deadline = sim_done + STORE_TIMEOUT_S
            counts = stored(conn)
            while sum(counts.values()) < want and time.monotonic() < deadline:
                time.sleep(0.5)
                counts = stored(conn)
            all_stored = time.monotonic()
            cpu1 = {name: cpu_s(p) for name, p in procs.items()}
            time.sleep(1.0)  # anything beyond what was published (a bug) would show now
            counts = stored(conn)
            totals = [c.stop() for c in collectors]
            dups = duplicate_keys(conn)
            flow = ingestion(conn, seconds=seconds)
            # what autovacuum would start now, done first: it would run beside the timings
            conn.execute(f"ANALYZE {', '.join(STREAMS)}")
            conn.close()
            history = time_history(database, device_names(devices)[devices // 2], since)
            load_after = os.getloadavg()
    finally:
        if sim is not None and sim.poll() is None:  # it failed or overran: stop it
            sim.kill()
            sim.wait(10)
        for c in collectors:
            c.close()
        database.drop()
        tmp.cleanup()

    window = all_stored - t0
    messages = sum(counts.values())
    cpu = {name: round(cpu1[name] - cpu0[name], 2) for name in procs}
    cpu["simulator"] = round(sim_cpu, 2)
    received = {s: sum(t["per_stream"].get(s, 0) for t in totals) for s in STREAMS}
    per_collector = []
    for k, t in enumerate(totals, 1):
        own = sum(t["per_stream"].get(s, 0) for s in SHARED)
        per_collector.append({
            "collector": k, "messages": t["messages"], "shared_messages": own,
            "share": round(own / max(1, sum(received[s] for s in SHARED)), 4),
            "rows": t["rows"], "duplicates": t["duplicates"], "rejected": t["rejected"],
            "batches": t["batches"], "db_errors": t["db_errors"],
            "cpu_s": cpu[f"collector {k}"],
            "cpu_s_per_1000_own": round(1000 * cpu[f"collector {k}"] / max(1, t["messages"]), 4),
        })  # fmt: skip
    per_1000 = {name: round(1000 * v / max(1, messages), 4) for name, v in cpu.items()}
    backends_cpu = sum(v for n, v in cpu.items() if n.startswith("postgres backend"))
    result: dict[str, Any] = {
        "benchmark": "fleet",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "cpu": _cpu_name(),
            "cores": os.cpu_count(),
            "load_before": [round(x, 2) for x in load_before],
            "load_after": [round(x, 2) for x in load_after],
        },
        "mosquitto": _mosquitto_version(),
        "postgresql": pg_version,
        "broker_conf": [
            "persistence true",
            BROKER_CONF,
            f"autosave_interval {BROKER_AUTOSAVE_S}",
            *(f"log_type {t}" for t in BROKER_LOG_TYPES),
        ],
        "devices": devices,
        "rate_hz": rate,
        "events_every": events_every,
        "seconds": seconds,
        "collectors": COLLECTORS,
        "simulator": sim_stats,
        "published": {s: published.get(s, 0) for s in STREAMS},
        "stored": counts,
        "received_by_collectors": received,
        "redelivered_shared": sum(received[s] - counts[s] for s in SHARED),
        "duplicate_keys": dups,
        "window_s": round(window, 2),
        "store_after_sim_s": round(all_stored - sim_done, 2),
        "offered_per_s": round(sum(published.get(s, 0) for s in SHARED) / seconds, 1),
        "ingestion": flow,
        "cpu_s": cpu,
        "cpu_s_per_1000_messages": per_1000,
        "postgres_backends_cpu_s_per_1000": round(1000 * backends_cpu / max(1, messages), 4),
        "per_collector": per_collector,
        "history": history,
    }
    result["targets"] = targets(result)
    return result


def _children_cpu_s() -> float:
    t = os.times()
    return t.children_user + t.children_system


def _mosquitto_version() -> str:
    out = subprocess.run([mosquitto_binary(), "-h"], capture_output=True, text=True)
    first = (out.stdout or out.stderr).splitlines()[:1]
    return first[0].replace("mosquitto version ", "") if first else "?"


def targets(r: dict[str, Any]) -> list[dict[str, Any]]:
    pub, got = sum(r["published"].values()), sum(r["stored"].values())
    sim = r["simulator"]
    scheduled = r["devices"] * r["rate_hz"]
    tel_rate = r["published"]["telemetry"] / r["seconds"]
    dups = sum(r["duplicate_keys"].values())
    h = r["history"]
    return [
        {"target": "messages stored / published (every stream)",
         "value": f"{got:,} / {pub:,}", "limit": "100 %",
         "met": got == pub and all(r["stored"][s] == r["published"][s] for s in STREAMS)},
        {"target": "published messages acknowledged by the broker (QoS 1)",
         "value": f"{sim['acked']:,} / {pub:,}", "limit": "100 %",
         "met": sim["acked"] == pub and sim["refused"] == 0 and sim["failed"] == 0},
        {"target": "rows per (device, seq) > 1 (every table)", "value": dups, "limit": "0",
         "met": dups == 0},
        {"target": f"telemetry offered: messages/s (scheduled {scheduled:,.0f})",
         "value": round(tel_rate, 1), "limit": f">= {0.95 * scheduled:,.0f}",
         "met": tel_rate >= 0.95 * scheduled},
        {"target": f"`edgectl history DEVICE` ({h['rows']} rows), a new process, median of "
         f"{HISTORY_RUNS}", "value": f"{h['fresh_process_median_s']} s",
         "limit": f"<= {HISTORY_TARGET_S} s",
         "met": h["fresh_process_median_s"] <= HISTORY_TARGET_S},
    ]  # fmt: skip


def markdown(r: dict[str, Any]) -> str:
    m, sim, flow, h = r["machine"], r["simulator"], r["ingestion"], r["history"]
    late = flow["lag_after_start_s"]
    load = lambda xs: " / ".join(f"{x:g}" for x in xs)  # noqa: E731
    lines = [
        f"Fleet collector benchmark, {r['when']}, {m['cpu']} ({m['cores']} cores; load average "
        f"{load(m['load_before'])} before, {load(m['load_after'])} after: other work shares "
        f"the machine). `make bench` (`python -m benchmarks.fleet --seconds {r['seconds']:g}`). "
        f"Mosquitto {r['mosquitto']} on loopback ({', '.join(f'`{c}`' for c in r['broker_conf'])}"
        f"), PostgreSQL {r['postgresql']}, {r['collectors']} `edgectl collect fleet` in one "
        f"share group (1000 rows / 200 ms batches), `edgectl simulate --devices "
        f"{r['devices']} --rate {r['rate_hz']:g} --events-every {r['events_every']}` for "
        f"{r['seconds']:g} s ({sim['seconds']:g} s with the wait for the last PUBACKs; its "
        f"schedule: {sim['late']:,} messages more than 0.1 s late, at worst "
        f"{sim['max_lag_s']} s), all on this machine.",
        "",
        "| stream | published (acked) | stored | received by the collectors | rows per (device, seq) > 1 |",
        "|---|---:|---:|---:|---:|",
    ]  # fmt: skip
    for s in STREAMS:
        lines.append(f"| {s} | {r['published'][s]:,} | {r['stored'][s]:,} | "
                     f"{r['received_by_collectors'][s]:,} | {r['duplicate_keys'][s]} |")  # fmt: skip
    lines.append(f"| all | {sum(r['published'].values()):,} ({sim['acked']:,}) | "
                 f"{sum(r['stored'].values()):,} | {sum(r['received_by_collectors'].values()):,} "
                 f"| {sum(r['duplicate_keys'].values())} |")  # fmt: skip
    lines += [
        "",
        "Status and reported states are retained and read by both collectors (not shared): "
        "each copy after the first is a duplicate the key skips. Telemetry and events "
        f"delivered more than once (at-least-once redeliveries): {r['redelivered_shared']}.",
        "",
        "| ingestion | value |",
        "|---|---:|",
        f"| offered: telemetry + events per second | {r['offered_per_s']:,} |",
        f"| stored, sustained: telemetry + events per second ({flow['stream_rows']:,} rows, "
        f"{flow['stream_span_s']} s from the first one's sending to the last one's storing) | "
        f"{flow['sustained_per_s']:,} |",
        f"| stored, peak second: every stream (the retained states at start) | "
        f"{flow['peak_per_s']:,} |",
        f"| stored, peak second: telemetry + events (catching up after the start) | "
        f"{flow['peak_stream_per_s']:,} |",
        f"| device to row (telemetry `received - time`): p50 / p99 / max | {flow['lag_s']['p50']}"
        f" / {flow['lag_s']['p99']} / {flow['lag_s']['max']} s |",
        f"| the same, past the first {flow['lag_skip_s']:g} s (the retained states' burst) | "
        f"{late['p50']} / {late['p99']} / {late['max']} s |",
        f"| the last row stored after the simulator stopped | {r['store_after_sim_s']} s |",
        "",
        f"CPU (user + system) from the simulator's start until the last row was stored "
        f"({r['window_s']} s, {sum(r['stored'].values()):,} messages); seconds per 1,000 "
        "messages are also cores per 1,000 messages/s:",
        "",
        "| process | CPU s | CPU s per 1,000 messages |",
        "|---|---:|---:|",
    ]  # fmt: skip
    for name, v in r["cpu_s"].items():
        lines.append(f"| {name} | {v} | {r['cpu_s_per_1000_messages'][name]} |")
    lines += [
        f"| PostgreSQL backends together | | {r['postgres_backends_cpu_s_per_1000']} |",
        "",
        "| collector | messages | its share of telemetry + events | CPU s per 1,000 of its "
        "messages | batches | duplicates skipped | db errors |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]  # fmt: skip
    for c in r["per_collector"]:
        lines.append(f"| {c['collector']} | {c['messages']:,} | {100 * c['share']:.1f} % | "
                     f"{c['cpu_s_per_1000_own']} | {c['batches']} | {c['duplicates']:,} | "
                     f"{c['db_errors']} |")  # fmt: skip
    lines += [
        "",
        f"`edgectl history {h['device']} --since … --format csv` ({h['rows']} rows): a new "
        f"process {h['fresh_process_median_s']} s (median of {HISTORY_RUNS}: "
        f"{', '.join(str(x) for x in h['fresh_process_s'])}, load average {h['load_1min']}; its "
        f"CPU {h['fresh_process_cpu_median_s']} s; a bare `python -c pass` "
        f"{h['python_start_median_s']} s, `python -c 'import psycopg'` "
        f"{h['python_psycopg_median_s']} s; its imports {h['imports_ms']['all']} ms: the "
        f"interpreter's start {h['imports_ms']['interpreter_startup']} ms, psycopg "
        f"{h['imports_ms']['psycopg']} ms, edgectl and the rest "
        f"{h['imports_ms']['edgectl_and_rest']} ms); the query alone in a running process "
        f"{1000 * h['query_median_s']:.1f} ms (median; plan "
        f"{'an index scan of telemetry_pkey' if h['plan_uses_pkey'] else 'NOT the primary key'}).",
    ]  # fmt: skip
    lines += targets_markdown(r["targets"])
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--seconds", type=float, default=60.0, help="the simulator's run")
    parser.add_argument("--devices", type=int, default=DEVICES)
    parser.add_argument("--rate", type=float, default=RATE)
    parser.add_argument("--events-every", type=int, default=EVENTS_EVERY)
    args = parser.parse_args(argv)
    result = bench(seconds=args.seconds, devices=args.devices, rate=args.rate,
                   events_every=args.events_every)  # fmt: skip
    return save_results(args.out, "fleet", result, markdown(result))


if __name__ == "__main__":
    sys.exit(main())
