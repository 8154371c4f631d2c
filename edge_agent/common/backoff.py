"""Delays between reconnection attempts, one policy for every reconnecting part (live sources,
the MQTT link)."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from edge_agent.errors import ConfigError


@dataclass(frozen=True)
class BackoffPolicy:
    """``initial * factor**attempt``, capped at ``maximum``, then spread so that many devices do
    not retry in step: by ± ``jitter`` (a fraction) around that value, or, with
    ``full_jitter``, uniformly between ``initial`` and that value."""

    initial: float = 0.5
    maximum: float = 30.0
    factor: float = 2.0
    jitter: float = 0.2
    full_jitter: bool = False

    def __post_init__(self) -> None:
        if not self.initial > 0:
            raise ConfigError(f"reconnect: initial = {self.initial}: must be > 0")
        if not self.maximum >= self.initial:
            raise ConfigError(
                f"reconnect: maximum = {self.maximum}: must be >= initial ({self.initial})"
            )
        if not self.factor >= 1:
            raise ConfigError(f"reconnect: factor = {self.factor}: must be >= 1")
        if not 0 <= self.jitter < 1:
            raise ConfigError(f"reconnect: jitter = {self.jitter}: must be in [0, 1)")

    def delay(self, attempt: int, rng: random.Random) -> float:
        """Seconds to wait before reconnection attempt ``attempt`` (0, 1, 2, …)."""
        growth = attempt * math.log(self.factor)
        if growth >= math.log(self.maximum / self.initial):
            base = self.maximum
        else:
            base = self.initial * self.factor**attempt  # cannot overflow here
        if self.full_jitter:
            return rng.uniform(self.initial, base)
        return base * (1.0 + self.jitter * (2.0 * rng.random() - 1.0))


DEFAULT_BACKOFF = BackoffPolicy()

__all__ = ["DEFAULT_BACKOFF", "BackoffPolicy"]
