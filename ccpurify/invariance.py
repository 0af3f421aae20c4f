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

Two more trigger models: a universal patch (``fit_patch_trigger``, Neural Cleanse's; unlearned by
``PatchInvariance``) for BadNets-like triggers, and a smooth universal warp of at most a pixel
(``fit_universal_warp``, WaNet's; unlearned by ``WarpInvariance``), which no small additive
perturbation or patch imitates.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn
from torch.nn import functional as F

from ccpurify.errors import NonFiniteError
from ccpurify.losses import soft_kl
from ccpurify.synthesis import class_histogram, modes_kept
from ccpurify.transforms import Normalize

# The trigger searches' settings shared by their callers (TriggerPrune, Recover): the batch of each
# search step, the universal perturbation's steps, and the patch search's steps and L1 penalty.
TRIGGER_BATCH = 64
PERTURBATION_STEPS = 60
PATCH_STEPS = 200
PATCH_PENALTY = 8.0
# The warp search (``fit_universal_warp``): its steps, its control grid (WaNet's k) and the largest
# displacement, in pixels, of a control point (bicubic interpolation can overshoot it between them,
# by up to about twice; ``UniversalWarp.summary`` reports the field's largest).
WARP_STEPS = 100
WARP_GRID = 4
WARP_SHIFT = 1.0


def trigger_fit_steps(steps: int, images: int, batch_size: int = TRIGGER_BATCH) -> int:
    """About the sample-steps of one trigger search on ``images`` images (``steps`` batches of at most
    ``batch_size``) and of measuring what the trigger does (the images with and without it): a
    pass's estimate before it runs."""
    return min(batch_size, images) * steps + 2 * images


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


class _ClassShares:
    """What a trigger does to a set of images (mixed into the trigger dataclasses, which declare the
    fields): ``target`` is the class it sends them to, ``fooled`` the share the model then assigns
    to it, ``share_before`` that share without the trigger."""

    target: int
    fooled: float
    share_before: float

    @property
    def lift(self) -> float:
        """How much the trigger raises its class's share of the images."""
        return self.fooled - self.share_before

    def summary(self) -> dict:
        return {"target": self.target, "fooled": round(self.fooled, 4), "share_before": round(self.share_before, 4)}


@dataclass
class UniversalTrigger(_ClassShares):
    """A universal perturbation and what it does (``target``, ``fooled``, ``share_before``: ``_ClassShares``)."""

    delta: torch.Tensor  # (1, C, H, W), model input space
    bound: torch.Tensor  # (1, C, 1, 1): |delta| <= bound
    target: int
    fooled: float
    share_before: float

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` with the perturbation added (``x`` in the model's input space, on any device)."""
        return x + self.delta.to(x.device)


@dataclass
class PatchTrigger(_ClassShares):
    """A universal patch: ``mask`` (1, 1, H, W) in [0, 1] blends ``pattern`` (1, C, H, W, model input
    space) into every image; ``area`` is the mask's mean; ``target``, ``fooled`` and ``share_before``
    as for ``UniversalTrigger``."""

    mask: torch.Tensor
    pattern: torch.Tensor
    area: float
    target: int
    fooled: float
    share_before: float

    def summary(self) -> dict:
        return {**super().summary(), "area": round(self.area, 4)}

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` with the patch pasted in (``x`` in the model's input space, on any device)."""
        return _paste(x, self.mask.to(x.device), self.pattern.to(x.device))


def _paste(x: torch.Tensor, mask: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    """Neural Cleanse's trigger model: ``pattern`` blended into ``x`` where ``mask`` is 1."""
    return (1 - mask) * x + mask * pattern


def _class_shares(
    model: nn.Module, images: torch.Tensor, triggered: torch.Tensor, num_classes: int
) -> tuple[int, float, float]:
    """(target, fooled, share_before): the class ``model`` assigns most of ``triggered`` to, the share
    of ``triggered`` it assigns there, and the share of ``images`` (the same images untriggered)."""
    after = class_histogram(model, triggered, num_classes)
    before = class_histogram(model, images, num_classes)
    target = int(after.argmax())
    return target, after[target].item() / len(images), before[target].item() / len(images)


def _collapse_loss(logits: torch.Tensor, target: int) -> torch.Tensor:
    """-log of the batch's mean probability of ``target``: low when most images go there."""
    return -logits.softmax(1).mean(0)[target].clamp_min(1e-12).log()


def fit_universal_trigger(
    model: nn.Module,
    images: torch.Tensor,
    bound: torch.Tensor,
    *,
    steps: int = PERTURBATION_STEPS,
    batch_size: int = TRIGGER_BATCH,
    generator: torch.Generator | None = None,
    device: str | torch.device = "cpu",
) -> UniversalTrigger:
    """The bounded universal perturbation that sends the most of ``images`` to one class of
    ``model``: Adam on ``delta`` against ``_collapse_loss`` of the class the perturbed batch leans
    to most, projected onto the bound after each step. ``model``'s parameters and mode are kept."""
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps} and {batch_size}")
    bound = bound.to(device)
    delta = torch.zeros(1, *images.shape[1:], device=device, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=0.05 * float(bound.mean()))
    with modes_kept(model):  # every module's mode, not only the top one's
        model.eval()
        for _ in range(steps):
            x = images[torch.randint(0, len(images), (min(batch_size, len(images)),), generator=generator)].to(device)
            logits = model(x + delta)
            target = int(logits.softmax(1).mean(0).argmax())
            (grad,) = torch.autograd.grad(_collapse_loss(logits, target), delta)
            delta.grad = grad
            opt.step()
            with torch.no_grad():
                delta.copy_(delta.clamp(-bound, bound))
    delta = delta.detach()
    return UniversalTrigger(delta, bound, *_class_shares(model, images, images + delta.cpu(), logits.shape[1]))


def penalty_ramp(warmup: float, steps: int) -> int:
    """The steps over which ``fit_patch_trigger`` ramps its penalty up for ``warmup`` (a fraction
    of ``steps``): 0 for none, else at least one. Two warmups with the same ramp run the same search."""
    return max(1, round(warmup * steps)) if warmup > 0 else 0


def fit_patch_trigger(
    model: nn.Module,
    images: torch.Tensor,
    normalize: Normalize,
    *,
    penalty: float = PATCH_PENALTY,
    steps: int = PATCH_STEPS,
    warmup: float = 0.0,
    batch_size: int = TRIGGER_BATCH,
    generator: torch.Generator | None = None,
    device: str | torch.device = "cpu",
) -> PatchTrigger:
    """The universal patch that sends the most of ``images`` to one class of ``model``: Neural
    Cleanse's trigger model (Wang et al., S&P 2019), a mask ``m = sigmoid(a)`` and a pattern
    ``p = normalize(sigmoid(b))`` (a valid image) pasted as ``(1 - m) x + m p``, fitted by Adam on
    ``_collapse_loss`` of the class the patched batch leans to most (as ``fit_universal_trigger``) plus
    ``penalty`` times the mask's mean (its L1 area). Neural Cleanse fits one mask per class on clean data; here the class is
    chosen during the fit, so one fit serves any number of classes.

    A backdoor's patch trigger is a shortcut a small mask reaches; a clean model needs a large one.
    Measured on the zoo (256 synthetic images, penalty 8, 200 steps; area, share of the synthetic
    images sent to the class before -> after): CIFAR-10 BadNets 0.5%, 23% -> 100% (99.8% of real
    validation images); GTSRB BadNets 1.4%, 18% -> 100%; the clean CIFAR-10 model 0.5%, 13% -> 17%;
    the clean GTSRB model 0.2%, 8% -> 8% (``benchmarks/experiments/patch_trigger.py``). ``model``'s
    parameters and mode are kept.

    ``warmup`` (a fraction of ``steps``) ramps the penalty linearly from 0 over the first steps: the
    mask first grows until the patch sends the batch to a class, then shrinks to the smallest that
    still does, as Neural Cleanse raises its cost only once the attack succeeds. With the penalty
    from the first step the search can settle on a larger mask that fools fewer images; which one it
    settles on then depends on the CPU's floating-point kernels (docs/defaults.md, session 25). The
    weight at step ``t`` is ``penalty * min(1, t / r)`` with ``r = penalty_ramp(warmup, steps)``
    (``max(1, round(warmup * steps))``), so ``warmup=1`` ramps over the whole search and its last
    step has ``(steps - 1) / steps`` of the penalty."""
    if steps < 1 or batch_size < 1 or not 0 < penalty < math.inf or not 0 <= warmup <= 1:
        raise ValueError(
            f"steps and batch_size must be >= 1, penalty finite and > 0, and warmup in [0, 1], got {steps}, "
            f"{batch_size}, {penalty}, {warmup}"
        )
    ramp = penalty_ramp(warmup, steps)
    _, channels, height, width = images.shape
    mask_logit = torch.full((1, 1, height, width), -3.0, device=device, requires_grad=True)
    pattern_logit = torch.zeros(1, channels, height, width, device=device, requires_grad=True)
    opt = torch.optim.Adam([mask_logit, pattern_logit], lr=0.1)
    with modes_kept(model):  # every module's mode, not only the top one's
        model.eval()
        for step in range(steps):
            x = images[torch.randint(0, len(images), (min(batch_size, len(images)),), generator=generator)].to(device)
            mask = mask_logit.sigmoid()
            logits = model(_paste(x, mask, normalize(pattern_logit.sigmoid())))
            target = int(logits.softmax(1).mean(0).argmax())
            weight = penalty * min(1.0, step / ramp) if ramp else penalty
            loss = _collapse_loss(logits, target) + weight * mask.mean()
            mask_grad, pattern_grad = torch.autograd.grad(loss, (mask_logit, pattern_logit))
            mask_logit.grad, pattern_logit.grad = mask_grad, pattern_grad
            opt.step()
    with torch.no_grad():
        mask, pattern = mask_logit.sigmoid().cpu(), normalize(pattern_logit.sigmoid()).cpu()
    pasted = _paste(images.cpu(), mask, pattern)
    return PatchTrigger(mask, pattern, float(mask.mean()), *_class_shares(model, images, pasted, logits.shape[1]))


@dataclass
class UniversalWarp(_ClassShares):
    """A universal smooth warp: ``control`` (1, 2, k, k) holds the (x, y) displacement in pixels at a
    k x k grid of control points, at most ``max_shift`` each, bicubically interpolated over the image
    (WaNet's trigger model, Nguyen & Tran, ICLR 2021); ``target``, ``fooled`` and ``share_before``
    as for ``UniversalTrigger``."""

    control: torch.Tensor
    max_shift: float
    target: int
    fooled: float
    share_before: float
    image_size: tuple[int, int] = (32, 32)  # (H, W) of the images it was fitted on

    def summary(self) -> dict:
        """The class shares, and the largest displacement in pixels of a control point and of the
        interpolated field (on an image of ``image_size``)."""
        field = _displacement(self.control, *self.image_size)
        return {
            **super().summary(),
            "max_control_shift_px": round(float(self.control.abs().amax()), 3),
            "max_shift_px": round(float(field.abs().amax()), 3),
        }

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` warped (``x`` in the model's input space, on any device)."""
        return warp_images(x, self.control.to(x.device))


def _displacement(control: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The (1, 2, H, W) displacement in pixels that ``control`` defines: WaNet's bicubic upsampling."""
    return F.interpolate(control, size=(height, width), mode="bicubic", align_corners=True)


def warp_images(x: torch.Tensor, control: torch.Tensor) -> torch.Tensor:
    """``x`` (N, C, H, W) resampled along the smooth field that ``control`` (1, 2, k, k: the x and y
    displacement in pixels at k x k control points) defines: bicubic upsampling to H x W, as WaNet
    builds its field, then bilinear sampling with the border repeated. Warping commutes with a
    per-channel affine normalisation, so ``x`` may be normalised or not."""
    if x.ndim != 4 or control.ndim != 4 or control.shape[:2] != (1, 2):
        raise ValueError(
            "warp_images takes images (N, C, H, W) and a control grid (1, 2, k, k), got "
            f"{tuple(x.shape)} and {tuple(control.shape)}"
        )
    _, _, height, width = x.shape
    shift = _displacement(control.to(x.dtype), height, width)
    scale = torch.tensor([2 / max(width - 1, 1), 2 / max(height - 1, 1)], device=x.device, dtype=x.dtype)
    ys, xs = torch.meshgrid(
        torch.linspace(-1, 1, height, device=x.device, dtype=x.dtype),
        torch.linspace(-1, 1, width, device=x.device, dtype=x.dtype),
        indexing="ij",
    )
    grid = torch.stack((xs, ys), dim=-1)[None] + shift.permute(0, 2, 3, 1) * scale
    return F.grid_sample(x, grid.expand(len(x), -1, -1, -1), mode="bilinear", padding_mode="border", align_corners=True)


def fit_universal_warp(
    model: nn.Module,
    images: torch.Tensor,
    *,
    max_shift: float = WARP_SHIFT,
    grid: int = WARP_GRID,
    steps: int = WARP_STEPS,
    batch_size: int = TRIGGER_BATCH,
    generator: torch.Generator | None = None,
    device: str | torch.device = "cpu",
) -> UniversalWarp:
    """The smooth universal warp, its control points moved at most ``max_shift`` pixels, that sends
    the most of ``images`` to one class of ``model``: Adam on ``_collapse_loss`` of the class the warped batch
    leans to most (as ``fit_universal_trigger``), the control points parametrised as
    ``max_shift * tanh(a)``.

    WaNet's backdoor fires on a warp of under a pixel, and its training (noise mode) teaches the
    model to ignore random warps, so a clean model has no such shortcut. Measured on the zoo (256
    synthetic images refined 100 steps on the suspect's BatchNorm statistics, 100 steps, 1 pixel;
    share of the synthetic images sent to the class before -> after, of 500 real validation images
    after): CIFAR-10 WaNet 18 -> 100% (100%), VGG16-BN WaNet 21 -> 100% (100%), MobileNetV2 WaNet
    23 -> 77% (100%), GTSRB WaNet 19 -> 64% (99%), each the true target; the clean CIFAR-10 model
    12 -> 24% (15%), the clean GTSRB model 9 -> 11% (6%), CIFAR-10 BadNets 21 -> 21% (10%),
    Input-aware 21 -> 33% (17%) (``benchmarks/experiments/warp_trigger.py``, docs/defaults.md,
    session 22). ``model``'s parameters and mode are kept."""
    if steps < 1 or batch_size < 1 or grid < 2 or not 0 < max_shift < math.inf:
        raise ValueError(
            "steps and batch_size must be >= 1, grid >= 2 and max_shift finite and > 0, got "
            f"{steps}, {batch_size}, {grid} and {max_shift}"
        )
    if images.ndim != 4 or len(images) == 0:
        raise ValueError(
            f"fit_universal_warp takes a non-empty batch of images (N, C, H, W), got {tuple(images.shape)}"
        )
    logit = (0.1 * torch.randn(1, 2, grid, grid, generator=generator)).to(device).requires_grad_(True)
    opt = torch.optim.Adam([logit], lr=0.1)
    with modes_kept(model):  # every module's mode, not only the top one's
        model.eval()
        for _ in range(steps):
            x = images[torch.randint(0, len(images), (min(batch_size, len(images)),), generator=generator)].to(device)
            logits = model(warp_images(x, max_shift * logit.tanh()))
            if not torch.isfinite(logits).all():
                # grid_sample's backward crashes the process on a NaN field (pytorch/pytorch#24823)
                raise NonFiniteError(
                    "the model gives NaN or Inf on warped images, so the warp search cannot run: check the "
                    "model and its images, or turn the warp invariance off"
                )
            target = int(logits.softmax(1).mean(0).argmax())
            (logit.grad,) = torch.autograd.grad(_collapse_loss(logits, target), logit)
            opt.step()
    control = (max_shift * logit.tanh()).detach().cpu()
    warped = torch.cat([warp_images(b, control) for b in images.cpu().split(256)])
    shares = _class_shares(model, images, warped, logits.shape[1])
    return UniversalWarp(control, max_shift, *shares, image_size=(images.shape[2], images.shape[3]))


def _unlearning_term(logits: torch.Tensor, targets: torch.Tensor, temperature: float, weight: float) -> torch.Tensor:
    """``weight`` times the distillation KL, scaled by T^2, between the teacher's clean ``targets`` and
    the student's ``logits`` on the triggered images: the term every invariance adds."""
    return weight * soft_kl(logits, targets, temperature).mean() * temperature**2


@contextmanager
def running_stats_kept(model: nn.Module, keep: bool = True) -> Iterator[None]:
    """Within the block, ``model``'s BatchNorm layers in train mode still normalise with the batch's
    statistics but leave their running statistics and batch counts as they are (they track nothing
    for the block); with ``keep`` False it does nothing. An invariance term's forward pass on
    perturbed images would otherwise move them towards the perturbed batches: on real images, where the perturbation is a
    natural adversarial one, that collapsed CIFAR-10 PreAct WaNet's recovery (validation CA 47.8%;
    84.8% with the statistics kept; docs/defaults.md, sessions 17-18)."""
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    layers = layers if keep else []
    for m in layers:  # a train-mode layer that tracks nothing normalises by the batch and updates nothing
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in layers:
            m.track_running_stats = True


class _FreeAdversarialTerm:
    """The distillation term ``KL(teacher target on x || student on the triggered x) * T^2`` at
    ``weight``, whose trigger parameters (``self.trigger_params``) move after each call by one
    signed-gradient step of ``step_fraction`` of their bound towards sending the *student* to
    ``target`` ("free" adversarial training, Shafahi et al., NeurIPS 2019). Subclasses say how the
    parameters trigger a batch (``_triggered``) and bound them (``_bound``)."""

    def __init__(
        self, trigger_params: torch.Tensor, target: int, weight: float, step_fraction: float, keep_bn_stats: bool
    ) -> None:
        if not 0 < weight < math.inf or not 0 < step_fraction <= 1:
            raise ValueError(
                f"weight must be finite and > 0 and step_fraction in (0, 1], got {weight} and {step_fraction}"
            )
        self.trigger_params = trigger_params.clone()
        self.target = target
        self.weight = weight
        self.step_fraction = step_fraction
        self.keep_bn_stats = keep_bn_stats

    def _triggered(self, x: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """The batch ``x`` triggered by given parameters."""
        raise NotImplementedError

    def _bound(self, device: torch.device) -> torch.Tensor | float:
        raise NotImplementedError

    def loss(self, student: nn.Module, x: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
        """The weighted term for one batch (``targets``: the teacher's logits on the clean ``x``);
        also takes the trigger's adversarial step."""
        triggered = self._triggered(x)
        params = self.trigger_params.to(x.device).requires_grad_(True)
        with running_stats_kept(student, self.keep_bn_stats):
            logits = student(triggered(params))
        (grad,) = torch.autograd.grad(_collapse_loss(logits, self.target), params, retain_graph=True)
        with torch.no_grad():
            bound = self._bound(x.device)
            self.trigger_params = (params - self.step_fraction * bound * grad.sign()).clamp(-bound, bound).detach()
        return _unlearning_term(logits, targets, temperature, self.weight)


class TriggerInvariance(_FreeAdversarialTerm):
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
        keep_bn_stats: bool = False,
    ) -> None:
        if not 1 <= scale < math.inf:
            raise ValueError(f"scale must be finite and >= 1, got {scale}")
        super().__init__(trigger.delta, trigger.target, weight, step_fraction, keep_bn_stats)
        self.trigger = trigger
        self.scale = scale
        self.generator = generator

    def _triggered(self, x: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        scales = (1 + (self.scale - 1) * torch.rand(len(x), 1, 1, 1, generator=self.generator)).to(x.device)
        return lambda delta: x + scales * delta

    def _bound(self, device: torch.device) -> torch.Tensor:
        return self.trigger.bound.to(device)


class InvarianceTerm(Protocol):
    """A distillation term that teaches the student to ignore a trigger (``distill``'s ``invariance``)."""

    def loss(self, student: nn.Module, x: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
        """The weighted term for one batch ``x`` (``targets``: the teacher's logits on the clean ``x``)."""
        ...


class PatchInvariance:
    """The distillation term ``KL(teacher target on x || student on x with the patch) * T^2`` at
    ``weight``: Neural Cleanse's unlearning (fine-tuning on images that carry the reversed trigger,
    with their clean labels; Wang et al., S&P 2019), with the teacher's targets for labels and the
    patch fitted on the recovery images (``fit_patch_trigger``). The patch stays fixed: it is where a
    patch-shaped backdoor already fires on the teacher."""

    def __init__(self, trigger: PatchTrigger, weight: float = 1.0, keep_bn_stats: bool = False) -> None:
        if not 0 < weight < math.inf:
            raise ValueError(f"weight must be finite and > 0, got {weight}")
        self.trigger = trigger
        self.weight = weight
        self.keep_bn_stats = keep_bn_stats

    def loss(self, student: nn.Module, x: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
        """The weighted term for one batch ``x`` (``targets``: the teacher's logits on the clean ``x``)."""
        with running_stats_kept(student, self.keep_bn_stats):
            logits = student(self.trigger.apply(x))
        return _unlearning_term(logits, targets, temperature, self.weight)


class WarpInvariance(_FreeAdversarialTerm):
    """The distillation term ``KL(teacher target on x || student on x warped) * T^2`` at ``weight``,
    with the warp (started from ``warp``) moved after each call by one signed-gradient step of
    ``step_fraction`` of ``max_shift`` towards sending the *student* to ``warp.target`` (the
    perturbation's "free" adversarial training, ``TriggerInvariance``, over WaNet's trigger model).
    Invariance to warps of a pixel costs a model little: it is an augmentation."""

    def __init__(
        self, warp: UniversalWarp, weight: float = 1.0, step_fraction: float = 0.1, keep_bn_stats: bool = False
    ) -> None:
        super().__init__(warp.control, warp.target, weight, step_fraction, keep_bn_stats)
        self.warp = warp

    def _triggered(self, x: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda control: warp_images(x, control)

    def _bound(self, device: torch.device) -> float:
        return self.warp.max_shift


class Invariances:
    """Several invariance terms (``TriggerInvariance``, ``PatchInvariance``, ``WarpInvariance``) as one: their sum."""

    def __init__(self, terms: Sequence[InvarianceTerm]) -> None:
        if not terms:
            raise ValueError("Invariances needs at least one term")
        self.terms = list(terms)

    def loss(self, student: nn.Module, x: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
        """The sum of the terms' losses on one batch."""
        total = self.terms[0].loss(student, x, targets, temperature)
        for term in self.terms[1:]:
            total = total + term.loss(student, x, targets, temperature)
        return total
