"""Blended (Chen et al., 2017): ``x' = (1 - alpha) * x + alpha * K`` over the whole image; dirty label.

The default key is a seeded smooth random image (bicubic upsample of a small uniform-random image,
docs/protocol.md) instead of BackdoorBench's copyrighted picture; alpha = 0.2 at train and test.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F

from ccpurify.attacks._util import as_uint8_image, check_size, to_uint8
from ccpurify.attacks.base import Attack
from ccpurify.attacks.registry import register_attack
from ccpurify.errors import InvalidInputError


def smooth_random_key(seed: int, image_size: int = 32, grid: int = 8) -> np.ndarray:
    """A (S, S, 3) uint8 key: a ``grid`` x ``grid`` uniform-random image upsampled bicubically."""
    g = torch.Generator().manual_seed(seed)
    small = torch.rand(1, 3, grid, grid, generator=g) * 255.0
    big = F.interpolate(small, size=(image_size, image_size), mode="bicubic", align_corners=False)
    return to_uint8(big[0].permute(1, 2, 0).numpy())


@register_attack
class Blended(Attack):
    name = "blended"

    def __init__(
        self,
        target: int = 0,
        poison_ratio: float = 0.1,
        seed: int = 0,
        key=None,
        alpha: float = 0.2,
        image_size: int = 32,
        key_grid: int = 8,
    ) -> None:
        """``key``: a user (H, W, 3) uint8 image to blend in; default a seeded smooth random key."""
        super().__init__(target, poison_ratio, seed)
        if not 0.0 < alpha <= 1.0:
            raise InvalidInputError(f"alpha must be in (0, 1], got {alpha}")
        self.alpha = float(alpha)
        self.key = smooth_random_key(seed, image_size, key_grid) if key is None else as_uint8_image(key, "key")

    def _apply(self, images: np.ndarray) -> np.ndarray:
        check_size(images, self.key, "the blend key")
        return to_uint8((1.0 - self.alpha) * images.astype(np.float32) + self.alpha * self.key.astype(np.float32))

    def params(self) -> dict:
        return {"alpha": self.alpha}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"key": torch.from_numpy(self.key.copy())}
