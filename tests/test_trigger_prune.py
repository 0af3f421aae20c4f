"""Trigger-channel pruning without data (ccpurify.passes.trigger_prune): a planted full-image shortcut
is found on synthetic images, and the channel that carries it is removed; a model without one is
left as it is."""

from __future__ import annotations

import copy
import json
from dataclasses import replace

import pytest
import torch
from torch import nn

from ccpurify.data.datasets import CIFAR10
from ccpurify.demo import ASSETS
from ccpurify.errors import InvalidInputError
from ccpurify.invariance import PatchTrigger, fit_patch_trigger
from ccpurify.io import load_model
from ccpurify.passes import CLP, EarlyPatch, Fallback, Pipeline, PurifyContext, Recover, TriggerPrune, create
from ccpurify.passes.base import PassReport
from ccpurify.passes.fallback import FallbackDetails
from ccpurify.passes.trigger_prune import TriggerPruneDetails, best_patch
from ccpurify.transforms import Normalize

PIXELS = Normalize((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))  # eps 0.15 of the pixel range: 0.6 here


def shortcut_net() -> nn.Sequential:
    """conv 8x8 over the whole 8x8 image (3 -> 8 channels) -> BN -> ReLU -> linear (8 -> 4), BN
    statistics N(0, 1) on Gaussian images. Channel 0's filter is constant: brightening every pixel
    by 0.6 lifts its BN input by 0.6 * sqrt(192), about 8 standard deviations, while its BN shift
    of -2 keeps it silent on almost every image that follows the statistics. The classifier reads
    channel 0 into class 0 at weight 20: the backdoor."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 8, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8, 4))
    with torch.no_grad():
        net[0].weight.normal_(0, 192**-0.5)
        net[0].weight[0] = 192**-0.5
        net[1].weight.fill_(1.0), net[1].bias.zero_()
        net[1].bias[0] = -2.0
        net[4].weight.normal_(0, 0.3), net[4].bias.zero_()
        net[4].weight[:, 0] = 0.0
        net[4].weight[0, 0] = 20.0
    return net.eval()


def context() -> PurifyContext:
    return PurifyContext(example_inputs=torch.zeros(1, 3, 8, 8), normalize=PIXELS, seed=0)


FAST = dict(eps=0.15, images=64, synthesis_steps=5, trigger_steps=40, max_fraction=0.25)  # at most 2 of 8 channels


def to_class_zero(model: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == 0).float().mean())


def test_the_channel_a_planted_trigger_switches_on_is_removed_and_the_trigger_no_longer_works():
    model = shortcut_net()
    before = copy.deepcopy(model.state_dict())
    purified, report = TriggerPrune(**FAST)(model, context())
    details = report.details
    trigger = details.triggers["perturbation"]
    assert not details.gated and trigger["passed"] and trigger["target"] == 0 and trigger["fooled"] > 0.9
    assert 0 in details.layers["1"]  # BN "1" normalises conv "0": channel 0 flagged ...
    assert details.removed == details.flagged and purified[0].out_channels == 8 - details.flagged  # ... and removed
    x = torch.randn(256, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    triggered = x + 0.6  # the planted trigger: every pixel brightened by 0.15 of the range
    assert to_class_zero(model, triggered) > 0.9
    assert to_class_zero(purified, triggered) < 0.5
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the caller's model
    # The console says what it found and the budget line what it spent (PipelineReport.budget).
    assert details.choices().startswith("a perturbation sends") and f"{details.flagged} channels" in details.choices()
    assert details.training().images == 64 and details.training().sample_steps == 64 * 7 + 64 * 40


def test_faithful_mode_zeroes_the_same_channels_in_place_and_keeps_every_shape():
    model = shortcut_net()
    compressed, compress_report = TriggerPrune(**FAST)(model, context())
    zeroed, report = TriggerPrune(**FAST, mode="faithful")(model, context())
    assert report.details.layers == compress_report.details.layers and report.details.removed is None
    assert zeroed[0].out_channels == 8
    assert all(zeroed[1].weight[i] == 0 and zeroed[1].bias[i] == 0 for i in report.details.layers["1"])
    x = torch.randn(16, 3, 8, 8)
    assert torch.allclose(zeroed(x), compressed(x), atol=1e-5)  # removal is exact after zeroing


def test_a_trigger_too_weak_to_fire_the_shortcut_is_gated_and_the_model_returned_unchanged():
    """Within 0.005 of the pixel range no perturbation fires channel 0: the best one raises its
    class's share of the images by less than min_lift, so nothing is removed."""
    model = shortcut_net()
    purified, report = TriggerPrune(**{**FAST, "eps": 0.005})(model, context())
    details = report.details
    trigger = details.triggers["perturbation"]
    assert details.gated == (trigger["fooled"] - trigger["share_before"] < 0.5) and not trigger["passed"]
    assert details.gated and details.flagged == 0 and details.layers == {}
    assert "no backdoor found, nothing removed" in details.choices()
    assert purified[0].out_channels == 8
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in purified.state_dict().items())


def test_trigger_prune_is_registered_and_refuses_a_model_without_batchnorm_or_bad_options():
    assert isinstance(create("trigger_prune", min_gain=3.0), TriggerPrune)
    with pytest.raises(InvalidInputError, match="BatchNorm"):
        TriggerPrune(**FAST)(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(2)), context())
    with pytest.raises(InvalidInputError, match="max_fraction"):
        TriggerPrune(max_fraction=1.5)
    with pytest.raises(InvalidInputError, match="min_gain"):
        TriggerPrune(min_gain=0.0)
    with pytest.raises(InvalidInputError, match="patch_steps shapes the patch search.*trigger_model='patch'"):
        TriggerPrune(patch_steps=10)  # ignored by the perturbation search: refused, not silently dropped


def test_only_the_deep_half_of_the_batchnorm_layers_is_scored():
    """Early channels respond to any perturbation (on CIFAR-10 WaNet they took the top gains, and
    removing them broke the model): by default only the last half of the BN layers is scored."""
    head = shortcut_net()
    model = nn.Sequential(
        head[0],
        head[1],
        head[2],
        nn.Conv2d(8, 4, 1, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4, 4),
    ).eval()
    _, half = TriggerPrune(**FAST, min_lift=0.0)(model, context())
    _, every = TriggerPrune(**FAST, min_lift=0.0, depth=1.0)(model, context())
    assert half.details.scored_channels == 4 and every.details.scored_channels == 12
    assert set(half.details.layers) <= {"4"}


def test_without_the_input_normalisation_or_with_non_logit_outputs_it_refuses_in_one_line():
    """The perturbation's bound is in pixel units: measured from synthetic images instead, it moved
    85% of a clean model's images to one class and passed the gate."""
    with pytest.raises(InvalidInputError, match="normalize"):
        TriggerPrune(**FAST)(shortcut_net(), PurifyContext(example_inputs=torch.zeros(1, 3, 8, 8)))
    with pytest.raises(InvalidInputError, match="logits of shape"):
        TriggerPrune(**FAST)(nn.Sequential(*shortcut_net()[:3]), context())


def test_batchnorm_without_scale_and_shift_is_not_scored():
    model = shortcut_net()
    plain = nn.BatchNorm2d(8, affine=False).eval()
    plain.load_state_dict({k: v for k, v in model[1].state_dict().items() if "running" in k or "num_batches" in k})
    model[1] = plain
    _, report = TriggerPrune(**FAST, min_lift=0.0)(model, context())
    assert report.details.scored_channels == 0 and report.details.flagged == 0


@pytest.fixture(scope="module")
def demo_badnets() -> nn.Module:
    """The embedded demo model: a CIFAR-10 PreAct-ResNet18 with a BadNets backdoor (3x3 patch, class 0)."""
    return load_model(ASSETS / "model.safetensors").eval()


def cifar10_context() -> PurifyContext:
    return PurifyContext(
        example_inputs=torch.zeros(1, 3, 32, 32), normalize=Normalize(CIFAR10.mean, CIFAR10.std), seed=0
    )


PATCH = dict(images=64, synthesis_steps=10, trigger_steps=40, patch_steps=150)


@pytest.fixture(scope="module")
def both_searches(demo_badnets) -> tuple[nn.Module, PassReport]:
    """TriggerPrune on the demo BadNets model with both trigger models and two patch searches, the
    usual one and one whose penalty warms up over half its steps (shared: about 30 s on 2 cores)."""
    return TriggerPrune(**PATCH, trigger_model="both", patch_warmups=(0.0, 0.5))(demo_badnets, cifar10_context())


def test_a_badnets_patch_is_found_by_the_patch_search_where_the_perturbation_gate_stops(demo_badnets, both_searches):
    """BadNets' trigger is a small opaque patch: no change within 0.05 of the pixel range imitates
    it, and a mask of under 2% of the pixels does."""
    perturbation_only = {k: v for k, v in PATCH.items() if k != "patch_steps"}
    _, perturbation = TriggerPrune(**perturbation_only)(demo_badnets, cifar10_context())
    assert perturbation.details.gated and list(perturbation.details.triggers) == ["perturbation"]
    _, report = both_searches
    patch = report.details.triggers["patch"]
    assert patch["passed"] and patch["target"] == 0 and patch["area"] <= 0.02 and patch["fooled"] > 0.9, patch
    assert not report.details.triggers["perturbation"]["passed"]
    assert not report.details.gated and report.details.flagged > 0
    assert (
        "a patch (area" in report.details.choices() and "channels it switches on silenced" in report.details.choices()
    )
    assert report.details.training().sample_steps == 64 * 10 + (64 * 40 + 2 * 64) + 2 * (64 * 150 + 2 * 64)


def test_the_recovery_unlearns_the_patch_the_trigger_search_found(demo_badnets, both_searches):
    """Given the demo BadNets model, TriggerPrune's reversed patch passes through the pipeline
    (``context.teacher_details``) to ``Recover(found_patch_weight=1)``, which adds Neural Cleanse's
    unlearning term on it: on the same images the first batch's loss is the plain recovery's plus
    that term, so it is larger. The report keeps the patch's summary, not its tensors."""
    recovery = dict(
        data="synthetic", teacher_from="input", guard=True, synthetic_images=32, synthetic_steps=2, epochs=1
    )
    search_both = TriggerPrune(**PATCH, trigger_model="both", patch_warmups=(0.0, 0.5))  # as both_searches
    pipeline = Pipeline([search_both, Recover(**recovery, found_patch_weight=1.0)])
    _, report = pipeline(demo_badnets, cifar10_context())
    search, recovered = report.passes[0].details, report.passes[1].details
    (patch,) = search.found_triggers()
    assert isinstance(patch, PatchTrigger) and patch.target == 0 and recovered.found_patches_unlearned == 1
    saved = json.loads(json.dumps(report.to_dict()))
    assert (
        "passed" not in saved["passes"][0]["details"] and saved["passes"][0]["details"]["triggers"]["patch"]["passed"]
    )
    alone, _ = both_searches
    by_hand = cifar10_context()
    by_hand.teacher, by_hand.pipeline_input, by_hand.teacher_details = alone, demo_badnets, search
    plain = Recover(**recovery).recover(copy.deepcopy(alone), by_hand)
    unlearned = Recover(**recovery, found_patch_weight=1.0).recover(copy.deepcopy(alone), by_hand)
    assert plain.found_patches_unlearned == 0
    assert unlearned.distill.loss_per_epoch[0] == pytest.approx(recovered.distill.loss_per_epoch[0], rel=1e-5)
    assert unlearned.distill.loss_per_epoch[0] > plain.distill.loss_per_epoch[0] + 1e-3
    # With no defense before it there is nothing to unlearn: refused, not silently ignored.
    with pytest.raises(InvalidInputError, match="no defense ran before it"):
        Pipeline([Recover(**{**recovery, "guard": False, "teacher_from": "self"}, found_patch_weight=1.0)])(
            demo_badnets, cifar10_context()
        )


def test_fallback_runs_its_other_defense_only_where_the_first_found_no_backdoor():
    """Fallback(TriggerPrune, CLP): where the planted shortcut is found, CLP never runs and the
    output is TriggerPrune's; where the trigger search is too weak to find it, the output is CLP's
    on the model as given."""
    model = shortcut_net()
    found_model, found = Fallback(TriggerPrune(**FAST), CLP())(model, context())
    alone_model, _ = TriggerPrune(**FAST)(model, context())
    assert found.details.ran == ["trigger_prune"] and found.details.otherwise is None
    assert found.details.found_backdoor() and found_model[0].out_channels == alone_model[0].out_channels
    weak = TriggerPrune(**{**FAST, "eps": 0.005})
    fallback_model, fell = Fallback(weak, CLP(mode="faithful"))(model, context())
    clp_model, _ = CLP(mode="faithful")(model, context())
    assert fell.details.ran == ["trigger_prune", "clp"] and fell.details.first.gated
    assert all(torch.equal(v, clp_model.state_dict()[k]) for k, v in fallback_model.state_dict().items())
    saved = json.loads(json.dumps(fell.to_dict()))  # the report a run directory keeps
    assert saved["details"]["first"]["gated"] is True and saved["config"]["first"]["name"] == "trigger_prune"


def test_a_guarded_recovery_distills_from_the_detectors_output_only_where_it_found_the_backdoor():
    """Recover(guard_teaches_if_found=True) after Fallback(TriggerPrune, CLP): where the planted
    shortcut is found, TriggerPrune's output teaches (the suspect never does) and the trigger stays
    removed; where the search is too weak and CLP acts, the suspect teaches under CLP's guard, as
    without the option. The pipeline leaves the context as it found it."""
    recovery = dict(
        data="synthetic", teacher_from="input", guard=True, synthetic_images=32, synthetic_steps=2, epochs=1
    )
    model, ctx = shortcut_net(), context()
    found = Pipeline([Fallback(TriggerPrune(**FAST), CLP()), Recover(**recovery, guard_teaches_if_found=True)])
    purified, report = found(model, ctx)
    assert report.passes[0].details.found_backdoor() and report.passes[1].details.teacher == "defense"
    triggered = torch.randn(256, 3, 8, 8, generator=torch.Generator().manual_seed(3)) + 0.6
    assert to_class_zero(model, triggered) > 0.9 and to_class_zero(purified, triggered) < 0.5
    assert ctx.teacher is None and ctx.teacher_details is None
    weak = TriggerPrune(**{**FAST, "eps": 0.005})
    _, fell = Pipeline([Fallback(weak, CLP()), Recover(**recovery, guard_teaches_if_found=True)])(model, ctx)
    assert fell.passes[0].details.found_backdoor() is None and fell.passes[1].details.teacher == "input"
    _, plain = Pipeline([Fallback(TriggerPrune(**FAST), CLP()), Recover(**recovery)])(model, ctx)
    assert plain.passes[1].details.teacher == "input"
    with pytest.raises(InvalidInputError, match="guard_teaches_if_found shapes the guard: it needs guard=True"):
        Recover(guard_teaches_if_found=True)


def test_the_guard_vetoes_only_the_suspected_target_where_the_defense_silenced_a_per_image_trigger():
    """Recover(guard_scope_per_image="target") after a defense: where the defense reports channels
    silenced for a per-image trigger, the guard overrules the suspect only where the suspect predicts
    the class it suspects (which it finds and reports); where the defense did anything else, the
    guard keeps ``guard_scope`` ("all"). Without a guard the option is refused."""
    recovery = dict(
        data="synthetic", teacher_from="input", guard=True, synthetic_images=32, synthetic_steps=2, epochs=1
    )
    model = shortcut_net()
    guard, found = TriggerPrune(**FAST)(model, context())
    assert not found.details.silenced_per_image_trigger()
    # As Fallback(TriggerPrune(early_depth=...), OTBR()) reports a check that silenced one channel.
    per_image = FallbackDetails(
        ran=["trigger_prune"], first=replace(found.details, early={"opened": True, "silenced": 1})
    )
    assert per_image.silenced_per_image_trigger()
    for details, scope in ((found.details, "all"), (per_image, "target")):
        ctx = context()
        ctx.teacher, ctx.pipeline_input, ctx.teacher_details = guard, model, details
        recovered = Recover(**recovery, guard_scope_per_image="target").recover(copy.deepcopy(guard), ctx)
        assert recovered.guard_scope == scope and (recovered.suspected_target is not None) == (scope == "target")
    with pytest.raises(InvalidInputError, match="guard_scope_per_image shapes the guard: it needs guard=True"):
        Recover(guard_scope_per_image="target")
    guarded = dict(teacher_from="input", guard=True)
    with pytest.raises(InvalidInputError, match="is guard_scope already"):
        Recover(**guarded, guard_scope_per_image="all")
    with pytest.raises(InvalidInputError, match="guard_scope_per_image would never apply"):
        Recover(**guarded, guard_scope_per_image="target", guard_teaches_if_found=True)
    with pytest.raises(InvalidInputError, match="guard_scope_per_image .*one of all/target or null"):
        create("recover", **guarded, guard_scope_per_image="bogus")
    assert create("recover", **guarded, guard_scope_per_image=None).guard_scope_per_image is None  # a saved config


def test_fallback_runs_its_other_defense_alone_where_the_first_cannot_apply_and_refuses_a_non_detector():
    """TriggerPrune needs the input normalisation: without it, Fallback runs CLP alone and says why.
    A first pass that always acts (CLP) would never let the second run: refused when built."""
    bare = PurifyContext(example_inputs=torch.zeros(1, 3, 8, 8), seed=0)
    with pytest.warns(UserWarning, match="trigger_prune is skipped and clp runs alone: .*normalize"):
        out, report = Fallback(TriggerPrune(**FAST), CLP(mode="faithful"))(shortcut_net(), bare)
    assert report.details.ran == ["clp"] and report.details.first is None
    assert "normalize" in report.details.first_refused and report.details.choices().startswith("first pass skipped")
    with pytest.raises(InvalidInputError, match="'clp' does not report that"):
        Fallback(CLP(), TriggerPrune())


def test_a_trigger_that_passes_the_gate_but_switches_on_no_channel_counts_as_nothing_found():
    _, report = TriggerPrune(**FAST, min_gain=1000.0)(shortcut_net(), context())
    assert not report.details.gated and report.details.flagged == 0 and report.details.found_backdoor() is False


def colour_net() -> nn.Sequential:
    """1x1 conv (3 -> 2 channels) -> BN -> ReLU -> pool -> linear. Channel 0 is tuned to pure red
    (weights +1, -1, -1 on the pixel values); channel 1 reads brightness (1/3 each), which on dark
    images any pasted square of random colours raises more than a red one."""
    net = nn.Sequential(
        nn.Conv2d(3, 2, 1, bias=False),
        nn.BatchNorm2d(2),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2, 3),
    )
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, -1.0, -1.0], [1 / 3, 1 / 3, 1 / 3]]).view(2, 3, 1, 1))
    return net.eval()


def red_patch(area_pixels: int = 3) -> PatchTrigger:
    mask = torch.zeros(1, 1, 8, 8)
    mask.view(-1)[:area_pixels] = 1.0
    pattern = PIXELS(torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1).expand(1, 3, 8, 8))
    return PatchTrigger(mask, pattern, area_pixels / 64, target=0, fooled=0.7, share_before=0.2)


def test_a_channel_tuned_to_the_patch_outranks_one_that_any_patch_moves():
    """``patch_specific_shifts``: the patch's shift minus the largest of random patches of its size.
    On dark images both channels rise under a red patch; with the controls subtracted only the red
    detector keeps a positive score."""
    from ccpurify.passes.trigger_prune import patch_specific_shifts

    dark = 0.2 * torch.rand(128, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    model, images = colour_net(), PIXELS(dark)
    convs = {"0": model[0]}
    raw = patch_specific_shifts(model, convs, images, [red_patch()], PIXELS, 0, torch.Generator().manual_seed(1))
    net = patch_specific_shifts(model, convs, images, [red_patch()], PIXELS, 4, torch.Generator().manual_seed(1))
    assert raw["0"][0] > 0 and raw["0"][1] > 0
    assert net["0"][0] > 0 > net["0"][1]
    assert not model.training


def test_with_several_patches_each_channel_takes_its_largest_shift_against_the_same_controls():
    """Given a red patch, which moves the red detector, and a larger grey one, which moves the
    brightness channel more, scored together each channel keeps its larger score of the two, each
    computed as if that patch were scored alone with the same seed (its controls shuffle its own
    mask); with no patch, or patches of two input shapes, there is nothing to score."""
    from ccpurify.passes.trigger_prune import patch_specific_shifts

    dark = 0.2 * torch.rand(128, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    model, images = colour_net(), PIXELS(dark)
    convs = {"0": model[0]}
    grey = replace(red_patch(5), pattern=PIXELS(torch.full((1, 3, 8, 8), 0.9)))
    alone = [
        patch_specific_shifts(model, convs, images, [p], PIXELS, 4, torch.Generator().manual_seed(1))["0"]
        for p in (red_patch(), grey)
    ]
    both = patch_specific_shifts(model, convs, images, [red_patch(), grey], PIXELS, 4, torch.Generator().manual_seed(1))
    assert alone[0][0] > alone[1][0] and alone[1][1] > alone[0][1]  # each patch leads on one channel
    torch.testing.assert_close(both["0"], torch.maximum(*alone))
    with pytest.raises(ValueError, match="at least one patch"):
        patch_specific_shifts(model, convs, images, [], PIXELS, 4, torch.Generator())
    smaller = replace(grey, mask=torch.ones(1, 1, 4, 4), pattern=torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match="one input shape"):
        patch_specific_shifts(model, convs, images, [red_patch(), smaller], PIXELS, 4, torch.Generator())
    diverged = replace(grey, pattern=torch.full((1, 3, 8, 8), float("nan")))
    with pytest.raises(ValueError, match="NaN or infinite"):
        patch_specific_shifts(model, convs, images, [red_patch(), diverged], PIXELS, 4, torch.Generator())
    with pytest.raises(TypeError, match=r"pass \[patch\]"):
        patch_specific_shifts(model, convs, images, red_patch(), PIXELS, 4, torch.Generator())


def test_the_check_scores_with_the_counted_patch_the_strongest_or_every_one_for_the_suspected_class():
    """Given three patch searches' results, the first counted (class 0), a stronger one for class 0
    and the strongest for class 1: ``early_patch`` picks the counted one, the strongest of all, or
    both class-0 patches (another class's patch would single out that class's features)."""
    counted = red_patch()
    stronger = replace(red_patch(4), fooled=0.9)
    other = replace(red_patch(5), target=1, fooled=0.95)
    patches = [counted, stronger, other]
    pick = {
        c: TriggerPrune(**PATCH, trigger_model="patch", patch_warmups=(0.0, 0.5, 1.0), early_depth=0.5, early_patch=c)
        for c in EarlyPatch
    }
    assert pick[EarlyPatch.COUNTED].scoring_patches(counted, patches) == [counted]
    assert pick[EarlyPatch.STRONGEST].scoring_patches(counted, patches) == [other]
    assert pick[EarlyPatch.ALL].scoring_patches(counted, patches) == [counted, stronger]


@pytest.fixture(scope="module")
def early_patches(demo_badnets) -> dict[str, tuple[nn.Module, TriggerPruneDetails]]:
    """The demo BadNets model, two patch searches and the patch gate's area bar below both patches,
    so nothing passes and the first search's patch (the single search's) counts and opens the
    per-image check: the pass's purified model and details with each ``early_patch`` (about 30 s
    each on 2 cores)."""
    runs = {
        choice.value: TriggerPrune(
            **PATCH,
            trigger_model="patch",
            max_area=0.001,
            patch_warmups=(0.0, 0.5),
            early_depth=0.5,
            early_patch=choice,
        )(copy.deepcopy(demo_badnets), cifar10_context())
        for choice in EarlyPatch
    }
    return {choice: (purified, report.details) for choice, (purified, report) in runs.items()}


def summary(search: dict) -> dict:
    return {"target": 0, "area": search["area"], "lift": search["lift"]}


def test_a_patch_larger_than_max_area_does_not_pass_the_gate_and_goes_to_the_per_image_check(
    demo_badnets, early_patches
):
    """Given the demo BadNets model with the patch gate's area bar set below its patch, the gate
    stops the patch. The per-image check (``early_depth``) takes it: the patch still lifts class 0
    and no warp of a pixel does, so the first half of the convs are scored and at most 13% of their
    channels silenced: through their BatchNorm where one normalises the conv, else at the filter
    (the residual stream's writers). The patch is passed on for the recovery to unlearn."""
    purified, details = early_patches["counted"]
    patch = details.triggers["patch"]
    assert patch["fooled"] - patch["share_before"] >= 0.5 and patch["area"] > 0.001  # only the area gate stops it
    assert details.gated and not patch["passed"]
    early = details.early
    assert early["opened"] and early["area"] == patch["area"] and early["lift"] >= 0.3
    assert early["warp_lift"] < 0.3
    convs = [(n, m) for n, m in demo_badnets.named_modules() if isinstance(m, nn.Conv2d)]
    scored = convs[: round(0.5 * len(convs))]
    assert early["convs"] == len(scored)
    assert 0 < early["silenced"] <= int(0.13 * sum(m.out_channels for _, m in scored))
    assert details.found_backdoor() and isinstance(details.found_triggers()[0], PatchTrigger)
    assert "per-image patch" in details.choices() and details.silenced_per_image_trigger()
    for name, idx in early["filters"].items():  # writers of the residual stream: zeroed in place
        assert name in dict(scored)
        assert purified.get_submodule(name).weight[idx].abs().sum() == 0
    assert details.flagged == early["silenced"] and details.removed + details.zeroed == details.flagged
    assert sum(p.numel() for p in purified.parameters()) < sum(p.numel() for p in demo_badnets.parameters())


def test_the_per_image_check_is_off_by_default_and_refuses_options_it_would_ignore():
    _, report = TriggerPrune(**FAST)(shortcut_net(), context())
    assert report.details.early is None
    with pytest.raises(InvalidInputError, match="early_fraction shapes the per-image patch check"):
        TriggerPrune(early_fraction=0.2)
    with pytest.raises(InvalidInputError, match="trigger_model='patch' or 'both'"):
        TriggerPrune(early_depth=0.5)
    with pytest.raises(InvalidInputError, match="must exceed max_area"):
        TriggerPrune(trigger_model="both", early_depth=0.5, early_max_area=0.01)


def test_the_per_image_check_scores_only_convs_it_can_silence():
    """A grouped conv's channels are tied to its input's, a conv classifier's are the logits, and a
    BatchNorm without scale and shift would output a constant where the filter is zeroed: none of
    them is scored. A plain conv is."""
    from ccpurify.graph import ChannelGraph

    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 1),
        nn.BatchNorm2d(8, affine=False),
        nn.ReLU(),
        nn.Conv2d(8, 8, 1),  # feeds the grouped conv: blocked with it
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=2),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 4, 8),
        nn.Flatten(),
    ).eval()
    graph = ChannelGraph(model, torch.zeros(1, 3, 8, 8))
    scored = [n for n in ("0", "3", "6", "9", "12") if TriggerPrune._silenceable(n, graph, model)]
    assert scored == ["0"]


def a_patch(area: float, fooled: float, share_before: float = 0.1) -> PatchTrigger:
    return PatchTrigger(torch.zeros(1, 1, 4, 4), torch.zeros(1, 3, 4, 4), area, 0, fooled, share_before)


def test_of_several_patch_searches_the_passing_one_that_fools_the_most_counts_else_the_first():
    first, weak, strong, large = a_patch(0.014, 0.88), a_patch(0.018, 0.7), a_patch(0.013, 1.0), a_patch(0.03, 1.0)
    assert best_patch([first, weak, strong, large], min_lift=0.5, max_area=0.02) == (strong, True)
    tie = a_patch(0.009, 1.0)
    assert best_patch([strong, tie], min_lift=0.5, max_area=0.02)[0] is tie  # the smaller on a tie
    too_large = a_patch(0.05, 0.9)
    assert best_patch([too_large, large], min_lift=0.5, max_area=0.02) == (too_large, False)
    assert best_patch([first, a_patch(0.01, 0.3)], min_lift=0.5, max_area=0.02) == (first, True)


def test_two_patch_searches_on_the_demo_badnets_model_report_both_and_keep_a_passing_patch(both_searches):
    """Given the demo BadNets model and ``patch_warmups=(0.0, 0.5)``, the pass runs the usual patch
    search and one whose penalty warms up over half its steps: both are reported, and the one that
    counts passes the gate and fools at least as many images as the other."""
    _, report = both_searches
    details = report.details
    searches = details.patch_searches
    assert [s["warmup"] for s in searches] == [0.0, 0.5] and sum(s["chosen"] for s in searches) == 1
    chosen = next(s for s in searches if s["chosen"])
    assert details.triggers["patch"]["passed"] and details.triggers["patch"]["area"] == chosen["area"]
    assert chosen["area"] <= 0.02 and all(chosen["fooled"] >= s["fooled"] for s in searches if s["area"] <= 0.02)


def test_patch_warmups_need_a_search_and_a_patch_model_and_the_warmup_a_fraction():
    with pytest.raises(InvalidInputError, match="patch_warmups needs at least one"):
        TriggerPrune(trigger_model="patch", patch_warmups=())
    with pytest.raises(InvalidInputError, match="patch_warmups shapes the patch search"):
        TriggerPrune(patch_warmups=(0.0, 0.5))
    assert TriggerPrune(patch_warmups=[0.0]).patch_warmups == (0.0,)  # a list, as a saved config has it
    with pytest.raises(ValueError, match="warmup in"):
        fit_patch_trigger(shortcut_net(), torch.randn(4, 3, 8, 8), PIXELS, warmup=1.5)


def test_a_warmed_up_penalty_leaves_a_larger_mask_after_the_same_steps():
    """Given one model, images and seed, the later the L1 penalty reaches full weight, the less the
    mask has shrunk after 20 steps: the warmup alone changes what the search finds."""
    images = torch.randn(32, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    areas = [
        fit_patch_trigger(
            shortcut_net(), images, PIXELS, steps=20, warmup=warmup, generator=torch.Generator().manual_seed(0)
        ).area
        for warmup in (0.0, 0.5, 1.0)
    ]
    assert areas[0] < areas[1] < areas[2]


def test_best_patch_needs_a_search_and_the_warmups_are_distinct():
    with pytest.raises(ValueError, match="at least one"):
        best_patch([], min_lift=0.5, max_area=0.02)
    with pytest.raises(InvalidInputError, match="same number of the 200 patch steps twice"):
        TriggerPrune(trigger_model="patch", patch_warmups=(0.0, 0.5, 0.501))  # both ramp over 100 steps
    # One patch search per warmup, each with its scoring, is the estimate of the work.
    one, two = (TriggerPrune(**PATCH, trigger_model="patch", patch_warmups=w) for w in ((0.0,), (0.0, 0.5)))
    assert two.sample_steps(cifar10_context()) - one.sample_steps(cifar10_context()) == 64 * 150 + 2 * 64


def test_the_per_image_check_can_score_with_the_patch_search_that_lifts_its_class_the_most(early_patches):
    """With ``early_patch="strongest"`` the early channels are scored with the search whose patch
    lifts class 0 the most, and that patch is the one passed on for the recovery to unlearn; the
    gate still reads the counted patch."""
    _, details = early_patches["strongest"]
    counted, strongest = details.patch_searches
    assert counted["chosen"] and not details.triggers["patch"]["passed"]
    assert strongest["lift"] > counted["lift"]  # else the option would pick the counted patch: nothing shown
    early = details.early
    assert early["opened"] and (early["area"], early["lift"]) == (counted["area"], counted["lift"])  # the gate's
    assert early["scored_with"] == [summary(strongest)]
    unlearned = details.found_triggers()[-1]
    assert round(unlearned.area, 4) == strongest["area"] and round(unlearned.lift, 4) == strongest["lift"]
    assert 0 < early["silenced"] and details.silenced_per_image_trigger()
    assert early_patches["counted"][1].early["scored_with"] == [summary(counted)]


def test_the_per_image_check_can_score_each_channel_by_its_largest_shift_over_every_patch_search(early_patches):
    """With ``early_patch="all"`` a channel's score is its largest shift over both searches' patches,
    each against the same controls: so the k-th highest score is at least the k-th highest under
    either patch alone, and the highest is the larger of the two single-patch highest. The counted
    patch is the one passed on."""
    _, details = early_patches["all"]
    counted, strongest = details.patch_searches
    early = details.early
    assert early["opened"] and early["scored_with"] == [summary(counted), summary(strongest)]
    alone = [early_patches[c][1].early["top_shifts"] for c in ("counted", "strongest")]
    assert early["top_shifts"][0] == max(top[0] for top in alone)
    assert all(v >= max(a, b) for v, a, b in zip(early["top_shifts"], *alone))
    unlearned = details.found_triggers()[-1]
    assert round(unlearned.area, 4) == counted["area"] and round(unlearned.lift, 4) == counted["lift"]
    assert 0 < early["silenced"]
    # The work estimate counts the images once more with the second patch and with each control.
    one, every = (early_patches[c][1].sample_steps for c in ("counted", "all"))
    assert every - one == 64 * (1 + TriggerPrune.early_random_patches)


def test_early_patch_is_a_per_image_check_option():
    with pytest.raises(InvalidInputError, match="early_patch shapes the per-image patch check"):
        TriggerPrune(early_patch="strongest")
    with pytest.raises(
        InvalidInputError, match="early_patch of pass 'trigger_prune' takes one of counted/strongest/all"
    ):
        TriggerPrune(trigger_model="both", early_depth=0.5, early_patch="largest")
    for choice in ("strongest", "all"):
        with pytest.raises(InvalidInputError, match=f"early_patch='{choice}' reads several patch searches"):
            TriggerPrune(trigger_model="both", early_depth=0.5, early_patch=choice)
    both = TriggerPrune(trigger_model="both", early_depth=0.5, early_patch="strongest", patch_warmups=(0.0, 0.5))
    assert both.config()["early_patch"] == "strongest"
