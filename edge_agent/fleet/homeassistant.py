"""Home Assistant MQTT discovery.

With ``[mqtt] home_assistant = true``, on every connect the agent publishes
retained discovery configs under ``homeassistant/sensor/<device>_<key>/config``; the sensors read
the retained telemetry topic with value templates, and availability comes from the retained
status topic (``online``, or ``offline`` from the Will), so a device that dies shows as
unavailable in Home Assistant without anything else running.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import edge_agent
from edge_agent.fleet.protocol import Topics, dumps

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


#: per stream, with several: (key, name, template over telemetry's pipeline.streams.<stream>,
#: unit, device class)
HA_STREAM_SENSORS = (
    ("fps", "rate", "{{{{ value_json.pipeline.streams['{s}'].fps }}}}", "fps", None),
    (
        "latency_p95",
        "latency p95",
        "{{{{ value_json.pipeline.streams['{s}'].latency_ms.capture_to_result.p95 }}}}",
        "ms",
        "duration",
    ),
    ("state", "state", "{{{{ value_json.pipeline.streams['{s}'].state }}}}", None, None),
    (
        "dropped",
        "dropped frames",
        "{{{{ value_json.pipeline.streams['{s}'].dropped }}}}",
        None,
        None,
    ),
)


def home_assistant_discovery(
    topics: Topics,
    device: str,
    *,
    discovery_prefix: str = "homeassistant",
    streams: Sequence[str] = (),
) -> list[tuple[str, bytes]]:
    """(topic, retained payload) for every sensor, plus the last label from the results; with
    several ``streams``, each stream's rate, latency, state and drops as sensors of their own
    (``<device>_<stream>_<key>``)."""
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
    for stream in streams:
        for key, name, template, unit, device_class in HA_STREAM_SENSORS:
            sensors.append(
                (
                    f"{stream}_{key}",
                    f"{stream} {name}",
                    template.format(s=stream),
                    unit,
                    device_class,
                    topics.telemetry,
                )
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
        out.append((topic, dumps(config)))
    return out


__all__ = ["HA_SENSORS", "HA_STREAM_SENSORS", "home_assistant_discovery"]
