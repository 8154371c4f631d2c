"""The agent as a daemon: start-up -> main loop -> drain -> stop, readable top to bottom.

``edge-agent run`` builds a :class:`Service`. Without a broker it serves the model over the
source into its sinks (JSONL, stdout). With ``--broker`` / ``[mqtt] broker`` it also:

- publishes every result on ``<prefix>/<device>/results`` (QoS 1, the JSONL sink's object with the
  persistent ``seq``), telemetry every ``[telemetry] interval``, events, and a retained status
  with a Will, all through the on-disk spool so nothing is lost while offline;
- answers commands (``cmd/ping|update|rollback|reload``) and follows its desired state
  (device-twin pattern) with health-gated over-the-air updates (``edge_agent.fleet.updater``);
  with ``[fleet] operator_keys``, only orders signed by one of them (``edge_agent.fleet.orders``);
- on a finite source, exits 0 only after the spool has drained, or after
  ``[mqtt] flush_timeout`` seconds, saying how many messages stay spooled for the next run.

Threads: the pipeline's (capture, inference workers), the MQTT network thread, the updater, and
this main thread, which only ticks: readiness, watchdog, status, telemetry, reconciliation,
signals. Signal handlers set a flag; nothing else.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import edge_agent
from edge_agent.common.durable import atomic_write
from edge_agent.common.ratelimit import TokenBucket
from edge_agent.common.urls import redact_uri
from edge_agent.errors import (
    AgentExit,
    ConfigError,
    EdgeError,
    OrderRefused,
    ProtocolError,
    UpdateError,
    first_line,
)
from edge_agent.fleet import protocol
from edge_agent.fleet.protocol import Desired, Topics

log = logging.getLogger("edge-agent")

#: --summary paths that are this process's own stdout / stderr: written to the open stream
#: (opening /dev/stdout again would truncate a file it is redirected to, results and all)
_OWN_STREAMS = {
    **dict.fromkeys(("/dev/stdout", "/dev/fd/1", "/proc/self/fd/1"), "stdout"),
    **dict.fromkeys(("/dev/stderr", "/dev/fd/2", "/proc/self/fd/2"), "stderr"),
}


def _write_summary(path: Path, data: bytes) -> None:
    """``--summary``: our own stdout or stderr as the open stream; a symlink or a special file
    written through (a regular target replaced in place, anything else appended to), never
    replaced by a plain file; else atomically (no half-written summary)."""
    name = _OWN_STREAMS.get(str(path))
    if name is not None:
        stream = getattr(sys, name)
        stream.write(data.decode())
        stream.flush()
    elif path.is_symlink() or (path.exists() and not path.is_file()):
        with path.open("wb" if path.is_file() else "ab") as fh:
            fh.write(data)
    else:
        atomic_write(path, data)


#: What the last log line ("stopped: …") says of the summary
STOPPED_KEYS = ("results", "fps", "dropped", "unreadable", "inference_errors")


class Service:
    def __init__(self, config: Any, *, summary_path: Path | None = None) -> None:
        self.config = config
        self.summary_path = summary_path
        self.should_exit = threading.Event()
        self.t_start = time.monotonic()
        self.t_wall = time.time()
        self.mqtt_enabled = bool(config.mqtt.broker)
        self.device = config.device_id
        self.topics: Topics | None = None
        self.spool: Any = None
        self.link: Any = None
        self.plaintext: str | None = None  # why plain mqtt:// is a risk here, said once at start
        self.updater: Any = None
        self.plan: Any = None  # edge_agent.tune.Plan: threads and workers, and how chosen
        self._tune_config: Any = None  # the model's config when its plan is measured at start
        self.tuner: Any = None  # edge_agent.tune.OnlineTuner, while it measures
        self.threads = 0  # the plan's runtime threads in all (set with the model)
        self.ota_disabled: str | None = None  # why OTA is off, when it is
        self._refused_desired: set[str] = set()
        self.store: Any = None
        self.fetcher: Any = None
        self.monitor: Any = None
        self.monitor_swaps = -1  # the pipeline's model swaps when the monitor was set up
        self.system: Any = None
        self._desired: dict[str, Desired | None] = {}
        self._desired_changed = threading.Event()
        self._last_state = ""
        self._telemetry_last = (time.monotonic(), 0, 0)
        self._stream_states: dict[str, str] = {}
        self._stream_results: dict[str, int] = {}  # results per stream at the last telemetry
        self._drifting = False
        self.prometheus: Any = None
        self.rest_port: int | None = None  # --rest-port
        self._last_bad_desired = -1e9
        self.latest_telemetry: dict[str, Any] | None = None
        self.sampler: Any = None  # [capture]: edge_agent.fleet.capture.Sampler
        self.shadow: Any = None  # edge_agent.shadow.ShadowController, with OTA
        self.uploader: Any = None
        self.orders: Any = None  # edge_agent.fleet.orders.OrderGuard, with MQTT
        self._refusals_said: set[str] = set()  # order_refused said once per payload
        fleet = config.fleet  # [fleet] command_rate: orders over MQTT, before any parsing
        self.order_bucket = TokenBucket(rate=fleet.command_rate, burst=fleet.command_burst)
        self._waiting_desired: dict[str, Any] = {}  # rate-limited desired states, latest per topic
        self._waiting_lock = threading.Lock()

    # --- start-up ----------------------------------------------------------------------------

    def run(self) -> int:
        self.startup()
        try:
            self.main_loop()
        finally:
            self.shutdown()
        if "error" in self.outcome:
            raise self.outcome["error"]
        return AgentExit.OK

    def startup(self) -> None:
        from edge_agent.io.sinks import MqttResultSink, open_sink
        from edge_agent.io.uri import open_source_from, open_streams_from
        from edge_agent.model.plan import resolve_profile
        from edge_agent.notify import Notifier, Watchdog
        from edge_agent.pipeline import MotionGate, Pipeline

        config = self.config
        config.require_runnable()
        self.profile = resolve_profile(config.agent.profile)
        state_dir = Path(config.agent.state_dir)
        if state_dir.exists() and not state_dir.is_dir():
            raise ConfigError(f"config: [agent] state_dir = {str(state_dir)!r}: not a directory")
        if self.summary_path is not None:  # checked now, not after the whole run
            where = self.summary_path.parent
            if self.summary_path.is_dir() or not where.is_dir():  # /dev/stdout passes
                problem = (
                    "is a directory" if self.summary_path.is_dir() else f"no directory {where}"
                )
                raise ConfigError(f"--summary {self.summary_path}: {problem}")
        if self.mqtt_enabled:
            try:
                self.topics = Topics(self.device, prefix=config.mqtt.topic_prefix)
            except ProtocolError as exc:
                raise ConfigError(f"config: {exc} (set [agent] device_id or --device-id)") from None
            try:
                state_dir.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ConfigError(
                    f"config: [agent] state_dir = {str(state_dir)!r}: cannot create it "
                    f"({exc.strerror})"
                ) from None
        #: several named streams ([[sources]] / --source NAME=URI), or none: one [source]
        self.streams = open_streams_from(config) if config.sources else []
        self.source = self.streams[0].source if self.streams else open_source_from(config)
        recovered = None
        if self.mqtt_enabled and config.ota.enabled:
            from edge_agent.fleet.store import ModelStore

            self.store = ModelStore(state_dir, keep=config.ota.keep_models)
            recovered = self.store.recover()
        model = self._open_initial_model()
        from edge_agent.fleet.health import HealthProbe

        self.probe = HealthProbe()
        self.sinks = [open_sink(s) for s in config.results.sinks]
        seq_start = 0
        if self.mqtt_enabled:
            self._start_mqtt(state_dir)
            seq_start = self.spool.next_seq("results")
            self.sinks.append(
                MqttResultSink(
                    self.spool,
                    self.topics.results if self.topics else "",
                    mode=config.mqtt.results,
                    max_rate=config.mqtt.results_max_rate,
                )
            )
        self.notifier = Notifier()
        self.watchdog = Watchdog(notifier=self.notifier)
        batch = 1
        if self.streams:
            from edge_agent.model.plan import batch_plan

            batch, why = batch_plan(model, streams=len(self.streams))
            log.info(
                "streams: %d, %d frame(s) an inference call (%s)", len(self.streams), batch, why
            )
        self.pipeline = Pipeline(
            source=None if self.streams else self.source,
            streams=self.streams,
            batch=batch,
            model=model,
            sinks=[*self.sinks, self.probe],
            max_frames=config.pipeline.max_frames or None,
            gate=MotionGate(config.pipeline.motion_gate) if config.pipeline.motion_gate else None,
            workers=model.workers,
            max_workers=2 if self._tune_config is not None else None,  # the tuner may try 2
            pin_capture=bool(self.plan is not None and self.plan.pin),
            hold_priority=self._tune_config is not None,  # the tuner releases it when done
            seq_start=seq_start,
        )
        self._setup_monitor(model)
        self._setup_capture(state_dir)
        self.rest = None
        if config.rest.enabled or self.rest_port is not None:
            from edge_agent.rest import RestServer

            port = self.rest_port if self.rest_port is not None else config.rest.port
            self.rest = RestServer(lambda: self.pipeline.model, host=config.rest.host, port=port)
            self.rest.start()
            log.info(
                "REST endpoint on http://%s:%d/v1/models/%s",
                config.rest.host, self.rest.port, model.name,
            )  # fmt: skip
        if config.telemetry.prometheus_port:
            from edge_agent.fleet.prometheus import PrometheusServer

            self.prometheus = PrometheusServer(
                lambda: self.latest_telemetry, port=config.telemetry.prometheus_port
            )
            self.prometheus.start()
        if self.mqtt_enabled:
            self._start_updater()
            self._start_shadow()
            self.event("agent_started", version=edge_agent.__version__, profile=self.profile.name)
            self.event("model_loaded", model=model.identity, format=model.format)
            if not self.orders.enforcing:
                why = (
                    "no [fleet] operator_keys: orders (desired states, commands) are accepted "
                    "unsigned; whoever may publish to this device's topics commands it"
                )
                log.warning("orders: %s", why)
                self.event("orders_unsigned", reason=why)
            if self.plaintext:
                log.warning("mqtt: %s", self.plaintext)
                self.event("plaintext_mqtt", reason=self.plaintext)
            if recovered is not None:
                self.event(
                    "rolled_back",
                    reason="the agent restarted during an update (crash or power loss); "
                    "serving the committed model",
                    sha256=recovered.get("sha256"),
                    version=recovered.get("version"),
                )
            self.link.start()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, frame: self.should_exit.set())
        self.outcome: dict[str, Any] = {}
        self.worker = threading.Thread(target=self._serve, name="edge-infer", daemon=True)
        self.worker.start()
        if self._tune_config is not None:
            from edge_agent.tune import start_online_tuning

            self.tuner = start_online_tuning(
                self.pipeline, self._tune_config, self.profile, current=self.plan,
                state_dir=state_dir, on_done=self._tuned, streams=max(1, len(self.streams)),
            )  # fmt: skip
            if self.tuner is None:  # nothing to measure: the plan serving is the plan
                self.pipeline.release_priority()
        log.info(
            "serving %s %s (%s, %s threads, %d workers) on %s; profile %s%s",
            model.name, model.version, model.format, self.threads, model.workers,
            ", ".join(f"{st.name}={redact_uri(st.source.uri)}" for st in self.streams)
            or redact_uri(config.source.uri),
            self.profile.name,
            f"; mqtt {self.link.settings.safe_url} as {self.device}" if self.link else "",
        )  # fmt: skip

    def _open_initial_model(self) -> Any:
        """The committed model if OTA installed one, else the configured model; a bundle given
        in config becomes the first committed model, so a rollback can return to it."""
        from edge_agent.config import with_overrides
        from edge_agent.tune import open_tuned_model

        config = self.config
        store = self.store
        current = store.current if store is not None else None
        state_dir = Path(config.agent.state_dir)

        def planned(cfg: Any) -> Any:
            if self.streams:  # planned for the first stream's kind and pace, and cached
                # apart from one source's plan (edge_agent.tune.cache_key)
                cfg = with_overrides(cfg, source={"pace": config.sources[0].pace})
            model, self.plan = open_tuned_model(
                cfg, self.profile, source=self.source, state_dir=state_dir,
                streams=max(1, len(self.streams)),
            )  # fmt: skip
            self.threads = self.plan.threads
            # [pipeline] tune: no plan cached for this model yet, so it is measured while
            # serving (edge_agent.tune.OnlineTuner), beginning with the rule's plan
            self._tune_config = (
                cfg if cfg.pipeline.tune and self.plan.how == "rule" and not model.stateful
                else None
            )  # fmt: skip
            also = "; measuring the others while serving" if self._tune_config else ""
            log.info("plan: %s%s", self.plan.describe(), also)
            return model

        if current is not None:
            path = store.bundle_path(str(current["sha256"]))
            if path is not None:
                try:
                    return planned(with_overrides(config, model={"path": str(path)}))
                except EdgeError as exc:
                    log.error("committed model %s unusable (%s); using [model] path", path, exc)
        model = planned(config)
        if store is not None and str(config.model.path).endswith(".edgebundle"):
            from edge_agent.common.hashing import sha256_file

            path = Path(config.model.path)
            sha = sha256_file(path)
            if current is None or current.get("sha256") != sha:
                import shutil

                tmp = store.downloads / f"{sha}.edgebundle"
                shutil.copyfile(path, tmp)
                with open(tmp, "rb+") as fh:  # on disk before state.json names it
                    os.fsync(fh.fileno())
                store.keep_bundle(tmp, sha)
                store.commit(
                    {"sha256": sha, "name": model.name, "version": model.version, "deployment": ""}
                )
        return model

    def _setup_monitor(self, model: Any) -> None:
        every = self.config.telemetry.monitor_every
        if not every:
            return
        from edge_agent.fleet.telemetry import Monitor

        stats = (model.manifest or {}).get("calibration_stats")
        self.monitor = Monitor(
            calibration_stats=stats,
            every=every,
            drift_threshold=self.config.telemetry.drift_threshold,
            output_drift_threshold=self.config.telemetry.output_drift_threshold,
        )
        self.monitor_swaps = self.pipeline.swaps  # a plan change keeps the model: not counted
        self.pipeline.observer = self.monitor.observe

    def _setup_capture(self, state_dir: Path) -> None:
        """``[capture]``: samples from the field, sent over MQTT at the lowest priority or by
        HTTP(S) PUT (edge_agent.fleet.capture, edge_agent.fleet.samples)."""
        c = self.config.capture
        if not c.enabled:
            return
        from edge_agent.fleet.capture import Sampler
        from edge_agent.fleet.samples import HttpUploader, SampleOutbox, SampleStore

        store = SampleStore(
            state_dir / "samples", max_bytes=int(c.max_mb * 2**20), disk_share=c.disk_share
        )
        self.sampler = Sampler(
            c, store=store, device=self.device, state_path=state_dir / "capture.json",
            drifting=lambda: self._drifting,
        )  # fmt: skip
        if c.upload_url:
            from edge_agent.fleet.mqtt import read_secret

            token = read_secret(c.token_file, what="[capture] token_file") if c.token_file else None
            self.uploader = HttpUploader(
                store, url=c.upload_url, device=self.device, token=token, ca_file=c.ca_file
            )
            self.uploader.start()
        elif self.link is not None and self.topics is not None:
            self.link.low_priority = SampleOutbox(store, self.topics)
        else:
            log.warning("capture: no broker and no [capture] upload_url: samples stay in %s",
                        store.directory)  # fmt: skip
        self.sampler.start()
        self.pipeline.sampler = self.sampler
        log.info("capture: %s (%d samples waiting)", "on" if self.sampler.enabled else
                 "off (edgectl capture --off)", len(store))  # fmt: skip

    def _start_mqtt(self, state_dir: Path) -> None:
        from edge_agent.fleet.mqtt import PACKET_HEADER_ROOM, BrokerSettings, MqttLink
        from edge_agent.fleet.spool import Spool
        from edge_agent.fleet.telemetry import SystemProbe

        m = self.config.mqtt
        assert self.topics is not None
        settings = BrokerSettings.from_section(m)
        self.spool = Spool(state_dir / "spool.sqlite", max_bytes=int(m.spool_max_mb * 2**20))
        self.orders = self._order_guard(state_dir)
        subs = [self.topics.commands]
        if self.config.ota.enabled:
            subs.append(self.topics.desired)
            subs += [self.topics.group_desired(g) for g in m.groups]
        # The largest payload this agent takes: a bundle's meta with OTA over MQTT, else an order.
        largest = protocol.MAX_COMMAND_BYTES
        if self.config.ota.enabled:
            largest = max(largest, protocol.MAX_BUNDLE_META_BYTES)
        self.plaintext = settings.plaintext_warning(orders=True)
        self.link = MqttLink(
            settings,
            max_packet_bytes=largest + PACKET_HEADER_ROOM,
            client_id=f"edge-agent-{self.device}",
            spool=self.spool,
            will=(self.topics.status, protocol.dumps(self._status("offline"))),
            subscriptions=subs,
            on_message=self._on_message,
            on_connect=self._on_connect,
        )
        self.system = SystemProbe(state_dir=state_dir)

    def _order_guard(self, state_dir: Path) -> Any:
        """``[fleet] operator_keys``: who may give orders. Keys that are listed but cannot be
        loaded stop the agent (a config error): it must never fall back to unsigned orders."""
        from edge_agent.fleet.orders import LEDGER_FILE, OrderGuard, SerialLedger
        from edge_agent.model.keys import load_trusted_keys

        listed = self.config.fleet.operator_keys
        hosts = self.config.ota.allowed_hosts
        if not listed:
            return OrderGuard(keys={}, ledger=None, allowed_hosts=hosts)
        try:
            keys = load_trusted_keys(listed)
        except ConfigError as exc:
            raise ConfigError(f"config: [fleet] operator_keys: {exc}") from None
        log.info("orders: signed by %s only", ", ".join(sorted(keys)))
        return OrderGuard(keys=keys, ledger=SerialLedger(state_dir / LEDGER_FILE),
                          allowed_hosts=hosts)  # fmt: skip

    def _check_order(
        self, topic: str, data: Mapping[str, Any], *, response_topic: str | None = None
    ) -> Any:
        """The guard's ``Accepted``, or OrderRefused unless it lets this order through where it
        arrived."""
        aimed = protocol.order_target(topic, prefix=self.config.mqtt.topic_prefix)
        if aimed is None:
            raise OrderRefused(f"{topic}: not an order topic")
        scope, target, order = aimed
        return self.orders.check(
            data, scope=scope, target=target, order=order, response_topic=response_topic
        )

    def _order_refused(self, topic: str, payload: bytes, exc: OrderRefused) -> None:
        """One ``order_refused`` event per refused payload (a retained one comes again on
        every reconnect; a flood of copies says it once)."""
        import hashlib

        digest = hashlib.sha256(topic.encode() + b"\0" + payload).hexdigest()
        if digest in self._refusals_said:
            return
        if len(self._refusals_said) > 1000:
            self._refusals_said.clear()
        self._refusals_said.add(digest)
        log.warning("order refused on %s: %s", topic, exc)
        self.event("order_refused", reason=str(exc), topic=topic)

    def _start_updater(self) -> None:
        if not self.config.ota.enabled:
            self.ota_disabled = "[ota] enabled = false"
        if not self.config.ota.enabled or self.store is None:
            return
        from edge_agent.config import with_overrides
        from edge_agent.fleet.fetch import ChunkFetcher
        from edge_agent.fleet.updater import Updater
        from edge_agent.model.keys import load_trusted_keys
        from edge_agent.model.plan import open_model

        link = self.link
        assert self.topics is not None
        self.fetcher = ChunkFetcher(
            subscribe=link.subscribe,
            unsubscribe=link.unsubscribe,
            downloads=self.store.downloads,
            prefix=self.config.mqtt.topic_prefix,
            timeout=self.config.ota.transfer_timeout,
            max_bytes=int(self.config.ota.max_bundle_mb * 2**20),
        )
        paths = [Path(k) for k in self.config.model.trusted_keys]
        where = ", ".join(str(k) for k in paths) or "[model] trusted_keys (empty)"
        try:
            keys = load_trusted_keys(paths)
            problem = None if keys else "no keys"
        except EdgeError as exc:
            problem = str(exc)
        if problem is not None:  # results and telemetry still flow; updates are refused
            detail = problem.removeprefix(f"{where}: ")  # said once, not twice
            hint = (
                ""
                if "edge-convert keygen" in detail
                else "; create a key pair with `edge-convert keygen --out DIR` and list "
                "DIR/edge-signing.pub in [model] trusted_keys"
            )
            self.ota_disabled = f"no trusted keys in {where} ({detail}){hint}"
            log.warning("ota: disabled (%s)", self.ota_disabled)
            self.event("ota_disabled", reason=self.ota_disabled)
            return

        def load(bundle: Path) -> Any:  # a new model runs the plan the pipeline runs
            cfg = with_overrides(self.config, model={"path": str(bundle)})
            return open_model(
                cfg, self.profile, threads=self.threads, workers=self.pipeline.workers
            )

        self.updater = Updater(
            store=self.store,
            settings=self.config.ota,
            profile=self.profile,
            trusted_keys=keys,
            fetch_mqtt=lambda sha, cancel: self.fetcher.fetch(sha, cancel=cancel),
            load=load,
            pipeline=self.pipeline,
            probe=self.probe,
            event=self.event,
            report=lambda _update: self._publish_reported(),
        )
        self.updater.start()

    def _start_shadow(self) -> None:
        """The desired state's ``shadow``: fetched and verified through the updater, loaded
        with ``[shadow] threads`` (edge_agent.shadow)."""
        if self.updater is None:
            return
        from edge_agent.config import with_overrides
        from edge_agent.model.plan import open_model
        from edge_agent.shadow import ShadowController

        def load(bundle: Path) -> Any:
            cfg = with_overrides(self.config, model={"path": str(bundle)})
            return open_model(cfg, self.profile, threads=self.config.shadow.threads, workers=1)

        self.shadow = ShadowController(
            settings=self.config.shadow,
            fetch_verified=self.updater.fetch_verified,
            load=load,
            pipeline=self.pipeline,
            sampler=self.sampler,
            event=self.event,
            report=self._publish_reported,
        )
        self.shadow.start()

    def _serve(self) -> None:
        try:
            self.outcome["summary"] = self.pipeline.run()
        except BaseException as exc:
            self.outcome["error"] = exc

    # --- the main loop ------------------------------------------------------------------------

    def main_loop(self) -> None:
        from edge_agent.pipeline import State

        first_result = ready = False
        stall_timeout = self.config.pipeline.stall_timeout or self.watchdog.timeout
        stalled_said = False
        last_status = 0.0
        next_telemetry = time.monotonic() + min(self.config.telemetry.interval, 5.0)
        while self.worker.is_alive():
            self.worker.join(timeout=0.25)
            now = time.monotonic()
            if not ready and self.pipeline.state in (State.SERVING, State.DEGRADED):
                ready = True  # the model is loaded and the source open, or being retried
                self.notifier.ready()
                log.info("ready (%s) %.3f s after start", self.pipeline.state.value,
                         now - self.t_start)  # fmt: skip
            if not first_result and self.pipeline.results:
                first_result = True
                log.info("first result %.3f s after start", now - self.t_start)
            stalled = self.pipeline.stalled_s()
            if stall_timeout is None or stalled < stall_timeout:
                self.watchdog.progress()  # alive: frames, gated frames, or a source retried
                stalled_said = False
            elif not stalled_said:
                stalled_said = True
                log.error("the loop is stuck (%.1f s without progress): watchdog pings stop",
                          stalled)  # fmt: skip
            self.watchdog.tick()
            if now - last_status > 5.0:
                last_status = now
                s = self.pipeline.summary()
                m = self.pipeline.model
                self.notifier.status(f"{s['state']}: {s['fps']} fps, model {m.name} {m.version}")
            self._watch_state()
            if self.streams:
                self._watch_streams()
            if self.monitor is not None and self.monitor_swaps != self.pipeline.swaps:
                self._setup_monitor(self.pipeline.model)
            if now >= next_telemetry:
                next_telemetry = now + self.config.telemetry.interval
                self.publish_telemetry()
            self._pace_orders()
            if self._desired_changed.is_set():
                self._desired_changed.clear()
                self.reconcile()
            if self.should_exit.is_set():
                self.notifier.stopping()
                self.pipeline.stop()
                self.worker.join(timeout=self.config.pipeline.drain_timeout)
                break

    def _watch_streams(self) -> None:
        """``source_lost`` / ``source_restored`` per stream, naming it (several streams)."""
        from edge_agent.pipeline import STARTING_LIMIT_S

        status = self.pipeline.stream_status()
        for name, state in status.items():
            before = self._stream_states.get(name, "serving")
            if state == "starting" and before == "degraded":
                continue  # back, but no frame yet: still lost until its first one
            self._stream_states[name] = state
            if state == before:
                continue
            if state == "degraded":
                stream = next(st for st in self.streams if st.name == name)
                err = getattr(stream.source.stats, "last_error", None)
                if err:
                    reason = str(err)
                elif before == "starting":  # connected, and never a frame
                    reason = f"no frame {STARTING_LIMIT_S:g} s after it was opened"
                    log.warning("stream %s: %s; degraded until one comes", name, reason)
                else:
                    reason = "the source stopped delivering"
                if self.mqtt_enabled:
                    self.event("source_lost", reason=reason, stream=name)
            elif before == "degraded" and state == "serving" and self.mqtt_enabled:
                self.event("source_restored", stream=name)

    def _watch_state(self) -> None:
        state = self.pipeline.state.value
        if state == self._last_state:
            return
        previous, self._last_state = self._last_state, state
        m = self.pipeline.model
        self.notifier.status(f"{state}: model {m.name} {m.version}")
        if self.streams:  # each stream's loss and return is its own event
            return
        if self.mqtt_enabled and state == "degraded":
            err = getattr(getattr(self.source, "stats", None), "last_error", None)
            self.event("source_lost", reason=str(err) if err else "the source stopped delivering")
        elif self.mqtt_enabled and previous == "degraded" and state == "serving":
            self.event("source_restored")

    # --- shutdown -----------------------------------------------------------------------------

    def _tuned(self, plan: Any) -> None:
        """The online tuner's choice, serving now: later models (updates) load for it too."""
        self.plan, self.threads = plan, plan.threads
        log.info("plan: %s", plan.describe())
        if self.mqtt_enabled:
            self.event("plan_tuned", plan=plan.to_dict())

    def shutdown(self) -> None:
        if self.tuner is not None:
            self.tuner.stop()
        if self.shadow is not None:
            self.shadow.stop()
        if self.updater is not None:
            self.updater.stop()
        if self.sampler is not None:
            self.sampler.stop()
        if self.uploader is not None:
            self.uploader.stop()
        if self.rest is not None:
            self.rest.stop()
        if self.prometheus is not None:
            self.prometheus.stop()
        summary = self.outcome.get("summary") or self.pipeline.summary()
        if self.mqtt_enabled:
            self.publish_telemetry()
            self.event("agent_stopping", results=summary.get("results"))
            self._flush_spool()
            assert self.topics is not None
            self.link.stop(final=(self.topics.status, protocol.dumps(self._status("stopped"))))
            self.spool.close()
            if self.orders is not None and self.orders.ledger is not None:
                self.orders.ledger.close()
        for sink in self.sinks:
            try:
                sink.close()
            except Exception as exc:  # its last results are lost; the rest of the stop goes on
                log.warning("results: a sink failed to close: %s", first_line(exc))
        self.pipeline.model.close()
        if self.summary_path is not None:
            try:
                _write_summary(self.summary_path, json.dumps(summary, indent=2).encode() + b"\n")
            except OSError as exc:
                log.warning("--summary %s: cannot write it (%s)", self.summary_path, exc.strerror)
        log.info(
            "stopped: %s",
            json.dumps({k: summary[k] for k in STOPPED_KEYS}),
        )

    def _flush_spool(self) -> None:
        """Wait (bounded) until everything spooled is acknowledged by the broker."""
        self.spool.flush()
        timeout = self.config.mqtt.flush_timeout
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self.link.drained():
            time.sleep(0.05)
        left = self.spool.depth()
        if left:
            log.warning(
                "mqtt: %d messages still spooled after %g s (broker: %s); they are kept in %s "
                "and sent on the next run",
                left, timeout, self.link.last_error or "slow", self.config.agent.state_dir,
            )  # fmt: skip
        else:
            log.info("mqtt: everything delivered (%d messages acknowledged)", self.link.acked)

    # --- MQTT: state, events, telemetry ------------------------------------------------------

    def _status(self, state: str) -> dict[str, Any]:
        model = getattr(self, "pipeline", None)
        return protocol.status_payload(
            state,
            device=self.device,
            agent_version=edge_agent.__version__,
            model=model.model.identity if model is not None else None,
            profile=getattr(getattr(self, "profile", None), "name", None),
            groups=tuple(self.config.mqtt.groups),
            ts=time.time(),
        )

    def event(self, kind: str, *, reason: str | None = None, **details: Any) -> None:
        if self.spool is None or self.topics is None:
            return
        seq = self.spool.allocate_seq("events")
        payload = protocol.event_payload(
            kind, device=self.device, seq=seq, ts=time.time(), reason=reason, **details
        )
        self.spool.put("events", self.topics.events, protocol.dumps(payload), seq=seq, durable=True)
        log.info("event %s%s", kind, f": {reason}" if reason else "")

    def _on_connect(self, link: Any) -> None:
        assert self.topics is not None
        self._publish_reported()  # the retained reported state, and status "online"
        if self.config.mqtt.home_assistant:
            from edge_agent.fleet.homeassistant import home_assistant_discovery

            names = [st.name for st in self.streams]
            for topic, payload in home_assistant_discovery(self.topics, self.device, streams=names):
                link.send(topic, payload, retain=True)

    def _publish_reported(self) -> None:
        if self.link is None or self.topics is None:
            return
        store = self.store
        payload = protocol.reported_payload(
            device=self.device,
            model=self.pipeline.model.identity if hasattr(self, "pipeline") else None,
            bundle_sha256=(store.current or {}).get("sha256") if store else None,
            update=self.updater.last_update if self.updater else None,
            ota={"enabled": self.updater is not None, "reason": self.ota_disabled},
            shadow=self.shadow.reported() if self.shadow is not None else None,
            floor=store.floor if store else None,
            history=[
                {
                    "sha256": h["sha256"],
                    "version": h.get("version"),
                    "committed": h.get("committed"),
                }
                for h in (store.history if store else [])
            ],
            ts=time.time(),
        )
        self.link.send(self.topics.reported, protocol.dumps(payload), retain=True)
        self.link.send(self.topics.status, protocol.dumps(self._status("online")), retain=True)

    def telemetry_payload(self) -> dict[str, Any]:
        p = self.pipeline
        now = time.monotonic()
        last_t, last_results, _ = self._telemetry_last
        interval = max(now - last_t, 1e-6)
        summary = p.summary()
        fps = (p.results - last_results) / interval
        self._telemetry_last = (now, p.results, p.inference_errors)
        window = p.take_window()
        latency = {k: {q: v.get(q) for q in ("p50", "p95", "p99")} for k, v in window.items()}
        monitoring = self.monitor.snapshot(reset=True) if self.monitor is not None else None
        seq = self.spool.allocate_seq("telemetry") if self.spool is not None else 0
        return {
            "schema": protocol.SCHEMA_VERSION,
            "seq": seq,
            "device": self.device,
            "ts": time.time(),
            "interval_s": round(interval, 3),
            "uptime_s": round(now - self.t_start, 3),
            "state": p.state.value,
            "model": p.model.identity,
            "spool_depth": self.spool.depth() if self.spool is not None else 0,
            "pipeline": {
                "fps": round(fps, 3),
                "results": p.results,
                "frames": p.frames,
                "dropped": int(summary.get("dropped", 0)),
                "inference_errors": p.inference_errors,
                "gated": p.gated,
                "workers": p.workers,
                "batch": p.batch,
                "latency_ms": latency,
                "plan": self.plan.to_dict() if self.plan is not None else None,
                **({"streams": self._stream_telemetry(interval)} if self.streams else {}),
            },
            "system": self.system.sample() if self.system is not None else {},
            "monitoring": monitoring,
            **({"capture": self.sampler.telemetry()} if self.sampler is not None else {}),
            **({"shadow": shadow} if (shadow := self._shadow_telemetry()) else {}),
        }

    def _shadow_telemetry(self) -> dict[str, Any] | None:
        return self.shadow.telemetry() if self.shadow is not None else None

    def _stream_telemetry(self, interval: float) -> dict[str, dict[str, Any]]:
        """One entry per stream: its state, fps over the interval, counters and latency
        percentiles of the interval (the pipeline's totals are beside it)."""
        out = {}
        for name, s in self.pipeline.stream_summary().items():
            before = self._stream_results.get(name, 0)
            self._stream_results[name] = s["results"]
            window = self.pipeline.take_stream_window(name)
            out[name] = {
                "state": s["state"],
                "fps": round((s["results"] - before) / interval, 3),
                "results": s["results"],
                "frames": s["frames"],
                "dropped": s["dropped"],
                "skipped": s["skipped"],
                "gated": s["gated"],
                "errors": s["errors"],
                "reconnects": s["reconnects"],
                "latency_ms": {
                    k: {q: v.get(q) for q in ("p50", "p95", "p99")} for k, v in window.items()
                },
            }
        return out

    def publish_telemetry(self) -> None:
        if self.spool is None and self.prometheus is None:
            return
        payload = self.telemetry_payload()
        self.latest_telemetry = payload
        if self.spool is None or self.topics is None:
            return
        self.spool.put(
            "telemetry",
            self.topics.telemetry,
            protocol.dumps(payload),
            seq=payload["seq"],
            retain=True,
        )
        drift = (payload.get("monitoring") or {}).get("drift") or {}
        drifted = bool(drift.get("drifted"))
        if drifted and not self._drifting:
            self.event("drift", reason="; ".join(drift.get("reasons") or []) or "drift", **drift)
        self._drifting = drifted
        stats = self.spool.stats
        if getattr(stats, "disk_full", False) and not getattr(self, "_disk_full_reported", False):
            self._disk_full_reported = True
            self.event(
                "spool_full",
                reason=f"the disk is full: {stats.events_lost} events could not be spooled",
            )

    # --- MQTT: incoming -----------------------------------------------------------------------

    def _on_message(self, msg: Any) -> None:
        topics = self.topics
        assert topics is not None
        prefix = self.config.mqtt.topic_prefix
        if msg.topic.startswith(f"{prefix}/bundles/"):
            if self.fetcher is not None:
                self.fetcher.handle(msg.topic, msg.payload)
            return
        if msg.topic == topics.desired or msg.topic.startswith(f"{prefix}/groups/"):
            with self._waiting_lock:  # the newest desired state of a topic wins
                if not self.order_bucket.take(count=False):
                    self._waiting_desired[msg.topic] = msg  # taken when the bucket refills
                    return
                self._waiting_desired.pop(msg.topic, None)
            self._on_desired(msg)
            return
        if msg.topic.startswith(f"{topics.base}/cmd/"):
            if not self.order_bucket.take():
                return  # a flood: dropped before any parsing or signature check (counted)
            name = msg.topic[len(f"{topics.base}/cmd/") :]
            self._on_command(name, msg)

    def _pace_orders(self) -> None:
        """On the main loop's tick: desired states held back by the rate limit are taken as the
        bucket refills, and the commands it dropped are said (one event per window)."""
        bucket = self.order_bucket
        while True:
            with self._waiting_lock:
                if not self._waiting_desired or not bucket.take(count=False):
                    break
                topic = next(iter(self._waiting_desired))
                msg = self._waiting_desired.pop(topic)
            self._on_desired(msg)
        dropped = bucket.report()
        if dropped:
            log.warning("orders: %d commands dropped by the rate limit", dropped)
            self.event(
                "command_rate_limited",
                reason=f"{dropped} commands dropped unread: over {bucket.rate:g}/s (burst "
                f"{bucket.burst}; [fleet] command_rate); desired states wait, latest per topic",
                dropped=dropped,
                rate=bucket.rate,
                burst=bucket.burst,
                window_s=bucket.window,
            )

    def _on_desired(self, msg: Any) -> None:
        if not msg.payload:
            self._desired[msg.topic] = None  # cleared by the operator: a group's may apply now
            self._desired_changed.set()
            return
        try:
            data = protocol.loads(msg.payload, what=f"{msg.topic}")
            desired = Desired.from_payload(data)
            self._check_order(msg.topic, data)
            self._desired[msg.topic] = desired
        except OrderRefused as exc:  # nothing changes: the previous desired state stands
            self._order_refused(msg.topic, bytes(msg.payload), exc)
            return
        except ProtocolError as exc:
            now = time.monotonic()
            if now - self._last_bad_desired > 60.0:  # a flood must not fill the spool
                self._last_bad_desired = now
                self.event("error", reason=f"ignored a malformed desired state: {exc}")
            return
        self._desired_changed.set()

    def effective_desired(self) -> Desired | None:
        assert self.topics is not None
        own = self._desired.get(self.topics.desired)
        if own is not None:
            return own
        for group in self.config.mqtt.groups:
            d = self._desired.get(self.topics.group_desired(group))
            if d is not None:
                return d
        return None

    def reconcile(self) -> None:
        desired = self.effective_desired()
        if self.shadow is not None:  # a shadow beside the serving model, or none
            self.shadow.request(desired.shadow if desired is not None else None)
        if desired is None:
            return
        current = self.store.current if self.store else None
        if current and current.get("sha256") == desired.sha256:
            return
        if self.updater is None:
            if self.ota_disabled and desired.sha256 not in self._refused_desired:
                self._refused_desired.add(desired.sha256)  # said once per desired bundle
                self.event(
                    "update_failed",
                    reason=f"OTA is disabled: {self.ota_disabled}",
                    sha256=desired.sha256,
                    deployment=desired.deployment,
                )
            return
        self.updater.request(desired)

    def _on_command(self, name: str, msg: Any) -> None:
        from edge_agent.fleet.mqtt import reply_properties

        assert self.topics is not None
        request_id = None
        accepted = None
        try:
            if name not in protocol.COMMANDS:
                raise ProtocolError(
                    f"unknown command {name!r}; expected one of {', '.join(protocol.COMMANDS)}"
                )
            data = protocol.loads(msg.payload or b"{}", what=f"command {name}")
            request_id = data.get("id")
            try:
                accepted = self._check_order(msg.topic, data, response_topic=msg.response_topic)
            except OrderRefused as exc:  # answered on the fixed reply topic, never one it names
                self._order_refused(msg.topic, bytes(msg.payload or b""), exc)
                reply = protocol.reply_payload(
                    name, ok=False, request_id=request_id, error=str(exc)
                )
                self.link.send(self.topics.reply(name), protocol.dumps(reply))
                return
            result = self._command(name, data)
            reply = protocol.reply_payload(name, ok=True, request_id=request_id, result=result)
        except (ProtocolError, UpdateError, EdgeError) as exc:
            reply = protocol.reply_payload(name, ok=False, request_id=request_id, error=str(exc))
        except Exception as exc:  # a bug must not take the agent down: reply and log it
            log.exception("command %s failed", name)
            reply = protocol.reply_payload(
                name, ok=False, request_id=request_id, error=f"internal error: {type(exc).__name__}"
            )
        topic = msg.response_topic or self.topics.reply(name)
        if msg.response_topic and ("+" in topic or "#" in topic):
            topic = self.topics.reply(name)
        if self.orders.enforcing and (accepted is None or accepted.reply_to != topic):
            topic = self.topics.reply(name)  # a Response Topic no signature covers
        self.link.send(
            topic, protocol.dumps(reply), properties=reply_properties(msg.correlation_data)
        )

    def _capture_command(self, data: Mapping[str, Any]) -> Any:
        """``edgectl capture --device D --off [--purge] | --on``."""
        enabled, purge = data.get("enabled"), data.get("purge", False)
        if not isinstance(enabled, bool) or not isinstance(purge, bool):
            raise ProtocolError("command capture: enabled (and purge) must be true or false")
        if self.sampler is None:
            if enabled:
                raise ProtocolError(
                    "command capture: no [capture] policy is configured on this device"
                )
            return {"enabled": False, "configured": False, "purged": 0, "waiting": 0}
        return self.sampler.set_enabled(enabled, purge=purge)

    def _command(self, name: str, data: Mapping[str, Any]) -> Any:
        if name == "ping":
            return {
                "pong": True,
                "agent_version": edge_agent.__version__,
                "model": self.pipeline.model.identity,
                "state": self.pipeline.state.value,
                "uptime_s": round(time.monotonic() - self.t_start, 3),
            }
        if name == "capture":
            return self._capture_command(data)
        if self.updater is None:
            raise UpdateError(f"OTA is disabled here: {self.ota_disabled or 'not started'}")
        if name == "update":
            desired = Desired.from_payload(data)
            self.updater.request(desired, origin="command")
            return {"accepted": True, "sha256": desired.sha256}
        if name == "rollback":
            version = data.get("version")
            if version is not None and not isinstance(version, str):
                raise ProtocolError("command rollback: version must be a string")
            target = self.updater.request_rollback(version)
            return {"accepted": True, "version": target.get("version"), "sha256": target["sha256"]}
        # reload: follow the desired state again, retrying one that failed
        wanted = self.effective_desired()
        if wanted is not None and self.store is not None:
            self.store.forget_failure(wanted.sha256)
        self._desired_changed.set()
        return {"accepted": True, "desired": wanted.sha256 if wanted else None}
