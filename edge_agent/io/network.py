"""Sensor lines over the network: UDP datagrams on a bound port, live."""

from __future__ import annotations

import socket

from edge_agent.common.backoff import DEFAULT_BACKOFF, BackoffPolicy
from edge_agent.errors import SourceError, first_line
from edge_agent.io.sensors import SensorSource
from edge_agent.io.source import (
    POLL_S,
    WindowSpec,
)


class UdpSensorSource(SensorSource):
    """Datagrams of sample lines (one or more complete lines each) on a bound UDP port: live.
    Port 0 binds a free port; ``address`` tells which."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        window: WindowSpec,
        uri: str | None = None,
        reconnect: BackoffPolicy = DEFAULT_BACKOFF,
    ) -> None:
        super().__init__(
            uri or f"sensor:udp://{host}:{port}", window=window, live=True, reconnect=reconnect
        )
        self.host, self.port = host, port
        self._sock: socket.socket | None = None
        self._buf = bytearray(65536)
        self._view = memoryview(self._buf)
        self._address: tuple[str, int] | None = None

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port), once open."""
        if self._address is None:
            raise SourceError(f"{self._label}: not bound yet; call open() first")
        return self._address

    def _connect(self) -> None:
        sock = None
        try:
            family, _, _, _, addr = socket.getaddrinfo(
                self.host, self.port, type=socket.SOCK_DGRAM
            )[0]
            sock = socket.socket(family, socket.SOCK_DGRAM)
            sock.bind(addr)
            sock.settimeout(POLL_S)
            bound = sock.getsockname()
        except OSError as exc:
            if sock is not None:
                sock.close()
            raise SourceError(
                f"{self._label}: cannot bind {self.host}:{self.port}: {first_line(exc)}; "
                "pick a free port or a local address"
            ) from exc
        self._sock = sock
        self._address = (str(bound[0]), int(bound[1]))

    def _read_more(self, deadline: float | None) -> bool:
        """One datagram (the socket's own timeout, ``POLL_S``, bounds the wait)."""
        sock = self._sock
        if sock is None:
            raise SourceError(f"{self._label}: socket closed")
        try:
            n = sock.recv_into(self._buf)
        except socket.timeout:
            return False
        self._windows.feed(bytes(self._view[:n]).split(b"\n"))
        return True

    def _disconnect(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


__all__ = [
    "UdpSensorSource",
]
