"""uint8 <-> float conversions of the harness's NHWC image arrays; the tensor transforms (normalise, crop,
flip) live in ``ccpurify.transforms`` and are re-exported here.

Triggers are applied to uint8 images before any of these (docs/protocol.md, "Data").
"""

from __future__ import annotations

import torch

from ccpurify.errors import InvalidInputError
from ccpurify.transforms import Augment, Normalize, random_crop, random_hflip

__all__ = ["Augment", "Normalize", "random_crop", "random_hflip", "to_float", "to_uint8"]


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W, C) -> float32 (N, C, H, W) in [0, 1] (what ToTensor does)."""
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise InvalidInputError(f"expected uint8 NHWC images, got {images.dtype} {tuple(images.shape)}")
    # contiguous NCHW: channels-last tensors hang oneDNN's strided 1x1 conv backward (ccpurify.passes.data)
    return images.permute(0, 3, 1, 2).contiguous().float().div_(255.0)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float (N, C, H, W) in [0, 1] -> uint8 (N, H, W, C), rounding and clipping."""
    return x.mul(255.0).round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()
