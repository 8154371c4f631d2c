"""Over-the-air model updates: pull-based, verified, health-gated, rolled back by themselves.

The device reconciles towards its desired state (``edge/<device>/desired``, or a group's): when
the desired bundle differs from the committed one, :class:`Updater` runs, in its own thread:

1. **fetch**: a bundle kept on disk from before (a rollback is instant); else the ``url`` of the
   desired state over HTTP(S), resumed with Range requests (``edge_agent.fleet.download``); else the
   retained chunks ``edgectl publish`` left on the broker (``edge_agent.fleet.fetch``), each checked
   against its sha256 as it arrives, kept on disk so an interrupted transfer resumes. Whatever
   the route, the whole file must hash to the desired sha256.
2. **verify** before anything is loaded: the Ed25519 signature against the trusted keys and each
   artifact's sha256 (``edge_agent.model.bundle``), compatibility (an artifact for this profile
   whose runtime is installed, and the agent version the bundle requires), anti-rollback (the
   version may not go below the floor, the highest version ever committed, unless the desired state
   says ``allow_downgrade``: what ``edgectl rollback`` sets).
3. **stage**: the pending update is written to ``state.json`` first, then the bundle is extracted
   into the state directory, loaded and warmed beside the running model, and its golden input
   smoke-tested.
4. **swap** between two frames (``Pipeline.swap_model``), then a **health window**: no inference
   errors or NaN/inf outputs beyond ``max_error_rate``, inference p95 at most ``latency_budget``
   times the reference (the larger of the bundle's measured latency and the previous model's p95
   here) plus ``latency_slack_ms`` (scheduler jitter), enough frames, and predictions that did
   not collapse to one class where the previous
   model's were spread. Pass: **commit**. Fail: swap back to the previous model (still loaded),
   and an event that says why.

Crash safety (``state.json`` is replaced atomically: temp file, fsync, rename, fsync of the
directory): a SIGKILL or power loss during download leaves chunks or a ``.part`` file that the
next attempt resumes; during stage or swap, ``state.json`` still names the old model as current
and the update as pending, so the next start runs the old model, records the update as failed
("the agent restarted during the update") and does not retry it for the same deployment; during
commit, the rename either happened or it did not. The device never starts on a half-installed
model. The last ``keep_models`` committed bundles stay on disk.

``EDGE_AGENT_CRASH_AT=download|stage|swap|commit`` makes the agent SIGKILL itself at that step:
the fault-injection point the crash tests use (a designed seam, like a synthetic Source).

The parts: ``store`` (state.json and the kept bundles), ``download`` and ``fetch`` (the two
routes a bundle arrives by), ``health`` (what the window measures), and this module, which
orders them.
"""

from __future__ import annotations

import logging
import queue
import shutil
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import edge_agent
from edge_agent.common.hashing import sha256_file
from edge_agent.common.semver import version_key
from edge_agent.common.slots import put_latest
from edge_agent.errors import BundleError, EdgeError, ModelError, UpdateError
from edge_agent.fleet.health import HealthProbe, HealthVerdict, bundle_latency_ms, top_fraction
from edge_agent.fleet.protocol import (
    Desired,
)
from edge_agent.fleet.store import ModelStore, crash_point
from edge_agent.stats import percentile

log = logging.getLogger(__name__)

STOPPING = "the agent is stopping"


def check_compatible(manifest: Mapping[str, Any], profile: Any) -> None:
    """Raises UpdateError when the bundle is not for this device or needs a newer agent."""
    from edge_agent.model.loader import choose_artifact

    named = {p for a in manifest.get("artifacts", []) for p in a.get("profiles", [])}
    if named and profile.name not in named:
        raise UpdateError(
            f"bundle {manifest.get('name')} {manifest.get('version')} is built for "
            f"{sorted(named)}, not this device's profile {profile.name}"
        )
    try:
        choose_artifact(manifest, profile)
    except ModelError as exc:
        raise UpdateError(f"bundle is not compatible: {exc}") from None
    need = (manifest.get("requires") or {}).get("agent")
    if isinstance(need, str) and version_key(edge_agent.__version__) < version_key(
        need.lstrip(">=")
    ):
        raise UpdateError(
            f"bundle needs edge-agent {need}; this is {edge_agent.__version__}: upgrade the agent"
        )


@dataclass(frozen=True)
class _Job:
    kind: str  # "update" | "rollback"
    desired: Desired | None = None
    version: str | None = None
    origin: str = "desired"


class Updater:
    """Runs update and rollback jobs one at a time in its own thread (latest request wins)."""

    def __init__(
        self,
        *,
        store: ModelStore,
        settings: Any,  # config.OtaSection
        profile: Any,
        trusted_keys: Mapping[str, Any],
        fetch_mqtt: Callable[[str, threading.Event], Path] | None,
        load: Callable[[Path], Any],
        pipeline: Any,
        probe: HealthProbe,
        event: Callable[..., None],
        report: Callable[[dict[str, Any] | None], None],
    ) -> None:
        self.store = store
        self.settings = settings
        self.profile = profile
        self.trusted_keys = trusted_keys
        self.fetch_mqtt = fetch_mqtt
        self.load = load
        self.pipeline = pipeline
        self.probe = probe
        self.event = event
        self.report = report
        self.last_update: dict[str, Any] | None = None
        self.busy = threading.Event()
        self._jobs: queue.Queue[_Job] = queue.Queue(maxsize=1)  # only the newest request matters
        self._stop = threading.Event()
        self._fetching = threading.Lock()  # one bundle transfer at a time (update or shadow)
        self._thread = threading.Thread(target=self._run, name="edge-ota", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._submit(_Job("stop"))
        self._thread.join(timeout)

    def _submit(self, job: _Job) -> None:
        """Replace whatever waits (a flood of commands holds one job, not a queue of them)."""
        put_latest(self._jobs, job)

    def request(self, desired: Desired, *, origin: str = "desired") -> None:
        self._submit(_Job("update", desired=desired, origin=origin))

    def request_rollback(self, version: str | None = None) -> dict[str, Any]:
        """Queue a rollback to ``version`` (default: the committed model before the current
        one); returns the target, or raises UpdateError when there is none on disk."""
        target = self.rollback_target(version)
        self._submit(_Job("rollback", version=str(target["version"]), origin="command"))
        return target

    def rollback_target(self, version: str | None) -> dict[str, Any]:
        current = self.store.current
        history = [h for h in self.store.history if not current or h["sha256"] != current["sha256"]]
        if version is not None:
            history = [h for h in history if h.get("version") == version]
        history = [h for h in history if self.store.bundle_path(str(h["sha256"]))]
        if not history:
            which = f"version {version}" if version else "an earlier committed model"
            raise UpdateError(f"no rollback target: {which} is not kept on this device")
        return history[-1]

    # --- the thread ------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            job = self._jobs.get()
            if job.kind == "stop":
                return
            self.busy.set()
            try:
                if job.kind == "rollback":
                    target = self.rollback_target(job.version)
                    desired = Desired(
                        sha256=str(target["sha256"]),
                        name=str(target.get("name", "")),
                        version=str(target.get("version", "")),
                        allow_downgrade=True,
                        deployment=f"rollback-{int(time.time())}",
                    )
                    self._update(desired, origin="rollback")
                elif job.desired is not None:
                    self._update(job.desired, origin=job.origin)
            except Exception:  # a bug: report it, keep the updater alive
                log.exception("ota: job failed")
                self.event("error", reason="internal error in the updater; see the agent log")
            finally:
                self.busy.clear()

    def _state(self, desired: Desired, state: str, reason: str | None = None, **extra: Any) -> None:
        self.last_update = {
            "sha256": desired.sha256,
            "version": desired.version,
            "state": state,
            "reason": reason,
            "deployment": desired.deployment,
            **extra,
        }
        self.report(self.last_update)

    def _update(self, desired: Desired, *, origin: str) -> None:
        current = self.store.current
        if current and current.get("sha256") == desired.sha256:
            return
        failed = self.store.failed_reason(desired)
        if failed is not None and origin == "desired":
            log.info("ota: %s already failed here (%s); not retrying", desired.sha256[:12], failed)
            return
        self.event(
            "update_started",
            reason=origin,
            sha256=desired.sha256,
            version=desired.version,
            deployment=desired.deployment,
        )
        self._state(desired, "downloading")
        try:
            path, manifest = self.fetch_verified(
                desired, on_fetched=lambda: self._state(desired, "verifying")
            )
        except (UpdateError, BundleError, EdgeError) as exc:
            self._fail(desired, f"{exc}", kind="update_failed")
            return
        entry = {
            "sha256": desired.sha256,
            "name": str(manifest["name"]),
            "version": str(manifest["version"]),
            "deployment": desired.deployment,
        }
        desired = Desired(
            sha256=desired.sha256,
            name=entry["name"],
            version=entry["version"],
            url=desired.url,
            allow_downgrade=desired.allow_downgrade,
            deployment=desired.deployment,
        )
        self.event("update_verified", sha256=desired.sha256, version=entry["version"])
        kept = self.store.keep_bundle(path, desired.sha256)
        self.store.begin(entry)
        crash_point("stage")
        try:
            new = self.load(kept)
        except EdgeError as exc:
            self._fail(desired, f"the new model failed to load: {exc}", kind="update_failed")
            return
        old_model = self.pipeline.model
        reference = self._reference_ms(old_model, new)
        key = (new.name, new.version)
        self.probe.reset(key)
        before = (self.pipeline.results, 0)
        crash_point("swap")
        try:
            old = self.pipeline.swap_model(new)
        except EdgeError as exc:
            new.close()
            self._fail(desired, f"swap failed: {exc}", kind="update_failed")
            return
        self._state(desired, "health_check")
        verdict = self._health(key, before, reference, old_model, new)
        if not verdict.ok:
            try:
                back = self.pipeline.swap_model(old)
            except EdgeError as exc:  # the pipeline is stuck: systemd's watchdog restarts us,
                log.error("ota: swap back failed: %s", exc)  # and state.json says pending
                return
            back.close()
            if verdict.reason == STOPPING:
                self.store.cancel()  # not the bundle's fault: try again after the restart
                self._state(desired, "failed", "interrupted: the agent stopped")
                return
            self._fail(
                desired,
                f"health window failed: {verdict.reason}",
                kind="rolled_back",
                frames=verdict.frames,
                errors=verdict.errors,
                p95_ms=verdict.p95_ms,
                reference_ms=verdict.reference_ms,
            )
            return
        crash_point("commit")
        self.store.commit(entry)
        old.close()
        self._prune_models()
        self.event(
            "update_committed",
            sha256=desired.sha256,
            version=entry["version"],
            frames=verdict.frames,
            p95_ms=verdict.p95_ms,
        )
        self._state(desired, "committed")

    def _fail(self, desired: Desired, reason: str, *, kind: str, **details: Any) -> None:
        log.warning("ota: %s %s: %s", desired.sha256[:12], kind, reason)
        self.store.abort(desired.sha256, reason=reason, deployment=desired.deployment)
        self.event(kind, reason=reason, sha256=desired.sha256, version=desired.version, **details)
        self._state(desired, "rolled_back" if kind == "rolled_back" else "failed", reason)

    def fetch_verified(
        self,
        desired: Desired,
        *,
        cancel: threading.Event | None = None,
        on_fetched: Callable[[], None] | None = None,
    ) -> tuple[Path, dict[str, Any]]:
        """Steps 1 and 2 (fetch, then verify: hashes, signature, compatibility, the floor) of
        ``desired``'s bundle: its path and manifest, or UpdateError / BundleError. The shadow
        (``edge_agent.shadow``) fetches its candidate through here too, from its own thread:
        one transfer at a time (the MQTT chunk fetcher follows one bundle)."""
        with self._fetching:
            path = self._fetch(desired, cancel or self._stop)
            if on_fetched is not None:
                on_fetched()
            return path, self._verify(path, desired)

    def _fetch(self, desired: Desired, cancel: threading.Event) -> Path:
        kept = self.store.bundle_path(desired.sha256)
        if kept is not None:
            return kept
        max_bytes = int(self.settings.max_bundle_mb * 2**20)
        if desired.url:
            from edge_agent.fleet.download import download

            dest = self.store.downloads / f"{desired.sha256}.edgebundle"
            ca = Path(self.settings.ca_file) if self.settings.ca_file else None
            path = download(
                desired.url,
                dest,
                expected_sha256=desired.sha256,
                timeout=self.settings.transfer_timeout,
                max_bytes=max_bytes,
                ca_file=ca,
            )
            return Path(path)
        if self.fetch_mqtt is None:
            raise UpdateError("no route to the bundle: no url in the desired state and no broker")
        return self.fetch_mqtt(desired.sha256, cancel)

    def _verify(self, path: Path, desired: Desired) -> dict[str, Any]:
        from edge_agent.model.bundle import verify_bundle

        if sha256_file(path) != desired.sha256:
            path.unlink(missing_ok=True)
            raise UpdateError(f"bundle {desired.sha256[:12]}: the file does not hash to it")
        try:
            verified = verify_bundle(path, trusted_keys=self.trusted_keys)
        except BundleError as exc:
            path.unlink(missing_ok=True)
            raise UpdateError(f"bundle rejected: {exc}") from None
        manifest = dict(verified.manifest)
        check_compatible(manifest, self.profile)
        floor = self.store.floor
        version = str(manifest["version"])
        if floor and version_key(version) < version_key(floor) and not desired.allow_downgrade:
            raise UpdateError(
                f"version {version} is below the anti-rollback floor {floor}; only an explicit "
                "rollback (edgectl rollback) may go below it"
            )
        return manifest

    def _reference_ms(self, old: Any, new: Any) -> float | None:
        candidates = [bundle_latency_ms(new)]
        prev = self.probe.snapshot((old.name, old.version))["lat"]
        candidates.append(percentile(prev[-200:], 95))
        known = [c for c in candidates if c]
        return max(known) if known else None

    def _health(
        self,
        key: tuple[str, str],
        before: tuple[int, int],
        reference: float | None,
        old_model: Any,
        new_model: Any = None,
    ) -> HealthVerdict:
        s = self.settings
        deadline = time.monotonic() + s.health_window
        extended = False
        while True:
            if self._stop.wait(0.1):
                break
            rec = self.probe.snapshot(key)
            errors_now = self._errors(new_model, before)
            if time.monotonic() >= deadline:
                if len(rec["lat"]) >= s.health_min_frames or extended:
                    break
                extended, deadline = True, time.monotonic() + s.health_window
            if errors_now and s.max_error_rate == 0:
                break  # the first failure decides: no need to watch a broken model longer
        rec = self.probe.snapshot(key)
        frames = len(rec["lat"])
        errors = max(self._errors(new_model, before), sum(rec["err"]))
        p95 = percentile(rec["lat"], 95)
        verdict = HealthVerdict(True, None, frames, errors, p95, reference)
        if self._stop.is_set():
            verdict.ok, verdict.reason = False, STOPPING
        elif frames + errors == 0 or (frames < s.health_min_frames and errors == 0):
            verdict.ok = False
            verdict.reason = f"only {frames} results in the window (need {s.health_min_frames})"
        elif errors > s.max_error_rate * max(frames, 1):
            verdict.ok = False
            verdict.reason = (
                f"{errors} of {max(frames, errors)} frames failed (inference errors or NaN/inf "
                f"outputs; allowed rate {s.max_error_rate:g})"
            )
        elif (
            p95 is not None
            and reference
            and p95 > s.latency_budget * reference + s.latency_slack_ms
        ):
            verdict.ok = False
            verdict.reason = (
                f"inference p95 {p95:.2f} ms is over {s.latency_budget:g}x the reference "
                f"{reference:.2f} ms plus {s.latency_slack_ms:g} ms"
            )
        elif s.check_collapse:
            new_top = top_fraction(rec["cls"])
            old_top = top_fraction(self.probe.snapshot((old_model.name, old_model.version))["cls"])
            if new_top is not None and old_top is not None and new_top >= 0.99 and old_top < 0.8:
                verdict.ok = False
                verdict.reason = (
                    f"predictions collapsed: one class in {new_top:.0%} of frames, where the "
                    f"previous model's top class had {old_top:.0%}"
                )
        return verdict

    def _errors(self, model: Any, before: tuple[int, int]) -> int:
        """The new model's own failed frames (not the old model's, still in flight)."""
        errors_of = getattr(self.pipeline, "errors_of", None)
        if model is not None and errors_of is not None:
            return int(errors_of(model))
        return int(self.pipeline.inference_errors - before[1])

    def _prune_models(self) -> None:
        """Extracted models no kept bundle refers to go (the bundle can be extracted again)."""
        models = Path(self.store.root).parent / "models"
        keep = {f"{h.get('name')}-{h.get('version')}" for h in self.store.history}
        current = self.pipeline.model
        keep.add(f"{current.name}-{current.version}")
        if not models.is_dir():
            return
        for d in models.iterdir():
            if d.is_dir() and not d.name.startswith(".") and d.name not in keep:
                shutil.rmtree(d, ignore_errors=True)
