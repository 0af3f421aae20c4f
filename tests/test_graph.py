"""The channel graph: conv/BN pairing from the graph, coupling classes, exact physical removal."""

import copy

import pytest
import torch
from archs import CUSTOM, NetWithUnknownLayer, randomize_norms

from ccpurify import models
from ccpurify.graph import ChannelGraph, Coupling

X = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
EXAMPLE = torch.zeros(1, 3, 32, 32)


def build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = CUSTOM[name]() if name in CUSTOM else models.create(name, width=0.25)
    return randomize_norms(model)


ALL = models.list_models() + sorted(CUSTOM)


def test_preact_pairs_each_block_conv1_with_its_bn2_never_by_module_order():
    graph = ChannelGraph(build("preact_resnet18"), EXAMPLE)
    pairs = dict(graph.conv_bn_pairs())
    blocks = [f"layer{s}.{b}" for s in range(1, 5) for b in range(2)]
    assert pairs == {"conv1": "layer1.0.bn1", **{f"{b}.conv1": f"{b}.bn2" for b in blocks}}
    # Module order would pair layer2.1.bn1 with layer2.0.shortcut.0 and layerX.0.bn1 with conv2s:
    # those convs write into a residual sum, so no BN normalises exactly their output.
    assert graph.bn_of("layer2.0.shortcut.0") is None and graph.bn_of("layer1.1.conv2") is None


def test_post_activation_resnet_pairs_every_conv_including_shortcuts():
    graph = ChannelGraph(build("resnet18"), EXAMPLE)
    assert graph.bn_of("layer2.0.shortcut.0") == "layer2.0.shortcut.1"
    assert graph.bn_of("layer3.1.conv2") == "layer3.1.bn2" and len(graph.conv_bn_pairs()) == 20


def test_coupling_classes_on_preact_resnet18():
    graph = ChannelGraph(build("preact_resnet18"), EXAMPLE)
    assert graph.layers["layer1.0.conv1"].coupling is Coupling.INTERNAL
    stage1 = graph.layers["layer1.0.conv2"]
    assert stage1.coupling is Coupling.RESIDUAL and set(stage1.group) == {"conv1", "layer1.0.conv2", "layer1.1.conv2"}
    assert set(graph.layers["layer3.0.shortcut.0"].group) == {"layer3.0.conv2", "layer3.0.shortcut.0", "layer3.1.conv2"}
    assert graph.layers["linear"].coupling is Coupling.OUTPUT


def test_coupling_classes_on_custom_archs():
    g = ChannelGraph(build("concat_depthwise"), EXAMPLE)
    assert g.layers["point.0"].coupling is Coupling.DEPTHWISE
    assert g.layers["side.0"].coupling is Coupling.CONCAT
    assert g.layers["grouped.0"].coupling is Coupling.BLOCKED
    assert [u.name for u in g.unsupported] == ["grouped.0"]
    g = ChannelGraph(build("vgg_mlp"), EXAMPLE)
    assert g.layers["mlp.1"].coupling is Coupling.INTERNAL and g.layers["mlp.5"].coupling is Coupling.OUTPUT
    g = ChannelGraph(build("bottleneck_resnet"), EXAMPLE)
    assert g.layers["body.0.spatial"].coupling is Coupling.INTERNAL
    assert g.layers["body.0.expand"].coupling is Coupling.RESIDUAL


@pytest.mark.parametrize("name", ALL)
def test_removing_internal_channels_equals_zeroing_their_bn(name):
    model = build(name)
    graph = ChannelGraph(model, EXAMPLE)
    internal = {n: info for n, info in graph.layers.items() if info.coupling in (Coupling.INTERNAL, Coupling.CONCAT)}
    assert internal, name
    selection = {n: list(range(0, info.out_channels, 3)) for n, info in internal.items()}
    zeroed = copy.deepcopy(model)
    zgraph = ChannelGraph(zeroed, EXAMPLE)
    for n, idxs in selection.items():
        zgraph.zero_channels(n, idxs)
    report = graph.remove_channels(selection, policy="group")
    assert report.removed == sum(len(v) for v in selection.values()) and report.zeroed == 0
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in zeroed.parameters())
    with torch.no_grad():
        assert (model(X) - zeroed(X)).abs().max() <= 1e-5


def test_zeroing_at_the_filter_leaves_the_bn_and_silences_every_reader():
    model = build("preact_resnet18")
    graph = ChannelGraph(model, EXAMPLE)
    bn = graph.module(graph.layers["layer1.0.conv1"].bn)
    before = bn.weight.detach().clone()
    graph.zero_channels("layer1.0.conv1", [0, 2], at_filter=True)
    assert torch.equal(bn.weight, before)  # the BN is untouched ...
    assert model.layer1[0].conv1.weight[[0, 2]].abs().sum() == 0  # ... the filters are zero
    assert model.layer1[0].conv1.weight[1].abs().sum() > 0

    # A pre-activation stem's output is the first block's input, which the block's BN and its
    # identity shortcut both read: zeroing the stem's filters zeroes that input channel for both
    # (zeroing the block's BN would silence only the first).
    seen = {}
    model.layer1[0].register_forward_pre_hook(lambda module, args: seen.update(block_input=args[0]))
    graph.zero_channels("conv1", [3], at_filter=True)
    with torch.no_grad():
        out = model(X)
    assert torch.isfinite(out).all()
    assert seen["block_input"][:, 3].abs().max() == 0 and seen["block_input"][:, 4].abs().max() > 0


def test_residual_channels_follow_the_policy():
    base = build("preact_resnet18")
    writers = ["conv1", "layer1.0.conv2", "layer1.1.conv2"]
    width = base.conv1.out_channels

    g = ChannelGraph(copy.deepcopy(base), EXAMPLE)
    r = g.remove_channels({"layer1.0.conv2": [2]}, policy="group")  # one writer only: zeroed, kept
    assert r.removed == 0 and r.zeroed == 1 and g.model.conv1.out_channels == width
    assert g.model.layer1[0].conv2.weight[2].abs().sum() == 0

    g = ChannelGraph(copy.deepcopy(base), EXAMPLE)
    r = g.remove_channels({w: [2, 5] for w in writers}, policy="group")  # every writer: removed once
    assert g.model.conv1.out_channels == width - 2 and g.model.layer2[0].conv1.in_channels == width - 2
    assert len(r.history) == 1

    g = ChannelGraph(copy.deepcopy(base), EXAMPLE)
    g.remove_channels({"layer1.0.conv2": [7], "layer1.1.conv2": [9]}, policy="hard")
    assert g.model.conv1.out_channels == width - 2
    original = base.layer1[0].conv2.weight  # the surviving filters are the original ones minus 7 and 9
    keep = [i for i in range(width) if i not in (7, 9)]
    assert torch.equal(g.model.layer1[0].conv2.weight, original[keep])  # its inputs are the block's own channels

    g = ChannelGraph(copy.deepcopy(base), EXAMPLE)
    r = g.remove_channels({w: [1] for w in writers}, policy="soft")
    assert r.removed == 0 and r.zeroed == 3 and g.model.layer1[0].bn1.weight[1] == 0  # conv1's BN zeroed


def test_depthwise_chain_is_removed_as_a_whole_under_group_policy():
    model = build("concat_depthwise")
    g = ChannelGraph(model, EXAMPLE)
    r = g.remove_channels({"point.0": [0, 1], "depth.0": [0, 1]}, policy="group")
    assert r.removed == 4 and model.depth[0].groups == 22 and model.fuse[0].in_channels == 50
    model(X)


def test_unknown_layers_are_reported_and_left_untouched():
    model = randomize_norms(NetWithUnknownLayer())
    g = ChannelGraph(model, EXAMPLE)
    assert ("scale", "Scale") in [(u.name, u.type) for u in g.unsupported]
    assert g.layers["b"].coupling is Coupling.BLOCKED
    before = model(X)
    r = g.remove_channels({"b": [0, 1]})
    assert r.changes[0].skipped == [0, 1] and "unwrapped parameter" in r.changes[0].reason
    assert torch.equal(model(X), before)
    r = g.remove_channels({"a.0": [0]})  # not coupled to the unknown layer: removed
    assert r.removed == 1 and model.b.in_channels == 7


def test_out_of_range_and_unknown_layers_are_errors():
    g = ChannelGraph(build("vgg_mlp"), EXAMPLE)
    with pytest.raises(IndexError, match="16 output channels"):
        g.remove_channels({"features.0": [16]})
    with pytest.raises(KeyError, match="not a conv/linear layer"):
        g.remove_channels({"features.1": [0]})


def test_removing_every_channel_is_refused():
    g = ChannelGraph(build("vgg_mlp"), EXAMPLE)
    r = g.remove_channels({"features.0": list(range(16))})
    assert r.removed == 0 and r.changes[0].skipped and "no channels" in r.changes[0].reason
