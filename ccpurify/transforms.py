"""Batched tensor transforms the passes use on model-ready images: normalisation, random crop, flip.

They live in the core (not in ``ccpurify.data``) so that a pass needs no dataset code. Random
transforms take an explicit ``torch.Generator`` so every pass is reproducible from a seed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from ccpurify.errors import InvalidInputError


@dataclass(frozen=True)
class Normalize:
    """Per-channel ``(x - mean) / std`` on NCHW tensors; also exposed as a module for export."""

    mean: Sequence[float]
    std: Sequence[float]

    def __post_init__(self) -> None:
        """One mean and one std per channel, finite, std > 0: a zero std made every image infinite and
        a trigger search then saw no backdoor, in a run that ended normally."""
        try:
            mean, std = [float(v) for v in self.mean], [float(v) for v in self.std]
        except (TypeError, ValueError) as exc:
            raise InvalidInputError(
                f"normalize takes (mean, std), sequences of numbers, got {self.mean!r}, {self.std!r}"
            ) from exc
        if not mean or len(mean) != len(std):
            raise InvalidInputError(
                f"normalize needs one mean and one std per input channel, got {len(mean)} and {len(std)}"
            )
        if not all(math.isfinite(v) for v in mean + std) or min(std) <= 0:
            raise InvalidInputError(f"normalize needs finite means and stds > 0, got mean {mean} and std {std}")
        object.__setattr__(self, "mean", tuple(mean))  # plain floats: numpy scalars or strings are not kept
        object.__setattr__(self, "std", tuple(std))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        mean = torch.as_tensor(self.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.as_tensor(self.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        return (x - mean) / std


def as_normalize(value: Normalize | tuple | None) -> Normalize | None:
    """A ``Normalize`` from a ``Normalize`` or ``(mean, std)``; None stays None."""
    if value is None or isinstance(value, Normalize):
        return value
    try:
        mean, std = value
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"normalize takes (mean, std), got {value!r}") from exc
    return Normalize(tuple(mean), tuple(std))


def random_crop(x: torch.Tensor, padding: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Zero-pad each image by ``padding`` and crop back to its size at a random offset per image."""
    if padding <= 0:
        return x
    n, c, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=x.device)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chan = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, chan, rows, cols]


def random_hflip(x: torch.Tensor, generator: torch.Generator | None = None, p: float = 0.5) -> torch.Tensor:
    """Mirror each image left-right with probability ``p``."""
    flip = torch.rand(x.shape[0], generator=generator, device=x.device) < p
    return torch.where(flip[:, None, None, None], x.flip(3), x)


@dataclass(frozen=True)
class Augment:
    """The protocol's train augmentation: random crop with padding, optional horizontal flip."""

    crop_padding: int = 4
    hflip: bool = True

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        x = random_crop(x, self.crop_padding, generator)
        return random_hflip(x, generator) if self.hflip else x
