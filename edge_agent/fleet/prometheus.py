"""A Prometheus endpoint: ``[telemetry] prometheus_port = PORT`` serves ``GET /metrics`` on
127.0.0.1 (loopback only: a Prometheus or an agent on the device scrapes it).

The exposition is ``prometheus_client``'s, from the latest telemetry, in a registry of our own:
gauges for rates and levels (``edge_agent_fps``, ``edge_agent_cpu_percent``, …), counters for
what only grows (``edge_agent_results_total``, ``edge_agent_dropped_total``,
``edge_agent_inference_errors_total``), and the per-stage latency over the last telemetry
interval as a summary (``edge_agent_latency_ms{stage,quantile}``, quantiles 0.5, 0.95, 0.99).
Every sample is labelled with the device, the model and its version. With several streams, each
stream has its own families labelled ``stream`` too (``edge_agent_stream_up``,
``edge_agent_stream_fps``, ``edge_agent_stream_results_total``,
``edge_agent_stream_dropped_total``, ``edge_agent_stream_latency_ms``). Nothing is exposed until
the first telemetry.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

LABELS = ("device", "model", "version")

#: (metric, where in the telemetry, help): gauges
GAUGES = (
    ("fps", ("pipeline", "fps"), "Results per second over the last interval."),
    ("cpu_percent", ("system", "cpu_percent"), "CPU use of the whole device."),
    ("ram_percent", ("system", "ram_percent"), "RAM in use."),
    ("disk_percent", ("system", "disk_percent"), "Disk in use where the state directory is."),
    ("cpu_temp_celsius", ("system", "cpu_temp_c"), "CPU temperature."),
    ("rss_mb", ("system", "process_rss_mb"), "Resident memory of the agent."),
    ("spool_depth", ("spool_depth",), "Messages waiting in the spool."),
    ("uptime_seconds", ("uptime_s",), "Agent uptime."),
)
#: (metric without _total, where in the telemetry, help): counters since the agent started
COUNTERS = (
    ("results", ("pipeline", "results"), "Results since start."),
    ("dropped", ("pipeline", "dropped"), "Frames dropped by a live source since start."),
    ("inference_errors", ("pipeline", "inference_errors"), "Failed frames since start."),
)
QUANTILES = (("p50", "0.5"), ("p95", "0.95"), ("p99", "0.99"))


def _number(telemetry: Mapping[str, Any], path: tuple[str, ...]) -> float | None:
    value: Any = telemetry
    for key in path:
        value = value.get(key) if isinstance(value, Mapping) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


class TelemetryCollector(Collector):
    """Metric families from ``latest()``, the newest telemetry payload (or None)."""

    def __init__(self, latest: Callable[[], Mapping[str, Any] | None]) -> None:
        self._latest = latest

    def collect(self) -> Iterator[Metric]:
        telemetry = self._latest()
        if not telemetry:
            return
        model = telemetry.get("model") or {}
        labels = [str(telemetry.get("device")), str(model.get("name")), str(model.get("version"))]
        family: type[GaugeMetricFamily] | type[CounterMetricFamily]
        for family, table in ((GaugeMetricFamily, GAUGES), (CounterMetricFamily, COUNTERS)):
            for name, path, help_text in table:
                value = _number(telemetry, path)
                if value is not None:
                    metric = family(f"edge_agent_{name}", help_text, labels=LABELS)
                    metric.add_metric(labels, value)
                    yield metric
        stages = (telemetry.get("pipeline") or {}).get("latency_ms") or {}
        summary = Metric(
            "edge_agent_latency_ms", "Per-stage latency over the last interval.", "summary"
        )
        for stage, pct in stages.items():
            for key, quantile in QUANTILES:
                value = _number(pct or {}, (key,))
                if value is not None:
                    sample = dict(zip(LABELS, labels), stage=str(stage), quantile=quantile)
                    summary.add_sample("edge_agent_latency_ms", sample, value)
        if summary.samples:
            yield summary
        streams = (telemetry.get("pipeline") or {}).get("streams") or {}
        if streams:
            yield from _stream_metrics(labels, streams)


#: per stream, with several: (metric, key in telemetry's pipeline.streams.<stream>, help)
STREAM_GAUGES = (("stream_fps", "fps", "Results per second of this stream, last interval."),)
STREAM_COUNTERS = (
    ("stream_results", "results", "Results of this stream since start."),
    ("stream_dropped", "dropped", "Frames of this stream dropped since start."),
)


def _stream_metrics(labels: list[str], streams: Mapping[str, Any]) -> Iterator[Metric]:
    """Per-stream families, labelled with the stream besides the device, model and version;
    ``edge_agent_stream_up`` is 1 while the stream is served, 0 while it is lost or ended."""
    names = (*LABELS, "stream")
    up = GaugeMetricFamily("edge_agent_stream_up", "1 while the stream is served.", labels=names)
    tables = ((GaugeMetricFamily, STREAM_GAUGES), (CounterMetricFamily, STREAM_COUNTERS))
    made = {
        name: family(f"edge_agent_{name}", help_text, labels=names)
        for family, table in tables
        for name, _, help_text in table
    }
    latency = Metric(
        "edge_agent_stream_latency_ms", "Per-stage latency of this stream, last interval.",
        "summary",
    )  # fmt: skip
    for stream, entry in sorted(streams.items()):
        entry = entry if isinstance(entry, Mapping) else {}
        values = [*labels, str(stream)]
        up.add_metric(values, 1.0 if entry.get("state") == "serving" else 0.0)
        for _, table in tables:
            for name, key, _ in table:
                value = _number(entry, (key,))
                if value is not None:
                    made[name].add_metric(values, value)
        for stage, pct in (entry.get("latency_ms") or {}).items():
            for key, quantile in QUANTILES:
                value = _number(pct or {}, (key,))
                if value is not None:
                    sample = dict(zip(names, values), stage=str(stage), quantile=quantile)
                    latency.add_sample("edge_agent_stream_latency_ms", sample, value)
    yield up
    yield from made.values()
    if latency.samples:
        yield latency


class PrometheusServer:
    """``GET /metrics`` on HOST:PORT (127.0.0.1 by default) in a daemon thread."""

    def __init__(
        self,
        latest: Callable[[], Mapping[str, Any] | None],
        *,
        port: int,
        host: str = "127.0.0.1",
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(TelemetryCollector(latest))
        self.host, self._port = host, port
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self.port = port

    def start(self) -> None:
        self._server, self._thread = start_http_server(
            self._port, addr=self.host, registry=self.registry
        )
        self.port = int(self._server.server_port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None


__all__ = ["PrometheusServer", "TelemetryCollector"]
