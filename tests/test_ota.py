"""Over-the-air updates against a real Mosquitto and real `edge-agent` processes: the happy
path over MQTT chunks and over HTTP with a hot swap that loses no frame, every fault leaving the
device on a working model with an event naming the cause, SIGKILL at every step, anti-rollback
and explicit rollback, and a staged rollout that aborts and reverts its canaries."""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from edge_agent.fleet import protocol
from edge_agent.model.keys import generate_keypair, load_trusted_keys
from tests.broker import Broker, Collector, broker_fixture  # noqa: F401
from tests.fleet import (  # noqa: F401  (fleet_env_fixture: the `fleet_env` fixture)
    AgentProcess,
    add_traversal_member,
    agent_config,
    digits_video,
    edgectl,
    events,
    fleet_env_fixture,
    payloads,
    repack,
    wait_until,
)

DEVICE = "cam-1"
TOPICS = protocol.Topics(DEVICE)

#: ``rollout --discover`` and ``status --timeout``: how long edgectl gathers retained messages
#: after its SUBACK. Mosquitto sends them with the SUBACK, so on loopback 0.5 s holds them all;
#: the defaults (2 s, 1.5 s) are sized for a broker across a network, and were fixed waits here.
QUICK_DISCOVER = ("--discover", "0.5s")
QUICK_STATUS = ("--timeout", "0.5s")


def _status_rows(broker: Broker, until: Any, *, timeout: float = 15.0) -> list[dict[str, Any]]:
    """``edgectl status --json``'s rows, read again until ``until(rows)`` holds or ``timeout``
    passes (the caller asserts): a device's model there is its latest telemetry's, so a swap
    or a rollback shows at its next telemetry tick, not at once."""
    deadline = time.monotonic() + timeout
    while True:
        run = edgectl("status", "--json", *QUICK_STATUS, broker=broker.url)
        assert run.returncode == 0, run.stderr
        rows: list[dict[str, Any]] = json.loads(run.stdout)
        if until(rows) or time.monotonic() > deadline:
            return rows


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _config(broker: Broker, env: dict[str, Any], tmp: Path, **kw: Any) -> str:
    kw.setdefault("source", f"file:{env['video']}?loop=1&live=1")
    return agent_config(
        broker=broker.url, device=DEVICE, state_dir=tmp / "state",
        model=env["root"] / "digits-1.0.0.edgebundle", keys=env["pub"], **kw,
    )  # fmt: skip


def _online(broker: Broker, agent: AgentProcess | None = None, timeout: float = 30.0) -> None:
    with Collector(broker, [TOPICS.status]) as watch:
        try:
            watch.wait_for(lambda m: any(b'"online"' in x.payload for x in m), timeout=timeout)
        except AssertionError as exc:
            log = agent.text()[-3000:] if agent is not None else ""
            raise AssertionError(
                f"{exc}; agent alive: {agent and agent.alive()}; log: {log}"
            ) from None


def _deploy(broker: Broker, bundle: Path, *extra: str) -> str:
    run = edgectl("deploy", str(bundle), "--device", DEVICE, *extra, broker=broker.url)
    assert run.returncode == 0, run.stderr
    return _sha(bundle)


def _outcome(consumer: Collector, sha: str, timeout: float = 40.0) -> dict[str, Any]:
    """The device's final update state for ``sha``, from its retained reported topic."""

    def done(msgs: list[Any]) -> bool:
        for r in payloads(msgs, "/reported"):
            u = r.get("update") or {}
            if u.get("sha256") == sha and u.get("state") in ("committed", "failed", "rolled_back"):
                return True
        return False

    msgs = consumer.wait_for(done, timeout=timeout)
    final = [r for r in payloads(msgs, "/reported") if (r.get("update") or {}).get("sha256") == sha]
    return final[-1]


def test_ota_over_mqtt_chunks_swaps_without_losing_a_frame(
    broker: Broker, fleet_env: dict[str, Any], tmp_path: Path
) -> None:
    """A paced (finite) 600-frame video: the update lands mid-stream; every frame index comes
    out exactly once, seq contiguous, v1.0.0 before the swap and v1.1.0 after."""
    video = fleet_env["video"]
    frames = np.concatenate([_frames(video)] * 5)
    long_video = digits_video(tmp_path / "long.mp4", frames, fps=60.0)
    cfg = _config(broker, fleet_env, tmp_path, source=f"file:{long_video}", pace="native",
                  results=str(tmp_path / "r.jsonl"))  # fmt: skip
    with Collector(broker, [f"{TOPICS.base}/#"]) as consumer:
        agent = AgentProcess(tmp_path, cfg).start()
        _online(broker, agent)
        sha = _deploy(broker, fleet_env["root"] / "digits-1.1.0.edgebundle")
        rep = _outcome(consumer, sha)
        assert rep["update"]["state"] == "committed", rep
        assert rep["model"]["version"] == "1.1.0" and rep["floor"] == "1.1.0"
        assert agent.wait(90) == 0, agent.text()
        msgs = consumer.messages
    results = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert [r["frame"] for r in results] == list(range(600))
    assert [r["seq"] for r in results] == list(range(600))
    versions = [r["model"]["version"] for r in results]
    switch = versions.index("1.1.0")
    assert 0 < switch < 600 and set(versions[switch:]) == {"1.1.0"}
    kinds = [e["kind"] for e in events(msgs)]
    for kind in ("update_started", "update_verified", "update_committed"):
        assert kind in kinds, kinds
    state = json.loads((tmp_path / "state" / "ota" / "state.json").read_text())
    assert state["current"]["version"] == "1.1.0" and state["pending"] is None
    assert (tmp_path / "state" / "ota" / "bundles" / f"{sha}.edgebundle").is_file()


def _frames(video: Path) -> np.ndarray:
    import cv2

    cap = cv2.VideoCapture(str(video))
    out = []
    while True:
        ok, img = cap.read()
        if not ok:
            break
        grey = cv2.cvtColor(
            cv2.resize(img, (8, 8), interpolation=cv2.INTER_AREA), cv2.COLOR_BGR2GRAY
        )
        out.append(grey.astype(np.float32)[None] / 255.0)
    cap.release()
    return np.stack(out)


def _serve_directory(root: Path, host: str) -> Iterator[tuple[str, Path]]:
    """An HTTP server for ``root`` on ``host`` (an IPv4 or IPv6 loopback address): its base
    URL, and ``root``."""
    root.mkdir()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a: Any, **kw: Any) -> None:
            super().__init__(*a, directory=str(root), **kw)

        def log_message(self, *a: Any) -> None:
            pass

    class Server(http.server.ThreadingHTTPServer):
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

    server = Server((host, 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    netloc = f"[{host}]" if ":" in host else host
    yield f"http://{netloc}:{server.server_address[1]}", root
    server.shutdown()
    server.server_close()


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.fixture()
def http_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    yield from _serve_directory(tmp_path / "www", "127.0.0.1")


def test_ota_over_http(
    broker: Broker, fleet_env: dict[str, Any], tmp_path: Path, http_server: tuple[str, Path]
) -> None:
    base, root = http_server
    bundle = fleet_env["root"] / "digits-1.1.0.edgebundle"
    (root / "b.edgebundle").write_bytes(bundle.read_bytes())
    with (
        Collector(broker, [f"{TOPICS.base}/#"]) as consumer,
        AgentProcess(tmp_path, _config(broker, fleet_env, tmp_path)) as agent,
    ):
        _online(broker, agent)
        sha = _deploy(broker, bundle, "--url", f"{base}/b.edgebundle")
        rep = _outcome(consumer, sha)
        assert rep["update"]["state"] == "committed", (rep, agent.text())
        assert rep["model"]["version"] == "1.1.0"
        assert agent.stop() == 0
    # No chunks were published: it came over HTTP.
    with Collector(broker, [f"edge/bundles/{sha}/meta"]) as probe:
        import time

        time.sleep(0.5)
        assert probe.messages == []


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 on loopback here (cannot bind ::1)")
def test_ota_over_http_from_an_ipv6_literal_on_allowed_hosts(
    broker: Broker, fleet_env: dict[str, Any], tmp_path: Path
) -> None:
    """``[ota] allowed_hosts = ["[::1]"]`` (a bracketed IPv6 literal) lets an unsigned order
    name ``http://[::1]:PORT/...``: the config takes it, the order is let through and the bundle
    comes over HTTP on IPv6."""
    bundle = fleet_env["root"] / "digits-1.1.0.edgebundle"
    cfg = _config(broker, fleet_env, tmp_path, extra='allowed_hosts = ["[::1]"]')
    with (
        contextlib.contextmanager(_serve_directory)(tmp_path / "www6", "::1") as (base, root),
        Collector(broker, [f"{TOPICS.base}/#"]) as consumer,
        AgentProcess(tmp_path, cfg) as agent,
    ):
        assert base.startswith("http://[::1]:")
        (root / "b.edgebundle").write_bytes(bundle.read_bytes())
        _online(broker, agent)
        sha = _deploy(broker, bundle, "--url", f"{base}/b.edgebundle")
        rep = _outcome(consumer, sha)
        assert rep["update"]["state"] == "committed", (rep, agent.text())
        assert rep["model"]["version"] == "1.1.0"
        assert not events(consumer.messages, "order_refused")
        assert agent.stop() == 0


def _nan_on_live_model(data: bytes) -> bytes:
    """The digits model plus log(max(x) - 0.75) on every logit: finite on the golden digits
    (their max is 1.0), NaN on a dim scene (max below 0.75)."""
    model = onnx.load_from_string(data)
    g = model.graph
    inp, out = g.input[0].name, g.output[0].name
    for node in g.node:
        for i, name in enumerate(node.output):
            if name == out:
                node.output[i] = "logits_raw"
    g.initializer.append(helper.make_tensor("c075", TensorProto.FLOAT, [], [0.75]))
    g.node.extend(
        [
            helper.make_node("ReduceMax", [inp], ["xmax"], keepdims=0),
            helper.make_node("Sub", ["xmax", "c075"], ["shifted"]),
            helper.make_node("Log", ["shifted"], ["logv"]),
            helper.make_node("Add", ["logits_raw", "logv"], [out]),
        ]
    )
    return model.SerializeToString()


def _always_nan_model(data: bytes) -> bytes:
    model = onnx.load_from_string(data)
    g = model.graph
    out = g.output[0].name
    for node in g.node:
        for i, name in enumerate(node.output):
            if name == out:
                node.output[i] = "logits_raw"
    g.initializer.append(helper.make_tensor("nan", TensorProto.FLOAT, [], [float("nan")]))
    g.node.append(helper.make_node("Mul", ["logits_raw", "nan"], [out]))
    return model.SerializeToString()


@pytest.fixture(scope="module")
def faulty(fleet_env: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One bundle per fault, each v1.2.0 of the same model with exactly one thing wrong."""
    root = tmp_path_factory.mktemp("faulty")
    good = fleet_env["root"] / "digits-1.1.0.edgebundle"
    trusted = load_trusted_keys([fleet_env["pub"]])
    other_key, _ = generate_keypair(root / "other")
    sign = fleet_env["key"]
    out = {
        "wrong_key": repack(good, root / "wrong-key.edgebundle", trusted=trusted,
                            signing_key=other_key, version="1.2.0"),
        "incompatible": repack(good, root / "pi5.edgebundle", trusted=trusted, signing_key=sign,
                               version="1.2.0", profiles=["raspberry-pi-5"]),
        "fails_to_load": repack(good, root / "garbage.edgebundle", trusted=trusted,
                                signing_key=sign, version="1.2.0",
                                artifact=lambda b: b"this is not an onnx model", golden="drop"),
        "nan_output": repack(good, root / "nan.edgebundle", trusted=trusted, signing_key=sign,
                             version="1.2.0", artifact=_always_nan_model, golden="recompute"),
        "health_window": repack(good, root / "nan-live.edgebundle", trusted=trusted,
                                signing_key=sign, version="1.2.0", artifact=_nan_on_live_model,
                                golden="recompute"),
        "good_120": repack(good, root / "good-1.2.0.edgebundle", trusted=trusted,
                           signing_key=sign, version="1.2.0"),
    }  # fmt: skip
    out["traversal"] = add_traversal_member(out["good_120"], root / "traversal.edgebundle")
    return out


def _dim_video(path: Path) -> Path:
    """Digits at a third of their brightness: the health-window model goes NaN on them."""
    x = np.clip(np.random.default_rng(0).random((90, 1, 8, 8), dtype=np.float32) * 0.3, 0, 1)
    return digits_video(path, x)


FAULTS = {
    "wrong_key": ("update_failed", "which is not trusted"),
    "incompatible": ("update_failed", "not this device's profile x86-64"),
    "fails_to_load": ("update_failed", "failed to load"),
    "nan_output": ("update_failed", "golden test"),
    "health_window": ("rolled_back", "NaN/inf"),
    "traversal": ("update_failed", "escapes"),
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_ota_fault_leaves_the_device_on_its_working_model(
    fault: str,
    broker: Broker,
    fleet_env: dict[str, Any],
    faulty: dict[str, Path],
    tmp_path: Path,
) -> None:
    kind, needle = FAULTS[fault]
    source = f"file:{_dim_video(tmp_path / 'dim.mp4')}?loop=1&live=1"
    with (
        Collector(broker, [f"{TOPICS.base}/#"]) as consumer,
        AgentProcess(tmp_path, _config(broker, fleet_env, tmp_path, source=source)) as agent,
    ):
        _online(broker, agent)
        sha = _deploy(broker, faulty[fault])
        rep = _outcome(consumer, sha)
        assert rep["update"]["state"] in ("failed", "rolled_back"), rep
        assert rep["model"]["version"] == "1.0.0"
        # Events go through the spool, the reported state directly: the event may come second.
        wait_until(lambda: bool(events(consumer.messages, kind)), timeout=10, what=kind)
        ev = events(consumer.messages, kind)
        assert needle in ev[-1]["reason"], (kind, needle, ev)
        # Still serving v1.0.0, and still answering.
        consumer.clear()
        wait_until(
            lambda: any(
                r["model"]["version"] == "1.0.0" for r in payloads(consumer.messages, "/results")
            ),
            timeout=10, what="results from the working model",
        )  # fmt: skip
        assert agent.alive()
        assert agent.stop() == 0
    state = json.loads((tmp_path / "state" / "ota" / "state.json").read_text())
    assert state["current"]["version"] == "1.0.0" and state["pending"] is None
    assert sha in state["failed"]
    assert (
        not (tmp_path / "escaped.txt").exists()
        and not (tmp_path / "state" / "escaped.txt").exists()
    )


def test_flipped_bit_in_a_chunk_and_a_truncated_transfer(
    broker: Broker, fleet_env: dict[str, Any], tmp_path: Path
) -> None:
    """Chunks published by hand: one with a bit flipped, then a bundle missing its last chunk."""
    from tests.broker import Collector as Pub

    bundle = (fleet_env["root"] / "digits-1.1.0.edgebundle").read_bytes()
    sha = hashlib.sha256(bundle).hexdigest()
    size = -(-len(bundle) // 4)  # four chunks, whatever the bundle weighs
    chunks = [bundle[i : i + size] for i in range(0, len(bundle), size)]
    meta = protocol.bundle_meta_payload(
        sha256=sha, size=len(bundle), chunk_size=size,
        chunks=[hashlib.sha256(c).hexdigest() for c in chunks], name="digits", version="1.1.0",
    )  # fmt: skip
    with (
        Collector(broker, [f"{TOPICS.base}/#"]) as consumer,
        AgentProcess(tmp_path, _config(broker, fleet_env, tmp_path)) as agent,
        Pub(broker) as pub,
    ):
        _online(broker, agent)
        flipped = bytearray(chunks[1])
        flipped[100] ^= 0x01
        pub.publish(protocol.bundle_meta_topic(sha), protocol.dumps(meta), retain=True)
        assert len(chunks) >= 3
        # the last chunk is never published before the truncated transfer below: a good chunk
        # stored while the bad one ended the first transfer would complete that one (a race)
        for i, c in enumerate(chunks[:-1]):
            pub.publish(
                protocol.bundle_chunk_topic(sha, i), bytes(flipped) if i == 1 else c, retain=True
            )
        desired = protocol.Desired(sha256=sha, deployment="d1").to_payload(ts=0)
        pub.publish(TOPICS.desired, protocol.dumps(desired), retain=True)
        rep = _outcome(consumer, sha)
        assert rep["update"]["state"] == "failed"
        assert "chunk 1 of" in rep["update"]["reason"] and "sha256" in rep["update"]["reason"]
        # Truncated: the last chunk never arrives.
        pub.publish(protocol.bundle_chunk_topic(sha, 1), chunks[1], retain=True)
        desired = protocol.Desired(sha256=sha, deployment="d2").to_payload(ts=0)
        consumer.clear()
        pub.publish(TOPICS.desired, protocol.dumps(desired), retain=True)
        rep = _outcome(consumer, sha)
        assert rep["update"]["state"] == "failed", rep
        assert "truncated transfer" in rep["update"]["reason"], rep
        assert f"{len(chunks) - 1} of {len(chunks)}" in rep["update"]["reason"]
        assert rep["model"]["version"] == "1.0.0"
        # Complete it: the same deployment failed, a new one resumes from the chunks on disk.
        pub.publish(protocol.bundle_chunk_topic(sha, len(chunks) - 1), chunks[-1], retain=True)
        desired = protocol.Desired(sha256=sha, deployment="d3").to_payload(ts=0)
        consumer.clear()
        pub.publish(TOPICS.desired, protocol.dumps(desired), retain=True)
        rep = _outcome(consumer, sha)
        assert rep["update"]["state"] == "committed", (rep, agent.text())
        assert f"{len(chunks) - 1} on disk already" in agent.text()
        assert agent.stop() == 0


@pytest.mark.parametrize("step", ["download", "stage", "swap", "commit"])
def test_sigkill_during_an_update_never_leaves_a_broken_model(
    step: str, broker: Broker, fleet_env: dict[str, Any], tmp_path: Path
) -> None:
    bundle = fleet_env["root"] / "digits-1.1.0.edgebundle"
    cfg = _config(broker, fleet_env, tmp_path)
    sha = _sha(bundle)
    run = edgectl("publish", str(bundle), "--chunk-size", "8192", broker=broker.url)
    assert run.returncode == 0, run.stderr
    crashing = AgentProcess(tmp_path, cfg, env={"EDGE_AGENT_CRASH_AT": step}, name="crash").start()
    _online(broker, crashing)
    _deploy(broker, bundle)
    assert crashing.wait(60) == -9, crashing.text()  # SIGKILL
    state = json.loads((tmp_path / "state" / "ota" / "state.json").read_text())
    assert state["current"]["version"] == "1.0.0"
    if step == "download":
        assert state["pending"] is None
        assert any((tmp_path / "state" / "ota" / "downloads" / sha).glob("*.chunk"))
    else:
        assert state["pending"]["sha256"] == sha
    with (
        Collector(broker, [f"{TOPICS.base}/#"]) as consumer,
        AgentProcess(tmp_path, cfg, name="after") as agent,
    ):
        if step == "download":  # the transfer resumes and the update completes
            rep = _outcome(consumer, sha)
            assert rep["update"]["state"] == "committed", (rep, agent.text())
            assert "on disk already" in agent.text()
            want = "1.1.0"
        else:  # back on the committed model, the update recorded as failed, not retried
            wait_until(
                lambda: bool(events(consumer.messages, "rolled_back")), timeout=30,
                what="the rolled_back event",
            )  # fmt: skip
            assert "restarted during" in events(consumer.messages, "rolled_back")[0]["reason"]
            want = "1.0.0"
        wait_until(
            lambda: any(
                r["model"]["version"] == want for r in payloads(consumer.messages, "/results")
            ),
            timeout=20, what=f"results from {want}",
        )  # fmt: skip
        assert agent.stop() == 0


def test_anti_rollback_floor_and_explicit_rollback(
    broker: Broker, fleet_env: dict[str, Any], faulty: dict[str, Path], tmp_path: Path
) -> None:
    v110 = fleet_env["root"] / "digits-1.1.0.edgebundle"
    v100 = fleet_env["root"] / "digits-1.0.0.edgebundle"
    with (
        Collector(broker, [f"{TOPICS.base}/#"]) as consumer,
        AgentProcess(tmp_path, _config(broker, fleet_env, tmp_path)) as agent,
    ):
        _online(broker, agent)
        assert (
            _outcome(consumer, _deploy(broker, faulty["good_120"]))["update"]["state"]
            == "committed"
        )
        # Going down to 1.1.0 by a plain deploy is refused: the floor is 1.2.0.
        rep = _outcome(consumer, _deploy(broker, v110))
        assert (
            rep["update"]["state"] == "failed"
            and "anti-rollback floor 1.2.0" in rep["update"]["reason"]
        )
        # An explicit rollback returns to the previous committed model (kept on disk: instant).
        run = edgectl("rollback", "--device", DEVICE, broker=broker.url)
        assert run.returncode == 0, run.stderr
        assert "rolling back to 1.0.0" in run.stdout
        rep = _outcome(consumer, _sha(v100))
        assert rep["update"]["state"] == "committed" and rep["model"]["version"] == "1.0.0"
        assert rep["floor"] == "1.2.0"  # the floor stays; only explicit rollbacks go below it
        assert agent.stop() == 0


def test_staged_rollout_aborts_and_reverts_when_canaries_fail(
    broker: Broker, fleet_env: dict[str, Any], faulty: dict[str, Path], tmp_path: Path
) -> None:
    """Four devices in group 'lobby'. A rollout of a bundle that fails its health window on
    their scenes: the canary fails, the rollout aborts (exit 3) and the canary is reverted; the
    rest never got it. Then a good bundle rolls out to all in waves."""
    source = f"file:{_dim_video(tmp_path / 'dim.mp4')}?loop=1&live=1"
    agents = []
    names = [f"lobby-{i}" for i in range(4)]
    old, new = "digits 1.0.0", "digits 1.2.0"
    try:
        for name in names:
            d = tmp_path / name
            d.mkdir()
            cfg = agent_config(
                broker=broker.url, device=name, state_dir=d / "state",
                model=fleet_env["root"] / "digits-1.0.0.edgebundle", source=source,
                keys=fleet_env["pub"], mqtt_extra='groups = ["lobby"]',
            )  # fmt: skip
            agents.append(AgentProcess(d, cfg).start())
        with Collector(broker, ["edge/+/status"]) as watch:
            watch.wait_for(
                lambda m: len({x.topic for x in m if b'"online"' in x.payload}) == 4, timeout=40
            )
        run = edgectl(
            "rollout", str(faulty["health_window"]), "--group", "lobby", "--canary", "25",
            "--wait", "30s", "--max-failures", "0", *QUICK_DISCOVER, broker=broker.url,
            timeout=120,
        )  # fmt: skip
        assert run.returncode == 3, (run.stdout, run.stderr)
        assert "aborted at canaries" in run.stderr
        rows = _status_rows(broker, lambda got: [r["model"] for r in got] == [old] * 4)
        assert [r["model"] for r in rows] == [old] * 4, rows
        assert [r["update"] for r in rows[1:]] == [None] * 3, rows  # the rest never got it
        run = edgectl(
            "rollout", str(faulty["good_120"]), "--group", "lobby", "--canary", "25",
            "--wait", "40s", "--max-failures", "0", "--waves", "2", *QUICK_DISCOVER,
            broker=broker.url, timeout=180,
        )  # fmt: skip
        assert run.returncode == 0, (run.stdout, run.stderr)
        assert "canaries:" in run.stdout and "wave 2" in run.stdout
        rows = _status_rows(broker, lambda got: [r["model"] for r in got] == [new] * 4)
        assert [r["model"] for r in rows] == [new] * 4, rows
        assert all(r["online"] for r in rows)
    finally:
        for a in agents:
            a.kill()


def test_device_follows_its_group_and_its_own_desired_wins(
    broker: Broker, fleet_env: dict[str, Any], faulty: dict[str, Path], tmp_path: Path
) -> None:
    cfg = _config(broker, fleet_env, tmp_path, mqtt_extra='groups = ["north", "lobby"]')
    with Collector(broker, [f"{TOPICS.base}/#"]) as consumer, AgentProcess(tmp_path, cfg) as agent:
        _online(broker, agent)
        run = edgectl("deploy", str(fleet_env["root"] / "digits-1.1.0.edgebundle"), "--group",
                      "lobby", broker=broker.url)  # fmt: skip
        assert run.returncode == 0, run.stderr
        rep = _outcome(consumer, _sha(fleet_env["root"] / "digits-1.1.0.edgebundle"))
        assert rep["update"]["state"] == "committed" and rep["model"]["version"] == "1.1.0"
        sha = _deploy(broker, faulty["good_120"])  # the device's own desired state wins
        assert _outcome(consumer, sha)["model"]["version"] == "1.2.0"
        assert agent.stop() == 0


def test_bundle_needing_a_newer_agent_is_refused(
    broker: Broker, fleet_env: dict[str, Any], tmp_path: Path
) -> None:
    from edge_agent.errors import UpdateError
    from edge_agent.fleet.updater import check_compatible
    from edge_agent.model.profiles import load_profile

    manifest = {
        "name": "m",
        "version": "2.0.0",
        "requires": {"agent": ">=9.0"},
        "artifacts": [{"format": "onnx-int8", "profiles": ["x86-64"], "path": "a.onnx"}],
    }
    with pytest.raises(UpdateError, match=r"needs edge-agent >=9\.0"):
        check_compatible(manifest, load_profile("x86-64"))
    manifest["requires"] = {"agent": ">=0.1"}
    check_compatible(manifest, load_profile("x86-64"))
    jetson = dict(manifest, artifacts=[{"format": "onnx-int8", "profiles": ["jetson-nano"]}])
    with pytest.raises(UpdateError, match="not this device's profile x86-64"):
        check_compatible(jetson, load_profile("x86-64"))


def test_a_model_over_the_latency_budget_is_rolled_back(
    broker: Broker, fleet_env: dict[str, Any], faulty: dict[str, Path], tmp_path: Path
) -> None:
    """With no slack and a budget no model can meet (0.01x the reference), the latency rule fails
    the window (the default 5 ms slack is what keeps jitter on a sub-millisecond model from doing
    so). The limit is budget x reference + slack: with a max() of the two, as before, a p95 just
    under the reference passed and this test flaked in CI."""
    cfg = _config(broker, fleet_env, tmp_path, extra="latency_budget = 0.01\nlatency_slack_ms = 0")
    with Collector(broker, [f"{TOPICS.base}/#"]) as consumer, AgentProcess(tmp_path, cfg) as agent:
        _online(broker, agent)
        rep = _outcome(consumer, _deploy(broker, faulty["good_120"]))
        assert rep["update"]["state"] == "rolled_back" and rep["model"]["version"] == "1.0.0"
        assert (
            "inference p95" in rep["update"]["reason"] and "over 0.01x" in rep["update"]["reason"]
        )
        assert agent.stop() == 0
