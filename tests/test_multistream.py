"""Several streams, one model (issue 14): named streams from config and the command line, every
frame of every file stream served once and in its order, each result tagged with its stream
and that stream's own gap-free count, a region of interest per stream, an fps cap per stream,
and a lost stream degrading alone while the others are served. Real video files written with
OpenCV, real synthetic sources, a real onnxruntime model."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from edge_agent.cli import main as edge_agent
from edge_agent.config import parse_config
from edge_agent.errors import ConfigError, SourceError
from edge_agent.io import open_source
from edge_agent.io.sinks import CallbackSink
from edge_agent.io.source import EndOfStream, Source
from edge_agent.io.streams import Stream
from edge_agent.pipeline import Pipeline, State
from tests.broker import Broker, Collector, broker_fixture  # noqa: F401
from tests.fleet import (  # noqa: F401  (fleet_env_fixture: the `fleet_env` fixture)
    AgentProcess,
    agent_config,
    fleet_env_fixture,
    payloads,
    wait_until,
)

W, H = 64, 48


def _mean_model(path: Path) -> Path:
    """x [1, 3, H, W] -> y [1, 3]: each channel's mean (what the frame's colour was)."""
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["x"], ["y"], axes=[2, 3], keepdims=0)],
        "mean",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, H, W])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _video(path: Path, *, channel: int, frames: int, split: bool = False) -> Path:
    """Frame i is black but for one BGR channel at 8 + 12 i (with ``split``, only the right
    half is lit), so a result tells which stream and which frame it came from."""
    out = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 30.0, (W, H))
    for i in range(frames):
        img = np.zeros((H, W, 3), np.uint8)
        img[:, W // 2 if split else 0 :, channel] = (8 + 12 * i) % 256
        out.write(img)
    out.release()
    return path


def _load(path: Path, tmp: Path, *, workers: int = 1) -> Any:
    from edge_agent.model.loader import load_model
    from edge_agent.model.profiles import load_profile

    return load_model(
        path, profile=load_profile("x86-64"), state_dir=tmp / "state", threads=1, workers=workers
    )


def _value(result: dict[str, Any]) -> list[float]:
    """The model's output (RGB channel means, 0-255) of a result."""
    (y,) = result["output"]["outputs"].values()
    return [round(v * 255.0, 1) for v in np.asarray(y).reshape(-1)]


@pytest.mark.parametrize("workers", [1, 2])
def test_every_frame_of_every_file_stream_once_in_its_order(tmp_path: Path, workers: int) -> None:
    sizes = {"red": (2, 9), "green": (1, 14), "blue": (0, 5)}  # BGR channel, frames
    streams = [
        Stream(name, open_source(str(_video(tmp_path / f"{name}.mp4", channel=c, frames=n))))
        for name, (c, n) in sizes.items()
    ]
    results: list[dict[str, Any]] = []
    pipe = Pipeline(
        streams=streams,
        model=_load(_mean_model(tmp_path / "m.onnx"), tmp_path, workers=workers),
        sinks=[CallbackSink(results.append)],
        workers=workers,
    )
    summary = pipe.run()
    total = sum(n for _, n in sizes.values())
    assert [r["seq"] for r in results] == list(range(total))  # the device-wide count, gap-free
    for name, (channel, frames) in sizes.items():
        mine = [r for r in results if r["stream"] == name]
        assert [r["frame"] for r in mine] == list(range(frames))
        assert [r["stream_seq"] for r in mine] == list(range(frames))
        rgb = 2 - channel  # the model sees RGB
        for r in mine:
            v = _value(r)
            assert abs(v[rgb] - (8 + 12 * r["frame"])) <= 5, (name, r["frame"], v)
            assert all(abs(x) <= 5 for i, x in enumerate(v) if i != rgb), (name, v)
        s = summary["streams"][name]
        assert s["results"] == s["frames"] == frames and s["next_stream_seq"] == frames
        assert s["state"] == "ended" and s["dropped"] == 0
        assert s["latency_ms"]["inference"]["count"] == frames
    assert summary["results"] == total and summary["workers"] == workers


def test_a_region_of_interest_crops_before_preprocessing(tmp_path: Path) -> None:
    video = _video(tmp_path / "half.mp4", channel=1, frames=6, split=True)
    streams = [
        Stream("whole", open_source(str(video))),
        Stream("right", open_source(str(video)), roi=(W // 2, 0, W // 2, H)),
    ]
    results: list[dict[str, Any]] = []
    Pipeline(
        streams=streams,
        model=_load(_mean_model(tmp_path / "m.onnx"), tmp_path),
        sinks=[CallbackSink(results.append)],
    ).run()
    for r in results:
        green, lit = _value(r)[1], 8 + 12 * r["frame"]
        # the right half only: the full level; the whole frame: half of it (stretched to fit)
        want = lit if r["stream"] == "right" else lit / 2
        assert abs(green - want) <= 5, (r["stream"], r["frame"], green)
    assert sorted(r["stream"] for r in results) == ["right"] * 6 + ["whole"] * 6


def test_an_fps_cap_skips_frames_in_the_reader(tmp_path: Path) -> None:
    """A source delivering about 100 frames a second, capped at 10: most frames are skipped
    (counted, not dropped), and what is served is at least 1/10 s apart."""
    video = _video(tmp_path / "v.mp4", channel=0, frames=60)
    capped = Stream("capped", open_source(str(video), pace="native", fps=100.0), max_fps=10.0)
    results: list[dict[str, Any]] = []
    summary = Pipeline(
        streams=[capped],
        model=_load(_mean_model(tmp_path / "m.onnx"), tmp_path),
        sinks=[CallbackSink(results.append)],
    ).run()
    s = summary["streams"]["capped"]
    assert s["results"] + s["skipped"] == 60 and s["dropped"] == 0
    assert 2 <= s["results"] <= 30  # 60 frames over >= 0.6 s: at most ~7 at 10 fps, slack kept
    ts = [r["capture_ts"] for r in results]  # on a 0.1 s cadence, a frame may be 1/4 early
    assert all(b - a >= 0.07 for a, b in zip(ts, ts[1:]))
    assert (ts[-1] - ts[0]) / max(len(ts) - 1, 1) >= 0.095


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_lost_stream_degrades_alone_and_the_others_are_served(tmp_path: Path) -> None:
    dead = Stream("door", open_source(f"rtsp://127.0.0.1:{_closed_port()}/none"))
    live = Stream("yard", open_source(f"synthetic:?width={W}&height={H}&fps=60&live=1"))
    results: list[dict[str, Any]] = []
    pipe = Pipeline(
        streams=[dead, live],
        model=_load(_mean_model(tmp_path / "m.onnx"), tmp_path),
        sinks=[CallbackSink(results.append)],
        max_frames=150,
    )
    runner = threading.Thread(target=pipe.run)
    runner.start()
    try:
        wait_until(
            lambda: pipe.stream_status().get("door") == "degraded", timeout=20, what="door lost"
        )
        wait_until(lambda: pipe.state is State.DEGRADED, timeout=10, what="pipeline degraded")
        assert pipe.stream_status()["yard"] == "serving"
    finally:
        runner.join(60)
    assert not runner.is_alive()
    summary = pipe.summary()
    assert summary["results"] == 150 and {r["stream"] for r in results} == {"yard"}
    assert [r["stream_seq"] for r in results] == list(range(150))
    door = summary["streams"]["door"]
    assert door["results"] == 0 and "cannot connect" in (door["last_error"] or "")
    assert summary["streams"]["yard"]["results"] == 150


def test_streams_start_as_starting_until_each_sends_and_a_silent_one_degrades(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Several streams that connect in the background: the pipeline is "starting" (no READY=1
    yet) until each has sent a frame; one that connects and stays silent is "degraded" once
    STARTING_LIMIT_S has passed (the others served meanwhile), and serving at its first frame."""
    from edge_agent import pipeline as pipeline_module

    speak = threading.Event()

    class QuietCamera(Source):  # a designed seam: a live source that connects in the background
        _connect_in_open = False

        def __init__(self) -> None:
            super().__init__("quiet:0", kind="image", live=True)

        def _connect(self) -> None:
            pass

        def _capture(self, timeout: float | None) -> np.ndarray | None:
            if speak.wait(timeout):
                time.sleep(0.02)
                return np.zeros((H, W, 3), np.uint8)
            return None

        def _disconnect(self) -> None:
            pass

    monkeypatch.setattr(pipeline_module, "STARTING_LIMIT_S", 8.0)
    live = Stream("yard", open_source(f"synthetic:?width={W}&height={H}&fps=30&live=1"))
    pipe = Pipeline(
        streams=[Stream("door", QuietCamera()), live],
        model=_load(_mean_model(tmp_path / "m.onnx"), tmp_path),
        sinks=[CallbackSink(lambda r: None)],
    )
    runner = threading.Thread(target=pipe.run, daemon=True)
    runner.start()
    try:
        wait_until(lambda: pipe.results > 0, timeout=20, what="the yard served")
        assert pipe.state is State.STARTING  # the door has sent nothing yet
        assert pipe.stream_status() == {"door": "starting", "yard": "serving"}
        wait_until(lambda: pipe.state is State.DEGRADED, timeout=20, what="degraded")
        assert pipe.stream_status()["door"] == "degraded"
        speak.set()
        wait_until(lambda: pipe.state is State.SERVING, timeout=20, what="serving")
        assert pipe.stream_status() == {"door": "serving", "yard": "serving"}
    finally:
        pipe.stop()
        runner.join(30)
    assert not runner.is_alive()


# --- configuration and the command line -----------------------------------------------------


def test_sources_in_config_and_their_errors() -> None:
    config = parse_config(
        {
            "sources": [
                {"name": "front", "uri": "rtsp://cam1/s", "fps": 15, "roi": [0, 0, 320, 240]},
                {"name": "mic", "uri": "wav:a.wav", "window_size": 512},
            ]
        }
    )
    assert [s.name for s in config.sources] == ["front", "mic"]
    assert config.sources[0].roi == (0, 0, 320, 240) and config.sources[0].fps == 15.0
    bad = [
        ({"sources": [{"name": "a", "uri": "x"}, {"name": "a", "uri": "y"}]}, "'a' is used twice"),
        ({"sources": [{"uri": "x"}]}, "name is not set"),
        ({"sources": [{"name": "a b", "uri": "x"}]}, "stream name 'a b'"),
        ({"sources": [{"name": "a", "uri": "x", "roi": [1, 2]}]}, "roi = [1, 2]"),
        ({"sources": [{"name": "a", "uri": "x", "fps": -1}]}, "fps = -1"),
        ({"source": {"uri": "x"}, "sources": [{"name": "a", "uri": "y"}]}, "both set"),
        ({"sources": {"name": "a"}}, "expected [[sources]] tables"),
    ]
    for data, needle in bad:
        with pytest.raises(ConfigError, match=None) as info:
            parse_config(data)
        assert needle in str(info.value), (data, str(info.value))


def test_a_bad_stream_uri_names_its_stream() -> None:
    from edge_agent.io.uri import open_streams_from

    config = parse_config(
        {"sources": [{"name": "ok", "uri": "synthetic:"}, {"name": "bad", "uri": "nope:x"}]}
    )
    with pytest.raises(SourceError, match=r"^stream bad: "):
        open_streams_from(config)


def test_run_serves_named_streams_from_the_command_line(tmp_path: Path) -> None:
    model = _mean_model(tmp_path / "m.onnx")
    a = _video(tmp_path / "a.mp4", channel=2, frames=7)
    b = _video(tmp_path / "b.mp4", channel=0, frames=4)
    out, summary = tmp_path / "r.jsonl", tmp_path / "s.json"
    code = edge_agent(
        [
            "run", "--model", str(model), "--source", f"left=file:{a}", "--source", f"right={b}",
            "--results", f"jsonl:{out}", "--state-dir", str(tmp_path / "st"),
            "--summary", str(summary),
        ]
    )  # fmt: skip
    assert code == 0
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["stream"] for r in results) == ["left"] * 7 + ["right"] * 4
    assert [r["stream_seq"] for r in results if r["stream"] == "right"] == [0, 1, 2, 3]
    assert set(json.loads(summary.read_text())["streams"]) == {"left", "right"}


def test_mixing_a_plain_and_a_named_source_is_refused(tmp_path: Path, capsys: Any) -> None:
    code = edge_agent(
        ["run", "--model", str(tmp_path / "m.onnx"), "--source", "synthetic:",
         "--source", "b=synthetic:", "--state-dir", str(tmp_path)]
    )  # fmt: skip
    assert code == 78
    assert "--source synthetic:: with several sources, name each one" in capsys.readouterr().err


# --- over MQTT: results, telemetry, events, Home Assistant and Prometheus per stream ---------


def test_streams_over_mqtt_carry_their_names_everywhere(
    broker: Broker, fleet_env: dict[str, Any], tmp_path: Path
) -> None:
    """Two named streams of the digits video through the agent process and a real Mosquitto:
    every result has its stream and a gap-free stream_seq beside the device-wide seq, telemetry
    has one entry per stream (schema-valid), Home Assistant gets each stream's sensors."""
    import jsonschema

    from edge_agent.fleet import protocol

    video = fleet_env["video"]
    cfg = agent_config(
        broker=broker.url, device="nvr-1", state_dir=tmp_path / "state",
        model=fleet_env["root"] / "digits-1.0.0.edgebundle", source="", keys=fleet_env["pub"],
        telemetry_interval=0.5, mqtt_extra="home_assistant = true",
        extra=f'[[sources]]\nname = "gate"\nuri = "file:{video}"\npace = "native"\n\n'
        f'[[sources]]\nname = "dock"\nuri = "file:{video}"\npace = "native"\n',
    )  # fmt: skip
    with (
        Collector(broker, ["edge/#", "homeassistant/#"]) as consumer,
        AgentProcess(tmp_path, cfg) as agent,
    ):
        assert agent.wait(90) == 0, agent.text()
        consumer.wait_for(lambda m: len(payloads(m, "/results")) >= 240, timeout=20)
        msgs = consumer.messages
    results = payloads(msgs, "/results")
    assert [r["seq"] for r in results] == list(range(240))
    for name in ("gate", "dock"):
        mine = [r for r in results if r["stream"] == name]
        assert [r["stream_seq"] for r in mine] == list(range(120))
        assert [r["frame"] for r in mine] == list(range(120))
    for r in results[:10]:
        jsonschema.validate(r, protocol.SCHEMAS["result"])
    telemetry = payloads(msgs, "/telemetry")
    for t in telemetry:
        jsonschema.validate(t, protocol.SCHEMAS["telemetry"])
    last = telemetry[-1]["pipeline"]
    assert set(last["streams"]) == {"gate", "dock"}
    assert last["streams"]["gate"]["results"] == last["streams"]["dock"]["results"] == 120
    assert any(t["pipeline"]["streams"]["gate"]["fps"] > 0 for t in telemetry)
    ha = {m.topic for m in msgs if m.topic.startswith("homeassistant/")}
    for name in ("gate", "dock"):
        assert f"homeassistant/sensor/nvr-1_{name}_fps/config" in ha
        assert f"homeassistant/sensor/nvr-1_{name}_state/config" in ha


def test_prometheus_labels_each_stream() -> None:
    from prometheus_client.parser import text_string_to_metric_families
    from prometheus_client.registry import CollectorRegistry

    from edge_agent.fleet.prometheus import TelemetryCollector

    latency = {"capture_to_result": {"p50": 20.0, "p95": 31.0, "p99": None}}
    stream = {"state": "serving", "fps": 14.5, "results": 300, "dropped": 2, "latency_ms": latency}
    telemetry = {
        "device": "nvr-1",
        "model": {"name": "det", "version": "2.0.0"},
        "pipeline": {
            "fps": 14.5,
            "results": 300,
            "latency_ms": {},
            "streams": {"front": stream, "back": {**stream, "state": "degraded", "fps": 0.0}},
        },
    }
    registry = CollectorRegistry(auto_describe=False)
    registry.register(TelemetryCollector(lambda: telemetry))
    from prometheus_client import generate_latest

    families = {
        f.name: f for f in text_string_to_metric_families(generate_latest(registry).decode())
    }
    up = {s.labels["stream"]: s.value for s in families["edge_agent_stream_up"].samples}
    assert up == {"front": 1.0, "back": 0.0}
    fps = {s.labels["stream"]: s.value for s in families["edge_agent_stream_fps"].samples}
    assert fps == {"front": 14.5, "back": 0.0}
    (res, _) = families["edge_agent_stream_results"].samples
    assert res.name == "edge_agent_stream_results_total" and res.value == 300
    assert res.labels == {"device": "nvr-1", "model": "det", "version": "2.0.0", "stream": "back"}
    lat = families["edge_agent_stream_latency_ms"]
    assert lat.type == "summary"
    assert {(s.labels["stream"], s.labels["quantile"]) for s in lat.samples} == {
        ("front", "0.5"),
        ("front", "0.95"),
        ("back", "0.5"),
        ("back", "0.95"),
    }


# --- batches of several streams' frames in one call -----------------------------------------


def _dynamic_mean_model(path: Path) -> Path:
    """As :func:`_mean_model`, with a dynamic batch dimension."""
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["x"], ["y"], axes=[2, 3], keepdims=0)],
        "mean",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, H, W])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_frames_of_several_streams_in_one_call_keep_their_own_results(tmp_path: Path) -> None:
    sizes = {"red": (2, 9), "green": (1, 12), "blue": (0, 6)}
    streams = [
        Stream(name, open_source(str(_video(tmp_path / f"{name}.mp4", channel=c, frames=n))))
        for name, (c, n) in sizes.items()
    ]
    model = _load(_dynamic_mean_model(tmp_path / "m.onnx"), tmp_path)
    calls: list[int] = []
    real = model.runtime.infer

    def infer(feeds: Any) -> Any:  # records each call's batch, then runs the real runtime
        calls.append(next(iter(feeds.values())).shape[0])
        return real(feeds)

    model.runtime.infer = infer
    results: list[dict[str, Any]] = []
    summary = Pipeline(
        streams=streams, model=model, sinks=[CallbackSink(results.append)], batch=3
    ).run()
    assert summary["batch"] == 3 and sum(calls) == 27 and max(calls) > 1
    assert [r["seq"] for r in results] == list(range(27))
    for name, (channel, frames) in sizes.items():
        mine = [r for r in results if r["stream"] == name]
        assert [r["frame"] for r in mine] == list(range(frames))
        assert [r["stream_seq"] for r in mine] == list(range(frames))
        for r in mine:
            assert abs(_value(r)[2 - channel] - (8 + 12 * r["frame"]) % 256) <= 5, (name, r)


def test_the_batch_plan_says_why(tmp_path: Path) -> None:
    from edge_agent.model.plan import batch_plan

    fixed = _load(_mean_model(tmp_path / "fixed.onnx"), tmp_path)
    assert batch_plan(fixed, streams=4) == (1, "the model's batch dimension is fixed")
    dynamic = _load(_dynamic_mean_model(tmp_path / "dyn.onnx"), tmp_path)
    assert batch_plan(dynamic, streams=1) == (1, "one stream")
    k, how = batch_plan(dynamic, streams=6)  # measured: 4 frames a call or 1, with the numbers
    assert k in (1, 4) and "4 frames a call cost" in how


@pytest.mark.parametrize("command", ["tune", "bench"])
def test_tune_and_bench_measure_one_source(tmp_path: Path, capsys: Any, command: str) -> None:
    code = edge_agent(
        [command, "--model", str(_mean_model(tmp_path / "m.onnx")), "--source", "a=synthetic:",
         "--source", "b=synthetic:", "--state-dir", str(tmp_path)]
    )  # fmt: skip
    assert code == 78
    assert f"edge-agent {command} measures one source" in capsys.readouterr().err


def test_detections_on_a_region_of_interest_come_back_in_frame_pixels() -> None:
    from edge_agent.pipeline import _to_frame

    out = {
        "kind": "detection",
        "detections": [{"box": [1.0, 2.0, 11.0, 12.0], "score": 0.9, "class": 0, "label": "a"}],
    }
    moved = _to_frame(out, (320, 40, 640, 480))
    assert moved["detections"][0]["box"] == [321.0, 42.0, 331.0, 52.0]
    top = {"kind": "classification", "class": 3, "score": 0.8, "top": []}
    assert _to_frame(dict(top), (5, 5, 10, 10)) == top  # describes the region: unchanged


def _three(tmp_path: Path, frames: int = 6) -> list[Stream]:
    return [
        Stream(n, open_source(str(_video(tmp_path / f"{n}.mp4", channel=i, frames=frames))))
        for i, n in enumerate("abc")
    ]


def test_a_frame_without_a_result_in_a_batch_hands_its_turn_on(tmp_path: Path) -> None:
    """A batch whose first frame fails to postprocess: the others are still emitted (the loop
    used to wait forever for that frame's turn)."""
    model = _load(_dynamic_mean_model(tmp_path / "m.onnx"), tmp_path)
    real, calls = model.postprocessor, []

    def post(outputs: Any, **kw: Any) -> Any:  # the first frame's postprocessing fails
        calls.append(1)
        if len(calls) == 1:
            raise ValueError("a bad output")
        return real(outputs, **kw)

    model.postprocessor = post
    results: list[dict[str, Any]] = []
    summary = Pipeline(
        streams=_three(tmp_path), model=model, sinks=[CallbackSink(results.append)], batch=3
    ).run()
    assert summary["inference_errors"] == 1 and len(results) == 17
    assert [r["seq"] for r in results] == list(range(17))


def test_a_swap_to_a_model_that_cannot_batch_goes_frame_by_frame(tmp_path: Path) -> None:
    model = _load(_dynamic_mean_model(tmp_path / "dyn.onnx"), tmp_path)
    fixed = _load(_mean_model(tmp_path / "fixed.onnx"), tmp_path)
    results: list[dict[str, Any]] = []
    pipe = Pipeline(
        streams=_three(tmp_path, frames=12),
        model=model,
        sinks=[CallbackSink(results.append)],
        batch=3,
    )
    pipe.swap_model(fixed)  # before the loop starts: every call is the fixed-batch model's
    summary = pipe.run()
    assert summary["inference_errors"] == 0 and summary["results"] == 36
    for r in results:
        assert abs(_value(r)[2 - "abc".index(r["stream"])] - (8 + 12 * r["frame"]) % 256) <= 5


def test_a_region_outside_the_frame_skips_frames_and_keeps_the_stream(tmp_path: Path) -> None:
    video = _video(tmp_path / "v.mp4", channel=1, frames=5)
    streams = [
        Stream("ok", open_source(str(video))),
        Stream("off", open_source(str(video)), roi=(W + 10, 0, 8, 8)),  # beyond the 64 px
    ]
    summary = Pipeline(
        streams=streams, model=_load(_mean_model(tmp_path / "m.onnx"), tmp_path), sinks=[]
    ).run()
    off = summary["streams"]["off"]
    assert off["results"] == 0 and off["errors"] == 5 and off["frames"] == 5
    assert summary["streams"]["ok"]["results"] == 5


def test_a_frame_prepare_drops_never_takes_a_waiting_frames_place() -> None:
    """``prepare`` returning None (a motion gate) drops that frame in the reader; the frames
    kept are handed out in order and none is replaced by a dropped one."""
    from edge_agent.io.streams import StreamSet

    source = open_source(f"synthetic:?width={W}&height={H}&frames=20&pattern=noise")
    streams = StreamSet(
        [("s", source)], prepare=lambda name, frame: None if frame.index % 2 else frame.index
    )
    taken = []
    with streams:
        while (t := streams.take(timeout=5.0)) is not None:
            taken.append(t)
    assert [t.frame.index for t in taken] == list(range(0, 20, 2))
    assert all(t.prepared == t.frame.index for t in taken)
    assert streams.counters()["s"].read == 20


def test_file_streams_decode_with_one_thread_each_and_the_same_frames(tmp_path: Path) -> None:
    """Several file streams: each decoder gets one FFmpeg thread (they decode side by side
    already); a plain one-file source keeps FFmpeg's own choice. The frames are the same."""
    from edge_agent.io.uri import open_source_from, open_streams_from

    a = _video(tmp_path / "a.mp4", channel=1, frames=12)
    b = _video(tmp_path / "b.mp4", channel=2, frames=12)
    config = parse_config(
        {"sources": [{"name": "a", "uri": f"file:{a}"}, {"name": "b", "uri": f"file:{b}"}]}
    )
    streams = open_streams_from(config)
    assert [st.source.decode_threads for st in streams] == [1, 1]  # type: ignore[attr-defined]
    single = open_source_from(parse_config({"source": {"uri": f"file:{a}"}}))
    assert single.decode_threads == 0  # type: ignore[attr-defined]

    def frames(source: Any) -> list[np.ndarray]:
        source.open()
        out = []
        while (frame := source.read(timeout=5.0)) is not None:
            out.append(frame.data)
        source.close()
        return out

    one, default = frames(streams[0].source), frames(single)
    assert len(one) == len(default) == 12
    assert all(np.array_equal(x, y) for x, y in zip(one, default, strict=True))


class _AfterEvent(Source):
    """A finite image source whose first frame is read only once ``gate`` is set (a designed
    seam: a fake camera is a Source)."""

    def __init__(self, gate: threading.Event, frames: int) -> None:
        super().__init__("test:after-event", kind="image", live=False)
        self._gate, self._left = gate, frames

    def _capture(self, timeout: float | None) -> np.ndarray | None:
        self._gate.wait(10.0)
        if self._left == 0:
            raise EndOfStream
        self._left -= 1
        return np.full((H, W, 3), 40, np.uint8)


def test_a_stream_held_in_inference_does_not_hold_back_the_others(tmp_path: Path) -> None:
    """Each stream is a lane of its own when results leave: while one stream's frame is held in
    inference, two workers keep emitting another stream's frames, all read after it (one
    emission order for all streams kept them waiting for the held frame's turn)."""
    model = _load(_mean_model(tmp_path / "m.onnx"), tmp_path, workers=2)
    real_infer = model.infer
    held, release, outcome = threading.Event(), threading.Event(), {}

    def infer(feeds: Any, *, stream: str = "") -> Any:
        if stream == "slow" and not held.is_set():
            held.set()  # the fast stream's frames are read from now on
            outcome["released"] = release.wait(10.0)  # False: nothing came past it
        return real_infer(feeds, stream=stream)

    model.infer = infer

    def sink(result: dict[str, Any]) -> None:
        if result["stream"] == "fast":
            release.set()  # a frame picked after the held one came out

    results: list[dict[str, Any]] = []
    streams = [
        Stream("slow", open_source(str(_video(tmp_path / "slow.mp4", channel=0, frames=1)))),
        Stream("fast", _AfterEvent(held, frames=20)),
    ]
    summary = Pipeline(
        streams=streams,
        model=model,
        sinks=[CallbackSink(sink), CallbackSink(results.append)],
        workers=2,
    ).run()
    assert outcome == {"released": True}
    assert summary["results"] == 21
    assert [r["frame"] for r in results if r["stream"] == "fast"] == list(range(20))
    assert [r["seq"] for r in results] == list(range(21))


def test_a_result_done_before_its_turn_does_not_hold_its_worker(tmp_path: Path) -> None:
    """One source, two workers: while frame 0 is held in inference, the other worker parks each
    result it finishes and goes on to the next frame (it used to wait for frame 0's turn, its
    core idle); the results still leave in capture order, seq gap-free."""
    model = _load(_mean_model(tmp_path / "m.onnx"), tmp_path, workers=2)
    real_infer = model.infer
    outcome: dict[str, bool] = {}
    inferred: list[int] = []
    lock = threading.Lock()

    def infer(feeds: Any, *, stream: str = "") -> Any:
        with lock:
            first = not inferred
            inferred.append(1)
        if first:  # frame 0: held until four frames after it were inferred (10 s at most)
            deadline = time.monotonic() + 10.0
            while len(inferred) < 5 and time.monotonic() < deadline:
                time.sleep(0.01)
            outcome["passed"] = len(inferred) >= 5
        return real_infer(feeds, stream=stream)

    model.infer = infer
    results: list[dict[str, Any]] = []
    summary = Pipeline(
        source=open_source("synthetic:?width=64&height=48&frames=12"),
        model=model,
        sinks=[CallbackSink(results.append)],
        workers=2,
    ).run()
    model.close()
    assert outcome["passed"], "the second worker waited for frame 0 instead of going on"
    assert summary["results"] == 12
    assert [r["seq"] for r in results] == list(range(12))
    assert [r["frame"] for r in results] == list(range(12))


def test_max_frames_ends_the_run_with_a_full_park(tmp_path: Path) -> None:
    """The result that reaches max_frames ends the loop while the other worker waits with a
    full park (more results done than may wait): it sees the stop instead of a turn that
    never comes, and run() returns."""
    model = _load(_mean_model(tmp_path / "m.onnx"), tmp_path, workers=2)
    real_infer = model.infer
    calls: list[int] = []
    lock = threading.Lock()

    def infer(feeds: Any, *, stream: str = "") -> Any:
        with lock:
            calls.append(1)
            n = len(calls)
        if n == 3:  # held until the other worker has filled the park (6) and inferred one more
            deadline = time.monotonic() + 10.0
            while len(calls) < 3 + 7 and time.monotonic() < deadline:
                time.sleep(0.01)
        return real_infer(feeds, stream=stream)

    model.infer = infer
    before = set(threading.enumerate())
    pipe = Pipeline(
        source=open_source("synthetic:?width=64&height=48&frames=1000"),
        model=model,
        sinks=[],
        workers=2,
        max_frames=3,
    )
    runner = threading.Thread(target=pipe.run, daemon=True)
    runner.start()
    runner.join(60)
    stuck = runner.is_alive()
    pipe.stop()
    runner.join(10)
    model.close()
    assert not stuck, "run() did not return at max_frames"
    left = [t.name for t in set(threading.enumerate()) - before if t.name.startswith("edge-infer")]
    assert not left, f"a worker was left waiting for a turn that never comes: {left}"
    assert pipe.results == 3
