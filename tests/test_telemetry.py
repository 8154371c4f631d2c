"""SystemProbe on fake sysfs/procfs trees; Monitor on real numpy data."""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest

from edge_agent.errors import ConfigError
from edge_agent.fleet.telemetry import (
    RPI_THROTTLED,
    SYSTEM_KEYS,
    TEGRA_RELEASE,
    Monitor,
    SystemProbe,
    channel_axis,
)
from edge_agent.model.postprocess import NONFINITE

# --- fake trees -------------------------------------------------------------------------------


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def thermal_zone(
    root: Path,
    n: int,
    kind: str,
    temp_mc: int | None,
    *,
    trips: Sequence[tuple[str, int]] = (),
    base: str = "sys/class/thermal",
) -> None:
    zone = root / base / f"thermal_zone{n}"
    write(zone / "type", kind + "\n")
    if temp_mc is not None:
        write(zone / "temp", f"{temp_mc}\n")
    for i, (trip_type, trip_mc) in enumerate(trips):
        write(zone / f"trip_point_{i}_type", trip_type + "\n")
        write(zone / f"trip_point_{i}_temp", f"{trip_mc}\n")


def rpi_throttled(root: Path, text: str) -> None:
    write(root / "sys/devices/platform/soc/soc:firmware/get_throttled", text)


def probe(root: Path) -> SystemProbe:
    return SystemProbe(state_dir=root / "state", root=root)


# --- SystemProbe ------------------------------------------------------------------------------


def test_empty_root_gives_none_for_board_values_and_real_psutil_numbers(tmp_path: Path) -> None:
    sample = probe(tmp_path).sample()
    assert tuple(sample) == SYSTEM_KEYS
    assert set(sample) == {
        "cpu_percent",
        "load",
        "ram_percent",
        "ram_used_mb",
        "disk_percent",
        "cpu_temp_c",
        "throttled",
        "process_rss_mb",
    }
    assert sample["cpu_temp_c"] is None
    assert sample["throttled"] is None
    assert isinstance(sample["cpu_percent"], float) and 0.0 <= sample["cpu_percent"] <= 100.0
    assert isinstance(sample["load"], list) and len(sample["load"]) == 3
    assert all(isinstance(v, float) and v >= 0 for v in sample["load"])
    assert 0.0 < sample["ram_percent"] <= 100.0
    total_mb = psutil.virtual_memory().total / 2**20
    assert 0.0 < sample["ram_used_mb"] < total_mb
    assert 0.0 < sample["disk_percent"] <= 100.0
    # this test process certainly holds numpy: more than 10 MB, less than all of RAM
    assert 10.0 < sample["process_rss_mb"] < total_mb


def test_cpu_percent_is_the_interval_since_the_last_sample(tmp_path: Path) -> None:
    p = probe(tmp_path)
    p.sample()
    x = np.random.default_rng(0).random(2_000_000)
    for _ in range(40):  # ~0.2 s of busy CPU
        x = np.sqrt(x + 1.0)
    busy = p.sample()["cpu_percent"]
    assert isinstance(busy, float) and 0.0 < busy <= 100.0


def test_disk_percent_walks_up_to_an_existing_parent(tmp_path: Path) -> None:
    missing = tmp_path / "not" / "yet" / "created"
    sample = SystemProbe(state_dir=missing, root=tmp_path).sample()
    assert not missing.exists()
    assert sample["disk_percent"] == pytest.approx(psutil.disk_usage(str(tmp_path)).percent, abs=1)


def test_cpu_thermal_zone_is_preferred_and_millidegrees_converted(tmp_path: Path) -> None:
    thermal_zone(tmp_path, 0, "gpu-thermal", 71000)
    thermal_zone(tmp_path, 1, "cpu-thermal", 48312)
    thermal_zone(tmp_path, 2, "ddr-thermal", 90000)
    assert probe(tmp_path).sample()["cpu_temp_c"] == pytest.approx(48.312)


def test_cpu_zone_preference_follows_the_documented_order(tmp_path: Path) -> None:
    thermal_zone(tmp_path, 0, "soc_thermal", 60000)
    thermal_zone(tmp_path, 1, "x86_pkg_temp", 52000)
    thermal_zone(tmp_path, 2, "acpitz", 30000)
    assert probe(tmp_path).sample()["cpu_temp_c"] == pytest.approx(52.0)


def test_hottest_readable_zone_when_none_is_a_cpu(tmp_path: Path) -> None:
    thermal_zone(tmp_path, 0, "acpitz", 41000)
    thermal_zone(tmp_path, 1, "iwlwifi_1", 55500)
    thermal_zone(tmp_path, 2, "cpu-thermal", None)  # a CPU zone, but its temp is unreadable
    thermal_zone(tmp_path, 3, "sensor-off", -274000)  # "no value" sentinel, ignored
    write(tmp_path / "sys/class/thermal/thermal_zone4/temp", "garbage\n")
    assert probe(tmp_path).sample()["cpu_temp_c"] == pytest.approx(55.5)


def test_raspberry_pi_get_throttled_decoded(tmp_path: Path) -> None:
    rpi_throttled(tmp_path, "0x50005\n")
    assert probe(tmp_path).sample()["throttled"] == {
        "raw": "0x50005",
        "under_voltage": True,  # bit 0
        "freq_capped": False,
        "throttled": True,  # bit 2
        "soft_temp_limit": False,
        "under_voltage_occurred": True,  # bit 16
        "freq_capped_occurred": False,
        "throttled_occurred": True,  # bit 18
        "soft_temp_limit_occurred": False,
        "source": "raspberry-pi",
    }


def test_raspberry_pi_firmware_spelling_without_0x_is_the_same_word(tmp_path: Path) -> None:
    rpi_throttled(tmp_path, "8000a\n")  # the kernel driver prints "%x": no prefix
    t = probe(tmp_path).sample()["throttled"]
    assert t["raw"] == "0x8000a"
    assert t["freq_capped"] and t["soft_temp_limit"] and t["soft_temp_limit_occurred"]
    assert not t["under_voltage"] and not t["throttled"] and not t["under_voltage_occurred"]


def test_raspberry_pi_zero_word_is_all_false(tmp_path: Path) -> None:
    rpi_throttled(tmp_path, "0x0\n")
    t = probe(tmp_path).sample()["throttled"]
    assert t["raw"] == "0x0" and t["source"] == "raspberry-pi"
    flags = {k: v for k, v in t.items() if k not in ("raw", "source")}
    assert len(flags) == 8 and not any(flags.values())


def test_unparsable_get_throttled_is_none_and_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rpi_throttled(tmp_path, "not hex\n")
    p = probe(tmp_path)
    with caplog.at_level(logging.DEBUG, logger="edge_agent.fleet.telemetry"):
        first, second = p.sample(), p.sample()
    assert first["throttled"] is None and second["throttled"] is None
    assert first["cpu_percent"] is not None  # one failing probe does not spoil the others
    logged = [r for r in caplog.records if "throttled" in r.getMessage()]
    assert len(logged) == 1 and logged[0].levelno == logging.DEBUG


def fake_vcgencmd(bin_dir: Path, script: str, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A ``vcgencmd`` executable first on PATH; it appends a line to ``calls`` when run."""
    if any(Path("/", p).exists() for p in (RPI_THROTTLED, TEGRA_RELEASE)):
        pytest.skip("this machine has a real get_throttled / Jetson release file")
    calls = bin_dir / "calls"
    exe = bin_dir / "vcgencmd"
    write(exe, f'#!/bin/sh\necho "$@" >> "{calls}"\n{script}\n')
    exe.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    return calls


def test_vcgencmd_is_the_fallback_on_the_real_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = fake_vcgencmd(tmp_path, "echo throttled=0x50005", monkeypatch)
    t = SystemProbe(state_dir=tmp_path, root=Path("/")).sample()["throttled"]
    assert t is not None and t["raw"] == "0x50005" and t["under_voltage"] and t["throttled"]
    assert calls.read_text().split() == ["get_throttled"]


def test_vcgencmd_failing_is_none_and_not_run_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = fake_vcgencmd(tmp_path, "echo 'VCHI initialization failed' >&2; exit 1", monkeypatch)
    p = SystemProbe(state_dir=tmp_path, root=Path("/"))
    assert p.sample()["throttled"] is None and p.sample()["throttled"] is None
    assert len(calls.read_text().splitlines()) == 1


def test_vcgencmd_is_not_used_for_a_fake_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = fake_vcgencmd(tmp_path / "bin", "echo throttled=0x5", monkeypatch)
    assert probe(tmp_path).sample()["throttled"] is None
    assert not calls.exists()


def jetson(root: Path, cpu_mc: int, gpu_mc: int) -> None:
    write(root / "etc/nv_tegra_release", "# R32 (release), REVISION: 7.1\n")
    base = "sys/devices/virtual/thermal"
    # an "active" (fan) trip below the temperature must not count: only passive ones do
    trips_cpu = [("active", 50000), ("passive", 99000), ("passive", 97000), ("critical", 102000)]
    thermal_zone(root, 0, "CPU-therm", cpu_mc, trips=trips_cpu, base=base)
    thermal_zone(root, 1, "GPU-therm", gpu_mc, trips=[("passive", 97000)], base=base)
    thermal_zone(root, 2, "PMIC-Die", 100000, trips=[("critical", 120000)], base=base)


def test_jetson_zone_over_its_lowest_passive_trip_is_throttled(tmp_path: Path) -> None:
    jetson(tmp_path, cpu_mc=97000, gpu_mc=61000)  # exactly at the lowest passive trip counts
    sample = probe(tmp_path).sample()
    assert sample["throttled"] == {
        "source": "jetson",
        "throttled": True,
        "zones_over_passive": ["CPU-therm"],
    }
    # no /sys/class/thermal in this tree: the temperature comes from the virtual zones
    assert sample["cpu_temp_c"] == pytest.approx(97.0)


def test_jetson_under_passive_trips_is_not_throttled(tmp_path: Path) -> None:
    jetson(tmp_path, cpu_mc=96900, gpu_mc=61000)  # above the active trip, below both passive
    t = probe(tmp_path).sample()["throttled"]
    assert t == {"source": "jetson", "throttled": False, "zones_over_passive": []}


def test_jetson_without_readable_passive_trips_is_none(tmp_path: Path) -> None:
    write(tmp_path / "etc/nv_tegra_release", "# R35\n")
    thermal_zone(tmp_path, 0, "CPU-therm", 99000, base="sys/devices/virtual/thermal")
    assert probe(tmp_path).sample()["throttled"] is None


# --- Monitor ----------------------------------------------------------------------------------

CAL_MEAN = [0.2, 0.5, -0.1]
CAL_STD = [0.3, 0.1, 0.2]
UNIFORM10 = [0.1] * 10


def calibration(histogram: list[float] | None = UNIFORM10) -> dict[str, Any]:
    """What converters/convert.py:calibration_statistics stores in the manifest."""
    stats: dict[str, Any] = {
        "samples": 200,
        "inputs": {"input": {"channel_axis": 1, "mean": CAL_MEAN, "std": CAL_STD}},
        "outputs": {"logits": {"min": 0.0, "max": 1.0, "mean": 0.1, "std": 0.2, "mean_top1": 0.93}},
    }
    if histogram is not None:
        stats["class_histogram"] = histogram
    return stats


def frame(rng: np.random.Generator, shift: Mapping[int, float] | None = None) -> np.ndarray:
    """One 1x3x32x32 float32 NCHW input drawn from the calibration distribution."""
    mean = np.array(CAL_MEAN)[None, :, None, None]
    std = np.array(CAL_STD)[None, :, None, None]
    x = rng.normal(size=(1, 3, 32, 32)) * std + mean
    for c, delta in (shift or {}).items():
        x[:, c] += delta
    return x.astype(np.float32)


def classified(cls: int | None, score: float | None = 0.9) -> dict[str, Any]:
    return {"kind": "classification", "top": [], "class": cls, "label": None, "score": score}


def test_inputs_matching_calibration_do_not_drift() -> None:
    rng = np.random.default_rng(1)
    m = Monitor(calibration_stats=calibration(), every=1)
    for i in range(30):
        m.observe({"input": frame(rng)}, classified(i % 10))
    snap = m.snapshot()
    assert snap["samples"] == 30
    stats = snap["input"]["input"]
    assert stats["mean"] == pytest.approx(CAL_MEAN, abs=0.01)
    assert stats["std"] == pytest.approx(CAL_STD, rel=0.02)
    drift = snap["drift"]
    assert drift["input"] < 0.2  # 30 * 1024 pixels a channel: the mean is known to ~0.006 std
    assert drift["output"] == 0.0
    assert drift["threshold"] == 3.0 and drift["output_threshold"] == 0.5
    assert drift["drifted"] is False and drift["reasons"] == []


def test_one_channel_shifted_drifts_and_names_the_channel() -> None:
    rng = np.random.default_rng(2)
    m = Monitor(calibration_stats=calibration(), every=1)
    for i in range(30):
        m.observe({"input": frame(rng, {1: 0.5})}, classified(i % 10))
    drift = m.snapshot()["drift"]
    assert drift["input"] == pytest.approx(0.5 / CAL_STD[1], rel=0.05)  # ~5 std
    assert drift["drifted"] is True
    assert len(drift["reasons"]) == 1
    reason = drift["reasons"][0]
    assert "'input' channel 1" in reason and "> 3" in reason


def test_brightness_shift_on_a_wide_channel_stays_under_threshold() -> None:
    rng = np.random.default_rng(3)
    m = Monitor(calibration_stats=calibration(), every=1)
    for i in range(30):
        m.observe({"input": frame(rng, {0: 0.5})}, classified(i % 10))  # 0.5 / 0.3 = 1.7 std
    drift = m.snapshot()["drift"]
    assert drift["input"] == pytest.approx(0.5 / CAL_STD[0], rel=0.05)
    assert drift["drifted"] is False and drift["reasons"] == []


def test_class_outputs_matching_calibration_histogram_have_small_output_drift() -> None:
    rng = np.random.default_rng(4)
    m = Monitor(calibration_stats=calibration(), every=1)
    x = frame(rng)
    for cls in rng.integers(0, 10, size=500).tolist():
        m.observe({"input": x}, classified(cls, 0.8))
    snap = m.snapshot()
    hist = snap["output"]["class_histogram"]
    assert len(hist) == 10 and sum(hist) == pytest.approx(1.0, abs=1e-5)
    assert snap["output"]["mean_top1"] == pytest.approx(0.8)
    assert snap["output"]["errors"] == 0
    assert snap["drift"]["output"] < 0.1
    assert not any("class histogram" in r for r in snap["drift"]["reasons"])


def test_all_predictions_one_class_against_uniform_calibration_drifts() -> None:
    rng = np.random.default_rng(5)
    m = Monitor(calibration_stats=calibration(), every=1)
    for _ in range(20):
        m.observe({"input": frame(rng)}, classified(7))
    snap = m.snapshot()
    assert snap["output"]["class_histogram"] == [0.0] * 7 + [1.0, 0.0, 0.0]
    drift = snap["drift"]
    assert drift["output"] == pytest.approx(0.9)  # 0.5 * (0.9 + 9 * 0.1)
    assert drift["drifted"] is True
    assert drift["reasons"] == ["class histogram: total variation 0.900 > 0.5"]


def test_shorter_histogram_is_padded_with_zeros() -> None:
    rng = np.random.default_rng(6)
    m = Monitor(calibration_stats=calibration([0.5, 0.5]), every=1)
    for i in range(10):
        m.observe({"input": frame(rng)}, classified(2 + i % 2))  # classes 2, 3: unseen in cal
    snap = m.snapshot()
    assert snap["output"]["class_histogram"] == [0.0, 0.0, 0.5, 0.5]
    assert snap["drift"]["output"] == pytest.approx(1.0)


def test_too_few_samples_are_not_judged() -> None:
    rng = np.random.default_rng(7)
    m = Monitor(calibration_stats=calibration(), every=1)
    for _ in range(4):
        m.observe({"input": frame(rng, {1: 5.0})}, classified(7))  # wildly off, but 4 frames
    drift = m.snapshot()["drift"]
    assert drift["drifted"] is False
    assert drift["input"] is None and drift["output"] is None
    assert len(drift["reasons"]) == 1 and drift["reasons"][0].startswith("too few samples")


def test_every_10_samples_exactly_one_call_in_ten() -> None:
    x = np.zeros((1, 3, 4, 4), np.float32)
    m = Monitor(calibration_stats=None, every=10)
    m.observe({"input": x}, classified(0))
    assert m.snapshot()["samples"] == 1  # the first call (call 0) is sampled
    for _ in range(9):
        m.observe({"input": x}, classified(0))
    assert m.snapshot()["samples"] == 0  # calls 1-9
    for _ in range(1000):
        m.observe({"input": x}, classified(0))
    assert m.snapshot()["samples"] == 100  # calls 10, 20, ..., 1000


@pytest.fixture
def frequent_thread_switches() -> Iterator[None]:
    """Switch threads every microsecond instead of every 5 ms: races show up, not hide."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(before)


@pytest.mark.usefixtures("frequent_thread_switches")
def test_four_threads_observing_concurrently_lose_nothing() -> None:
    rng = np.random.default_rng(8)
    x = frame(rng)[:, :, :8, :8]
    m = Monitor(calibration_stats=calibration(), every=10)
    start = threading.Barrier(4)
    failures: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            start.wait()
            for i in range(1000):
                m.observe({"input": x}, classified((k + i) % 10))
        except BaseException as exc:  # pragma: no cover - reported by the assert below
            failures.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures
    snap = m.snapshot()
    assert snap["samples"] == 400
    assert sum(snap["output"]["class_histogram"]) == pytest.approx(1.0, abs=1e-5)
    expected = x.astype(np.float64).mean(axis=(0, 2, 3))
    assert snap["input"]["input"]["mean"] == pytest.approx(expected.tolist(), abs=1e-5)


@pytest.mark.usefixtures("frequent_thread_switches")
def test_snapshots_taken_while_threads_observe_lose_no_frame() -> None:
    x = np.ones((1, 3, 2, 2), np.float32)
    m = Monitor(calibration_stats=None, every=1)
    done = threading.Event()
    seen: list[int] = []
    errors_seen: list[int] = []

    def observer() -> None:
        for i in range(1000):
            out = classified(i % 3)
            m.observe({"input": x}, {**out, "error": NONFINITE} if i % 5 == 0 else out)

    def reader() -> None:
        while not done.is_set():
            snap = m.snapshot()
            seen.append(snap["samples"])
            errors_seen.append(snap["output"]["errors"] if snap["output"] else 0)

    threads = [threading.Thread(target=observer) for _ in range(4)]
    watcher = threading.Thread(target=reader)
    watcher.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    watcher.join()
    final = m.snapshot()
    assert len(seen) > 1  # the reader really ran while the observers did
    assert sum(seen) + final["samples"] == 4000
    assert sum(errors_seen) + (final["output"]["errors"] if final["output"] else 0) == 800


def test_snapshot_reset_starts_a_new_interval() -> None:
    rng = np.random.default_rng(9)
    m = Monitor(calibration_stats=calibration(), every=1)
    for i in range(6):
        m.observe({"input": frame(rng)}, classified(i))
    kept = m.snapshot(reset=False)
    assert m.snapshot(reset=False) == kept and kept["samples"] == 6
    assert m.snapshot(reset=True) == kept
    empty = m.snapshot()
    assert empty["samples"] == 0
    assert empty["input"] is None and empty["output"] is None
    assert empty["drift"]["drifted"] is False
    m.observe({"input": frame(rng)}, classified(3))
    after = m.snapshot()
    assert after["samples"] == 1 and after["output"]["class_histogram"][3] == 1.0


def test_error_outputs_are_counted_on_every_call() -> None:
    rng = np.random.default_rng(10)
    m = Monitor(calibration_stats=calibration(), every=10)
    bad = {**classified(None, None), "error": NONFINITE}
    for i in range(20):
        m.observe({"input": frame(rng)}, bad if i % 2 else classified(4))  # odd calls fail
    out = m.snapshot()["output"]
    assert out["errors"] == 10  # although only calls 0 and 10 (both good) were sampled
    assert out["class_histogram"][4] == 1.0
    for _ in range(10):
        m.observe({"input": frame(rng)}, bad)  # call 20 is sampled, and is an error
    snap = m.snapshot()
    assert snap["samples"] == 1 and snap["output"]["errors"] == 10
    assert snap["output"]["class_histogram"] is None  # no class predicted at all
    assert snap["output"]["mean_top1"] is None


def test_non_classification_outputs_give_value_ranges() -> None:
    rng = np.random.default_rng(11)
    m = Monitor(calibration_stats=calibration(), every=1)
    boxes = [rng.normal(size=(1, 84, 50)).astype(np.float32) for _ in range(6)]
    masks = [rng.integers(0, 5, size=(1, 8, 8)).astype(np.int64) for _ in range(6)]
    detection = {"kind": "detection", "detections": []}
    for b, s in zip(boxes, masks):
        m.observe({"input": frame(rng)}, detection, [b, s])
    nan = np.full((1, 84, 50), np.nan, np.float32)  # a failed frame's outputs are skipped
    m.observe({"input": frame(rng)}, {**detection, "error": NONFINITE}, [nan, masks[0]])
    snap = m.snapshot()
    out = snap["output"]
    assert out["errors"] == 1 and set(out) == {"values", "errors"}
    all_boxes, all_masks = np.stack(boxes), np.stack(masks)
    assert out["values"][0]["min"] == pytest.approx(float(all_boxes.min()), abs=1e-6)
    assert out["values"][0]["max"] == pytest.approx(float(all_boxes.max()), abs=1e-6)
    assert out["values"][0]["mean"] == pytest.approx(float(all_boxes.mean()), abs=1e-6)
    assert out["values"][1] == {
        "min": float(all_masks.min()),
        "max": float(all_masks.max()),
        "mean": round(float(all_masks.mean()), 6),
    }
    assert snap["drift"]["output"] is None  # no class histogram to compare
    assert snap["drift"]["drifted"] is False


def test_without_calibration_stats_drift_is_none_but_stats_are_reported() -> None:
    rng = np.random.default_rng(12)
    m = Monitor(calibration_stats=None, every=1)
    for i in range(10):
        m.observe({"input": frame(rng, {1: 0.5})}, classified(i % 2, 0.6))
    snap = m.snapshot()
    assert snap["drift"] is None
    assert snap["samples"] == 10
    assert snap["input"]["input"]["mean"][1] == pytest.approx(CAL_MEAN[1] + 0.5, abs=0.02)
    assert snap["output"] == {"class_histogram": [0.5, 0.5], "mean_top1": 0.6, "errors": 0}


@pytest.mark.parametrize(
    ("shape", "axis"),
    [((2, 3, 5, 7), 1), ((1, 1, 6, 6), 1), ((1, 6, 6, 3), 3), ((1, 8, 6, 6), 3), ((4, 5), 1)],
)
def test_channel_axis_and_stats_follow_the_converter_rule(
    shape: tuple[int, ...], axis: int
) -> None:
    assert channel_axis(shape) == axis
    x = np.random.default_rng(13).normal(size=shape).astype(np.float32)
    m = Monitor(calibration_stats=None, every=1)
    m.observe({"x": x}, {"kind": "raw", "outputs": {}})
    stats = m.snapshot()["input"]["x"]
    red = tuple(a for a in range(x.ndim) if a != axis)
    assert stats["mean"] == pytest.approx(x.astype(np.float64).mean(axis=red).tolist(), abs=1e-5)
    assert stats["std"] == pytest.approx(x.astype(np.float64).std(axis=red).tolist(), abs=1e-5)


def test_uint8_inputs_do_not_overflow_and_floats_are_rounded() -> None:
    m = Monitor(calibration_stats=None, every=1)
    x = np.full((1, 4, 4, 3), 200, np.uint8)
    x[..., 2] = [[0, 1, 1, 1]] * 4  # channel 2: mean 0.75
    m.observe({"img": x}, classified(0, 1 / 3))
    snap = m.snapshot()
    assert snap["input"]["img"]["mean"] == [200.0, 200.0, 0.75]
    assert snap["input"]["img"]["std"] == pytest.approx([0.0, 0.0, 0.433013], abs=1e-6)
    assert snap["output"]["mean_top1"] == 0.333333


@pytest.mark.parametrize(
    "kwargs",
    [{"every": 0}, {"every": 1.5}, {"drift_threshold": 0.0}, {"output_drift_threshold": -1}],
)
def test_bad_settings_are_config_errors(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match="monitoring: "):
        Monitor(calibration_stats=None, **kwargs)


def test_non_finite_and_empty_inputs_give_none_not_warnings() -> None:
    rng = np.random.default_rng(14)
    m = Monitor(calibration_stats=calibration(), every=1)
    for _ in range(6):
        x = frame(rng)
        x[0, 2, 0, 0] = np.inf  # channel 2 is broken; 0 and 1 are fine
        m.observe({"input": x, "empty": np.zeros((1, 3, 0, 0), np.float32)}, classified(1))
    snap = m.snapshot()  # filterwarnings=error: an overflow or inf - inf warning fails here
    assert set(snap["input"]) == {"input"}  # a zero-size feed has no statistics
    assert snap["input"]["input"]["mean"][2] is None and snap["input"]["input"]["std"][2] is None
    assert snap["input"]["input"]["mean"][:2] == pytest.approx(CAL_MEAN[:2], abs=0.02)
    assert snap["drift"]["input"] is not None and snap["drift"]["input"] < 1.0


def test_malformed_calibration_parts_are_ignored_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    stats = calibration(histogram=None)
    stats["inputs"]["input"] = {"channel_axis": 1, "mean": [0.1, 0.2], "std": [0.3]}
    stats["class_histogram"] = ["a", "b"]
    with caplog.at_level(logging.WARNING, logger="edge_agent.fleet.telemetry"):
        m = Monitor(calibration_stats=stats, every=1)
    assert len(caplog.records) == 2
    rng = np.random.default_rng(15)
    for i in range(6):
        m.observe({"input": frame(rng, {0: 9.0})}, classified(i % 2))
    drift = m.snapshot()["drift"]
    assert drift == {
        "input": None,
        "output": None,
        "threshold": 3.0,
        "output_threshold": 0.5,
        "drifted": False,
        "reasons": [],
    }


def test_channel_count_differing_from_calibration_is_not_compared() -> None:
    m = Monitor(calibration_stats=calibration(), every=1)
    gray = np.full((1, 1, 8, 8), 7.0, np.float32)  # 1 channel live, 3 in calibration
    for i in range(6):
        m.observe({"input": gray}, classified(i % 10))
    snap = m.snapshot()
    assert snap["input"]["input"] == {"mean": [7.0], "std": [0.0]}
    assert snap["drift"]["input"] is None and not snap["drift"]["drifted"]


def test_prometheus_exposition_types_counters_gauges_and_a_latency_summary() -> None:
    import urllib.error
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    from edge_agent.fleet.prometheus import PrometheusServer

    latest: dict[str, Any] = {}
    server = PrometheusServer(lambda: latest, port=0)
    server.start()
    try:

        def scrape() -> str:
            url = f"http://127.0.0.1:{server.port}/metrics"
            with urllib.request.urlopen(url, timeout=5) as r:
                return str(r.read().decode())

        assert "edge_agent_" not in scrape()  # nothing before the first telemetry
        latest.update(
            device="cam-1",
            model={"name": "digits", "version": "1.2.0"},
            uptime_s=12.5,
            spool_depth=3,
            pipeline={
                "fps": 29.5,
                "results": 370,
                "dropped": 4,
                "inference_errors": 1,
                "latency_ms": {"inference": {"p50": 1.5, "p95": 2.5, "p99": None}},
            },
            system={"cpu_percent": 40.0, "cpu_temp_c": None},
        )
        families = {f.name: f for f in text_string_to_metric_families(scrape())}
    finally:
        server.stop()
    assert families["edge_agent_fps"].type == "gauge"
    assert families["edge_agent_results"].type == "counter"
    assert families["edge_agent_dropped"].type == "counter"
    assert families["edge_agent_inference_errors"].type == "counter"
    assert "edge_agent_cpu_temp_celsius" not in families  # unknown values are left out
    summary = families["edge_agent_latency_ms"]
    assert summary.type == "summary"
    quantiles = {s.labels["quantile"]: s.value for s in summary.samples}
    assert quantiles == {"0.5": 1.5, "0.95": 2.5}
    (results,) = families["edge_agent_results"].samples
    assert results.name == "edge_agent_results_total" and results.value == 370
    assert results.labels == {"device": "cam-1", "model": "digits", "version": "1.2.0"}
