"""Trigger invariance without data (ccpurify.invariance): the universal perturbation finds a planted
shortcut, and distilling with the invariance term removes it where plain distillation keeps it."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from ccpurify.distill import distill
from ccpurify.errors import InvalidInputError, NonFiniteError
from ccpurify.invariance import (
    PATCH_STEPS,
    PERTURBATION_STEPS,
    WARP_STEPS,
    Invariances,
    PatchInvariance,
    PatchTrigger,
    TriggerInvariance,
    UniversalWarp,
    WarpInvariance,
    fit_patch_trigger,
    fit_universal_trigger,
    fit_universal_warp,
    perturbation_bound,
    running_stats_kept,
    trigger_fit_steps,
    warp_images,
)
from ccpurify.passes import Recover
from ccpurify.transforms import Normalize


class Shortcut(nn.Module):
    """A linear classifier plus a planted backdoor: class 0's logit also grows by ``strength`` times
    the image's projection on a fixed full-image key pattern (unit norm). On these Gaussian images
    the projection is about N(0, 1); adding 0.6 times the key's sign (a blend-like trigger within
    the bound below) lifts it by about 6.6."""

    def __init__(self, strength: float = 2.0, classes: int = 4) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.head = nn.Linear(3 * 8 * 8, classes)
        with torch.no_grad():
            self.head.weight.copy_(torch.randn(classes, 3 * 8 * 8, generator=generator) * 0.05)
            self.head.bias.zero_()
        key = torch.randn(3, 8, 8, generator=generator)
        self.register_buffer("key", key / key.norm())
        self.strength = nn.Parameter(torch.tensor(strength))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.head(x.flatten(1))
        fired = (x * self.key).flatten(1).sum(1)
        return (
            logits
            + nn.functional.one_hot(torch.zeros(len(x), dtype=torch.long), logits.shape[1])
            * (self.strength * fired)[:, None]
        )


PIXELS = Normalize((0.0, 0.0, 0.0), (0.25, 0.25, 0.25))  # eps 0.15 of the pixel range: 0.6 here


def images(count: int = 128) -> torch.Tensor:
    return torch.randn(count, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def fooled(model: nn.Module, triggered: torch.Tensor, target: int) -> float:
    """The share of the ``triggered`` images ``model`` assigns to ``target``."""
    with torch.no_grad():
        return float((model.eval()(triggered).argmax(1) == target).float().mean())


def distilled(teacher: nn.Module, x: torch.Tensor, invariance, epochs: int) -> nn.Module:
    """A copy of ``teacher`` distilled from it on ``x`` (with an invariance term, or None)."""
    student = copy.deepcopy(teacher)
    distill(
        student,
        teacher,
        x,
        epochs=epochs,
        batch_size=64,
        invariance=invariance,
        generator=torch.Generator().manual_seed(0),
    )
    return student


def test_the_bound_is_eps_over_std_under_a_known_normalisation_else_eps_times_the_observed_range():
    x = images()
    known = perturbation_bound(0.05, x, Normalize((0.5, 0.5, 0.5), (0.25, 0.5, 1.0)))
    assert torch.allclose(known.flatten(), torch.tensor([0.2, 0.1, 0.05]))
    observed = perturbation_bound(0.1, x)
    span = x.transpose(0, 1).flatten(1)
    assert torch.allclose(observed.flatten(), 0.1 * (span.amax(1) - span.amin(1)))
    with pytest.raises(ValueError, match="eps"):
        perturbation_bound(0.0, x)


def test_the_universal_trigger_finds_a_planted_shortcut_within_its_bound_and_leaves_the_model_as_it_was():
    model, x = Shortcut().train(), images()
    before = copy.deepcopy(model.state_dict())
    bound = perturbation_bound(0.15, x, PIXELS)
    trigger = fit_universal_trigger(model, x, bound, generator=torch.Generator().manual_seed(0))
    assert trigger.target == 0
    assert trigger.fooled > 0.9 and trigger.share_before < 0.5
    assert (trigger.delta.abs() <= bound + 1e-6).all()
    assert model.training
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_distilling_with_trigger_invariance_removes_the_shortcut_that_plain_distillation_keeps():
    teacher, x = Shortcut(), images(256)
    trigger = fit_universal_trigger(
        teacher, x, perturbation_bound(0.15, x, PIXELS), generator=torch.Generator().manual_seed(0)
    )
    results = {
        name: fooled(distilled(teacher, x, invariance, epochs=5), x + trigger.delta, trigger.target)
        for name, invariance in (("plain", None), ("invariant", TriggerInvariance(trigger, weight=1.0)))
    }
    assert results["plain"] > 0.9  # clean images never fire the shortcut, so nothing unlearns it
    assert results["invariant"] < 0.5


class PatchShortcut(nn.Module):
    """A linear classifier plus a planted patch backdoor: class 0's logit grows by ``strength`` times
    how far the mean of the top-left 2 x 2 corner exceeds 1, which Gaussian images almost never reach
    (the corner's mean has a standard deviation of 0.29) and a corner pasted at 3 always does."""

    def __init__(self, strength: float = 3.0, classes: int = 4) -> None:
        super().__init__()
        self.head = nn.Linear(3 * 8 * 8, classes)
        with torch.no_grad():
            self.head.weight.copy_(torch.randn(classes, 3 * 8 * 8, generator=torch.Generator().manual_seed(0)) * 0.05)
            self.head.bias.zero_()
        self.strength = nn.Parameter(torch.tensor(strength))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fired = (x[:, :, :2, :2].mean((1, 2, 3)) - 1).relu() * self.strength
        target = nn.functional.one_hot(torch.zeros(len(x), dtype=torch.long), self.head.out_features)
        return self.head(x.flatten(1)) + target * fired[:, None]


def corner_patch() -> PatchTrigger:
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :2, :2] = 1
    return PatchTrigger(mask, torch.full((1, 3, 8, 8), 3.0), area=4 / 64, target=0, fooled=1.0, share_before=0.25)


def test_distilling_with_patch_invariance_unlearns_the_patch_that_plain_distillation_keeps():
    """Neural Cleanse's unlearning as a distillation term: on images carrying the patch, the student
    learns the teacher's targets for the same images without it."""
    teacher, x, patch = PatchShortcut(), images(256), corner_patch()
    results = {
        name: fooled(distilled(teacher, x, invariance, epochs=20), patch.apply(x), patch.target)
        for name, invariance in (("plain", None), ("invariant", PatchInvariance(patch, weight=1.0)))
    }
    assert results["plain"] > 0.9  # clean images never fire the patch, so nothing unlearns it
    assert results["invariant"] < 0.5


class WarpShortcut(nn.Module):
    """A linear classifier plus a planted warp backdoor: class 0's logit grows by ``strength`` times
    how far the correlation of horizontally adjacent pixels exceeds 0.1. On i.i.d. Gaussian images it
    is about N(0, 0.04); resampling them half a pixel sideways (a warp of WaNet's kind) blends each
    pixel with its neighbour and raises it to about 0.5, which no clean image reaches."""

    def __init__(self, strength: float = 12.0, classes: int = 4) -> None:
        super().__init__()
        self.head = nn.Linear(3 * 16 * 16, classes)
        with torch.no_grad():
            self.head.weight.copy_(torch.randn(classes, 3 * 16 * 16, generator=torch.Generator().manual_seed(0)) * 0.05)
            self.head.bias.zero_()
        self.strength = nn.Parameter(torch.tensor(strength))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        neighbours = (x[..., :-1] * x[..., 1:]).mean((1, 2, 3)) / x.pow(2).mean((1, 2, 3))
        fired = (neighbours - 0.1).relu() * self.strength
        target = nn.functional.one_hot(torch.zeros(len(x), dtype=torch.long), self.head.out_features)
        return self.head(x.flatten(1)) + target * fired[:, None]


def gaussian_images(count: int, size: int = 16) -> torch.Tensor:
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(1))


def warp_field_peak(control: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The largest displacement of WaNet's field: the control points bicubically upsampled."""
    return (
        torch.nn.functional.interpolate(control, size=(height, width), mode="bicubic", align_corners=True).abs().amax()
    )


def test_a_warp_with_every_control_point_at_one_pixel_shifts_the_image_by_one_pixel():
    """The warp's field is the identity plus the control points' displacement in pixels, bicubically
    interpolated: zero leaves an image as it is, a constant (1, 0) reads every pixel from its right
    neighbour, a constant (0, 1) from the one below, whatever the image's shape."""
    x = torch.rand(2, 3, 12, 20, generator=torch.Generator().manual_seed(0))
    control = torch.zeros(1, 2, 4, 4)
    assert torch.allclose(warp_images(x, control), x, atol=1e-5)
    right, down = control.clone(), control.clone()
    right[:, 0], down[:, 1] = 1.0, 1.0
    assert torch.allclose(warp_images(x, right)[..., :-1], x[..., 1:], atol=1e-5)
    assert torch.allclose(warp_images(x, down)[..., :-1, :], x[..., 1:, :], atol=1e-5)


def test_the_warp_search_finds_a_planted_warp_shortcut_within_its_shift_and_leaves_the_model_as_it_was():
    model, x = WarpShortcut().train(), gaussian_images(128)
    before = copy.deepcopy(model.state_dict())
    warp = fit_universal_warp(model, x, max_shift=1.0, steps=60, generator=torch.Generator().manual_seed(0))
    assert warp.target == 0
    assert warp.fooled > 0.9 and warp.share_before < 0.5
    summary = warp.summary()
    assert float(warp.control.abs().amax()) <= 1.0 and summary["max_control_shift_px"] <= 1.0
    assert summary["max_shift_px"] <= 2.0  # bicubic interpolation overshoots between the control points
    assert warp.image_size == (16, 16)  # the field in the summary is measured on the fitted images' size
    assert summary["max_shift_px"] == round(float(warp_field_peak(warp.control, 16, 16)), 3)
    assert model.training
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="max_shift"):
        fit_universal_warp(model, x, max_shift=0.0)


def test_the_warp_search_refuses_bad_images_and_a_model_that_gives_nan_instead_of_crashing():
    """A NaN field would crash grid_sample's backward (the whole process), so a model that gives
    NaN on warped images is refused with a NonFiniteError; malformed images get a ValueError."""

    class NaNOnWarped(nn.Module):
        """Finite on the given images, NaN once any pixel moves (as a model that divides by a statistic
        the warp can zero)."""

        def __init__(self, images: torch.Tensor) -> None:
            super().__init__()
            self.head = nn.Linear(3 * 16 * 16, 4)
            self.register_buffer("images", images)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            moved = (x - self.images[: len(x)]).abs().amax() > 0
            return self.head(x.flatten(1)) * (float("nan") if moved else 1.0)

    x = gaussian_images(8)
    with pytest.raises(NonFiniteError, match="NaN or Inf on warped images"):
        fit_universal_warp(NaNOnWarped(x), x, batch_size=8, steps=3, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="non-empty batch"):
        fit_universal_warp(WarpShortcut(), x[:0])
    with pytest.raises(ValueError, match="control grid"):
        warp_images(x, torch.zeros(1, 3, 4, 4))


def test_distilling_with_warp_invariance_removes_the_warp_shortcut_that_plain_distillation_keeps():
    """Clean images never fire the planted warp detector, so plain distillation from the backdoored
    teacher keeps it; with the warp invariance term the student learns the teacher's clean targets on
    warped images, and the warp the search found no longer sends it to the class."""
    teacher, x = WarpShortcut(), gaussian_images(256)
    warp = fit_universal_warp(teacher, x, steps=60, generator=torch.Generator().manual_seed(0))
    results = {
        name: fooled(distilled(teacher, x, invariance, epochs=30), warp.apply(x), warp.target)
        for name, invariance in (("plain", None), ("invariant", WarpInvariance(warp, weight=1.0)))
    }
    assert results["plain"] > 0.9
    assert results["invariant"] < 0.5


def test_several_invariance_terms_add_up():
    teacher, x = PatchShortcut(), images(16)
    targets = teacher(x).detach()
    one, two = PatchInvariance(corner_patch(), 1.0), PatchInvariance(corner_patch(), 2.0)
    total = Invariances([one, two]).loss(teacher, x, targets, 1.0)
    assert torch.allclose(total, 3 * one.loss(teacher, x, targets, 1.0))
    with pytest.raises(ValueError, match="at least one term"):
        Invariances([])


def test_invariance_options_are_checked():
    with pytest.raises(InvalidInputError, match="invariance"):
        Recover(invariance_weight=-1.0)
    with pytest.raises(InvalidInputError, match="invariance"):
        Recover(invariance_eps=0.0)
    with pytest.raises(InvalidInputError, match="invariance_scale"):
        Recover(invariance_scale=0.5)
    for key in ("invariance_scale", "invariance_weight"):  # refused by type before any range check
        for bad in (math.inf, math.nan):
            with pytest.raises(NonFiniteError, match=f"option {key}={bad} of pass 'recover' is not a finite number"):
                Recover(**{key: bad})
    trigger = fit_universal_trigger(Shortcut(), images(), perturbation_bound(0.15, images(), PIXELS), steps=1)
    with pytest.raises(ValueError, match="weight"):
        TriggerInvariance(trigger, weight=0.0)
    with pytest.raises(ValueError, match="scale"):
        TriggerInvariance(trigger, scale=0.9)
    with pytest.raises(ValueError, match="weight"):
        PatchInvariance(corner_patch(), weight=0.0)
    with pytest.raises(InvalidInputError, match="invariance_patch_weight"):
        Recover(invariance_patch_weight=-1.0)
    with pytest.raises(InvalidInputError, match="invariance_patch_penalty.*needs invariance_patch_weight > 0"):
        Recover(invariance_patch_penalty=4.0)  # a patch setting without the patch term: refused, not ignored
    with pytest.raises(InvalidInputError, match="invariance_keeps_bn_stats.*needs invariance_weight > 0"):
        Recover(invariance_keeps_bn_stats=True)
    with pytest.raises(InvalidInputError, match="invariance_warp_shift.*needs invariance_warp_weight > 0"):
        Recover(invariance_warp_shift=2.0)
    with pytest.raises(InvalidInputError, match="invariance_warp_min_lift.*needs invariance_warp_weight > 0"):
        Recover(invariance_warp_min_lift=0.3)
    with pytest.raises(InvalidInputError, match="invariance_warp_weight"):
        Recover(invariance_warp_weight=-1.0)
    warp = UniversalWarp(torch.zeros(1, 2, 4, 4), 1.0, target=0, fooled=1.0, share_before=0.25)
    with pytest.raises(ValueError, match="step_fraction"):
        WarpInvariance(warp, step_fraction=0.0)


def test_recover_with_invariance_reports_the_trigger_it_fitted_and_counts_the_extra_pass():
    """Given a BN model and no data, ``Recover(invariance_weight=1)`` fits the universal trigger on
    its synthetic images (the teacher keeps its weights) and says which class it found; its cost
    estimate counts the student's second forward on the perturbed images."""
    from test_compensate import two_bn_net

    from ccpurify.passes import PurifyContext

    teacher = two_bn_net()
    before = copy.deepcopy(teacher.state_dict())
    context = PurifyContext(example_inputs=torch.zeros(1, 3, 8, 8), seed=0)
    options = dict(teacher=teacher, data="synthetic", synthetic_images=32, synthetic_steps=0, epochs=1)
    recover = Recover(invariance_weight=1.0, **options)
    _, details = recover(copy.deepcopy(teacher), context)
    found = details.details.universal_trigger
    assert set(found) == {"target", "fooled", "share_before"} and 0 <= found["target"] < 3
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())
    assert recover.sample_steps(context) > Recover(**options).sample_steps(context)
    assert Recover(**options)(copy.deepcopy(teacher), context)[1].details.universal_trigger is None


def test_recover_with_patch_invariance_needs_the_normalisation_and_reports_the_patch_it_fitted():
    """With both invariance terms, ``Recover`` fits a perturbation and a patch on its images and
    counts both searches and both extra student passes in its estimate."""
    from test_compensate import two_bn_net

    from ccpurify.passes import PurifyContext

    teacher = two_bn_net()
    options = dict(teacher=teacher, data="synthetic", synthetic_images=32, synthetic_steps=0, epochs=1)
    recover = Recover(invariance_patch_weight=1.0, **options)
    with pytest.raises(InvalidInputError, match="needs the model's input normalisation"):
        recover(copy.deepcopy(teacher), PurifyContext(example_inputs=torch.zeros(1, 3, 8, 8)))
    context = PurifyContext(example_inputs=torch.zeros(1, 3, 8, 8), normalize=PIXELS)
    both = Recover(invariance_patch_weight=1.0, invariance_weight=1.0, **options)
    _, report = both(copy.deepcopy(teacher), context)
    found = report.details.patch_trigger
    assert set(found) == {"target", "fooled", "share_before", "area"} and 0 < found["area"] < 1
    assert report.details.universal_trigger is not None
    plain, patch_only = Recover(**options).sample_steps(context), recover.sample_steps(context)
    epochs_of_images = 32 * 1  # one more student pass per image and epoch per term
    assert patch_only == plain + trigger_fit_steps(PATCH_STEPS, 32) + epochs_of_images
    assert both.sample_steps(context) == patch_only + trigger_fit_steps(PERTURBATION_STEPS, 32) + epochs_of_images


def test_recover_with_warp_invariance_reports_the_warp_it_fitted_and_counts_its_search_and_pass():
    """``Recover(invariance_warp_weight=1)`` fits a warp on its images (no normalisation needed: a
    warp commutes with it), reports it, and counts the search and the student's extra pass."""
    from test_compensate import two_bn_net

    from ccpurify.passes import PurifyContext

    teacher = two_bn_net()
    context = PurifyContext(example_inputs=torch.zeros(1, 3, 8, 8), seed=0)
    options = dict(teacher=teacher, data="synthetic", synthetic_images=32, synthetic_steps=0, epochs=1)
    recover = Recover(invariance_warp_weight=1.0, invariance_warp_shift=0.5, **options)
    _, report = recover(copy.deepcopy(teacher), context)
    found = report.details.warp_trigger
    assert set(found) == {"target", "fooled", "share_before", "max_control_shift_px", "max_shift_px", "unlearned"}
    assert 0 < found["max_control_shift_px"] <= 0.5 and found["unlearned"]
    assert report.details.universal_trigger is None and report.details.patch_trigger is None
    assert (
        recover.sample_steps(context)
        == Recover(**options).sample_steps(context) + trigger_fit_steps(WARP_STEPS, 32) + 32
    )


def test_recover_refuses_a_warp_of_half_the_image_and_leaves_the_callers_teacher_in_its_mode():
    from test_compensate import two_bn_net

    from ccpurify.passes import PurifyContext

    teacher = two_bn_net().train()
    context = PurifyContext(example_inputs=torch.zeros(1, 3, 8, 8), seed=0)
    options = dict(teacher=teacher, data="synthetic", synthetic_images=16, synthetic_steps=0, epochs=1)
    with pytest.raises(InvalidInputError, match="invariance_warp_shift=4.*give a smaller shift"):
        Recover(invariance_warp_weight=1.0, invariance_warp_shift=4.0, **options).check(teacher, context)
    Recover(invariance_warp_weight=1.0, **options)(copy.deepcopy(teacher), context)
    assert all(m.training for m in teacher.modules())


def test_a_warp_below_the_lift_gate_is_reported_and_not_unlearned():
    """With ``invariance_warp_min_lift``, a warp that moves too few images to its class is reported
    and left out: the student ends exactly as the recovery without the term leaves it."""
    from test_compensate import two_bn_net

    from ccpurify.passes import PurifyContext

    teacher = two_bn_net()
    context = PurifyContext(example_inputs=torch.zeros(1, 3, 8, 8), seed=0)
    options = dict(teacher=teacher, data="synthetic", synthetic_images=32, synthetic_steps=0, epochs=1)
    gated, report = Recover(invariance_warp_weight=1.0, invariance_warp_min_lift=1.0, **options)(
        copy.deepcopy(teacher), context
    )
    plain, _ = Recover(**options)(copy.deepcopy(teacher), context)
    found = report.details.warp_trigger
    assert found["fooled"] - found["share_before"] < 1.0 and not found["unlearned"]
    assert all(torch.equal(a, b) for a, b in zip(gated.state_dict().values(), plain.state_dict().values()))


def test_without_class_knowledge_keeps_every_prediction_and_flattens_only_the_suspected_class():
    from ccpurify.distill import without_class_knowledge

    logits = torch.tensor([[5.0, 4.0, 1.0, 0.0], [0.0, 1.0, 3.0, 2.0], [0.0, 9.0, 1.0, 2.0]])
    out = without_class_knowledge(logits, 1)
    assert torch.equal(out.argmax(1), logits.argmax(1))
    assert torch.equal(out[2], logits[2])  # the row that predicts class 1 keeps its logits
    assert out[0, 1] == logits[0].median() and out[1, 1] == logits[1].median()
    keep = [0, 2, 3]
    assert torch.equal(out[:, keep], logits[:, keep])
    with pytest.raises(InvalidInputError, match="class 4"):
        without_class_knowledge(logits, 4)


def test_recover_that_suppresses_the_target_fits_the_trigger_without_the_invariance_term():
    from test_compensate import two_bn_net

    from ccpurify.passes import PurifyContext

    teacher = two_bn_net()
    context = PurifyContext(example_inputs=torch.zeros(1, 3, 8, 8), seed=0)
    options = dict(teacher=teacher, data="synthetic", synthetic_images=32, synthetic_steps=0, epochs=1)
    recover = Recover(suppress_target=True, **options)
    _, report = recover(copy.deepcopy(teacher), context)
    assert report.details.universal_trigger is not None
    # the trigger's search, and no second student pass
    search = trigger_fit_steps(PERTURBATION_STEPS, 32)
    assert recover.sample_steps(context) == Recover(**options).sample_steps(context) + search


def bn_state(model: nn.Module) -> list[torch.Tensor]:
    return [t.clone() for n, t in model.state_dict().items() if "running" in n or "num_batches" in n]


def test_a_forward_with_running_stats_kept_normalises_by_the_batch_and_leaves_the_statistics_as_they_were():
    """Given a BN network in train mode, a forward inside ``running_stats_kept`` gives the outputs of
    a plain train-mode forward (batch statistics) but leaves running means, variances and batch
    counts unchanged, and restores each layer's momentum; ``keep=False`` changes nothing."""
    from test_compensate import two_bn_net

    net = two_bn_net().train()
    net[1].momentum = None  # a cumulative average: its update factor comes from the batch count
    x = torch.randn(32, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    before, momenta = bn_state(net), [m.momentum for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    with running_stats_kept(net):
        kept = net(x)
    assert all(torch.equal(a, b) for a, b in zip(before, bn_state(net)))
    assert [m.momentum for m in net.modules() if isinstance(m, nn.BatchNorm2d)] == momenta
    plain = net(x)  # the same batch statistics normalise it, and this one moves the running ones
    assert torch.allclose(kept, plain)
    assert not all(torch.equal(a, b) for a, b in zip(before, bn_state(net)))
    moved = bn_state(net)
    with running_stats_kept(net, keep=False):
        net(x)
    assert not all(torch.equal(a, b) for a, b in zip(moved, bn_state(net)))


def test_running_stats_kept_covers_every_batchnorm_and_survives_a_non_finite_batch():
    net = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).train()
    before = bn_state(net)
    x = torch.randn(8, 4)
    x[0, 0] = math.inf
    with running_stats_kept(net):
        net(x)
    assert all(torch.equal(a, b) for a, b in zip(before, bn_state(net)))


def test_invariance_terms_that_keep_bn_stats_leave_the_students_running_statistics_alone():
    """The invariance terms' extra forward on perturbed or patched images moves a train-mode
    student's BN running statistics unless the term keeps them (``Recover.invariance_keeps_bn_stats``)."""
    from test_compensate import two_bn_net

    student = two_bn_net().train()
    x = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    targets = student(x).detach()
    trigger = fit_universal_trigger(student, x, perturbation_bound(0.05, x, None), steps=1)
    patch = PatchTrigger(
        torch.ones(1, 1, 8, 8), torch.full((1, 3, 8, 8), 3.0), area=1.0, target=0, fooled=1.0, share_before=0.25
    )
    warp = UniversalWarp(torch.full((1, 2, 4, 4), 0.5), 1.0, target=0, fooled=1.0, share_before=0.25)
    for keep in (True, False):
        for term in (
            TriggerInvariance(trigger, keep_bn_stats=keep),
            PatchInvariance(patch, keep_bn_stats=keep),
            WarpInvariance(warp, keep_bn_stats=keep),
        ):
            before = bn_state(student)
            term.loss(student, x, targets, 1.0)
            assert all(torch.equal(a, b) for a, b in zip(before, bn_state(student))) is keep


def test_the_trigger_searches_restore_every_modules_mode_not_only_the_top_ones():
    """Given a model in train mode whose BatchNorm the caller froze in eval mode, each search runs
    the model in eval mode and hands it back with both modes as they were."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.LazyLinear(3))
    x = gaussian_images(16, size=8)
    model(x)  # materialise the lazy layer
    model.train()
    model[1].eval()
    searches = [
        lambda: fit_universal_trigger(model, x, torch.full((1, 3, 1, 1), 0.1), steps=2),
        lambda: fit_patch_trigger(model, x, Normalize((0.5,) * 3, (0.25,) * 3), steps=2),
        lambda: fit_universal_warp(model, x, steps=2),
    ]
    for search in searches:
        search()
        assert model.training and model[0].training and not model[1].training
