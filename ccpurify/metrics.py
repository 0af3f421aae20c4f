"""Metrics of the protocol (docs/protocol.md, "Metrics"): CA, ASR, RA, DER, and model cost.

- CA: accuracy on the whole clean test set.
- ASR: fraction of triggered non-target test images classified as the target.
- RA: fraction of the same triggered images classified as their true class.
- DER = [max(0, ASR_before - ASR_after) - max(0, CA_before - CA_after) + 1] / 2, the documented
  formula (BackdoorBench's code adds the CA term: a sign bug, reference §7).

All rates are fractions in [0, 1]; tables multiply by 100. This module knows no attack: callers pass
the triggered images (``attack.test_set(...)``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from ccpurify.cost import ModelCost, device_of, model_cost  # noqa: F401  (re-exported: the harness's cost API)
from ccpurify.data.transforms import Normalize
from ccpurify.errors import InvalidInputError, NonFiniteError
from ccpurify.probes import non_finite_cause
from ccpurify.progress import ProgressCallback, report


@torch.no_grad()
def predict(
    model: nn.Module,
    images: np.ndarray,
    normalize: Normalize | None = None,
    batch_size: int = 500,
    device: str | torch.device | None = None,
    progress: ProgressCallback | None = None,
    task: str = "predict",
) -> np.ndarray:
    """Class predictions (N,) for uint8 NHWC ``images``, in eval mode; ``progress`` hears each batch."""
    device = torch.device(device) if device is not None else device_of(model)
    was_training = model.training
    model.eval()
    out = np.empty(len(images), dtype=np.int64)
    try:
        for start in range(0, len(images), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size])).to(device)
            x = x.permute(0, 3, 1, 2).float().div_(255.0)
            if normalize is not None:
                x = normalize(x)
            logits = model(x)
            if not torch.isfinite(logits).all():
                raise NonFiniteError(
                    f"the model outputs NaN or Inf on test images, {non_finite_cause(model)}; its scores would be "
                    "meaningless, so nothing was scored"
                )
            out[start : start + len(x)] = logits.argmax(1).cpu().numpy()
            report(progress, task, min(start + batch_size, len(images)), len(images))
    finally:
        model.train(was_training)
    return out


@dataclass(frozen=True)
class BackdoorMetrics:
    """CA on the clean test set; ASR and RA on the triggered non-target set (fractions)."""

    ca: float
    asr: float | None
    ra: float | None
    n_clean: int
    n_poisoned: int

    def to_dict(self) -> dict:
        return asdict(self)


def evaluate(
    model: nn.Module,
    clean_images: np.ndarray,
    clean_labels: np.ndarray,
    poisoned_images: np.ndarray | None = None,
    poisoned_true_labels: np.ndarray | None = None,
    target: int | None = None,
    normalize: Normalize | None = None,
    batch_size: int = 500,
    progress: ProgressCallback | None = None,
) -> BackdoorMetrics:
    """CA, and ASR/RA when the triggered set and the target class are given."""
    predicted = predict(model, clean_images, normalize, batch_size, progress=progress, task="score: clean images")
    ca = float((predicted == clean_labels).mean())
    if poisoned_images is None or target is None:
        return BackdoorMetrics(ca, None, None, len(clean_labels), 0)
    if np.any(poisoned_true_labels == target):
        raise InvalidInputError(
            "the triggered set must hold non-target images only (protocol: ASR excludes the target class)"
        )
    pred = predict(model, poisoned_images, normalize, batch_size, progress=progress, task="score: triggered images")
    asr = float((pred == target).mean()) if len(pred) else 0.0
    ra = float((pred == poisoned_true_labels).mean()) if len(pred) else 0.0
    return BackdoorMetrics(ca, asr, ra, len(clean_labels), len(pred))


def der(ca_before: float, asr_before: float, ca_after: float, asr_after: float) -> float:
    """Defense effectiveness rating in [0, 1]; 0.5 means nothing changed."""
    return (max(0.0, asr_before - asr_after) - max(0.0, ca_before - ca_after) + 1.0) / 2.0
