"""Distillation toolkit shared by the recovery pass and BCU: knowledge distillation with feature
hints, BatchNorm re-estimation, and the channel correspondence between a teacher and its compressed
student.

- ``distill``: KL(softmax(t / T) || softmax(s / T)) * T^2 (Hinton et al., 2015), batchmean, with an
  optional hard-label CE term when labels exist; SGD with momentum and a cosine schedule.
- ``channel_correspondence`` and ``FeatureHints``: besides the logits, match each student BatchNorm's
  input to the teacher's on the channels it kept (FitNets-style hints, Romero et al., ICLR 2015),
  scaled by the teacher's running variance. The student's BN statistics are copies of the teacher's,
  so a student that reproduces the teacher's features makes them right again, whatever the images
  look like. Measured inside OTBR -> Prune -> Recover on 512 synthetic images, 20 epochs
  (validation CA): CIFAR-10 WaNet 19.4 -> 57.1%, BadNets 52.3 -> 58.6% with weight 10
  (benchmarks/results/recover_stages.md).
- ``recalibrate_bn``: re-estimate every BN's running statistics on given images
  (``torch.optim.swa_utils.update_bn``). After pruning the copied statistics no longer describe the
  student's activations.
- ``anchored_bn_update``: the same repair when the images are *not* the training data: only the
  change that compression made to each BN input is measured on the images (student minus teacher on
  the same batch), and added to the teacher's running statistics, which describe the real data.
  On the clean CIFAR-10 zoo model pruned to 0.72 MACs (validation CA 17.2%): re-estimated on 512
  dead-leaves images 54.9%, anchored 61.3%; on Gaussian noise 19.1% vs 42.7%; on 500 real images
  74.2% vs 75.4%.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from torch.optim.swa_utils import update_bn

from ccpurify.errors import InvalidInputError
from ccpurify.invariance import InvarianceTerm
from ccpurify.io import replay_edits
from ccpurify.losses import soft_kl
from ccpurify.progress import ProgressCallback, report
from ccpurify.recipe import edits_of
from ccpurify.synthesis import bn_layers, frozen, moments
from ccpurify.transforms import Augment


def batches(images: torch.Tensor, batch_size: int, device: str | torch.device) -> list[torch.Tensor]:
    """``images`` in consecutive batches of ``batch_size``, each moved to ``device``."""
    return [images[i : i + batch_size].to(device) for i in range(0, len(images), batch_size)]


@torch.no_grad()
def recalibrate_bn(
    model: nn.Module, images: torch.Tensor, batch_size: int = 128, device: str | torch.device = "cpu"
) -> None:
    """Replace every BN's running statistics by their cumulative average over ``images`` (the
    model's train/eval mode is kept)."""
    update_bn(batches(images, batch_size, device), model)


@torch.no_grad()
def anchored_bn_update(
    student: nn.Module,
    teacher: nn.Module,
    images: torch.Tensor,
    correspondence: dict[str, torch.Tensor],
    device: str | torch.device = "cpu",
) -> int:
    """Set each student BatchNorm's running statistics to the teacher's (on the corresponding
    channels) corrected by what compression changed, measured on ``images``:
    ``mean_s = mean_t + (batch_mean_s - batch_mean_t)`` and ``var_s = var_t * batch_var_s / batch_var_t``.

    One forward of each model over all ``images`` as a single batch (pass a few hundred): in the
    student's eval-mode forward every BN updates its statistics from its input before normalising,
    so each layer sees inputs already corrected upstream. BN layers without a correspondence get
    plain batch estimates. Returns the number of anchored layers."""
    x = images.to(device)
    teacher_stats: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    teacher_bns = dict(bn_layers(teacher))

    def record(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            teacher_stats[name] = moments(args[0])

        return hook

    eval_forward_with_pre_hooks(teacher, x, {bn: record(n) for n, bn in teacher_bns.items() if n in correspondence})

    anchored = 0

    def update(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            nonlocal anchored
            mean, var = moments(args[0])
            if name in teacher_stats:
                idx = correspondence[name].to(mean.device)
                t_bn = teacher_bns[name]
                t_mean, t_var = teacher_stats[name][0][idx], teacher_stats[name][1][idx]
                mean = t_bn.running_mean[idx] + (mean - t_mean)
                var = t_bn.running_var[idx] * (var + module.eps) / (t_var + module.eps)
                anchored += 1
            module.running_mean.copy_(mean)
            module.running_var.copy_(var)

        return hook

    eval_forward_with_pre_hooks(student, x, {bn: update(n) for n, bn in bn_layers(student)})
    return anchored


def eval_forward_with_pre_hooks(model: nn.Module, x: torch.Tensor, hooks: dict[nn.Module, Callable]) -> torch.Tensor:
    """``model(x)`` in eval mode with the given forward pre-hooks installed on their modules; the
    hooks are removed and the model's train/eval mode restored afterwards, whatever happens."""
    handles = [module.register_forward_pre_hook(hook) for module, hook in hooks.items()]
    was_training = model.training
    try:
        return model.eval()(x)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()


@torch.no_grad()
def correspondence_after_edits(
    model: nn.Module, edits: list[dict], example_inputs: torch.Tensor
) -> dict[str, torch.Tensor]:
    """For each BatchNorm of ``model`` after the structural ``edits``, the channel of ``model`` each
    of its channels was: the edits are replayed on a copy whose BN running means hold their own
    channel numbers, so every surviving channel carries the number it had."""
    tagged = copy.deepcopy(model).cpu()
    for _, bn in bn_layers(tagged):
        bn.running_mean.copy_(torch.arange(bn.num_features, dtype=bn.running_mean.dtype))
    tagged = replay_edits(tagged, edits, example_inputs.cpu())
    return {name: bn.running_mean.round().long() for name, bn in bn_layers(tagged)}


def channel_correspondence(
    teacher: nn.Module, student: nn.Module, example_inputs: torch.Tensor
) -> dict[str, torch.Tensor]:
    """For each BatchNorm of ``student``, the index of the ``teacher`` channel each of its channels is.

    When the student's structural edits extend the teacher's (a Pipeline's Prune or C&C after a
    defense), the extra edits are replayed on a copy of the teacher whose BN running means hold
    their own channel numbers: every surviving channel then carries the number it had. Otherwise
    (a model edited without its edits recorded) a student channel is the teacher channel with the
    same BN weight, bias and running statistics, when exactly one has them; call this before the
    student's statistics are re-estimated. Layers with no correspondence are left out."""
    teacher_edits, student_edits = edits_of(teacher), edits_of(student)
    teacher_bns, student_bns = dict(bn_layers(teacher)), dict(bn_layers(student))
    if student_edits[: len(teacher_edits)] == teacher_edits and len(student_edits) > len(teacher_edits):
        numbers = correspondence_after_edits(teacher, student_edits[len(teacher_edits) :], example_inputs)
    else:
        numbers = {
            name: _same_parameters(teacher_bns[name], bn) for name, bn in student_bns.items() if name in teacher_bns
        }
    return {
        name: idx
        for name, idx in numbers.items()
        if idx is not None
        and name in student_bns
        and name in teacher_bns
        and len(idx) == student_bns[name].num_features
    }


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
        teacher_bns, student_bns = dict(bn_layers(teacher)), dict(bn_layers(student))
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

    def loss(self, weights: torch.Tensor | None = None) -> torch.Tensor:
        """``weights`` (one per image, 0 or 1): images with weight 0 do not count."""
        if not self.layers:
            return torch.zeros(())
        terms = []
        for n, idx, scale in self.layers:
            per_image = (
                ((self._seen[("s", n)] - self._seen[("t", n)][:, idx].detach()) * scale).pow(2).flatten(1).mean(1)
            )
            terms.append(
                per_image.mean() if weights is None else (per_image * weights).sum() / weights.sum().clamp_min(1)
            )
        return torch.stack(terms).mean()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._seen.clear()


def _check_guard_options(
    guard: nn.Module | None,
    vetoed: str,
    veto_class: int | None,
    veto_topk: int = 1,
    shared_targets: bool = False,
    revive_bias: torch.Tensor | None = None,
) -> None:
    if shared_targets and guard is None:
        raise ValueError("shared_targets shares the teacher's targets with a guard: pass guard= too")
    if revive_bias is not None and (guard is None or revive_bias.dim() != 1):
        raise ValueError("revive_bias is a (K,) logit bias of a guard: pass guard= too, and one value per class")
    if vetoed not in ("guard", "skip", "masked"):
        raise ValueError(f"vetoed must be 'guard', 'skip' or 'masked', got {vetoed!r}")
    if isinstance(veto_topk, bool) or not isinstance(veto_topk, int) or veto_topk < 1:
        raise ValueError(f"veto_topk must be an int >= 1, got {veto_topk!r}")
    if veto_topk > 1 and guard is None:
        raise ValueError("veto_topk loosens a guard: pass guard= too")
    if veto_class is not None:
        if guard is None:
            raise ValueError("veto_class scopes a guard: pass guard= too")
        if isinstance(veto_class, bool) or not isinstance(veto_class, int) or veto_class < 0:
            raise ValueError(f"veto_class must be a class index (an int >= 0), got {veto_class!r}")


def check_max_grad_norm(max_grad_norm: float | None) -> None:
    """``max_grad_norm`` is None (no clipping) or a positive number (``distill``, ``Recover``)."""
    if max_grad_norm is not None and not max_grad_norm > 0:
        raise InvalidInputError(f"max_grad_norm must be a positive number or None, got {max_grad_norm!r}")


def without_class_knowledge(logits: torch.Tensor, cls: int) -> torch.Tensor:
    """``logits`` with class ``cls``'s logit set to its row's median on every row that does not
    predict ``cls``: the ranking of the other classes and every row's prediction stay, but how much
    each image leans to ``cls`` (its dark knowledge, Hinton et al. 2015) is gone. Measured on the
    CIFAR-10 LF model, distilling the suspect at temperature 4 brought the backdoor back through
    OTBR (validation ASR 6% -> 69%), with or without feature hints; at temperature 1, 26%."""
    if not 0 <= cls < logits.shape[1]:
        raise InvalidInputError(f"class {cls} is not a class of a {logits.shape[1]}-class model")
    out = logits.clone()
    rows = logits.argmax(1) != cls
    out[rows, cls] = logits[rows].median(1).values
    return out


def without_prediction(logits: torch.Tensor) -> torch.Tensor:
    """``logits`` with each row's predicted class pushed 1,000 below the row's smallest logit: its
    probability is 0 at any usual temperature, and the other classes keep their ranking and ratios.
    Where a guard overrules a backdoored teacher, the teacher's top class is the one not to trust
    (on the zoo's CIFAR-10 BadNets model 87% of the guard's vetoes on synthetic images were images
    the suspect sent to the backdoor's target), while the rest of its output still says what the
    image shows."""
    return logits.scatter(1, logits.argmax(1, keepdim=True), logits.min(1, keepdim=True).values - 1e3)


def shared_knowledge(teacher_logits: torch.Tensor, guard_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Logits whose softmax at ``temperature`` is, class by class, the smaller of the teacher's and
    the guard's probabilities, renormalised: the dark knowledge both models share. A backdoored
    teacher leans every image towards its target class in proportion to the trigger feature the image
    partly carries; a guard without the backdoor does not, so that lean does not pass on, while the
    class similarities both models learned from clean data do (issue 14, session 10: distilling the
    suspect's own soft targets, guarded only by argmax agreement, taught GTSRB BadNets' backdoor back
    to 52% ASR)."""
    shared = torch.minimum(F.log_softmax(teacher_logits / temperature, 1), F.log_softmax(guard_logits / temperature, 1))
    return shared * temperature


def _guarded_targets(
    teacher_logits: torch.Tensor,
    guard_logits: torch.Tensor,
    veto_class: int | None,
    shared_temperature: float | None = None,
    topk: int = 1,
    mask_vetoed: bool = False,
    revive_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The distillation targets under a guard (the guard's logits where it overrules the teacher, or
    with ``mask_vetoed`` the teacher's own logits without its predicted class, ``without_prediction``;
    with ``shared_temperature`` the knowledge both share, ``shared_knowledge``, where both "agree";
    where only the guard's scope lets the teacher's class stand, the teacher's own) and each image's
    weight: 1 where the teacher's target stands, 0 where the guard overruled it. The two agree where
    the teacher's class is among the guard's ``topk`` most likely classes (1: the same class). With
    ``revive_bias`` (``dead_class_bias``) they also agree where the teacher predicts a revived class
    and the guard with the bias added predicts it too; there the shared knowledge is taken with the
    biased guard, and everywhere else the guard's logits stay as they are."""
    predicted = teacher_logits.argmax(1)
    if topk == 1:
        same = predicted == guard_logits.argmax(1)
    else:
        if topk >= guard_logits.shape[1]:
            raise ValueError(
                f"veto_topk {topk} leaves a {guard_logits.shape[1]}-class guard nothing to veto: give fewer classes"
            )
        same = (guard_logits.topk(topk, 1).indices == predicted[:, None]).any(1)
    shared_guard = guard_logits
    if revive_bias is not None:
        bias = revive_bias.to(guard_logits.device, guard_logits.dtype)
        revived = (bias[predicted] > 0) & ((guard_logits + bias).argmax(1) == predicted)
        same = same | revived
        shared_guard = torch.where(revived[:, None], guard_logits + bias, guard_logits)
    agree = same.clone()
    if veto_class is not None:
        if veto_class >= teacher_logits.shape[1]:
            raise ValueError(f"veto_class {veto_class} is not a class of a {teacher_logits.shape[1]}-class model")
        agree |= predicted != veto_class
    if shared_temperature is not None:  # where both predict the same class (the minimum keeps it)
        shared = shared_knowledge(teacher_logits, shared_guard, shared_temperature)
        teacher_logits = torch.where(same[:, None], shared, teacher_logits)
    overruled = without_prediction(teacher_logits) if mask_vetoed else guard_logits
    return torch.where(agree[:, None], teacher_logits, overruled), agree.to(teacher_logits.dtype)


@dataclass
class DistillLog:
    """What ``distill`` did: epochs over how many images, the mean loss of each epoch, and with a
    guard the fraction of images on which it overruled the teacher."""

    epochs: int
    loss_per_epoch: list[float]
    images: int
    guard_vetoed_fraction: float | None = None

    @property
    def sample_steps(self) -> int:
        """Images the student saw (each augmented anew)."""
        return self.epochs * self.images


def epochs_for_budget(epochs: int, budget: int | None, images: int) -> int:
    """Epochs to run: ``epochs``, or, with a ``budget`` in sample-steps (images seen, augmented),
    ``ceil(budget / images)``, so the cost does not grow with the number of images."""
    return epochs if budget is None else max(1, math.ceil(budget / max(1, images)))


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
    max_grad_norm: float | None = None,
    invariance: InvarianceTerm | None = None,
    suppress_class: int | None = None,
    augment: Augment | None = None,
    guard: nn.Module | None = None,
    vetoed: str = "guard",
    veto_class: int | None = None,
    veto_topk: int = 1,
    veto_hints: bool = True,
    shared_targets: bool = False,
    revive_bias: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    device: str | torch.device = "cpu",
    progress: ProgressCallback | None = None,
    task: str = "distill",
) -> DistillLog:
    """Train ``student`` to match ``teacher``'s softened outputs on ``images``; returns the loss curve.

    ``temperature`` may be a function of the epoch (BCU's rising schedule); ``scale_by_t_squared``
    multiplies the KL term by T^2 (Hinton's gradient correction; BCU's reference does not).
    ``hints`` (recording both models' BN inputs) adds ``feature_weight`` times their mismatch.
    ``max_grad_norm`` clips the gradient's global norm before each step: at large hint weights a
    student far from its teacher otherwise takes steps that diverge to NaN.
    ``invariance`` (an ``ccpurify.invariance.InvarianceTerm``: ``TriggerInvariance``, ``PatchInvariance``
    or their sum, ``Invariances``) adds its term: the student on each image with a trigger (a universal
    perturbation, a patch) is taught the same target as on the image.
    ``suppress_class`` (the backdoor's suspected target) removes that class's dark knowledge from the
    targets (``without_class_knowledge``): a soft target is how a trigger feature partly present in
    synthetic images passes from a backdoored teacher to its student.

    ``guard`` (a model trusted not to carry the backdoor, e.g. a defense's output) vetoes the teacher
    image by image: where the two predict different classes the image's feature hints do not count,
    and its target is the guard's output (``vetoed="guard"``), nothing (``vetoed="skip"``: the image
    does not count at all, so a guard that is often wrong on clean images does not teach its errors),
    or the teacher's output without its predicted class (``vetoed="masked"``, ``without_prediction``:
    the rest of the teacher's knowledge of the image, not the guard's weaker one). ``veto_hints=False``
    keeps the hints of vetoed images: right when ``hints`` record the guard, not the teacher.
    A backdoored teacher can then only pass on behaviour that the guard shares (the agreement mask of
    ``ccpurify.passes.recover``'s trigger-leak guard). With ``veto_class`` the guard overrules the
    teacher only where the teacher predicts that class (the suspected backdoor target,
    ``suspected_target``): elsewhere the teacher's clean knowledge passes on even where the guard,
    which lost accuracy to the defense, disagrees. With ``shared_targets`` the teacher's target, where
    it stands, keeps only the dark knowledge the guard shares (``shared_knowledge``). With
    ``veto_topk`` = k > 1 the guard overrules only where the teacher's class is not among its k most
    likely: a guard that lost accuracy to the defense often ranks the right class second, while a
    trigger sends the teacher to a class the guard has no reason to rank high. ``revive_bias`` (K,)
    (``dead_class_bias``) lets the teacher's class stand where it is a class the guard no longer
    predicts and the guard's logits plus the bias predict it: the guard keeps vetoing, with its own
    logits, everything else (``_guarded_targets``)."""
    _check_guard_options(guard, vetoed, veto_class, veto_topk, shared_targets, revive_bias)
    check_max_grad_norm(max_grad_norm)
    teacher.eval()
    if guard is not None:
        guard.eval()
    overruled = seen = 0
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
                weights = None
                if guard is not None:
                    t, weights = _guarded_targets(
                        t,
                        guard(x),
                        veto_class,
                        t_epoch if shared_targets else None,
                        veto_topk,
                        vetoed == "masked",
                        revive_bias,
                    )
                    overruled += int((weights == 0).sum())
                    seen += len(x)
                if suppress_class is not None:
                    t = without_class_knowledge(t, suppress_class)
            # Before the clean forward: feature hints record the student's last forward.
            invariant = invariance.loss(student, x, t, t_epoch) if invariance is not None else None
            s = student(x)
            per_image = soft_kl(s, t, t_epoch)
            if weights is not None and vetoed == "skip":
                loss = (per_image * weights).sum() / weights.sum().clamp_min(1)
            else:
                loss = per_image.mean()
            if scale_by_t_squared:
                loss = loss * t_epoch**2
            if labels is not None and hard_label_weight > 0:
                loss = loss + hard_label_weight * F.cross_entropy(s, labels[idx].to(device))
            if hints is not None and feature_weight > 0:
                loss = loss + feature_weight * hints.loss(weights if veto_hints else None)
            if invariant is not None:
                loss = loss + invariant
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if max_grad_norm is not None:
                nn.utils.clip_grad_norm_(student.parameters(), max_grad_norm)
            opt.step()
            running += float(loss.detach())
            step += 1
        losses.append(running / steps_per_epoch)
        report(progress, task, epoch + 1, epochs, loss=losses[-1])
    student.eval()
    return DistillLog(epochs, losses, len(images), overruled / max(1, seen) if guard is not None else None)


@torch.no_grad()
def suspected_target(
    teacher: nn.Module, guard: nn.Module, images: torch.Tensor, batch_size: int = 256
) -> tuple[int | None, dict]:
    """The class the backdoor most likely sends images to, seen without data: among the images on
    which ``guard`` (a defense's output) and ``teacher`` (the suspect) disagree, the class the
    teacher predicts most often. A trigger leaking into synthetic images shows up as one class far
    above its share (on the zoo's CIFAR-10 BadNets, Blended and WaNet models after OTBR: 85%, 81%
    and 36% of the disagreements, the true target each time). None when no class reaches twice
    the uniform share (then every disagreement should be vetoed). Returns the class and the counts."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidInputError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise InvalidInputError(f"images must be an (N, C, H, W) tensor, got {getattr(images, 'shape', type(images))}")
    counts: torch.Tensor | None = None
    with frozen(teacher), frozen(guard):  # the callers' modes come back as they were
        for i in range(0, len(images), batch_size):
            x = images[i : i + batch_size].to(next(teacher.parameters()).device)
            logits, guarded = teacher(x), guard(x)
            if logits.shape[1] != guarded.shape[1] or logits.shape[1] < 2:
                raise InvalidInputError(
                    f"the teacher has {logits.shape[1]} outputs and the guard {guarded.shape[1]}: "
                    "both must be classifiers over the same (>= 2) classes"
                )
            t, g = logits.argmax(1), guarded.argmax(1)
            batch = torch.bincount(t[t != g].cpu(), minlength=logits.shape[1])
            counts = batch if counts is None else counts + batch
    if counts is None:
        return None, {"class": None, "share": 0.0, "disagreements": 0, "counts": []}
    total = int(counts.sum())
    top = int(counts.argmax())
    share = counts[top].item() / total if total else 0.0
    chosen = top if total and share >= 2.0 / len(counts) else None
    return chosen, {"class": chosen, "share": share, "disagreements": total, "counts": counts.tolist()}


def dead_class_bias(logits: torch.Tensor, dead_below: float = 0.5, share: float = 1.0) -> torch.Tensor:
    """A logit bias per class (K,) that gives each class the model predicts on fewer than
    ``dead_below`` of the uniform share (1/K) of these images ``share`` of the uniform share back:
    the smallest bias that makes it the prediction on ceil(share * N/K) of them; 0 for every other class.

    Why: OTBR can remove a backdoor by silencing its target class. On the zoo's CIFAR-10 BadNets
    model OTBR's output predicts class 0 on none of 2,000 validation images (the suspect: 91% of
    class 0 right), yet its class-0 log-probability still ranks the class-0 images above the others
    (AUC 0.97) and above triggered images (0.96). As the guard of a recovery it then vetoes every
    image the suspect calls 0, so the student never learns the class (its class-0 accuracy: 1%).
    On one augmented view of the recovery's synthetic images (aimed at every class in turn) this rule
    gives 2.0, and the guard with a bias of 2 scores 77.1 / 0.5% validation CA / ASR (without: 74.2 /
    0.0; docs/defaults.md, session 13)."""
    if logits.dim() != 2 or len(logits) == 0:
        raise InvalidInputError(f"logits must be a non-empty (N, K) tensor, got shape {tuple(logits.shape)}")
    if not 0 < share <= 1:
        raise InvalidInputError(f"share must be in (0, 1], got {share!r}")
    n, classes = logits.shape
    predicted = torch.bincount(logits.argmax(1), minlength=classes)
    wanted = max(1, math.ceil(share * n / classes))
    bias = torch.zeros(classes, dtype=logits.dtype)
    for c in torch.nonzero(predicted < dead_below * n / classes).flatten().tolist():
        others = logits.clone()
        others[:, c] = -math.inf
        margin = others.max(1).values - logits[:, c]  # what image i needs for c to win
        bias[c] = margin.kthvalue(wanted).values.clamp_min(0) + 1e-3
    return bias


class LogitBias(nn.Module):
    """``model`` with a constant ``bias`` (K,) added to its logits (``dead_class_bias``)."""

    def __init__(self, model: nn.Module, bias: torch.Tensor) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("bias", bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x) + self.bias.to(x.device)


@torch.no_grad()
def logits_of(model: nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """``model``'s logits on ``images`` in eval mode, batched, on the CPU (the caller's modes come back)."""
    with frozen(model):
        return torch.cat([model(x).cpu() for x in batches(images, batch_size, next(model.parameters()).device)])


@torch.no_grad()
def agreement(a: nn.Module, b: nn.Module, images: torch.Tensor, batch_size: int = 500) -> float:
    """Fraction of images on which two models predict the same class (each in eval mode; the callers'
    modes come back as they were)."""
    if len(images) == 0:
        raise InvalidInputError("agreement needs at least one image")
    with frozen(a), frozen(b):
        same = sum(
            int((a(images[i : i + batch_size]).argmax(1) == b(images[i : i + batch_size]).argmax(1)).sum())
            for i in range(0, len(images), batch_size)
        )
    return same / len(images)
