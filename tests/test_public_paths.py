"""Public paths that no other test walks: a failed parity check, Tucker-2 and energy targets through
``Factorize`` (and their replay when loading), C&C with recovery, element-wise coupling, a graph
edit the model cannot take, ``purify`` with a list, and ``evaluation.compare``."""

import numpy as np
import pytest
import torch
from torch import nn

import ccpurify
from ccpurify import models
from ccpurify.graph import ChannelGraph, Coupling, GraphEditError
from ccpurify.lowrank import LowRank
from ccpurify.passes import CLP, CleanCompact, Factorize, Pipeline, Prune
from exporters.onnx import ExportError, export

EXAMPLE = torch.zeros(1, 3, 32, 32)


def zoo(name: str = "preact_resnet18") -> nn.Module:
    torch.manual_seed(0)
    return models.create(name, width=0.125).eval()


def test_an_export_whose_runtime_disagrees_with_pytorch_is_refused_and_writes_nothing(tmp_path):
    with pytest.raises(ExportError, match="onnxruntime and PyTorch disagree"):
        export(zoo(), tmp_path / "m.onnx", EXAMPLE, tolerance=0.0)  # float kernels never agree to the last bit
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("options", [{"method": "tucker2", "macs": 0.5}, {"energy": 0.8}], ids=["tucker2", "energy"])
def test_factorize_variants_shrink_the_model_and_replay_when_loaded(options, tmp_path):
    model = zoo()
    factored, report = Factorize(**options)(model)
    assert report.macs_after < report.macs_before
    layers = [m for m in factored.modules() if isinstance(m, LowRank)]
    assert layers and any(m.method.value == options.get("method", "svd") for m in layers)  # linear layers stay SVD
    restored = ccpurify.load_model(ccpurify.save_model(factored, tmp_path / "f.safetensors"))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(restored(x), factored(x), atol=1e-5)


def test_cc_with_recovery_distills_the_low_rank_model_on_made_up_images():
    model = zoo()
    plain, plain_report = CleanCompact()(model)
    recovered, report = CleanCompact(
        recover=True, recover_options={"synthetic_images": 32, "synthetic_steps": 2, "epochs": 1}
    )(model)
    assert report.macs_after == plain_report.macs_after  # the same compression
    assert report.details.recover.distill.images == 32 and report.details.training().images == 32
    changed = [k for k, v in recovered.state_dict().items() if not torch.equal(v, plain.state_dict()[k])]
    assert changed  # recovery trained the factors


class Gated(nn.Module):
    """Two branches multiplied channel by channel: their channels must be removed together."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(self.a(x) * torch.sigmoid(self.b(x))).mean((2, 3))


def test_channels_multiplied_together_are_classified_as_element_wise_coupled():
    graph = ChannelGraph(Gated(), EXAMPLE)
    assert graph.layers["a"].coupling is Coupling.ELEMENTWISE and set(graph.layers["a"].group) == {"a", "b"}


class FixedReshape(nn.Module):
    """A forward that hard-codes the channel count (a reshape to 8 groups of 2 channels)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        y = self.conv(x).mean((2, 3))
        return self.head(y.reshape(y.shape[0], 8, 2).sum(2))


def test_an_edit_the_model_cannot_take_is_a_graph_edit_error():
    graph = ChannelGraph(FixedReshape(), EXAMPLE)
    with pytest.raises(GraphEditError):
        graph.remove_channels({"conv": [0, 1, 2]})


def test_purify_runs_every_pass_of_a_list_including_the_passes_of_a_pipeline():
    result = ccpurify.purify(zoo(), [Pipeline([CLP(), Prune(macs=0.7)]), "factorize"], example_inputs=EXAMPLE)
    assert [p.name for p in result.report.passes] == ["clp", "prune", "factorize"]
    assert result.report.pipeline == "clp -> prune -> factorize"


def test_compare_reports_der_and_cost_ratios():
    from ccpurify.data import CIFAR10
    from ccpurify.evaluation import TestBench, compare

    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8), rng.integers(1, 10, 64)
    bench = TestBench(CIFAR10, images, labels, images, labels, 0)
    model = zoo()
    smaller, _ = Prune(macs=0.5)(model)
    before, after = bench.score(model), bench.score(smaller)
    out = compare(before, after)
    assert out["macs_ratio"] == pytest.approx(after.cost.macs / before.cost.macs) and out["macs_ratio"] < 0.6
    assert out["der"] == pytest.approx(
        (max(0.0, before.metrics.asr - after.metrics.asr) - max(0.0, before.metrics.ca - after.metrics.ca) + 1) / 2
    )
