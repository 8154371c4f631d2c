"""The ``system`` and ``monitoring`` blocks of the agent's MQTT telemetry payload
(``edge/<device>/telemetry``, schema in :mod:`edge_agent.fleet.protocol`).

:class:`SystemProbe` (``system``): what the board is doing, read on each telemetry tick.

- ``cpu_percent``: all-CPU utilisation (0-100) since the previous :meth:`SystemProbe.sample`
  (the constructor primes it, so the first sample covers construction to first call), computed
  from ``psutil.cpu_times()`` exactly as ``psutil.cpu_percent(interval=None)`` does but with the
  probe's own "last call", so other psutil callers and threads do not shorten its interval.
- ``load``: the 1, 5 and 15 minute load averages (runnable + waiting tasks; compare with the
  core count).
- ``ram_percent``, ``ram_used_mb``: memory that cannot be reclaimed, ``total - available``
  (the same quantity psutil's percent is computed from; page cache is not "used").
- ``disk_percent``: how full the filesystem holding the agent's state directory is.
- ``cpu_temp_c``: °C from ``/sys/class/thermal/thermal_zone*/temp`` (millidegrees): the zone
  whose ``type`` is a CPU sensor (:data:`CPU_ZONE_TYPES`, in that order of preference), else the
  hottest zone; psutil's sensors when no zone is readable (real root only).
- ``throttled``: Raspberry Pi: the firmware's ``get_throttled`` bits (sysfs, else
  ``vcgencmd get_throttled``): ``under_voltage``, ``freq_capped`` (ARM clock capped),
  ``throttled``, ``soft_temp_limit`` now, and the same four ``*_occurred`` since boot, plus the
  ``raw`` hex word. Jetson: ``throttled`` is true when a thermal zone is at or above its lowest
  ``passive`` trip point (where the kernel starts cutting clocks); ``zones_over_passive`` names
  them. None on other boards.
- ``process_rss_mb``: the agent process's resident memory.

Every key is always present; a value that cannot be read is None (logged once at debug level),
never an exception. Every sysfs/procfs path is read under ``root``: tests point it at a fake tree.

:class:`Monitor` (``monitoring``): is the model still seeing the data it was calibrated on?
:meth:`Monitor.observe` runs after every frame but samples only every ``every``-th call; per
telemetry interval :meth:`Monitor.snapshot` reports:

- ``samples``: frames sampled in the interval.
- ``input``: per model input, the per-channel ``mean`` and ``std`` of the preprocessed tensor over
  every element of the sampled frames (channel axis: 1 for a 4-D input whose dim 1 is 1 or 3,
  i.e. NCHW, else the last axis; the rule, and the numbers, of the converter's calibration
  statistics).
- ``output``: classification: ``class_histogram`` (fraction of sampled frames predicting each
  class, by class index, at least as long as the calibration histogram) and ``mean_top1`` (mean
  top-1 score: falling confidence is an early sign of drift). Other kinds: ``values`` = per raw
  output index, its ``min``, ``max`` and ``mean`` over the sampled frames. Both carry ``errors``:
  frames of the interval whose result had an ``error`` (non-finite output), counted on every
  call, not only sampled ones.
- ``drift`` (None without calibration statistics): ``input`` = the largest, over inputs and
  channels, of ``|live mean - calibration mean| / calibration std``: how many calibration standard
  deviations a channel's mean has moved (a brightness or white-balance change shows up here);
  ``output`` = total variation distance between the live and calibration class histograms
  (0 = same distribution, 1 = disjoint; ~0.9 when every frame predicts one class of ten
  balanced ones); ``threshold`` / ``output_threshold`` what they are compared with,
  ``drifted`` whether either is above its threshold, and ``reasons``, one line per breach.
  Fewer than :data:`MIN_DRIFT_SAMPLES` sampled frames are not judged (values None, reason
  "too few samples").

Cost, measured (``timeit``, best of 5-7 runs) on one core of an x86-64 AMD EPYC server, numpy
2.4, a 1x3x256x256 float32 NCHW feed and a classification result: a call that skips ~0.45 µs
(the lock, a counter, an ``"error" in output`` test); a call that samples ~125 µs (two float32
pairwise reductions per channel, sum and sum of squares, ~0.6 ns per element, plus the output
bookkeeping); ~13 µs per frame amortised at ``every=10``. The same feed laid out NHWC (1x256x256x3)
samples in ~190 µs: one transposed copy first. :meth:`Monitor.snapshot` ~65 µs. Not measured on a
Raspberry Pi or Jetson; expect a Cortex-A72 core to be several times slower. The lock is held only
for the counter and to add the reduced per-channel vectors, never during a reduction, so
concurrent inference workers do not queue behind each other's statistics.
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
import subprocess
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from edge_agent.errors import ConfigError

log = logging.getLogger(__name__)

_MB = 1024 * 1024
#: Thermal zone ``type`` values (and psutil sensor names) of the CPU die, best first.
CPU_ZONE_TYPES = (
    "cpu-thermal",
    "cpu_thermal",
    "CPU-therm",
    "x86_pkg_temp",
    "soc_thermal",
    "k10temp",
)
#: psutil.sensors_temperatures() (chip, label) pairs tried first when sysfs has no zone.
_PSUTIL_SENSORS = (
    ("cpu_thermal", ""),
    ("cpu-thermal", ""),
    ("coretemp", "Package id 0"),
    ("k10temp", "Tctl"),
    ("k10temp", "Tdie"),
)
RPI_THROTTLED = Path("sys/devices/platform/soc/soc:firmware/get_throttled")
TEGRA_RELEASE = Path("etc/nv_tegra_release")
_THERMAL_DIRS = (Path("sys/class/thermal"), Path("sys/devices/virtual/thermal"))
_JETSON_THERMAL = Path("sys/devices/virtual/thermal")
#: get_throttled bit -> key (bit + 16: the same condition "has occurred since boot").
_THROTTLE_BITS = {0: "under_voltage", 1: "freq_capped", 2: "throttled", 3: "soft_temp_limit"}
_VCGENCMD_RE = re.compile(r"throttled=(0x[0-9a-fA-F]+)")
_TRIP_RE = re.compile(r"^trip_point_(\d+)_type$")
#: Readings outside this range (°C) are a sensor's "no value" (e.g. -274000 or 0xffff...).
_PLAUSIBLE_C = (-60.0, 200.0)

SYSTEM_KEYS = (
    "cpu_percent",
    "load",
    "ram_percent",
    "ram_used_mb",
    "disk_percent",
    "cpu_temp_c",
    "throttled",
    "process_rss_mb",
)


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8", errors="replace").strip("\x00\n ")
    except OSError:
        return None


def _read_millideg(path: Path) -> float | None:
    text = _read_text(path)
    if text is None:
        return None
    try:
        value = int(text) / 1000.0
    except ValueError:
        return None
    return value if _PLAUSIBLE_C[0] < value < _PLAUSIBLE_C[1] else None


def decode_throttled(value: int) -> dict[str, Any]:
    """The Raspberry Pi firmware's get_throttled word as the ``throttled`` telemetry object."""
    out: dict[str, Any] = {"raw": f"0x{value:x}"}
    for bit, key in _THROTTLE_BITS.items():
        out[key] = bool(value >> bit & 1)
    for bit, key in _THROTTLE_BITS.items():
        out[f"{key}_occurred"] = bool(value >> (bit + 16) & 1)
    out["source"] = "raspberry-pi"
    return out


class SystemProbe:
    """Samples the ``system`` block. Not thread-safe: one caller (the telemetry loop)."""

    def __init__(self, *, state_dir: Path, root: Path = Path("/")) -> None:
        self.state_dir = Path(state_dir)
        self.root = Path(root)
        self._real_root = self.root.resolve() == Path("/").resolve()
        self._logged: set[str] = set()
        self._vcgencmd_ok = True
        self._process: Any = None
        try:
            self._process = psutil.Process()
        except (psutil.Error, OSError) as exc:  # pragma: no cover - psutil always sees itself
            self._failed("process_rss_mb", exc)
        # cpu_percent is this probe's own interval (psutil.cpu_percent(interval=None) keeps its
        # "last call" per thread, or globally in older psutil, shared with every other caller).
        self._cpu_last: tuple[float, float] | None = None
        try:
            self._cpu_last = _cpu_busy_total()  # prime: the first sample() covers init -> sample
        except (psutil.Error, OSError) as exc:  # pragma: no cover
            self._failed("cpu_percent", exc)

    def sample(self) -> dict[str, Any]:
        """Every key of :data:`SYSTEM_KEYS`; None where a value cannot be read."""
        ram = self._probe("ram", self._ram)
        ram_percent, ram_used = ram if ram is not None else (None, None)
        return {
            "cpu_percent": self._probe("cpu_percent", self._cpu_percent),
            "load": self._probe("load", self._load),
            "ram_percent": ram_percent,
            "ram_used_mb": ram_used,
            "disk_percent": self._probe("disk_percent", self._disk_percent),
            "cpu_temp_c": self._probe("cpu_temp_c", self._cpu_temp),
            "throttled": self._probe("throttled", self._throttled),
            "process_rss_mb": self._probe("process_rss_mb", self._rss),
        }

    # --- plumbing ---------------------------------------------------------------------------

    def _failed(self, key: str, why: object) -> None:
        if key not in self._logged:
            self._logged.add(key)
            log.debug("system probe %s unavailable: %s", key, why)

    def _probe(self, key: str, fn: Any) -> Any:
        try:
            value = fn()
        except Exception as exc:  # a probe must never take the telemetry loop down
            self._failed(key, f"{type(exc).__name__}: {exc}")
            return None
        if value is None:
            self._failed(key, "not readable")
        return value

    # --- psutil probes ----------------------------------------------------------------------

    def _cpu_percent(self) -> float:
        busy, total = now = _cpu_busy_total()
        last, self._cpu_last = self._cpu_last, now
        if last is None:
            return 0.0  # psutil's convention for a first, unprimed call
        d_total = total - last[1]
        if d_total <= 0:
            return 0.0  # no clock tick since the last call (psutil returns 0.0 too)
        return round(min(max((busy - last[0]) / d_total * 100.0, 0.0), 100.0), 1)

    @staticmethod
    def _load() -> list[float]:
        return [round(v, 2) for v in os.getloadavg()]

    @staticmethod
    def _ram() -> tuple[float, float]:
        vm = psutil.virtual_memory()
        return round(float(vm.percent), 1), round((vm.total - vm.available) / _MB, 1)

    def _disk_percent(self) -> float:
        path = self.state_dir.absolute()
        while not path.exists() and path != path.parent:
            path = path.parent
        return round(float(psutil.disk_usage(str(path)).percent), 1)

    def _rss(self) -> float | None:
        if self._process is None:
            return None
        return round(self._process.memory_info().rss / _MB, 1)

    # --- temperature ------------------------------------------------------------------------

    def _zones(self, directory: Path) -> list[tuple[str, Path]]:
        """(type, zone dir) of each thermal zone under ``root/directory``, in name order."""
        base = self.root / directory
        try:
            dirs = sorted(base.glob("thermal_zone*"), key=lambda p: _zone_number(p.name))
        except OSError:
            return []
        return [(_read_text(d / "type") or d.name, d) for d in dirs]

    def _cpu_temp(self) -> float | None:
        readings: list[tuple[str, float]] = []
        for directory in _THERMAL_DIRS:
            for kind, zone in self._zones(directory):
                temp = _read_millideg(zone / "temp")
                if temp is not None:
                    readings.append((kind, temp))
            if readings:
                break
        if readings:
            for wanted in CPU_ZONE_TYPES:
                for kind, temp in readings:
                    if kind == wanted:
                        return round(temp, 3)
            return round(max(t for _, t in readings), 3)
        if self._real_root:
            return self._psutil_temp()
        return None

    @staticmethod
    def _psutil_temp() -> float | None:
        sensors_fn = getattr(psutil, "sensors_temperatures", None)
        if sensors_fn is None:
            return None
        sensors = sensors_fn() or {}
        for chip, label in _PSUTIL_SENSORS:
            for entry in sensors.get(chip, ()):
                if not label or entry.label == label:
                    return round(float(entry.current), 2)
        for chip in CPU_ZONE_TYPES:
            for entry in sensors.get(chip, ()):
                return round(float(entry.current), 2)
        currents = [float(e.current) for entries in sensors.values() for e in entries]
        return round(max(currents), 2) if currents else None

    # --- throttling -------------------------------------------------------------------------

    def _throttled(self) -> dict[str, Any] | None:
        text = _read_text(self.root / RPI_THROTTLED)
        if text is not None:
            return decode_throttled(int(text, 16))
        if (self.root / TEGRA_RELEASE).exists():
            return self._jetson_throttled()
        if self._real_root and self._vcgencmd_ok and shutil.which("vcgencmd"):
            return self._vcgencmd()
        return None

    def _vcgencmd(self) -> dict[str, Any] | None:
        try:
            done = subprocess.run(
                ["vcgencmd", "get_throttled"],
                capture_output=True,
                text=True,
                timeout=1.0,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return None  # busy firmware: try again next tick
        except OSError as exc:
            self._vcgencmd_ok = False
            self._failed("throttled", f"vcgencmd: {exc}")
            return None
        match = _VCGENCMD_RE.search(done.stdout)
        if done.returncode != 0 or match is None:
            self._vcgencmd_ok = False  # not a Pi (or no firmware access): stop forking
            self._failed("throttled", f"vcgencmd exit {done.returncode}: {done.stdout.strip()}")
            return None
        return decode_throttled(int(match.group(1), 16))

    def _jetson_throttled(self) -> dict[str, Any] | None:
        over: list[str] = []
        judged = 0
        for kind, zone in self._zones(_JETSON_THERMAL):
            temp = _read_millideg(zone / "temp")
            passive = _lowest_passive_trip(zone)
            if temp is None or passive is None:
                continue
            judged += 1
            if temp >= passive:
                over.append(kind)
        if not judged:
            return None
        return {"source": "jetson", "throttled": bool(over), "zones_over_passive": over}


def _cpu_busy_total() -> tuple[float, float]:
    """(busy, total) CPU seconds since boot, over all CPUs, counted the way psutil.cpu_percent
    does: guest time is already in user/nice on Linux; idle and iowait are not busy."""
    t = psutil.cpu_times()
    total = sum(t) - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0)
    return total - t.idle - getattr(t, "iowait", 0.0), total


def _zone_number(name: str) -> tuple[int, str]:
    digits = name[len("thermal_zone") :]
    return (int(digits), name) if digits.isdigit() else (1 << 30, name)


def _lowest_passive_trip(zone: Path) -> float | None:
    """The lowest ``passive`` trip temperature of a thermal zone, °C (None if it has none)."""
    temps: list[float] = []
    try:
        entries = list(zone.iterdir())
    except OSError:
        return None
    for entry in entries:
        match = _TRIP_RE.match(entry.name)
        if match is None or _read_text(entry) != "passive":
            continue
        temp = _read_millideg(zone / f"trip_point_{match.group(1)}_temp")
        if temp is not None:
            temps.append(temp)
    return min(temps) if temps else None


# --- monitoring -------------------------------------------------------------------------------

#: Sampled frames an interval needs before drift is judged.
MIN_DRIFT_SAMPLES = 5
_STD_FLOOR = 1e-6
#: A class index at or above this is not a class (a corrupt result): not counted.
_MAX_CLASS = 1 << 20


def channel_axis(shape: Sequence[int]) -> int:
    """The channel axis of an input tensor: 1 for NCHW (4-D, dim 1 is 1 or 3), else the last.
    The converter's rule for the calibration statistics."""
    return 1 if len(shape) == 4 and shape[1] in (1, 3) else max(len(shape) - 1, 0)


def _channel_sums(x: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Per-channel sum and sum of squares (float64) and the elements per channel."""
    given = x
    if x.dtype not in (np.float32, np.float64):
        x = x.astype(np.float32)  # uint8/int8 would overflow when squared, float16 too
    if x.ndim == 0:
        x = x.reshape(1)
    # channels first, the rest flattened and contiguous, so both reductions run along rows
    # (numpy's pairwise sum: fast and accurate). A free view for NCHW with N = 1; one copy
    # otherwise (for channels-last, from the 2-D transpose: much faster than via moveaxis).
    c = x.shape[axis]
    if axis in (-1, x.ndim - 1):
        rows = np.ascontiguousarray(x.reshape(-1, c).T)
    else:
        rows = np.ascontiguousarray(np.moveaxis(x, axis, 0).reshape(c, -1))
    # square in place when rows is our copy: a second large temporary costs more than the maths
    # (fresh pages from the allocator each call)
    owned = not np.may_share_memory(rows, given)
    with np.errstate(all="ignore"):
        s = rows.sum(axis=1).astype(np.float64)
        sq = np.square(rows, out=rows if owned else None).sum(axis=1).astype(np.float64)
    return s, sq, int(rows.shape[1])


def _r(value: float | None) -> float | None:
    if value is None:
        return None
    value = float(value)
    return round(value, 6) if math.isfinite(value) else None


class _InputAcc:
    __slots__ = ("n", "sq", "sum")

    def __init__(self, s: np.ndarray, sq: np.ndarray, n: int) -> None:
        self.sum, self.sq, self.n = s, sq, n


class _ValueAcc:
    __slots__ = ("max", "min", "n", "sum")

    def __init__(self, mn: float, mx: float, s: float, n: int) -> None:
        self.min, self.max, self.sum, self.n = mn, mx, s, n


class Monitor:
    """Input and output statistics of the model in production, and drift against the
    calibration statistics from the bundle manifest. :meth:`observe` is thread-safe."""

    def __init__(
        self,
        *,
        calibration_stats: Mapping[str, Any] | None,
        every: int = 10,
        drift_threshold: float = 3.0,
        output_drift_threshold: float = 0.5,
    ) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ConfigError(f"monitoring: every = {every!r}: must be an integer >= 1")
        for name, value in (
            ("drift_threshold", drift_threshold),
            ("output_drift_threshold", output_drift_threshold),
        ):
            if not math.isfinite(value) or value <= 0:
                raise ConfigError(f"monitoring: {name} = {value!r}: must be a number > 0")
        self.every = every
        self.drift_threshold = float(drift_threshold)
        self.output_drift_threshold = float(output_drift_threshold)
        self.calibration_stats = calibration_stats
        self._cal_inputs, self._cal_hist = _parse_calibration(calibration_stats)
        self._lock = threading.Lock()
        self._calls = 0
        self._logged: set[str] = set()
        self._reset()

    def _reset(self) -> None:
        self._samples = 0
        self._errors = 0
        self._kind: str | None = None
        self._inputs: dict[str, _InputAcc] = {}
        self._classes: dict[int, int] = {}
        self._score_sum = 0.0
        self._score_n = 0
        self._values: dict[int, _ValueAcc] = {}

    def _log_once(self, key: str, message: str, *args: object) -> None:
        if key not in self._logged:
            self._logged.add(key)
            log.debug(message, *args)

    # --- hot path ---------------------------------------------------------------------------

    def observe(
        self,
        feeds: Mapping[str, np.ndarray],
        output: Mapping[str, Any],
        raw_outputs: Sequence[np.ndarray] | None = None,
    ) -> None:
        """Account one frame: ``feeds`` the preprocessed inputs, ``output`` the postprocessed
        result, ``raw_outputs`` the model's outputs. Does real work on every ``every``-th call."""
        error = "error" in output
        with self._lock:
            sampled = self._calls % self.every == 0
            self._calls += 1
            if error:
                self._errors += 1
                self._kind = output.get("kind")
            if not sampled:
                return
        # the reductions run outside the lock: concurrent workers do not wait for each other
        inputs: dict[str, tuple[np.ndarray, np.ndarray, int]] = {}
        for name, feed in feeds.items():
            try:
                x = np.asarray(feed)
                if x.size:
                    inputs[name] = _channel_sums(x, channel_axis(x.shape))
            except (TypeError, ValueError) as exc:
                self._log_once(f"input:{name}", "monitoring: input %r skipped: %s", name, exc)
        kind = output.get("kind")
        cls: int | None = None
        score: float | None = None
        values: list[tuple[int, float, float, float, int]] = []
        if kind == "classification":
            c = output.get("class")
            if isinstance(c, (int, np.integer)) and not isinstance(c, bool) and 0 <= c < _MAX_CLASS:
                cls = int(c)
            sc = output.get("score")
            if isinstance(sc, (int, float, np.floating)) and math.isfinite(sc):
                score = float(sc)
        elif raw_outputs is not None and not error:
            values = _value_ranges(raw_outputs)
        with self._lock:
            self._samples += 1
            self._kind = kind
            for name, (s, sq, n) in inputs.items():
                acc = self._inputs.get(name)
                if acc is None or acc.sum.shape != s.shape:
                    self._inputs[name] = _InputAcc(s, sq, n)
                else:
                    acc.sum = acc.sum + s
                    acc.sq = acc.sq + sq
                    acc.n += n
            if cls is not None:
                self._classes[cls] = self._classes.get(cls, 0) + 1
            if score is not None:
                self._score_sum += score
                self._score_n += 1
            for i, mn, mx, total, n in values:
                v = self._values.get(i)
                if v is None:
                    self._values[i] = _ValueAcc(mn, mx, total, n)
                else:
                    v.min, v.max = min(v.min, mn), max(v.max, mx)
                    v.sum += total
                    v.n += n

    # --- per interval -----------------------------------------------------------------------

    def snapshot(self, *, reset: bool = True) -> dict[str, Any]:
        """The ``monitoring`` block for the interval since the last reset."""
        with self._lock:
            samples, errors, kind = self._samples, self._errors, self._kind
            inputs = {k: (v.sum.copy(), v.sq.copy(), v.n) for k, v in self._inputs.items()}
            classes = dict(self._classes)
            score_sum, score_n = self._score_sum, self._score_n
            values = {i: (v.min, v.max, v.sum, v.n) for i, v in self._values.items()}
            if reset:
                self._reset()

        with np.errstate(all="ignore"):  # inf/NaN inputs become None, never a warning
            return self._summarise(
                samples, errors, kind, inputs, classes, score_sum, score_n, values
            )

    def _summarise(
        self,
        samples: int,
        errors: int,
        kind: str | None,
        inputs: Mapping[str, tuple[np.ndarray, np.ndarray, int]],
        classes: Mapping[int, int],
        score_sum: float,
        score_n: int,
        values: Mapping[int, tuple[float, float, float, int]],
    ) -> dict[str, Any]:
        means: dict[str, np.ndarray] = {}
        input_block: dict[str, Any] | None = None
        if inputs:
            input_block = {}
            for name, (s, sq, n) in sorted(inputs.items()):
                mean = s / max(n, 1)
                std = np.sqrt(np.maximum(sq / max(n, 1) - mean**2, 0.0))
                means[name] = mean
                input_block[name] = {
                    "mean": [_r(v) for v in mean.tolist()],
                    "std": [_r(v) for v in std.tolist()],
                }

        live_hist: np.ndarray | None = None
        output_block: dict[str, Any] | None = None
        if kind == "classification":
            if classes:
                length = max(max(classes) + 1, 0 if self._cal_hist is None else self._cal_hist.size)
                counts = np.zeros(length, dtype=np.float64)
                for c, k in classes.items():
                    counts[c] = k
                live_hist = counts / counts.sum()
            output_block = {
                "class_histogram": None
                if live_hist is None
                else [_r(v) for v in live_hist.tolist()],
                "mean_top1": _r(score_sum / score_n) if score_n else None,
                "errors": errors,
            }
        elif kind is not None or errors:
            output_block = {
                "values": {
                    i: {"min": _r(mn), "max": _r(mx), "mean": _r(total / max(n, 1))}
                    for i, (mn, mx, total, n) in sorted(values.items())
                },
                "errors": errors,
            }

        return {
            "samples": samples,
            "input": input_block,
            "output": output_block,
            "drift": self._drift(samples, means, live_hist),
        }

    def _drift(
        self, samples: int, means: Mapping[str, np.ndarray], live_hist: np.ndarray | None
    ) -> dict[str, Any] | None:
        if self.calibration_stats is None:
            return None
        drift: dict[str, Any] = {
            "input": None,
            "output": None,
            "threshold": self.drift_threshold,
            "output_threshold": self.output_drift_threshold,
            "drifted": False,
            "reasons": [],
        }
        if samples < MIN_DRIFT_SAMPLES:
            drift["reasons"] = [f"too few samples ({samples} < {MIN_DRIFT_SAMPLES})"]
            return drift
        reasons: list[str] = []
        worst: float | None = None
        for name, live in means.items():
            cal = self._cal_inputs.get(name)
            if cal is None:
                continue
            cal_mean, cal_std = cal
            if cal_mean.shape != live.shape:
                self._log_once(
                    f"channels:{name}",
                    "monitoring: input %r has %d channels, calibration %d: not compared",
                    name,
                    live.size,
                    cal_mean.size,
                )
                continue
            z = np.abs(live - cal_mean) / np.maximum(cal_std, _STD_FLOOR)
            finite = np.isfinite(z)
            if not finite.any():
                continue
            top = float(z[finite].max())
            worst = top if worst is None else max(worst, top)
            for c in np.flatnonzero(finite & (z > self.drift_threshold)).tolist():
                reasons.append(
                    f"input {name!r} channel {c}: mean shift {z[c]:.2f} std "
                    f"> {self.drift_threshold:g} (live {live[c]:.4g}, "
                    f"calibration {cal_mean[c]:.4g})"
                )
        drift["input"] = _r(worst)
        if live_hist is not None and self._cal_hist is not None:
            n = max(live_hist.size, self._cal_hist.size)
            p = np.pad(live_hist, (0, n - live_hist.size))
            q = np.pad(self._cal_hist, (0, n - self._cal_hist.size))
            tv = 0.5 * float(np.abs(p - q).sum())
            drift["output"] = _r(tv)
            if tv > self.output_drift_threshold:
                reasons.append(
                    f"class histogram: total variation {tv:.3f} > {self.output_drift_threshold:g}"
                )
        drift["drifted"] = bool(reasons)
        drift["reasons"] = reasons
        return drift


def _value_ranges(raw_outputs: Sequence[np.ndarray]) -> list[tuple[int, float, float, float, int]]:
    """(index, min, max, sum, count) of each finite numeric raw output."""
    ranges = []
    with np.errstate(all="ignore"):
        for i, out in enumerate(raw_outputs):
            a = np.asarray(out)
            if a.size == 0 or a.dtype.kind not in "fiub":
                continue
            mn, mx = float(a.min()), float(a.max())
            total = float(a.sum(dtype=np.float64))
            if math.isfinite(mn) and math.isfinite(mx) and math.isfinite(total):
                ranges.append((i, mn, mx, total, int(a.size)))
    return ranges


def _parse_calibration(
    stats: Mapping[str, Any] | None,
) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], np.ndarray | None]:
    """The manifest's calibration statistics as arrays; malformed parts are ignored (logged)."""
    inputs: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    hist: np.ndarray | None = None
    if stats is None:
        return inputs, hist
    raw_inputs = stats.get("inputs")
    for name, entry in raw_inputs.items() if isinstance(raw_inputs, Mapping) else ():
        try:
            mean = np.asarray(entry["mean"], dtype=np.float64).reshape(-1)
            std = np.asarray(entry["std"], dtype=np.float64).reshape(-1)
            if mean.shape != std.shape or mean.size == 0:
                raise ValueError(f"{mean.size} means, {std.size} stds")
            inputs[str(name)] = (mean, std)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            log.warning("calibration statistics: input %r unusable (%s): not compared", name, exc)
    raw_hist = stats.get("class_histogram")
    if raw_hist is not None:
        try:
            h = np.asarray(raw_hist, dtype=np.float64).reshape(-1)
            if h.size and np.isfinite(h).all() and (h >= 0).all() and h.sum() > 0:
                hist = h / h.sum()
            else:
                raise ValueError("not a histogram")
        except (TypeError, ValueError) as exc:
            log.warning("calibration statistics: class_histogram unusable (%s): not compared", exc)
    return inputs, hist


__all__ = [
    "CPU_ZONE_TYPES",
    "MIN_DRIFT_SAMPLES",
    "SYSTEM_KEYS",
    "Monitor",
    "SystemProbe",
    "channel_axis",
    "decode_throttled",
]
