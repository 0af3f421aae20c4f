"""Additive-signal attacks: SIG (clean label) and LF (low frequency, dirty label).

Both add a fixed float pattern to the uint8 image and clip: ``x' = clip(x + P)``.

- SIG (Barni et al., 2019): ``P[i, j] = delta * sin(2 pi j f / W)``, delta 40, f 6, the same at
  train and test; clean label, so only target-class training images are poisoned (reference §6.6).
- LF (Zeng et al., 2021): BackdoorBench ships a universal adversarial perturbation that was
  Gaussian-smoothed. We build it from a seeded recipe instead (reference §6.5, option b): a random
  field per channel, blurred by a Gaussian with sigma 6 px, min-max scaled to [0, 0.2 * 255].
"""

from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F

from ccpurify.attacks._util import check_size, to_uint8
from ccpurify.attacks.base import Attack
from ccpurify.attacks.registry import register_attack


class AdditiveAttack(Attack):
    """Adds ``self.pattern`` (H, W, 3) float32 to the image and clips."""

    pattern: np.ndarray

    def _apply(self, images: np.ndarray) -> np.ndarray:
        check_size(images, self.pattern, f"the {self.name} pattern")
        return to_uint8(images.astype(np.float32) + self.pattern)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"pattern": torch.from_numpy(np.ascontiguousarray(self.pattern, dtype=np.float32))}


def sinusoid(delta: float, frequency: float, image_size: int = 32) -> np.ndarray:
    cols = np.arange(image_size, dtype=np.float32)
    row = delta * np.sin(2.0 * np.pi * cols * frequency / image_size)
    return np.broadcast_to(row[None, :, None], (image_size, image_size, 3)).astype(np.float32)


@register_attack
class SIG(AdditiveAttack):
    name = "sig"
    label_mode = "clean"

    def __init__(
        self,
        target: int = 0,
        poison_ratio: float = 0.1,
        seed: int = 0,
        delta: float = 40.0,
        frequency: float = 6.0,
        image_size: int = 32,
        pattern=None,
    ) -> None:
        super().__init__(target, poison_ratio, seed)
        self.delta, self.frequency = float(delta), float(frequency)
        self.pattern = sinusoid(delta, frequency, image_size) if pattern is None else np.asarray(pattern, np.float32)

    def params(self) -> dict:
        return {"delta": self.delta, "frequency": self.frequency}


def gaussian_kernel(sigma: float, taps: int) -> torch.Tensor:
    x = torch.arange(taps, dtype=torch.float64) - (taps - 1) / 2.0
    k = torch.exp(-(x**2) / (2.0 * sigma**2))
    return (k / k.sum()).float()


def low_frequency_pattern(
    seed: int, image_size: int = 32, sigma: float = 6.0, taps: int = 30, peak: float = 0.2
) -> np.ndarray:
    """A smooth random (S, S, 3) float pattern in [0, peak * 255] (separable Gaussian, zero padding)."""
    g = torch.Generator().manual_seed(seed)
    field = torch.randn(3, 1, image_size, image_size, generator=g)
    k = gaussian_kernel(sigma, taps)
    left, right = (taps - 1) // 2, taps // 2
    field = F.conv2d(F.pad(field, (left, right, 0, 0)), k.view(1, 1, 1, -1))
    field = F.conv2d(F.pad(field, (0, 0, left, right)), k.view(1, 1, -1, 1))
    field = field[:, 0].permute(1, 2, 0)
    field = (field - field.min()) / (field.max() - field.min())
    return (field * peak * 255.0).numpy().astype(np.float32)


@register_attack
class LF(AdditiveAttack):
    name = "lf"

    def __init__(
        self,
        target: int = 0,
        poison_ratio: float = 0.1,
        seed: int = 0,
        sigma: float = 6.0,
        peak: float = 0.2,
        image_size: int = 32,
        pattern=None,
    ) -> None:
        """``pattern``: a user (H, W, 3) additive pattern in pixel units; default the seeded recipe."""
        super().__init__(target, poison_ratio, seed)
        self.sigma, self.peak = float(sigma), float(peak)
        self.pattern = (
            low_frequency_pattern(seed, image_size, sigma, peak=peak)
            if pattern is None
            else np.asarray(pattern, np.float32)
        )

    def params(self) -> dict:
        return {"sigma": self.sigma, "peak": self.peak}
