"""Several sources read as one (edge_agent.io.streams): every frame of a file stream once and in
order, fair picks across streams, live streams dropping what nobody took, and one stream's end
or failure never blocking the others. Real synthetic sources and real video files."""

from __future__ import annotations

import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge_agent.errors import SourceError
from edge_agent.io import Source, open_source
from edge_agent.io.streams import StreamSet, Taken
from tests.fleet import wait_until


def _finite(frames: int, seed: int = 0) -> Source:
    return open_source(f"synthetic:?width=64&height=48&frames={frames}&pattern=noise&seed={seed}")


def _live(fps: float) -> Source:
    return open_source(f"synthetic:?width=64&height=48&fps={fps}&live=1")


def _drain(streams: StreamSet, timeout: float = 30.0) -> list[Taken]:
    out = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        taken = streams.take(timeout=5.0)
        if taken is None:
            return out
        out.append(taken)
    raise AssertionError("streams did not end")


@pytest.mark.parametrize("policy", ["round-robin", "oldest"])
def test_every_frame_of_every_file_stream_once_in_order(policy: str) -> None:
    sizes = {"a": 10, "b": 25, "c": 3}
    streams = StreamSet(
        [(n, _finite(k, i)) for i, (n, k) in enumerate(sizes.items())],
        policy=policy,
        prepare=lambda name, frame: (name, frame.index),
    )
    with streams:
        got = _drain(streams)
    for name, count in sizes.items():
        mine = [t for t in got if t.stream == name]
        assert [t.frame.index for t in mine] == list(range(count))
        assert [t.order for t in mine] == list(range(count))
        assert all(t.prepared == (name, t.frame.index) for t in mine)
    counters = streams.counters()
    assert all(c.ended and c.dropped == 0 and c.error is None for c in counters.values())
    assert {n: c.taken for n, c in counters.items()} == sizes


def _wait_all_ready(streams: StreamSet) -> dict[str, int]:
    """Until every stream has a frame waiting or has ended; then the frames waiting."""

    def settled() -> bool:
        ready, counters = streams.ready(), streams.counters()
        return all(name in ready or c.ended for name, c in counters.items())

    wait_until(settled, timeout=20, what="every stream ready or ended")
    return streams.ready()


def test_round_robin_takes_turns_when_every_stream_has_a_frame() -> None:
    streams = StreamSet([(n, _finite(6, i)) for i, n in enumerate("abc")])
    picks = []
    with streams:
        for _ in range(18):
            _wait_all_ready(streams)
            taken = streams.take(timeout=5.0)
            assert taken is not None
            picks.append(taken.stream)
    assert picks == list("abc") * 6


def test_oldest_first_takes_the_frame_captured_first() -> None:
    streams = StreamSet(
        [(n, _finite(6, i)) for i, n in enumerate("abc")],
        policy="oldest",
    )
    with streams:
        for _ in range(18):
            ready = _wait_all_ready(streams)
            taken = streams.take(timeout=5.0)
            assert taken is not None
            assert taken.frame.capture_ns == min(ready.values())
            assert taken.stream == min(ready, key=ready.__getitem__)


def test_a_live_stream_keeps_only_its_newest_frame() -> None:
    streams = StreamSet([("cam", _live(200.0))])
    with streams:
        indices = []
        for _ in range(5):
            wait_until(lambda: streams.counters()["cam"].read >= 3 + 3 * len(indices),
                       timeout=20, what="frames")  # fmt: skip
            taken = streams.take(timeout=5.0)
            assert taken is not None
            indices.append(taken.frame.index)
        counters = streams.counters()["cam"]
    assert indices == sorted(indices) and len(set(indices)) == 5
    assert counters.dropped >= 5 and counters.taken == 5
    # every frame read was taken, dropped, or is the one waiting in the slot
    assert (
        counters.taken + counters.dropped <= counters.read <= counters.taken + counters.dropped + 1
    )


def test_an_ended_stream_never_blocks_a_live_one(tmp_path: Path) -> None:
    video = tmp_path / "short.mp4"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), 10.0, (64, 48))
    for i in range(4):
        writer.write(np.full((48, 64, 3), 40 * i, np.uint8))
    writer.release()
    streams = StreamSet([("file", open_source(str(video))), ("cam", _live(50.0))])
    with streams:
        seen: dict[str, int] = {"file": 0, "cam": 0}
        deadline = time.monotonic() + 30
        while seen["cam"] < 20 and time.monotonic() < deadline:
            taken = streams.take(timeout=5.0)
            assert taken is not None
            seen[taken.stream] += 1
        counters = streams.counters()
    assert seen == {"file": 4, "cam": 20}
    assert counters["file"].ended and not counters["cam"].ended


def test_a_stream_that_cannot_open_is_named_and_the_others_are_closed(tmp_path: Path) -> None:
    good = _finite(5)
    streams = StreamSet([("ok", good), ("gone", open_source(str(tmp_path / "no.mp4")))])
    with pytest.raises(SourceError, match="stream gone: ") as info:
        streams.open()
    assert "\n" not in str(info.value)
    assert good.read() is None  # closed: reads end


@pytest.mark.parametrize(
    ("streams", "policy", "message"),
    [
        ([], "round-robin", "none given"),
        ([("a", None), ("a", None)], "round-robin", "duplicate name"),
        ([("a", None)], "fifo", "expected one of"),
    ],
)
def test_bad_stream_sets_are_refused(streams: list, policy: str, message: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(SourceError, match=message):
        StreamSet(streams, policy=policy)
