"""Helpers shared by the zoo's factories."""

from __future__ import annotations


def scaled(channels: int, width: float) -> int:
    """Channel count ``channels`` scaled by ``width``, at least 1."""
    if width <= 0:
        raise ValueError(f"width must be > 0, got {width}")
    return max(1, int(round(channels * width)))
