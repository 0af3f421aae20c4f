"""RNP: Reconstructive Neuron Pruning with a few labelled clean images (Li et al., ICML 2023).

Follows docs/defenses.md "RNP" and docs/reference/clp_rnp_bcu.md §2:

1. Unlearn a copy: SGD (lr 0.01, momentum 0.9, wd 5e-4, x0.1 at epochs 10 and 20) *maximising*
   cross-entropy on the clean images (with augmentation), until an epoch's running accuracy is
   <= ``clean_threshold`` (0.2), at most ``unlearn_epochs`` (20) epochs; the last state is kept.
2. Recover: a mask m in [0, 1] on every BatchNorm channel of the unlearned copy (BN weight gamma * m,
   bias untouched), m = 1 at start; train only the masks (SGD lr 0.2, momentum 0.9, loss 0.2 * CE,
   clamp after each step, 20 epochs, train mode).
3. Prune the channels with m <= threshold on the *original* model. ``mode="faithful"`` zeroes gamma
   only, as the reference (beta leaks a constant). The default zeroes gamma and beta and removes
   the channels physically through the graph where the BN belongs to one conv; channels of BNs
   that normalise a residual sum (PreAct ``bn1``) cannot be cut from the stream and stay zeroed.

Threshold (never the test set): ``threshold=0.2`` (fixed default, the value the reference log
highlights), or ``threshold="auto"``: hold out ``validation_fraction`` of the clean images, run
steps 1-2 on the rest, and take the largest threshold on the grid 0.05..0.90 whose pruned model
loses at most ``max_accuracy_drop`` accuracy on the held-out images.

Narrow networks (an improvement, off by default): on the ×0.25 zoo models the recovered masks of
10-22% of all channels end at <= 0.05, most at exactly 0, so a threshold cannot rank them and
τ = 0.2 prunes up to 23% of the channels. ``mask_score="trajectory"`` scores each channel by its
mask averaged over every recovery step (a channel driven to 0 early scores lower than one that got
there late), and ``prune_fraction`` prunes that fraction of all BN channels with the lowest scores
instead of thresholding (the reference's ``pruning_by=number``). 5% is the best mean validation DER in
``benchmarks/results/sweep-rnp-prune_fraction-mask_scoretrajectory.md``; grid cell ``rnp-ranked``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from enum import Enum

import torch
from torch import nn
from torch.nn import functional as F

from ccpurify.errors import InvalidInputError
from ccpurify.graph import ChannelGraph, RemovalPolicy
from ccpurify.passes.base import Mode, Pass, PassDetails, PassResult, PurifyContext, Training
from ccpurify.passes.data import LabeledData, capped
from ccpurify.passes.options import Count, Fraction, Momentum, NonNegativeFloat, OpenFraction, PositiveFloat
from ccpurify.passes.registry import register_pass
from ccpurify.progress import report
from ccpurify.transforms import Augment


class MaskScore(str, Enum):
    FINAL = "final"  # the mask after the last recovery step (reference)
    TRAJECTORY = "trajectory"  # the mask's mean over all recovery steps


THRESHOLD_GRID = [round(0.05 * i, 2) for i in range(1, 19)]  # 0.05 .. 0.90


def bn_layers(model: nn.Module) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d) and m.affine}


class BNMasks:
    """Multiplicative masks on every BN's gamma, applied through forward hooks:
    ``y = (BN(x) - beta) * m + beta`` equals BN with weight ``gamma * m`` and bias ``beta``."""

    def __init__(self, model: nn.Module) -> None:
        self.layers = bn_layers(model)
        ref = next(iter(self.layers.values())).weight if self.layers else torch.zeros(0)
        self.masks = {
            n: torch.ones(m.num_features, device=ref.device, requires_grad=True) for n, m in self.layers.items()
        }
        self._handles = [m.register_forward_hook(self._hook(n)) for n, m in self.layers.items()]

    def _hook(self, name: str):
        def apply(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
            beta = module.bias.view(1, -1, 1, 1)
            return (out - beta) * self.masks[name].view(1, -1, 1, 1) + beta

        return apply

    def parameters(self) -> list[torch.Tensor]:
        return list(self.masks.values())

    def clamp_(self) -> None:
        with torch.no_grad():
            for m in self.masks.values():
                m.clamp_(0.0, 1.0)

    def values(self) -> dict[str, torch.Tensor]:
        return {n: m.detach().cpu().clone() for n, m in self.masks.items()}

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


@torch.no_grad()
def accuracy(model: nn.Module, data: LabeledData, device, batch_size: int = 500) -> float:
    model.eval()
    correct = sum(
        int((model(data.x[i : i + batch_size].to(device)).argmax(1).cpu() == data.y[i : i + batch_size]).sum())
        for i in range(0, len(data), batch_size)
    )
    return correct / max(1, len(data))


def zero_bn_channels(model: nn.Module, selected: dict[str, list[int]], beta: bool) -> None:
    with torch.no_grad():
        for name, idx in selected.items():
            bn = model.get_submodule(name)
            bn.weight[idx] = 0
            if beta:
                bn.bias[idx] = 0


def below(masks: dict[str, torch.Tensor], threshold: float) -> dict[str, list[int]]:
    """BN channels whose mask is <= threshold (a global rule over all layers)."""
    out = {}
    for name, m in masks.items():
        idx = torch.nonzero(m <= threshold).flatten().tolist()
        if idx:
            out[name] = idx
    return out


def lowest(scores: dict[str, torch.Tensor], count: int) -> dict[str, list[int]]:
    """The ``count`` BN channels with the lowest scores over the whole network (ties in layer order)."""
    names = [name for name, m in scores.items() for _ in range(len(m))]
    channels = [i for m in scores.values() for i in range(len(m))]
    order = torch.argsort(torch.cat(list(scores.values())), stable=True)[:count].tolist()
    out: dict[str, list[int]] = {}
    for k in sorted(order):
        out.setdefault(names[k], []).append(channels[k])
    return out


def _lowest_of(channels: list[tuple[str, int]], masks: dict[str, torch.Tensor], count: int) -> list[tuple[str, int]]:
    """The ``count`` channels of ``channels`` with the lowest masks."""
    return sorted(channels, key=lambda c: float(masks[c[0]][c[1]]))[:count]


@dataclass
class RNPThreshold:
    """How RNP turned mask values into a selection: ``"fixed"`` (the given threshold), ``"auto"``
    (chosen on held-out images: the sweep it ran) or ``"fraction"`` (the lowest ``prune_fraction``
    of the channels, with what the collapse guard saw)."""

    kind: str
    prune_fraction: float | None = None
    collapse_guard: dict | None = None
    heldout_images: int | None = None
    sweep: list | None = None


@dataclass
class RNPDetails(PassDetails):
    """What RNP did: its unlearning (epochs, accuracy per epoch), the images it used and was given,
    the threshold and how it was chosen, the pruned channels per BN layer and every mask value, and in
    compress mode how many channels were removed physically or only zeroed."""

    unlearn_epochs: int
    unlearn_acc: list[float]
    clean_images: int
    clean_images_given: int
    sample_steps: int
    threshold: float
    threshold_rule: RNPThreshold
    mask_score: str
    pruned_channels: int
    channels: dict[str, list[int]]
    total_channels: int
    masks: dict[str, list[float]]
    removed: int | None = None
    zeroed_only: int | None = None

    def training(self) -> Training:
        return Training(self.clean_images, "labelled", self.sample_steps)


@register_pass
@dataclass
class RNP(Pass):
    """Unlearn, recover BN-channel masks, prune low-mask channels of the original model."""

    name = "rnp"
    kind = "defense"
    mode: Mode = Mode.COMPRESS
    threshold: float | str = 0.2
    prune_fraction: float | None = None  # prune this fraction of all BN channels instead of thresholding
    mask_score: MaskScore = MaskScore.FINAL
    max_accuracy_drop: Fraction = 0.03
    validation_fraction: OpenFraction = 0.2
    clean_threshold: Fraction = 0.2
    unlearn_epochs: Count = 20
    unlearn_lr: PositiveFloat = 0.01
    recover_epochs: Count = 20
    recover_lr: PositiveFloat = 0.2
    alpha: PositiveFloat = 0.2
    batch_size: Count = 128
    momentum: Momentum = 0.9
    weight_decay: NonNegativeFloat = 5e-4
    augment: bool = True
    hflip: bool = True
    residual_policy: RemovalPolicy = RemovalPolicy.GROUP
    # Unlearn and recover the masks on at most this many of the clean images (a seeded draw). RNP's
    # stages run for fixed *epochs*, so more images means more gradient-ascent steps per epoch and
    # a deeper unlearning: the paper's setting is 500 images (1% of CIFAR-10).
    max_images: Count | None = None
    # With prune_fraction (ccpurify's ranked rule, not the paper's): a channel whose removal alone
    # leaves the model below this fraction of its accuracy on the defender's images is kept, and
    # while the rest still does, half as many are pruned. On CIFAR-10 WaNet, the ranked rule on a
    # different 500-image draw pruned the model into a constant classifier (accuracy 10.8%, ASR
    # 100%; benchmarks/experiments/wanet_data_amount.py). None turns the guard off.
    collapse_guard: float | None = 0.8

    def __post_init__(self) -> None:
        super().__post_init__()
        self.mode, self.residual_policy = Mode(self.mode), RemovalPolicy(self.residual_policy)
        if self.collapse_guard is not None and not 0 < self.collapse_guard <= 1:
            raise InvalidInputError(f"collapse_guard must be in (0, 1] or None, got {self.collapse_guard}")
        if self.max_images is not None and self.max_images < 1:
            raise InvalidInputError(f"max_images must be a positive number of images, got {self.max_images}")
        self.mask_score = MaskScore(self.mask_score)
        if self.prune_fraction is not None:
            if not 0.0 < self.prune_fraction < 1.0:
                raise InvalidInputError(f"prune_fraction must be in (0, 1), got {self.prune_fraction}")
            if self.threshold == "auto":
                raise InvalidInputError("give either prune_fraction or threshold='auto', not both")
        if isinstance(self.threshold, str) and self.threshold != "auto":
            raise InvalidInputError("threshold must be a number in (0, 1) or 'auto'")
        if not isinstance(self.threshold, str) and not 0.0 < self.threshold < 1.0:
            raise InvalidInputError(f"threshold must be in (0, 1), got {self.threshold}")

    # -- stages --------------------------------------------------------------------------------
    def unlearn(self, model: nn.Module, data: LabeledData, context: PurifyContext) -> tuple[nn.Module, list[float]]:
        """Stage 1: gradient ascent on clean cross-entropy until accuracy <= clean_threshold."""
        unlearned = copy.deepcopy(model).train()
        opt = torch.optim.SGD(
            unlearned.parameters(), lr=self.unlearn_lr, momentum=self.momentum, weight_decay=self.weight_decay
        )
        augment = Augment(4, self.hflip) if self.augment else None
        gen = context.generator(21)
        history = []
        for epoch in range(self.unlearn_epochs):
            lr = self.unlearn_lr * (0.1 ** sum(epoch >= m for m in (10, 20)))
            for g in opt.param_groups:
                g["lr"] = lr
            correct = seen = 0
            for idx, x in data.batches(self.batch_size, gen, augment):
                y = data.y[idx].to(context.device)
                logits = unlearned(x.to(context.device))
                loss = F.cross_entropy(logits, y)
                opt.zero_grad(set_to_none=True)
                (-loss).backward()
                opt.step()
                correct += int((logits.argmax(1) == y).sum())
                seen += len(y)
            history.append(correct / seen)
            report(context.progress, "rnp: unlearn", epoch + 1, self.unlearn_epochs, acc=history[-1])
            if history[-1] <= self.clean_threshold:
                report(context.progress, "rnp: unlearn", self.unlearn_epochs, self.unlearn_epochs, acc=history[-1])
                break
        return unlearned, history

    def recover_masks(self, unlearned: nn.Module, data: LabeledData, context: PurifyContext) -> dict[str, torch.Tensor]:
        """Stage 2: learn BN-channel masks on the unlearned copy, everything else frozen. Returns
        the channel scores in [0, 1]: the final masks, or their mean over all steps (``mask_score``)."""
        model = copy.deepcopy(unlearned).train()
        for p in model.parameters():
            p.requires_grad_(False)
        masks = BNMasks(model)
        trajectory = {n: torch.zeros_like(m, requires_grad=False) for n, m in masks.masks.items()}
        steps = 0
        opt = torch.optim.SGD(masks.parameters(), lr=self.recover_lr, momentum=self.momentum)
        augment = Augment(4, self.hflip) if self.augment else None
        gen = context.generator(22)
        try:
            for epoch in range(self.recover_epochs):
                total, seen = 0.0, 0
                for idx, x in data.batches(self.batch_size, gen, augment):
                    y = data.y[idx].to(context.device)
                    loss = self.alpha * F.cross_entropy(model(x.to(context.device)), y)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    masks.clamp_()
                    steps += 1
                    for n, m in masks.masks.items():
                        trajectory[n] += m.detach()
                    total += float(loss.detach()) * len(y)
                    seen += len(y)
                report(context.progress, "rnp: recover masks", epoch + 1, self.recover_epochs, loss=total / seen)
        finally:
            masks.remove()
        if self.mask_score is MaskScore.TRAJECTORY and steps:
            return {n: (t / steps).cpu() for n, t in trajectory.items()}
        return masks.values()

    def choose_threshold(
        self, model: nn.Module, masks: dict[str, torch.Tensor], held_out: LabeledData, context
    ) -> tuple[float, list]:
        """Largest grid threshold whose pruned model keeps held-out accuracy within the allowed drop."""
        base = accuracy(model, held_out, context.device)
        chosen, sweep = THRESHOLD_GRID[0], []
        for tau in THRESHOLD_GRID:
            trial = copy.deepcopy(model)
            zero_bn_channels(trial, below(masks, tau), beta=self.mode is Mode.COMPRESS)
            acc = accuracy(trial, held_out, context.device)
            sweep.append(
                {"threshold": tau, "channels": sum(len(v) for v in below(masks, tau).values()), "heldout_acc": acc}
            )
            if acc >= base - self.max_accuracy_drop:
                chosen = tau
        return chosen, sweep

    def guarded_lowest(
        self, model: nn.Module, masks: dict[str, torch.Tensor], count: int, data: LabeledData, context: PurifyContext
    ):
        """The ``count`` lowest-mask channels, minus any channel that by itself leaves the model
        below ``collapse_guard`` times its accuracy on ``data`` (the defender's own images); then,
        while the rest still does, half as many. Returns the selection and what the guard saw."""
        selected = lowest(masks, count)
        if self.collapse_guard is None or count == 0:
            return selected, None
        base = accuracy(model, data, context.device)
        floor = self.collapse_guard * base

        def accuracy_without(channels: dict[str, list[int]]) -> float:
            trial = copy.deepcopy(model)
            zero_bn_channels(trial, channels, beta=True)
            return accuracy(trial, data, context.device)

        seen = {"base_accuracy": base, "accuracy": accuracy_without(selected), "kept_alone": [], "halved": 0}
        if seen["accuracy"] >= floor:
            return selected, seen
        for name, idx in selected.items():
            seen["kept_alone"] += [[name, i] for i in idx if accuracy_without({name: [i]}) < floor]
        culprits = {(n, i) for n, i in seen["kept_alone"]}
        ranked = [(n, i) for n, idx in lowest(masks, count).items() for i in idx if (n, i) not in culprits]
        while True:
            selected = {}
            for n, i in ranked:
                selected.setdefault(n, []).append(i)
            seen["accuracy"] = accuracy_without(selected)
            if seen["accuracy"] >= floor or not ranked:
                return selected, seen
            ranked = _lowest_of(ranked, masks, len(ranked) // 2)
            seen["halved"] += 1

    # -- pass ----------------------------------------------------------------------------------
    def sample_steps(self, context: PurifyContext) -> int:
        images = len(context.clean_data) if context.clean_data is not None else 0
        images = capped(images, self.max_images)
        return (self.unlearn_epochs + self.recover_epochs) * images

    def check(self, model: nn.Module, context: PurifyContext) -> None:
        context.require_clean_data("RNP")
        if not bn_layers(model):
            raise InvalidInputError(
                "RNP masks BatchNorm channels, and this model has no BatchNorm2d layer; choose a data-free method (e.g. 'clp')"
            )

    def run(self, model: nn.Module, context: PurifyContext) -> PassResult:
        data = context.require_clean_data("RNP")
        given = len(data)
        data = data.at_most(self.max_images, context.generator(29))
        train_data, held_out = data, None
        if self.threshold == "auto":
            gen = context.generator(23)
            order = torch.randperm(len(data), generator=gen)
            n_val = max(1, int(self.validation_fraction * len(data)))
            held_out, train_data = data.subset(order[:n_val]), data.subset(order[n_val:])
        unlearned, unlearn_history = self.unlearn(model, train_data, context)
        masks = self.recover_masks(unlearned, train_data, context)
        rule = RNPThreshold(kind="fixed")
        if self.prune_fraction is not None:
            count = round(self.prune_fraction * sum(len(m) for m in masks.values()))
            selected, guard = self.guarded_lowest(model, masks, count, data, context)
            tau = max((float(masks[n][i]) for n, idx in selected.items() for i in idx), default=0.0)
            rule = RNPThreshold(kind="fraction", prune_fraction=self.prune_fraction, collapse_guard=guard)
        elif held_out is not None:
            tau, sweep = self.choose_threshold(model, masks, held_out, context)
            rule = RNPThreshold(kind="auto", heldout_images=len(held_out), sweep=sweep)
            selected = below(masks, tau)
        else:
            tau = float(self.threshold)
            selected = below(masks, tau)
        details = RNPDetails(
            unlearn_epochs=len(unlearn_history),
            unlearn_acc=unlearn_history,
            clean_images=len(data),
            clean_images_given=given,
            sample_steps=(len(unlearn_history) + self.recover_epochs) * len(train_data),
            threshold=tau,
            threshold_rule=rule,
            mask_score=self.mask_score.value,
            pruned_channels=sum(len(v) for v in selected.values()),
            channels={n: [int(i) for i in idx] for n, idx in selected.items()},
            total_channels=sum(len(m) for m in masks.values()),
            masks={n: [round(float(v), 4) for v in m] for n, m in masks.items()},
        )
        if self.mode is Mode.FAITHFUL:
            zero_bn_channels(model, selected, beta=False)
            return PassResult(model, details)
        zero_bn_channels(model, selected, beta=True)
        graph = ChannelGraph(model, context.example_inputs.to(context.device))
        owner = {info.bn: name for name, info in graph.layers.items() if info.bn is not None}
        removable = {owner[bn]: idx for bn, idx in selected.items() if bn in owner}
        removal = graph.remove_channels(removable, self.residual_policy)
        details.removed, details.zeroed_only = removal.removed, details.pruned_channels - removal.removed
        return PassResult(model, details, [removal.edit()] if removal.history else [])
