"""Data-free defenses (CLP, C&C, OTBR) and Recover, step by step on hand-checkable cases."""

import copy

import pytest
import torch
from archs import CUSTOM, NetWithUnknownLayer, randomize_norms
from torch import nn

from ccpurify import models
from ccpurify.distill import agreement, channel_correspondence
from ccpurify.errors import InvalidInputError
from ccpurify.passes import CLP, OTBR, CleanCompact, LabeledData, Prune, PurifyContext, Recover, UnlabeledData
from ccpurify.passes.cc import Normalization, RankPurification, purify_spectrum
from ccpurify.passes.clp import module_order_pairs, outliers, uclc
from ccpurify.passes.otbr import fuse_layer, select_neurons, target_convs
from ccpurify.synthesis import bn_layers, synthesize_bn_images

X = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(2))


def build(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = models.create(name, width=0.25) if name in models.list_models() else CUSTOM[name]()
    return randomize_norms(model, seed)


# ------------------------------------------------------------------------------------------- CLP
def test_uclc_of_a_known_filter():
    conv = nn.Conv2d(2, 1, 2, bias=False)
    with torch.no_grad():  # filter as a (C_in x kh*kw) matrix: [[3,0,0,0],[0,4,0,0]] -> sigma_max 4
        conv.weight.copy_(torch.tensor([[[[3.0, 0], [0, 0]], [[0, 4.0], [0, 0]]]]))
    bn = nn.BatchNorm2d(1, eps=1.0).eval()
    with torch.no_grad():
        bn.weight.fill_(-2.0)
        bn.running_var.fill_(3.0)  # |gamma| / sqrt(var + eps) = 2 / 2 = 1
    assert uclc(conv, bn).item() == pytest.approx(4.0)
    assert uclc(conv, None).item() == pytest.approx(4.0)


def test_outliers_use_mean_plus_u_unbiased_std():
    scores = torch.tensor([1.0] * 9 + [10.0])
    threshold = scores.mean() + 2 * scores.std(unbiased=True)  # 1.9 + 2 * 2.846
    assert threshold < 10 and outliers(scores, 2.0) == [9] and outliers(scores, 3.0) == []


def _with_planted_outlier(name: str, layer: str, channel: int) -> nn.Module:
    model = build(name)
    with torch.no_grad():
        model.get_submodule(layer).weight[channel] *= 30.0
    return model


def test_clp_compress_equals_faithful_zeroing_on_internal_channels():
    model = _with_planted_outlier("vgg16_bn", "features.7", 5)
    faithful, fr = CLP(mode="faithful")(model)
    compressed, cr = CLP(mode="compress")(model)
    assert 5 in fr.details.layers["features.7"]["flagged"]
    assert cr.details.removed == fr.details.flagged and cr.params_after < cr.params_before
    with torch.no_grad():
        assert (faithful(X) - compressed(X)).abs().max() <= 1e-5


def test_clp_pairs_through_the_graph_not_module_order_on_preact():
    model = build("preact_resnet18")
    reference = dict((bn, conv) for conv, bn in module_order_pairs(model))
    assert reference["layer2.1.bn1"] == "layer2.0.shortcut.0"  # the reference's mis-pairing
    _, report = CLP(mode="faithful")(model)
    assert "layer2.0.shortcut.0" not in report.details.layers  # unpaired: skipped by default
    assert report.details.layers["layer2.0.conv1"]["bn"] == "layer2.0.bn2"
    _, ref_report = CLP(mode="faithful", reference_pairing=True)(model)
    assert ref_report.details.pairing == "module_order" and "layer2.1.bn1" in ref_report.details.layers
    _, conv_only = CLP(mode="faithful", unpaired="conv_only")(model)
    assert conv_only.details.layers["layer2.0.shortcut.0"]["bn"] is None


def test_clp_leaves_layers_it_cannot_edit_alone_and_says_so():
    model = randomize_norms(NetWithUnknownLayer())
    with torch.no_grad():
        model.b.weight[3] *= 50
    out, report = CLP(unpaired="conv_only", u=1.0)(model)
    assert "b" not in report.details.layers and report.details.unsupported == ["scale"]
    # b's outputs feed the unknown layer: never scored or removed (its inputs may shrink with a's)
    assert out.b.out_channels == model.b.out_channels and torch.equal(out.scale.gain, model.scale.gain)
    out(X)


def test_clp_options_are_validated():
    with pytest.raises(ValueError, match="mode='faithful'"):
        CLP(reference_pairing=True)
    with pytest.raises(ValueError):
        CLP(mode="gentle")


# -------------------------------------------------------------------------------------------- C&C
def test_cc_without_purification_at_full_rank_reproduces_the_logits():
    for name in ("preact_resnet18", "vgg_mlp"):
        model = build(name)
        out, report = CleanCompact(purify="none", macs=None, energy=1.0, only_if_cheaper=False)(model)
        assert report.details.factorized > 0
        with torch.no_grad():
            assert (out(X) - model(X)).abs().max() <= 1e-4


def test_spectrum_purification_rules():
    s = torch.tensor([10.0, 6.0, 2.0, 1.0])
    assert purify_spectrum(s, 0.5, Normalization.MAX, RankPurification.CLIP).tolist() == [5.0, 5.0, 2.0, 1.0]
    assert purify_spectrum(s, 0.5, Normalization.MAX, RankPurification.REMOVE).tolist() == [0.0, 0.0, 2.0, 1.0]
    z = (s - s.mean()) / s.std()
    cap = s.mean() + 1.0 * s.std()
    out = purify_spectrum(s, 1.0, Normalization.ZSCORE, RankPurification.CLIP)
    assert out[0] == pytest.approx(cap.item()) and torch.equal(out[z <= 1.0], s[z <= 1.0])
    assert torch.equal(purify_spectrum(s, 0.5, Normalization.MAX, RankPurification.NONE), s)


def test_cc_compacts_to_the_macs_target_and_clips_the_top_ranks():
    model = build("preact_resnet18")
    out, report = CleanCompact(tau=0.8, macs=0.5)(model)
    assert report.macs_ratio <= 0.51 and report.details.sensitive_ranks > 0
    layer = report.details.layers["layer1.0.conv1"]
    assert layer["bn_folded"] == "layer1.0.bn2" and layer["energy_kept"] < 1.0


# ------------------------------------------------------------------------------------------- OTBR
def test_otbr_targets_skip_projection_shortcuts_found_from_the_graph():
    from ccpurify.graph import ChannelGraph

    for name, shortcut in (("preact_resnet18", "layer2.0.shortcut.0"), ("bottleneck_resnet", "body.0.proj.0")):
        model = build(name)
        targets = target_convs(model, ChannelGraph(model, X[:1]), X[:1])
        assert shortcut not in targets
    assert len(targets) == 1 + 3 * 3  # bottleneck: stem + reduce/spatial/expand per block
    preact = build("preact_resnet18")
    assert len(target_convs(preact, ChannelGraph(preact, X[:1]), X[:1])) == 17  # as the reference


def test_otbr_with_lambda_zero_returns_the_original_model():
    model = build("preact_resnet18")
    out, report = OTBR(ratio=0.1, lam=0.0, steps=2, batch_size=16)(model)
    assert report.details.pruned > 0
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), out.state_dict().values()))


def test_uniform_marginals_with_no_pruned_neuron_leave_a_layer_unchanged():
    torch.manual_seed(0)
    w = torch.randn(6, 4, 3, 3)
    fused, plan = fuse_layer(w, w, torch.ones(6), None, lam=0.5, eps=0.0)
    assert torch.allclose(fused, w, atol=1e-6) and torch.allclose(plan, torch.eye(6, dtype=plan.dtype))


def test_each_column_of_the_normalised_plan_sums_to_one():
    torch.manual_seed(0)
    original = torch.randn(8, 5, 3, 3)
    pruned = original.clone()
    pruned[[1, 4]] = 0
    nwc = torch.rand(8, dtype=torch.float64) + 0.1
    fused, plan = fuse_layer(pruned, original, nwc, torch.eye(5, dtype=torch.float64), lam=0.5, eps=1e-8)
    assert torch.allclose(plan.sum(0), torch.ones(8, dtype=plan.dtype))
    assert fused.shape == original.shape and not torch.allclose(fused, original)


def test_a_layer_cap_passes_the_excess_of_a_dominant_layer_to_the_next_neurons_in_the_global_order():

    nwc = {"early": torch.tensor([0.1, 5.0, 0.2, 0.3]), "late": torch.tensor([9.0, 8.0, 7.0, 6.0])}
    order = ["early", "late"]
    assert select_neurons(nwc, order, 0.5) == {"late": [0, 1, 2, 3]}  # the paper: the whole late layer
    assert select_neurons(nwc, order, 0.5, max_layer_ratio=0.5) == {"late": [0, 1], "early": [1, 3]}
    assert select_neurons(nwc, order, 0.5, max_layer_ratio=0.25) == {"late": [0], "early": [1]}  # caps bind first
    with pytest.raises(InvalidInputError, match="max_layer_ratio"):
        OTBR(max_layer_ratio=0.0)


def test_otbr_prunes_without_fusing_the_layers_a_depthwise_conv_reads():
    model = build("mobilenet_v2")
    out, report = OTBR(ratio=0.2, steps=2, batch_size=16)(model)
    d = report.details
    depthwise = {n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups > 1}
    read_by_depthwise = {
        n for n, m in model.named_modules() if n.endswith("conv.0") and n.replace("conv.0", "conv.3") in depthwise
    }
    assert (
        read_by_depthwise
        and read_by_depthwise <= set(d.unfused_layers)
        and not set(d.unfused_layers) & set(d.fused_layers)
    )
    assert d.fused_layers  # the projections, read by dense convs, are still fused
    pruned = [n for n in d.unfused_layers if n in d.pruned_per_layer]
    assert pruned
    for name in pruned:  # pruned: some filters zeroed, the rest as they were
        before, after = model.get_submodule(name).weight, out.get_submodule(name).weight
        zeroed = after.flatten(1).abs().sum(1) == 0
        assert int(zeroed.sum()) == d.pruned_per_layer[name] and torch.equal(after[~zeroed], before[~zeroed])


def test_otbr_is_deterministic_and_keeps_bn_and_classifier():
    model = build("preact_resnet18")
    a, ra = OTBR(ratio=0.05, steps=3, batch_size=32)(model)
    b, _ = OTBR(ratio=0.05, steps=3, batch_size=32)(model)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert torch.equal(a.layer3[0].bn2.running_var, model.layer3[0].bn2.running_var) and torch.equal(
        a.linear.weight, model.linear.weight
    )
    assert ra.details.fused_layers


def test_otbr_compact_removes_neurons_physically():
    model = build("vgg16_bn")  # every conv channel is internal
    out, report = OTBR(ratio=0.05, steps=2, batch_size=32, compact=True)(model)
    assert report.details.removed == report.details.pruned and report.params_after < report.params_before


# ---------------------------------------------------------------------------------------- Recover
def test_recover_raises_a_pruned_models_agreement_with_its_teacher(ci_run, data_dir):
    from ccpurify.data import CIFAR10, Normalize, load_dataset

    teacher = ci_run.model.eval()
    train = load_dataset("cifar10", "train", data_dir)
    norm = Normalize(CIFAR10.mean, CIFAR10.std)
    images = norm(torch.from_numpy(train.images[:3000]).permute(0, 3, 1, 2).float() / 255)
    pool, held_out = images[:2500], images[2500:]
    pruned, _ = Prune(macs=0.4)(teacher)
    before = agreement(pruned, teacher, held_out)
    recovered, report = Recover(teacher=teacher, epochs=3, augment=False)(
        pruned, PurifyContext(unlabeled_data=UnlabeledData(pool))
    )
    assert report.details.data == "unlabeled"
    assert agreement(recovered, teacher, held_out) > before + 0.05


def test_channel_correspondence_names_the_teacher_channel_each_pruned_channel_kept():
    teacher = build("preact_resnet18").eval()
    student, _ = Prune(macs=0.5)(teacher)
    correspondence = channel_correspondence(teacher, student, torch.zeros(1, 3, 32, 32))
    teacher_modules, student_modules = dict(teacher.named_modules()), dict(student.named_modules())
    assert len(correspondence) == sum(isinstance(m, nn.BatchNorm2d) for m in student.modules())
    pruned_somewhere = False
    for name, idx in correspondence.items():
        kept, original = student_modules[name], teacher_modules[name]
        assert torch.equal(kept.weight, original.weight[idx]) and torch.equal(
            kept.running_var, original.running_var[idx]
        )
        pruned_somewhere |= len(idx) < original.num_features
    assert pruned_somewhere
    # no edits between them: equal widths correspond one to one
    same = channel_correspondence(teacher, copy.deepcopy(teacher), torch.zeros(1, 3, 32, 32))
    assert all(torch.equal(idx, torch.arange(len(idx))) for idx in same.values())
    # pruned without recording the edit (Pass.run, not the call): matched on BN parameters instead
    unrecorded = Prune(macs=0.5).run(copy.deepcopy(teacher), PurifyContext()).model
    matched = channel_correspondence(teacher, unrecorded, torch.zeros(1, 3, 32, 32))
    assert {n: i.tolist() for n, i in matched.items()} == {n: i.tolist() for n, i in correspondence.items()}


def test_recover_with_feature_hints_brings_the_students_bn_inputs_closer_to_the_teachers():
    from ccpurify.distill import FeatureHints

    teacher = build("preact_resnet18").eval()
    pruned, _ = Prune(macs=0.5)(teacher)
    images = torch.randn(96, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    context = PurifyContext(unlabeled_data=UnlabeledData(images[:64]))

    def mismatch(student: nn.Module) -> float:
        hints = FeatureHints(teacher, student, channel_correspondence(teacher, student, torch.zeros(1, 3, 32, 32)))
        with torch.no_grad():
            teacher(images[64:]), student.eval()(images[64:])
        loss = float(hints.loss())
        hints.remove()
        return loss

    plain, _ = Recover(teacher=teacher, epochs=5, batch_size=16, augment=False)(pruned, context)
    hinted, report = Recover(teacher=teacher, epochs=5, batch_size=16, augment=False, feature_weight=10.0)(
        pruned, context
    )
    assert report.details.feature_layers == sum(isinstance(m, nn.BatchNorm2d) for m in pruned.modules())
    assert mismatch(hinted) < 0.8 * mismatch(plain)
    assert not any(m._forward_hooks for m in teacher.modules())  # hooks removed after recovery
    with pytest.raises(ValueError, match="feature_weight"):
        Recover(feature_weight=-1.0)


def test_recover_prefers_labelled_data_and_needs_a_teacher():
    model = build("vgg16_bn")
    data = LabeledData(torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,)))
    _, report = Recover(teacher=copy.deepcopy(model), epochs=1)(model, PurifyContext(clean_data=data))
    assert report.details.data == "clean"
    with pytest.raises(ValueError, match="needs a teacher"):
        Recover()(model)


def test_recover_from_self_distils_the_model_it_is_given_not_the_suspect(ci_run, data_dir):
    """teacher_from="self": the teacher is a frozen copy of the pass's own input, so a fine-tune after
    a defense stays with what it was given and never learns from the suspect (the pipeline's input)."""
    from ccpurify.data import CIFAR10, Normalize, load_dataset

    suspect = ci_run.model.eval()
    train = load_dataset("cifar10", "train", data_dir)
    images = Normalize(CIFAR10.mean, CIFAR10.std)(
        torch.from_numpy(train.images[:1500]).permute(0, 3, 1, 2).float() / 255
    )
    pool, held_out = images[:1000], images[1000:]
    given, _ = Prune(macs=0.4)(suspect)

    def recovered(teacher_from: str):
        context = PurifyContext(unlabeled_data=UnlabeledData(pool))
        context.teacher = context.pipeline_input = suspect
        model, report = Recover(teacher_from=teacher_from, epochs=2, augment=False)(given, context)
        assert report.details.teacher == teacher_from
        return model

    with pytest.raises(InvalidInputError, match="names two teachers"):
        Recover(teacher=suspect, teacher_from="self")
    from_self, from_suspect = recovered("self"), recovered("defense")
    assert agreement(from_self, given, held_out) > agreement(from_suspect, given, held_out) + 0.05
    assert agreement(from_self, suspect, held_out) < agreement(from_suspect, suspect, held_out) - 0.05


def test_synthetic_images_match_a_trained_models_bn_statistics(ci_run):
    model = copy.deepcopy(ci_run.model).eval()
    losses = []
    synthesize_bn_images(
        model,
        32,
        (3, 32, 32),
        steps=1,
        generator=torch.Generator().manual_seed(0),
        progress=lambda e: losses.append(e.metrics["bn_loss"]),
    )
    images = synthesize_bn_images(
        model,
        32,
        (3, 32, 32),
        steps=50,
        generator=torch.Generator().manual_seed(0),
        progress=lambda e: losses.append(e.metrics["bn_loss"]),
    )
    assert losses[1] < 0.2 * losses[0]
    with torch.no_grad():
        assert len(model(images).argmax(1).unique()) >= 5  # not collapsed onto one class


def test_bn_recalibration_replaces_running_statistics_by_those_of_the_images():
    from ccpurify.distill import recalibrate_bn

    model = nn.Sequential(nn.Conv2d(3, 4, 1, bias=False), nn.BatchNorm2d(4)).eval()
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(4, 3).reshape(4, 3, 1, 1))
    images = torch.randn(64, 3, 8, 8) * 2 + 5
    recalibrate_bn(model, images, batch_size=16)
    expected_mean = torch.cat([images.mean((0, 2, 3)), torch.zeros(1)])
    assert torch.allclose(model[1].running_mean, expected_mean, atol=1e-5)
    assert model[1].momentum == 0.1 and not model.training  # settings restored


def test_a_pass_whose_training_diverges_raises_and_leaves_its_input_unchanged():
    model = build("vgg16_bn")
    original = copy.deepcopy(model.state_dict())
    data = LabeledData(torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,)))
    with pytest.raises(FloatingPointError, match="pass 'recover' produced NaN or Inf.*lower the pass's learning rate"):
        Recover(teacher=copy.deepcopy(model), epochs=2, lr=1e30)(model, PurifyContext(clean_data=data))
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())


def test_otbr_aligns_a_layer_only_with_the_one_layer_it_reads():
    """PreAct blocks: conv2 reads conv1 alone (aligned); a block's conv1 reads the residual sum of
    the previous block (not aligned: the shortcut was never transported), whatever the channel counts."""
    model = build("preact_resnet18")
    _, report = OTBR(ratio=0.2, steps=2, batch_size=16)(model)
    fused, aligned = report.details.fused_layers, set(report.details.input_aligned_layers)
    reads_a_sum = [n for n in fused if n.endswith(".conv1") and not n.startswith("layer1.0.")]
    reads_conv1 = [n for n in fused if n.endswith(".conv2")]
    assert reads_a_sum and reads_conv1
    assert not aligned & set(reads_a_sum)
    assert set(reads_conv1) <= aligned


def test_otbr_ratio_search_applies_the_largest_ratio_that_keeps_the_suspects_predictions():
    """Given a model, the search tries the ratios largest first on images synthesized from its
    BatchNorm statistics and applies the first whose output agrees with the model on at least
    ``min_agreement`` of them (else the smallest); the result is OTBR at that fixed ratio."""
    model = build("bottleneck_resnet")
    options = {"steps": 2, "batch_size": 16, "compact": True, "search_images": 32}
    ratios = (0.02, 0.1, 0.3)
    _, strict = OTBR(ratio_search=ratios, min_agreement=1.0, **options)(model)
    agree = strict.details.ratio_search["agreement"]
    assert list(agree) == ["0.3", "0.1", "0.02"] and max(agree.values()) < 1.0  # all tried, largest first
    assert strict.details.ratio == 0.02  # none kept every prediction: the smallest
    bar = agree["0.02"]
    expected = next(r for r in (0.3, 0.1, 0.02) if agree[f"{r:g}"] >= bar)
    assert expected != 0.3  # this model: the largest ratio changes too many predictions
    searched, report = OTBR(ratio_search=ratios, min_agreement=bar, **options)(model)
    assert report.details.ratio == expected and report.details.ratio_search["agreement"]["0.3"] < bar
    fixed, _ = OTBR(ratio=expected, **options)(model)
    assert all(torch.equal(a, b) for a, b in zip(searched.state_dict().values(), fixed.state_dict().values()))
    assert "ratio" not in report.config and report.details.choices().startswith(f"ratio {expected:g} (keeps ")
    # a ratio too small to select any neuron would keep every prediction: it is not tried
    _, idle = OTBR(ratio_search=(0.001, 0.3), min_agreement=1.0, **options)(model)
    assert idle.details.ratio == 0.3 and idle.details.ratio_search["prunes_nothing"] == [0.001]
    assert list(idle.details.ratio_search["agreement"]) == ["0.3"]
    assert idle.details.choices().startswith("ratio 0.3 (the smallest: no ratio reached 100%; it keeps ")
    with pytest.raises(InvalidInputError, match="selects no neuron"):  # a search that could only leave the model as is
        OTBR(ratio_search=(0.001,), **options)(model)
    with pytest.raises(InvalidInputError, match="ratio_search"):
        OTBR(ratio_search=(0.0, 0.1))
    for bad in (0.1, ("a",), (True,), ()):
        with pytest.raises(InvalidInputError, match="ratio_search"):
            OTBR(ratio_search=bad)
    for key, bad in (("min_agreement", "0.9"), ("min_agreement", True), ("search_images", 2.5), ("ratio", None)):
        with pytest.raises(InvalidInputError, match=key):  # one line naming the option, not a TypeError
            OTBR(**{key: bad})
    with pytest.raises(InvalidInputError, match="no BatchNorm2d"):
        OTBR(ratio_search=ratios).check(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten()), PurifyContext())


def test_otbr_anchor_bn_moves_only_the_statistics_that_the_repair_changed():
    """Given a model, ``anchor_bn`` re-estimates the repaired model's BatchNorm statistics anchored to
    the suspect's on synthetic images: a BatchNorm before the first pruned layer sees the same input in
    both models and keeps the suspect's statistics exactly; one after it moves; the weights are those
    of OTBR without the option."""
    model = build("preact_resnet18")
    options = {"ratio": 0.2, "steps": 2, "batch_size": 16, "compact": True, "search_images": 32}
    plain, _ = OTBR(**options)(model)
    anchored, report = OTBR(anchor_bn=True, **options)(model)
    assert report.details.bn_anchored == len(bn_layers(anchored))
    first = min(list(dict(model.named_modules())).index(n) for n in report.details.pruned_per_layer)
    order = list(dict(model.named_modules()))
    moved = []
    for (name, bn), (_, before) in zip(bn_layers(anchored), bn_layers(plain)):
        same = bn.running_mean.shape == before.running_mean.shape and torch.allclose(
            bn.running_mean, before.running_mean, atol=1e-5
        )
        if order.index(name) < first:
            assert same, name
        else:
            moved.append(not same)
    assert any(moved)
    weights = {k: v for k, v in plain.state_dict().items() if "running" not in k}
    assert all(torch.equal(v, anchored.state_dict()[k]) for k, v in weights.items())
    with pytest.raises(InvalidInputError, match="anchor_bn"):
        OTBR(anchor_bn=True).check(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten()), PurifyContext())
