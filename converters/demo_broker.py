"""A loopback MQTT broker for ``make demo``: Mosquitto on a free 127.0.0.1 port when it is
installed, else amqtt (pure Python, MQTT 3.1.1: the agent and edgectl fall back to it), so that
the demo needs nothing from apt. The test suite's brokers (``tests/broker.py``) start amqtt with
the same script."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

#: an amqtt broker on 127.0.0.1:<argv[1]>, printing "ready" once it listens
AMQTT_SCRIPT = """
import asyncio, sys
from amqtt.broker import Broker
cfg = {"listeners": {"default": {"type": "tcp", "bind": "127.0.0.1:%d" % int(sys.argv[1])}},
       "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}}}
async def main():
    broker = Broker(cfg)
    await broker.start()
    print("ready", flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def find_mosquitto() -> str | None:
    """The mosquitto binary, or None when it is not installed."""
    found = shutil.which("mosquitto")
    if found:
        return found
    return "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").is_file() else None


class LoopbackBroker:
    """Mosquitto (or amqtt) on a free 127.0.0.1 port, for the demo's lifetime."""

    def __init__(self, workdir: Path, *, prefer: str = "auto") -> None:
        self.workdir = workdir
        self.prefer = prefer  # "auto": Mosquitto when installed, else amqtt
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.kind = ""

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def __enter__(self) -> LoopbackBroker:
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = (self.workdir / "broker.log").open("wb")
        binary = find_mosquitto() if self.prefer != "amqtt" else None
        if binary:
            conf = self.workdir / "mosquitto.conf"
            lines = [f"listener {self.port} 127.0.0.1", "allow_anonymous true"]
            if os.name == "posix" and os.geteuid() == 0:
                lines.append("user root")
            conf.write_text("\n".join(lines) + "\n")
            cmd, self.kind = [binary, "-c", str(conf)], "mosquitto"
        else:
            import importlib.util

            if importlib.util.find_spec("amqtt") is None:
                raise SystemExit(
                    "make demo needs an MQTT broker: install mosquitto, or pip install amqtt"
                )
            cmd, self.kind = [sys.executable, "-c", AMQTT_SCRIPT, str(self.port)], "amqtt"
        with log:  # the child has its own descriptor
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"the {self.kind} broker exited; see {self.workdir}/broker.log")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.05)
        self.__exit__()
        raise SystemExit(f"the {self.kind} broker did not accept connections on {self.port}")

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()


__all__ = ["AMQTT_SCRIPT", "LoopbackBroker", "find_mosquitto", "free_port"]
