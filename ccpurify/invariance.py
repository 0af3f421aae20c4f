"""Trigger invariance without data: a bounded universal perturbation that sends images to one
class, and the distillation term that teaches a student to ignore it.

A backdoor is a shortcut: one small input change that sends every image to the attacker's class.
Neuron-pruning defenses (CLP, OTBR) find it only where it lives in a few neurons, and miss
full-image triggers (Blended, LF) on GTSRB. The shortcut itself can be found without data: on
synthetic images, an L-infinity-bounded universal perturbation that maximises the mean probability
of one class (a targeted universal adversarial perturbation, Moosavi-Dezfooli et al., CVPR 2017)
lands on the backdoor. Measured on the zoo (256 dead-leaves images refined on the suspect's
BatchNorm statistics, bound 0.05 of the pixel range, 60 steps; share of real validation images
the perturbation sends to its class): GTSRB Blended 100%, GTSRB LF 100%, CIFAR-10 LF 100%,
CIFAR-10 Input-aware 58% (each time the true target), GTSRB WaNet 10%, and 11-12% on the clean
CIFAR-10 and GTSRB models, near their natural share.

``TriggerInvariance`` is DHBE's trigger-invariance term (Yan et al., "DHBE: Data-free Holistic
Backdoor Erasing in Deep Neural Networks via Restricted Adversarial Distillation", AsiaCCS 2023;
``../shared/specs/reference/datafree_compression.md`` §3) with a full-image universal
perturbation: the student, on ``x + delta``, is trained towards the teacher's target for ``x``,
while ``delta`` keeps climbing, one signed-gradient step per batch ("free" adversarial training,
Shafahi et al., NeurIPS 2019), towards sending the *student* to the suspected class.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ccpurify.losses import soft_kl
from ccpurify.synthesis import class_histogram
from ccpurify.transforms import Normalize


def perturbation_bound(eps: float, images: torch.Tensor, normalize: Normalize | None = None) -> torch.Tensor:
    """The per-channel L-infinity bound, in the model's input space, of a perturbation of ``eps``
    times the pixel range: ``eps / std`` under the model's known input normalisation, else ``eps``
    times each channel's observed range in ``images`` (shape ``(1, C, 1, 1)``)."""
    if not 0 < eps <= 1:
        raise ValueError(f"eps is a fraction of the pixel range in (0, 1], got {eps!r}")
    if normalize is not None:
        std = torch.as_tensor(normalize.std, dtype=images.dtype).view(1, -1, 1, 1)
        return (eps / std).expand(1, images.shape[1], 1, 1).clone()
    flat = images[:512].transpose(0, 1).flatten(1)
    return (eps * (flat.amax(1) - flat.amin(1))).view(1, -1, 1, 1)


@dataclass
class UniversalTrigger:
    """A universal perturbation and what it does: ``target`` is the class it sends images to,
    ``fooled`` the share of the images the model then assigns to it, ``share_before`` that share
    without the perturbation."""

    delta: torch.Tensor  # (1, C, H, W), model input space
    bound: torch.Tensor  # (1, C, 1, 1): |delta| <= bound
    target: int
    fooled: float
    share_before: float

    def summary(self) -> dict:
        return {"target": self.target, "fooled": round(self.fooled, 4), "share_before": round(self.share_before, 4)}


def _collapse_loss(logits: torch.Tensor, target: int) -> torch.Tensor:
    """-log of the batch's mean probability of ``target``: low when most images go there."""
    return -logits.softmax(1).mean(0)[target].clamp_min(1e-12).log()


def fit_universal_trigger(
    model: nn.Module,
    images: torch.Tensor,
    bound: torch.Tensor,
    *,
    steps: int = 60,
    batch_size: int = 64,
    generator: torch.Generator | None = None,
    device: str | torch.device = "cpu",
) -> UniversalTrigger:
    """The bounded universal perturbation that sends the most of ``images`` to one class of
    ``model``: Adam on ``delta`` against ``_collapse_loss`` of the class the perturbed batch leans
    to most, projected onto the bound after each step. ``model``'s parameters and mode are kept."""
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps} and {batch_size}")
    was_training = model.training
    model.eval()
    bound = bound.to(device)
    delta = torch.zeros(1, *images.shape[1:], device=device, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=0.05 * float(bound.mean()))
    try:
        for _ in range(steps):
            x = images[torch.randint(0, len(images), (min(batch_size, len(images)),), generator=generator)].to(device)
            logits = model(x + delta)
            target = int(logits.softmax(1).mean(0).argmax())
            (grad,) = torch.autograd.grad(_collapse_loss(logits, target), delta)
            delta.grad = grad
            opt.step()
            with torch.no_grad():
                delta.copy_(delta.clamp(-bound, bound))
    finally:
        model.train(was_training)
    delta = delta.detach()
    num_classes = logits.shape[1]
    after = class_histogram(model, images + delta.cpu(), num_classes)
    before = class_histogram(model, images, num_classes)
    target = int(after.argmax())
    return UniversalTrigger(
        delta, bound, target, after[target].item() / len(images), before[target].item() / len(images)
    )


class TriggerInvariance:
    """The distillation term ``KL(teacher target on x || student on x + s * delta) * T^2``, with
    ``delta`` (started from ``trigger``) moved after each call by one signed-gradient step of
    ``step_fraction`` of the bound towards sending the student to ``trigger.target``.

    ``s`` is drawn per image from ``[1, scale]``: ``delta`` is searched within a small bound, where
    it is mostly the trigger's direction (a free adversary at a large bound is a generic adversarial
    perturbation, and learning invariance to it costs clean accuracy), then also unlearned at the
    amplitude of a real trigger (Blended and LF: up to 0.2 of the pixel range)."""

    def __init__(
        self,
        trigger: UniversalTrigger,
        weight: float = 1.0,
        step_fraction: float = 0.1,
        scale: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> None:
        if not 0 < weight < math.inf or not 0 < step_fraction <= 1 or not 1 <= scale < math.inf:
            raise ValueError(
                f"weight must be finite and > 0, step_fraction in (0, 1] and scale finite and >= 1, got {weight}, {step_fraction} and {scale}"
            )
        self.trigger = trigger
        self.weight = weight
        self.step_fraction = step_fraction
        self.scale = scale
        self.generator = generator
        self.delta = trigger.delta.clone()

    def loss(self, student: nn.Module, x: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
        """The weighted term for one batch (``targets``: the teacher's logits on the clean ``x``);
        also takes ``delta``'s adversarial step."""
        delta = self.delta.to(x.device).requires_grad_(True)
        scales = 1 + (self.scale - 1) * torch.rand(len(x), 1, 1, 1, generator=self.generator)
        logits = student(x + scales.to(x.device) * delta)
        (grad,) = torch.autograd.grad(_collapse_loss(logits, self.trigger.target), delta, retain_graph=True)
        with torch.no_grad():
            bound = self.trigger.bound.to(x.device)
            self.delta = (delta - self.step_fraction * bound * grad.sign()).clamp(-bound, bound).detach()
        return self.weight * soft_kl(logits, targets, temperature).mean() * temperature**2
