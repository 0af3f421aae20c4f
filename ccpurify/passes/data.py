"""Data handed to passes: labelled clean images (RNP, Recover) and unlabelled images (BCU).

Passes see model-ready float tensors (N, C, H, W), already normalised the way the model expects.
``as_labeled`` / ``as_unlabeled`` accept what users have: these classes, ``(x, y)`` tensors, a
``TensorDataset``, a ``DataLoader`` (read once into memory; the pools here are small), or uint8
NHWC arrays plus a ``Normalize``. Shapes and labels are checked against the model up front.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch

from ccpurify.errors import InvalidInputError, InvalidTypeError
from ccpurify.transforms import Augment, Normalize

Data = TypeVar("Data", bound="UnlabeledData")


def capped(count: int, cap: int | None) -> int:
    """How many of ``count`` images a pass that uses at most ``cap`` of them (None: all) uses."""
    return count if cap is None else min(count, cap)


@dataclass
class UnlabeledData:
    x: torch.Tensor

    def __post_init__(self) -> None:
        if not isinstance(self.x, torch.Tensor) or self.x.ndim != 4 or not self.x.is_floating_point():
            raise InvalidInputError(
                f"images must be a float tensor (N, C, H, W); got {getattr(self.x, 'dtype', type(self.x))} "
                f"{tuple(getattr(self.x, 'shape', ()))}"
            )
        if len(self.x) == 0:
            raise InvalidInputError(
                "no images were given (an empty set); pass at least one image or use a data-free method"
            )
        if not torch.isfinite(self.x).all():
            raise InvalidInputError("images contain NaN or Inf")
        # NCHW memory order: a channels-last tensor (what permuting NHWC image arrays gives) makes
        # oneDNN's 1x1 strided convolution backward hang in torch 2.13 for some channel counts (5).
        self.x = self.x.contiguous()

    def __len__(self) -> int:
        return len(self.x)

    def batches(
        self,
        batch_size: int,
        generator: torch.Generator | None = None,
        augment: Augment | None = None,
        drop_last: bool = False,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(indices, images) batches; shuffled when a generator is given."""
        n = len(self.x)
        order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
        stop = n - n % batch_size if drop_last and n >= batch_size else n
        for start in range(0, stop, batch_size):
            idx = order[start : start + batch_size]
            x = self.x[idx]
            yield idx, (augment(x, generator) if augment is not None else x)

    def subset(self, indices: torch.Tensor) -> UnlabeledData:
        """The images at ``indices``."""
        return UnlabeledData(self.x[indices])

    def at_most(self: Data, count: int | None, generator: torch.Generator) -> Data:
        """These images, or ``count`` of them drawn at random (``generator``) when there are more: how
        passes whose work or effect grows with the images cap what they use. A random draw, never the
        first ones: image pools are often stored in class order."""
        if count is not None and (isinstance(count, bool) or not isinstance(count, numbers.Integral) or count < 1):
            raise InvalidInputError(f"a number of images must be an int >= 1, got {count!r} ({type(count).__name__})")
        if count is None or len(self) <= count:
            return self
        count = int(count)
        return self.subset(torch.randperm(len(self), generator=generator)[:count])

    def check(self, example_inputs: torch.Tensor, who: str) -> None:
        if tuple(self.x.shape[1:]) != tuple(example_inputs.shape[1:]):
            raise InvalidInputError(
                f"{who}: images are {tuple(self.x.shape[1:])} but the model takes {tuple(example_inputs.shape[1:])}"
            )


@dataclass
class LabeledData(UnlabeledData):
    y: torch.Tensor = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        super().__post_init__()
        self.y = as_labels(self.y)
        if self.y is None or self.y.ndim != 1 or len(self.y) != len(self.x):
            raise InvalidInputError("labels must be a 1-D tensor with one label per image")
        if self.y.is_floating_point() or self.y.is_complex() or self.y.dtype == torch.bool:
            raise InvalidInputError(f"labels must be integer class indices, got {self.y.dtype}")
        self.y = self.y.long()

    def subset(self, indices: torch.Tensor) -> LabeledData:
        """The images at ``indices`` with their labels."""
        return LabeledData(self.x[indices], self.y[indices])

    def check_classes(self, num_classes: int, who: str) -> None:
        if len(self.y) and (int(self.y.min()) < 0 or int(self.y.max()) >= num_classes):
            raise InvalidInputError(
                f"{who}: labels range {int(self.y.min())}..{int(self.y.max())} but the model has {num_classes} classes"
            )


def _from_uint8(images: np.ndarray | torch.Tensor, normalize: Normalize | None) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
    if x.dtype != torch.uint8:
        return x.float()
    x = x.permute(0, 3, 1, 2).float() / 255.0 if x.shape[-1] in (1, 3) else x.float() / 255.0
    return normalize(x) if normalize is not None else x


def _read_loader(loader) -> tuple[torch.Tensor, torch.Tensor | None]:
    xs, ys = [], []
    for batch in loader:
        if isinstance(batch, (list, tuple)):
            xs.append(batch[0])
            if len(batch) > 1:
                ys.append(batch[1])
        else:
            xs.append(batch)
    if not xs:
        raise InvalidInputError("the data loader yielded no batches")
    return torch.cat(xs), (torch.cat(ys) if ys else None)


def as_unlabeled(data, normalize: Normalize | None = None) -> UnlabeledData:
    """Unlabelled images from any of the accepted forms (labels, if present, are dropped)."""
    if isinstance(data, UnlabeledData):
        return UnlabeledData(data.x)
    x, _ = _split(data, normalize)
    return UnlabeledData(x)


def as_labeled(data, normalize: Normalize | None = None) -> LabeledData:
    """Labelled images from any of the accepted forms."""
    if isinstance(data, LabeledData):
        return data
    x, y = _split(data, normalize)
    if y is None:
        raise InvalidInputError("these images carry no labels; this pass needs labelled clean data")
    return LabeledData(x, y)


def as_labels(labels) -> torch.Tensor | None:
    """Labels as a tensor: a tensor, a numpy array or a list of class indices (None stays None)."""
    if labels is None or isinstance(labels, torch.Tensor):
        return labels
    try:
        return torch.as_tensor(np.asarray(labels))
    except (TypeError, ValueError, RuntimeError) as exc:
        raise InvalidInputError(
            f"labels must be integer class indices (a tensor, array or list); got a {type(labels).__name__} of "
            f"{np.asarray(labels).dtype} values"
        ) from exc


def _split(data, normalize):
    from torch.utils.data import DataLoader, Dataset, TensorDataset

    if isinstance(data, torch.Tensor) or isinstance(data, np.ndarray):
        return _from_uint8(data, normalize), None
    if isinstance(data, (tuple, list)) and len(data) == 2:
        return _from_uint8(data[0], normalize), as_labels(data[1])
    if isinstance(data, TensorDataset):
        tensors = data.tensors
        return _from_uint8(tensors[0], normalize), (tensors[1] if len(tensors) > 1 else None)
    if isinstance(data, (DataLoader, Dataset)):
        loader = data if isinstance(data, DataLoader) else DataLoader(data, batch_size=256)
        x, y = _read_loader(loader)
        return _from_uint8(x, normalize), y
    raise InvalidTypeError(
        f"cannot use {type(data).__name__} as image data; pass LabeledData/UnlabeledData, (x, y) tensors, "
        "a TensorDataset or a DataLoader"
    )
