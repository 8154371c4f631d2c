"""The demo's parts (``make demo`` itself runs them end to end): the loopback broker with and
without Mosquitto, the swap accounting, and the report's plots."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any, ClassVar

import cv2
import numpy as np
import pytest

from converters.charts import bars_png, fps_png, histogram_png
from converters.demo_broker import LoopbackBroker, find_mosquitto
from converters.demo_report import swap_accounting, write_report


@pytest.mark.parametrize("prefer", ["auto", "amqtt"])
def test_loopback_broker_accepts_mqtt_and_stops(tmp_path: Path, prefer: str) -> None:
    import paho.mqtt.client as mqtt

    if prefer == "amqtt":
        pytest.importorskip("amqtt")
    with LoopbackBroker(tmp_path, prefer=prefer) as broker:
        assert broker.kind == (
            "amqtt" if prefer == "amqtt" or not find_mosquitto() else "mosquitto"
        )
        got: list[bytes] = []
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
        c.on_message = lambda _c, _u, m: got.append(m.payload)
        c.connect("127.0.0.1", broker.port)
        c.subscribe("demo/t", qos=1)
        c.loop_start()
        try:
            for _ in range(100):
                c.publish("demo/t", b"hello", qos=1).wait_for_publish(2)
                if got:
                    break
        finally:
            c.loop_stop()
            c.disconnect()
        assert got and got[0] == b"hello"
        port = broker.port
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        pass


def _results(n: int, swap_at: int, *, skip: int | None = None) -> list[dict[str, Any]]:
    rows = []
    for i in range(n):
        if i == skip:
            continue
        rows.append({
            "seq": i, "frame": i, "capture_ts": 100.0 + i / 30,
            "model": {"name": "m", "version": "1.0.0" if i < swap_at else "1.1.0"},
            "latency_ms": {"preprocess": 0.1 + (i % 7) * 0.01, "inference": 0.3,
                           "postprocess": 0.2, "capture_to_result": 0.8},
        })  # fmt: skip
    return rows


def test_swap_accounting_finds_the_swap_and_any_gap() -> None:
    ok = swap_accounting(_results(90, 40))
    assert ok["swapped"] and ok["seq_gaps"] == 0 and ok["versions"] == ["1.0.0", "1.1.0"]
    assert ok["stall_vs_frame_gap"] == pytest.approx(1.0, abs=0.01)
    assert ok["frames_around_swap"] == [37, 38, 39, 40, 41, 42]
    lost = swap_accounting(_results(90, 40, skip=40))
    assert lost["seq_gaps"] == 1 and lost["stall_vs_frame_gap"] == pytest.approx(2.0, abs=0.01)
    assert not swap_accounting(_results(30, 99))["swapped"]


def test_plots_are_real_pngs_and_the_report_names_the_swap(tmp_path: Path) -> None:
    rows = _results(120, 60)
    values = {s: [r["latency_ms"][s] for r in rows] for s in rows[0]["latency_ms"]}
    histogram_png(values, tmp_path / "h.png")
    fps_png([r["capture_ts"] for r in rows], rows[60]["capture_ts"], tmp_path / "f.png", "swap")
    h, f = cv2.imread(str(tmp_path / "h.png")), cv2.imread(str(tmp_path / "f.png"))
    assert h is not None and h.shape[0] == 4 * f.shape[0]  # one panel per stage
    # the swap line is drawn in red somewhere in the fps plot
    red = (f[:, :, 2] > 180) & (f[:, :, 0] < 90) & (f[:, :, 1] < 90)
    assert red.any()
    # bars: the histogram is not blank
    assert (h < 250).mean() > 0.01

    class Live:
        broker = "mosquitto on mqtt://127.0.0.1:1"
        results = rows
        swap_ts = rows[60]["capture_ts"]
        summary: ClassVar[dict[str, int]] = {"dropped": 0, "inference_errors": 0, "swaps": 1}
        agent_exit = 0
        rollout_output = "rollout of m 1.1.0 to demo: 1 devices committed"
        events: ClassVar[list[dict[str, Any]]] = [
            {"kind": "shadow_completed", "details": {"agreement": 0.983, "frames": 60}}
        ]
        samples: ClassVar[list[dict[str, Any]]] = [
            {"file": "images/demo-1-abc.jpg", "reasons": ["low_confidence"],
             "model": {"version": "1.0.0"}, "output": {"class": 7, "score": 0.61}}
        ]  # fmt: skip

    rep = {
        "size_bytes": {"original": 100_000, "converted": 26_000},
        "latency_ms": {"original": 0.2, "converted": 0.1},
        "accuracy": {"original": 99.0, "converted": 98.9},
    }
    path = write_report(tmp_path, live=Live(), quantize_reports={"int8": rep}, v2_note="v2")
    text = path.read_text()
    assert "| int8 | 25.4 | 0.1000 | 98.90 |" in text
    assert "sequence gaps: 0" in text and "1.0x the median frame gap" in text
    assert "dropped frames: 0" in text and "1 devices committed" in text
    assert "agreement 0.983 with the serving model over 60 frames" in text
    assert "| ![](samples/images/demo-1-abc.jpg) | low_confidence | 1.0.0 | 7 | 0.61 |" in text
    assert (tmp_path / "latency-histograms.png").exists() and (tmp_path / "fps.png").exists()
    json.dumps(swap_accounting(rows))  # the accounting is plain data
    assert np.isfinite(h).all()


def test_bar_chart_and_the_benchmark_plots(tmp_path: Path) -> None:
    from benchmarks.plots import plot_all

    bars_png("t", [("a", 1.0), ("b", 0.5), ("c", None)], tmp_path / "b.png", ref=0.75)
    img = cv2.imread(str(tmp_path / "b.png"))
    assert img is not None and img.shape[0] == 40 + 3 * 22 + 36
    (tmp_path / "prune.json").write_text(json.dumps({
        "when": "now", "latency": [{"model": "m", "variant": "30%", "latency_ratio": 0.7}],
    }))  # fmt: skip
    assert [p.name for p in plot_all(tmp_path)] == ["prune.png"]
    assert cv2.imread(str(tmp_path / "prune.png")) is not None
