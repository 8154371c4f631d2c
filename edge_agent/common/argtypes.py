"""argparse types shared by the command lines (``edge-agent``, ``edge-convert``)."""

from __future__ import annotations

import argparse


def float_list(text: str) -> tuple[float, ...]:
    """``--mean 0.485,0.456,0.406`` → ``(0.485, 0.456, 0.406)``."""
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None


__all__ = ["float_list"]
