"""The distillation loss shared by ``ccpurify.distill`` and ``ccpurify.invariance``."""

from __future__ import annotations

import torch
from torch.nn import functional as F


def soft_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per image, KL(teacher || student) between the two softmaxes at ``temperature`` (Hinton et al.
    2015), shape (N,). Callers scale by T^2 where the gradient correction applies."""
    return F.kl_div(
        F.log_softmax(student_logits / temperature, 1), F.softmax(teacher_logits / temperature, 1), reduction="none"
    ).sum(1)
