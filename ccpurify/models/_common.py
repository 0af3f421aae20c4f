"""Helpers shared by the zoo's factories."""

from __future__ import annotations

from torch import nn

from ccpurify.errors import InvalidInputError


def scaled(channels: int, width: float) -> int:
    """Channel count ``channels`` scaled by ``width``, at least 1."""
    if width <= 0:
        raise InvalidInputError(f"width must be > 0, got {width}")
    return max(1, int(round(channels * width)))


def make_stage(block: type[nn.Module], in_planes: int, planes: int, num_blocks: int, stride: int) -> nn.Sequential:
    """``num_blocks`` residual blocks; the first one changes the width and applies the stride."""
    strides = [stride] + [1] * (num_blocks - 1)
    return nn.Sequential(*[block(in_planes if i == 0 else planes, planes, s) for i, s in enumerate(strides)])
