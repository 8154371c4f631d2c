-- The fleet database, version 1: one table per MQTT stream, and the devices seen.
--
-- Every stream table has device, seq, time and the message's JSON (payload), plus typed
-- columns that dashboards and `edgectl history` query. The primary key (device, time, seq) is
-- the idempotency key: the same message delivered again (at-least-once) has the same device,
-- the same seq and the same time (the device's own timestamp, inside the payload), so it is
-- stored once. It also serves "one device between two times" (history, dashboards) without a
-- second index. For status and reported, which carry no seq, seq is derived from the payload's
-- bytes (edgectl.fleetdb.rows.content_seq). A BRIN index on time serves fleet-wide time ranges.

CREATE TABLE telemetry (
    device text NOT NULL,
    seq bigint NOT NULL,
    time timestamptz NOT NULL,
    received timestamptz NOT NULL DEFAULT now(),
    model_name text,
    model_version text,
    state text,
    fps double precision,
    results bigint,
    dropped bigint,
    inference_errors bigint,
    p50_ms double precision,
    p95_ms double precision,
    p99_ms double precision,
    c2r_p95_ms double precision,
    cpu_percent double precision,
    ram_percent double precision,
    cpu_temp_c double precision,
    spool_depth bigint,
    drift_input double precision,
    drift_output double precision,
    drifted boolean,
    shadow_agreement double precision,
    payload jsonb NOT NULL,
    PRIMARY KEY (device, time, seq)
);
CREATE INDEX telemetry_time ON telemetry USING brin (time);

CREATE TABLE events (
    device text NOT NULL,
    seq bigint NOT NULL,
    time timestamptz NOT NULL,
    received timestamptz NOT NULL DEFAULT now(),
    kind text,
    reason text,
    payload jsonb NOT NULL,
    PRIMARY KEY (device, time, seq)
);
CREATE INDEX events_time ON events USING brin (time);
CREATE INDEX events_kind_time ON events (kind, time);

CREATE TABLE results (
    device text NOT NULL,
    seq bigint NOT NULL,
    time timestamptz NOT NULL,
    received timestamptz NOT NULL DEFAULT now(),
    stream text,
    model_name text,
    model_version text,
    latency_ms double precision,
    label text,
    score double precision,
    payload jsonb NOT NULL,
    PRIMARY KEY (device, time, seq)
);
CREATE INDEX results_time ON results USING brin (time);

CREATE TABLE status (
    device text NOT NULL,
    seq bigint NOT NULL,
    time timestamptz NOT NULL,
    received timestamptz NOT NULL DEFAULT now(),
    state text,
    agent_version text,
    model_version text,
    payload jsonb NOT NULL,
    PRIMARY KEY (device, time, seq)
);
CREATE INDEX status_time ON status USING brin (time);

CREATE TABLE reported (
    device text NOT NULL,
    seq bigint NOT NULL,
    time timestamptz NOT NULL,
    received timestamptz NOT NULL DEFAULT now(),
    model_version text,
    update_state text,
    update_version text,
    deployment text,
    floor text,
    payload jsonb NOT NULL,
    PRIMARY KEY (device, time, seq)
);
CREATE INDEX reported_time ON reported USING brin (time);

-- One row per device ever seen: the fleet list (edgectl status, the dashboards' device
-- variable) without scanning the streams. last_seen only grows.
CREATE TABLE devices (
    device text PRIMARY KEY,
    first_seen timestamptz NOT NULL,
    last_seen timestamptz NOT NULL
);
