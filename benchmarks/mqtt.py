"""MQTT benchmark (``make bench``): the agent's publishing path, bundle transfer over MQTT, a
model swap under a live stream, and ``edgectl status`` over a simulated 1,000-device fleet, all
against a Mosquitto this benchmark starts on a free loopback port (``tests.broker.Broker``).

1. **Publishing cost.** ``MqttResultSink`` -> ``Spool`` -> ``MqttLink`` in this process, fed
   realistic result dicts at 200/s for ``--seconds`` from a paced thread, while a consumer in a
   separate process receives them. This process's CPU time (every thread: pacing, spool writer
   and its SQLite commits with fsync, the link's network thread) minus that of an identical run in
   which the paced thread builds the same dicts but does not call ``sink.write``. Side by side
   with the naive alternative: a plain paho client (``loop_start``) doing ``json.dumps`` +
   ``publish`` QoS 1 per result, with the same subtraction. Medians of alternating rounds.
2. **Bundle transfer.** A signed bundle (``write_bundle``) holding a 10 MB random artifact:
   ``edgectl``'s ``publish_bundle`` (retained chunks + meta, every PUBACK), then a device-side
   ``ChunkFetcher`` on a real ``MqttLink`` fetching it to a sha256-verified file on disk.
3. **Swap.** A real ``Pipeline`` on a 300-frame 60 fps video paced natively; a second copy of
   the model is loaded mid-stream and ``swap_model`` is called from another thread: frames in vs
   results out, seq contiguity, and the stall around the swap.
4. **Fleet.** 1,000 simulated devices (a separate process, a few paho connections) publishing
   retained telemetry and status at 1 Hz each; ``edgectl status --json`` as a subprocess, and a
   consumer process on ``edge/+/telemetry`` for 10 s.

Writes ``benchmarks/results/mqtt.json`` and ``mqtt.md``; exits 1 when a target is missed.
The consumer and simulator run as ``python -m benchmarks.mqtt --role consumer|simulator``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgectl.simulate import result_payload, status_payload, telemetry_payload

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
PREFIX = "edge"
RATE = 200.0  # results per second (part 1)
TAIL_S = 0.5  # part 1: the CPU window runs this long past the last result (the drain)
PACER_ONLY_S = 5.0  # part 1: one run of the paced thread alone (nothing connected)
BUNDLE_MB = 10
DEVICES = 1000
SIM_CONNECTIONS = 4
FLEET_WINDOW_S = 10.0


# --- payloads ---------------------------------------------------------------------------------


def check_payload_schemas() -> None:
    """The synthetic payloads must match the protocol's JSON Schemas (else the numbers lie)."""
    import jsonschema

    from edge_agent.fleet.protocol import SCHEMAS

    now = time.time()
    jsonschema.validate(result_payload(0, now), SCHEMAS["result"])
    jsonschema.validate(telemetry_payload("dev-0000", 0, now, 10.0), SCHEMAS["telemetry"])
    jsonschema.validate(status_payload("dev-0000", now), SCHEMAS["status"])


# --- helper processes (--role) ---------------------------------------------------------------


def _connect(host: str, port: int, client_id: str, *, inflight: int = 100) -> Any:
    """A plain paho client (MQTT 5, ``inflight`` QoS 1 unacknowledged), connected and looping:
    set up as every client of ours is (``BrokerSettings.new_client``), but with none of
    MqttLink's spool or reconnect logic."""
    from edge_agent.fleet.mqtt import BrokerSettings

    settings = BrokerSettings(url=f"mqtt://{host}:{port}")
    client = settings.new_client(client_id=client_id, password=None, max_inflight=inflight)
    connected = threading.Event()
    refused: list[str] = []

    def on_connect(client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:  # a refused CONNACK calls on_connect too
            refused.append(str(reason))
        connected.set()

    client.on_connect = on_connect
    client.connect(host, port, keepalive=settings.keepalive)
    client.loop_start()
    if not connected.wait(10):
        raise SystemExit(f"no CONNACK from {host}:{port}")
    if refused:
        client.loop_stop()
        raise SystemExit(f"{host}:{port} refused the connection: {refused[0]}")
    return client


def role_consumer(host: str, port: int, topic: str) -> int:
    """Subscribes to ``topic`` (QoS 1), parses every payload, counts per topic and in a window.

    stdin commands: ``mark`` starts the window (counts and CPU from now), ``stats`` prints a
    JSON line, ``quit`` exits. Prints ``ready`` after the SUBACK."""
    import psutil

    lock = threading.Lock()
    per_topic: dict[str, list[Any]] = {}  # topic -> [count, set of seq]
    win = {"n": 0, "retained": 0, "keys": set(), "t0": time.monotonic()}
    proc = psutil.Process()
    cpu0 = [sum(proc.cpu_times()[:2])]

    def on_message(client: Any, userdata: Any, msg: Any) -> None:
        data = json.loads(msg.payload)
        seq = data.get("seq")
        with lock:
            entry = per_topic.setdefault(msg.topic, [0, set()])
            entry[0] += 1
            entry[1].add(seq)
            if msg.retain:
                win["retained"] += 1
            else:
                win["n"] += 1
                win["keys"].add((msg.topic, seq))

    subscribed = threading.Event()
    client = _connect(host, port, f"bench-consumer-{os.getpid()}")
    client.on_message = on_message
    client.on_subscribe = lambda *a: subscribed.set()
    client.subscribe(topic, qos=1)
    subscribed.wait(10)
    print("ready", flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "mark":
            with lock:
                win.update(n=0, retained=0, keys=set(), t0=time.monotonic())
                cpu0[0] = sum(proc.cpu_times()[:2])
            print("ok", flush=True)
        elif cmd == "stats":
            with lock:
                topics = {
                    t: {
                        "n": e[0],
                        "unique": len(e[1]),
                        "min": min(e[1], default=None),
                        "max": max(e[1], default=None),
                    }
                    for t, e in per_topic.items()
                }
                out = {
                    "topics": topics if len(topics) <= 50 else {},
                    "window": {
                        "n": win["n"],
                        "unique": len(win["keys"]),
                        "retained": win["retained"],
                        "seconds": time.monotonic() - win["t0"],
                        "cpu_s": sum(proc.cpu_times()[:2]) - cpu0[0],
                    },
                }
            print(json.dumps(out), flush=True)
        elif cmd == "quit":
            break
    client.disconnect()
    client.loop_stop()
    return 0


def role_simulator(host: str, port: int, devices: int, connections: int) -> int:
    """``devices`` simulated devices over ``connections`` paho connections, each device
    publishing retained telemetry and retained status (online) once per second, spread evenly
    over the second. Prints ``ready`` once every device's first pair is acknowledged; stdin
    ``stats`` prints counters as a JSON line, ``quit`` stops."""
    names = [f"dev-{i:04d}" for i in range(devices)]
    slices = [names[k::connections] for k in range(connections)]
    stop = threading.Event()
    counters = [{"published": 0, "acked": 0, "late": 0, "max_lag_s": 0.0} for _ in slices]
    clients = []
    for k in range(connections):
        client = _connect(host, port, f"bench-sim-{k}", inflight=200)

        def on_publish(*a: Any, c: dict[str, Any] = counters[k]) -> None:
            c["acked"] += 1  # one network thread per client

        client.on_publish = on_publish
        clients.append(client)
    start = time.monotonic() + 0.2
    t_wall0 = time.time()

    def run(k: int) -> None:
        client, mine, c = clients[k], slices[k], counters[k]
        step = 1.0 / len(mine)
        second = 0
        while not stop.is_set():
            for i, device in enumerate(mine):
                due = start + second + i * step
                lag = time.monotonic() - due
                if lag < 0:
                    if stop.wait(-lag):
                        return
                elif lag > 0.1:
                    c["late"] += 1
                    c["max_lag_s"] = max(c["max_lag_s"], lag)
                now = time.time()
                tel = telemetry_payload(device, second, now, now - t_wall0 + 60.0)
                base = f"{PREFIX}/{device}"
                client.publish(f"{base}/telemetry", json.dumps(tel), qos=1, retain=True)
                client.publish(
                    f"{base}/status", json.dumps(status_payload(device, now)), qos=1, retain=True
                )
                c["published"] += 2
            second += 1

    threads = [threading.Thread(target=run, args=(k,), daemon=True) for k in range(connections)]
    for t in threads:
        t.start()
    while sum(c["acked"] for c in counters) < 2 * devices:
        time.sleep(0.05)
    print("ready", flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "stats":
            out = {
                "t": time.monotonic(),
                "published": sum(c["published"] for c in counters),
                "acked": sum(c["acked"] for c in counters),
                "late": sum(c["late"] for c in counters),
                "max_lag_s": round(max(c["max_lag_s"] for c in counters), 3),
            }
            print(json.dumps(out), flush=True)
        elif cmd == "quit":
            break
    stop.set()
    for t in threads:
        t.join(timeout=2)
    for client in clients:
        client.disconnect()
        client.loop_stop()
    return 0


class Helper:
    """A ``--role`` process, talked to line by line over stdin/stdout."""

    def __init__(self, *args: str) -> None:
        import psutil

        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.mqtt", "--role", *args],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.ps = psutil.Process(self.proc.pid)
        line = self._readline()
        if line != "ready":
            raise RuntimeError(f"helper {args[0]}: expected 'ready', got {line!r}")

    def _readline(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"helper exited with {self.proc.wait()}")
        return line.strip()

    def ask(self, cmd: str) -> Any:
        assert self.proc.stdin is not None
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        reply = self._readline()
        return reply if cmd == "mark" else json.loads(reply)

    def cpu_s(self) -> float:
        t = self.ps.cpu_times()
        return float(t.user + t.system)

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


def broker_cpu(broker: Any) -> Callable[[], float]:
    """CPU seconds of the Mosquitto process (informational: a separate process)."""
    import psutil

    proc = next(
        (p for p in psutil.Process().children(recursive=True) if "mosquitto" in p.name()), None
    )
    if proc is None:
        return lambda: float("nan")
    return lambda: float(sum(proc.cpu_times()[:2]))


# --- part 1: the cost of publishing ----------------------------------------------------------


def paced(seconds: float, rate: float, write: Callable[[dict[str, Any]], None]) -> int:
    """Build one result dict every 1/rate s (an absolute schedule) and hand it to ``write``."""
    n = int(seconds * rate)
    t0 = time.monotonic()
    for i in range(n):
        delay = t0 + i / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        write(result_payload(i, time.time()))
    return n


def measure_cpu(seconds: float, write: Callable[[dict[str, Any]], None]) -> tuple[float, int]:
    """This process's CPU seconds (all threads) over the paced run plus the tail."""
    sent = [0]
    thread = threading.Thread(target=lambda: sent.__setitem__(0, paced(seconds, RATE, write)))
    c0 = time.process_time()
    thread.start()
    thread.join()
    time.sleep(TAIL_S)
    return time.process_time() - c0, sent[0]


def wait_delivered(consumer: Helper, topic: str, want: int, timeout: float = 15.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        stats = consumer.ask("stats")["topics"].get(topic, {"n": 0, "unique": 0})
        if stats["unique"] >= want or time.monotonic() > deadline:
            return stats
        time.sleep(0.1)


def agent_run(
    broker: Any, bcpu: Callable[[], float], tmp: Path, topic: str, seconds: float, *, write: bool
) -> dict[str, Any]:
    from edge_agent.fleet.mqtt import BrokerSettings, MqttLink
    from edge_agent.fleet.spool import Spool
    from edge_agent.io.sinks import MqttResultSink

    spool_dir = Path(tempfile.mkdtemp(dir=tmp))
    spool = Spool(spool_dir / "spool.sqlite")
    link = MqttLink(
        BrokerSettings(url=broker.url), client_id=f"bench-agent-{spool_dir.name}", spool=spool
    )
    sink = MqttResultSink(spool, topic)
    link.start()
    if not link.wait_connected(10):
        raise RuntimeError(f"MqttLink: {link.last_error}")
    time.sleep(0.3)
    b0 = bcpu()
    cpu, sent = measure_cpu(seconds, sink.write if write else (lambda r: None))
    depth_at_end = spool.depth()
    broker_s = bcpu() - b0
    deadline = time.monotonic() + 10
    while write and not link.drained() and time.monotonic() < deadline:
        time.sleep(0.05)
    commits = spool.stats.commits
    link.stop()
    spool.close()
    shutil.rmtree(spool_dir, ignore_errors=True)
    return {
        "cpu_s": cpu,
        "sent": sent if write else 0,
        "spool_depth_at_window_end": depth_at_end,
        "commits": commits,
        "broker_cpu_s": broker_s,
    }


def naive_run(
    broker: Any, bcpu: Callable[[], float], topic: str, seconds: float, *, write: bool
) -> dict[str, Any]:
    client = _connect(broker.host, broker.port, f"bench-naive-{time.monotonic_ns()}", inflight=20)
    infos: list[Any] = []

    def publish(result: dict[str, Any]) -> None:
        infos.append(client.publish(topic, json.dumps(result), qos=1))

    time.sleep(0.3)
    b0 = bcpu()
    cpu, sent = measure_cpu(seconds, publish if write else (lambda r: None))
    broker_s = bcpu() - b0
    for info in infos:
        info.wait_for_publish(5)
    client.disconnect()
    client.loop_stop()
    return {"cpu_s": cpu, "sent": sent if write else 0, "broker_cpu_s": broker_s}


def publishing_cost(tmp: Path, *, seconds: float, rounds: int) -> dict[str, Any]:
    from tests.broker import Broker

    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in ("agent", "agent0", "naive", "naive0")}
    delivered: dict[str, list[dict[str, Any]]] = {"agent": [], "naive": []}
    with Broker(tmp / "broker-publish") as broker:
        bcpu = broker_cpu(broker)
        consumer = Helper("consumer", broker.host, str(broker.port), f"{PREFIX}/+/results")
        try:
            # The paced thread alone, nothing connected: what the idle baselines sit on.
            pacer_cpu, _ = measure_cpu(PACER_ONLY_S, lambda r: None)
            for r in range(rounds):
                order = ["agent0", "agent", "naive0", "naive"]
                if r % 2:
                    order = order[2:] + order[:2]
                for kind in order:
                    topic = f"{PREFIX}/bench-{kind}-{r}/results"
                    write = not kind.endswith("0")
                    if kind.startswith("agent"):
                        run = agent_run(broker, bcpu, tmp, topic, seconds, write=write)
                    else:
                        run = naive_run(broker, bcpu, topic, seconds, write=write)
                    if write:
                        got = wait_delivered(consumer, topic, run["sent"])
                        run["delivered"] = got["unique"]
                        run["received"] = got["n"]
                        delivered[kind].append(got)
                    runs[kind].append(run)
                    print(f"publish round {r} {kind}: {json.dumps(run)}", flush=True)
        finally:
            consumer.close()

    def pct(kind: str) -> list[float]:
        return [
            round((a["cpu_s"] - b["cpu_s"]) / seconds * 100, 3)
            for a, b in zip(runs[kind], runs[kind + "0"])
        ]

    out: dict[str, Any] = {"rate_per_s": RATE, "seconds": seconds, "tail_s": TAIL_S}
    for kind in ("agent", "naive"):
        per_round = pct(kind)
        sent = sum(x["sent"] for x in runs[kind])
        got = sum(x["delivered"] for x in runs[kind])
        out[kind] = {
            "cpu_percent": statistics.median(per_round),
            "cpu_percent_rounds": per_round,
            "baseline_cpu_percent": round(
                statistics.median(x["cpu_s"] for x in runs[kind + "0"]) / (seconds + TAIL_S) * 100,
                3,
            ),
            "sent": sent,
            "delivered": got,
            "received_incl_duplicates": sum(x["received"] for x in runs[kind]),
            "all_delivered": all(x["delivered"] == x["sent"] for x in runs[kind]),
            "broker_cpu_percent": round(
                statistics.median(x["broker_cpu_s"] for x in runs[kind]) / seconds * 100, 2
            ),
        }
    out["agent"]["spool_commits_per_run"] = statistics.median(x["commits"] for x in runs["agent"])
    out["agent"]["spool_depth_at_window_end"] = max(
        x["spool_depth_at_window_end"] for x in runs["agent"]
    )
    # What being connected costs with nothing to send: the idle baselines minus the pacer alone.
    pacer_pct = pacer_cpu / (PACER_ONLY_S + TAIL_S) * 100
    out["pacer_only_cpu_percent"] = round(pacer_pct, 3)
    for kind in ("agent", "naive"):
        out[kind]["idle_connected_cpu_percent"] = round(
            out[kind]["baseline_cpu_percent"] - pacer_pct, 3
        )
        out[kind]["total_cpu_percent"] = round(
            out[kind]["cpu_percent"] + out[kind]["idle_connected_cpu_percent"], 3
        )
    out["runs"] = runs
    return out


# --- part 2: a 10 MB bundle over MQTT --------------------------------------------------------


def bundle_transfer(tmp: Path, profile: Any, *, rounds: int) -> dict[str, Any]:
    from edge_agent.common.hashing import sha256_file
    from edge_agent.fleet.fetch import ChunkFetcher
    from edge_agent.fleet.mqtt import BrokerSettings, MqttLink
    from edge_agent.fleet.protocol import DEFAULT_CHUNK_SIZE
    from edge_agent.model.bundle import ArtifactInput, verify_bundle, write_bundle
    from edge_agent.model.keys import generate_keypair, load_private_key, load_trusted_keys
    from edgectl.cli import Client, publish_bundle
    from tests.broker import Broker

    work = tmp / "bundle"
    work.mkdir()
    artifact = work / "model.onnx"
    artifact.write_bytes(os.urandom(BUNDLE_MB * 2**20))
    private, public = generate_keypair(work / "keys")
    bundle = work / "bench.edgebundle"
    write_bundle(
        bundle,
        manifest={"name": "bench", "version": "1.0.0"},
        artifacts=[
            ArtifactInput(
                path=artifact, format="onnx-fp32", precision="fp32", profiles=(profile.name,)
            )
        ],
        signing_key=load_private_key(private),
    )
    size = bundle.stat().st_size
    want_sha = sha256_file(bundle)
    trusted = load_trusted_keys([public])
    publish_s, fetch_s, verify_s, connect_s = [], [], [], []
    with Broker(tmp / "broker-bundle") as broker:
        args = argparse.Namespace(
            broker=broker.url,
            prefix=PREFIX,
            username=None,
            password_file=None,
            ca_file=None,
            cert_file=None,
            key_file=None,
        )
        for r in range(rounds):
            t0 = time.perf_counter()
            with Client(args) as client:
                t1 = time.perf_counter()
                sha, _, _ = publish_bundle(client, bundle, chunk_size=DEFAULT_CHUNK_SIZE)
                publish_s.append(time.perf_counter() - t1)
            connect_s.append(t1 - t0)
            assert sha == want_sha
            downloads = work / f"downloads-{r}"
            downloads.mkdir()
            fetcher_box: list[Any] = []
            link = MqttLink(
                BrokerSettings(url=broker.url),
                client_id=f"bench-device-{r}",
                on_message=lambda msg, box=fetcher_box: box[0].handle(msg.topic, msg.payload),
            )
            fetcher = ChunkFetcher(
                subscribe=link.subscribe,
                unsubscribe=link.unsubscribe,
                downloads=downloads,
                prefix=PREFIX,
                timeout=30.0,
                max_bytes=64 * 2**20,
            )
            fetcher_box.append(fetcher)
            link.start()
            if not link.wait_connected(10):
                raise RuntimeError(f"MqttLink: {link.last_error}")
            t0 = time.perf_counter()
            path = fetcher.fetch(sha, cancel=threading.Event())
            fetch_s.append(time.perf_counter() - t0)
            link.stop()
            assert sha256_file(path) == want_sha
            t0 = time.perf_counter()
            verify_bundle(path, trusted_keys=trusted)
            verify_s.append(time.perf_counter() - t0)
            shutil.rmtree(downloads)
            print(
                f"bundle round {r}: publish {publish_s[-1]:.3f} s, fetch {fetch_s[-1]:.3f} s",
                flush=True,
            )

    def med(v: list[float]) -> float:
        return round(statistics.median(v), 3)

    return {
        "bundle_bytes": size,
        "chunk_size": DEFAULT_CHUNK_SIZE,
        "chunks": -(-size // DEFAULT_CHUNK_SIZE),
        "publish_s": med(publish_s),
        "fetch_s": med(fetch_s),
        "total_s": med([p + f for p, f in zip(publish_s, fetch_s)]),
        "connect_s": med(connect_s),
        "verify_signature_s": med(verify_s),
        "fetch_mb_per_s": round(size / 2**20 / statistics.median(fetch_s), 1),
        "rounds": rounds,
        "publish_s_rounds": [round(v, 3) for v in publish_s],
        "fetch_s_rounds": [round(v, 3) for v in fetch_s],
    }


# --- part 3: a swap under a live stream ------------------------------------------------------


def swap_test(tmp: Path, profile: Any) -> dict[str, Any]:
    from benchmarks.agent import write_video
    from converters import zoo
    from edge_agent.io import open_source
    from edge_agent.io.sinks import CallbackSink
    from edge_agent.model.loader import load_model
    from edge_agent.pipeline import Pipeline

    frames, fps = 300, 60.0
    work = tmp / "swap"
    work.mkdir()
    video = work / "scene.mp4"
    write_video(video, frames=frames, fps=fps)
    first = work / "small-a.onnx"
    first.write_bytes(
        zoo.export_onnx(zoo.resnet_style(width=8), (1, 3, 128, 128), dynamic_batch=False)
    )
    second = work / "small-b.onnx"
    shutil.copyfile(first, second)
    model = load_model(first, profile=profile, state_dir=work, threads=profile.cores)
    records: list[tuple[int, int, str, float]] = []
    progressed = threading.Condition()

    def keep(r: dict[str, Any]) -> None:
        with progressed:
            records.append((r["seq"], r["frame"], r["model"]["name"], r["result_ts"]))
            progressed.notify_all()

    pipe = Pipeline(
        source=open_source(f"file:{video}", pace="native"),
        model=model,
        sinks=[CallbackSink(keep)],
        workers=model.workers,
    )
    info: dict[str, Any] = {}

    def swapper() -> None:
        with progressed:
            progressed.wait_for(lambda: len(records) >= 100, timeout=30)
        t0 = time.perf_counter()
        new = load_model(second, profile=profile, state_dir=work, threads=profile.cores)
        info["load_ms"] = round((time.perf_counter() - t0) * 1000, 1)
        with progressed:
            progressed.wait_for(lambda: len(records) >= 150, timeout=30)
        info["swap_requested_at_result"] = len(records)
        t0 = time.perf_counter()
        info["old"] = pipe.swap_model(new)
        info["swap_call_ms"] = round((time.perf_counter() - t0) * 1000, 2)

    thread = threading.Thread(target=swapper)
    thread.start()
    summary = pipe.run()
    thread.join()
    info.pop("old").close()
    pipe.model.close()
    records.sort()
    seqs = [r[0] for r in records]
    idx = next((i for i, r in enumerate(records) if r[2] == second.stem), None)
    gaps = [(b[3] - a[3]) * 1000 for a, b in zip(records, records[1:])]
    median_gap = statistics.median(gaps)
    around = gaps[max(0, idx - 5) : idx + 5] if idx is not None else []
    stall = max(around) if around else float("nan")
    return {
        "frames_in_file": frames,
        "fps": fps,
        "frames_in": summary["frames"],
        "results_out": len(records),
        "lost": summary["frames"] - len(records),
        "seq_contiguous": seqs == list(range(len(seqs))),
        "frames_contiguous": [r[1] for r in records] == list(range(len(records))),
        "swaps": summary["swaps"],
        "first_new_model_seq": records[idx][0] if idx is not None else None,
        "old_model_results": sum(1 for r in records if r[2] == first.stem),
        "new_model_results": sum(1 for r in records if r[2] == second.stem),
        "median_gap_ms": round(median_gap, 2),
        "max_gap_around_swap_ms": round(stall, 2),
        "stall_over_median": round(stall / median_gap, 2),
        "max_gap_anywhere_ms": round(max(gaps), 2),
        "inference_errors": summary["inference_errors"],
        **info,
    }


# --- part 4: edgectl status over 1,000 devices -----------------------------------------------


def fleet_test(tmp: Path) -> dict[str, Any]:
    from tests.broker import Broker

    with Broker(tmp / "broker-fleet") as broker:
        bcpu = broker_cpu(broker)
        sim = Helper("simulator", broker.host, str(broker.port), str(DEVICES), str(SIM_CONNECTIONS))
        consumer = None
        try:
            time.sleep(2.0)  # steady state: every device has published more than once
            exe = Path(sys.executable).parent / "edgectl"
            cmd = [str(exe), "--broker", broker.url, "status", "--json", "--timeout", "2"]
            t0 = time.perf_counter()
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
            status_wall = time.perf_counter() - t0
            if done.returncode != 0:
                raise RuntimeError(f"edgectl status exited {done.returncode}: {done.stderr}")
            rows = [r for r in json.loads(done.stdout) if r["device"].startswith("dev-")]
            fresh = [
                r
                for r in rows
                if r["online"] and r["last_seen_s"] is not None and r["last_seen_s"] < 3
            ]
            consumer = Helper("consumer", broker.host, str(broker.port), f"{PREFIX}/+/telemetry")
            time.sleep(0.5)
            s0, sc0, b0 = sim.ask("stats"), sim.cpu_s(), bcpu()
            consumer.ask("mark")
            time.sleep(FLEET_WINDOW_S)
            window = consumer.ask("stats")["window"]
            s1, sc1, b1 = sim.ask("stats"), sim.cpu_s(), bcpu()
        finally:
            if consumer is not None:
                consumer.close()
            sim.close()
    sim_s = s1["t"] - s0["t"]
    expected = DEVICES * FLEET_WINDOW_S
    published_telemetry = (s1["published"] - s0["published"]) / 2
    return {
        "devices": DEVICES,
        "connections": SIM_CONNECTIONS,
        "offered_msgs_per_s": 2 * DEVICES,
        "status_wall_s": round(status_wall, 3),
        "status_collect_s": 2.0,
        "status_listed": len(rows),
        "status_fresh": len(fresh),
        "status_max_last_seen_s": max((r["last_seen_s"] or 0) for r in rows) if rows else None,
        "sim_published_per_s": round((s1["published"] - s0["published"]) / sim_s, 1),
        "sim_acked_per_s": round((s1["acked"] - s0["acked"]) / sim_s, 1),
        "sim_late_publishes": s1["late"],
        "sim_max_lag_s": s1["max_lag_s"],
        "sim_cpu_percent": round((sc1 - sc0) / sim_s * 100, 1),
        "broker_cpu_percent": round((b1 - b0) / sim_s * 100, 1),
        "consumer_window_s": round(window["seconds"], 2),
        "consumer_received": window["n"],
        "consumer_unique": window["unique"],
        "consumer_msgs_per_s": round(window["n"] / window["seconds"], 1),
        "consumer_of_nominal": round(window["n"] / expected, 4),
        "consumer_of_published": round(window["n"] / published_telemetry, 4)
        if published_telemetry
        else None,
        "consumer_cpu_percent": round(window["cpu_s"] / window["seconds"] * 100, 1),
    }


# --- report -----------------------------------------------------------------------------------


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    p, b, s, f = result["publish"], result["bundle"], result["swap"], result["fleet"]
    return [
        {
            "target": f"agent publishing {RATE:g} results/s: CPU % of one core",
            "value": p["agent"]["cpu_percent"],
            "limit": "<= 5",
            "met": p["agent"]["cpu_percent"] <= 5,
        },
        {
            "target": "agent publishing: results delivered / sent",
            "value": f"{p['agent']['delivered']}/{p['agent']['sent']}",
            "limit": "all",
            "met": p["agent"]["all_delivered"],
        },
        {
            "target": f"{BUNDLE_MB} MB bundle: device fetch (s)",
            "value": b["fetch_s"],
            "limit": "<= 3",
            "met": b["fetch_s"] <= 3,
        },
        {
            "target": "swap mid-stream: frames lost",
            "value": s["lost"],
            "limit": "0 (and seq contiguous)",
            "met": s["lost"] == 0 and s["seq_contiguous"] and s["swaps"] == 1,
        },
        {
            "target": f"edgectl status: devices listed and fresh (< 3 s) of {DEVICES}",
            "value": f"{f['status_fresh']}/{DEVICES}",
            "limit": f"{DEVICES}/{DEVICES}",
            "met": f["status_fresh"] == DEVICES and f["status_listed"] == DEVICES,
        },
        {
            "target": f"telemetry consumer: received in {FLEET_WINDOW_S:g} s of {DEVICES} devices at 1 Hz",
            "value": f"{f['consumer_received']} ({f['consumer_of_nominal'] * 100:.1f} %)",
            "limit": ">= 99 %",
            "met": f["consumer_of_nominal"] >= 0.99,
        },
    ]


def markdown(result: dict[str, Any]) -> str:
    p, b, s, f = result["publish"], result["bundle"], result["swap"], result["fleet"]
    m = result["machine"]
    yes = {True: "yes", False: "NO"}
    lines = [
        f"MQTT benchmark, {result['when']}, {m['cpu']} ({m['cores']} cores), Mosquitto {result['mosquitto']} on loopback, paho-mqtt {result['paho']}. `make bench`.",
        "",
        f"**Publishing {RATE:g} results/s for {p['seconds']:g} s** (medians of {len(p['agent']['cpu_percent_rounds'])} alternating rounds). CPU of this process (all threads) over the run + {TAIL_S:g} s drain, minus an identical run whose paced thread builds the dicts but does not publish; divided by the {p['seconds']:g} s. The consumer is a separate process.",
        "",
        "| path | publishing CPU % of one core | rounds | idle but connected CPU % (not in the first column) | total CPU % (both) | sent | delivered (unique seq) | received | broker CPU % |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for kind, label in (
        ("agent", "agent: MqttResultSink → Spool (SQLite, fsync) → MqttLink"),
        ("naive", "naive: paho loop_start, json.dumps + publish QoS 1"),
    ):
        r = p[kind]
        lines.append(
            f"| {label} | {r['cpu_percent']} | {', '.join(str(v) for v in r['cpu_percent_rounds'])} | {r['idle_connected_cpu_percent']} | {r['total_cpu_percent']} | {r['sent']} | {r['delivered']} | {r['received_incl_duplicates']} | {r['broker_cpu_percent']} |"
        )
    lines += [
        "",
        f"Idle but connected = the baseline run ({p['agent']['baseline_cpu_percent']} % agent, {p['naive']['baseline_cpu_percent']} % naive) minus the paced thread alone ({p['pacer_only_cpu_percent']} %, one {PACER_ONLY_S:g} s run). Spool commits per agent run: {p['agent']['spool_commits_per_run']}; spool depth at the end of the CPU window: {p['agent']['spool_depth_at_window_end']}.",
        "",
        f"**{b['bundle_bytes'] / 2**20:.1f} MB signed bundle** ({b['chunks']} chunks of {b['chunk_size'] // 1024} KiB), medians of {b['rounds']}.",
        "",
        "| step | seconds | rounds |",
        "|---|---:|---|",
        f"| edgectl publish_bundle (retained chunks + meta, every PUBACK) | {b['publish_s']} | {', '.join(map(str, b['publish_s_rounds']))} |",
        f"| device ChunkFetcher on MqttLink → sha256-verified file | {b['fetch_s']} ({b['fetch_mb_per_s']} MB/s) | {', '.join(map(str, b['fetch_s_rounds']))} |",
        f"| publish + fetch | {b['total_s']} | |",
        f"| (not in the above) edgectl connect | {b['connect_s']} | |",
        f"| (not in the above) signature + artifact verification of the fetched bundle | {b['verify_signature_s']} | |",
        "",
        f"**Swap mid-stream**: {s['frames_in_file']}-frame 640x480 video at {s['fps']:g} fps, paced natively; a second copy of the model loaded while serving ({s.get('load_ms')} ms), `swap_model` from another thread after {s.get('swap_requested_at_result')} results.",
        "",
        "| frames in | results out | lost | seq contiguous | first seq on the new model | swap call ms | median gap ms | max gap around the swap ms | / median | max gap anywhere ms |",
        "|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|",
        f"| {s['frames_in']} | {s['results_out']} | {s['lost']} | {yes[s['seq_contiguous']]} | {s['first_new_model_seq']} | {s.get('swap_call_ms')} | {s['median_gap_ms']} | {s['max_gap_around_swap_ms']} | {s['stall_over_median']} | {s['max_gap_anywhere_ms']} |",
        "",
        f"**Fleet**: {f['devices']} simulated devices over {f['connections']} connections in one process, retained telemetry + retained status at 1 Hz each ({f['offered_msgs_per_s']} msgs/s offered).",
        "",
        "| simulator published msgs/s | acked msgs/s | simulator CPU % | broker CPU % | edgectl status wall s (2 s collect) | listed | fresh (< 3 s) | max last seen s | consumer msgs in 10 s | msgs/s | of nominal | of published | consumer CPU % |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {f['sim_published_per_s']} | {f['sim_acked_per_s']} | {f['sim_cpu_percent']} | {f['broker_cpu_percent']} | {f['status_wall_s']} | {f['status_listed']} | {f['status_fresh']} | {f['status_max_last_seen_s']} | {f['consumer_received']} | {f['consumer_msgs_per_s']} | {f['consumer_of_nominal']} | {f['consumer_of_published']} | {f['consumer_cpu_percent']} |",
        "",
        "| target | value | limit | met |",
        "|---|---:|---|---|",
    ]
    lines += [
        f"| {t['target']} | {t['value']} | {t['limit']} | {yes[t['met']]} |"
        for t in result["targets"]
    ]
    return "\n".join(lines) + "\n"


def _versions() -> tuple[str, str]:
    from importlib.metadata import version

    from tests.broker import mosquitto_binary

    out = subprocess.run([mosquitto_binary(), "-h"], capture_output=True, text=True)
    first = (out.stdout or out.stderr).splitlines()[0] if (out.stdout or out.stderr) else ""
    mosq = first.split("version")[-1].strip() if "version" in first else "?"
    return mosq, version("paho-mqtt")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=10.0, help="part 1: seconds per run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--role", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role:
        role, *rest = args.role
        if role == "consumer":
            return role_consumer(rest[0], int(rest[1]), rest[2])
        if role == "simulator":
            return role_simulator(rest[0], int(rest[1]), int(rest[2]), int(rest[3]))
        parser.error(f"unknown role {role!r}")

    from edge_agent.model.profiles import detect_host_profile

    check_payload_schemas()
    profile = detect_host_profile()
    mosq, paho = _versions()
    t_start = time.monotonic()
    result: dict[str, Any] = {
        "benchmark": "mqtt",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "cpu": profile.cpu,
            "cores": profile.cores,
            "features": list(profile.cpu_features),
        },
        "mosquitto": mosq,
        "paho": paho,
    }
    with tempfile.TemporaryDirectory(prefix="edge-mqtt-bench-") as tmp_name:
        tmp = Path(tmp_name)
        result["publish"] = publishing_cost(tmp, seconds=args.seconds, rounds=args.rounds)
        result["bundle"] = bundle_transfer(tmp, profile, rounds=args.rounds)
        print("bundle", json.dumps(result["bundle"]), flush=True)
        result["swap"] = swap_test(tmp, profile)
        print("swap", json.dumps(result["swap"]), flush=True)
        result["fleet"] = fleet_test(tmp)
        print("fleet", json.dumps(result["fleet"]), flush=True)
    result["elapsed_s"] = round(time.monotonic() - t_start, 1)
    result["targets"] = targets(result)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "mqtt.json").write_text(json.dumps(result, indent=2) + "\n")
    text = markdown(result)
    (args.out / "mqtt.md").write_text(text)
    print(text)
    return 0 if all(t["met"] for t in result["targets"]) else 1


if __name__ == "__main__":
    sys.exit(main())
