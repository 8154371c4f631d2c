"""Stateful streaming models: which inputs and outputs are state (the naming rules, confirmed by
shapes), one state per stream on the device, the bundle's ``state`` field, and the target: a
GRU voice-activity detector trained here on synthetic audio, run over a 60 s WAV through
``LoadedModel.infer`` in ONNX and TFLite, fp32 and int8, against a reference loop that carries
the state by hand with plain onnxruntime."""

from __future__ import annotations

import json
import os
import threading
import wave
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from onnx import TensorProto, helper, numpy_helper

from edge_agent.errors import BundleError, ModelError
from edge_agent.model.bundle import (
    BUNDLE_SCHEMA_VERSION,
    ArtifactInput,
    validate_manifest,
    verify_bundle,
    write_bundle,
)
from edge_agent.model.keys import key_id
from edge_agent.model.loader import LoadedModel, load_model
from edge_agent.model.profiles import load_profile
from edge_agent.model.runtimes import TensorSpec
from edge_agent.model.state import (
    StatePair,
    StreamState,
    detect_state_pairs,
    match_state_pairs,
)


def spec(name: str, shape: Sequence[int | None], dtype: str = "float32", **kw: Any) -> TensorSpec:
    return TensorSpec(name=name, shape=tuple(shape), dtype=dtype, **kw)


# --- detection -----------------------------------------------------------------------------

F = "float32"
DETECTION = {
    "silero v5: state -> stateN": (
        [spec("input", [1, 512]), spec("state", [2, 1, 128]), spec("sr", [1], "int64")],
        [spec("output", [1, 1]), spec("stateN", [2, 1, 128])],
        [("state", "stateN", (2, 1, 128))],
    ),
    "silero v4: h -> hn, c -> cn": (
        [spec("input", [1, 512]), spec("sr", [1], "int64"), spec("h", [2, 1, 64]),
         spec("c", [2, 1, 64])],
        [spec("output", [1, 1]), spec("hn", [2, 1, 64]), spec("cn", [2, 1, 64])],
        [("h", "hn", (2, 1, 64)), ("c", "cn", (2, 1, 64))],
    ),
    "keyword spotter: *_in -> *_out": (
        [spec("audio", [1, 640]), spec("stream0_in", [1, 32]), spec("stream1_in", [1, 16])],
        [spec("logits", [1, 12]), spec("stream1_out", [1, 16]), spec("stream0_out", [1, 32])],
        [("stream0_in", "stream0_out", (1, 32)), ("stream1_in", "stream1_out", (1, 16))],
    ),
    "dynamic batch of the state counts as one stream": (
        [spec("x", [None, 40]), spec("h", [None, 8])],
        [spec("y", [None, 2]), spec("hn", [None, 8])],
        [("h", "hn", (1, 8))],
    ),
    "int8 tensors (the runtime takes float32)": (
        [spec("x", [1, 40]), spec("state", [1, 8], "int8", scale=0.1, zero_point=0)],
        [spec("y", [1, 2]), spec("stateN", [1, 8], "int8", scale=0.2, zero_point=3)],
        [("state", "stateN", (1, 8))],
    ),
    "shape mismatch: not a pair": (
        [spec("input", [1, 512]), spec("h", [2, 1, 64])],
        [spec("output", [1, 1]), spec("hn", [2, 1, 32])],
        [],
    ),
    "dtype mismatch: not a pair": (
        [spec("input", [1, 512]), spec("state", [1, 8])],
        [spec("output", [1, 1]), spec("stateN", [1, 8], "float16")],
        [],
    ),
    "an image classifier: untouched": (
        [spec("input", [1, 3, 224, 224])],
        [spec("logits", [1, 1000])],
        [],
    ),
    "names alike but no rule: untouched": (
        [spec("x", [1, 8]), spec("hidden", [1, 8])],
        [spec("y", [1, 8]), spec("hidden_next", [1, 8])],
        [],
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(DETECTION))
def test_detection_rules(case: str) -> None:
    inputs, outputs, want = DETECTION[case]
    pairs = detect_state_pairs(inputs, outputs)
    assert [(p.input, p.output, p.shape) for p in pairs] == want
    assert all(p.dtype == F and p.initial == 0.0 for p in pairs)


def test_declared_pairs_are_checked_against_the_model() -> None:
    inputs = [spec("x", [1, 40]), spec("mem", [1, 8])]
    outputs = [spec("y", [1, 2]), spec("mem_next", [1, 8]), spec("small", [1, 4])]
    (pair,) = match_state_pairs(
        [{"input": "mem", "output": "mem_next", "initial": 0.5}], inputs=inputs, outputs=outputs
    )
    assert (pair.input, pair.output, pair.shape, pair.initial) == ("mem", "mem_next", (1, 8), 0.5)
    bad = {
        "no input 'nope'": {"input": "nope", "output": "mem_next"},
        "no output 'nope'": {"input": "mem", "output": "nope"},
        "differ in shape": {"input": "mem", "output": "small"},
    }
    for expected, entry in bad.items():
        with pytest.raises(ModelError) as info:
            match_state_pairs([entry], inputs=inputs, outputs=outputs)
        message = str(info.value)
        assert expected in message and "\n" not in message and "fix the entry" in message
    with pytest.raises(ModelError, match="in two state pairs"):
        match_state_pairs(
            [{"input": "mem", "output": "mem_next"}, {"input": "x", "output": "mem_next"}],
            inputs=[spec("x", [1, 8]), spec("mem", [1, 8])],
            outputs=outputs,
        )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"input": "", "output": "o", "shape": (1,)}, "input = ''"),
        ({"input": "s", "output": "s", "shape": (1,)}, "must be two tensors"),
        ({"input": "s", "output": "o", "shape": (1, 0)}, "shape [1, 0]"),
        ({"input": "s", "output": "o", "shape": (1,), "initial": float("nan")}, "finite"),
        ({"input": "s", "output": "o", "shape": (1,), "initial": True}, "must be a number"),
        ({"input": "s", "output": "o", "shape": (1,), "dtype": "nope"}, "not a numpy dtype"),
    ],
)
def test_state_pair_checks_itself(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ModelError, match=message.replace("[", r"\[")):
        StatePair(**kwargs)


# --- one state per stream ------------------------------------------------------------------


def _counter_step(store: StreamState, stream: str) -> float:
    """A model whose next state is its state + 1 (one element), run once on ``stream``."""
    with store.hold(stream):
        state = store.feeds(stream, {})["s"]
        store.update(stream, {"sN": state + 1.0})
    return float(state[0])


def test_streams_keep_their_own_state_and_reset() -> None:
    store = StreamState([StatePair(input="s", output="sN", shape=(1,), initial=10.0)])
    assert [_counter_step(store, "a") for _ in range(3)] == [10.0, 11.0, 12.0]
    assert [_counter_step(store, "b") for _ in range(2)] == [10.0, 11.0]
    assert _counter_step(store, "a") == 13.0
    assert sorted(store.streams) == ["a", "b"]
    store.reset("a")
    assert _counter_step(store, "a") == 10.0 and _counter_step(store, "b") == 12.0
    store.reset()
    assert store.streams == () and _counter_step(store, "b") == 10.0
    # the caller's own value for a state input is kept; other feeds pass through
    feeds = store.feeds("c", {"x": np.ones(2), "s": np.array([5.0])})
    assert feeds["s"][0] == 5.0 and feeds["x"].shape == (2,)
    with pytest.raises(ModelError, match=r"came back \[2\], expected \[1\]"):
        store.update("c", {"sN": np.zeros(2)})
    with pytest.raises(ModelError, match="'sN' missing"):
        store.update("c", {"other": np.zeros(1)})


def test_state_store_is_thread_safe() -> None:
    """Four threads: two on their own streams, two sharing one; no step is lost."""
    store = StreamState([StatePair(input="s", output="sN", shape=(1,))])
    steps = 300

    def run(stream: str) -> None:
        for _ in range(steps):
            _counter_step(store, stream)

    threads = [threading.Thread(target=run, args=(s,)) for s in ("a", "b", "shared", "shared")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    got = {s: float(store.get(s)["s"][0]) for s in ("a", "b", "shared")}
    assert got == {"a": steps, "b": steps, "shared": 2 * steps}


# --- the bundle's "state" ------------------------------------------------------------------


def _manifest(**extra: Any) -> dict[str, Any]:
    return {
        "schema": BUNDLE_SCHEMA_VERSION,
        "name": "vad",
        "version": "1.0.0",
        "created": "2026-12-01T00:00:00Z",
        "artifacts": [],
        "files": [],
        **extra,
    }


def test_manifests_without_state_stay_valid() -> None:
    validate_manifest(_manifest())
    validate_manifest(_manifest(state=[]))
    validate_manifest(_manifest(state=[{"input": "h", "output": "hn"}]))


@pytest.mark.parametrize(
    ("state", "message"),
    [
        (None, "state = None: must be a list"),
        ({"input": "h"}, "must be a list"),
        (["h"], "state[0] = 'h': must be an object"),
        ([{"input": "h", "output": "hn", "shape": [1]}], "unknown key 'shape'"),
        ([{"output": "hn"}], "state[0].input = None: must be the name of a model input"),
        ([{"input": "h", "output": ""}], "state[0].output = '': must be the name"),
        ([{"input": "h", "output": "h"}], "input and output are both 'h'"),
        ([{"input": "h", "output": "hn"}, {"input": "h", "output": "cn"}], "already in another"),
        ([{"input": "h", "output": "hn", "initial": "0"}], "initial = '0': must be a number"),
        ([{"input": "h", "output": "hn", "initial": False}], "initial = False"),
    ],
)
def test_bad_state_entries_get_one_line(state: Any, message: str) -> None:
    with pytest.raises(BundleError) as info:
        validate_manifest(_manifest(state=state), where="vad.edgebundle")
    text = str(info.value)
    assert message in text and text.startswith("vad.edgebundle: manifest: ") and "\n" not in text


def _accumulator(path: Path, *, state: str = "state", state_out: str = "stateN") -> Path:
    """``stateN = state + input @ ones(3, 2)``, ``output = stateN @ ones(2, 1)``; the state is
    the model's FIRST input (the data input is not inputs[0])."""
    ones32, ones21 = np.ones((3, 2), np.float32), np.ones((2, 1), np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["input", "w"], ["m"]),
            helper.make_node("Add", [state, "m"], [state_out]),
            helper.make_node("MatMul", [state_out, "v"], ["output"]),
        ],
        "accumulator",
        [
            helper.make_tensor_value_info(state, TensorProto.FLOAT, [1, 2]),
            helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3]),
        ],
        [
            helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 1]),
            helper.make_tensor_value_info(state_out, TensorProto.FLOAT, [1, 2]),
        ],
        [numpy_helper.from_array(ones32, "w"), numpy_helper.from_array(ones21, "v")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _load(path: Path, tmp_path: Path, **kw: Any) -> LoadedModel:
    return load_model(
        path, profile=load_profile("x86-64"), state_dir=tmp_path / "state", threads=1, **kw
    )


ONE = {"input": np.ones((1, 3), np.float32)}


def test_loaded_model_carries_one_state_per_stream(tmp_path: Path) -> None:
    model = _load(_accumulator(tmp_path / "acc.onnx"), tmp_path)
    assert model.stateful and model.input_name == "input" and model.input_shape == (1, 3)
    assert [(p.input, p.output) for p in model.state_pairs] == [("state", "stateN")]
    # each window adds 3 to both state elements; the output sums them
    assert [float(model.infer(ONE, stream="a")[0][0, 0]) for _ in range(3)] == [6.0, 12.0, 18.0]
    assert float(model.infer(ONE, stream="b")[0][0, 0]) == 6.0
    assert float(model.infer(ONE)[0][0, 0]) == 6.0  # the default stream is a stream too
    model.reset_state("a")
    assert float(model.infer(ONE, stream="a")[0][0, 0]) == 6.0
    assert float(model.infer(ONE, stream="b")[0][0, 0]) == 12.0
    model.reset_state()
    assert float(model.infer(ONE, stream="b")[0][0, 0]) == 6.0
    # the window feed comes from the first non-state input
    feeds = model.prepare_window(np.ones((3, 1), np.float32))
    assert list(feeds) == ["input"]


def test_a_model_without_state_is_untouched(tmp_path: Path) -> None:
    path = _accumulator(tmp_path / "acc.onnx", state="carry", state_out="carry_next")
    model = _load(path, tmp_path)
    assert not model.stateful and model.state_pairs == ()
    assert model.input_name == "carry"  # no rule pairs carry -> carry_next: inputs[0], as before
    feeds = {"carry": np.zeros((1, 2), np.float32), **ONE}
    for _ in range(2):  # nothing carried: the same answer every time
        assert float(model.infer(feeds, stream="a")[0][0, 0]) == 6.0
    model.reset_state("a")  # harmless


def _bundle(
    tmp_path: Path, key: Ed25519PrivateKey, model: Path, state: list[dict[str, Any]] | None
) -> Path:
    manifest: dict[str, Any] = {"name": "acc", "version": "1.0.0"}
    if state is not None:
        manifest["state"] = state
    out = tmp_path / "acc.edgebundle"
    write_bundle(
        out,
        manifest=manifest,
        artifacts=[ArtifactInput(path=model, format="onnx-fp32", precision="fp32",
                                 profiles=("x86-64",))],
        signing_key=key,
    )  # fmt: skip
    return out


def test_bundle_state_round_trips_and_wins_over_detection(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    trusted = {key_id(key.public_key()): key.public_key()}
    path = _accumulator(tmp_path / "acc.onnx", state="carry", state_out="carry_next")
    declared = [{"input": "carry", "output": "carry_next", "initial": 1.5}]
    bundle = _bundle(tmp_path, key, path, declared)
    assert verify_bundle(bundle, trusted_keys=trusted).manifest["state"] == declared
    model = _load(bundle, tmp_path, trusted_keys=trusted)
    assert model.stateful and model.input_name == "input"
    assert model.state_pairs == (
        StatePair(input="carry", output="carry_next", shape=(1, 2), initial=1.5),
    )
    # from 1.5: 2 * (1.5 + 3) = 9, then 2 * (1.5 + 6) = 15
    assert [float(model.infer(ONE, stream="s")[0][0, 0]) for _ in range(2)] == [9.0, 15.0]


def test_bundle_state_can_declare_none_or_be_refused(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    trusted = {key_id(key.public_key()): key.public_key()}
    path = _accumulator(tmp_path / "acc.onnx")  # detected as stateful by its names
    (tmp_path / "none").mkdir()
    model = _load(_bundle(tmp_path / "none", key, path, []), tmp_path / "none",
                  trusted_keys=trusted)  # fmt: skip
    assert not model.stateful  # an empty list declares a model without state
    (tmp_path / "bad").mkdir()
    bad = _bundle(tmp_path / "bad", key, path, [{"input": "state", "output": "output"}])
    with pytest.raises(ModelError) as info:
        _load(bad, tmp_path / "bad", trusted_keys=trusted)
    message = str(info.value)
    assert "'state' -> 'output'" in message and "differ in shape" in message
    assert "\n" not in message


# --- the binary task of a streaming model ------------------------------------------------


def test_binary_task_for_streaming_models() -> None:
    from converters.task import infer_task
    from edge_agent.model.agreement import decision_fidelity

    prob = np.array([[0.1], [0.7], [0.4], [0.9]], np.float32)
    state = np.zeros((4, 8), np.float32)
    names = ["output", "stateN"]
    task = infer_task([prob, None], output_names=names, stateful=True)
    assert (task.kind, task.metric, task.outputs, task.threshold) == (
        "binary",
        "decision_agreement",
        (0,),
        0.5,
    )
    # not streaming: unchanged (a [N, 1] output is compared as a tensor; the state output,
    # unhidden, would even be taken for a classifier)
    assert infer_task([prob], output_names=["output"]).kind == "raw"
    assert infer_task([prob, state], output_names=names).kind == "classify"
    pair = np.concatenate([1 - prob, prob], axis=1)
    assert infer_task([pair, None], output_names=names, stateful=True).kind == "binary"
    logit = np.array([[-2.0], [3.0]], np.float32)
    forced = infer_task([logit], output_names=["y"], requested="binary")
    assert forced.kind == "binary" and forced.threshold == 0.0
    value, details = decision_fidelity(prob, prob[[0, 1, 3, 3]], threshold=0.5)
    assert value == 0.75 and details["yes_original"] == 2 and details["yes_converted"] == 3


# --- the converter, in sequence ------------------------------------------------------------


def _leaky(path: Path) -> Path:
    """A Silero-shaped state ``[2, 1, 4]`` (batch on axis 1): ``stateN = 0.5 * state +
    input @ w`` (broadcast over the two layers), ``output = sigmoid(flatten(stateN) @ v)``."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((3, 4)).astype(np.float32)
    v = rng.standard_normal((8, 1)).astype(np.float32) * 0.5
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["input", "w"], ["m"]),
            helper.make_node("Mul", ["state", "half"], ["decayed"]),
            helper.make_node("Add", ["decayed", "m"], ["stateN"]),
            helper.make_node("Reshape", ["stateN", "flat"], ["f"]),
            helper.make_node("MatMul", ["f", "v"], ["logit"]),
            helper.make_node("Sigmoid", ["logit"], ["output"]),
        ],
        "leaky",
        [
            helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3]),
            helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, 1, 4]),
        ],
        [
            helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 1]),
            helper.make_tensor_value_info("stateN", TensorProto.FLOAT, [2, 1, 4]),
        ],
        [
            numpy_helper.from_array(w, "w"),
            numpy_helper.from_array(v, "v"),
            numpy_helper.from_array(np.array(0.5, np.float32), "half"),
            numpy_helper.from_array(np.array([1, 8], np.int64), "flat"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _hand_carried(path: Path, windows: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    state = np.zeros((2, 1, 4), np.float32)
    outs, states = [], []
    for x in windows:
        states.append(state)
        out, state = sess.run(["output", "stateN"], {"input": x[None], "state": state})
        outs.append(float(out[0, 0]))
    return np.array(outs), states


def test_run_sequence_and_calibration_states_follow_the_float_model(tmp_path: Path) -> None:
    from converters import stateful
    from converters.data import Dataset, Subset, _ArrayRows
    from converters.validate import make_session

    path = _leaky(tmp_path / "leaky.onnx")
    windows = np.random.default_rng(0).standard_normal((12, 3)).astype(np.float32)
    want, fed = _hand_carried(path, windows)
    sess = make_session(str(path))
    inputs = [{"name": "input", "shape": [1, 3], "dtype": "float32"},
              {"name": "state", "shape": [2, 1, 4], "dtype": "float32"}]  # fmt: skip
    outputs = [{"name": "output", "shape": [1, 1], "dtype": "float32"},
               {"name": "stateN", "shape": [2, 1, 4], "dtype": "float32"}]  # fmt: skip
    pairs = stateful.state_pairs_of(inputs, outputs)
    assert [(p.input, p.output, p.shape) for p in pairs] == [("state", "stateN", (2, 1, 4))]
    assert [s["name"] for s in stateful.data_inputs(inputs, pairs)] == ["input"]
    ds = Dataset(inputs={"input": _ArrayRows(windows)}, labels=None, description="w")
    subset = Subset(ds, range(len(windows)))
    got = stateful.run_sequence(sess, subset.batches(batch=5), pairs)  # batches split up
    np.testing.assert_allclose(np.concatenate(got[0])[:, 0], want, rtol=1e-6)
    calib = stateful.with_states(subset, sess, pairs, keep=4)
    rows = list(calib.batches(batch=1))
    picks = [0, 4, 7, 11]  # evenly spread over the 12 windows
    assert len(rows) == 4
    for row, i in zip(rows, picks):
        assert row["state"].shape == (2, 1, 4)
        np.testing.assert_array_equal(row["input"], windows[i : i + 1])
        np.testing.assert_allclose(row["state"], fed[i], rtol=1e-6)
    assert np.abs(rows[-1]["state"]).max() > 0.1  # real states, not zeros
    two = next(calib.batches(batch=2))["state"]  # two windows: along the batch axis (1)
    assert two.shape == (2, 2, 4)


def test_sequence_split_keeps_windows_in_order(tmp_path: Path) -> None:
    from converters.data import split_data

    specs = [{"name": "input", "shape": [1, 3], "dtype": "float32"}]
    np.save(tmp_path / "cal.npy", np.zeros((50, 3), np.float32))
    np.save(tmp_path / "eval.npy", np.zeros((30, 3), np.float32))
    kw: dict[str, Any] = dict(preprocess=None, max_calibration_samples=8, sequence=True)
    held = split_data(specs, calibration=tmp_path / "cal.npy", eval=None,
                      max_validation_samples=1000, **kw)  # fmt: skip
    assert held.calib is not None
    assert held.calib.indices == list(range(40)) and held.val.indices == list(range(40, 50))
    assert "last fifth" in held.source
    given = split_data(specs, calibration=tmp_path / "cal.npy", eval=tmp_path / "eval.npy",
                       max_validation_samples=20, **kw)  # fmt: skip
    assert given.calib is not None and given.calib.indices == list(range(50))
    assert given.val.indices == list(range(20))
    assert any("first 20 of 30 windows" in w for w in given.warnings)


@pytest.mark.slow
def test_silero_shaped_state_converts_to_tflite_int8(
    cli: Callable[..., Any], tmp_path: Path
) -> None:
    path = _leaky(tmp_path / "leaky.onnx")
    rng = np.random.default_rng(1)
    np.save(tmp_path / "cal.npy", rng.standard_normal((200, 3)).astype(np.float32))
    windows = rng.standard_normal((100, 3)).astype(np.float32)
    np.save(tmp_path / "eval.npy", windows)
    out = tmp_path / "leaky.tflite"
    res = cli("quantize", path, "-o", out, "--format", "tflite-int8",
              "--calibration", tmp_path / "cal.npy", "--eval", tmp_path / "eval.npy",
              "--min-cosine", 0.95, "--min-task-metric", 0.9, "--no-float-fallback",
              "--latency-seconds", 0.2, "--report", tmp_path / "r.json")  # fmt: skip
    assert res.code == 0, res.err
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["state"]["pairs"][0]["shape"] == [2, 1, 4]
    assert report["fidelity"]["task"]["kind"] == "binary"
    model = _load(out, tmp_path)
    assert [(p.input, p.shape) for p in model.state_pairs] == [("state", (2, 1, 4))]
    got = np.array([float(model.infer({"input": x[None]}, stream="s")[0][0, 0]) for x in windows])
    want, _ = _hand_carried(path, windows)
    # int8 of a toy: close, not equal (the carried state is requantized every window)
    assert np.mean(np.abs(got - want)) < 0.03
    assert np.mean((got > 0.5) == (want > 0.5)) >= 0.95


# --- the target: a GRU voice-activity detector over a 60 s WAV -----------------------------

SECONDS = 60.0


def _read_wav_windows(path: Path, size: int) -> np.ndarray:
    """The reference's own reading: stdlib wave, cut by hand (not the agent's source)."""
    with wave.open(str(path), "rb") as w:
        raw = w.readframes(w.getnframes())
    x = np.frombuffer(raw, "<i2").astype(np.float32) / 32768.0
    count = len(x) // size
    return x[: count * size].reshape(count, size)


def _reference(onnx_path: Path, windows: np.ndarray, hidden: int) -> np.ndarray:
    """Plain onnxruntime, the state carried by hand: the speech probability per window."""
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    state = np.zeros((1, 1, hidden), np.float32)
    probs = []
    for window in windows:
        prob, state = sess.run(["output", "stateN"], {"input": window[None], "state": state})
        probs.append(float(prob[0, 0]))
    return np.array(probs)


def _agent_windows(path: Path, size: int) -> list[np.ndarray]:
    """The windows as the agent reads them: the wav: source."""
    from edge_agent.io import open_source

    out = []
    with open_source(f"wav:{path}?size={size}&hop={size}") as src:
        while (frame := src.read(timeout=5.0)) is not None:
            out.append(frame.data)
    return out


def _through_agent(model: LoadedModel, windows: Sequence[np.ndarray], stream: str) -> np.ndarray:
    return np.array(
        [float(model.infer(model.prepare(w)[0], stream=stream)[0][0, 0]) for w in windows]
    )


@pytest.fixture(scope="module")
def vad_files(standin_vad: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from converters.standins import audio_windows, speech_audio, write_wav

    root = tmp_path_factory.mktemp("vad")
    (root / "vad.onnx").write_bytes(standin_vad.onnx)
    audio, _ = speech_audio(np.random.default_rng(2026), SECONDS, rate=standin_vad.rate)
    write_wav(root / "speech.wav", audio, standin_vad.rate)
    other, _ = speech_audio(np.random.default_rng(7), 20.0, rate=standin_vad.rate)
    write_wav(root / "other.wav", other, standin_vad.rate)
    np.save(root / "calibration.npy", standin_vad.calibration)
    # the converter's evaluation stream: the WAV's windows, in order
    np.save(root / "eval.npy", _read_wav_windows(root / "speech.wav", standin_vad.window))
    assert len(audio_windows(audio)) == len(np.load(root / "eval.npy"))
    return {
        "onnx": root / "vad.onnx",
        "wav": root / "speech.wav",
        "other": root / "other.wav",
        "calibration": root / "calibration.npy",
        "eval": root / "eval.npy",
        "root": root,
    }


@pytest.mark.slow
def test_the_stand_in_needs_its_state(standin_vad: Any) -> None:
    assert standin_vad.accuracy >= 0.95
    assert standin_vad.accuracy - standin_vad.accuracy_reset >= 0.1


@pytest.mark.slow
def test_vad_fp32_decisions_equal_a_hand_carried_reference(
    standin_vad: Any, vad_files: dict[str, Path], cli: Callable[..., Any], tmp_path: Path
) -> None:
    window, hidden = standin_vad.window, standin_vad.hidden
    windows = _read_wav_windows(vad_files["wav"], window)
    assert len(windows) == int(SECONDS * standin_vad.rate) // window
    ref = _reference(vad_files["onnx"], windows, hidden) > 0.5
    assert 0.2 < ref.mean() < 0.8  # both decisions occur
    agent = _agent_windows(vad_files["wav"], window)
    assert len(agent) == len(windows)

    onnx_model = _load(vad_files["onnx"], tmp_path)
    assert onnx_model.stateful and onnx_model.input_name == "input"
    assert [(p.input, p.output) for p in onnx_model.state_pairs] == [("state", "stateN")]
    assert np.array_equal(_through_agent(onnx_model, agent, "mic") > 0.5, ref)

    tfl = tmp_path / "vad.tflite"
    res = cli("quantize", vad_files["onnx"], "-o", tfl, "--format", "tflite-fp32",
              "--eval", vad_files["eval"], "--max-eval-samples", 5000,
              "--latency-seconds", 0.2, "--report", tmp_path / "fp32.json")  # fmt: skip
    assert res.code == 0, res.err
    report = json.loads((tmp_path / "fp32.json").read_text())
    assert report["fidelity"]["task"]["kind"] == "binary"
    assert report["fidelity"]["task"]["value"] == 1.0
    tfl_model = _load(tfl, tmp_path)
    assert tfl_model.stateful and tfl_model.input_name == "input"
    assert np.array_equal(_through_agent(tfl_model, agent, "mic") > 0.5, ref)

    # the state matters: every window from the initial state decides otherwise, often
    alone = []
    for w in agent:
        onnx_model.reset_state("alone")
        alone.append(float(onnx_model.infer(onnx_model.prepare(w)[0], stream="alone")[0][0, 0]))
    assert np.mean((np.array(alone) > 0.5) != ref) > 0.05


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["onnx-int8", "tflite-int8"])
def test_vad_int8_agrees_with_fp32_over_the_stream(
    fmt: str,
    standin_vad: Any,
    vad_files: dict[str, Path],
    cli: Callable[..., Any],
    tmp_path: Path,
) -> None:
    windows = _read_wav_windows(vad_files["wav"], standin_vad.window)
    fp32 = _reference(vad_files["onnx"], windows, standin_vad.hidden) > 0.5
    out = tmp_path / ("vad.onnx" if fmt == "onnx-int8" else "vad.tflite")
    scheme = ("--scheme", "u8s8-qop") if fmt == "onnx-int8" else ()
    res = cli("quantize", vad_files["onnx"], "-o", out, "--format", fmt, *scheme,
              "--calibration", vad_files["calibration"], "--eval", vad_files["eval"],
              "--max-eval-samples", 5000, "--latency-seconds", 0.2,
              "--report", tmp_path / "r.json")  # fmt: skip
    assert res.code == 0, res.err
    report = json.loads((tmp_path / "r.json").read_text())
    task = report["fidelity"]["task"]
    assert task["kind"] == "binary" and task["details"]["samples"] == len(windows)
    assert task["value"] >= 0.98
    assert report["state"]["pairs"] == [
        {"input": "state", "output": "stateN", "initial": 0.0, "shape": [1, 1, standin_vad.hidden]}
    ]
    assert "states along" in report["calibration"]["source"]
    state_entry = next(e for e in report["fidelity"]["per_output"] if e["name"] == "stateN")
    assert state_entry["state"] is True

    model = _load(out, tmp_path)
    assert model.stateful
    got = _through_agent(model, _agent_windows(vad_files["wav"], standin_vad.window), "mic") > 0.5
    agreement = float(np.mean(got == fp32))
    assert agreement >= 0.98, agreement
    # the converter's own measure over the same stream is the one the device sees
    assert abs(agreement - task["value"]) <= 0.005


@pytest.mark.slow
def test_interleaved_streams_decide_as_if_alone(
    standin_vad: Any, vad_files: dict[str, Path], tmp_path: Path
) -> None:
    size = standin_vad.window
    a = _agent_windows(vad_files["wav"], size)[:400]
    b = _agent_windows(vad_files["other"], size)
    model = _load(vad_files["onnx"], tmp_path)
    alone_a = _through_agent(model, a, "a-alone")
    alone_b = _through_agent(model, b, "b-alone")
    mixed: dict[str, list[float]] = {"a": [], "b": []}
    for i in range(max(len(a), len(b))):
        for name, windows in (("a", a), ("b", b)):
            if i < len(windows):
                out = model.infer(model.prepare(windows[i])[0], stream=name)
                mixed[name].append(float(out[0][0, 0]))
    assert np.array_equal(np.array(mixed["a"]), alone_a)
    assert np.array_equal(np.array(mixed["b"]), alone_b)
    # a restarted stream starts afresh: the same windows give the first run's answers again
    model.reset_state("a")
    assert np.array_equal(_through_agent(model, a[:50], "a"), alone_a[:50])


@pytest.mark.slow
def test_build_writes_the_state_and_the_device_serves_it(
    standin_vad: Any,
    vad_files: dict[str, Path],
    cli: Callable[..., Any],
    keys: tuple[Path, Path],
    tmp_path: Path,
) -> None:
    from edge_agent.model.keys import load_trusted_keys

    private, public = keys
    bundle = tmp_path / "vad.edgebundle"
    res = cli("build", vad_files["onnx"], "--profile", "raspberry-pi-5",
              "--calibration", vad_files["calibration"], "--eval", vad_files["eval"],
              "--max-eval-samples", 5000, "--latency-seconds", 0.2,
              "--sign-key", private, "--name", "vad", "-o", bundle)  # fmt: skip
    assert res.code == 0, res.err
    trusted = load_trusted_keys([public])
    manifest = verify_bundle(bundle, trusted_keys=trusted).manifest
    assert manifest["state"] == [{"input": "state", "output": "stateN", "initial": 0.0}]
    assert manifest["postprocess"] == {"kind": "raw"}
    assert set(manifest["golden"]["inputs"]) == {"input", "state"}
    assert "stateN" not in manifest["calibration_stats"]["outputs"]
    # load_model runs the golden test (the stream's first window, from the initial state)
    model = load_model(bundle, profile=load_profile("raspberry-pi-5"),
                       state_dir=tmp_path / "device", trusted_keys=trusted, threads=1)  # fmt: skip
    assert model.format == "tflite-int8" and model.stateful and model.input_name == "input"
    windows = _agent_windows(vad_files["wav"], standin_vad.window)
    fp32 = _reference(vad_files["onnx"], np.stack(windows)[..., 0], standin_vad.hidden) > 0.5
    got = _through_agent(model, windows, "mic") > 0.5
    assert np.mean(got == fp32) >= 0.98


# --- through the agent's loop: one state per stream, afresh when a stream restarts -----------


@pytest.mark.slow
def test_the_loop_carries_each_streams_state_in_order(
    standin_vad: Any, vad_files: dict[str, Path], tmp_path: Path
) -> None:
    """Two WAV streams through one Pipeline and one VAD (asked for two workers: it keeps one,
    so each stream's windows run in order): every window's decision equals the hand-carried
    reference of its own file, as if each stream had the model to itself."""
    from edge_agent.io import open_source
    from edge_agent.io.sinks import CallbackSink
    from edge_agent.io.streams import Stream
    from edge_agent.pipeline import Pipeline

    window, hidden = standin_vad.window, standin_vad.hidden
    wavs = {"speech": vad_files["wav"], "other": vad_files["other"]}
    streams = [
        Stream(n, open_source(f"wav:{p}?size={window}&hop={window}")) for n, p in wavs.items()
    ]
    results: list[dict[str, Any]] = []
    pipe = Pipeline(
        streams=streams,
        model=_load(vad_files["onnx"], tmp_path),
        sinks=[CallbackSink(results.append)],
        workers=2,
    )
    summary = pipe.run()
    assert pipe.workers == 1 and summary["inference_errors"] == 0
    for name, path in wavs.items():
        ref = _reference(vad_files["onnx"], _read_wav_windows(path, window), hidden) > 0.5
        mine = [r for r in results if r["stream"] == name]
        assert [r["stream_seq"] for r in mine] == list(range(len(ref)))
        got = np.array([r["output"]["outputs"]["output"][0][0] for r in mine]) > 0.5
        assert np.array_equal(got, ref), name


def _counter(path: Path, size: int) -> Path:
    """``stateN = state + 1 + 0 * sum(input)``, ``output = stateN``: windows since the state
    was last reset."""
    graph = helper.make_graph(
        [
            helper.make_node("ReduceSum", ["input"], ["s"], keepdims=1),
            helper.make_node("Mul", ["s", "zero"], ["z"]),
            helper.make_node("Add", ["state", "one"], ["next"]),
            helper.make_node("Add", ["next", "z"], ["stateN"]),
            helper.make_node("Identity", ["stateN"], ["output"]),
        ],
        "counter",
        [
            helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, size]),
            helper.make_tensor_value_info("state", TensorProto.FLOAT, [1, 1]),
        ],
        [
            helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 1]),
            helper.make_tensor_value_info("stateN", TensorProto.FLOAT, [1, 1]),
        ],
        [
            numpy_helper.from_array(np.zeros((1, 1), np.float32), "zero"),
            numpy_helper.from_array(np.ones((1, 1), np.float32), "one"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_a_restarted_microphone_starts_its_state_afresh(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A microphone that is unplugged every 0.2 s of audio (the arecord stand-in) and comes
    back: after each restart the model's state starts again from its initial value, and
    between restarts it counts on."""
    from edge_agent.common.backoff import BackoffPolicy
    from edge_agent.io import open_source
    from edge_agent.io.sinks import CallbackSink
    from edge_agent.pipeline import Pipeline

    standin = Path(__file__).resolve().parent / "bin"
    monkeypatch.setenv("PATH", f"{standin}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("ARECORD_STANDIN_SECONDS", "0.2")
    monkeypatch.delenv("ARECORD_STANDIN_NO_DEVICE", raising=False)
    fast = BackoffPolicy(initial=0.05, maximum=0.2, factor=2.0, jitter=0.2)
    source = open_source("alsa:default?size=160&hop=160", reconnect=fast)
    model = _load(_counter(tmp_path / "counter.onnx", 160), tmp_path)
    assert model.stateful
    counts: list[int] = []
    pipe = Pipeline(
        source=source,
        model=model,
        sinks=[CallbackSink(lambda r: counts.append(int(r["output"]["outputs"]["output"][0][0])))],
        max_frames=120,
    )
    pipe.run()
    restarts = [i for i, c in enumerate(counts) if c == 1]
    assert restarts[0] == 0 and len(restarts) >= 3, counts  # started, then restarted twice+
    assert source.stats.reconnects >= len(restarts) - 1
    # between restarts the state counts on (a live source may drop windows, never go back)
    for a, b in zip(counts, counts[1:]):
        assert b == 1 or b > a, counts


def test_state_like_names_on_a_model_with_no_other_input_are_not_state(tmp_path: Path) -> None:
    """An image-to-image model whose tensors happen to be called image_in / image_out loads as
    it did before state pairs existed: its one input takes the frames."""
    graph = helper.make_graph(
        [helper.make_node("Relu", ["image_in"], ["image_out"])],
        "denoise",
        [helper.make_tensor_value_info("image_in", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("image_out", TensorProto.FLOAT, [1, 3, 8, 8])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "m.onnx"))
    loaded = _load(tmp_path / "m.onnx", tmp_path)
    assert not loaded.stateful and loaded.input_name == "image_in"
    x = np.ones((1, 3, 8, 8), np.float32)
    np.testing.assert_array_equal(loaded.infer({"image_in": x}, stream="s")[0], x)


def test_a_stateful_model_swapped_in_runs_on_one_worker(tmp_path: Path) -> None:
    """A stateful model swapped in over the air into a two-worker pipeline: the pipeline drops
    to one worker while it serves (its windows run in order: the count goes on 1, 2, 3, ...
    with nothing out of order), and gets its workers back when a stateless model follows."""
    import threading

    from converters.standins import write_wav
    from edge_agent.io import open_source
    from edge_agent.io.sinks import CallbackSink
    from edge_agent.pipeline import Pipeline

    size = 160
    wav = tmp_path / "long.wav"
    write_wav(wav, np.sin(np.arange(16000 * 60) / 7.0) * 0.3)  # 60 s: 6000 windows
    graph = helper.make_graph(
        [helper.make_node("ReduceSum", ["input"], ["output"], keepdims=1)],
        "plain",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, size])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 1])],
    )
    plain_onnx = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    plain_onnx.ir_version = 8
    onnx.save(plain_onnx, str(tmp_path / "plain.onnx"))
    plain = _load(tmp_path / "plain.onnx", tmp_path, workers=2)
    counter = _load(_counter(tmp_path / "counter.onnx", size), tmp_path)
    plain_again = _load(tmp_path / "plain.onnx", tmp_path, workers=2)
    outputs: list[tuple[str, float]] = []
    pipe = Pipeline(
        source=open_source(f"wav:{wav}?size={size}&hop={size}"),
        model=plain,
        sinks=[CallbackSink(lambda r: outputs.append(
            (r["model"]["name"], float(r["output"]["outputs"]["output"][0][0]))))],
        workers=2,
    )  # fmt: skip
    runner = threading.Thread(target=pipe.run, daemon=True)
    runner.start()
    tick = threading.Event()

    def until(n: int) -> None:
        while len(outputs) < n and runner.is_alive():
            tick.wait(0.01)

    until(50)
    assert pipe.workers == 2
    pipe.swap_model(counter)
    assert pipe.workers == 1
    start = len(outputs)
    until(start + 200)
    pipe.swap_model(plain_again)
    assert pipe.workers == 2
    pipe.stop()
    runner.join(30)
    counts = [int(v) for name, v in outputs if name == "counter"]  # its results, all of them
    assert len(counts) >= 100 and counts == list(range(1, len(counts) + 1)), counts[:20]
    for m in (plain, counter, plain_again):
        m.close()
