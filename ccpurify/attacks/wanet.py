"""WaNet (Nguyen & Tran, 2021): a fixed smooth warping field; batch-level poisoning with "noise mode".

Field (reference §6.3): ``ins ~ U(-1, 1)^(2, k, k)`` normalised by its mean absolute value,
bicubically upsampled to the image size, scaled by ``s / H`` and added to the identity sampling grid,
clamped to [-1, 1]. During training each batch of size B gets ``int(ratio * B)`` warped samples
relabelled to the target and ``int(that * cross_ratio)`` "cross" samples warped by the field plus
fresh random noise, keeping their labels. Test images are warped by the field and stored as uint8.

Deviation, documented: the training batch is augmented with the harness's crop/flip rather than
BackdoorBench's crop-5/rotation-10 post-transform.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F

from ccpurify.attacks.base import Attack, BatchPoisoner
from ccpurify.attacks.registry import register_attack
from ccpurify.errors import InvalidInputError


def warping_field(
    seed: int, image_size: int = 32, k: int = 4, s: float = 0.5, grid_rescale: float = 1.0
) -> torch.Tensor:
    """The (1, H, W, 2) sampling grid of WaNet for ``grid_sample``."""
    g = torch.Generator().manual_seed(seed)
    ins = torch.rand(1, 2, k, k, generator=g) * 2 - 1
    ins = ins / ins.abs().mean()
    noise = F.interpolate(ins, size=image_size, mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
    lin = torch.linspace(-1, 1, image_size)
    x, y = torch.meshgrid(lin, lin, indexing="ij")
    identity = torch.stack((y, x), dim=2)[None]
    return torch.clamp((identity + s * noise / image_size) * grid_rescale, -1, 1)


def warp(x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Resample float NCHW images along ``grid`` (1 or N grids)."""
    if grid.shape[0] == 1 and x.shape[0] != 1:
        grid = grid.expand(x.shape[0], -1, -1, -1)
    return F.grid_sample(x, grid.to(x.dtype), mode="bilinear", padding_mode="zeros", align_corners=True)


@register_attack
class WaNet(Attack):
    name = "wanet"
    batch_level = True

    def __init__(
        self,
        target: int = 0,
        poison_ratio: float = 0.1,
        seed: int = 0,
        k: int = 4,
        s: float = 0.5,
        grid_rescale: float = 1.0,
        cross_ratio: float = 2.0,
        image_size: int = 32,
        grid=None,
    ) -> None:
        """``grid``: a user (1, H, W, 2) sampling grid in [-1, 1]; default built from the seed."""
        super().__init__(target, poison_ratio, seed)
        self.k, self.s, self.grid_rescale, self.cross_ratio = int(k), float(s), float(grid_rescale), float(cross_ratio)
        if grid is None:
            self.grid = warping_field(seed, image_size, self.k, self.s, self.grid_rescale)
        else:
            self.grid = torch.as_tensor(np.asarray(grid), dtype=torch.float32)
            if self.grid.ndim != 4 or self.grid.shape[0] != 1 or self.grid.shape[-1] != 2:
                raise InvalidInputError(f"grid must have shape (1, H, W, 2), got {tuple(self.grid.shape)}")

    def _apply(self, images: np.ndarray) -> np.ndarray:
        if images.shape[1:3] != tuple(self.grid.shape[1:3]):
            raise InvalidInputError(
                f"the warping field is {tuple(self.grid.shape[1:3])}, the images {images.shape[1:3]}"
            )
        out = np.empty_like(images)
        for start in range(0, len(images), 1024):
            x = torch.from_numpy(images[start : start + 1024]).permute(0, 3, 1, 2).float() / 255.0
            warped = warp(x, self.grid) * 255.0
            out[start : start + 1024] = warped.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
        return out

    def batch_poisoner(self, device: torch.device | str = "cpu") -> BatchPoisoner:
        return _WaNetPoisoner(self, torch.device(device))

    def params(self) -> dict:
        return {"k": self.k, "s": self.s, "grid_rescale": self.grid_rescale, "cross_ratio": self.cross_ratio}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"grid": self.grid.contiguous()}


class _WaNetPoisoner(BatchPoisoner):
    def __init__(self, attack: WaNet, device: torch.device) -> None:
        self.attack = attack
        self.grid = attack.grid.to(device)

    def __call__(self, x, y, generator):
        n = x.shape[0]
        n_bd = int(self.attack.poison_ratio * n)
        n_cross = min(int(n_bd * self.attack.cross_ratio), n - n_bd)
        x, y = x.clone(), y.clone()
        if n_bd:
            x[:n_bd] = warp(x[:n_bd], self.grid)
            y[:n_bd] = self.attack.target
        if n_cross:
            h = x.shape[-1]
            jitter = torch.rand(n_cross, h, h, 2, generator=generator, device=x.device) * 2 - 1
            grids = torch.clamp(self.grid + jitter / h, -1, 1)
            x[n_bd : n_bd + n_cross] = warp(x[n_bd : n_bd + n_cross], grids)
        return x, y, None
