"""Accuracy recovery by distillation: from a teacher, on given or synthetic data.

- ``distill``: KL(softmax(t / T) || softmax(s / T)) * T^2 (Hinton et al., 2015), batchmean, with an
  optional hard-label CE term when labels exist; SGD with momentum and a cosine schedule.
- ``synthesize_bn_images``: images that make every BatchNorm's batch statistics match its running
  statistics, optimised from Gaussian noise with Adam (ZeroQ, Cai et al., CVPR 2020), plus a small
  total-variation prior. They carry what the network learned about its training distribution and
  nothing of a trigger that the BN statistics do not encode.
- ``recalibrate_bn``: re-estimate every BN's running statistics on given images (no gradients).
  After pruning or factorization the copied statistics no longer describe the student's
  activations; measured on a 50%-pruned cpu-zoo model, recalibrating on 256 synthetic images lifted
  top-1 agreement with the teacher from 0.20 to 0.56, and distilling with adapting BN statistics to
  0.76 (frozen statistics: 0.24).
- ``channel_correspondence`` and ``feature_weight``: besides the logits, match each student
  BatchNorm's input to the teacher's on the channels it kept (FitNets-style hints, Romero et al.,
  ICLR 2015), scaled by the teacher's running variance. The student's BN statistics are copies of
  the teacher's, so a student that reproduces the teacher's features makes them right again,
  whatever the images look like. Measured inside OTBR -> Prune -> Recover on 512 synthetic images,
  20 epochs (validation CA): CIFAR-10 WaNet 19.4 -> 57.1%, BadNets 52.3 -> 58.6% with weight 10
  (benchmarks/results/recover_stages.md).
- ``Recover``: distill the current model from a teacher on, in order of preference, the labelled
  clean data, the unlabelled data, or synthetic images. Inside a ``Pipeline`` the default teacher
  is the output of the latest defense pass (never the suspect model once a defense has run).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

import torch
from torch import nn
from torch.nn import functional as F

from ccpurify.data.transforms import Augment
from ccpurify.passes import register_pass
from ccpurify.passes.base import Pass, PassResult, PurifyContext
from ccpurify.progress import ProgressCallback, report


def _named_bns(model: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    """The BatchNorm2d layers that keep running statistics, with their module names."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, nn.BatchNorm2d) and m.track_running_stats and m.running_mean is not None]  # fmt: skip


def _bn_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for _, m in _named_bns(model)]


def synthesize_bn_images(
    model: nn.Module,
    count: int,
    input_shape: tuple[int, ...],
    *,
    batch_size: int = 128,
    steps: int = 200,
    lr: float = 0.1,
    tv_weight: float = 1e-4,
    generator: torch.Generator | None = None,
    device: str | torch.device = "cpu",
    progress: ProgressCallback | None = None,
) -> torch.Tensor:
    """``count`` model-ready images whose per-layer BN input statistics match the running ones."""
    layers = _bn_layers(model)
    if not layers:
        raise ValueError("synthetic data needs BatchNorm statistics, and this model has no BatchNorm2d layer")
    model.eval()
    stats: list[torch.Tensor] = []

    def hook(module, inputs, output):
        x = inputs[0]
        mean = x.mean(dim=(0, 2, 3))
        var = x.var(dim=(0, 2, 3), unbiased=False)
        stats.append(torch.norm(mean - module.running_mean) + torch.norm(var.add(module.eps).sqrt() - module.running_var.add(module.eps).sqrt()))

    handles = [m.register_forward_hook(hook) for m in layers]
    params = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    out = []
    batches = math.ceil(count / batch_size)
    try:
        for b in range(batches):
            n = min(batch_size, count - b * batch_size)
            x = torch.randn(n, *input_shape, generator=generator).to(device).requires_grad_(True)
            opt = torch.optim.Adam([x], lr=lr)
            for _ in range(steps):
                stats.clear()
                model(x)
                tv = (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean()
                loss = torch.stack(stats).sum() + tv_weight * tv
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            out.append(x.detach())
            report(progress, "synthesize images", b + 1, batches, bn_loss=float(loss.detach()))
    finally:
        for h in handles:
            h.remove()
        for p, flag in zip(model.parameters(), params):
            p.requires_grad_(flag)
    return torch.cat(out)


@torch.no_grad()
def recalibrate_bn(model: nn.Module, images: torch.Tensor, batch_size: int = 128, device: str | torch.device = "cpu") -> None:
    """Replace every BN's running statistics by their cumulative average over ``images``."""
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    momenta = [m.momentum for m in layers]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
    was_training = model.training
    model.train()
    try:
        for i in range(0, len(images), batch_size):
            model(images[i : i + batch_size].to(device))
    finally:
        for m, momentum in zip(layers, momenta):
            m.momentum = momentum
        model.train(was_training)


def channel_correspondence(teacher: nn.Module, student: nn.Module, example_inputs: torch.Tensor) -> dict[str, torch.Tensor]:
    """For each BatchNorm of ``student``, the index of the ``teacher`` channel each of its channels is.

    When the student's structural edits extend the teacher's (a Pipeline's Prune or C&C after a
    defense), the extra edits are replayed on a copy of the teacher whose BN running means hold
    their own channel numbers: every surviving channel then carries the number it had. Otherwise
    (a model edited without its edits recorded) a student channel is the teacher channel with the
    same BN weight, bias and running statistics, when exactly one has them; call this before the
    student's statistics are re-estimated. Layers with no correspondence are left out."""
    from ccpurify.io import edits_of, replay_edits

    teacher_edits, student_edits = edits_of(teacher), edits_of(student)
    teacher_bns, student_bns = dict(_named_bns(teacher)), dict(_named_bns(student))
    if student_edits[: len(teacher_edits)] == teacher_edits and len(student_edits) > len(teacher_edits):
        tagged = copy.deepcopy(teacher).cpu()
        with torch.no_grad():
            for bn in dict(_named_bns(tagged)).values():
                bn.running_mean.copy_(torch.arange(bn.num_features, dtype=bn.running_mean.dtype))
        tagged = replay_edits(tagged, student_edits[len(teacher_edits) :], example_inputs.cpu())
        numbers = {name: bn.running_mean.round().long() for name, bn in _named_bns(tagged)}
    else:
        numbers = {name: _same_parameters(teacher_bns[name], bn) for name, bn in student_bns.items() if name in teacher_bns}
    return {name: idx for name, idx in numbers.items() if idx is not None and name in student_bns and name in teacher_bns
            and len(idx) == student_bns[name].num_features}  # fmt: skip


def _same_parameters(teacher_bn: nn.Module, student_bn: nn.Module) -> torch.Tensor | None:
    """Indices of the teacher channels whose BN parameters and statistics the student's equal, or None."""

    def table(bn: nn.Module) -> torch.Tensor:
        return torch.stack([bn.weight, bn.bias, bn.running_mean, bn.running_var], 1).detach().cpu()

    same = (table(student_bn)[:, None, :] == table(teacher_bn)[None, :, :]).all(-1)
    if not bool((same.sum(1) == 1).all()):
        return None
    return same.float().argmax(1)


class FeatureHints:
    """Records BN inputs of a teacher and a student during a forward pass and compares them.

    ``loss()``: mean over the corresponding layers of the mean squared difference on the kept
    channels, each channel divided by the teacher's running variance (so every layer weighs alike)."""

    def __init__(self, teacher: nn.Module, student: nn.Module, correspondence: dict[str, torch.Tensor]) -> None:
        teacher_bns, student_bns = dict(_named_bns(teacher)), dict(_named_bns(student))
        self.layers: list[tuple[str, torch.Tensor, torch.Tensor]] = []  # (name, teacher channels, 1 / teacher std)
        self._seen: dict[tuple[str, str], torch.Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        for name, idx in correspondence.items():
            t_bn = teacher_bns[name]
            idx = idx.to(t_bn.running_var.device)
            scale = (t_bn.running_var[idx] + t_bn.eps).rsqrt().detach()[None, :, None, None]
            self.layers.append((name, idx, scale))
            for side, bn in (("t", t_bn), ("s", student_bns[name])):
                self._handles.append(bn.register_forward_hook(self._recorder(side, name)))

    def _recorder(self, side: str, name: str):
        def hook(module, inputs, output):
            self._seen[(side, name)] = inputs[0]

        return hook

    def loss(self) -> torch.Tensor:
        if not self.layers:
            return torch.zeros(())
        terms = [((self._seen[("s", n)] - self._seen[("t", n)][:, idx].detach()) * scale).pow(2).mean() for n, idx, scale in self.layers]
        return torch.stack(terms).mean()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._seen.clear()


def distill(
    student: nn.Module,
    teacher: nn.Module,
    images: torch.Tensor,
    *,
    labels: torch.Tensor | None = None,
    epochs: int = 10,
    batch_size: int = 128,
    lr: float = 0.01,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    temperature: float | Callable[[int], float] = 4.0,
    scale_by_t_squared: bool = True,
    hard_label_weight: float = 0.0,
    hints: FeatureHints | None = None,
    feature_weight: float = 0.0,
    augment: Augment | None = None,
    generator: torch.Generator | None = None,
    device: str | torch.device = "cpu",
    progress: ProgressCallback | None = None,
    task: str = "distill",
) -> dict:
    """Train ``student`` to match ``teacher``'s softened outputs on ``images``; returns the loss curve.

    ``temperature`` may be a function of the epoch (BCU's rising schedule); ``scale_by_t_squared``
    multiplies the KL term by T^2 (Hinton's gradient correction; BCU's reference does not).
    ``hints`` (recording both models' BN inputs) adds ``feature_weight`` times their mismatch."""
    teacher.eval()
    opt = torch.optim.SGD(student.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    steps_per_epoch = max(1, math.ceil(len(images) / batch_size))
    total = epochs * steps_per_epoch
    losses = []
    step = 0
    for epoch in range(epochs):
        student.train()
        order = torch.randperm(len(images), generator=generator)
        t_epoch = temperature(epoch) if callable(temperature) else temperature
        running = 0.0
        for i in range(steps_per_epoch):
            for g in opt.param_groups:
                g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
            idx = order[i * batch_size : (i + 1) * batch_size]
            x = images[idx]
            if augment is not None:
                x = augment(x, generator)
            x = x.to(device)
            with torch.no_grad():
                t = teacher(x)
            s = student(x)
            loss = F.kl_div(F.log_softmax(s / t_epoch, 1), F.softmax(t / t_epoch, 1), reduction="batchmean")
            if scale_by_t_squared:
                loss = loss * t_epoch**2
            if labels is not None and hard_label_weight > 0:
                loss = loss + hard_label_weight * F.cross_entropy(s, labels[idx].to(device))
            if hints is not None and feature_weight > 0:
                loss = loss + feature_weight * hints.loss()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            running += float(loss.detach())
            step += 1
        losses.append(running / steps_per_epoch)
        report(progress, task, epoch + 1, epochs, loss=losses[-1])
    student.eval()
    return {"epochs": epochs, "loss_per_epoch": losses, "images": len(images)}


@torch.no_grad()
def agreement(a: nn.Module, b: nn.Module, images: torch.Tensor, batch_size: int = 500) -> float:
    """Fraction of images on which two models predict the same class."""
    a.eval(), b.eval()
    same = sum(int((a(images[i : i + batch_size]).argmax(1) == b(images[i : i + batch_size]).argmax(1)).sum())
               for i in range(0, len(images), batch_size))  # fmt: skip
    return same / max(1, len(images))


class RecoverData(str, Enum):
    AUTO = "auto"  # clean labelled data, else unlabelled data, else synthetic images
    CLEAN = "clean"
    UNLABELED = "unlabeled"
    SYNTHETIC = "synthetic"


def recover_data_free(student: nn.Module, teacher: nn.Module, context: PurifyContext, **options) -> dict:
    """Distill ``student`` from ``teacher`` on synthetic BN-statistics images (C&C's recovery)."""
    return Recover(teacher=teacher, data=RecoverData.SYNTHETIC, **options).recover(student, context)


@register_pass
@dataclass
class Recover(Pass):
    """Distillation from a teacher to win back accuracy after compression."""

    name = "recover"
    kind = "recovery"
    teacher: nn.Module | None = None
    data: RecoverData = RecoverData.AUTO
    epochs: int = 20
    batch_size: int = 128
    lr: float = 0.01
    temperature: float = 4.0
    hard_label_weight: float = 0.0
    augment: bool = True
    hflip: bool = True
    recalibrate: bool = True  # re-estimate BN statistics on the recovery images first
    feature_weight: float = 0.0  # > 0: also match BN inputs to the teacher's (FeatureHints)
    synthetic_images: int = 512
    # 30 synthesis steps recover as well as 100 inside the data-free pipeline (mean validation DER
    # 88.7 vs 88.8 on CIFAR-10 BadNets/Blended) in 40% of the time: benchmarks/results/recover_budget.md.
    synthetic_steps: int = 30

    def __post_init__(self) -> None:
        self.data = RecoverData(self.data)
        if self.epochs < 1:
            raise ValueError("epochs must be >= 1")
        if self.feature_weight < 0:
            raise ValueError("feature_weight must be >= 0")

    def config(self) -> dict:
        d = super().config()
        d["teacher"] = "given" if self.teacher is not None else "pipeline"
        return d

    def run(self, model: nn.Module, context: PurifyContext) -> PassResult:
        return PassResult(model, self.recover(model, context))

    def recover(self, student: nn.Module, context: PurifyContext) -> dict:
        teacher = self.teacher if self.teacher is not None else context.teacher
        if teacher is None:
            raise ValueError("Recover needs a teacher: pass teacher= or put it in a Pipeline after a defense")
        teacher = teacher.to(context.device).eval()
        source, images, labels = self._data(teacher, context)
        augment = Augment(crop_padding=4, hflip=self.hflip) if self.augment else None
        hints = None
        if self.feature_weight > 0:  # before re-estimation, which changes the statistics the fallback matches on
            hints = FeatureHints(teacher, student, channel_correspondence(teacher, student, context.example_inputs))
        if self.recalibrate:
            recalibrate_bn(student, images, self.batch_size, context.device)
        try:
            log = distill(
                student, teacher, images, labels=labels, epochs=self.epochs, batch_size=self.batch_size, lr=self.lr,
                temperature=self.temperature, hard_label_weight=self.hard_label_weight, hints=hints,
                feature_weight=self.feature_weight, augment=augment, generator=context.generator(7), device=context.device,
                progress=context.progress, task="recover",
            )  # fmt: skip
        finally:
            if hints is not None:
                hints.remove()
        if hints is not None:
            log["feature_layers"] = len(hints.layers)
            log["bn_layers"] = len(_named_bns(student))
        return {"data": source.value, "bn_recalibrated": self.recalibrate, **log}

    def _data(self, teacher: nn.Module, context: PurifyContext):
        want = self.data
        if want in (RecoverData.AUTO, RecoverData.CLEAN) and context.clean_data is not None:
            return RecoverData.CLEAN, context.clean_data.x, context.clean_data.y
        if want is RecoverData.CLEAN:
            context.require_clean_data("Recover(data='clean')")
        if want in (RecoverData.AUTO, RecoverData.UNLABELED) and context.unlabeled_data is not None:
            return RecoverData.UNLABELED, context.unlabeled_data.x, None
        if want is RecoverData.UNLABELED:
            context.require_unlabeled_data("Recover(data='unlabeled')")
        images = synthesize_bn_images(
            teacher, self.synthetic_images, tuple(context.example_inputs.shape[1:]), steps=self.synthetic_steps,
            generator=context.generator(11), device=context.device, progress=context.progress,
        )  # fmt: skip
        return RecoverData.SYNTHETIC, images.cpu(), None
