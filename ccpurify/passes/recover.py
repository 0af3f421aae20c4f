"""Accuracy recovery by distillation from a teacher, on given or synthetic data (the ``recover`` pass).

The toolkit (``distill``, feature hints, BN re-estimation) is ``ccpurify.distill``; the data-free
transfer sets are ``ccpurify.synthesis``. ``Recover`` distills the current model from a teacher on,
in order of preference, the labelled clean data, the unlabelled data, or synthetic images. Inside a
``Pipeline`` the default teacher is the output of the latest defense pass.

``teacher_from="input"`` distills from the pipeline's *input* model instead: the suspect model keeps
all of its clean accuracy, which a defense's output has lost (OTBR: CIFAR-10 BadNets validation CA
89.8 -> 68.6%). It is safe only because of two rules: the images carry no trigger (synthetic images
made from BatchNorm statistics, not the attacker's data), and every channel a defense silenced stays
silenced (its BN scale and shift, or its filter, are frozen at zero), so distillation cannot revive
what the defense cut. Measured on CIFAR-10 BadNets: OTBR(compact) -> Prune(0.75 MACs) -> Recover from
the input model: validation CA 81.1%, ASR 7.0% (an exploratory run, not yet a benchmark script; the
same pipeline does not hold the backdoor off on WaNet: issue 14's notes).

``teacher_from="self"`` distills from a frozen copy of the model the pass is given: a short fine-tune
on the defender's images that never sees the suspect, after a pipeline that already purified and
compressed (``defaults.self_finetune``).
"""

from __future__ import annotations

import copy
import itertools
import math
from dataclasses import dataclass, fields
from enum import Enum

import torch
from torch import nn

from ccpurify.distill import (
    DistillLog,
    FeatureHints,
    LogitBias,
    anchored_bn_update,
    channel_correspondence,
    check_max_grad_norm,
    dead_class_bias,
    distill,
    epochs_for_budget,
    logits_of,
    recalibrate_bn,
    suspected_target,
)
from ccpurify.errors import InvalidInputError
from ccpurify.invariance import (
    PATCH_PENALTY,
    PATCH_STEPS,
    PERTURBATION_STEPS,
    WARP_SHIFT,
    WARP_STEPS,
    Invariances,
    InvarianceTerm,
    PatchInvariance,
    PatchTrigger,
    TriggerInvariance,
    UniversalTrigger,
    UniversalWarp,
    WarpInvariance,
    fit_patch_trigger,
    fit_universal_trigger,
    fit_universal_warp,
    perturbation_bound,
    trigger_fit_steps,
)
from ccpurify.passes.base import Pass, PassDetails, PassResult, PurifyContext, Training
from ccpurify.passes.options import (
    Count,
    Fraction,
    NonNegativeCount,
    NonNegativeFloat,
    PositiveFloat,
    PositiveFraction,
    Temperature,
)
from ccpurify.passes.registry import register_pass
from ccpurify.probes import output_classes
from ccpurify.synthesis import bn_layers, check_pool_size, modes_kept, synthesize_bn_images
from ccpurify.transforms import Augment


class RecoverData(str, Enum):
    AUTO = "auto"  # clean labelled data, else unlabelled data, else synthetic images
    CLEAN = "clean"
    UNLABELED = "unlabeled"
    SYNTHETIC = "synthetic"


class TeacherSource(str, Enum):
    DEFENSE = "defense"  # the latest defense's output in the pipeline (or the input model if none ran)
    INPUT = "input"  # the pipeline's input model, with what defenses silenced kept silent in the student
    # the model this pass is given, as it comes (self-distillation): nothing of a model before it can
    # come back, and with labelled images the labels add what the given model got wrong
    SELF = "self"


class GuardVeto(str, Enum):
    """What the student learns on an image where the guard overrules the teacher."""

    GUARD = "guard"  # the guard's output
    SKIP = "skip"  # nothing: the image does not count
    MASKED = "masked"  # the teacher's output without its predicted class (distill.without_prediction)


class GuardScope(str, Enum):
    """Where the guard may overrule the teacher."""

    ALL = "all"  # wherever the two disagree
    TARGET = "target"  # only where the teacher predicts the suspected backdoor target


class GuardRevive(str, Enum):
    """Where a class the guard no longer predicts gets its logit bias back (``distill.dead_class_bias``)."""

    OFF = "off"
    # the guard's logits carry the bias everywhere: its predictions, its vetoed targets, its shared knowledge
    GUARD = "guard"
    # only where the teacher predicts the revived class: the bias decides whether that prediction stands,
    # and the guard's own logits everything else (distill's ``revive_bias``)
    AGREED = "agreed"


class GuardTargets(str, Enum):
    """What the student learns from the teacher on an image where the guard lets the teacher stand."""

    TEACHER = "teacher"  # the teacher's soft targets
    # class by class the smaller of the teacher's and the guard's probabilities (distill.shared_knowledge):
    # the suspect's lean towards its backdoor target does not pass on
    SHARED = "shared"


class HintSource(str, Enum):
    """Which model's BN inputs the student's feature hints are matched to."""

    TEACHER = "teacher"
    # the guard (the latest defense's output): the suspect's features carry the trigger's, and at
    # weight 100 matching them re-taught the backdoor after a mild OTBR (issue 14, session 9)
    GUARD = "guard"


class SyntheticInit(str, Enum):
    NOISE = "noise"  # Gaussian pixels, as ZeroQ (C&C's recovery)
    DEAD_LEAVES = "dead_leaves"  # procedural natural-like images (ccpurify.synthesis.dead_leaves)


@dataclass
class RecoverDetails(PassDetails):
    """What ``Recover`` did: the data it distilled on and the teacher it used, how BN statistics
    were re-estimated, the distillation log, the feature-hint layers and how many silenced
    channels were kept frozen."""

    data: str  # "clean", "unlabeled" or "synthetic"
    teacher: str  # "given", "defense", "input" or "self" ("defense" too where guard_teaches_if_found applied)
    bn_recalibrated: bool
    bn_anchored: bool
    distill: DistillLog
    frozen_silenced_channels: int
    guard_scope: str | None = None  # with the guard: the scope it had (guard_scope, or guard_scope_per_image)
    suspected_target: dict | None = None  # guard scope "target": distill.suspected_target's class and counts
    feature_layers: int | None = None  # BN layers matched by feature hints (None: no hints)
    bn_layers: int | None = None
    # invariance_weight > 0 or suppress_target: UniversalTrigger.summary() on the teacher
    universal_trigger: dict | None = None
    patch_trigger: dict | None = None  # invariance_patch_weight > 0: PatchTrigger.summary() on the teacher
    # invariance_warp_weight > 0: UniversalWarp.summary() on the teacher, and whether it passed
    # invariance_warp_min_lift and was unlearned
    warp_trigger: dict | None = None
    guard_revived_classes: dict | None = None  # guard_revive_classes: each revived class's logit bias
    found_patches_unlearned: int = 0  # found_patch_weight > 0: the defense's reversed patches unlearned

    def training(self) -> Training:
        kind = {"clean": "labelled", "unlabeled": "unlabelled"}.get(self.data, self.data)
        return Training(self.distill.images, kind, self.distill.sample_steps)


def recover_data_free(student: nn.Module, teacher: nn.Module, context: PurifyContext, **options) -> RecoverDetails:
    """Distill ``student`` from ``teacher`` on synthetic BN-statistics images (C&C's recovery)."""
    return Recover(teacher=teacher, data=RecoverData.SYNTHETIC, **options).recover(student, context)


@register_pass
@dataclass
class Recover(Pass):
    """Distillation from a teacher to win back accuracy after compression."""

    name = "recover"
    kind = "recovery"
    teacher: nn.Module | None = None
    teacher_from: TeacherSource = TeacherSource.DEFENSE
    data: RecoverData = RecoverData.AUTO
    epochs: Count = 20
    # Distillation budget in sample-steps (images seen by the student, augmented): when set, it
    # replaces ``epochs`` (epochs = ceil(budget / images)), so the cost does not depend on the data size.
    budget: Count | None = None
    batch_size: Count = 128
    lr: PositiveFloat = 0.01
    temperature: Temperature = 4.0
    hard_label_weight: NonNegativeFloat = 0.0
    augment: bool = True
    hflip: bool = True
    # Re-estimate BN statistics on the recovery images first. Only the start: distillation trains BN in
    # train mode, and after a few dozen steps its running averages have replaced these statistics
    # (the default's recovery with and without anchor_bn: the same to the last digit on MobileNetV2 WaNet).
    recalibrate: bool = True
    # ... and re-estimate them anchored to the teacher's (distill.anchored_bn_update): only the change
    # compression made is measured on the images, which suits images that are not the training data.
    # Anchoring the *trained* student to the suspect instead wins CA and the backdoor back
    # (benchmarks/experiments/student_statistics.py).
    anchor_bn: bool = False
    feature_weight: NonNegativeFloat = 0.0  # > 0: also match BN inputs to the teacher's (FeatureHints)
    hints_from: HintSource = HintSource.TEACHER  # "guard": match the guard's BN inputs instead (needs guard=True)
    # Where the guard overrules the teacher, the image's hints do not count. With hints from the guard
    # (hints_from="guard") False keeps them: they come from the model the veto trusts.
    guard_vetoes_hints: bool = True
    max_grad_norm: float | None = None  # clip the gradient's global norm (distill): keeps large hint weights stable
    synthetic_images: Count = 512
    # 30 synthesis steps recover as well as 100 inside the data-free pipeline (mean validation DER
    # 88.7 vs 88.8 on CIFAR-10 BadNets/Blended) in 40% of the time: benchmarks/results/recover_budget.md.
    synthetic_steps: NonNegativeCount = 30
    synthetic_init: SyntheticInit = SyntheticInit.NOISE
    # With teacher_from="input": the latest defense's output vetoes the suspect teacher image by image
    # (distill's ``guard``), so a trigger feature present in the synthetic images cannot be passed on.
    guard: bool = False
    # Where the guard overrules the teacher: "guard" distills the guard's output on that image,
    # "skip" leaves the image out (distill's ``vetoed``).
    guard_vetoed: GuardVeto = GuardVeto.GUARD
    # "all": the guard overrules the teacher wherever they disagree; "target": only where the teacher
    # predicts the suspected backdoor target (distill.suspected_target, found on the recovery
    # images), so the suspect's clean knowledge passes on where the guard is merely less accurate.
    guard_scope: GuardScope = GuardScope.ALL
    # Where the defense before it silenced channels for a per-image trigger (TriggerPrune's early
    # check; PassDetails.silenced_per_image_trigger()), this scope instead (None: guard_scope there
    # too). That defense's output lost early features clean images need (CIFAR-10 Input-aware:
    # validation CA 65%), and a guard that overrules the suspect wherever the two disagree holds the
    # student near it; "target" lets the suspect teach where it does not predict the backdoor's class
    # (after the data-free pipeline with the check, test CA / ASR 66.0 / 0.9 -> 72.0 / 2.4; session 26).
    # The data-free default sets "target" since session 27.
    guard_scope_per_image: GuardScope | None = None
    # Where the teacher's target stands: "teacher" distills it as it is, "shared" keeps only the dark
    # knowledge the guard shares (class by class the smaller probability; distill.shared_knowledge).
    guard_targets: GuardTargets = GuardTargets.TEACHER
    # The guard lets the teacher's class stand where it is among the guard's ``guard_topk`` most likely
    # classes (1: only its own class; distill's ``veto_topk``).
    guard_topk: Count = 1
    # The guard's logits get ``distill.dead_class_bias``, measured on the recovery images (and three
    # augmented views): a class the defense silenced (OTBR removed CIFAR-10 BadNets' backdoor with its
    # target class) is predicted again where its evidence is strongest, so the guard stops vetoing
    # every image the suspect gives that class. Hints still come from the guard as it is.
    # "agreed": the bias only decides whether the teacher's prediction of the revived class stands.
    guard_revive_classes: GuardRevive = GuardRevive.OFF
    # ... to this share of the uniform share of the recovery images (dead_class_bias's ``share``).
    guard_revive_share: PositiveFraction = 1.0
    # > 0: synthetic images are also aimed at classes (round-robin) by the guard's, or else the
    # teacher's, cross-entropy (DeepInversion's class term; synthesis.synthesize_bn_images).
    synthetic_class_weight: NonNegativeFloat = 0.0
    # > 0: trigger invariance (ccpurify.invariance): a universal perturbation of at most
    # ``invariance_eps`` of the pixel range, fitted on the recovery images to send the teacher to one
    # class, then kept adversarial against the student, which learns the teacher's clean target on
    # the perturbed images at this weight. Removes full-image triggers that pruning defenses miss.
    invariance_weight: NonNegativeFloat = 0.0
    invariance_eps: float = 0.05
    invariance_scale: float = 1.0  # the perturbation is unlearned at up to this multiple of its bound
    # > 0: also patch invariance (``invariance.PatchInvariance``, Neural Cleanse's unlearning): a
    # universal patch fitted on the recovery images to send the teacher to one class
    # (``fit_patch_trigger``, penalty ``invariance_patch_penalty``), on which the student learns the
    # teacher's clean targets at this weight. Needs the model's input normalisation. It did not remove
    # Input-aware's per-image triggers (validation ASR 80 -> 82%; docs/defaults.md, session 16).
    invariance_patch_weight: NonNegativeFloat = 0.0
    invariance_patch_penalty: PositiveFloat = PATCH_PENALTY
    # > 0: also warp invariance (``invariance.WarpInvariance``): a smooth universal warp whose control
    # points move at most ``invariance_warp_shift`` pixels, fitted on the recovery images to send the
    # teacher to one class (``fit_universal_warp``, WaNet's trigger model), then kept adversarial
    # against the student, which learns the teacher's clean targets on the warped images at this
    # weight. The perturbation and the patch are not WaNet's warp, and distillation from the suspect
    # taught its backdoor back (MobileNetV2 WaNet after the data-free default: test ASR 26%).
    invariance_warp_weight: NonNegativeFloat = 0.0
    invariance_warp_shift: PositiveFloat = WARP_SHIFT
    # The warp is unlearned only if it raises its class's share of the recovery images by at least
    # this much (its ``lift``; 0: always), so where the search finds no warp shortcut the recovery is
    # the one without the term. Measured on the data-free default's recovery images: 0.41-0.87 on the
    # four WaNet models, 0.00-0.21 on the other CIFAR-10 and GTSRB backdoored models except GTSRB
    # Input-aware (0.63), 0.04 on both clean models (docs/defaults.md, session 22).
    invariance_warp_min_lift: Fraction = 0.0
    # True: the invariance terms' forward passes on perturbed images leave the student's BatchNorm
    # running statistics as they are (``invariance.running_stats_kept``). On real images the
    # perturbation is a natural adversarial one, and the statistics it moved collapsed CIFAR-10 PreAct
    # WaNet's recovery (validation CA 47.8%; 84.8% with them kept; docs/defaults.md, session 17).
    invariance_keeps_bn_stats: bool = False
    # The universal perturbation's class (the suspected backdoor target) loses its dark knowledge in
    # the teacher's targets (distill's ``suppress_class``), where the teacher does not predict it.
    suppress_target: bool = False
    # With the guard: where the latest defense reports that it found the backdoor
    # (``PassDetails.found_backdoor()``: ``TriggerPrune``, also inside ``Fallback``), the guard is the
    # teacher too. A detector's removal is precise (VGG16-BN BadNets: TriggerPrune alone keeps validation
    # CA 86.7% of the suspect's 89.6% at ASR 2.4%), and distilling from the suspect taught part of the
    # backdoor back (after the data-free default: 85.3 / 8.9%; session 21). Where it found nothing, or
    # always acts (OTBR), the suspect teaches under the guard as before.
    guard_teaches_if_found: bool = False
    # > 0: Neural Cleanse's unlearning (``invariance.PatchInvariance``) of the patch trigger the latest
    # defense reversed and removed (its ``found_triggers()``: TriggerPrune's, also inside Fallback), at
    # this weight, so the distillation from the suspect cannot teach it back. VGG16-BN BadNets after the
    # data-free default: validation CA / ASR 85.3 / 8.9% -> 85.6 / 3.4% at weight 1 (session 21).
    found_patch_weight: NonNegativeFloat = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        self.data = RecoverData(self.data)
        self.teacher_from = TeacherSource(self.teacher_from)
        self.synthetic_init = SyntheticInit(self.synthetic_init)
        self.guard_vetoed = GuardVeto(self.guard_vetoed)
        self.guard_scope = GuardScope(self.guard_scope)
        if self.guard_scope_per_image is not None:
            self.guard_scope_per_image = GuardScope(self.guard_scope_per_image)
        self.guard_targets = GuardTargets(self.guard_targets)
        self.guard_revive_classes = GuardRevive(self.guard_revive_classes)
        self.hints_from = HintSource(self.hints_from)
        check_max_grad_norm(self.max_grad_norm)
        if not 0 < self.invariance_eps <= 1 or not 1 <= self.invariance_scale < math.inf:
            raise InvalidInputError(
                "invariance_eps must be in (0, 1] and invariance_scale finite and >= 1, got "
                f"{self.invariance_eps} and {self.invariance_scale}"
            )
        if self.teacher is not None and self.teacher_from is TeacherSource.SELF:
            raise InvalidInputError(
                "Recover(teacher=..., teacher_from='self') names two teachers: give teacher= or teacher_from='self'"
            )
        if self.guard and self.teacher_from is not TeacherSource.INPUT:
            raise InvalidInputError(
                "Recover(guard=True) guards the suspect: it needs teacher_from='input' (and a defense earlier in the Pipeline)"
            )
        if self.hints_from is HintSource.GUARD and (not self.guard or self.feature_weight == 0):
            raise InvalidInputError(
                "Recover(hints_from='guard') matches feature hints to the guard's features: it needs guard=True and "
                "feature_weight > 0"
            )
        if not self.guard_vetoes_hints and self.hints_from is not HintSource.GUARD:
            raise InvalidInputError(
                "Recover(guard_vetoes_hints=False) keeps the hints of images the guard vetoes, which is safe only for "
                "hints from the guard: it needs hints_from='guard'"
            )
        if self.invariance_keeps_bn_stats and not (
            self.invariance_weight
            or self.invariance_patch_weight
            or self.invariance_warp_weight
            or self.found_patch_weight
        ):
            raise InvalidInputError(
                "Recover(invariance_keeps_bn_stats=True) applies to the invariance terms' forward passes: it needs "
                "invariance_weight > 0, invariance_patch_weight > 0, invariance_warp_weight > 0 or found_patch_weight > 0"
            )
        for option, changed in (
            ("invariance_warp_shift", self.invariance_warp_shift != WARP_SHIFT),
            ("invariance_warp_min_lift", self.invariance_warp_min_lift > 0),
        ):
            if changed and self.invariance_warp_weight == 0:
                raise InvalidInputError(
                    f"Recover({option}) shapes the warp that warp invariance unlearns: it needs invariance_warp_weight > 0"
                )
        if self.invariance_patch_penalty != PATCH_PENALTY and self.invariance_patch_weight == 0:
            raise InvalidInputError(
                "Recover(invariance_patch_penalty) shapes the patch that patch invariance unlearns: it needs "
                "invariance_patch_weight > 0"
            )
        if self.guard_revive_share != 1.0 and self.guard_revive_classes is GuardRevive.OFF:
            raise InvalidInputError(
                "Recover(guard_revive_share) sizes the revival of the guard's dead classes: it needs "
                "guard_revive_classes='guard' or 'agreed'"
            )
        changed = [  # guard_vetoes_hints and guard_revive_share: checked above
            f.name
            for f in fields(self)
            if f.name.startswith("guard_")
            and f.name not in ("guard_vetoes_hints", "guard_revive_share")
            and getattr(self, f.name) != f.default
        ]
        if not self.guard and changed:
            they = "they need" if len(changed) > 1 else "it needs"
            raise InvalidInputError(
                f"{', '.join(changed)} shape{'' if len(changed) > 1 else 's'} the guard: {they} guard=True"
            )
        if self.guard_scope_per_image is not None and self.guard_scope_per_image is self.guard_scope:
            raise InvalidInputError(
                f"Recover(guard_scope_per_image={self.guard_scope_per_image.value!r}) is guard_scope already: "
                "give another scope, or leave it None"
            )
        if self.guard_scope_per_image is not None and self.guard_teaches_if_found:
            raise InvalidInputError(
                "Recover(guard_teaches_if_found=True) makes the guard the teacher wherever the defense found the "
                "backdoor, per-image triggers included, so guard_scope_per_image would never apply: give one of them"
            )

    def config(self) -> dict:
        d = super().config()
        # A given module is not JSON; "pipeline": the run supplies it, as ``teacher_from`` (also recorded) says.
        d["teacher"] = "given" if self.teacher is not None else "pipeline"
        return d

    def sample_steps(self, context: PurifyContext) -> int:
        if self.data in (RecoverData.AUTO, RecoverData.CLEAN) and context.clean_data is not None:
            images, made = len(context.clean_data), 0
        elif self.data in (RecoverData.AUTO, RecoverData.UNLABELED) and context.unlabeled_data is not None:
            images, made = len(context.unlabeled_data), 0
        else:
            images, made = self.synthetic_images, self.synthetic_images * self.synthetic_steps
        # The teacher's forward too, and one more student pass per invariance term (the found patch's
        # counted even where the defense may find none, the warp's even where its gate may stop it:
        # the estimate errs long, as Fallback's).
        terms = (
            self.invariance_weight,
            self.invariance_patch_weight,
            self.invariance_warp_weight,
            self.found_patch_weight,
        )
        per_image = 1.5 + sum(weight > 0 for weight in terms)
        fits = [PERTURBATION_STEPS] if self.invariance_weight > 0 or self.suppress_target else []
        fits += [PATCH_STEPS] if self.invariance_patch_weight > 0 else []
        fits += [WARP_STEPS] if self.invariance_warp_weight > 0 else []
        searches = sum(trigger_fit_steps(steps, images) for steps in fits)
        return made + searches + math.ceil(per_image * epochs_for_budget(self.epochs, self.budget, images) * images)

    def check(self, model: nn.Module, context: PurifyContext) -> None:
        synthetic = self.data is RecoverData.SYNTHETIC or (
            self.data is RecoverData.AUTO and context.clean_data is None and context.unlabeled_data is None
        )
        if self.guard_topk > 1:
            classes = context.num_classes or output_classes(model, context.example_inputs)
            if self.guard_topk >= classes:
                raise InvalidInputError(
                    f"Recover(guard_topk={self.guard_topk}) would let every class of this {classes}-class model stand: "
                    f"give guard_topk below {classes}"
                )
        if synthetic and not bn_layers(self.teacher if self.teacher is not None else model):
            raise InvalidInputError(
                "recover makes its images from the model's BatchNorm statistics, and this model has no BatchNorm2d layer: "
                "give it images (clean_data= / unlabeled_data=, --clean-data / --unlabeled-data) or choose a method "
                "without recover (e.g. 'clp' or 'cc')"
            )
        if synthetic:
            check_pool_size(self.synthetic_images, context.example_inputs.shape[1:], "Recover synthetic_images")
        smaller_side = min(context.example_inputs.shape[-2:])
        if self.invariance_warp_weight > 0 and self.invariance_warp_shift >= smaller_side / 2:
            raise InvalidInputError(
                f"Recover(invariance_warp_shift={self.invariance_warp_shift:g}) would move pixels by half the "
                f"{smaller_side}-pixel image or more; WaNet-like warps move them by about a pixel: give a smaller shift"
            )
        if self.invariance_patch_weight > 0 and context.normalize is None:
            raise InvalidInputError(
                "Recover(invariance_patch_weight > 0) fits a patch in pixel space, which needs the model's input "
                "normalisation: pass normalize=(mean, std) (CLI: the run directory or --dataset gives it)"
            )

    def run(self, model: nn.Module, context: PurifyContext) -> PassResult:
        return PassResult(model, self.recover(model, context))

    def _teacher(self, student: nn.Module, context: PurifyContext) -> nn.Module:
        if self.teacher is not None:
            return self.teacher
        if self.teacher_from is TeacherSource.SELF:
            return copy.deepcopy(student)
        teacher = context.pipeline_input if self.teacher_from is TeacherSource.INPUT else context.teacher
        if teacher is None:
            raise InvalidInputError(
                "Recover needs a teacher: pass teacher=, use teacher_from='self' (the model it is given), or run it "
                "in a Pipeline (after a defense)"
            )
        return teacher

    @staticmethod
    def _defense_ran_before(context: PurifyContext) -> bool:
        """Whether a ``Pipeline`` ran a defense before this pass (``context.teacher`` is then its output)."""
        return context.teacher is not None and context.teacher is not context.pipeline_input

    def _guard(self, context: PurifyContext) -> nn.Module | None:
        if not self.guard:
            return None
        if not self._defense_ran_before(context):  # teacher_from: __post_init__
            raise InvalidInputError(
                "Recover(guard=True) vetoes the suspect teacher with the output of a defense that runs before it, and "
                "no defense ran before it: put one first (e.g. ccpurify.purify(model, [OTBR(), Recover(guard=True, "
                "teacher_from='input')])), or use guard=False"
            )
        return on_device(context.teacher, context.device).eval()

    def _check_found_patches_can_come(self, context: PurifyContext) -> None:
        """``found_patch_weight`` needs a defense earlier in the pipeline to hand on what it found:
        without one, refuse before any work rather than unlearn nothing in silence."""
        if self.found_patch_weight > 0 and not self._defense_ran_before(context):
            raise InvalidInputError(
                "Recover(found_patch_weight > 0) unlearns the patch trigger a defense before it found, and no defense "
                "ran before it: put one first (e.g. ccpurify.purify(model, [TriggerPrune(), Recover(found_patch_weight=1)])), "
                "or use found_patch_weight=0"
            )

    def _unlearns(self, warp: UniversalWarp) -> bool:
        """Whether the fitted warp passes ``invariance_warp_min_lift`` (0: always, even at a lift below 0)."""
        return self.invariance_warp_min_lift == 0 or warp.lift >= self.invariance_warp_min_lift

    def _invariance_terms(
        self, teacher: nn.Module, images: torch.Tensor, context: PurifyContext
    ) -> tuple[UniversalTrigger | None, PatchTrigger | None, UniversalWarp | None, int, InvarianceTerm | None]:
        """The distillation's invariance terms (the universal perturbation's, the fitted patch's, the
        warp's, and the unlearning of the patches a defense before it found) with the triggers fitted
        on ``teacher`` and how many found patches are unlearned."""
        trigger = invariance = None
        if self.invariance_weight > 0 or self.suppress_target:
            bound = perturbation_bound(self.invariance_eps, images, context.normalize)
            trigger = fit_universal_trigger(
                teacher, images, bound, generator=context.generator(17), device=context.device
            )
        if self.invariance_weight > 0:
            invariance = TriggerInvariance(
                trigger,
                self.invariance_weight,
                scale=self.invariance_scale,
                generator=context.generator(19),
                keep_bn_stats=self.invariance_keeps_bn_stats,
            )
        patch = None
        if self.invariance_patch_weight > 0:
            patch = fit_patch_trigger(
                teacher,
                images,
                context.normalize,
                penalty=self.invariance_patch_penalty,
                generator=context.generator(21),
                device=context.device,
            )
            patched = PatchInvariance(patch, self.invariance_patch_weight, self.invariance_keeps_bn_stats)
            invariance = patched if invariance is None else Invariances([invariance, patched])
        warp = None
        if self.invariance_warp_weight > 0:
            warp = fit_universal_warp(
                teacher,
                images,
                max_shift=self.invariance_warp_shift,
                generator=context.generator(25),
                device=context.device,
            )
            if self._unlearns(warp):
                warped = WarpInvariance(warp, self.invariance_warp_weight, keep_bn_stats=self.invariance_keeps_bn_stats)
                invariance = warped if invariance is None else Invariances([invariance, warped])
        details = context.teacher_details
        found = details.found_triggers() if details is not None and self.found_patch_weight > 0 else ()
        unlearned = [
            PatchInvariance(t, self.found_patch_weight, self.invariance_keeps_bn_stats)
            for t in found
            if isinstance(t, PatchTrigger)
        ]
        if unlearned:
            invariance = Invariances([*([invariance] if invariance is not None else []), *unlearned])
        return trigger, patch, warp, len(unlearned), invariance

    def recover(self, student: nn.Module, context: PurifyContext) -> RecoverDetails:
        """Distil ``student`` (see the class docstring). The teacher and the guard may be the caller's
        own models (``teacher=``, the pipeline's input): their modes are restored, module by module."""
        with modes_kept(*(m for m in (self.teacher, context.pipeline_input, context.teacher) if m is not None)):
            return self._recover(student, context)

    def _recover(self, student: nn.Module, context: PurifyContext) -> RecoverDetails:
        self._check_found_patches_can_come(context)
        teacher = on_device(self._teacher(student, context), context.device).eval()
        guard = self._guard(context)
        details = context.teacher_details
        found = details is not None and details.found_backdoor() is True
        guard_teaches = guard is not None and self.guard_teaches_if_found and found
        if guard_teaches:
            teacher = guard
        # Images are made from the guard when there is one: its class term cannot aim them at a trigger.
        source, images, labels = self._data(teacher if guard is None else guard, context)
        augment = Augment(crop_padding=4, hflip=self.hflip) if self.augment else None
        hinter = guard if self.hints_from is HintSource.GUARD else teacher  # __post_init__: a guard exists then
        revived = revive_bias = None
        if guard is not None and self.guard_revive_classes is not GuardRevive.OFF:
            views = with_views(images, augment, context.generator(23))
            bias = dead_class_bias(logits_of(guard, views), share=self.guard_revive_share)
            revived = {c: round(float(b), 3) for c, b in enumerate(bias) if b > 0}
            if self.guard_revive_classes is GuardRevive.GUARD:
                guard = LogitBias(guard, bias).eval()
            else:
                revive_bias = bias
        scope = self.guard_scope
        if self.guard_scope_per_image is not None and details is not None and details.silenced_per_image_trigger():
            scope = self.guard_scope_per_image
        target, suspicion = None, None
        if guard is not None and scope is GuardScope.TARGET:
            target, suspicion = suspected_target(teacher, guard, with_views(images, augment, context.generator(13)))
        # Before any re-estimation, which changes the statistics the parameter-matching fallback reads.
        correspondence = {}
        if (self.feature_weight > 0 and hinter is teacher) or (self.recalibrate and self.anchor_bn):
            correspondence = channel_correspondence(teacher, student, context.example_inputs)
        hints = None
        if self.feature_weight > 0:
            hinted = (
                correspondence if hinter is teacher else channel_correspondence(hinter, student, context.example_inputs)
            )
            hints = FeatureHints(hinter, student, hinted)
        if self.recalibrate and self.anchor_bn:
            anchored_bn_update(student, teacher, images[:256], correspondence, context.device)
        elif self.recalibrate:
            recalibrate_bn(student, images, self.batch_size, context.device)
        trigger, patch, warp, unlearned_patches, invariance = self._invariance_terms(teacher, images, context)
        silenced, frozen = freeze_silenced_channels(student) if self.teacher_from is TeacherSource.INPUT else ([], 0)
        epochs = epochs_for_budget(self.epochs, self.budget, len(images))
        try:
            log = distill(
                student,
                teacher,
                images,
                labels=labels,
                epochs=epochs,
                batch_size=self.batch_size,
                lr=self.lr,
                temperature=self.temperature,
                hard_label_weight=self.hard_label_weight,
                hints=hints,
                feature_weight=self.feature_weight,
                max_grad_norm=self.max_grad_norm,
                invariance=invariance,
                suppress_class=trigger.target if self.suppress_target else None,
                augment=augment,
                guard=guard,
                vetoed=self.guard_vetoed.value,
                veto_class=target,
                veto_topk=self.guard_topk,
                veto_hints=self.guard_vetoes_hints,
                shared_targets=self.guard_targets is GuardTargets.SHARED,
                revive_bias=revive_bias,
                generator=context.generator(7),
                device=context.device,
                progress=context.progress,
                task="recover",
            )
        finally:
            if hints is not None:
                hints.remove()
            for handle in silenced:
                handle.remove()
        if self.teacher is not None:
            taught_by = "given"
        else:
            taught_by = TeacherSource.DEFENSE.value if guard_teaches else self.teacher_from.value
        return RecoverDetails(
            data=source.value,
            teacher=taught_by,
            bn_recalibrated=self.recalibrate,
            bn_anchored=self.recalibrate and self.anchor_bn,
            distill=log,
            frozen_silenced_channels=frozen,
            guard_scope=scope.value if guard is not None else None,
            suspected_target=suspicion,
            feature_layers=len(hints.layers) if hints is not None else None,
            bn_layers=len(bn_layers(student)) if hints is not None else None,
            universal_trigger=trigger.summary() if trigger is not None else None,
            patch_trigger=patch.summary() if patch is not None else None,
            warp_trigger=({**warp.summary(), "unlearned": self._unlearns(warp)} if warp is not None else None),
            guard_revived_classes=revived,
            found_patches_unlearned=unlearned_patches,
        )

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
        return RecoverData.SYNTHETIC, self.synthesize(teacher, context), None

    def synthesize(self, model: nn.Module, context: PurifyContext) -> torch.Tensor:
        """The images this recovery distils on when it has none: ``synthetic_images`` images made from
        ``model``'s BatchNorm statistics (the guard's when there is one), the same for the same context."""
        images = synthesize_bn_images(
            model,
            self.synthetic_images,
            tuple(context.example_inputs.shape[1:]),
            init=self.synthetic_init.value,
            steps=self.synthetic_steps,
            class_weight=self.synthetic_class_weight,
            normalize=context.normalize,
            generator=context.generator(11),
            seed=context.seed,
            device=context.device,
            progress=context.progress,
        )
        return images.cpu()


def with_views(images: torch.Tensor, augment: Augment | None, generator: torch.Generator) -> torch.Tensor:
    """``images`` and three augmented views of them (as the distillation will see them), or the images
    alone without augmentation: what the guard's statistics (suspected target, dead classes) are read on."""
    return images if augment is None else torch.cat([images, *(augment(images, generator) for _ in range(3))])


def on_device(model: nn.Module, device: str | torch.device) -> nn.Module:
    """``model`` itself where all its parameters and buffers are on ``device``, else a copy moved
    there: a teacher or guard may be the caller's own model, which a pass must not move."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:  # where .to("cuda") puts the student
        device = torch.device("cuda", torch.cuda.current_device())
    same = all(t.device == device for t in itertools.chain(model.parameters(), model.buffers()))
    return model if same else copy.deepcopy(model).to(device)


def freeze_silenced_channels(model: nn.Module) -> tuple[list[torch.utils.hooks.RemovableHandle], int]:
    """Keep every silenced channel silent while ``model`` trains: a BatchNorm channel whose scale and
    shift are both exactly zero (how CLP, RNP and soft removal silence a channel), or a conv/linear
    output channel whose filter and bias are all zero, gets zero gradients. With zero gradients,
    SGD's momentum and weight decay leave a zero parameter at zero. Returns the gradient hooks (remove
    them when training ends) and the number of frozen channels."""
    handles, channels = [], 0
    for module in model.modules():
        if (
            isinstance(module, nn.modules.batchnorm._BatchNorm)
            and module.weight is not None
            and module.bias is not None
        ):
            dead = (module.weight == 0) & (module.bias == 0)
            params = (module.weight, module.bias)
        elif isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            dead = (module.weight.flatten(1) == 0).all(1)
            if module.bias is not None:
                dead &= module.bias == 0
            params = (module.weight, module.bias) if module.bias is not None else (module.weight,)
        else:
            continue
        if not bool(dead.any()):
            continue
        channels += int(dead.sum())
        keep = (~dead).to(module.weight.dtype)
        for p in params:
            mask = keep.view(-1, *([1] * (p.ndim - 1)))
            handles.append(p.register_hook(lambda grad, mask=mask: grad * mask))
    return handles, channels
