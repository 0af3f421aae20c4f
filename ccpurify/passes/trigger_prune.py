"""Trigger-channel pruning without data: find the backdoor's shortcut on synthetic images, as a
universal perturbation or a universal patch, then remove the channels it switches on.

Neural Cleanse (Wang et al., S&P 2019) mitigates a backdoor by pruning the neurons its reversed
trigger activates most, measured on clean data. Here nothing is real (issue 14; our variant):

1. Images: ``images`` dead-leaves images refined on the model's BatchNorm statistics
   (``synthesis.synthesize_bn_images``, no class term, so nothing aims them at the target).
2. The shortcut, by ``trigger_model``:
   - ``"perturbation"``: the universal perturbation bounded by ``eps`` of the pixel range that sends
     the most of these images to one class (``invariance.fit_universal_trigger``). It lands on
     full-image triggers that neuron-pruning defenses miss: on the zoo it sends 94% of them to the
     target on CIFAR-10 LF, 93% on VGG16-BN Blended, 74% on GTSRB Blended, against 34% on the clean
     CIFAR-10 model.
   - ``"patch"``: Neural Cleanse's own trigger model, a mask and a pattern pasted into every image
     (``invariance.fit_patch_trigger``, L1 penalty ``patch_penalty`` on the mask): it finds BadNets'
     patch, which no small perturbation imitates (CIFAR-10 BadNets: a mask of mean 0.5% sends all of
     them to the target).
   - ``"both"``: both searches; a channel's gain (step 4) is its largest under the triggers that
     passed the gate.
3. Gate: unless a trigger raises its class's share of the images by ``min_lift`` (0.5), and for a
   patch unless its mask's mean (its L1 area) is at most ``max_area`` (2%), it does not count. The
   perturbation lifts the share from 15% to 73% on GTSRB Blended, 23% to 94% on CIFAR-10 LF, 18% to
   97% on CIFAR-10 Blended, 20% to 92% on VGG16-BN Blended, and stays under the gate on CIFAR-10
   WaNet (15% to 61%), Input-aware (21% to 51%), BadNets (23% to 50%) and the clean model (12% to
   22%); the patch passes on PreAct BadNets (CIFAR-10 and GTSRB) and not on WaNet (a 4-5% mask),
   the clean models or VGG16-BN and MobileNetV2 BadNets (docs/defaults.md, session 15). Where no
   trigger passes, nothing is removed, unless the per-image check (``early_depth``, off by
   default) silences channels of the first convs: see ``TriggerPrune``'s options.
4. Score: each channel of the last ``depth`` of the BatchNorm layers (in module order) gets its
   *trigger gain*: the mean over images of ReLU(BN output), averaged over space, on the triggered
   images minus on the images, in units of its standard deviation over the images. Only the deep
   layers: early channels are generic edge and colour detectors that any perturbation switches on,
   and their spatial means vary little between images, so their gains are large for every model
   (CIFAR-10 WaNet, whose warp is no additive perturbation: gains up to 33 in the first two stages,
   and removing them left a model that predicts one class, gated or not); Fine-Pruning (Liu et al., RAID 2018) and
   Neural Cleanse prune only the last layers for the same reason.
5. The channels whose gain exceeds ``min_gain`` (at most ``max_fraction`` of all BatchNorm channels,
   largest gain first) are silenced (BN scale and shift 0). With ``Mode.COMPRESS`` those whose BN
   normalises one conv's output (the graph's pairing, as CLP's) are then removed through the graph
   (residual channels follow ``residual_policy``); the others (a pre-activation ResNet's residual
   stream, which each block reads through its own BN) stay silenced in place.

The pass ``detects``: its details' ``found_backdoor()`` says whether it removed anything, which is
what ``Fallback`` runs a broader defense on.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from enum import Enum

import torch
from torch import nn

from ccpurify.distill import batches
from ccpurify.errors import InvalidInputError
from ccpurify.graph import ChannelGraph, Coupling, RemovalPolicy
from ccpurify.invariance import (
    PATCH_PENALTY,
    PATCH_STEPS,
    PERTURBATION_STEPS,
    WARP_STEPS,
    PatchTrigger,
    UniversalTrigger,
    fit_patch_trigger,
    fit_universal_trigger,
    fit_universal_warp,
    penalty_ramp,
    perturbation_bound,
    trigger_fit_steps,
)
from ccpurify.passes.base import Mode, Pass, PassDetails, PassResult, PurifyContext, Training
from ccpurify.passes.options import Count, Fraction, NonNegativeCount, PositiveFloat, PositiveFraction
from ccpurify.passes.registry import register_pass
from ccpurify.passes.rnp import bn_layers as affine_bn_layers
from ccpurify.passes.rnp import zero_bn_channels
from ccpurify.probes import output_classes
from ccpurify.synthesis import bn_layers, check_pool_size, frozen, synthesize_bn_images


@torch.no_grad()
def standardized_shifts(
    model: nn.Module,
    modules: dict[str, nn.Module],
    images: torch.Tensor,
    applies: Sequence[Callable[[torch.Tensor], torch.Tensor]],
    relu: bool = False,
    batch_size: int = 128,
) -> list[dict[str, torch.Tensor]]:
    """Per trigger of ``applies`` and per module of ``modules`` (name -> module), each output channel's
    shift: the mean over ``images`` of its output (after a ReLU with ``relu``) averaged over space,
    with the trigger applied (``apply(images)``) minus without, divided by the channel's standard
    deviation over ``images`` (+ 1e-3: a channel silent on clean images that the trigger switches
    on gets a large shift). Modules the forward never calls are left out. ``model`` runs frozen; its
    mode is kept."""
    records: dict[str, list[torch.Tensor]] = {name: [] for name in modules}

    def recorder(name: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            records[name].append((output.relu() if relu else output).mean((2, 3)).cpu())

        return hook

    def means(x: torch.Tensor) -> dict[str, torch.Tensor]:
        for v in records.values():
            v.clear()
        for batch in batches(x, batch_size, next(model.parameters()).device):
            model(batch)
        return {name: torch.cat(v) if v else torch.empty(0) for name, v in records.items()}

    handles = [m.register_forward_hook(recorder(name)) for name, m in modules.items()]
    try:
        with frozen(model):
            clean = means(images)
            moved = [means(apply(images)) for apply in applies]
    finally:
        for h in handles:
            h.remove()
    ran = [n for n in modules if len(clean[n])]  # a module the forward never calls records nothing
    return [{n: (m[n].mean(0) - clean[n].mean(0)) / (clean[n].std(0) + 1e-3) for n in ran} for m in moved]


def trigger_gains(
    model: nn.Module,
    bns: dict[str, nn.Module],
    images: torch.Tensor,
    applies: Sequence[Callable[[torch.Tensor], torch.Tensor]],
    batch_size: int = 128,
) -> dict[str, torch.Tensor]:
    """Per BatchNorm of ``bns`` (name -> module), each channel's trigger gain: its shift
    (``standardized_shifts``) of ReLU(BN output); with several triggers (``applies``), the largest.
    ``model``'s mode is kept."""
    return largest_per_channel(standardized_shifts(model, bns, images, applies, relu=True, batch_size=batch_size))


def largest_per_channel(shifts: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Per module, each channel's largest value over ``shifts`` (one name -> per-channel dict each)."""
    return {n: torch.stack([s[n] for s in shifts]).amax(0) for n in shifts[0]}


def patch_specific_shifts(
    model: nn.Module,
    convs: dict[str, nn.Module],
    images: torch.Tensor,
    patches: Sequence[PatchTrigger],
    normalize: Callable[[torch.Tensor], torch.Tensor],
    random_patches: int,
    generator: torch.Generator,
    batch_size: int = 128,
) -> dict[str, torch.Tensor]:
    """Per conv of ``convs`` (name -> module), each output channel's shift under a patch
    (``standardized_shifts`` of its output) beyond what any patch of its size causes: minus the
    largest shift under ``random_patches`` controls (the patch's mask with its pixels shuffled, a
    uniformly random pattern, ``normalize``d). Early channels are edge and colour detectors that any
    pasted square switches on; the control removes that part (session 23:
    ``benchmarks.experiments.backdoor_channels``, ranking ``patch-minus-random``). With several
    ``patches`` (several searches' results), each channel's largest such shift over them, every
    patch against the same draws of controls (session 30). ``model``'s mode is kept."""
    if isinstance(patches, PatchTrigger):
        raise TypeError("patch_specific_shifts takes a list of patches: pass [patch]")
    patches = list(patches)
    if not patches:
        raise ValueError("patch_specific_shifts needs at least one patch")
    if len({(p.mask.shape, p.pattern.shape) for p in patches}) > 1:
        raise ValueError("patch_specific_shifts scores patches of one input shape: their masks or patterns differ")
    if not all(p.mask.isfinite().all() and p.pattern.isfinite().all() for p in patches):
        raise ValueError("a patch's mask or pattern is NaN or infinite: its search diverged; nothing to score with it")
    if random_patches < 0:
        raise ValueError(f"random_patches must be 0 or more, got {random_patches}")
    draws = [
        (
            torch.randperm(patches[0].mask.numel(), generator=generator),
            normalize(torch.rand(patches[0].pattern.shape, generator=generator)),
        )
        for _ in range(random_patches)
    ]
    applies = []
    for patch in patches:
        controls = [
            replace(patch, mask=patch.mask.flatten()[order].view_as(patch.mask), pattern=pattern)
            for order, pattern in draws
        ]
        applies += [t.apply for t in (patch, *controls)]
    shifts = standardized_shifts(model, convs, images, applies, batch_size=batch_size)
    scores = []  # per patch: its shift minus the largest of its controls'
    for i in range(0, len(shifts), 1 + random_patches):
        found, *control = shifts[i : i + 1 + random_patches]
        if control:
            beyond = largest_per_channel(control)
            found = {n: found[n] - beyond[n] for n in found}
        scores.append(found)
    return largest_per_channel(scores)


def best_patch(patches: Sequence[PatchTrigger], min_lift: float, max_area: float) -> tuple[PatchTrigger, bool]:
    """Of several patch searches' results, the one that counts and whether it passed the gate (a
    lift of at least ``min_lift`` with an area of at most ``max_area``): of those that pass, the one
    that sends the most images to its class (the smaller on a tie), else the first."""
    if not patches:
        raise ValueError("best_patch needs at least one patch search's result")
    passing = [p for p in patches if p.lift >= min_lift and p.area <= max_area]
    if not passing:
        return patches[0], False
    return max(passing, key=lambda p: (p.fooled, -p.area)), True


def options_shape(names: Sequence[str]) -> str:
    """The start of a refusal naming options set for a part that will not run: "a shapes", "a, b shape"."""
    return f"{', '.join(names)} {'shapes' if len(names) == 1 else 'shape'}"


class EarlyPatch(str, Enum):
    """Which patch searches' results the per-image check scores the early channels with (its gate
    always reads the one that counts, ``best_patch``'s)."""

    COUNTED = "counted"  # the one that counts: where none passes the gate, the first search's
    STRONGEST = "strongest"  # of all searches, the one that lifts its class the most
    ALL = "all"  # every search's with the counted one's class: each channel by its largest shift over them


class TriggerModel(str, Enum):
    """Which shortcut the pass searches for."""

    PERTURBATION = "perturbation"  # an additive full-image perturbation within eps (Blended, LF)
    PATCH = "patch"  # a small pasted patch (BadNets), Neural Cleanse's trigger model
    BOTH = "both"  # both; the channels either one switches on


@dataclass
class TriggerPruneDetails(PassDetails):
    """What the pass found: each trigger it searched for (its class, the share of the images it sends
    there with and without it, a patch's area, whether it passed the gate), per BatchNorm the channels
    silenced, and how many of them were removed physically and how many only zeroed."""

    triggers: dict[str, dict]  # "perturbation" / "patch" -> summary and "passed"
    gated: bool  # True: no trigger passed its gate (the per-image check may still have silenced channels)
    scored_channels: int
    flagged: int
    layers: dict[str, list[int]]
    top_gains: list[float]
    removed: int | None = None
    zeroed: int | None = None
    # early_depth > 0: the per-image patch check (``TriggerPrune.early_check``): the patch's area and
    # lift, the warp search's lift where it ran, whether the gate opened, the convs scored, the
    # early channels silenced (through their BatchNorm, or their filter where none follows), and
    # once open the patches that scored them (``scored_with``, a list since session 30; a dict in
    # session 29's stored cells: ``TriggerPrune.early_patch``).
    early: dict | None = None
    # More than one patch_warmups: each search's warmup, area, share sent to its class and lift.
    patch_searches: list[dict] = field(default_factory=list)
    images: int = 0  # synthetic images made and scored on
    sample_steps: int = 0  # about the image forwards and backwards spent (``TriggerPrune.sample_steps``)
    # The triggers that passed the gate, as fitted (tensors: not in ``to_dict``; ``triggers`` summarises them).
    passed: tuple[UniversalTrigger | PatchTrigger, ...] = field(default=(), repr=False)

    def training(self) -> Training:
        return Training(self.images, "synthetic", self.sample_steps)

    def found_backdoor(self) -> bool:
        """A trigger passed its gate *and* channels were silenced, or the per-image check silenced
        some: a trigger that switches on no channel above ``min_gain`` leaves the model as it was,
        as if none had been found."""
        return (not self.gated and self.flagged > 0) or self.silenced_per_image_trigger()

    def silenced_per_image_trigger(self) -> bool:
        return bool(self.early and self.early["silenced"])

    def found_triggers(self) -> tuple[UniversalTrigger | PatchTrigger, ...]:
        return self.passed if self.found_backdoor() else ()

    def to_dict(self) -> dict:
        return {k: v for k, v in PassDetails.to_dict(replace(self, passed=())).items() if k != "passed"}

    def choices(self) -> str:
        found = []
        for kind, t in self.triggers.items():
            area = f" (area {t['area']:.1%})" if "area" in t else ""
            found.append(
                f"a {kind}{area} sends {t['fooled']:.0%} of synthetic images to class {t['target']} "
                f"({t['share_before']:.0%} without it{'' if t['passed'] else ', below the gate'})"
            )
        text = "; ".join(found)
        early = ""
        if self.early and self.early["silenced"]:
            early = (
                f"; a per-image patch (no patch of at most {100 * self.early['max_area']:g}%, no perturbation, "
                f"no warp): {self.early['silenced']} channels of the first {self.early['convs']} convs silenced"
            )
        if self.gated and not early:
            return f"{text}: no backdoor found, nothing removed"
        removed = f", {self.removed} removed" if self.removed else ""
        if early:
            return f"{text}{early}: {self.flagged} channels silenced in all{removed}"
        return f"{text}: {self.flagged} channels it switches on silenced{removed}"


@register_pass
@dataclass
class TriggerPrune(Pass):
    """Remove the channels a data-free universal trigger (a perturbation, a patch or both) switches
    on (see the module docstring)."""

    name = "trigger_prune"
    kind = "defense"
    detects = True
    eps: PositiveFraction = 0.05
    min_lift: Fraction = 0.5
    min_gain: PositiveFloat = 1.5
    max_fraction: Fraction = 0.04
    depth: PositiveFraction = 0.5
    images: Count = 256
    # Refinement steps of the synthetic images on the BatchNorm statistics. The data-free default
    # takes 100: on the zoo's VGG16-BN and MobileNetV2 BadNets models the patch search found the
    # trigger only on images refined that long (sends 99-100% of them to the target, against 24 and
    # 43% at 30; benchmarks/experiments/trigger_prune.py --synthesis-steps 100, docs/defaults.md).
    synthesis_steps: NonNegativeCount = 30
    trigger_steps: Count = PERTURBATION_STEPS
    trigger_model: TriggerModel = TriggerModel.PERTURBATION
    # The patch search (trigger_model "patch" or "both"): its L1 penalty on the mask, its steps, and
    # the largest mask area (fraction of the pixels) that still counts as a trigger.
    patch_penalty: PositiveFloat = PATCH_PENALTY
    patch_steps: Count = PATCH_STEPS
    max_area: PositiveFraction = 0.02
    # One patch search per entry, each ramping its penalty up from 0 over that share of its steps
    # (``fit_patch_trigger(warmup=)``; 0: the penalty from the first step). Of several, the one that
    # passes the gate and sends the most images to its class counts (the smaller on a tie), else the
    # first. Session 25, our variant: on this CPU (AVX2) the single search settled on a 1.4% mask
    # that fools 88% of VGG16-BN BadNets' images, against 1.3% and 100% with warmup 0.5; on
    # MobileNetV2 BadNets the warmup search's mask is too large for the gate (2.6%) and the first
    # one's (1.3%, 98%) counts (docs/defaults.md, session 25). The data-free default runs (0.0, 0.5)
    # since session 26.
    patch_warmups: tuple[Fraction, ...] = (0.0,)
    # Per-image patch triggers (Input-aware; session 24, our variant). With early_depth > 0, where no
    # trigger passes the gate above but the patch search still lifts a class by early_min_lift with a
    # mask larger than max_area and at most early_max_area, and a smooth warp search
    # (``fit_universal_warp``, WaNet's trigger model) lifts none by early_min_lift: the first
    # early_depth of the convs (in module order) are scored by ``patch_specific_shifts`` and the top
    # early_fraction of their output channels silenced. A per-image trigger moves the early features
    # that clean images need too, so the deep scoring above finds nothing there (docs/defaults.md,
    # sessions 22-24). The data-free default runs it at 0.5 since session 27.
    early_depth: Fraction = 0.0
    early_fraction: PositiveFraction = 0.13
    early_min_lift: Fraction = 0.3
    early_max_area: PositiveFraction = 0.06
    early_random_patches: NonNegativeCount = 4
    # Which patches score the early channels once the check has opened (session 29, our variant). With
    # several patch searches and none passing the gate, the first one counts; on CIFAR-10
    # Input-aware the warmup search's mask lifts the target class more (lift 0.77 against 0.48 on an
    # AVX-512 CPU, 0.75 against 0.44 on an AVX2 one), and the data-free default there ends at test
    # CA / ASR 69.8 / 7.6% scoring with it, against 66.6 / 27.9% with the first search's patch on the
    # AVX-512 CPU (72.0 / 2.4% on the AVX2 one: which channels the first patch ranks first depends
    # on the CPU). The gate is unchanged, so where the check stays shut this option changes nothing;
    # the scoring patch has no area bar of its own (6.15% there, above early_max_area): the gate's
    # patch has already said the backdoor is a per-image one. "all" (session 30; the data-free
    # default's) scores each channel by its largest shift over every search's patch for the counted
    # one's class (each against the same controls) and hands the counted patch on, so a channel
    # either search singles out is a candidate and the ranking leans less on which patch one search
    # reaches: 70.8 / 5.7% there (docs/defaults.md, session 30). Both need several patch searches.
    early_patch: EarlyPatch = EarlyPatch.COUNTED
    mode: Mode = Mode.COMPRESS
    residual_policy: RemovalPolicy = RemovalPolicy.GROUP

    def __post_init__(self) -> None:
        super().__post_init__()
        self.mode, self.residual_policy = Mode(self.mode), RemovalPolicy(self.residual_policy)
        self.trigger_model = TriggerModel(self.trigger_model)
        self.early_patch = EarlyPatch(self.early_patch)
        self.patch_warmups = tuple(self.patch_warmups)  # a list from a CLI or a saved config
        patch_options = [
            f
            for f in dataclasses.fields(self)
            if f.name in ("patch_penalty", "patch_steps", "max_area", "patch_warmups")
        ]
        changed = [f.name for f in patch_options if getattr(self, f.name) != f.default]
        if changed and self.trigger_model is TriggerModel.PERTURBATION:
            raise InvalidInputError(
                f"{options_shape(changed)} the patch search, which trigger_model='perturbation' does not run: "
                "add trigger_model='patch' or 'both'"
            )
        if not self.patch_warmups:
            raise InvalidInputError("patch_warmups needs at least one warmup: (0.0,) is the single usual search")
        ramps = [penalty_ramp(w, self.patch_steps) for w in self.patch_warmups]
        if len(set(ramps)) < len(ramps):
            raise InvalidInputError(
                f"patch_warmups {list(self.patch_warmups)} ramp the penalty over the same number of the "
                f"{self.patch_steps} patch steps twice: searches with one ramp and one seed find the same patch; "
                "list warmups that differ by at least 1/patch_steps"
            )
        early_options = [f for f in dataclasses.fields(self) if f.name.startswith("early_") and f.name != "early_depth"]
        changed = [f.name for f in early_options if getattr(self, f.name) != f.default]
        if self.early_depth > 0 and self.trigger_model is TriggerModel.PERTURBATION:
            raise InvalidInputError(
                "early_depth checks the patch search for a per-image trigger, which trigger_model='perturbation' "
                "does not run: add trigger_model='patch' or 'both'"
            )
        if changed and self.early_depth == 0:
            raise InvalidInputError(f"{options_shape(changed)} the per-image patch check: it needs early_depth > 0")
        if self.early_patch is not EarlyPatch.COUNTED and len(self.patch_warmups) < 2:
            raise InvalidInputError(
                f"early_patch='{self.early_patch.value}' reads several patch searches and this pass runs one: "
                "add patch_warmups=(0.0, 0.5) (CLI: --set patch_warmups=[0.0,0.5])"
            )
        if self.early_depth > 0 and self.early_max_area <= self.max_area:
            raise InvalidInputError(
                f"early_max_area ({self.early_max_area:g}) must exceed max_area ({self.max_area:g}): the per-image "
                "check takes the patches too large for the patch gate"
            )

    def check(self, model: nn.Module, context: PurifyContext) -> None:
        if not bn_layers(model):
            raise InvalidInputError(
                "trigger_prune makes its images from the model's BatchNorm statistics and scores BatchNorm "
                "channels, and this model has no BatchNorm2d layer: use a defense that needs no BatchNorm (cc)"
            )
        if context.normalize is None:
            # Without it the bound is taken from the synthetic images' range, several times the pixel
            # range: on the clean CIFAR-10 zoo model the perturbation then moved 85% of the images to
            # one class and passed the gate (22% with the normalisation).
            raise InvalidInputError(
                "trigger_prune bounds its perturbation in pixel units and needs the model's input "
                "normalisation: pass normalize=(mean, std) (CLI: the run directory or --dataset gives it)"
            )
        output_classes(model, context.example_inputs)  # (batch, classes) logits, else a one-line error
        check_pool_size(self.images, context.example_inputs.shape[1:], "TriggerPrune images")

    def sample_steps(self, context: PurifyContext) -> int:
        """About the work: the synthesis, then per trigger its search (batches of at most 64) and its
        scoring (the images with and without it). An estimate made before the run, as every pass's."""
        steps = {
            TriggerModel.PERTURBATION: [self.trigger_steps],
            TriggerModel.PATCH: [self.patch_steps] * len(self.patch_warmups),
            TriggerModel.BOTH: [self.trigger_steps] + [self.patch_steps] * len(self.patch_warmups),
        }[self.trigger_model]
        # The per-image check, counted even where its gate may stop it: the warp search, and the
        # images scored without a patch, and per scoring patch with it and with each control.
        scored = len(self.patch_warmups) if self.early_patch is EarlyPatch.ALL else 1
        early = (
            trigger_fit_steps(WARP_STEPS, self.images) + self.images * (1 + (1 + self.early_random_patches) * scored)
            if self.early_depth > 0
            else 0
        )
        return self.images * self.synthesis_steps + sum(trigger_fit_steps(n, self.images) for n in steps) + early

    def fit_triggers(
        self, model: nn.Module, images: torch.Tensor, context: PurifyContext
    ) -> tuple[dict[str, tuple[UniversalTrigger | PatchTrigger, bool]], list[PatchTrigger], list[dict]]:
        """Each trigger this pass searches for on ``images``, with whether it passed its gate: a lift
        of its class's share of at least ``min_lift``, and for a patch an area of at most ``max_area``;
        every patch search's result; and where ``patch_warmups`` runs several, what each found."""
        found: dict[str, tuple[UniversalTrigger | PatchTrigger, bool]] = {}
        patches: list[PatchTrigger] = []
        searches: list[dict] = []
        if self.trigger_model in (TriggerModel.PERTURBATION, TriggerModel.BOTH):
            bound = perturbation_bound(self.eps, images, context.normalize)
            perturbation = fit_universal_trigger(
                model, images, bound, steps=self.trigger_steps, generator=context.generator(31), device=context.device
            )
            found["perturbation"] = perturbation, perturbation.lift >= self.min_lift
        if self.trigger_model in (TriggerModel.PATCH, TriggerModel.BOTH):
            patches = [
                fit_patch_trigger(
                    model,
                    images,
                    context.normalize,
                    penalty=self.patch_penalty,
                    steps=self.patch_steps,
                    warmup=warmup,
                    generator=context.generator(37),
                    device=context.device,
                )
                for warmup in self.patch_warmups
            ]
            patch, passed = best_patch(patches, self.min_lift, self.max_area)
            found["patch"] = patch, passed
            if len(patches) > 1:
                searches = [
                    {
                        "warmup": w,
                        "area": round(p.area, 4),
                        "fooled": round(p.fooled, 4),
                        "lift": round(p.lift, 4),
                        "chosen": p is patch,
                    }
                    for w, p in zip(self.patch_warmups, patches)
                ]
        return found, patches, searches

    @staticmethod
    def _silenceable(conv: str, graph: ChannelGraph, model: nn.Module) -> bool:
        """Whether the per-image check can silence ``conv``'s output channels: the graph knows it, it
        is not the output layer, nor blocked (a grouped conv's channels are tied to its input's), and
        a BatchNorm that normalises it has a scale and shift to zero (else it would output a
        constant where the filter is zeroed)."""
        info = graph.layers.get(conv)
        if info is None or info.coupling in (Coupling.BLOCKED, Coupling.OUTPUT):
            return False
        return info.bn is None or model.get_submodule(info.bn).weight is not None

    def scoring_patches(self, counted: PatchTrigger, patches: Sequence[PatchTrigger]) -> list[PatchTrigger]:
        """The patches the open per-image check scores the early channels with (``early_patch``):
        the counted one; the search's whose patch lifts its class the most (the first of equals, so
        the counted one on a tie); or, the counted one first, every search's patch that sends images
        to the counted one's class, the suspected target (a patch for another class would single out
        that class's features). The first is the one the recovery may unlearn."""
        if self.early_patch is EarlyPatch.STRONGEST:
            return [max(patches, key=lambda p: p.lift)]
        if self.early_patch is EarlyPatch.ALL:
            return [counted, *(p for p in patches if p is not counted and p.target == counted.target)]
        return [counted]

    def early_check(
        self,
        model: nn.Module,
        graph: ChannelGraph,
        images: torch.Tensor,
        found: dict[str, tuple[UniversalTrigger | PatchTrigger, bool]],
        patches: list[PatchTrigger],
        context: PurifyContext,
    ) -> tuple[dict, dict[str, list[int]], PatchTrigger]:
        """The per-image patch check (``early_depth``): its report, the output channels to silence
        per conv (the report's ``filters``: those of convs no BatchNorm normalises, a pre-activation
        network's residual writers), and the patch the recovery may unlearn (the first of
        ``scoring_patches``, which score the channels; the counted one where the check stays shut).
        The gate, in order of cost: no trigger passed the main gate, the patch lifts its class by
        ``early_min_lift`` with an area in (``max_area``, ``early_max_area``], and a warp search
        lifts no class by as much (a warp explains WaNet's patch-like search result: a 4-5% mask on
        CIFAR-10 WaNet, docs/defaults.md session 16)."""
        patch, _ = found["patch"]
        report = {
            "area": round(patch.area, 4),
            "lift": round(patch.lift, 4),
            "max_area": self.max_area,
            "warp_lift": None,
            "opened": False,
            "convs": 0,
            "silenced": 0,
            "filters": {},
        }
        if any(passed for _, passed in found.values()) or patch.lift < self.early_min_lift:
            return report, {}, patch
        if not self.max_area < patch.area <= self.early_max_area:
            return report, {}, patch
        warp = fit_universal_warp(model, images, generator=context.generator(41), device=context.device)
        report["warp_lift"] = round(warp.lift, 4)
        if warp.lift >= self.early_min_lift:
            return report, {}, patch
        scoring = self.scoring_patches(patch, patches)
        patch = scoring[0]
        convs = [
            (n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and self._silenceable(n, graph, model)
        ]
        convs = convs[: max(1, round(self.early_depth * len(convs)))]
        shifts = patch_specific_shifts(
            model, dict(convs), images, scoring, context.normalize, self.early_random_patches, context.generator(43)
        )
        ranked = sorted(
            ((float(v), n, k) for n in shifts for k, v in enumerate(shifts[n]) if math.isfinite(v)), reverse=True
        )
        count = int(self.early_fraction * sum(m.out_channels for _, m in convs))
        channels: dict[str, list[int]] = {}
        for shift, conv, k in ranked[:count]:
            if shift <= 0:
                break
            channels.setdefault(conv, []).append(k)
        report.update(
            opened=True,
            scored_with=[{"target": p.target, "area": round(p.area, 4), "lift": round(p.lift, 4)} for p in scoring],
            convs=len(convs),
            silenced=sum(map(len, channels.values())),
            top_shifts=[round(v, 3) for v, _, _ in ranked[:10]],
            filters={n: sorted(k) for n, k in channels.items() if graph.layers[n].bn is None},
        )
        return report, channels, patch

    def run(self, model: nn.Module, context: PurifyContext) -> PassResult:
        graph = ChannelGraph(model, context.example_inputs)
        images = synthesize_bn_images(
            model,
            self.images,
            tuple(context.example_inputs.shape[1:]),
            init="dead_leaves",
            steps=self.synthesis_steps,
            normalize=context.normalize,
            generator=context.generator(29),
            seed=context.seed,
            device=context.device,
            progress=context.progress,
        ).cpu()
        found, patches, searches = self.fit_triggers(model, images, context)
        gated = not any(passed for _, passed in found.values())
        bns = affine_bn_layers(model)
        deep = dict(list(bns.items())[len(bns) - max(1, round(self.depth * len(bns))) :])
        # A channel's gain is its largest under the triggers that passed (under all when none did,
        # for the report).
        scored = [t.apply for t, passed in found.values() if passed or gated]
        gains = trigger_gains(model, deep, images, scored)
        ranked = sorted(((float(g), bn, i) for bn in gains for i, g in enumerate(gains[bn])), reverse=True)
        limit = int(self.max_fraction * sum(bn.num_features for bn in bns.values()))
        flagged: dict[str, list[int]] = {}
        for g, bn, i in [] if gated else ranked[:limit]:
            if g > self.min_gain:
                flagged.setdefault(bn, []).append(i)
        early, early_channels, early_patch = (
            self.early_check(model, graph, images, found, patches, context) if self.early_depth else (None, {}, None)
        )
        for conv, idx in early_channels.items():
            if (bn := graph.layers[conv].bn) is not None:
                flagged[bn] = [*flagged.get(bn, []), *idx]
        flagged = {bn: sorted(set(idx)) for bn, idx in flagged.items()}
        passed = tuple(t for t, ok in found.values() if ok)
        if early is not None and early["silenced"]:
            passed += (early_patch,)  # the recovery may unlearn it (Recover.found_patch_weight)
        details = TriggerPruneDetails(
            triggers={kind: {**t.summary(), "passed": ok} for kind, (t, ok) in found.items()},
            gated=gated,
            scored_channels=len(ranked),
            flagged=sum(len(idx) for idx in flagged.values())
            + sum(map(len, early["filters"].values()) if early else []),
            layers=flagged,
            top_gains=[round(g, 3) for g, _, _ in ranked[:10]],
            images=len(images),
            sample_steps=self.sample_steps(context),
            passed=passed,
            early=early,
            patch_searches=searches,
        )
        zero_bn_channels(model, flagged, beta=True)  # scale and shift 0: the channel outputs 0
        # An early channel is zeroed at its filter as well: a stem conv's BN is only one of its readers
        # in a pre-activation network, whose shortcut carries the conv's output on.
        for conv, idx in early_channels.items():
            graph.zero_channels(conv, idx, at_filter=True)
        # Channels whose BN normalises one conv's output go physically; the others (a pre-activation
        # network's residual stream, read through its own BN by each block) stay zeroed.
        by_bn = {info.bn: name for name, info in graph.layers.items() if info.bn is not None}
        selection = {
            by_bn[bn]: idx
            for bn, idx in flagged.items()
            if bn in by_bn and graph.layers[by_bn[bn]].coupling not in (Coupling.BLOCKED, Coupling.OUTPUT)
        }
        edits = []
        if self.mode is Mode.FAITHFUL or not selection:
            details.zeroed = details.flagged
        else:
            removal = graph.remove_channels(selection, self.residual_policy)
            details.removed = removal.removed
            details.zeroed = details.flagged - removal.removed
            edits = [removal.edit()] if removal.history else []
        return PassResult(model, details, edits)
