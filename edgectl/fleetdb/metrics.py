"""The collector's Prometheus metrics (``edgectl collect fleet --prometheus PORT``).

Fleet gauges, per device, from the telemetry rows just committed:
``edge_fleet_fps``, ``edge_fleet_inference_p95_ms``, ``edge_fleet_cpu_percent``,
``edge_fleet_cpu_temp_celsius``, ``edge_fleet_drift_input``, ``edge_fleet_last_seen_seconds``
(Unix time of the device's newest message of any stream). The collector's own:
``edge_collector_messages_total{stream}`` (received), ``edge_collector_rows_total{stream}``
(inserted), ``edge_collector_duplicates_total{stream}`` (skipped as already stored),
``edge_collector_rejected_total`` (not storable: bad JSON, no seq or time),
``edge_collector_db_errors_total`` and ``edge_collector_batch_seconds`` (a histogram of one
batch's write and commit). With several collectors in a share group each serves its share of
the devices: aggregate with ``max by (device)``.
"""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from edge_agent.errors import ConfigError
from edgectl.fleetdb.rows import Row


class CollectorMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        per_device = ["device"]
        self.fps = Gauge("edge_fleet_fps", "frames per second", per_device, registry=r)
        self.p95 = Gauge(
            "edge_fleet_inference_p95_ms", "inference p95 latency, ms", per_device, registry=r
        )
        self.cpu = Gauge("edge_fleet_cpu_percent", "device CPU use, %", per_device, registry=r)
        self.temp = Gauge(
            "edge_fleet_cpu_temp_celsius", "device CPU temperature", per_device, registry=r
        )
        self.drift = Gauge(
            "edge_fleet_drift_input", "input drift score (calibration std devs)", per_device,
            registry=r,
        )  # fmt: skip
        self.last_seen = Gauge(
            "edge_fleet_last_seen_seconds", "Unix time of the newest message", per_device,
            registry=r,
        )  # fmt: skip
        self.messages = Counter(
            "edge_collector_messages", "messages received", ["stream"], registry=r
        )
        self.rows = Counter("edge_collector_rows", "rows inserted", ["stream"], registry=r)
        self.duplicates = Counter(
            "edge_collector_duplicates", "rows skipped: already stored", ["stream"], registry=r
        )
        self.rejected = Counter("edge_collector_rejected", "messages not storable", registry=r)
        self.db_errors = Counter("edge_collector_db_errors", "failed batch writes", registry=r)
        self.batch_seconds = Histogram(
            "edge_collector_batch_seconds", "one batch's write and commit", registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
        )  # fmt: skip
        self._newest: dict[str, float] = {}

    def committed(self, rows: Sequence[Row]) -> None:
        """Update the fleet gauges from rows just committed."""
        newest: dict[str, float] = {}
        for row in rows:
            ts = row.time.timestamp()
            if ts > newest.get(row.device, 0.0):
                newest[row.device] = ts
            if row.stream != "telemetry":
                continue
            for gauge, column in (
                (self.fps, "fps"), (self.p95, "p95_ms"), (self.cpu, "cpu_percent"),
                (self.temp, "cpu_temp_c"), (self.drift, "drift_input"),
            ):  # fmt: skip
                value = row.column(column)
                if value is not None:
                    gauge.labels(row.device).set(value)
        for device, ts in newest.items():
            if ts > self._newest.get(device, 0.0):  # only grows (batches may come out of order)
                self._newest[device] = ts
                self.last_seen.labels(device).set(ts)

    def serve(self, port: int, *, host: str = "127.0.0.1") -> None:
        from prometheus_client import start_http_server

        try:
            start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise ConfigError(
                f"--prometheus {port}: cannot listen on {host}:{port}: {exc.strerror or exc}"
            ) from None
