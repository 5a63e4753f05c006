"""Argument types the commands share: numbers that must make sense before anything runs
(argparse turns the ArgumentTypeError into a usage error, exit 2)."""

from __future__ import annotations

import argparse
import math


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def positive_seconds(text: str) -> float:
    """A duration: finite and above zero (0 or nan would make a timer fire at once, or
    never; inf overflows the clock)."""
    value = float(text)
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds above 0, not {text}")
    return value
