"""Per-thread niceness (edge_agent.niceness): relative to the thread's own, back to it rather
than to 0, and a probe that tells whether the system lets a thread go back at all (checked
against a real refusal: a process without CAP_SYS_NICE and with RLIMIT_NICE at 0)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from edge_agent.niceness import (
    CAPTURE_NICENESS,
    ThreadPriority,
    priority_restorable,
    thread_niceness,
)

REPO = Path(__file__).resolve().parents[1]


def _in_thread(start: int, body: Any) -> Any:
    """Run ``body()`` in a fresh thread set to niceness ``start`` first; its result."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), start)
            out["value"] = body()
        except BaseException as exc:  # re-raised below, in the test's thread
            out["error"] = exc

    t = threading.Thread(target=run)
    t.start()
    t.join(30)
    if "error" in out:
        raise out["error"]
    return out["value"]


@pytest.fixture
def restorable() -> None:
    if not priority_restorable():
        pytest.skip("this process may not raise a thread's priority back (no CAP_SYS_NICE or "
                    "RLIMIT_NICE): covered by the test without them below")  # fmt: skip


@pytest.mark.parametrize(("start", "nicer"), [(0, 10), (3, 13), (15, 19)])
def test_a_thread_runs_nicer_than_it_was_and_goes_back_to_where_it_was(
    restorable: None, start: int, nicer: int
) -> None:
    """Under a unit with Nice=3 the capture thread runs at 13 and comes back to 3, not to 0;
    never beyond 19."""

    def body() -> list[int | bool | None]:
        p = ThreadPriority()
        seen: list[int | bool | None] = [p.follow(True), thread_niceness()]
        seen += [p.follow(True), thread_niceness()]  # already nicer: nothing changes
        seen += [p.follow(False), thread_niceness()]
        return seen

    assert CAPTURE_NICENESS == 10
    assert _in_thread(start, body) == [True, nicer, True, nicer, True, start]


def test_the_probe_leaves_the_calling_thread_alone() -> None:
    before = thread_niceness()
    priority_restorable()
    assert thread_niceness() == before


@pytest.mark.skipif(
    not (shutil.which("setpriv") and shutil.which("prlimit")),
    reason="needs setpriv and prlimit (util-linux)",
)
def test_a_process_without_rlimit_nice_or_cap_sys_nice_is_told_it_cannot_go_back() -> None:
    """As `edge-agent run` from a shell (RLIMIT_NICE 0, no CAP_SYS_NICE): the probe says no, and
    a capture thread that went nicer stays nicer, said once (follow returns False once). The
    child keeps this process's user and files; only the capability and the limit go."""
    base = thread_niceness()
    if base is None or base >= 19:
        pytest.skip(f"niceness {base}: nothing to go back from")
    code = (
        "import threading\n"
        "from edge_agent.niceness import ThreadPriority, priority_restorable, thread_niceness\n"
        "out = [priority_restorable()]\n"
        "def body():\n"
        "    p = ThreadPriority()\n"
        "    out.extend([p.follow(True), thread_niceness(), p.follow(False), thread_niceness(),\n"
        "                p.follow(False), p.follow(True), thread_niceness()])\n"
        "t = threading.Thread(target=body); t.start(); t.join()\n"
        "print(out)\n"
    )
    command = ["prlimit", "--nice=0:0", "setpriv", "--bounding-set=-sys_nice",
               "--inh-caps=-sys_nice", sys.executable, "-c"]  # fmt: skip
    # CAP_SYS_NICE is bit 23 of the effective set; setpriv leaves it quietly where it may not
    # drop it (no CAP_SETPCAP)
    check = (
        "import sys\n"
        "eff = [l for l in open('/proc/self/status') if l.startswith('CapEff:')][0]\n"
        "sys.exit(1 if int(eff.split()[1], 16) >> 23 & 1 else 0)\n"
    )
    if subprocess.run([*command, check], capture_output=True, timeout=60).returncode != 0:
        pytest.skip("cannot start a process without CAP_SYS_NICE here (prlimit/setpriv refused)")
    result = subprocess.run(
        [*command, code], cwd=REPO, capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    nicer = min(19, base + CAPTURE_NICENESS)
    # refused once (False), then left alone: nicer it stays, whatever the plan asks
    assert result.stdout.strip() == str([False, True, nicer, False, nicer, True, True, nicer])
