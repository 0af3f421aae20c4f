"""Command-line number types shared by ``ccpurify``'s CLI and ``python -m exporters.latency`` (no
torch, so the device benchmark can use them): a bad value is an argparse usage error (exit 2)."""

from __future__ import annotations

import argparse
import math


def at_least(minimum: int):
    """argparse type: an integer >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected a number >= {minimum}, got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def _finite(text: str, above_zero: bool, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if not (math.isfinite(value) and (value > 0 if above_zero else value >= 0)):
        raise argparse.ArgumentTypeError(f"expected {what} {'> 0' if above_zero else '>= 0'}, got {text}")
    return value


def non_negative(text: str) -> float:
    """argparse type: a finite number >= 0."""
    return _finite(text, False, "a finite number")


def positive_seconds(text: str) -> float:
    """argparse type: a finite number of seconds > 0."""
    return _finite(text, True, "a number of seconds")
