"""The systemd integration: the unit file (checked by systemd's own tools), the sd_notify protocol
(against a real unix datagram socket), the watchdog's progress rule, and install.sh."""

from __future__ import annotations

import base64
import hashlib
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_agent.notify import Notifier, Watchdog, watchdog_interval, watchdog_timeout

REPO = Path(__file__).resolve().parents[1]
UNIT = REPO / "systemd" / "edge-agent.service"
COLLECTOR_UNIT = REPO / "systemd" / "edge-collector.service"
INSTALL = REPO / "systemd" / "install.sh"
EXAMPLE = REPO / "systemd" / "agent.toml.example"

# Measured 1.6 with systemd 252 (Debian 12). The threshold leaves room for other versions'
# weights, and fails if a hardening line is dropped (each is worth 0.1-0.5).
MAX_EXPOSURE = 2.0

needs_systemd_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze is missing (apt-get install systemd; .ci/run installs it)",
)


def _analyze(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SYSTEMD_COLORS": "0", "SYSTEMD_PAGER": "", "LC_ALL": "C.UTF-8"}
    return subprocess.run(
        ["systemd-analyze", *args], capture_output=True, text=True, timeout=60, env=env
    )


def _unit_values(key: str) -> list[str]:
    return [
        line.split("=", 1)[1]
        for line in UNIT.read_text().splitlines()
        if line.startswith(f"{key}=")
    ]


# --- the unit -------------------------------------------------------------------------------


@needs_systemd_analyze
def test_unit_verifies_without_warnings(tmp_path: Path) -> None:
    # Off-device /usr/local/bin/edge-agent does not exist, and verify reports that (expected, see
    # the next test). So verify a copy whose ExecStart is /bin/true and require silence.
    copy = tmp_path / "edge-agent.service"
    text = UNIT.read_text()
    assert text.count("ExecStart=/usr/local/bin/edge-agent ") == 1
    copy.write_text(re.sub(r"(?m)^ExecStart=.*$", "ExecStart=/bin/true", text))
    result = _analyze("verify", str(copy))
    assert result.returncode == 0, result.stderr
    assert (result.stdout + result.stderr).strip() == ""


@needs_systemd_analyze
def test_unit_as_shipped_only_lacks_the_binary(tmp_path: Path) -> None:
    if Path("/usr/local/bin/edge-agent").exists():
        pytest.skip("edge-agent is installed here: the unshipped-binary message cannot appear")
    copy = tmp_path / "edge-agent.service"
    shutil.copy(UNIT, copy)
    result = _analyze("verify", str(copy))
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert lines, "verify should report the missing ExecStart binary"
    assert all("/usr/local/bin/edge-agent" in line for line in lines), lines


@needs_systemd_analyze
def test_verify_would_catch_a_bad_line(tmp_path: Path) -> None:
    # verify exits 0 on unknown keys: the silence asserted above is what catches them.
    bad = tmp_path / "edge-agent.service"
    bad.write_text("[Service]\nExecStart=/bin/true\nProtectSystem=sometimes\nProtectSytem=yes\n")
    result = _analyze("verify", str(bad))
    out = result.stdout + result.stderr
    assert "edge-agent.service:3:" in out and "edge-agent.service:4:" in out, out


@needs_systemd_analyze
def test_security_exposure_is_low(tmp_path: Path) -> None:
    # --root: only this unit file, never drop-ins that happen to exist on the host.
    unit_dir = tmp_path / "etc" / "systemd" / "system"
    unit_dir.mkdir(parents=True)
    shutil.copy(UNIT, unit_dir / "edge-agent.service")
    result = _analyze("security", "--offline=yes", f"--root={tmp_path}", "edge-agent.service")
    assert result.returncode == 0, result.stderr
    match = re.search(r"Overall exposure level for edge-agent\.service: (\d+\.\d+)", result.stdout)
    assert match, result.stdout[-2000:]
    score = float(match.group(1))
    assert score <= MAX_EXPOSURE, f"exposure {score} > {MAX_EXPOSURE}:\n{result.stdout}"


def test_unit_matches_the_agent() -> None:
    from edge_agent.config import PipelineSection
    from edge_agent.errors import AgentExit

    assert _unit_values("Type") == ["notify"]
    assert _unit_values("NotifyAccess") == ["main"]
    assert _unit_values("ExecStart") == [
        "/usr/local/bin/edge-agent run --config /etc/edge-agent/agent.toml"
    ]
    assert _unit_values("RestartPreventExitStatus") == [str(int(AgentExit.CONFIG))]
    assert _unit_values("StateDirectory") == ["edge-agent"]
    # SIGKILL must not arrive before the agent's own drain gives up.
    assert float(_unit_values("TimeoutStopSec")[0]) > PipelineSection().drain_timeout


# --- the fleet collector's unit (edgectl collect fleet) --------------------------------------


@needs_systemd_analyze
def test_collector_unit_verifies_and_is_hardened(tmp_path: Path) -> None:
    text = COLLECTOR_UNIT.read_text()
    assert text.count("ExecStart=/usr/local/bin/edgectl ") == 1
    copy = tmp_path / "edge-collector.service"
    copy.write_text(re.sub(r"(?m)^ExecStart=.*$", "ExecStart=/bin/true", text))
    result = _analyze("verify", str(copy))
    assert result.returncode == 0 and (result.stdout + result.stderr).strip() == "", result.stderr
    unit_dir = tmp_path / "etc" / "systemd" / "system"
    unit_dir.mkdir(parents=True)
    shutil.copy(COLLECTOR_UNIT, unit_dir / "edge-collector.service")
    result = _analyze("security", "--offline=yes", f"--root={tmp_path}", "edge-collector.service")
    match = re.search(r"Overall exposure level for edge-collector\.service: (\d+\.\d+)",
                      result.stdout)  # fmt: skip
    assert match, result.stdout[-2000:]
    assert float(match.group(1)) <= MAX_EXPOSURE, result.stdout


def test_collector_unit_runs_a_command_edgectl_accepts() -> None:
    """ExecStart, with the unit's Environment= defaults put in, parses as edgectl's own
    arguments; exit 2 (bad input) is the one not restarted."""
    import shlex

    from edge_agent.errors import CtlExit
    from edgectl.cli import build_parser

    text = COLLECTOR_UNIT.read_text()
    env = dict(
        line.split("=", 2)[1:] for line in text.splitlines() if line.startswith("Environment=")
    )
    (exec_start,) = [line.split("=", 1)[1] for line in text.splitlines()
                     if line.startswith("ExecStart=")]  # fmt: skip
    words = [re.sub(r"\$\{(\w+)\}", lambda m: env[m.group(1)], w) for w in shlex.split(exec_start)]
    assert words[0] == "/usr/local/bin/edgectl"
    args = build_parser().parse_args(words[1:])
    assert (args.command, args.what) == ("collect", "fleet")
    assert args.db == env["EDGECTL_DB"] and args.client_id == env["CLIENT_ID"]
    assert args.db_password_file == ""
    assert [v for k, v in (line.split("=", 1) for line in text.splitlines() if "=" in line)
            if k == "RestartPreventExitStatus"] == [str(int(CtlExit.USAGE))]  # fmt: skip


def test_example_config_matches_the_schema() -> None:
    from edge_agent.config import load_config

    config = load_config(EXAMPLE)
    config.require_runnable()
    assert config.agent.state_dir == "/var/lib/edge-agent"
    assert config.model.trusted_keys == ("/etc/edge-agent/trusted-keys",)


# --- the notify protocol --------------------------------------------------------------------


def test_public_names_are_exported() -> None:
    from edge_agent import notify

    assert set(notify.__all__) == {"Notifier", "Watchdog", "watchdog_interval", "watchdog_timeout"}
    for name in notify.__all__:
        assert hasattr(notify, name), name


class Receiver:
    """The systemd side: a bound unix datagram socket."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(2.0)

    def recv(self) -> bytes:
        return self.sock.recv(4096)

    def pending(self) -> list[bytes]:
        out = []
        self.sock.setblocking(False)
        try:
            while True:
                out.append(self.sock.recv(4096))
        except BlockingIOError:
            pass
        finally:
            self.sock.settimeout(2.0)
        return out

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def receiver(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Receiver]:
    path = tmp_path / "notify"
    rx = Receiver(str(path))
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    yield rx
    rx.close()


@pytest.fixture
def notifier(receiver: Receiver) -> Iterator[Notifier]:
    with Notifier() as n:
        yield n


def test_messages_are_byte_exact(receiver: Receiver, notifier: Notifier) -> None:
    assert notifier.enabled
    assert notifier.ready() is True
    assert receiver.recv() == b"READY=1"
    notifier.status("serving: 29.8 fps")
    assert receiver.recv() == b"STATUS=serving: 29.8 fps"
    notifier.watchdog()
    assert receiver.recv() == b"WATCHDOG=1"
    notifier.stopping()
    assert receiver.recv() == b"STOPPING=1"
    notifier.ready(status="model swapped")
    assert receiver.recv() == b"READY=1\nSTATUS=model swapped"
    notifier.status("line one\nline two")
    assert receiver.recv() == b"STATUS=line one line two"
    notifier.notify(STATUS="x", ERRNO=5, BUSERROR=True)
    assert receiver.recv() == b"STATUS=x\nERRNO=5\nBUSERROR=1"
    assert (notifier.sent, notifier.failures) == (7, 0)


def test_reloading_carries_the_monotonic_timestamp(receiver: Receiver, notifier: Notifier) -> None:
    before = time_usec()
    notifier.reloading()
    lines = receiver.recv().split(b"\n")
    assert lines[0] == b"RELOADING=1"
    key, _, value = lines[1].partition(b"=")
    assert key == b"MONOTONIC_USEC" and before <= int(value) <= time_usec()


def time_usec() -> int:
    return time.monotonic_ns() // 1000


def test_malformed_fields_are_programming_errors(notifier: Notifier) -> None:
    with pytest.raises(ValueError, match="must match"):
        notifier.notify(status="lower-case")
    with pytest.raises(ValueError, match="one line"):
        notifier.notify(STATUS="two\nlines")
    with pytest.raises(ValueError, match="at least one"):
        notifier.notify()


def test_abstract_socket_name(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"edge-agent-test-{uuid.uuid4().hex}"
    rx = Receiver("\0" + name)
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        with Notifier() as n:
            assert n.enabled and "@" + name in repr(n)
            assert n.ready()
        assert rx.recv() == b"READY=1"
    finally:
        rx.close()


def test_no_op_without_notify_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    with Notifier() as n:
        assert not n.enabled
        assert n.ready() is False and n.status("x") is False and n.watchdog() is False
        assert (n.sent, n.failures) == (0, 0)


def test_unusable_address_disables_it(caplog: pytest.LogCaptureFixture) -> None:
    with Notifier(environ={"NOTIFY_SOCKET": "vsock:2:1234"}) as n:
        assert not n.enabled and n.ready() is False
    assert "not a path or @abstract name" in caplog.text


def test_send_failures_are_counted_not_raised(tmp_path: Path) -> None:
    path = tmp_path / "later"
    with Notifier(address=str(path)) as n:
        assert n.ready() is False and n.watchdog() is False  # nobody listening yet
        assert (n.sent, n.failures) == (0, 2)
        rx = Receiver(str(path))
        assert n.ready() is True  # reconnects on the next send
        assert rx.recv() == b"READY=1"
        rx.close()  # systemd goes away (daemon-reexec): the connected socket now fails
        path.unlink()
        assert n.watchdog() is False
        assert n.failures == 3
        rx = Receiver(str(path))
        assert n.watchdog() is True
        assert rx.recv() == b"WATCHDOG=1"
        rx.close()


@pytest.mark.parametrize(
    ("env", "timeout"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 30.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 30.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
    ],
)
def test_watchdog_interval_from_environment(env: dict[str, str], timeout: float | None) -> None:
    assert watchdog_timeout(env) == timeout
    assert watchdog_interval(env) == (None if timeout is None else timeout / 2)


def test_watchdog_interval_reads_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "20000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert watchdog_interval() == 10.0


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_watchdog_pings_only_while_progress_is_made(receiver: Receiver, notifier: Notifier) -> None:
    clock = FakeClock()
    wd = Watchdog(notifier, timeout=30.0, clock=clock)
    assert (wd.timeout, wd.interval) == (30.0, 15.0)
    start = clock.now
    pinged: list[float] = []

    def step(*, progress: bool) -> None:
        clock.now += 5.0
        if progress:
            wd.progress()
        if wd.tick():
            pinged.append(clock.now - start)

    for _ in range(6):  # inference running: t = 5 ... 30
        step(progress=True)
    assert pinged == [5.0, 15.0, 25.0]  # at most one ping per quarter timeout
    for _ in range(12):  # inference stuck after t = 30
        step(progress=False)
    assert pinged == [5.0, 15.0, 25.0, 35.0, 45.0, 55.0]  # nothing once 30 s passed
    assert wd.stalled and wd.since_progress() == 60.0
    step(progress=True)  # it recovers before systemd's timeout: pings resume
    assert pinged[-1] == 95.0 and not wd.stalled
    assert receiver.pending() == [b"WATCHDOG=1"] * len(pinged) == [b"WATCHDOG=1"] * wd.pings


def test_watchdog_keeps_systemd_fed_at_the_recommended_interval(
    receiver: Receiver, notifier: Notifier
) -> None:
    clock = FakeClock()
    wd = Watchdog(notifier, timeout=30.0, clock=clock)
    last = clock.now
    received = 0
    for _ in range(40):  # frames every 0.5 s, main loop ticks every `interval`
        for _ in range(30):
            clock.now += 0.5
            wd.progress()
        if wd.tick():
            assert clock.now - last <= 15.0
            last = clock.now
        received += len(receiver.pending())  # as systemd does: a unix queue holds ~10
    assert wd.pings == 40 and received == 40 and notifier.failures == 0


def test_watchdog_timeout_comes_from_systemd(
    monkeypatch: pytest.MonkeyPatch, receiver: Receiver, notifier: Notifier
) -> None:
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    idle = Watchdog(notifier, clock=FakeClock())
    assert idle.timeout is None and idle.interval is None
    assert idle.tick() is False and not idle.stalled
    monkeypatch.setenv("WATCHDOG_USEC", "8000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    wd = Watchdog(notifier=notifier, clock=FakeClock())
    assert (wd.timeout, wd.interval) == (8.0, 4.0)
    assert wd.tick() is True and receiver.recv() == b"WATCHDOG=1"
    with pytest.raises(ValueError, match="must be > 0"):
        Watchdog(notifier, timeout=0)


# --- install.sh -----------------------------------------------------------------------------

# What a real install touches outside any prefix: the dry run must leave all of it as it was.
SYSTEM_PATHS = [
    "/opt/edge-agent",
    "/usr/local/bin/edge-agent",
    "/etc/systemd/system/edge-agent.service",
    "/etc/edge-agent",
]


def _snapshot(paths: list[str]) -> dict[str, tuple[int, float] | None]:
    out: dict[str, tuple[int, float] | None] = {}
    for p in paths:
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            out[p] = None
        else:
            out[p] = (st.st_mode, st.st_mtime)
    return out


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _install(*args: object) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PIP_NO_INDEX": "1"}  # never the network: tests install a local wheel
    return subprocess.run(
        ["sh", str(INSTALL), *map(str, args)], capture_output=True, text=True, timeout=300, env=env
    )


@pytest.mark.parametrize("shell", ["bash", "sh"])
def test_install_script_parses(shell: str) -> None:
    subprocess.run([shell, "-n", str(INSTALL)], check=True, timeout=30)
    assert os.access(INSTALL, os.X_OK)


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_install_script_is_shellcheck_clean() -> None:
    result = subprocess.run(["shellcheck", str(INSTALL)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_install_dry_run_prints_the_plan_and_touches_nothing(tmp_path: Path) -> None:
    root = tmp_path / "root"
    before = _snapshot(SYSTEM_PATHS)
    result = _install("--dry-run", "--prefix", root, REPO)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    venv = f"{root}/opt/edge-agent/venv"
    expected = [
        "+ python3 -m venv " + venv,
        f"+ {venv}/bin/python -m pip install --disable-pip-version-check --quiet --upgrade {REPO}",
        f"+ ln -sfn {venv}/bin/edge-agent {root}/usr/local/bin/edge-agent",
        f"+ install -m 0644 {REPO}/systemd/edge-agent.service "
        f"{root}/etc/systemd/system/edge-agent.service",
        f"+ install -m 0644 {REPO}/systemd/agent.toml.example {root}/etc/edge-agent/agent.toml",
        f"+ install -d -m 0700 {root}/etc/edge-agent/credentials",
        f"+ install -d -m 0755 {root}/etc/edge-agent/trusted-keys",
        f"# --prefix {root}: not running systemctl daemon-reload",
        "systemctl enable --now edge-agent",
        "Dry run: nothing was changed. After a real install:",
    ]
    for line in expected:
        assert line in out.splitlines() or line in out, f"missing {line!r} in:\n{out}"
    assert "+ systemctl" not in out
    # Every path an action names is under the prefix or is one of our sources.
    for line in out.splitlines():
        if line.startswith("+ "):
            for word in line.split()[1:]:
                if word.startswith("/"):
                    assert word.startswith((str(root), str(REPO))), line
    assert not root.exists()
    assert _snapshot(SYSTEM_PATHS) == before


def test_install_dry_run_keeps_an_existing_config(tmp_path: Path) -> None:
    conf = tmp_path / "etc" / "edge-agent" / "agent.toml"
    conf.parent.mkdir(parents=True)
    conf.write_text("# mine\n")
    listing = _tree(tmp_path)
    result = _install("--dry-run", f"--prefix={tmp_path}", REPO)
    assert result.returncode == 0, result.stderr
    assert f"# {conf} exists: kept as it is" in result.stdout
    assert "agent.toml.example" not in result.stdout
    assert _tree(tmp_path) == listing and conf.read_text() == "# mine\n"


def test_install_dry_run_into_the_system_plans_daemon_reload() -> None:
    before = _snapshot(SYSTEM_PATHS)
    result = _install("--dry-run", REPO)
    assert result.returncode == 0, result.stderr
    assert "+ systemctl daemon-reload" in result.stdout.splitlines()
    assert "/etc/systemd/system/edge-agent.service" in result.stdout
    assert _snapshot(SYSTEM_PATHS) == before


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--dry-run", "/nonexistent/edge.whl"], "no such wheel or source directory"),
        (["--dry-run", "--prefix", "relative", str(REPO)], "must be an absolute path"),
        (["--dry-run", "--bogus", str(REPO)], "unknown option --bogus"),
        (["--dry-run"], "usage:"),
    ],
)
def test_install_refuses_bad_arguments(args: list[str], message: str) -> None:
    result = _install(*args)
    assert result.returncode == 2
    assert message in result.stderr


def test_install_into_the_system_needs_root() -> None:
    """Run as an unprivileged user (as root, drop to nobody with util-linux's setpriv)."""
    if os.geteuid() != 0:
        result = _install(REPO)
    else:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root and setpriv (util-linux) is missing")
        # The checkout may sit in a directory nobody cannot read: use a readable copy.
        shared = Path(tempfile.mkdtemp(prefix="edge-install-"))
        try:
            shared.chmod(0o755)
            script = shared / "install.sh"
            shutil.copy(INSTALL, script)
            script.chmod(0o755)
            env = {**os.environ, "PIP_NO_INDEX": "1", "HOME": "/tmp"}
            drop = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups"]
            result = subprocess.run(
                [*drop, "sh", str(script), str(REPO)],
                capture_output=True, text=True, timeout=60, env=env, cwd="/",
            )  # fmt: skip
        finally:
            shutil.rmtree(shared, ignore_errors=True)
    assert result.returncode == 1 and "needs root" in result.stderr, result.stderr
    assert result.stdout == ""


def _fake_agent_wheel(directory: Path) -> Path:
    """A tiny real wheel with an ``edge-agent`` entry point: installs offline in a second."""
    dist = "fake_edge_agent-0.0.1.dist-info"
    files = {
        "fake_edge_agent.py": (
            "import sys\n\ndef main():\n    print('fake edge-agent', *sys.argv[1:])\n"
        ),
        f"{dist}/METADATA": "Metadata-Version: 2.1\nName: fake-edge-agent\nVersion: 0.0.1\n",
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
        "Tag: py3-none-any\n",
        f"{dist}/entry_points.txt": "[console_scripts]\nedge-agent = fake_edge_agent:main\n",
    }
    record = []
    for name, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=")
        record.append(f"{name},sha256={digest.decode()},{len(text.encode())}")
    record.append(f"{dist}/RECORD,,")
    files[f"{dist}/RECORD"] = "\n".join(record) + "\n"
    wheel = directory / "fake_edge_agent-0.0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for name, text in files.items():
            zf.writestr(name, text)
    return wheel


@pytest.mark.slow
def test_install_into_a_prefix_for_real(tmp_path: Path) -> None:
    root = tmp_path / "root"
    wheel = _fake_agent_wheel(tmp_path)
    before = _snapshot(SYSTEM_PATHS)
    result = _install("--prefix", root, "--python", sys.executable, wheel)
    assert result.returncode == 0, result.stdout + result.stderr

    link = root / "usr/local/bin/edge-agent"
    assert link.is_symlink()
    run = subprocess.run([str(link), "run", "--config", "x"], capture_output=True, text=True)
    assert run.stdout.strip() == "fake edge-agent run --config x"
    assert (root / "etc/systemd/system/edge-agent.service").read_text() == UNIT.read_text()
    conf = root / "etc/edge-agent/agent.toml"
    assert conf.read_text() == EXAMPLE.read_text()
    assert stat.S_IMODE(conf.stat().st_mode) == 0o644
    assert stat.S_IMODE((root / "etc/edge-agent/credentials").stat().st_mode) == 0o700
    assert (root / "etc/edge-agent/trusted-keys").is_dir()
    assert _snapshot(SYSTEM_PATHS) == before

    conf.write_text("# edited on the device\n")  # a re-run upgrades and keeps the config
    again = _install("--prefix", root, "--python", sys.executable, wheel)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "exists: upgrading" in again.stdout and "exists: kept as it is" in again.stdout
    assert conf.read_text() == "# edited on the device\n"
