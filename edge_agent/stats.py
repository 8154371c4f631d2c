"""Fixed-size latency histograms: constant memory and O(1) recording in the hot loop,
percentiles on demand. Buckets are log-spaced from 1 µs to 100 s (about 4.7 % wide), so a
percentile is exact to within half a bucket."""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

_MIN_NS = 1_000  # 1 µs
_MAX_NS = 100_000_000_000  # 100 s
_BUCKETS = 400
_LOG_MIN = math.log(_MIN_NS)
_STEP = (math.log(_MAX_NS) - _LOG_MIN) / _BUCKETS
#: Upper edge of each bucket, in ns; percentiles report the bucket's geometric middle.
_MIDDLES_MS = np.exp(_LOG_MIN + (np.arange(_BUCKETS) + 0.5) * _STEP) / 1e6


def rank(count: int, p: float) -> int:
    """The nearest-rank position (1-based) of the p-th percentile (0-100) among ``count``
    ordered values: the one rule for the histograms here and for plain lists."""
    return max(1, math.ceil(count * p / 100.0))


def percentile(values: Sequence[float], p: float) -> float | None:
    """The p-th percentile (0-100) of ``values`` by nearest rank, or None when empty."""
    if not values:
        return None
    return sorted(values)[min(len(values), rank(len(values), p)) - 1]


class LatencyHistogram:
    """Record durations in ns; read percentiles in ms. Thread-safe enough for one writer."""

    __slots__ = ("_counts", "_lock", "count", "max_ns", "total_ns")

    def __init__(self) -> None:
        self._counts = [0] * _BUCKETS
        self._lock = threading.Lock()
        self.count = 0
        self.total_ns = 0
        self.max_ns = 0

    def record(self, ns: int) -> None:
        i = 0 if ns < _MIN_NS else min(int((math.log(ns) - _LOG_MIN) / _STEP), _BUCKETS - 1)
        self._counts[i] += 1
        self.count += 1
        self.total_ns += ns
        if ns > self.max_ns:
            self.max_ns = ns

    def percentile(self, p: float) -> float | None:
        """The p-th percentile (0-100) in ms, or None when empty."""
        if self.count == 0:
            return None
        target = rank(self.count, p)
        seen = 0
        for i, c in enumerate(self._counts):
            seen += c
            if seen >= target:
                return float(_MIDDLES_MS[i])
        return float(_MIDDLES_MS[-1])

    def summary(self) -> dict[str, float | int | None]:
        def r(v: float | None) -> float | None:
            return None if v is None else round(v, 4)

        return {
            "p50": r(self.percentile(50)),
            "p95": r(self.percentile(95)),
            "p99": r(self.percentile(99)),
            "mean": r(self.total_ns / self.count / 1e6) if self.count else None,
            "max": r(self.max_ns / 1e6) if self.count else None,
            "count": self.count,
        }

    def reset(self) -> None:
        self._counts = [0] * _BUCKETS
        self.count = self.total_ns = self.max_ns = 0

    def mark(self) -> tuple[list[int], int, int]:
        """Where the histogram stands now, for :meth:`since`."""
        return list(self._counts), self.count, self.total_ns

    def since(self, mark: tuple[list[int], int, int]) -> LatencyHistogram:
        """What was recorded after ``mark``, as a histogram of its own (an interval's
        percentiles without recording twice). Its max is the top bucket's middle, as exact as
        the percentiles."""
        counts, count, total = mark
        h = LatencyHistogram()
        h._counts = [a - b for a, b in zip(self._counts, counts)]
        h.count, h.total_ns = self.count - count, self.total_ns - total
        top = max((i for i, c in enumerate(h._counts) if c), default=None)
        h.max_ns = 0 if top is None else int(_MIDDLES_MS[top] * 1e6)
        return h


@dataclass
class StageStats:
    """The per-stage histograms of one pipeline."""

    capture_to_result: LatencyHistogram
    preprocess: LatencyHistogram
    inference: LatencyHistogram
    postprocess: LatencyHistogram
    overhead: LatencyHistogram

    @classmethod
    def new(cls) -> StageStats:
        return cls(*(LatencyHistogram() for _ in range(5)))

    def summary(self) -> dict[str, dict[str, float | int | None]]:
        return {k: getattr(self, k).summary() for k in self.__dataclass_fields__}

    def mark(self) -> dict[str, tuple[list[int], int, int]]:
        return {k: getattr(self, k).mark() for k in self.__dataclass_fields__}

    def since(self, marks: dict[str, tuple[list[int], int, int]]) -> StageStats:
        return StageStats(*(getattr(self, k).since(marks[k]) for k in self.__dataclass_fields__))
