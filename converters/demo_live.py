"""The live half of ``make demo``: a loopback MQTT broker, the agent on a generated digits video,
live telemetry in the terminal, a second model version tried in shadow and then rolled out with
``edgectl rollout --require-shadow``, the low-confidence frames the agent captured collected with
``edgectl collect``, and everything the report needs.

The broker is Mosquitto when it is installed, else amqtt (pure Python, MQTT 3.1.1: the agent and
edgectl fall back to it), so the demo needs nothing from apt.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from converters.demo_broker import LoopbackBroker

DEVICE = "demo"
GROUP = "demo"


def digits_video(path: Path, x: np.ndarray, *, size: int = 64, fps: float = 30.0) -> Path:
    """The 8x8 digits scaled up to ``size`` px, one per frame, as an mp4v file."""
    import cv2

    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"mp4v"), fps, (size, size))
    if not writer.isOpened():
        raise SystemExit(f"OpenCV cannot write {path}")
    for img in x[:, 0]:
        grey = np.clip(img * 255.0, 0, 255).astype(np.uint8)
        big = cv2.resize(grey, (size, size), interpolation=cv2.INTER_NEAREST)
        writer.write(cv2.cvtColor(big, cv2.COLOR_GRAY2BGR))
    writer.release()
    return path


@dataclass
class LiveRun:
    """What the live part recorded, for the report."""

    broker: str = ""
    results: list[dict[str, Any]] = field(default_factory=list)
    telemetry: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    swap_ts: float | None = None
    rollout_output: str = ""
    collect_output: str = ""
    samples: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    agent_exit: int | None = None


class _Watch:
    """Subscribes to the device's topics and prints one line per telemetry message."""

    def __init__(self, url: str, run: LiveRun) -> None:
        import paho.mqtt.client as mqtt

        self.run = run
        self.lock = threading.Lock()
        self.last_result: dict[str, Any] | None = None
        host, port = url.split("//", 1)[1].rsplit(":", 1)
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id="demo-watch",
            protocol=mqtt.MQTTv311,
        )  # fmt: skip
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.connect(host, int(port))
        self.client.loop_start()

    def _on_connect(self, client: Any, *_: Any) -> None:
        client.subscribe(f"edge/{DEVICE}/#", qos=1)

    def _on_message(self, _client: Any, _userdata: Any, msg: Any) -> None:
        try:
            payload = json.loads(msg.payload)
        except ValueError:
            return
        kind = msg.topic.rsplit("/", 1)[-1]
        with self.lock:
            if kind == "results":
                self.run.results.append(payload)
                self.last_result = payload
            elif kind == "telemetry" and not msg.retain:
                self.run.telemetry.append(payload)
                self._print(payload)
            elif kind == "events":
                self.run.events.append(payload)
                d = payload.get("details") or {}
                said = f" agreement {d['agreement']} over {d.get('frames')} frames" if (
                    d.get("agreement") is not None) else ""  # fmt: skip
                print(f"  event: {payload.get('kind')}{said} {payload.get('reason') or ''}"
                      .rstrip(), flush=True)  # fmt: skip

    def _print(self, t: dict[str, Any]) -> None:
        p, s = t.get("pipeline", {}), t.get("system", {})
        lat = p.get("latency_ms", {})

        def p50(stage: str) -> str:
            v = (lat.get(stage) or {}).get("p50")
            return "-" if v is None else f"{v:.2f}"

        temp = s.get("cpu_temp_c")
        last = self.last_result or {}
        out = last.get("output") or {}
        model = t.get("model") or {}
        print(
            f"  {time.strftime('%H:%M:%S')}  {model.get('name')} {model.get('version')}  "
            f"fps {p.get('fps', 0):5.1f}  p50 ms: pre {p50('preprocess')} inf {p50('inference')} "
            f"post {p50('postprocess')} e2e {p50('capture_to_result')}  dropped "
            f"{p.get('dropped', 0)}  cpu {s.get('cpu_percent') or 0:.0f}%  temp "
            f"{'n/a' if temp is None else f'{temp:.0f} C'}  latest: "
            f"{out.get('class', '-')} ({out.get('score', 0):.2f})",
            flush=True,
        )

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def _agent_config(out: Path, broker: str, bundle: Path, pub: Path, video: Path) -> Path:
    """The agent's config: the profile the demo's bundles were built for that fits this CPU."""
    import platform

    profile = "raspberry-pi-5" if platform.machine().lower() in ("aarch64", "arm64") else "x86-64"
    cfg = out / "agent.toml"
    cfg.write_text(
        f"""[agent]
device_id = "{DEVICE}"
profile = "{profile}"
state_dir = "{out / "state"}"

[model]
path = "{bundle}"
trusted_keys = ["{pub}"]

[source]
uri = "file:{video}?loop=1&live=1"
pace = "native"

[results]
sinks = []

[mqtt]
broker = "{broker}"
groups = ["{GROUP}"]

[telemetry]
interval = 1.0

[ota]
health_window = 3.0
health_min_frames = 20

[capture]
low_confidence = 0.9
disagreement = true
max_per_minute = 20
"""
    )
    return cfg


def run_live(
    out: Path,
    *,
    v1: Path,
    v2: Path,
    pub: Path,
    video: Path,
    before_s: float,
    after_s: float,
    broker: str = "auto",
) -> LiveRun:
    """Broker, agent, live telemetry, ``edgectl rollout`` of ``v2``, stop."""
    run = LiveRun()
    bin_dir = Path(sys.executable).parent
    with LoopbackBroker(out / "broker", prefer=broker) as mq:
        run.broker = f"{mq.kind} on {mq.url}"
        print(f"broker: {run.broker}", flush=True)
        watch = _Watch(mq.url, run)
        cfg = _agent_config(out, mq.url, v1, pub, video)
        log = (out / "agent.log").open("wb")
        cmd = [str(bin_dir / "edge-agent"), "run", "--config", str(cfg), "--summary",
               str(out / "agent-summary.json")]  # fmt: skip
        print("$ " + " ".join(cmd), flush=True)
        agent = subprocess.Popen(cmd, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        try:
            time.sleep(before_s)
            # the candidate runs in shadow on the canary first, never served, and the
            # rollout goes on only when it agrees with the serving model on 95 % of 60 frames
            rollout = [str(bin_dir / "edgectl"), "--broker", mq.url, "rollout", str(v2),
                       "--group", GROUP, "--canary", "100", "--wait", "30s",
                       "--max-failures", "0", "--public-key", str(pub),
                       "--require-shadow", "0.95", "--frames", "60",
                       "--shadow-timeout", "60s"]  # fmt: skip
            print("$ " + " ".join(rollout[0:1] + rollout[3:]), flush=True)
            res = subprocess.run(rollout, capture_output=True, text=True, timeout=120)
            run.rollout_output = (res.stdout + res.stderr).strip()
            for line in run.rollout_output.splitlines():
                print(f"  {line}", flush=True)
            if res.returncode != 0:
                print(f"  edgectl rollout exited {res.returncode}", flush=True)
            time.sleep(after_s)
            # the low-confidence frames the agent kept ([capture]), from the broker
            collect = [str(bin_dir / "edgectl"), "--broker", mq.url, "collect", "--out",
                       str(out / "samples"), "--device", DEVICE, "--idle", "3s",
                       "--duration", "20s"]  # fmt: skip
            print("$ " + " ".join(collect[0:1] + collect[3:]), flush=True)
            res = subprocess.run(collect, capture_output=True, text=True, timeout=60)
            run.collect_output = (res.stdout + res.stderr).strip()
            for line in run.collect_output.splitlines()[-3:]:
                print(f"  {line}", flush=True)
        finally:
            agent.send_signal(signal.SIGTERM)
            try:
                run.agent_exit = agent.wait(30)
            except subprocess.TimeoutExpired:
                agent.kill()
                run.agent_exit = agent.wait(10)
            time.sleep(0.5)  # the last results in flight
            watch.close()
            log.close()
    index = out / "samples" / "samples.jsonl"
    if index.exists():
        run.samples = [json.loads(line) for line in index.read_text().splitlines() if line]
    summary = out / "agent-summary.json"
    if summary.exists():
        run.summary = json.loads(summary.read_text())
    versions = [
        (r.get("capture_ts", 0.0), (r.get("model") or {}).get("version")) for r in run.results
    ]
    first = versions[0][1] if versions else None
    run.swap_ts = next((ts for ts, v in sorted(versions) if v != first), None)
    return run
