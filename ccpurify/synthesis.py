"""Data-free transfer sets: images made from nothing but the model, for distillation without data.

- ``dead_leaves``: procedural natural-like images made in numpy, occluding discs and squares of
  random colours with power-law sizes (the dead-leaves model of natural image statistics, Lee,
  Mumford & Huang 2001; used as a pre-training source by Baradad et al., NeurIPS 2021, "Learning to
  see by looking at noise"). Natural-image statistics, not the task's images, do most of the repair
  of a compressed network: measured on the clean CIFAR-10 zoo model pruned to 0.72 MACs, re-estimating
  BatchNorm on 512 of them gave validation CA 54.9% (Gaussian noise 19.1%, 500 real images 74.2%).
- ``fit_input_affine``: the per-channel scale and shift that put such [0, 1] images into the model's
  input space (its normalisation is unknown to a data-free pass), fitted to the first BatchNorm
  layers' running statistics.
- ``synthesize_bn_images``: images whose per-layer BatchNorm input statistics match the running ones,
  optimised with Adam (ZeroQ, Cai et al., CVPR 2020), plus a small total-variation prior. Starting
  from dead leaves instead of Gaussian noise, 5 steps are enough: on the same pruned model, 256
  images x 5 steps then distillation reached validation CA 81.3%, 256 noise images x 15 steps 78.4%
  (exploratory runs, not yet a benchmark script).
- ``class_histogram``: how the suspect model labels a transfer set; a class far above its share is
  the sign of a trigger leaking into synthetic images (the trigger is the cheapest way to make an
  image of the target class).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ccpurify.errors import InvalidInputError, LimitExceededError
from ccpurify.progress import ProgressCallback, report


def bn_layers(model: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    """The BatchNorm2d layers that keep running statistics, with their module names, in module order."""
    return [
        (n, m)
        for n, m in model.named_modules()
        if isinstance(m, nn.BatchNorm2d) and m.track_running_stats and m.running_mean is not None
    ]


# Bytes a synthetic image pool holds per pixel value while it is made: the float32 start and the
# refined copy, dead leaves' float64 distance maps and masks, and the batch's Adam state.
POOL_BYTES_PER_VALUE = 16


def physical_memory_bytes() -> int | None:
    """This machine's physical memory, or None where the OS does not say (then no pool is refused)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def check_pool_size(count: int, input_shape: Sequence[int], option: str) -> None:
    """Refuse a synthetic pool of ``count`` images of ``input_shape`` (C, H, W) that would need more
    than half this machine's memory, before any of it is allocated: an option such as
    ``images=1e9`` would otherwise end in an allocation failure deep inside torch or numpy, or in
    swapping. ``option`` names the setting that asked for the images (shown in the message)."""
    needed = count * math.prod(input_shape) * POOL_BYTES_PER_VALUE
    memory = physical_memory_bytes()
    if memory is not None and needed > memory // 2:
        raise LimitExceededError(
            f"{option}={count:,} asks for {count:,} synthetic images of shape {list(input_shape)}, about "
            f"{needed / 2**30:,.1f} GiB while they are made, more than half of this machine's "
            f"{memory / 2**30:,.0f} GiB: ask for fewer images"
        )


def moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and (biased) variance of an NCHW tensor: what BatchNorm estimates."""
    return x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3), unbiased=False)


def dead_leaves(
    count: int,
    size: int | tuple[int, int] = 32,
    channels: int = 3,
    *,
    seed: int = 0,
    shapes: int = 60,
    min_radius: float = 0.02,
    max_radius: float = 0.5,
    exponent: float = 3.0,
) -> torch.Tensor:
    """``count`` dead-leaves images (N, C, H, W) in [0, 1].

    Each image is a uniform background covered front to back by ``shapes`` discs or squares (one
    each with probability 1/2) of a random colour, centred uniformly, with radii (as a fraction of
    the image side) drawn from a power law ``p(r) ~ r^-exponent`` on ``[min_radius, max_radius]``: a
    scale-invariant size distribution, so the images have the 1/f spectrum and the sharp occlusion
    edges of natural images. Deterministic given ``seed``."""
    if count < 0 or shapes < 1 or channels < 1:
        raise InvalidInputError("dead_leaves needs count >= 0, shapes >= 1 and channels >= 1")
    height, width = (size, size) if isinstance(size, int) else size
    rng = np.random.default_rng([seed, 0xDEAD])
    images = np.empty((count, height, width, channels), np.float32)
    images[:] = rng.random((count, 1, 1, channels), dtype=np.float32)
    covered = np.zeros((count, height, width), bool)
    yy = (np.arange(height, dtype=np.float32)[:, None] + 0.5) / height
    xx = (np.arange(width, dtype=np.float32)[None, :] + 0.5) / width
    a = 1.0 - exponent
    for _ in range(shapes):
        u = rng.random(count)
        radius = (((max_radius**a - min_radius**a) * u + min_radius**a) ** (1.0 / a))[:, None, None]
        cy, cx = rng.random((2, count, 1, 1))
        dy, dx = yy[None] - cy, xx[None] - cx
        disc = rng.random(count)[:, None, None] < 0.5
        inside = np.where(disc, dy**2 + dx**2 < radius**2, (np.abs(dy) < radius) & (np.abs(dx) < radius)) & ~covered
        colour = rng.random((count, channels), dtype=np.float32)
        images[inside] = np.repeat(colour, inside.reshape(count, -1).sum(1), axis=0)
        covered |= inside
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()


@contextmanager
def bn_statistics_loss(model: nn.Module, layers: int | None = None) -> Iterator[list[torch.Tensor]]:
    """While active, every forward of ``model`` appends one term per BatchNorm layer (the first
    ``layers`` of them, or all) to the yielded list: the L2 distance between the batch's per-channel
    mean and standard deviation at the layer's input and its running statistics (ZeroQ's loss)."""
    terms: list[torch.Tensor] = []
    chosen = bn_layers(model)[:layers]
    if not chosen:
        raise InvalidInputError(
            "this needs BatchNorm statistics, and the model has no BatchNorm2d layer with running statistics"
        )

    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        mean, var = moments(inputs[0])
        std = var.add(module.eps).sqrt()
        terms.append(
            torch.norm(mean - module.running_mean) + torch.norm(std - module.running_var.add(module.eps).sqrt())
        )

    handles = [m.register_forward_hook(hook) for _, m in chosen]
    try:
        yield terms
    finally:
        for h in handles:
            h.remove()


@contextmanager
def modes_kept(*models: nn.Module) -> Iterator[None]:
    """The train/eval mode of every module of ``models`` restored afterwards, module by module."""
    modes = [(m, m.training) for model in models for m in model.modules()]
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


@contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode with no parameter gradients; both restored afterwards, module by module."""
    flags = [p.requires_grad for p in model.parameters()]
    with modes_kept(model):
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        try:
            yield model
        finally:
            for p, flag in zip(model.parameters(), flags):
                p.requires_grad_(flag)


def fit_input_affine(
    model: nn.Module,
    images: torch.Tensor,
    *,
    steps: int = 40,
    lr: float = 0.1,
    layers: int = 2,
    device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``(scale, shift)`` such that ``images * scale + shift`` gives the first ``layers``
    BatchNorm layers of ``model`` the input statistics they were trained on.

    Procedural images come in [0, 1]; the model expects its own (unknown) normalisation. Fitting 2C
    numbers to the early BatchNorm statistics recovers it without data: on CIFAR-10 models it lands
    within a few percent of the true mean/std."""
    x = images.to(device)
    channels = x.shape[1]
    log_scale = torch.zeros(1, channels, 1, 1, device=device, requires_grad=True)
    shift = torch.zeros(1, channels, 1, 1, device=device, requires_grad=True)
    opt = torch.optim.Adam([log_scale, shift], lr=lr)
    with frozen(model), bn_statistics_loss(model, layers) as terms:
        for _ in range(steps):
            terms.clear()
            model(x * log_scale.exp() + shift)
            loss = torch.stack(terms).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return log_scale.detach().exp().cpu(), shift.detach().cpu()


def synthesize_bn_images(
    model: nn.Module,
    count: int,
    input_shape: tuple[int, ...],
    *,
    init: str = "noise",
    normalize: Callable[[torch.Tensor], torch.Tensor] | None = None,
    batch_size: int = 128,
    steps: int = 200,
    lr: float = 0.1,
    tv_weight: float = 1e-4,
    class_weight: float = 0.0,
    generator: torch.Generator | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: ProgressCallback | None = None,
) -> torch.Tensor:
    """``count`` model-ready images whose per-layer BN input statistics match the running ones.

    ``init="noise"`` starts from N(0, 1) pixels (ZeroQ); ``init="dead_leaves"`` from dead-leaves
    images (seeded by ``seed``) mapped into the model's input space by ``normalize`` (the model's
    input normalisation, when the caller knows it) or else by ``fit_input_affine``; they need far
    fewer steps (``steps=0`` returns them unrefined).

    ``class_weight > 0`` adds DeepInversion's class term (Yin et al., CVPR 2020): image ``i`` is also
    pushed towards class ``i mod num_classes`` by cross-entropy on ``model``'s logits, so the set is
    class-balanced and lies inside the decision regions rather than between them. Use a model
    trusted not to carry a backdoor (a defense's output): aiming images at the attacker's class of
    a backdoored model is how trigger reconstruction works."""
    if init not in ("noise", "dead_leaves"):
        raise InvalidInputError(f"init must be 'noise' or 'dead_leaves', got {init!r}")
    check_pool_size(count, input_shape, "count")
    if init == "noise":
        start = torch.randn(count, *input_shape, generator=generator)
    else:
        channels, *size = input_shape
        start = dead_leaves(count, tuple(size), channels, seed=seed)
        if normalize is not None:
            start = normalize(start)
        else:
            scale, shift = fit_input_affine(model, start[: min(count, 128)], device=device)
            start = start * scale + shift
    out = []
    batches = math.ceil(count / batch_size)
    with frozen(model), bn_statistics_loss(model) as terms:
        for b in range(batches):
            x = start[b * batch_size : (b + 1) * batch_size].to(device).requires_grad_(True)
            opt = torch.optim.Adam([x], lr=lr)
            loss = torch.zeros(())
            targets = None
            for _ in range(steps):
                terms.clear()
                logits = model(x)
                tv = (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean()
                loss = torch.stack(terms).sum() + tv_weight * tv
                if class_weight > 0:
                    if targets is None:
                        first = b * batch_size
                        targets = torch.arange(first, first + len(x), device=logits.device) % logits.shape[1]
                    loss = loss + class_weight * F.cross_entropy(logits, targets)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            out.append(x.detach())
            report(progress, "synthesize images", b + 1, batches, bn_loss=float(loss.detach()))
    return torch.cat(out) if out else start


@torch.no_grad()
def class_histogram(model: nn.Module, images: torch.Tensor, num_classes: int, batch_size: int = 256) -> torch.Tensor:
    """How many of ``images`` ``model`` assigns to each class (a trigger-leak indicator), in eval
    mode; every module's mode is restored."""
    device = next(model.parameters()).device
    counts = torch.zeros(num_classes, dtype=torch.long)
    with modes_kept(model), torch.no_grad():
        model.eval()
        for i in range(0, len(images), batch_size):
            pred = model(images[i : i + batch_size].to(device)).argmax(1).cpu()
            counts += torch.bincount(pred, minlength=num_classes)[:num_classes]
    return counts
