"""What a health window judges a new model by: per model version, recent inference latency,
errors and top classes (:class:`HealthProbe`, a result sink), and the verdict."""

import logging
import threading
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


@dataclass
class HealthVerdict:
    ok: bool
    reason: str | None
    frames: int
    errors: int
    p95_ms: float | None
    reference_ms: float | None


class HealthProbe:
    """A result sink that remembers, per model version, recent inference latency, errors and
    top classes: what the health window judges a new model by."""

    def __init__(self, *, keep: int = 500) -> None:
        self.keep = keep
        self._lock = threading.Lock()
        self._by_model: dict[tuple[str, str], dict[str, list[Any]]] = {}

    def write(self, result: dict[str, Any]) -> None:
        ident = result.get("model") or {}
        key = (str(ident.get("name")), str(ident.get("version")))
        out = result.get("output") or {}
        with self._lock:
            rec = self._by_model.setdefault(key, {"lat": [], "err": [], "cls": []})
            rec["lat"].append(float(result["latency_ms"]["inference"]))
            rec["err"].append("error" in out)
            rec["cls"].append(out.get("class"))
            if len(rec["lat"]) > self.keep:
                for k in rec:
                    del rec[k][: len(rec[k]) - self.keep]

    def close(self) -> None:
        pass

    def reset(self, key: tuple[str, str]) -> None:
        with self._lock:
            self._by_model.pop(key, None)

    def snapshot(self, key: tuple[str, str]) -> dict[str, list[Any]]:
        with self._lock:
            rec = self._by_model.get(key, {"lat": [], "err": [], "cls": []})
            return {k: list(v) for k, v in rec.items()}


def top_fraction(classes: list[Any]) -> float | None:
    known = [c for c in classes if c is not None]
    if len(known) < 20:
        return None
    counts: dict[Any, int] = {}
    for c in known:
        counts[c] = counts.get(c, 0) + 1
    return max(counts.values()) / len(known)


def bundle_latency_ms(model: Any) -> float | None:
    """The converter's measured latency for the artifact this device runs."""
    manifest = model.manifest or {}
    for entry in manifest.get("validation", []) or []:
        if str(model.artifact).endswith(str(entry.get("artifact", "\0"))):
            value = entry.get("latency_ms")
            return float(value) if isinstance(value, (int, float)) else None
    return None
