"""BadNets (Gu et al., 2017): a patch pasted at a fixed location; dirty label.

Default trigger: BackdoorBench's 3x3 white square in the bottom-right corner, applied as
``img * (T == 0) + T * (T > 0)`` (reference §6.1). A user patch, mask and location can be given.
"""

from __future__ import annotations

import numpy as np
import torch

from ccpurify.attacks._util import as_uint8_image
from ccpurify.attacks.base import Attack
from ccpurify.attacks.registry import register_attack
from ccpurify.errors import InvalidInputError


@register_attack
class BadNets(Attack):
    name = "badnets"

    def __init__(
        self,
        target: int = 0,
        poison_ratio: float = 0.1,
        seed: int = 0,
        patch=None,
        mask=None,
        location: tuple[int, int] | None = None,
        patch_size: int = 3,
    ) -> None:
        """``patch``: (h, w, 3) uint8 image (default white ``patch_size`` square); ``mask``: (h, w)
        booleans, which patch pixels replace the image (default: pixels > 0); ``location``: (row,
        col) of the patch's top-left corner, negative values count from the bottom/right (default:
        flush with the bottom-right corner)."""
        super().__init__(target, poison_ratio, seed)
        self.patch = (
            np.full((patch_size, patch_size, 3), 255, np.uint8) if patch is None else as_uint8_image(patch, "patch")
        )
        h, w = self.patch.shape[:2]
        self.mask = self.patch.max(axis=2) > 0 if mask is None else np.asarray(mask, dtype=bool)
        if self.mask.shape != (h, w):
            raise InvalidInputError(f"mask must have the patch's shape {(h, w)}, got {self.mask.shape}")
        self.location = None if location is None else (int(location[0]), int(location[1]))

    def _origin(self, height: int, width: int) -> tuple[int, int]:
        h, w = self.patch.shape[:2]
        if self.location is None:
            r, c = height - h, width - w
        else:
            r, c = self.location
            r, c = (r + height if r < 0 else r), (c + width if c < 0 else c)
        if not (0 <= r <= height - h and 0 <= c <= width - w):
            raise InvalidInputError(f"patch {h}x{w} at {self.location} does not fit in {height}x{width} images")
        return r, c

    def _apply(self, images: np.ndarray) -> np.ndarray:
        out = images.copy()
        r, c = self._origin(*images.shape[1:3])
        h, w = self.patch.shape[:2]
        region = out[:, r : r + h, c : c + w]
        region[:, self.mask] = self.patch[self.mask]
        return out

    def params(self) -> dict:
        return {"location": self.location}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"patch": torch.from_numpy(self.patch.copy()), "mask": torch.from_numpy(self.mask.astype(np.uint8))}
