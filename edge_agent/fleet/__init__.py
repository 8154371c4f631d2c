"""The device's side of the fleet: the MQTT link, the protocol, the spool, telemetry and
monitoring, over-the-air updates, downloads, and the Home Assistant and Prometheus integrations."""
