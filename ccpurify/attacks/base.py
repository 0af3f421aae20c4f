"""The attack protocol shared by every backdoor attack in the harness.

An attack owns a concrete trigger (tensors: a patch, a key, a warp grid, generator weights), which
it either builds from a seed or takes from the user. It can

- ``apply(images)``: put the trigger on uint8 NHWC images (test time, and static poisoning);
- ``poison(images, labels)``: choose poison indices from its seed and return the poisoned training
  set (dirty label: any class, relabelled to the target; clean label: target-class images only);
- ``batch_poisoner()``: for training-time attacks (WaNet, Input-aware), an object that poisons each
  training batch instead (docs/reference/attacks_and_protocol.md §5);
- ``recipe()`` / ``tensors()``: a JSON description and the trigger tensors, enough to rebuild it
  with ``ccpurify.attacks.from_recipe``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import torch

from ccpurify.errors import InvalidInputError

LabelMode = Literal["dirty", "clean"]


@dataclass
class PoisonedSet:
    """A poisoned copy of a training split and the indices that were poisoned."""

    images: np.ndarray
    labels: np.ndarray
    poison_indices: np.ndarray


class BatchPoisoner(ABC):
    """Poisons training batches on the fly (float NCHW in [0, 1], before augmentation)."""

    @abstractmethod
    def __call__(
        self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Return the batch to train on, its labels and an optional extra loss term."""

    def step(self) -> None:
        """Called after the classifier's optimizer step (attacks that train their own parts)."""

    def end_epoch(self) -> None:
        """Called once per epoch (learning-rate schedules of the attack's own parts)."""

    def finish(self) -> None:
        """Called after training (freeze the attack's own parts)."""


def _validate_images(images: np.ndarray) -> np.ndarray:
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        shape = getattr(images, "shape", None)
        raise InvalidInputError(
            f"attacks take uint8 images of shape (N, H, W, 3); got {getattr(images, 'dtype', type(images))} {shape}"
        )
    return images


class Attack(ABC):
    """Base class: target class, poisoning ratio, seed, label mode."""

    name: ClassVar[str]
    label_mode: ClassVar[LabelMode] = "dirty"
    batch_level: ClassVar[bool] = False  # True: poisons per batch during training, no fixed indices

    def __init__(self, target: int = 0, poison_ratio: float = 0.1, seed: int = 0) -> None:
        if not 0.0 <= poison_ratio <= 1.0:
            raise InvalidInputError(f"poison_ratio must be in [0, 1], got {poison_ratio}")
        if target < 0:
            raise InvalidInputError(f"target must be a class index >= 0, got {target}")
        self.target = int(target)
        self.poison_ratio = float(poison_ratio)
        self.seed = int(seed)

    # -- trigger ---------------------------------------------------------------------------------
    def apply(self, images: np.ndarray) -> np.ndarray:
        """Images with the trigger, uint8 NHWC (the input is not modified)."""
        return self._apply(_validate_images(images))

    @abstractmethod
    def _apply(self, images: np.ndarray) -> np.ndarray: ...

    # -- poisoning -------------------------------------------------------------------------------
    def select_poison_indices(self, labels: np.ndarray) -> np.ndarray:
        """``round(ratio * N)`` indices drawn from the seed: from all samples (dirty label) or from
        the target class only (clean label), as BackdoorBench does (reference §5)."""
        if self.batch_level:
            return np.empty(0, dtype=np.int64)
        count = int(round(self.poison_ratio * len(labels)))
        pool = np.arange(len(labels)) if self.label_mode == "dirty" else np.flatnonzero(labels == self.target)
        if count > len(pool):
            if self.label_mode == "clean":
                raise InvalidInputError(
                    f"{self.name} is clean-label: it needs {count} target-class images for ratio "
                    f"{self.poison_ratio}, but class {self.target} has only {len(pool)}; lower poison_ratio"
                )
            count = len(pool)
        rng = np.random.default_rng([self.seed, 0x9015])
        return np.sort(rng.choice(pool, size=count, replace=False)).astype(np.int64)

    def poison(self, images: np.ndarray, labels: np.ndarray) -> PoisonedSet:
        """A poisoned copy of a training set (static attacks); batch-level attacks return it unchanged."""
        images = _validate_images(images)
        idx = self.select_poison_indices(labels)
        out_images, out_labels = images.copy(), labels.copy()
        if len(idx):
            out_images[idx] = self._apply(images[idx])
            if self.label_mode == "dirty":
                out_labels[idx] = self.target
        return PoisonedSet(out_images, out_labels, idx)

    def test_set(self, images: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The ASR/RA set: every non-target image with the trigger, and its true label (reference §5)."""
        keep = labels != self.target
        return self.apply(images[keep]), labels[keep]

    def prepare(
        self, images: np.ndarray, batch_size: int = 128, device: str | torch.device = "cpu", progress=None
    ) -> None:
        """Work an attack does on the training images before training (Input-aware's mask stage)."""

    def batch_poisoner(self, device: torch.device | str = "cpu") -> BatchPoisoner | None:
        """Per-batch poisoning for training-time attacks; None for static ones."""
        return None

    # -- serialisation ---------------------------------------------------------------------------
    def recipe(self) -> dict:
        """JSON-able description; ``from_recipe(recipe, tensors)`` rebuilds the attack."""
        return {
            "name": self.name,
            "target": self.target,
            "poison_ratio": self.poison_ratio,
            "seed": self.seed,
            "label_mode": self.label_mode,
            "batch_level": self.batch_level,
            "params": self.params(),
        }

    def params(self) -> dict:
        """JSON-able constructor arguments other than target, ratio, seed and the tensors."""
        return {}

    @abstractmethod
    def tensors(self) -> dict[str, torch.Tensor]:
        """The concrete trigger as named tensors (saved with safetensors)."""

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], **kwargs) -> Attack:
        """Rebuild from ``tensors()`` output and the recipe's constructor arguments. By default each
        tensor name is a constructor argument (``patch``, ``key``, ``pattern``, ``grid``...)."""
        return cls(**kwargs, **{name: t.numpy() for name, t in tensors.items()})

    def __repr__(self) -> str:
        return f"{type(self).__name__}(target={self.target}, poison_ratio={self.poison_ratio}, seed={self.seed})"
