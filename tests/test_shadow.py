"""The shadow (issue 15, point 1): a candidate bundle run beside the serving model on live frames
and compared with it by the converter's task metric, never served. Real models (the digits CNN,
one trained on shuffled labels, models that raise or return NaN), a real Mosquitto, real
``edge-agent`` processes and the real ``edgectl``."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from edge_agent.errors import ProtocolError
from edge_agent.fleet import protocol
from edge_agent.fleet.protocol import Desired, ShadowSpec
from edge_agent.io.sinks import CallbackSink
from edge_agent.io.uri import open_source
from edge_agent.model.agreement import frame_agreement
from edge_agent.model.keys import load_trusted_keys
from edge_agent.model.loader import LoadedModel, load_model
from edge_agent.model.profiles import load_profile
from edge_agent.pipeline import Pipeline
from edge_agent.shadow import ShadowRunner
from tests.broker import Broker, Collector
from tests.broker import broker_fixture as broker_fixture
from tests.fleet import AgentProcess, agent_config, edgectl, events, payloads, repack, wait_until
from tests.fleet import fleet_env_fixture as fleet_env_fixture

SHA = "ab" * 32

#: ``rollout --discover`` and ``status --timeout``: how long edgectl gathers retained messages
#: after its SUBACK. Mosquitto sends them with the SUBACK, so on loopback 0.5 s holds them all;
#: the defaults (2 s, 1.5 s) are sized for a broker across a network, and were fixed waits here.
QUICK_DISCOVER = ("--discover", "0.5s")
QUICK_STATUS = ("--timeout", "0.5s")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- the protocol -------------------------------------------------------------------------------


def test_desired_carries_a_shadow_and_checks_it() -> None:
    spec = ShadowSpec(sha256="cd" * 32, name="digits", version="2.0.0", frames=50, deployment="s1")
    desired = Desired(sha256=SHA, name="digits", version="1.0.0", deployment="d", shadow=spec)
    payload = desired.to_payload(ts=1.0)
    jsonschema.validate(payload, protocol.SCHEMAS["desired"])
    assert payload["shadow"] == {
        "bundle": {"sha256": "cd" * 32, "name": "digits", "version": "2.0.0"},
        "frames": 50,
        "deployment": "s1",
    }
    assert Desired.from_payload(json.loads(protocol.dumps(payload))) == desired
    plain = Desired(sha256=SHA).to_payload(ts=1.0)
    assert "shadow" not in plain and Desired.from_payload(plain).shadow is None
    assert spec.as_desired().allow_downgrade  # never served: the floor does not apply
    for bad, needle in [
        ({"bundle": {"sha256": "x"}}, "sha256 'x'"),
        ({"bundle": {"sha256": "cd" * 32}, "frames": 0}, "shadow.frames 0"),
        ({"bundle": {"sha256": "cd" * 32}, "frames": True}, "shadow.frames True"),
        ("yes", "'shadow' must be an object"),
    ]:
        with pytest.raises(ProtocolError, match=needle):
            Desired.from_payload({**plain, "shadow": bad})
    assert {"shadow_started", "shadow_failed", "shadow_completed", "shadow_stopped"} <= set(
        protocol.EVENT_KINDS
    )


def _cls(c: int) -> dict[str, Any]:
    return {"kind": "classification", "class": c, "label": str(c), "score": 0.9, "top": []}


def _det(box: list[float], cls: int) -> dict[str, Any]:
    return {"box": box, "class": cls, "score": 0.9}


def test_frame_agreement_uses_the_task_metric() -> None:
    none: list[np.ndarray] = []
    a = frame_agreement(_cls(3), _cls(3), ref_raw=none, got_raw=none)
    assert (a.metric, a.value, a.agrees) == ("top1_agreement", 1.0, True)
    assert not frame_agreement(_cls(3), _cls(4), ref_raw=none, got_raw=none).agrees
    ref = {"kind": "detection", "detections": [_det([0, 0, 10, 10], 0), _det([20, 20, 30, 30], 1)]}
    got = {"kind": "detection", "detections": [_det([1, 1, 10, 10], 0)]}
    a = frame_agreement(ref, got, ref_raw=none, got_raw=none)
    assert a.metric == "f1" and a.value == pytest.approx(2 / 3)
    raw = {"kind": "raw", "outputs": {}}
    steps = np.eye(5, dtype=np.float32)[[0, 1, 1, 0, 2]][None]  # greedy: (1, 2)
    other = np.eye(5, dtype=np.float32)[[0, 1, 0, 3, 2]][None]  # (1, 3, 2)
    a = frame_agreement(raw, raw, ref_raw=[steps], got_raw=[other])
    assert (a.metric, a.agrees) == ("sequence_agreement", False)
    yes, no = np.array([[0.9]], np.float32), np.array([[0.2]], np.float32)
    a = frame_agreement(raw, raw, ref_raw=[yes], got_raw=[no])
    assert (a.metric, a.value) == ("decision_agreement", 0.0)
    x = np.arange(12, dtype=np.float32).reshape(1, 3, 4)
    a = frame_agreement(raw, raw, ref_raw=[x], got_raw=[x * 2])
    assert a.metric == "cosine" and a.value == pytest.approx(1.0) and a.agrees
    seg = {"kind": "segmentation", "classes": []}
    m = np.zeros((1, 2, 4, 4), np.float32)
    m[:, 0] = 1.0
    m2 = m.copy()
    m2[:, :, :2] = m2[:, ::-1, :2]  # half the pixels change class
    a = frame_agreement(seg, seg, ref_raw=[m], got_raw=[m2])
    assert a.metric == "iou" and 0 < a.value < 1
    assert not frame_agreement(_cls(1), raw, ref_raw=none, got_raw=none).agrees


# --- models that fail, in-process -------------------------------------------------------------


def _nan_model(path: Path) -> Path:
    """input [1, 1, 8, 8] -> logits [1, 10], all NaN."""
    g = helper.make_graph(
        [
            helper.make_node("Flatten", ["input"], ["flat"]),
            helper.make_node("Slice", ["flat", "zero", "ten", "one"], ["head"]),
            helper.make_node("Mul", ["head", "nan"], ["logits"]),
        ],
        "nan",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 10])],
        [
            helper.make_tensor("nan", TensorProto.FLOAT, [], [float("nan")]),
            helper.make_tensor("zero", TensorProto.INT64, [1], [0]),
            helper.make_tensor("ten", TensorProto.INT64, [1], [10]),
            helper.make_tensor("one", TensorProto.INT64, [1], [1]),
        ],
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def _raising_model(path: Path) -> Path:
    """input [1, 1, 8, 8] reshaped to [1 + 2 * (max(x) > 0), -1]: fine on the zeros of the
    warm-up, an onnxruntime error on any real frame (64 values do not split in 3)."""
    g = helper.make_graph(
        [
            helper.make_node("ReduceMax", ["input"], ["mx"], keepdims=0),
            helper.make_node("Greater", ["mx", "zf"], ["lit"]),
            helper.make_node("Cast", ["lit"], ["k01"], to=TensorProto.INT64),
            helper.make_node("Mul", ["k01", "two"], ["k02"]),
            helper.make_node("Add", ["k02", "onei"], ["k"]),
            helper.make_node("Reshape", ["k", "onei1"], ["k1"]),
            helper.make_node("Concat", ["k1", "minus1"], ["shape"], axis=0),
            helper.make_node("Reshape", ["input", "shape"], ["out"]),
        ],
        "raises",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 1, 8, 8])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
        [
            helper.make_tensor("zf", TensorProto.FLOAT, [], [0.0]),
            helper.make_tensor("two", TensorProto.INT64, [], [2]),
            helper.make_tensor("onei", TensorProto.INT64, [], [1]),
            helper.make_tensor("onei1", TensorProto.INT64, [1], [1]),
            helper.make_tensor("minus1", TensorProto.INT64, [1], [-1]),
        ],
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def _serve(
    env: dict[str, Any],
    tmp: Path,
    shadow: LoadedModel | None,
    sampler: Any = None,
    *,
    min_compared: int = 0,
) -> tuple[list[Any], Any]:
    """The 120-frame digits video through the digits bundle, with or without a shadow (and
    a ``[capture]`` sampler it reports disagreements to). With ``min_compared``, the video is
    served again (up to 20 times) until the shadow has compared that many frames: its thread
    runs under SCHED_IDLE, so on a machine loaded by other processes one pass can leave it
    almost no time."""
    profile = load_profile("x86-64")
    model = load_model(
        env["root"] / "digits-1.0.0.edgebundle", profile=profile, state_dir=tmp,
        trusted_keys=load_trusted_keys([env["pub"]]), threads=1,
    )  # fmt: skip
    results: list[dict[str, Any]] = []
    runner = None
    if shadow is not None:
        spec = ShadowSpec(sha256=SHA, frames=10)
        runner = ShadowRunner(shadow, spec=spec, max_share=1.0, sampler=sampler)
        runner.start()

    def one_pass() -> None:
        pipe = Pipeline(
            source=open_source(f"file:{env['video']}"), model=model,
            sinks=[CallbackSink(results.append)],
        )  # fmt: skip
        if runner is not None:
            pipe.shadow = runner.offer
        pipe.run()

    try:
        one_pass()
        for _ in range(20):
            if runner is None or runner.snapshot()["frames"] >= min_compared:
                break
            wait_until(lambda: runner._slot.empty(), timeout=10, what="the shadow's last frame")
            one_pass()
    finally:
        if runner is not None:
            wait_until(lambda: runner._slot.empty(), timeout=10, what="the shadow's last frame")
            runner.stop()
        model.close()
    return results, runner


@pytest.mark.parametrize("fault", ["raises", "nan"])
def test_a_shadow_that_raises_or_returns_nan_never_touches_serving(
    fault: str, fleet_env: dict[str, Any], tmp_path: Path
) -> None:
    profile = load_profile("x86-64")
    build = _raising_model if fault == "raises" else _nan_model
    bad = load_model(build(tmp_path / f"{fault}.onnx"), profile=profile, state_dir=tmp_path)
    plain, _ = _serve(fleet_env, tmp_path / "a", None)
    shadowed, runner = _serve(fleet_env, tmp_path / "b", bad)
    assert [r["frame"] for r in shadowed] == [r["frame"] for r in plain] == list(range(120))
    assert [r["seq"] for r in shadowed] == list(range(120))
    assert [r["output"] for r in shadowed] == [r["output"] for r in plain]
    assert {r["model"]["version"] for r in shadowed} == {"1.0.0"}
    snap = runner.snapshot()
    assert snap["frames"] == 0 and snap["agreement"] is None
    counted = snap["errors"] if fault == "raises" else snap["nans"]
    assert counted > 0 and counted + snap["skipped_budget"] + snap["skipped_busy"] == 120, snap
    if fault == "raises":
        assert "error" in (snap["last_error"] or "").lower() or snap["last_error"]
    bad.close()


# --- over MQTT, with edge-agent and edgectl ---------------------------------------------------


@pytest.fixture(scope="module")
def candidates(
    fleet_env: dict[str, Any], digits: Any, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """``agrees``: the serving digits model again as 2.0.0; ``disagrees``: the digits CNN trained
    on shuffled labels, built and signed as 2.1.0 by edge-convert."""
    from converters.cli import main as edge_convert
    from converters.zoo import digits_data, export_onnx, train_digits_cnn

    root = tmp_path_factory.mktemp("candidates")
    trusted = load_trusted_keys([fleet_env["pub"]])
    agrees = repack(
        fleet_env["root"] / "digits-1.0.0.edgebundle", root / "agrees.edgebundle",
        trusted=trusted, signing_key=fleet_env["key"], version="2.0.0",
    )  # fmt: skip
    data = digits_data(seed=0)
    data.y_train = np.random.default_rng(1).permutation(data.y_train)
    model, _ = train_digits_cnn(data, epochs=3, seed=1)
    (root / "shuffled.onnx").write_bytes(export_onnx(model, (1, 1, 8, 8)))
    code = edge_convert(
        [
            "build", str(root / "shuffled.onnx"), "--profile", "x86-64", "--calibration",
            str(digits.calibration), "--sign-key", str(fleet_env["key"]), "--name", "digits",
            "--version", "2.1.0", "-o", str(root / "disagrees.edgebundle"),
            "--latency-seconds", "0.2",
        ]
    )  # fmt: skip
    assert code == 0
    return {"agrees": agrees, "disagrees": root / "disagrees.edgebundle"}


def test_frames_the_shadow_disagrees_on_become_samples(
    candidates: dict[str, Path], fleet_env: dict[str, Any], tmp_path: Path
) -> None:
    """``[capture] disagreement``: the frames where a candidate trained on shuffled labels and
    the serving model differ are kept as samples, with both outputs, and only those."""
    from edge_agent.config import CaptureSection
    from edge_agent.fleet.capture import Sampler
    from edge_agent.fleet.samples import SampleStore

    store = SampleStore(tmp_path / "samples", max_bytes=2**24)
    sampler = Sampler(
        CaptureSection(disagreement=True, max_per_minute=0, max_per_hour=0, max_per_day=0),
        store=store, device="cam-1", state_path=tmp_path / "capture.json", queue_size=1000,
    )  # fmt: skip
    sampler.start()
    shadow = load_model(
        candidates["disagrees"], profile=load_profile("x86-64"), state_dir=tmp_path,
        trusted_keys=load_trusted_keys([fleet_env["pub"]]), threads=1,
    )  # fmt: skip
    try:
        _, runner = _serve(fleet_env, tmp_path / "run", shadow, sampler, min_compared=5)
        snap = runner.snapshot()
        wait_until(lambda: len(store) >= snap["disagreements"], timeout=10,
                   what="the samples written")  # fmt: skip
    finally:
        sampler.stop()
        shadow.close()
    assert snap["frames"] >= 5 and snap["disagreements"] > 0.5 * snap["frames"], snap
    metas = [store.load(i)[0] for i in store.ids()]  # type: ignore[index]
    assert len(metas) == snap["disagreements"]
    for meta in metas:
        assert meta["reasons"] == ["disagreement"]
        assert meta["shadow_output"]["class"] != meta["output"]["class"]


def _agent(broker: Broker, env: dict[str, Any], tmp: Path, name: str, **kw: Any) -> AgentProcess:
    d = tmp / name
    d.mkdir()
    cfg = agent_config(
        broker=broker.url, device=name, state_dir=d / "state",
        model=env["root"] / "digits-1.0.0.edgebundle",
        source=f"file:{env['video']}?loop=1&live=1", keys=env["pub"], pace="native",
        extra="\n[shadow]\nmax_share = 0.5\n", **kw,
    )  # fmt: skip
    return AgentProcess(d, cfg).start()


def _online(broker: Broker, names: list[str], timeout: float = 40.0) -> None:
    with Collector(broker, ["edge/+/status"]) as watch:
        watch.wait_for(
            lambda m: {x.topic.split("/")[1] for x in m if b'"online"' in x.payload} >= set(names),
            timeout=timeout,
        )


def _shadow_telemetry(msgs: list[Any], device: str) -> list[dict[str, Any]]:
    return [
        t["shadow"]
        for t in payloads(msgs, "/telemetry")
        if t.get("device") == device and t.get("shadow")
    ]


def test_an_agreeing_shadow_is_reported_and_stops_on_request(
    broker: Broker, fleet_env: dict[str, Any], candidates: dict[str, Path], tmp_path: Path
) -> None:
    cand = candidates["agrees"]
    sha = _sha(cand)
    agent = _agent(broker, fleet_env, tmp_path, "cam-s")
    try:
        with Collector(broker, ["edge/cam-s/#"]) as consumer:
            _online(broker, ["cam-s"])
            run = edgectl("shadow", str(cand), "--device", "cam-s", "--frames", "20",
                          broker=broker.url)  # fmt: skip
            assert run.returncode == 0, run.stderr
            assert "shadow digits 2.0.0" in run.stdout
            wait_until(
                lambda: any(
                    s["sha256"] == sha and s["frames"] >= 20
                    for s in _shadow_telemetry(consumer.messages, "cam-s")
                ),
                timeout=120, what=f"20 shadowed frames; log: {agent.text()[-2000:]}",
            )  # fmt: skip
            shadow = [s for s in _shadow_telemetry(consumer.messages, "cam-s") if s["frames"]][-1]
            assert shadow["state"] == "running" and shadow["agreement"] == 1.0, shadow
            assert shadow["metric"] == "top1_agreement" and shadow["errors"] == 0
            assert shadow["model"] == {"name": "digits", "version": "2.0.0"}
            assert shadow["latency_ratio"] is not None and shadow["latency_ms"]["p95"] is not None
            assert shadow["share"] <= 0.5 + 0.1, shadow  # the budget, with one frame of slack
            for t in payloads(consumer.messages, "/telemetry"):
                jsonschema.validate(t, protocol.SCHEMAS["telemetry"])
            kinds = [e["kind"] for e in events(consumer.messages)]
            assert "shadow_started" in kinds
            wait_until(lambda: bool(events(consumer.messages, "shadow_completed")), timeout=20,
                       what="shadow_completed")  # fmt: skip
            assert events(consumer.messages, "shadow_completed")[0]["details"]["agreement"] == 1.0
            reported = payloads(consumer.messages, "/reported")[-1]
            jsonschema.validate(reported, protocol.SCHEMAS["reported"])
            assert reported["shadow"]["state"] == "running" and reported["model"]["version"] == (
                "1.0.0"
            )
            status = edgectl("shadow", "--status", "--device", "cam-s", broker=broker.url)
            assert status.returncode == 0, status.stderr
            row = next(line for line in status.stdout.splitlines() if line.startswith("cam-s"))
            assert "digits 2.0.0" in row and "1.000" in row and "running" in row, status.stdout
            # never served: every result comes from the serving model
            assert {r["model"]["version"] for r in payloads(consumer.messages, "/results")} == {
                "1.0.0"
            }
            stop = edgectl("shadow", "--stop", "--device", "cam-s", broker=broker.url)
            assert stop.returncode == 0, stop.stderr
            wait_until(lambda: bool(events(consumer.messages, "shadow_stopped")), timeout=20,
                       what="shadow_stopped")  # fmt: skip
            consumer.clear()
            wait_until(
                lambda: any(
                    (r.get("shadow") or {}).get("state") == "stopped"
                    for r in payloads(consumer.messages, "/reported")
                )
                or any(s["state"] == "stopped" for s in _shadow_telemetry(consumer.messages,
                                                                            "cam-s")),
                timeout=20, what="the shadow reported stopped",
            )  # fmt: skip
        assert agent.stop() == 0, agent.text()[-3000:]
    finally:
        agent.kill()


def test_a_disagreeing_shadow_blocks_the_rollout(
    broker: Broker, fleet_env: dict[str, Any], candidates: dict[str, Path], tmp_path: Path
) -> None:
    """Two devices in group 'yard'. The candidate trained on shuffled labels: its agreement on
    the canary is far below 0.9, so `rollout --require-shadow 0.9` aborts (exit 3) and the
    candidate never served a frame. The agreeing candidate then passes and rolls out."""
    names = ["yard-0", "yard-1"]
    agents = [_agent(broker, fleet_env, tmp_path, n, mqtt_extra='groups = ["yard"]') for n in names]
    bad = candidates["disagrees"]
    try:
        with Collector(broker, ["edge/+/results", "edge/+/reported", "edge/+/events"]) as seen:
            _online(broker, names)
            run = edgectl(
                "rollout", str(bad), "--group", "yard", "--canary", "50", "--wait", "30s",
                "--require-shadow", "0.9", "--frames", "15", "--shadow-timeout", "60s",
                *QUICK_DISCOVER, broker=broker.url, timeout=150,
            )  # fmt: skip
            assert run.returncode == 3, (run.stdout, run.stderr)
            reason = run.stderr.strip().splitlines()
            assert len(reason) == 1 and "shadow" in reason[0] and "agreement" in reason[0], reason
            assert "yard-0" in reason[0] and "< 0.9" in reason[0], reason
            results = payloads(seen.messages, "/results")
            assert results and {r["model"]["version"] for r in results} == {"1.0.0"}
            reported = payloads(seen.messages, "/reported")
            assert all((r["model"] or {}).get("version") == "1.0.0" for r in reported)
            assert not [r for r in reported if (r.get("update") or {}).get("version") == "2.1.0"]
            assert not events(seen.messages, "update_started")
            good = edgectl(
                "rollout", str(candidates["agrees"]), "--group", "yard", "--canary", "50",
                "--wait", "40s", "--require-shadow", "0.9", "--frames", "15",
                *QUICK_DISCOVER, broker=broker.url, timeout=180,
            )  # fmt: skip
            assert good.returncode == 0, (good.stdout, good.stderr)
            assert "shadow on canaries: yard-0 agreement 1.000" in good.stdout, good.stdout
        status = edgectl("status", "--json", *QUICK_STATUS, broker=broker.url)
        rows = json.loads(status.stdout)
        assert [r["model"] for r in rows if r["device"] in names] == ["digits 2.0.0"] * 2, rows
    finally:
        for a in agents:
            a.kill()
