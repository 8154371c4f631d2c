"""Simulated devices speaking the real protocol (``edgectl simulate``): size a broker and a
fleet database before buying hardware, and feed the tests and benchmarks.

Each simulated device publishes, like the agent (``docs/mqtt.md``): a retained ``status``
(online) and ``reported`` state once at start, then retained ``telemetry`` at ``rate`` Hz with
a ``seq`` that grows, an event every ``events_every`` telemetry messages (``drift`` every
tenth, else ``plan_tuned``), and optionally results. Device number ``i`` of the list sends its
events at the seqs where ``(seq + i) % events_every == 0`` (:func:`has_event`; results likewise):
a fleet's events are spread evenly over time, as real ones are, instead of all coming in one
period.
Devices are spread over a few MQTT connections (``connections``) and evenly over each period, on
an absolute schedule, so a slow broker shows as lag (``late``, ``max_lag_s``) rather than as a
lower rate. :meth:`Simulator.stop` waits for the broker's PUBACK of everything handed to paho
before it disconnects, so ``stats()`` counts what the broker accepted.

Each connection is set up from the broker settings every ``edgectl`` command uses (``--broker``,
``--username``/``--password-file``, the TLS files: ``BrokerSettings.new_client``), and a
connection the broker refuses (its CONNACK: bad credentials, not authorized) is a
``BrokerError`` with the reason (``edgectl`` exit 5), never a simulator that runs on and counts
every publish as ``failed``.

Every payload validates against ``edge_agent.fleet.protocol.SCHEMAS``
(``tests/test_fleetdb.py``, ``benchmarks/mqtt.py``).
"""

from __future__ import annotations

import json
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from edge_agent.errors import BrokerError, ConfigError
from edge_agent.fleet import protocol
from edge_agent.fleet.mqtt import BrokerSettings

MODEL = {"name": "resnet-small", "version": "1.4.2"}


# --- payloads ---------------------------------------------------------------------------------


def result_payload(seq: int, now: float) -> dict[str, Any]:
    """The JSONL / MQTT result object as the pipeline builds it (docs/mqtt.md, ``result``)."""
    top = [
        {"index": 7, "label": "forklift", "score": 0.8312},
        {"index": 2, "label": "pallet", "score": 0.1101},
        {"index": 5, "label": "person", "score": 0.0344},
    ]
    return {
        "seq": seq,
        "capture_ts": now - 0.0042,
        "result_ts": now,
        "frame": seq,
        "model": dict(MODEL),
        "latency_ms": {
            "capture_to_result": 4.2113,
            "preprocess": 0.6021,
            "inference": 2.9874,
            "postprocess": 0.0412,
        },
        "output": {
            "kind": "classification",
            "top": top,
            "class": 7,
            "label": "forklift",
            "score": 0.8312,
        },
    }


def telemetry_payload(
    device: str, seq: int, now: float, uptime: float, *, drift: float | None = None
) -> dict[str, Any]:
    """What ``Service.telemetry_payload`` publishes (docs/mqtt.md, ``telemetry``); with
    ``drift``, a drift section whose input score is that value."""

    def pct(p50: float) -> dict[str, float]:
        return {"p50": p50, "p95": round(p50 * 1.6, 4), "p99": round(p50 * 2.3, 4)}

    wobble = (seq % 7) * 0.01
    return {
        "schema": 1,
        "seq": seq,
        "device": device,
        "ts": now,
        "interval_s": 1.0,
        "uptime_s": round(uptime, 3),
        "state": "serving",
        "model": dict(MODEL),
        "spool_depth": 0,
        "pipeline": {
            "fps": round(29.97 - wobble, 3),
            "results": int(uptime * 30),
            "frames": int(uptime * 30),
            "dropped": 0,
            "inference_errors": 0,
            "gated": 0,
            "workers": 1,
            "latency_ms": {
                "capture_to_result": pct(4.21),
                "preprocess": pct(0.61),
                "inference": pct(round(2.98 + wobble, 4)),
                "postprocess": pct(0.04),
                "overhead": pct(0.09),
            },
        },
        "system": {
            "cpu_percent": 41.5,
            "load": [0.82, 0.71, 0.64],
            "ram_percent": 37.2,
            "ram_used_mb": 1480.3,
            "disk_percent": 22.1,
            "cpu_temp_c": round(54.2 + wobble * 10, 2),
            "throttled": None,
            "process_rss_mb": 96.4,
        },
        "monitoring": {
            "samples": 30,
            "input": {"input": {"mean": [0.4412, 0.4267, 0.3981], "std": [0.2213, 0.2154, 0.2302]}},
            "output": {
                "class_histogram": [0.0, 0.0, 0.1, 0.0, 0.0, 0.03, 0.0, 0.87, 0.0, 0.0],
                "mean_top1": 0.8312,
                "errors": 0,
            },
            "drift": None
            if drift is None
            else {
                "input": drift,
                "output": 0.05,
                "threshold": 3.0,
                "output_threshold": 0.5,
                "drifted": drift > 3.0,
                "reasons": [],
            },
        },
    }


def status_payload(device: str, now: float) -> dict[str, Any]:
    return protocol.status_payload(
        "online", device=device, agent_version="0.1.0", model=MODEL, profile="rpi4",
        groups=("bench",), ts=now,
    )  # fmt: skip


def reported_payload(device: str, now: float) -> dict[str, Any]:
    update = {"sha256": "ab" * 32, "version": MODEL["version"], "state": "committed",
              "reason": None, "deployment": "sim-1"}  # fmt: skip
    return protocol.reported_payload(
        device=device, model=MODEL, bundle_sha256="ab" * 32, update=update, floor="1.4.2",
        history=[], ts=now,
    )  # fmt: skip


def event_payload(device: str, seq: int, now: float) -> dict[str, Any]:
    if seq % 10 == 9:
        return protocol.event_payload(
            "drift", device=device, seq=seq, ts=now, reason="input drift 3.4 > 3", input=3.4
        )
    return protocol.event_payload("plan_tuned", device=device, seq=seq, ts=now, plan="1x2")


def has_event(seq: int, index: int, every: int) -> bool:
    """Whether device number ``index`` of a simulated fleet sends an event with telemetry
    ``seq`` (an event every ``every`` telemetry messages, 0: none; phases spread over the
    fleet)."""
    return every > 0 and (seq + index) % every == 0


def device_names(count: int, *, start: int = 0, stem: str = "sim") -> list[str]:
    width = max(4, len(str(start + count - 1)))
    return [f"{stem}-{i:0{width}d}" for i in range(start, start + count)]


# --- the simulator ----------------------------------------------------------------------------


@dataclass
class Counters:
    published: dict[str, int] = field(default_factory=dict)  # per stream, handed to paho
    acked: int = 0  # PUBACKs with a success code
    refused: int = 0  # PUBACKs with a failure code (an ACL, a quota)
    failed: int = 0  # publish() refused at once (not connected): not counted as published
    late: int = 0
    max_lag_s: float = 0.0

    def count(self, stream: str) -> None:
        self.published[stream] = self.published.get(stream, 0) + 1


class Simulator:
    """``devices`` simulated devices on the ``broker`` (its URL, credentials and TLS files).

    ``rate``: telemetry messages per device per second; ``count``: stop each device after this
    many telemetry messages (0: until :meth:`stop`); ``events_every``: an event every N
    telemetry messages (0: none); ``results_every``: a result every N (0: none). ``seq_start``
    continues the seqs of an earlier run (a device restarted with its spool)."""

    def __init__(
        self,
        broker: BrokerSettings,
        devices: list[str],
        *,
        rate: float = 1.0,
        count: int = 0,
        events_every: int = 5,
        results_every: int = 0,
        connections: int = 4,
        prefix: str = protocol.DEFAULT_PREFIX,
        seq_start: int = 0,
        retained_state: bool = True,
        client_id: str = "edgectl-simulate",
    ) -> None:
        if rate <= 0:
            raise ConfigError(f"--rate {rate:g}: must be > 0")
        if not devices:
            raise ConfigError("--devices: at least one")
        self.broker, self.devices = broker, list(devices)
        self._password = broker.password(what="--password-file")  # said before connecting
        self.rate, self.count = rate, count
        self.events_every, self.results_every = events_every, results_every
        self.prefix, self.seq_start, self.retained_state = prefix, seq_start, retained_state
        n = max(1, min(connections, len(self.devices)))
        self.slices = [self.devices[k::n] for k in range(n)]
        self._index = {device: i for i, device in enumerate(self.devices)}
        self.counters = [Counters() for _ in self.slices]
        self._client_id = client_id
        self._clients: list[Any] = []
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self._acked = threading.Condition()

    # connections
    def _connect(self, k: int) -> Any:
        b = self.broker
        client = b.new_client(
            client_id=f"{self._client_id}-{k}", password=self._password, max_inflight=500
        )
        connected = threading.Event()
        refused: list[str] = []

        def on_connect(client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
            if getattr(reason, "is_failure", False):
                refused.append(str(reason))
            connected.set()

        client.on_connect = on_connect
        counters = self.counters[k]

        def on_publish(client: Any, userdata: Any, mid: int, reason: Any, props: Any) -> None:
            with self._acked:
                if getattr(reason, "is_failure", False):
                    counters.refused += 1
                else:
                    counters.acked += 1
                self._acked.notify_all()

        client.on_publish = on_publish
        try:
            client.connect(b.host, b.port, keepalive=b.keepalive)
        except ssl.SSLError as exc:
            raise BrokerError(
                f"mqtt {b.safe_url}: TLS handshake failed: {exc.reason or exc}"
            ) from None
        except OSError as exc:
            raise BrokerError(f"mqtt {b.safe_url}: cannot connect: {exc.strerror or exc}") from None
        client.loop_start()
        if not connected.wait(10):
            client.loop_stop()
            raise BrokerError(f"mqtt {b.safe_url}: no CONNACK within 10 s")
        if refused:  # not connected: paho would only retry with the same credentials
            client.loop_stop()
            raise BrokerError(f"mqtt {b.safe_url}: broker refused the connection: {refused[0]}")
        return client

    def start(self) -> Simulator:
        try:
            for k in range(len(self.slices)):
                self._clients.append(self._connect(k))
        except BaseException:
            self._disconnect()  # those already up
            raise
        t0 = time.monotonic() + 0.1
        self._threads = [
            threading.Thread(target=self._run, args=(k, t0), daemon=True, name=f"sim-{k}")
            for k in range(len(self.slices))
        ]
        for t in self._threads:
            t.start()
        return self

    def _publish(self, k: int, stream: str, topic: str, data: dict[str, Any], *,
                 retain: bool) -> None:  # fmt: skip
        info = self._clients[k].publish(topic, json.dumps(data), qos=1, retain=retain)
        if info.rc == 0:
            self.counters[k].count(stream)
        else:  # not connected: an agent would spool it; the simulator says so
            self.counters[k].failed += 1

    def _run(self, k: int, t0: float) -> None:
        mine, c = self.slices[k], self.counters[k]
        wall0 = time.time()
        if self.retained_state:
            for device in mine:
                now = time.time()
                t = protocol.Topics(device, prefix=self.prefix)
                self._publish(k, "status", t.status, status_payload(device, now), retain=True)
                self._publish(k, "reported", t.reported, reported_payload(device, now),
                              retain=True)  # fmt: skip
        period = 1.0 / self.rate
        step = period / len(mine)
        tick = 0
        while not self._stop.is_set() and (self.count == 0 or tick < self.count):
            seq = self.seq_start + tick
            for i, device in enumerate(mine):
                lag = time.monotonic() - (t0 + tick * period + i * step)
                if lag < 0:
                    if self._stop.wait(-lag):
                        return
                elif lag > 0.1:
                    c.late += 1
                    c.max_lag_s = max(c.max_lag_s, lag)
                now = time.time()
                t = protocol.Topics(device, prefix=self.prefix)
                drift = 3.4 if seq % 10 == 9 else 0.4
                tel = telemetry_payload(device, seq, now, now - wall0 + 60.0, drift=drift)
                self._publish(k, "telemetry", t.telemetry, tel, retain=True)
                if has_event(seq, self._index[device], self.events_every):
                    self._publish(k, "events", t.events, event_payload(device, seq, now),
                                  retain=False)  # fmt: skip
                if has_event(seq, self._index[device], self.results_every):
                    self._publish(k, "results", t.results, result_payload(seq, now),
                                  retain=False)  # fmt: skip
            tick += 1

    # progress
    def published(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for c in self.counters:
            for stream, n in c.published.items():
                total[stream] = total.get(stream, 0) + n
        return total

    def acked(self) -> int:
        with self._acked:
            return sum(c.acked for c in self.counters)

    def _answered(self) -> bool:  # under self._acked
        return sum(c.acked + c.refused for c in self.counters) >= sum(
            sum(c.published.values()) for c in self.counters
        )

    def done(self) -> bool:
        return all(not t.is_alive() for t in self._threads)

    def wait(self, timeout: float, *, until: Callable[[], bool] | None = None) -> bool:
        """Wait until every device finished ``count`` and the broker acknowledged everything
        (or ``until()``); False on timeout."""
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        with self._acked:
            return self._acked.wait_for(
                lambda: (until() if until else False)
                or (self.done() and self._answered()),
                max(0.0, deadline - time.monotonic()),
            )  # fmt: skip

    def run_for(self, duration: float) -> None:
        """Publish until done (with ``count``: every device finished and acknowledged, or
        ``duration`` seconds, by default the count's own time plus a minute), else for
        ``duration`` seconds (0: until Ctrl-C). Ctrl-C ends it early."""
        try:
            if self.count:
                self.wait(timeout=duration or (self.count / self.rate + 60))
                return
            end = time.monotonic() + duration if duration else None
            while end is None or time.monotonic() < end:
                time.sleep(0.2)
        except KeyboardInterrupt:
            pass  # stop, and say what was sent

    def stats(self) -> dict[str, Any]:
        with self._acked:
            refused = sum(c.refused for c in self.counters)
        return {
            "devices": len(self.devices),
            "published": self.published(),
            "acked": self.acked(),
            "refused": refused,
            "failed": sum(c.failed for c in self.counters),
            "late": sum(c.late for c in self.counters),
            "max_lag_s": round(max((c.max_lag_s for c in self.counters), default=0.0), 3),
        }

    def stop(self, *, drain_s: float = 30.0) -> None:
        """Stop publishing, wait (up to ``drain_s``) until the broker has answered every
        message handed to paho (those beyond the in-flight window are still in paho's queue),
        then disconnect: ``stats()`` is then exactly what the broker accepted."""
        self._stop.set()
        for t in self._threads:
            t.join(timeout=5)
        with self._acked:
            self._acked.wait_for(self._answered, drain_s)
        self._disconnect()

    def _disconnect(self) -> None:
        for client in self._clients:
            client.disconnect()
            client.loop_stop()
        self._clients = []

    def __enter__(self) -> Simulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
