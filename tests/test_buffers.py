"""Per-frame arrays reused once nobody holds them (edge_agent.common.buffers): never handed out
while anyone holds them or a view of them, and frames decoded into them are the file's frames."""

from __future__ import annotations

import threading
import weakref
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge_agent.common.buffers import BufferPool
from edge_agent.io import open_source
from edge_agent.model.preprocess import Preprocessor, PreprocessSpec


def test_a_buffer_comes_back_only_when_nobody_holds_it() -> None:
    pool = BufferPool(keep=4)
    a = pool.take((4, 4), np.uint8)
    b = pool.take((4, 4), np.uint8)
    assert a is not b  # a is held
    a_id = id(a)
    del a
    c = pool.take((4, 4), np.uint8)
    assert id(c) == a_id  # a was let go: reused
    view = c[1:]
    del c
    d = pool.take((4, 4), np.uint8)
    assert d is not view.base and d is not b  # a view holds its base
    assert len(pool) == 3


def test_another_shape_or_dtype_gets_its_own_and_a_full_pool_replaces_a_stale_one() -> None:
    pool = BufferPool(keep=2)
    first = pool.take((2, 3), np.uint8)
    assert pool.take((2, 3), np.float32).dtype == np.float32
    del first
    # full, one free buffer of another shape (a camera that changed its size): replaced
    new = pool.take((5, 5), np.uint8)
    assert new.shape == (5, 5) and len(pool) == 2
    new_id = id(new)
    del new
    assert id(pool.take((5, 5), np.uint8)) == new_id  # kept, so reused


def test_a_full_pool_of_held_buffers_forgets_one_for_a_new_one() -> None:
    """Frames kept for a while (or more in flight than the pool keeps) do not stop the reuse:
    the pool forgets a held buffer (its holder keeps it) and keeps the new one."""
    pool = BufferPool(keep=2)
    held = [pool.take((3,), np.uint8) for _ in range(2)]
    extra = pool.take((3,), np.uint8)
    assert all(extra is not h for h in held) and len(pool) == 2
    extra_id = id(extra)
    del extra
    assert id(pool.take((3,), np.uint8)) == extra_id  # kept in place of one held
    forgotten = [weakref.ref(h) for h in held]
    del held
    assert sum(ref() is None for ref in forgotten) == 1  # the pool let go of one of them


def test_a_pool_keeps_at_least_one() -> None:
    with pytest.raises(ValueError, match="keep = 0"):
        BufferPool(keep=0)


def test_buffers_no_take_of_a_window_needed_are_let_go() -> None:
    """After a burst (six frames held at once), a pool that then needs one buffer at a time
    lets the other five go at the end of a window, and their memory with them."""
    pool = BufferPool(keep=8, window=16)
    burst = [pool.take((1000,), np.uint8) for _ in range(6)]
    refs = [weakref.ref(b) for b in burst]
    del burst
    assert len(pool) == 6
    for _ in range(32):  # the window the burst began, and a whole one after it
        one = pool.take((1000,), np.uint8)
        del one
    assert len(pool) == 1
    assert sum(ref() is None for ref in refs) == 5  # freed: nobody else held them
    one = pool.take((1000,), np.uint8)
    assert any(ref() is one for ref in refs)  # the one kept is still reused


def test_buffers_in_use_are_kept_through_windows() -> None:
    """Two frames in flight at a time (a queue and a worker): the pool keeps the three buffers
    the pattern needs through many windows and never allocates again."""
    pool = BufferPool(keep=8, window=8)
    in_flight = [pool.take((100,), np.uint8), pool.take((100,), np.uint8)]
    made = [weakref.ref(b) for b in in_flight]  # every buffer ever handed out (ids get reused)
    for _ in range(200):
        in_flight.pop(0)
        new = pool.take((100,), np.uint8)
        if not any(ref() is new for ref in made):
            made.append(weakref.ref(new))
        in_flight.append(new)
    assert len(made) <= 3 and len(pool) <= 3
    assert all(ref() is not None for ref in made)  # none let go: every one still in use


def test_a_window_must_hold_a_take() -> None:
    with pytest.raises(ValueError, match="window = 0"):
        BufferPool(window=0)


def test_threads_never_get_a_buffer_another_holds() -> None:
    pool = BufferPool(keep=4)
    clash = threading.Event()
    stop = threading.Event()

    def taker(mark: int) -> None:
        while not stop.is_set():
            buf = pool.take((64,), np.int64)
            buf[:] = mark
            if not (buf == mark).all():  # another thread wrote into it meanwhile
                clash.set()

    threads = [threading.Thread(target=taker, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    stop.wait(1.0)
    stop.set()
    for t in threads:
        t.join(10)
    assert not clash.is_set()


def test_frames_decoded_into_pooled_buffers_are_the_files_frames(tmp_path: Path) -> None:
    """Every third frame is kept (as a queue or a sink would), the others let go: the kept ones
    are never overwritten, and every frame equals a plain decode of the same file."""
    video = tmp_path / "v.mp4"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), 30.0, (96, 64))
    for i in range(40):
        img = np.zeros((64, 96, 3), np.uint8)
        cv2.circle(img, ((5 * i) % 96, 32), 10, (0, 255 - i, 6 * i), -1)
        writer.write(img)
    writer.release()
    cap = cv2.VideoCapture(str(video))
    reference = []
    while True:
        ok, img = cap.read()
        if not ok:
            break
        reference.append(img)
    cap.release()
    assert len(reference) == 40

    kept: list[tuple[int, np.ndarray]] = []
    let_go: list[weakref.ref[np.ndarray]] = []  # no reference: alive only if the pool keeps it
    reused = 0
    with open_source(f"file:{video}") as source:
        while (frame := source.read()) is not None:
            assert np.array_equal(frame.data, reference[frame.index])
            reused += any(ref() is frame.data for ref in let_go)
            if frame.index % 3 == 0:
                kept.append((frame.index, frame.data))
            else:
                let_go.append(weakref.ref(frame.data))
            del frame
    assert all(np.array_equal(data, reference[i]) for i, data in kept)  # none overwritten
    assert reused >= 20  # the frames let go were decoded into again


def test_the_preprocessors_output_is_its_own_while_held() -> None:
    pre = Preprocessor(PreprocessSpec(8, 8, layout="nhwc"))
    a_img = np.full((16, 16, 3), 10, np.uint8)
    b_img = np.full((16, 16, 3), 200, np.uint8)
    a = pre(a_img)
    b = pre(b_img)
    assert a is not b
    assert np.allclose(a, 10 / 255) and np.allclose(b, 200 / 255)
