"""Helpers for the MQTT / OTA tests: real signed bundles (and faulty ones, repacked from a real
one and signed again, so that each fault is exactly one thing), and ``edge-agent`` processes
run against a real broker; for the fleet database (``tests/test_fleetdb.py``,
``benchmarks/fleet.py``): a PostgreSQL database of one's own and ``edgectl collect fleet``
processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import psycopg
import pytest

from converters.demo_live import digits_video

if TYPE_CHECKING:
    from tests.broker import Broker

EDGE_AGENT = str(Path(sys.executable).parent / "edge-agent")
EDGECTL = str(Path(sys.executable).parent / "edgectl")
#: The checkout under test, first on the children's path: the console scripts above would
#: otherwise import whichever checkout the venv was installed from (a shared venv, a worktree).
REPO = str(Path(__file__).resolve().parents[1])


def checkout_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """``os.environ`` with this checkout first on ``PYTHONPATH``, then ``extra``."""
    path = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, **(extra or {})}


def repack(
    src: Path,
    out: Path,
    *,
    trusted: Mapping[str, Any],
    signing_key: Path,
    version: str | None = None,
    profiles: Sequence[str] | None = None,
    artifact: Callable[[bytes], bytes] | None = None,
    golden: str = "keep",  # keep | recompute | drop
) -> Path:
    """A copy of bundle ``src`` with one thing changed, signed with ``signing_key``."""
    from edge_agent.model.bundle import _ARTIFACT_KEYS, ArtifactInput, extract_bundle, write_bundle
    from edge_agent.model.keys import load_private_key

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        verified = extract_bundle(src, tmp / "x", trusted_keys=trusted)
        manifest = dict(verified.manifest)
        arts = []
        for entry in manifest.pop("artifacts"):
            path = tmp / "x" / entry["path"]
            if artifact is not None:
                path.write_bytes(artifact(path.read_bytes()))
            extra = {k: v for k, v in entry.items() if k not in _ARTIFACT_KEYS}
            arts.append(
                ArtifactInput(
                    path=path,
                    format=entry["format"],
                    precision=entry["precision"],
                    profiles=tuple(profiles) if profiles is not None else tuple(entry["profiles"]),
                    extra=extra,
                    name=entry["path"],
                )
            )
        manifest.pop("files", None)
        manifest.pop("schema", None)
        manifest.pop("created", None)
        if version is not None:
            manifest["version"] = version
        files: dict[str, Path] = {}
        g = manifest.get("golden")
        if g and golden == "drop":
            manifest["golden"] = None
        elif g:
            gpath = tmp / "x" / g["file"]
            if golden == "recompute":
                import onnxruntime as ort

                with np.load(gpath, allow_pickle=False) as data:
                    arrays = {k: data[k] for k in data.files}
                for a in arts:
                    sess = ort.InferenceSession(str(a.path), providers=["CPUExecutionProvider"])
                    feeds = {name: arrays[key] for name, key in g["inputs"].items()}
                    outs = sess.run(None, feeds)
                    for o, value in zip(sess.get_outputs(), outs):
                        arrays[g["expected"][a.archive_name][o.name]] = value
                with open(gpath, "wb") as fh:
                    np.savez(fh, **arrays)  # type: ignore[arg-type]
            files[g["file"]] = gpath
        write_bundle(
            out,
            manifest=manifest,
            artifacts=arts,
            files=files,
            signing_key=load_private_key(signing_key),
        )
    return out


def add_traversal_member(src: Path, out: Path) -> Path:
    """The bundle (a gzip tar) rebuilt with one extra member whose path climbs out of it."""
    import io

    with tarfile.open(src, "r:gz") as tar, tarfile.open(out, "w:gz") as new:
        for member in tar.getmembers():
            new.addfile(member, tar.extractfile(member))
        payload = b"owned\n"
        info = tarfile.TarInfo("../../escaped.txt")
        info.size = len(payload)
        new.addfile(info, io.BytesIO(payload))
    return out


def agent_config(
    *,
    broker: str,
    device: str,
    state_dir: Path,
    model: Path,
    source: str,
    keys: Path,
    pace: str = "none",
    results: str | None = None,
    telemetry_interval: float = 1.0,
    mqtt_extra: str = "",
    extra: str = "",
) -> str:
    sinks = f'sinks = ["jsonl:{results}"]' if results else "sinks = []"
    return f"""
[agent]
device_id = "{device}"
profile = "x86-64"
state_dir = "{state_dir}"

[model]
path = "{model}"
trusted_keys = ["{keys}"]

[source]
uri = "{source}"
pace = "{pace}"

[results]
{sinks}

[mqtt]
broker = "{broker}"
flush_timeout = 20
{mqtt_extra}

[telemetry]
interval = {telemetry_interval}
monitor_every = 2

[ota]
health_window = 2.0
health_min_frames = 5
transfer_timeout = 5.0
{extra}
"""


class AgentProcess:
    """``edge-agent run --config FILE`` in a child process, its stderr in a log file."""

    def __init__(
        self,
        workdir: Path,
        config_text: str,
        *,
        env: Mapping[str, str] | None = None,
        args: Sequence[str] = (),
        name: str = "agent",
    ) -> None:
        self.workdir = workdir
        self.config = workdir / f"{name}.toml"
        self.config.write_text(config_text)
        self.log = workdir / f"{name}.log"
        self.env = checkout_env(env)
        self.args = list(args)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> AgentProcess:
        fh = self.log.open("ab")
        self.proc = subprocess.Popen(
            [EDGE_AGENT, "run", "--config", str(self.config), *self.args],
            stdout=subprocess.DEVNULL,
            stderr=fh,
            env=self.env,
        )
        fh.close()
        return self

    def wait(self, timeout: float = 60.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def __enter__(self) -> AgentProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()


def payloads(messages: Sequence[Any], suffix: str) -> list[dict[str, Any]]:
    out = []
    for m in messages:
        if m.topic.endswith(suffix) and m.payload:
            out.append(json.loads(m.payload))
    return out


def events(messages: Sequence[Any], kind: str | None = None) -> list[dict[str, Any]]:
    evs = payloads(messages, "/events")
    return [e for e in evs if kind is None or e["kind"] == kind]


def wait_until(predicate: Callable[[], bool], *, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def provisioned_config(
    home: Path, *, broker: str, fleet_env: Mapping[str, Any], state_dir: Path
) -> str:
    """An agent config with the ``[mqtt]`` lines ``edgectl provision`` wrote into
    ``home/agent.toml`` (run it with ``CREDENTIALS_DIRECTORY=home``), serving the digits video."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib

    mqtt = tomllib.loads((home / "agent.toml").read_text())["mqtt"]
    mqtt.pop("broker", None)
    return agent_config(
        broker=broker, device=home.name, state_dir=state_dir,
        model=fleet_env["root"] / "digits-1.0.0.edgebundle", keys=fleet_env["pub"],
        source=f"file:{fleet_env['video']}?loop=1&live=1",
        mqtt_extra="\n".join(f"{k} = {json.dumps(v)}" for k, v in mqtt.items()),
    )  # fmt: skip


def wait_serving(reader: Any, agent: AgentProcess, *, timeout: float = 30.0) -> None:
    """Until ``reader`` (a Collector on the device's results and telemetry) has both; the
    agent's log in the failure."""
    try:
        reader.wait_for(
            lambda m: bool(payloads(m, "/results")) and bool(payloads(m, "/telemetry")),
            timeout=timeout,
        )
    except AssertionError as exc:
        raise AssertionError(f"{exc}; log: {agent.text()[-2000:]}") from None


SECURITY_DOC = Path(REPO) / "docs" / "security.md"


def doc_steps(heading: str, *, doc: Path = SECURITY_DOC) -> list[str]:
    """The shell lines of the first ```sh block under ``heading`` (comments stripped)."""
    text = doc.read_text().split(heading, 1)[1]
    block = text.split("```sh\n", 1)[1].split("```", 1)[0]
    return [line.split("#", 1)[0].strip() for line in block.splitlines() if line.strip()]


def run_doc_steps(steps: Sequence[str], *, cwd: Path) -> None:
    """Run ``edgectl`` lines as written, in ``cwd`` (``> FILE`` redirects stdout there)."""
    import shlex

    for line in steps:
        argv, _, redirect = line.partition(">")
        words = shlex.split(argv)
        assert words[0] == "edgectl", line
        run = subprocess.run([EDGECTL, *words[1:]], capture_output=True, text=True, cwd=cwd,
                             env=checkout_env(), timeout=60)  # fmt: skip
        assert run.returncode == 0, (line, run.stderr)
        if redirect:
            (cwd / redirect.strip()).write_text(run.stdout)


def edgectl(
    *args: str, broker: str = "mqtt://127.0.0.1:1", timeout: float = 60.0
) -> subprocess.CompletedProcess[str]:
    """``edgectl ARGS`` as a process (the default broker: a port nobody listens on, for the
    commands that need none)."""
    return subprocess.run(
        [EDGECTL, "--broker", broker, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=checkout_env(),
    )


@pytest.fixture(scope="session", name="fleet_env")
def fleet_env_fixture(
    tmp_path_factory: pytest.TempPathFactory, digits: Any, keys: Any
) -> dict[str, Any]:
    """Signed digits bundles v1.0.0 and v1.1.0 and a 120-frame digits video."""
    from converters.cli import main as edge_convert

    root = tmp_path_factory.mktemp("fleet")
    with np.load(digits.eval) as d:
        x = d["x"][:120]
    digits_video(root / "digits.mp4", x)
    for version in ("1.0.0", "1.1.0"):
        code = edge_convert(
            [
                "build", str(digits.onnx), "--profile", "x86-64", "--calibration",
                str(digits.calibration), "--sign-key", str(keys[0]), "--name", "digits",
                "--version", version, "-o", str(root / f"digits-{version}.edgebundle"),
                "--latency-seconds", "0.2",
            ]
        )  # fmt: skip
        assert code == 0
    return {"root": root, "video": root / "digits.mp4", "key": keys[0], "pub": keys[1]}


# --- the fleet database (issue 17) ----------------------------------------------------------

ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"


def admin_connection() -> psycopg.Connection:
    try:
        return psycopg.connect(ADMIN, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:  # a failure, not a skip: the tests need it
        raise RuntimeError(
            f"PostgreSQL at 127.0.0.1:5432 (user postgres, trust auth) is needed: {exc}"
        ) from None


class Database:
    """A database of its own, dropped at the end."""

    def __init__(self) -> None:
        self.name = f"edge_test_{uuid.uuid4().hex[:12]}"
        with admin_connection() as conn:
            conn.execute(f'CREATE DATABASE "{self.name}"')
        self.url = f"postgresql://postgres@127.0.0.1:5432/{self.name}"

    def connect(self) -> psycopg.Connection:
        return psycopg.connect(self.url, autocommit=True)

    def scalar(self, query: str, params: Any = None) -> Any:
        with self.connect() as conn:
            row = conn.execute(query, params).fetchone()
        return row[0] if row else None

    def drop(self) -> None:
        with admin_connection() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')


class CollectorProcess:
    """``edgectl collect fleet`` in a child process; its stderr in a log file."""

    def __init__(self, workdir: Path, broker: Broker, database: Database, client_id: str,
                 *extra: str, group: str = "edge-collectors") -> None:  # fmt: skip
        self.log = workdir / f"{client_id}.log"
        self.argv = [
            EDGECTL, "--broker", broker.url, "collect", "fleet", "--db", database.url,
            "--client-id", client_id, "--share-group", group, "--batch-ms", "50", *extra,
        ]  # fmt: skip
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> CollectorProcess:
        # counted before the start: a restarted collector may log before we read the log
        starts = self.log.read_text().count("collecting as") if self.log.exists() else 0
        with self.log.open("a") as err:
            self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=err,
                                         text=True, env=checkout_env())  # fmt: skip
        wait_until(
            lambda: self.log.read_text().count("collecting as") > starts or self._exited(),
            timeout=30.0, what=f"collector ready ({self.log})",
        )  # fmt: skip
        assert not self._exited(), self.log.read_text()
        return self

    def _exited(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        if self.proc.stdout:
            self.proc.stdout.close()

    def stop(self) -> dict[str, Any]:
        """SIGTERM: the drain, then its summary line."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=30)
        assert self.proc.returncode == 0, self.log.read_text()
        return dict(json.loads(out.strip().splitlines()[-1]))

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
