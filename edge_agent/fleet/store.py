"""The device's model store: ``<state_dir>/ota/state.json`` (the committed pointer: current,
floor, history, pending, failed), the kept bundles, and the fault-injection points of the crash
tests (``EDGE_AGENT_CRASH_AT``)."""

import json
import logging
import os
import signal
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from edge_agent.common.durable import atomic_write, fsync_dir
from edge_agent.common.semver import version_key
from edge_agent.fleet.protocol import (
    SCHEMA_VERSION,
    Desired,
)

log = logging.getLogger(__name__)


STATE_FILE = "state.json"
_CRASH_ENV = "EDGE_AGENT_CRASH_AT"


def crash_point(step: str) -> None:
    """Fault injection for the crash tests: SIGKILL ourselves at ``step`` when asked to."""
    if os.environ.get(_CRASH_ENV) == step:
        log.warning("crash point %s: killing the agent (%s is set)", step, _CRASH_ENV)
        os.kill(os.getpid(), signal.SIGKILL)


# --- the committed pointer -------------------------------------------------------------------


class ModelStore:
    """``<state_dir>/ota/``: ``state.json`` (current, floor, history, pending, failed) and the
    kept bundles (``bundles/<sha256>.edgebundle``)."""

    def __init__(self, state_dir: Path, *, keep: int = 3) -> None:
        self.root = Path(state_dir) / "ota"
        self.bundles = self.root / "bundles"
        self.downloads = self.root / "downloads"
        self.keep = keep
        for d in (self.root, self.bundles, self.downloads):
            d.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self.state = self._load()

    def _load(self) -> dict[str, Any]:
        path = self.root / STATE_FILE
        empty: dict[str, Any] = {
            "schema": SCHEMA_VERSION,
            "current": None,
            "floor": None,
            "history": [],
            "pending": None,
            "failed": {},
        }
        if not path.exists():
            return empty
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(data, dict):
                raise ValueError("not an object")
        except (OSError, ValueError) as exc:
            aside = path.with_name(f"{STATE_FILE}.corrupt-{int(time.time())}")
            path.rename(aside)
            log.warning("ota: %s unreadable (%s); moved to %s, starting afresh", path, exc, aside)
            return empty
        return {**empty, **data}

    def _save(self) -> None:
        atomic_write(self.root / STATE_FILE, json.dumps(self.state, indent=2).encode() + b"\n")

    @property
    def current(self) -> dict[str, Any] | None:
        cur = self.state.get("current")
        return dict(cur) if isinstance(cur, dict) else None

    @property
    def floor(self) -> str | None:
        return self.state.get("floor")

    @property
    def history(self) -> list[dict[str, Any]]:
        return [dict(h) for h in self.state.get("history", [])]

    def bundle_path(self, sha256: str) -> Path | None:
        path = self.bundles / f"{sha256}.edgebundle"
        return path if path.is_file() else None

    def failed_reason(self, desired: Desired) -> str | None:
        entry = self.state.get("failed", {}).get(desired.sha256)
        if not isinstance(entry, dict):
            return None
        return (
            str(entry.get("reason")) if entry.get("deployment", "") == desired.deployment else None
        )

    def keep_bundle(self, src: Path, sha256: str) -> Path:
        dest = self.bundles / f"{sha256}.edgebundle"
        if dest.exists():
            if src != dest:
                src.unlink(missing_ok=True)
            return dest
        os.replace(src, dest)
        fsync_dir(self.bundles)
        return dest

    def begin(self, entry: Mapping[str, Any]) -> None:
        with self._lock:
            self.state["pending"] = dict(entry, started=time.time())
            self._save()

    def commit(self, entry: Mapping[str, Any]) -> None:
        with self._lock:
            committed = dict(entry, committed=time.time())
            self.state["current"] = committed
            floor = self.state.get("floor")
            if floor is None or version_key(str(entry["version"])) > version_key(str(floor)):
                self.state["floor"] = str(entry["version"])
            history = [
                h for h in self.state.get("history", []) if h.get("sha256") != entry["sha256"]
            ]
            history.append(committed)
            self.state["history"] = history[-self.keep :]
            self.state["pending"] = None
            self.state.get("failed", {}).pop(entry["sha256"], None)
            self._save()
        self.prune()

    def abort(self, sha256: str, *, reason: str, deployment: str = "") -> None:
        with self._lock:
            self.state["pending"] = None
            self.state.setdefault("failed", {})[sha256] = {
                "reason": reason,
                "deployment": deployment,
                "ts": time.time(),
            }
            self._save()

    def forget_failure(self, sha256: str) -> None:
        with self._lock:
            if self.state.get("failed", {}).pop(sha256, None) is not None:
                self._save()

    def cancel(self) -> None:
        """The update did not finish for a reason that is not the bundle's (the agent stopped):
        no longer pending, and not recorded as failed, so it is tried again."""
        with self._lock:
            self.state["pending"] = None
            self._save()

    def recover(self) -> dict[str, Any] | None:
        """At start-up: an update still pending means the agent died during it. It is recorded
        as failed; the caller runs the committed model and reports the rollback."""
        pending = self.state.get("pending")
        if not isinstance(pending, dict):
            return None
        self.abort(
            str(pending.get("sha256")),
            reason="the agent restarted during the update (crash or power loss)",
            deployment=str(pending.get("deployment", "")),
        )
        return dict(pending)

    def prune(self) -> None:
        """Keep the bundles of the history (and the current one); drop the rest."""
        keep = {h.get("sha256") for h in self.state.get("history", [])}
        cur = self.current
        if cur:
            keep.add(cur.get("sha256"))
        for path in self.bundles.glob("*.edgebundle"):
            if path.stem not in keep:
                path.unlink(missing_ok=True)
