"""BCU: Backdoor Cleansing with Unlabeled data (Pang et al., CVPR 2023).

Follows docs/defenses.md "BCU" and docs/reference/clp_rnp_bcu.md §3:

1. Teacher = the suspect model (eval, no grad). Student = a copy in which every conv/linear weight
   (and bias) element is replaced by a freshly initialised value with a probability that grows with
   depth; BN parameters and statistics are copied. Depth is the layer's resolution level (the
   spatial size of its output, from a forward pass: each downsampling starts a new level) and the
   output layer is the classifier, so layers are chosen by module type and position, never by name.
   The reference ratios (stem 0.01, stages 0.01/0.03/0.09/0.27, classifier 0.10) are reproduced
   exactly for a 4-level ResNet; with L levels the ratio is interpolated geometrically from
   ``first_ratio`` to ``last_ratio``.
2. Distill on unlabelled images with train augmentation: KL(softmax(z_T/T) || softmax(z_S/T)),
   batchmean, no T^2 factor, no hard labels, temperature rising linearly ``T_e = 1 + 3 (e + 1) / E``;
   SGD lr 0.01, momentum 0.9, wd 5e-4, cosine schedule; the last-epoch student is returned.
3. Compact variant (``compact=...``): the student starts from a pruned or low-rank version of the
   teacher (any pass, e.g. ``Prune(macs=0.5)`` or ``CleanCompact(macs=0.5)``), re-initialised the
   same way, so the cleansed model is also smaller.

CPU scaling: the reference runs 100 epochs at batch 256 on 5,000 images (``BCU.reference()``); the
default runs ``epochs=20`` at batch 128 so one pass on the cpu-preset zoo model takes minutes.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn

from ccpurify.distill import DistillLog, distill, epochs_for_budget
from ccpurify.graph import ChannelGraph, Coupling
from ccpurify.passes.base import Pass, PassDetails, PassReport, PassResult, PurifyContext, Training
from ccpurify.passes.data import capped
from ccpurify.passes.options import Count, Fraction, Momentum, NonNegativeFloat, PositiveFloat
from ccpurify.passes.registry import register_pass
from ccpurify.transforms import Augment


def resolution_levels(model: nn.Module, example_inputs: torch.Tensor) -> dict[str, int]:
    """Depth level of every conv/linear layer: 0 for the stem's resolution, +1 per downsampling."""
    sizes: dict[str, int] = {}
    order: list[str] = []

    def remember(name: str):
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            if name not in sizes:
                sizes[name] = out.shape[-1] * out.shape[-2] if out.ndim == 4 else 0
                order.append(name)

        return hook

    hooks = [
        m.register_forward_hook(remember(n)) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))
    ]
    was_training = model.training
    with torch.no_grad():
        model.eval()(example_inputs[:1])
    model.train(was_training)
    for h in hooks:
        h.remove()
    spatial = sorted({s for s in sizes.values() if s > 0}, reverse=True)
    level_of = {s: i for i, s in enumerate(spatial)}
    deepest = max(level_of.values(), default=0)
    return {n: (level_of[sizes[n]] if sizes[n] > 0 else deepest) for n in order}


def level_ratios(levels: int, first: float, last: float) -> list[float]:
    if levels <= 1:
        return [first]
    return [first * (last / first) ** (i / (levels - 1)) for i in range(levels)]


def fresh_like(layer: nn.Module, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A freshly initialised weight (and bias) for ``layer``: Kaiming-normal fan_out for convs (the
    reference's init), PyTorch's default for linears."""
    w = torch.empty_like(layer.weight, device="cpu")
    if isinstance(layer, nn.Conv2d):
        nn.init.kaiming_normal_(w, mode="fan_out", nonlinearity="relu", generator=generator)
    else:
        nn.init.kaiming_uniform_(w, a=math.sqrt(5), generator=generator)
    out = {"weight": w}
    if layer.bias is not None:
        fan_in = layer.weight[0].numel()
        out["bias"] = torch.empty_like(layer.bias, device="cpu").uniform_(
            -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in), generator=generator
        )
    return out


def reinitialize(model: nn.Module, ratios: dict[str, float], generator: torch.Generator) -> dict[str, float]:
    """Replace each element of the named layers' weights and biases by a fresh value with
    probability ``ratios[name]``; returns the fraction actually replaced per layer."""
    replaced = {}
    with torch.no_grad():
        for name, p in ratios.items():
            layer = model.get_submodule(name)
            fresh = fresh_like(layer, generator)
            changed = total = 0
            for key, new in fresh.items():
                param = getattr(layer, key)
                reset = torch.rand(param.shape, generator=generator) < p
                param.copy_(torch.where(reset.to(param.device), new.to(param.device), param))
                changed += int(reset.sum())
                total += reset.numel()
            replaced[name] = changed / max(1, total)
    return replaced


@dataclass
class BCUDetails(PassDetails):
    """What BCU did: the compression pass's own report (when ``compact`` is set), the
    re-initialisation probability of each layer and the fraction actually replaced, the
    distillation log, and the unlabelled images it used."""

    ratios: dict[str, float]
    replaced: dict[str, float]
    distill: DistillLog
    unlabeled_images: int
    compact: PassReport | None = None
    unlabeled_images_given: int | None = None

    def training(self) -> Training:
        return Training(self.distill.images, "unlabelled", self.distill.sample_steps)

    def target_reached(self) -> bool | None:
        return self.compact.details.target_reached() if self.compact is not None else None

    def to_dict(self) -> dict:
        d = super().to_dict()
        d["compact"] = self.compact.to_dict() if self.compact is not None else None
        return d


@register_pass
@dataclass
class BCU(Pass):
    """Distill a partly re-initialised student from the suspect model on unlabelled images."""

    name = "bcu"
    kind = "defense"
    epochs: Count = 20
    batch_size: Count = 128
    lr: PositiveFloat = 0.01
    momentum: Momentum = 0.9
    weight_decay: NonNegativeFloat = 5e-4
    first_ratio: Fraction = 0.01
    last_ratio: Fraction = 0.27
    classifier_ratio: Fraction = 0.10
    t_start: PositiveFloat = 1.0
    t_end: PositiveFloat = 4.0
    augment: bool = True
    hflip: bool = True
    compact: Pass | None = None
    # Distillation budget in sample-steps: when set it replaces ``epochs`` (epochs =
    # ceil(budget / images)), so the cost, and how far the student moves, do not grow with the pool.
    budget: Count | None = None
    # Distil on at most this many of the unlabelled images (a seeded draw). Not the reference's: on
    # CIFAR-10 WaNet, 20,000 images (20 epochs) gave test CA / ASR 81.6 / 47.4% against 79.1 / 3.8%
    # with 5,000, the reference's pool (benchmarks/results/data_amount.md): the longer the student
    # imitates the suspect on natural images, the more of the backdoor it takes back.
    max_images: Count | None = None

    def epochs_for(self, images: int) -> int:
        return epochs_for_budget(self.epochs, self.budget, images)

    @classmethod
    def reference(cls, **overrides) -> BCU:
        """The reference schedule: 100 epochs at batch 256."""
        return cls(**{"epochs": 100, "batch_size": 256, **overrides})

    def temperature(self, epoch: int, epochs: int | None = None) -> float:
        """Linear rise ``T_e = t_start + (t_end - t_start) * (e + 1) / E`` (reference: 1 -> 4)."""
        return self.t_start + (self.t_end - self.t_start) * (epoch + 1) / (epochs or self.epochs)

    def config(self) -> dict:
        d = super().config()
        d["compact"] = None if self.compact is None else {"name": self.compact.name, **self.compact.config()}
        return d

    def depth_ratios(self, model: nn.Module, example_inputs: torch.Tensor) -> dict[str, float]:
        """Re-initialisation probability of every conv/linear layer of ``model``."""
        levels = resolution_levels(model, example_inputs)
        graph = ChannelGraph(model, example_inputs)
        per_level = level_ratios(max(levels.values(), default=0) + 1, self.first_ratio, self.last_ratio)
        out = {}
        for name, level in levels.items():
            info = graph.layers.get(name)
            out[name] = (
                self.classifier_ratio if info is not None and info.coupling is Coupling.OUTPUT else per_level[level]
            )
        return out

    def sample_steps(self, context: PurifyContext) -> int:
        images = capped(len(context.unlabeled_data) if context.unlabeled_data is not None else 0, self.max_images)
        compact = self.compact.sample_steps(context) if self.compact is not None else 0
        return compact + math.ceil(1.5 * self.epochs_for(images) * images)  # distillation: the teacher's forward too

    def macs_kept(self, before: float) -> float:
        """What the compact student keeps (its compression pass's ``macs_kept``), else ``before``."""
        return self.compact.macs_kept(before) if self.compact is not None else before

    def check(self, model: nn.Module, context: PurifyContext) -> None:
        context.require_unlabeled_data("BCU").check(context.example_inputs, "BCU")

    def run(self, model: nn.Module, context: PurifyContext) -> PassResult:
        given = context.require_unlabeled_data("BCU")
        data = given.at_most(self.max_images, context.generator(33))
        teacher = copy.deepcopy(model).eval()
        student, compact_report = model, None
        if self.compact is not None:
            student, compact_report = self.compact(model, context)
        example = context.example_inputs.to(context.device)
        ratios = self.depth_ratios(student, example)
        replaced = reinitialize(student, ratios, context.generator(31))
        epochs = self.epochs_for(len(data))
        log = distill(
            student,
            teacher,
            data.x,
            epochs=epochs,
            batch_size=self.batch_size,
            lr=self.lr,
            momentum=self.momentum,
            weight_decay=self.weight_decay,
            temperature=lambda e: self.temperature(e, epochs),
            scale_by_t_squared=False,
            augment=Augment(4, self.hflip) if self.augment else None,
            generator=context.generator(32),
            device=context.device,
            progress=context.progress,
            task="bcu: distill",
        )
        details = BCUDetails(
            ratios=ratios,
            replaced=replaced,
            distill=log,
            unlabeled_images=len(data),
            compact=compact_report,
            unlabeled_images_given=len(given),
        )
        return PassResult(student, details, compact_report.edits if compact_report is not None else [])
