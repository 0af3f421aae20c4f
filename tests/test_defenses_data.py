"""Defenses with a little data (RNP, BCU) and the data they accept."""

import copy

import numpy as np
import pytest
import torch
from archs import PlainVGGWithMLP, randomize_norms
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ccpurify import defender
from ccpurify.data import get_spec
from ccpurify.defender import _run_subset
from ccpurify.errors import InvalidInputError
from ccpurify.passes import BCU, RNP, LabeledData, Prune, PurifyContext, UnlabeledData, as_labeled, as_unlabeled
from ccpurify.passes.bcu import level_ratios, reinitialize, resolution_levels
from ccpurify.passes.rnp import below, lowest, zero_bn_channels


@pytest.fixture(scope="module")
def rnp_data(ci_run, data_dir):
    return defender.clean_data(ci_run.run_dir, "cifar10", data_dir=data_dir)  # the run's 5% clean subset


def test_rnp_unlearning_stops_at_the_accuracy_threshold(ci_run, rnp_data):
    unlearned, history = RNP(clean_threshold=0.2).unlearn(ci_run.model, rnp_data, PurifyContext())
    assert history[-1] <= 0.2 and all(acc > 0.2 for acc in history[:-1]) and len(history) < 20


def test_rnp_masks_stay_in_the_unit_interval(ci_run, rnp_data):
    rnp = RNP(recover_epochs=3)
    unlearned, _ = rnp.unlearn(ci_run.model, rnp_data, PurifyContext())
    masks = rnp.recover_masks(unlearned, rnp_data, PurifyContext())
    values = torch.cat(list(masks.values()))
    assert values.min() >= 0.0 and values.max() <= 1.0 and (values < 1.0).any()


def test_rnp_physical_prune_matches_the_masked_model(ci_run, rnp_data):
    model = ci_run.model.eval()
    out, report = RNP(threshold=0.9, recover_epochs=5)(model, PurifyContext(clean_data=rnp_data))
    details = report.details
    assert details.removed > 0 and report.params_after < report.params_before
    masked = copy.deepcopy(model)
    # the channels the pass chose, as it reports them (its masks are reported rounded, so recomputing
    # the selection from them can miss a mask just under the threshold)
    assert sum(len(v) for v in details.channels.values()) == details.pruned_channels
    zero_bn_channels(masked, details.channels, beta=True)
    x = rnp_data.x[:64]
    with torch.no_grad():
        assert (out(x) - masked(x)).abs().max() <= 1e-5


def test_rnp_faithful_zeroes_gamma_only(ci_run, rnp_data):
    out, report = RNP(mode="faithful", threshold=0.9, recover_epochs=3)(
        ci_run.model, PurifyContext(clean_data=rnp_data)
    )
    name, idx = next(iter(below({k: torch.tensor(v) for k, v in report.details.masks.items()}, 0.9).items()))
    bn = out.get_submodule(name)
    assert torch.all(bn.weight[idx] == 0) and torch.equal(bn.bias, ci_run.model.get_submodule(name).bias)
    assert report.params_after == report.params_before


def test_rnp_auto_threshold_uses_held_out_clean_images_only(ci_run, rnp_data):
    _, report = RNP(threshold="auto", recover_epochs=3)(ci_run.model, PurifyContext(clean_data=rnp_data))
    d = report.details
    assert d.threshold_rule.kind == "auto" and d.threshold_rule.heldout_images == int(0.2 * len(rnp_data))
    assert [s["threshold"] for s in d.threshold_rule.sweep][:3] == [0.05, 0.1, 0.15]


def test_rnp_with_max_images_unlearns_on_a_seeded_subset_of_that_size(ci_run, rnp_data):
    rnp = RNP(threshold=0.9, recover_epochs=1, unlearn_epochs=1, max_images=32)
    _, report = rnp(ci_run.model, PurifyContext(clean_data=rnp_data))
    _, again = rnp(ci_run.model, PurifyContext(clean_data=rnp_data))
    assert report.details.clean_images == 32 and report.details.clean_images_given == len(rnp_data) > 32
    assert report.details.channels == again.details.channels  # the same draw given the seed
    with pytest.raises(ValueError, match="max_images"):
        RNP(max_images=0)


def test_rnp_prunes_the_lowest_trajectory_scores_when_given_a_fraction(ci_run, rnp_data):
    rnp = RNP(prune_fraction=0.05, mask_score="trajectory", recover_epochs=3, collapse_guard=None)  # the count alone
    unlearned, _ = rnp.unlearn(ci_run.model, rnp_data, PurifyContext())
    final = RNP(recover_epochs=3).recover_masks(unlearned, rnp_data, PurifyContext())
    scores = rnp.recover_masks(unlearned, rnp_data, PurifyContext())
    values = torch.cat(list(scores.values()))
    assert values.min() >= 0.0 and values.max() <= 1.0
    assert not torch.equal(values, torch.cat(list(final.values())))  # a mean over steps, not the last mask
    _, report = rnp(ci_run.model, PurifyContext(clean_data=rnp_data))
    d = report.details
    assert d.threshold_rule.kind == "fraction" and d.mask_score == "trajectory"
    assert d.pruned_channels == round(0.05 * d.total_channels)


def test_lowest_ranks_all_layers_together_and_breaks_ties_in_layer_order():
    scores = {"a": torch.tensor([0.0, 0.5, 0.2]), "b": torch.tensor([0.0, 0.1])}
    assert lowest(scores, 3) == {"a": [0], "b": [0, 1]}
    assert lowest(scores, 0) == {}


def test_rnp_rejects_a_fraction_together_with_the_auto_threshold():
    with pytest.raises(ValueError, match="either prune_fraction or threshold='auto'"):
        RNP(prune_fraction=0.05, threshold="auto")
    with pytest.raises(ValueError, match="prune_fraction must be in"):
        RNP(prune_fraction=1.5)


def test_rnp_needs_labelled_data():
    with pytest.raises(ValueError, match="RNP needs labelled clean images"):
        RNP()(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))


# -------------------------------------------------------------------------------------------- BCU
def test_bcu_reinitialises_the_expected_fraction_per_depth_on_a_custom_net():
    torch.manual_seed(0)
    model = randomize_norms(PlainVGGWithMLP())  # 4 resolution levels + an MLP head; no ResNet names
    bcu = BCU()
    ratios = bcu.depth_ratios(model, torch.zeros(1, 3, 32, 32))
    expected = dict(zip(["features.0", "features.4", "features.8", "features.12"], level_ratios(4, 0.01, 0.27)))
    assert ratios["mlp.5"] == 0.10 and ratios["mlp.1"] == pytest.approx(0.27)
    for name, r in expected.items():
        assert ratios[name] == pytest.approx(r)
    assert level_ratios(4, 0.01, 0.27) == pytest.approx([0.01, 0.03, 0.09, 0.27])  # the reference's stages
    before = copy.deepcopy(model)
    replaced = reinitialize(model, ratios, torch.Generator().manual_seed(0))
    for name in ("features.8", "features.12", "mlp.1"):
        assert replaced[name] == pytest.approx(ratios[name], abs=0.02)
        changed = (model.get_submodule(name).weight != before.get_submodule(name).weight).float().mean()
        assert changed == pytest.approx(ratios[name], abs=0.02)
    assert torch.equal(model.features[1].running_var, before.features[1].running_var)  # BN copied


def test_resolution_levels_follow_downsampling_not_names():
    levels = resolution_levels(PlainVGGWithMLP(), torch.zeros(1, 3, 32, 32))
    assert [levels[n] for n in ("features.0", "features.4", "features.8", "features.12", "mlp.5")] == [0, 1, 2, 3, 3]


def test_bcu_temperature_rises_linearly_from_one_to_four():
    bcu = BCU(epochs=100)
    assert bcu.temperature(0) == pytest.approx(1.03) and bcu.temperature(99) == pytest.approx(4.0)


def test_bcu_with_a_budget_runs_the_same_sample_steps_whatever_the_pool_size():
    bcu = BCU(budget=100_000)
    assert bcu.epochs_for(5_000) == 20 and bcu.epochs_for(20_000) == 5 and bcu.epochs_for(1_000) == 100
    assert BCU().epochs_for(20_000) == 20  # without a budget: the reference's fixed epochs
    assert bcu.temperature(4, 5) == pytest.approx(4.0)  # the temperature still rises to t_end in the last epoch
    with pytest.raises(ValueError):
        BCU(budget=0)


def test_the_budget_line_reads_each_pass_s_typed_training_log():
    from ccpurify.distill import DistillLog
    from ccpurify.passes.base import PassDetails, PassReport, PipelineReport
    from ccpurify.passes.bcu import BCUDetails

    details = BCUDetails(ratios={}, replaced={}, distill=DistillLog(20, [0.0] * 20, 5000), unlabeled_images=5000)
    bcu = PassReport("bcu", {}, 1, 1, 1, 1, 3.0, details)
    clp = PassReport("clp", {}, 1, 1, 1, 1, 0.2, PassDetails())  # trains on nothing: no count
    assert PipelineReport([clp, bcu]).budget() == "clp 0 s · bcu 3 s (5,000 unlabelled images, 100,000 sample-steps)"
    assert bcu.to_dict()["details"]["distill"] == {
        "epochs": 20,
        "loss_per_epoch": [0.0] * 20,
        "images": 5000,
        "guard_vetoed_fraction": None,
    }
    assert BCU.reference().epochs == 100 and BCU.reference().batch_size == 256


def test_bcu_distills_and_its_compact_variant_is_smaller(ci_run, data_dir):
    pool = defender.unlabeled_data(ci_run.run_dir, "cifar10", data_dir=data_dir)
    context = PurifyContext(unlabeled_data=UnlabeledData(pool.x[:256]))
    out, report = BCU(epochs=2)(ci_run.model, context)
    assert len(report.details.distill.loss_per_epoch) == 2 and report.params_after == report.params_before
    small, compact = BCU(epochs=1, compact=Prune(macs=0.5))(ci_run.model, context)
    assert compact.macs_ratio <= 0.5 and compact.edits and compact.config["compact"]["name"] == "prune"


def test_bcu_with_max_images_distills_on_a_seeded_draw_of_that_many(ci_run, data_dir):
    pool = defender.unlabeled_data(ci_run.run_dir, "cifar10", data_dir=data_dir)
    given = UnlabeledData(pool.x[:96])
    context = PurifyContext(unlabeled_data=given)
    bcu = BCU(epochs=1, max_images=64)
    drawn = given.at_most(64, context.generator(33))  # the draw BCU makes
    assert not torch.equal(drawn.x, given.x[:64])  # across the images, not the first ones
    assert bcu.sample_steps(context) == BCU(epochs=1).sample_steps(PurifyContext(unlabeled_data=drawn))
    out, report = bcu(ci_run.model, context)
    again, _ = bcu(ci_run.model, context)
    assert report.details.unlabeled_images == report.details.distill.images == 64
    assert report.details.unlabeled_images_given == 96
    assert all(torch.equal(a, b) for a, b in zip(out.state_dict().values(), again.state_dict().values(), strict=True))
    fewer = PurifyContext(unlabeled_data=UnlabeledData(pool.x[:32]))  # fewer than the cap: all of them
    assert bcu(ci_run.model, fewer)[1].details.unlabeled_images == 32
    with pytest.raises(ValueError, match="max_images"):
        BCU(max_images=0)


def test_labels_may_be_a_list_or_an_array_and_strings_are_refused_in_one_line():
    x = torch.zeros(4, 3, 8, 8)
    assert torch.equal(LabeledData(x, [0, 1, 2, 3]).y, LabeledData(x, np.arange(4)).y)
    with pytest.raises(ValueError, match="integer class indices .* list of <U1"):
        LabeledData(x, ["a", "b", "c", "d"])


def test_at_most_keeps_small_sets_and_draws_labelled_pairs_at_random():
    data = LabeledData(torch.arange(10.0).view(10, 1, 1, 1), torch.arange(10))
    assert data.at_most(None, torch.Generator()) is data and data.at_most(10, torch.Generator()) is data
    drawn = data.at_most(4, torch.Generator().manual_seed(0))
    assert isinstance(drawn, LabeledData) and len(drawn) == 4 and len(set(drawn.y.tolist())) == 4
    assert torch.equal(drawn.x.flatten().long(), drawn.y)  # each image keeps its label
    assert torch.equal(drawn.y, data.at_most(4, torch.Generator().manual_seed(0)).y)  # seeded
    assert not torch.equal(drawn.y, data.at_most(4, torch.Generator().manual_seed(1)).y)  # a draw, not a prefix
    assert torch.equal(drawn.y, data.at_most(np.int64(4), torch.Generator().manual_seed(0)).y)  # numpy counts too
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="an int >= 1"):
            data.at_most(bad, torch.Generator())


def test_fewer_unlabelled_images_than_a_runs_pool_are_drawn_across_it(ci_run, data_dir):
    """A run stores its pool in training-index order, which is class order: asking for fewer images
    than the pool draws them at random with the seed, never the first ones (one or two classes)."""
    images, labels, _ = _run_subset(ci_run.run_dir, "unlabeled_pool", data_dir)
    count = len(images) // 5
    assert len(set(labels[:count].tolist())) <= 3  # what the first images would have been
    drawn = defender.unlabeled_data(ci_run.run_dir, "cifar10", count=count, data_dir=data_dir)
    idx = defender.draw(len(images), count)
    assert len(drawn) == count and len(set(labels[idx].tolist())) >= 8
    assert torch.equal(drawn.x, defender.model_ready(images[idx], get_spec("cifar10")))
    again = defender.unlabeled_data(ci_run.run_dir, "cifar10", count=count, data_dir=data_dir)
    other = defender.unlabeled_data(ci_run.run_dir, "cifar10", count=count, seed=1, data_dir=data_dir)
    assert torch.equal(again.x, drawn.x) and not torch.equal(other.x, drawn.x)
    assert len(defender.unlabeled_data(ci_run.run_dir, "cifar10", count=10**6, data_dir=data_dir)) == len(images)


def test_bcu_needs_unlabelled_images_of_the_models_size():
    with pytest.raises(ValueError, match="BCU needs unlabelled images"):
        BCU()(nn.Sequential(nn.Conv2d(3, 4, 3)))
    with pytest.raises(ValueError, match="model takes"):
        BCU()(nn.Sequential(nn.Conv2d(3, 4, 3)), PurifyContext(unlabeled_data=UnlabeledData(torch.zeros(2, 3, 8, 8))))


# ------------------------------------------------------------------------------------------- data
def test_data_arguments_accept_tensors_datasets_loaders_and_uint8_arrays():
    x, y = torch.randn(10, 3, 8, 8), torch.arange(10) % 3
    for data in ((x, y), TensorDataset(x, y), DataLoader(TensorDataset(x, y), batch_size=4)):
        d = as_labeled(data)
        assert torch.equal(d.x, x) and torch.equal(d.y, y)
    assert as_unlabeled(DataLoader(TensorDataset(x), batch_size=3)).x.shape == x.shape
    raw = np.full((2, 8, 8, 3), 255, np.uint8)
    assert torch.allclose(as_unlabeled(raw).x, torch.ones(2, 3, 8, 8))


def test_bad_data_is_refused_with_a_reason():
    with pytest.raises(ValueError, match="carry no labels"):
        as_labeled(torch.randn(3, 3, 8, 8))
    with pytest.raises(ValueError, match="NaN"):
        as_unlabeled(torch.full((2, 3, 8, 8), float("nan")))
    with pytest.raises(ValueError, match="one label per image"):
        LabeledData(torch.randn(3, 3, 8, 8), torch.zeros(2))
    with pytest.raises(TypeError, match="cannot use str"):
        as_labeled("images/")


def test_defender_pools_come_from_training_data_of_any_dataset(ci_run, data_dir):
    clean = defender.clean_data(ci_run.run_dir, "cifar10", data_dir=data_dir)
    rnp = defender.clean_data(ci_run.run_dir, "cifar10", rnp=True, data_dir=data_dir)
    assert len(clean) == 250 and len(rnp) == 50
    ood = defender.unlabeled_data(data_dir / "gtsrb32-jpeg.zip", "cifar10", count=64)
    assert ood.x.shape == (64, 3, 32, 32)
    with pytest.raises(ValueError, match="cifar10 images but the model is a gtsrb model"):
        defender.clean_data(ci_run.run_dir, "gtsrb", data_dir=data_dir)


def test_image_pools_never_read_test_folders(tmp_path):
    from PIL import Image

    for split in ("train", "test"):
        (tmp_path / split / "a").mkdir(parents=True)
        Image.new("RGB", (32, 32), (0, 0, 0) if split == "train" else (255, 255, 255)).save(
            tmp_path / split / "a" / "x.png"
        )
    pool = defender.image_pool(tmp_path, 10, 32)
    assert len(pool) == 1 and pool.max() == 0


@pytest.mark.parametrize(
    ("has_clean", "has_unlabeled", "data", "label_weight"),
    [(True, False, "clean", 1.0), (False, True, "unlabeled", 0.0), (True, True, "clean", 1.0)],
)
def test_the_with_data_defaults_are_the_data_free_one_with_its_recovery_on_the_defenders_images(
    has_clean: bool, has_unlabeled: bool, data: str, label_weight: float
) -> None:
    """Labelled (session 18) and unlabelled (session 19) data: the data-free default's defense and
    compression, then its guarded recovery from the suspect on the defender's images (labels at
    weight 1 where there are labels), without feature hints; labelled data wins when both kinds
    are given. All three unlearn the patch the search found (session 21) and the warp the recovery
    finds (session 22; the unlabelled default since session 23, the labelled one since session 28).
    Only how long the trigger search refines its images, how many patch searches it runs, and
    whether it runs the per-image check with a guard on the suspected target after it may differ
    (each default's own grid choice, sessions 20, 26, 27, 28, 30): the labelled default runs the
    data-free one's trigger search but for the patches its per-image check scores with (session 30),
    the unlabelled one session 20's (100 steps, one patch search)."""
    from ccpurify.passes.defaults import DATAFREE_BUDGET, DEFAULTS, default_pipeline

    def defense_and_compression(passes: list) -> list[dict]:
        configs = [p.config() for p in passes[:-1]]
        for option in ("synthesis_steps", "patch_warmups", "early_depth", "early_patch"):
            configs[0]["first"].pop(option)
        return configs

    with_data, datafree = default_pipeline(has_clean, has_unlabeled).passes, default_pipeline().passes
    assert defense_and_compression(with_data) == defense_and_compression(datafree)
    search, datafree_search = with_data[0].first, datafree[0].first
    assert search.synthesis_steps == datafree_search.synthesis_steps == 100
    if has_clean:  # all but how the per-image check scores (session 30's data-free switch)
        assert search.early_patch.value == "counted" and datafree_search.early_patch.value == "all"
        assert {**search.config(), "early_patch": "all"} == datafree_search.config()
    else:
        assert search.patch_warmups == (0.0,) and datafree_search.patch_warmups == (0.0, 0.5)
        assert search.early_depth == 0 and datafree_search.early_depth == 0.5
    assert DEFAULTS["clean" if has_clean else "unlabeled"].macs == next(p for p in with_data if p.name == "prune").macs
    recover, synthetic = with_data[-1], datafree[-1]
    differs = {k for k, v in recover.config().items() if synthetic.config()[k] != v}
    assert synthetic.guard_scope_per_image.value == "target"
    if has_clean:
        assert recover.guard_scope_per_image.value == "target"
        assert differs == {"data", "feature_weight", "hints_from", "hard_label_weight"}
    else:
        assert recover.guard_scope_per_image is None
        assert differs == {"data", "feature_weight", "hints_from", "guard_scope_per_image"}
    assert recover.found_patch_weight == 1 and recover.invariance_warp_weight == 3
    assert recover.invariance_warp_min_lift == 0.3
    assert recover.data.value == data and recover.hard_label_weight == label_weight
    assert recover.invariance_keeps_bn_stats and recover.feature_weight == 0 and recover.hints_from.value == "teacher"
    assert recover.teacher_from.value == "input" and recover.guard and recover.budget == DATAFREE_BUDGET


def test_every_candidate_builds_at_every_macs_target_and_its_recovery_trains_on_its_kind_of_data():
    """Each candidate's options are validated when it is built, not when the grid first runs it, and
    a candidate filed under a kind of defender data distils on that data (synthetic without any)."""
    from ccpurify.passes import Recover
    from ccpurify.passes.defaults import CANDIDATES, MACS_TARGETS, candidate

    for name, (kind, _) in CANDIDATES.items():
        for macs in MACS_TARGETS:
            pipeline = candidate(name, macs)
            assert pipeline.passes, name
            recoveries = [p for p in pipeline.passes if isinstance(p, Recover)]
            if recoveries:
                assert recoveries[-1].data.value == ("synthetic" if kind == "none" else kind), name


def test_the_default_pipeline_takes_a_macs_target_and_refuses_one_outside_0_1():
    from ccpurify.passes.defaults import DEFAULTS, default_pipeline

    prune = next(p for p in default_pipeline(macs=0.75).passes if p.name == "prune")
    assert prune.macs == 0.75
    assert next(p for p in default_pipeline().passes if p.name == "prune").macs == DEFAULTS["none"].macs
    with pytest.raises(ValueError, match="macs"):
        default_pipeline(macs=1.5)


def test_purify_macs_sets_the_default_target_or_a_named_pass_option_and_is_refused_for_a_pipeline():
    from ccpurify import models, purify
    from ccpurify.passes import CLP, Pipeline

    model = models.create("preact_resnet18", width=0.25)
    assert purify(model, "prune", macs=0.75).report.passes[0].config["macs"] == 0.75
    with pytest.raises(ValueError, match="macs= applies"):
        purify(model, Pipeline([CLP()]), macs=0.75)
    with pytest.raises(ValueError, match="'clp' pass takes no MACs target"):
        purify(model, "clp", macs=0.75)
    for bad in ("0.5", 0, 1.5, True):
        with pytest.raises(ValueError, match="a number in"):
            purify(model, macs=bad)


def test_the_data_free_default_prunes_triggers_else_searches_otbr_then_prunes_in_blocks_and_distils_guarded():
    from ccpurify.passes.defaults import (
        DATAFREE_BUDGET,
        DEFAULTS,
        OTBR_RATIOS_UP_TO_005,
        WIDTH_BLOCK,
        default_pipeline,
    )

    defense, prune, recover = default_pipeline().passes
    assert (defense.name, prune.name, recover.name) == ("fallback", "prune", "recover")
    assert defense.first.name == "trigger_prune" and defense.first.trigger_model.value == "both"
    assert defense.first.synthesis_steps == 100  # the patch search finds VGG16-BN's BadNets trigger (session 20)
    assert defense.first.patch_warmups == (0.0, 0.5)  # ... on an AVX2 CPU too (session 26)
    # The per-image patch check (Input-aware), and where it silenced channels a guard on the target only
    assert defense.first.early_depth == 0.5 and recover.guard_scope_per_image.value == "target"
    assert defense.first.early_patch.value == "all"  # scored by every patch search (session 30)
    assert defense.otherwise.compact and defense.otherwise.ratio_search == OTBR_RATIOS_UP_TO_005 == (0.01, 0.02, 0.05)
    assert prune.macs == DEFAULTS["none"].macs and prune.global_pruning and prune.compensate
    assert prune.of_pipeline_input and prune.round_to == WIDTH_BLOCK == 16
    assert recover.data.value == "synthetic" and recover.teacher_from.value == "input" and recover.guard
    assert recover.hints_from.value == "guard" and recover.guard_targets.value == "shared"
    assert recover.feature_weight == 30 and recover.anchor_bn and recover.budget == DATAFREE_BUDGET == 10_240
    assert recover.found_patch_weight == 1  # the patch TriggerPrune found is unlearned (session 21)
    # ... and a warp of a pixel, where it moves 30% more of the images to its class (session 22)
    assert recover.invariance_warp_weight == 3 and recover.invariance_warp_min_lift == 0.3
    assert recover.invariance_weight == 1.0 and recover.invariance_eps == 0.05 and recover.invariance_keeps_bn_stats
    assert recover.guard_revive_classes.value == "agreed"


def test_rnp_never_prunes_a_channel_whose_removal_alone_collapses_the_model():
    """Given a network whose only informative BN channel has the lowest mask, the ranked rule keeps
    that channel (its removal alone takes accuracy to chance) and prunes the harmless ones."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 1, bias=False), nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(3, 2)).eval()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1, 1))
        model[3].weight.copy_(torch.tensor([[-1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]))
        model[3].bias.zero_()
    x = torch.randn(64, 1, 1, 1)
    data = LabeledData(x, (x.flatten() > 0).long())
    masks = {"1": torch.tensor([0.0, 0.1, 0.2])}  # the informative channel ranks lowest
    context = PurifyContext(example_inputs=torch.zeros(1, 1, 1, 1))
    selected, seen = RNP(prune_fraction=0.5, collapse_guard=0.8).guarded_lowest(model, masks, 3, data, context)
    assert selected == {"1": [1, 2]} and seen["kept_alone"] == [["1", 0]] and seen["base_accuracy"] == 1.0
    assert RNP(prune_fraction=0.5, collapse_guard=None).guarded_lowest(model, masks, 3, data, context) == (
        {"1": [0, 1, 2]},
        None,
    )


def test_clean_data_that_is_a_missing_path_or_a_file_other_than_a_zip_is_refused_with_what_it_takes(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such run directory, image folder or zip"):
        defender.clean_data(tmp_path / "missing", "cifar10")
    (tmp_path / "weights.pt").write_bytes(b"\x80\x02not images")
    with pytest.raises(InvalidInputError, match="not a zip; labelled clean data is a run directory"):
        defender.clean_data(tmp_path / "weights.pt", "cifar10")
