"""Small helpers shared by the trigger implementations."""

from __future__ import annotations

import numpy as np
import torch

from ccpurify.errors import InvalidInputError


def to_uint8(values: np.ndarray) -> np.ndarray:
    """Round and clip float pixel values to uint8."""
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def as_uint8_image(array, name: str, channels: int = 3) -> np.ndarray:
    """Validate a user-supplied HxWxC uint8 image (a patch, a key)."""
    arr = np.asarray(array.detach().cpu().numpy() if isinstance(array, torch.Tensor) else array)
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], channels, axis=2)
    if arr.ndim != 3 or arr.shape[2] != channels:
        raise InvalidInputError(f"{name} must be an (H, W, {channels}) image, got shape {arr.shape}")
    if arr.dtype != np.uint8:
        if arr.min() < 0 or arr.max() > 255:
            raise InvalidInputError(f"{name} values must be in [0, 255]")
        arr = arr.astype(np.uint8)
    return arr


def check_size(images: np.ndarray, trigger: np.ndarray, name: str) -> None:
    if images.shape[1:3] != trigger.shape[:2]:
        raise InvalidInputError(
            f"{name} is {trigger.shape[0]}x{trigger.shape[1]} but the images are "
            f"{images.shape[1]}x{images.shape[2]}; build the attack with image_size={images.shape[1]}"
        )
