"""``edgectl shadow`` and ``rollout --require-shadow``: a candidate bundle run in shadow beside
the serving model (``edge_agent.shadow``), set through the desired state's ``shadow``.

A shadow rides on a desired state, which must name the bundle to serve: the target's own
retained desired state is kept and given a ``shadow``; a device without one gets one naming
the bundle it reports running (its deployment ``shadow-…``, so that ``--stop`` clears it
again and the device follows its groups as before). The shadow's progress comes back in the
devices' retained telemetry (``shadow`` section) and reported state.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from edge_agent.errors import EdgeError
from edge_agent.fleet import protocol
from edge_agent.fleet.protocol import Desired, ShadowSpec, Topics
from edgectl.tables import aligned, cell

#: the deployment of a desired state edgectl created only to carry a shadow
SHADOW_ONLY = "shadow-"


def desired_topic(prefix: str, *, device: str | None, group: str | None) -> str:
    if device:
        return Topics(device, prefix=prefix).desired
    assert group
    return protocol.group_desired_topic(group, prefix=prefix)


def retained(client: Any, topics: Sequence[str], *, timeout: float = 1.0) -> dict[str, bytes]:
    """The retained payload of each topic that has one (empty payloads are none)."""
    got: dict[str, bytes] = {}
    lock = threading.Lock()

    def keep(msg: Any) -> None:
        if msg.topic in topics and msg.payload:
            with lock:
                got[msg.topic] = bytes(msg.payload)

    client.subscribe(list(topics), keep)
    deadline = time.monotonic() + timeout  # retained messages follow the SUBACK at once
    while time.monotonic() < deadline:
        with lock:
            if len(got) == len(topics):
                break
        time.sleep(0.05)
    with lock:
        return dict(got)


def with_shadow(
    client: Any, spec: ShadowSpec, *, device: str | None = None, group: str | None = None
) -> tuple[str, Desired]:
    """The target's desired state with ``spec`` as its shadow, and its topic (not published)."""
    topic = desired_topic(client.prefix, device=device, group=group)
    current = retained(client, [topic]).get(topic)
    if current is not None:
        base = Desired.from_payload(protocol.loads(current, what=topic, limit=1 << 20))
        return topic, Desired(
            sha256=base.sha256, name=base.name, version=base.version, url=base.url,
            allow_downgrade=base.allow_downgrade, deployment=base.deployment, shadow=spec,
        )  # fmt: skip
    if group:
        raise EdgeError(
            f"group {group!r} has no desired state to run the shadow beside: deploy a bundle to "
            "it first (edgectl deploy), or name devices with --device"
        )
    assert device
    reported = Topics(device, prefix=client.prefix).reported
    raw = retained(client, [reported], timeout=2.0).get(reported)
    sha = json.loads(raw).get("bundle_sha256") if raw else None
    if not sha:
        raise EdgeError(
            f"device {device!r} reports no bundle it runs (is it online, with OTA enabled?): a "
            "shadow runs beside a bundle the device follows"
        )
    return topic, Desired(sha256=sha, deployment=f"{SHADOW_ONLY}{spec.deployment}", shadow=spec)


def without_shadow(client: Any, *, device: str | None, group: str | None) -> str:
    """Withdraw the target's shadow; says what it did."""
    topic = desired_topic(client.prefix, device=device, group=group)
    current = retained(client, [topic]).get(topic)
    if current is None:
        return f"no desired state on {topic}: no shadow to stop"
    base = Desired.from_payload(protocol.loads(current, what=topic, limit=1 << 20))
    if base.shadow is None:
        return f"no shadow in the desired state on {topic}"
    if base.deployment.startswith(SHADOW_ONLY):  # ours, only to carry the shadow: remove it
        client.publish(topic, b"", retain=True).wait_for_publish(10)
    else:
        kept = Desired(
            sha256=base.sha256, name=base.name, version=base.version, url=base.url,
            allow_downgrade=base.allow_downgrade, deployment=base.deployment,
        )  # fmt: skip
        payload = protocol.dumps(kept.to_payload(ts=time.time()))
        client.publish(topic, payload, retain=True).wait_for_publish(10)
    return f"shadow {base.shadow.sha256[:12]} stopped on {topic}"


# --- progress -------------------------------------------------------------------------------


def shadow_rows(fleet: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per device with a shadow (or one that ran), from telemetry and reported."""
    rows = []
    for device in sorted(fleet):
        tel = (fleet[device].get("telemetry") or {}).get("shadow")
        rep = (fleet[device].get("reported") or {}).get("shadow")
        if not tel and not rep:
            continue
        s = {**(rep or {}), **(tel or {})}
        model = s.get("model") or {}
        name = f"{model.get('name')} {model.get('version')}" if model else s.get("version") or "?"
        rows.append(
            {
                "device": device,
                "shadow": name,
                "sha256": s.get("sha256"),
                "state": s.get("state"),
                "frames": s.get("frames"),
                "target": s.get("target_frames"),
                "agreement": s.get("agreement"),
                "metric": s.get("metric"),
                "latency_ratio": s.get("latency_ratio"),
                "errors": s.get("errors"),
                "nans": s.get("nans"),
                "reason": s.get("reason"),
            }
        )
    return rows


def format_shadow_table(rows: list[dict[str, Any]]) -> str:
    cols = ("device", "shadow", "state", "frames", "agreement", "metric", "latency_ratio",
            "errors", "nans")  # fmt: skip
    heads = ("device", "shadow", "state", "frames", "agreement", "metric", "latency x",
             "errors", "NaNs")  # fmt: skip

    def shown(key: str, row: dict[str, Any]) -> str:
        v = row[key]
        if v is not None and key == "agreement":
            return f"{v:.3f}"
        if v is not None and key == "frames" and row.get("target"):
            return f"{v}/{row['target']}"
        return cell(v, digits=2)

    lines = aligned(heads, [[shown(c, r) for c in cols] for r in rows])
    for r in rows:
        if r["state"] == "failed" and r["reason"]:
            lines.append(f"{r['device']}: {r['reason']}")
    lines.append(f"{len(rows)} devices with a shadow")
    return "\n".join(lines)


@dataclass
class ShadowOutcome:
    """A canary's shadow: ``done`` (compared the frames asked for), ``failed`` or ``timeout``."""

    state: str
    frames: int = 0
    agreement: float | None = None
    latency_ratio: float | None = None
    reason: str | None = None


def wait_for_shadows(
    client: Any, devices: Sequence[str], sha: str, *, frames: int, timeout: float
) -> dict[str, ShadowOutcome]:
    """Each device's shadow of ``sha`` once it compared ``frames`` frames, failed, or the
    timeout passed (read from their telemetry and reported state)."""
    out: dict[str, ShadowOutcome] = {}
    seen: dict[str, ShadowOutcome] = {}
    lock = threading.Lock()
    wanted = set(devices)

    def on_message(msg: Any) -> None:
        device = protocol.device_of(msg.topic, prefix=client.prefix)
        if device not in wanted or not msg.payload:
            return
        try:
            s = (json.loads(msg.payload) or {}).get("shadow") or {}
        except (ValueError, AttributeError):
            return
        if s.get("sha256") != sha:
            return
        with lock:
            if device in out:
                return
            if s.get("state") == "failed":
                out[device] = ShadowOutcome("failed", reason=s.get("reason") or "failed")
            elif msg.topic.endswith("/telemetry"):
                got = ShadowOutcome(
                    "running", int(s.get("frames") or 0), s.get("agreement"),
                    s.get("latency_ratio"),
                )  # fmt: skip
                seen[device] = got
                if got.frames >= frames:
                    got.state = "done"
                    out[device] = got

    topics = [f"{client.prefix}/{d}/{k}" for d in devices for k in ("telemetry", "reported")]
    client.subscribe(topics, on_message)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with lock:
            if len(out) == len(wanted):
                break
        time.sleep(0.1)
    with lock:
        result = {}
        for d in devices:
            last = seen.get(d, ShadowOutcome("timeout"))
            result[d] = out.get(d) or ShadowOutcome(
                "timeout", last.frames, last.agreement, last.latency_ratio
            )
        return result


def new_deployment() -> str:
    return uuid.uuid4().hex[:12]


__all__ = [
    "SHADOW_ONLY",
    "ShadowOutcome",
    "desired_topic",
    "format_shadow_table",
    "new_deployment",
    "retained",
    "shadow_rows",
    "wait_for_shadows",
    "with_shadow",
    "without_shadow",
]
