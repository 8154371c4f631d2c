"""Per-thread priority (Linux niceness) for the threads that feed inference: the capture thread,
the stream readers, the shadow model's thread.

Niceness is relative to what the thread had: under a unit with ``Nice=-5`` the capture thread
runs at 5, not 10. Going nicer needs no privilege; going back needs ``RLIMIT_NICE`` (the shipped
unit sets ``LimitNICE=+0``: back down to 0, never below) or ``CAP_SYS_NICE``, and
:func:`priority_restorable` says whether this process has either.
"""

from __future__ import annotations

import contextlib
import os
import threading

#: How much nicer than the inference threads the capture thread runs (Linux, per thread).
CAPTURE_NICENESS = 10


def thread_niceness() -> int | None:
    """The calling thread's niceness; None where the system has no per-thread niceness."""
    try:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    except (AttributeError, OSError):
        return None


def lower_priority(niceness: int = CAPTURE_NICENESS) -> None:
    """Make the calling thread ``niceness`` nicer than it is now (at most 19). Lets the
    runtime's threads win the cores: onnxruntime synchronises its threads at every operator, so
    a decode that preempts one of them stalls them all, while a nicer capture thread decodes in
    the gaps (the shadow thread runs nicer still: :func:`idle_priority`). Needs no privilege;
    failure is harmless."""
    # (SCHED_IDLE measured no better here, and would starve capture on a busy device.)
    now = thread_niceness()
    if now is None:
        return
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), min(19, now + niceness))


def idle_priority(*, fallback: int) -> None:
    """The calling thread runs only when a core would otherwise idle (the shadow model's):
    Linux's SCHED_IDLE, which any ordinary thread preempts at once (nice 19 still gets a share,
    and a wake-up of the serving model's threads can wait behind it). Needs no privilege. Where
    it is missing: ``fallback`` nicer (:func:`lower_priority`)."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # 0: this thread
    except (AttributeError, OSError):
        lower_priority(fallback)


def restore_priority(niceness: int) -> bool:
    """Bring the calling thread back to ``niceness`` (its own before :func:`lower_priority`);
    False where the system refuses (no ``RLIMIT_NICE`` down to it, no ``CAP_SYS_NICE``)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), niceness)
    except (AttributeError, OSError):
        return False
    return True


def priority_restorable() -> bool:
    """Whether a thread of this process can run nicer for a while and then go back: a probe
    thread lowers its own priority by one and raises it again (exactly what the system allows,
    whatever grants it: ``RLIMIT_NICE`` or ``CAP_SYS_NICE``). The thread ends after the probe."""
    answer: list[bool] = []

    def probe() -> None:
        before = thread_niceness()
        if before is None:
            answer.append(False)
            return
        lower_priority(1)
        answer.append(restore_priority(before) and thread_niceness() == before)

    thread = threading.Thread(target=probe, name="edge-nice-probe", daemon=True)
    thread.start()
    thread.join()
    return bool(answer and answer[0])


class ThreadPriority:
    """One capture or reader thread's priority as the plan wants it: created in that thread,
    which it remembers the niceness of; :meth:`follow` is cheap when nothing changes (it is
    called for every frame)."""

    def __init__(self) -> None:
        self.base = thread_niceness()
        self.niced = False
        self.refused = False  # going back was refused once: it stays nicer

    def follow(self, nicer: bool) -> bool:
        """Run nicer (by :data:`CAPTURE_NICENESS`) or at the starting niceness; returns False
        only when going back was refused (this once: the thread stays nicer after)."""
        if nicer == self.niced or self.refused:
            return True
        if nicer:
            lower_priority()
            self.niced = True
            return True
        if self.base is None or restore_priority(self.base):
            self.niced = False
            return True
        self.refused = True
        return False
