"""Integrations beyond our own protocol: Home Assistant MQTT discovery and a Prometheus text
endpoint.

**Home Assistant** (``[mqtt] home_assistant = true``): on every connect the agent publishes
retained discovery configs under ``homeassistant/sensor/<device>_<key>/config``; the sensors read
the retained telemetry topic with value templates, and availability comes from the retained
status topic (``online``, or ``offline`` from the Will), so a device that dies shows as
unavailable in Home Assistant without anything else running.

**Prometheus** (``[telemetry] prometheus_port = PORT``): ``GET /metrics`` on 127.0.0.1 serves the
latest telemetry in the text exposition format (gauges named ``edge_agent_*``, labelled with the
device and model). Loopback only: a Prometheus or an agent on the device scrapes it.
"""

from __future__ import annotations

import http.server
import json
import logging
import threading
from collections.abc import Callable
from typing import Any

import edge_agent
from edge_agent.fleet.protocol import Topics

log = logging.getLogger(__name__)

#: (key, name, template over the telemetry JSON, unit, device class)
HA_SENSORS = (
    ("fps", "Inference rate", "{{ value_json.pipeline.fps }}", "fps", None),
    (
        "latency_p95",
        "Inference latency p95",
        "{{ value_json.pipeline.latency_ms.inference.p95 }}",
        "ms",
        "duration",
    ),
    ("cpu_temp", "CPU temperature", "{{ value_json.system.cpu_temp_c }}", "°C", "temperature"),
    ("cpu", "CPU", "{{ value_json.system.cpu_percent }}", "%", None),
    ("model_version", "Model version", "{{ value_json.model.version }}", None, None),
    ("dropped", "Dropped frames", "{{ value_json.pipeline.dropped }}", None, None),
    ("spool", "Spooled messages", "{{ value_json.spool_depth }}", None, None),
)


def home_assistant_discovery(
    topics: Topics, device: str, *, discovery_prefix: str = "homeassistant"
) -> list[tuple[str, bytes]]:
    """(topic, retained payload) for every sensor, plus the last label from the results."""
    dev = {
        "identifiers": [f"edge_agent_{device}"],
        "name": f"edge-agent {device}",
        "manufacturer": "edge-inference",
        "model": "edge-agent",
        "sw_version": edge_agent.__version__,
    }
    availability = {
        "topic": topics.status,
        # "stopped" (a clean exit) is unavailable too; HA ignores values it does not know
        "value_template": "{{ 'online' if value_json.state == 'online' else 'offline' }}",
        "payload_available": "online",
        "payload_not_available": "offline",
    }
    out = []
    sensors = [(*s, topics.telemetry) for s in HA_SENSORS]
    sensors.append(
        ("last_label", "Last label", "{{ value_json.output.label }}", None, None, topics.results)
    )
    for key, name, template, unit, device_class, state_topic in sensors:
        config: dict[str, Any] = {
            "name": name,
            "unique_id": f"edge_agent_{device}_{key}",
            "object_id": f"edge_agent_{device}_{key}",
            "state_topic": state_topic,
            "value_template": template,
            "availability": [availability],
            "device": dev,
        }
        if unit:
            config["unit_of_measurement"] = unit
        if device_class:
            config["device_class"] = device_class
        if unit and key != "model_version":
            config["state_class"] = "measurement"
        topic = f"{discovery_prefix}/sensor/{device}_{key}/config"
        out.append((topic, json.dumps(config, separators=(",", ":")).encode()))
    return out


def _label(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ")


def prometheus_text(telemetry: dict[str, Any] | None) -> str:
    """The latest telemetry as Prometheus gauges (empty until the first telemetry)."""
    if not telemetry:
        return ""
    model = telemetry.get("model") or {}
    labels = (
        f'device="{_label(telemetry.get("device"))}",model="{_label(model.get("name"))}",'
        f'version="{_label(model.get("version"))}"'
    )
    lines: list[str] = []

    def gauge(name: str, value: Any, help_text: str, extra: str = "") -> None:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return
        full = f"edge_agent_{name}"
        if not any(line.startswith(f"# HELP {full} ") for line in lines):
            lines.append(f"# HELP {full} {help_text}")
            lines.append(f"# TYPE {full} gauge")
        lab = labels + (f",{extra}" if extra else "")
        lines.append(f"{full}{{{lab}}} {value}")

    p = telemetry.get("pipeline") or {}
    s = telemetry.get("system") or {}
    gauge("fps", p.get("fps"), "Results per second over the last interval.")
    gauge("results_total", p.get("results"), "Results since start.")
    gauge("dropped_total", p.get("dropped"), "Frames dropped by a live source since start.")
    gauge("inference_errors_total", p.get("inference_errors"), "Failed frames since start.")
    for stage, pct in (p.get("latency_ms") or {}).items():
        for q in ("p50", "p95", "p99"):
            gauge(
                "latency_ms",
                (pct or {}).get(q),
                "Per-stage latency over the last interval.",
                f'stage="{_label(stage)}",quantile="{q[1:]}"',
            )
    gauge("cpu_percent", s.get("cpu_percent"), "CPU use of the whole device.")
    gauge("ram_percent", s.get("ram_percent"), "RAM in use.")
    gauge("disk_percent", s.get("disk_percent"), "Disk in use where the state directory is.")
    gauge("cpu_temp_celsius", s.get("cpu_temp_c"), "CPU temperature.")
    gauge("rss_mb", s.get("process_rss_mb"), "Resident memory of the agent.")
    gauge("spool_depth", telemetry.get("spool_depth"), "Messages waiting in the spool.")
    gauge("uptime_seconds", telemetry.get("uptime_s"), "Agent uptime.")
    return "\n".join(lines) + "\n"


class PrometheusServer:
    """``GET /metrics`` on 127.0.0.1:PORT in a daemon thread."""

    def __init__(
        self, latest: Callable[[], dict[str, Any] | None], *, port: int, host: str = "127.0.0.1"
    ) -> None:
        latest_fn = latest

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.split("?")[0] != "/metrics":
                    self.send_error(404, "only /metrics is served here")
                    return
                body = prometheus_text(latest_fn()).encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("prometheus: " + format, *args)

        self._server = http.server.ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="edge-prometheus", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
