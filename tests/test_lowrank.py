"""Low-rank factorization: exact at full rank, correct geometry, analytic MACs, rank rules."""

import pytest
import torch
from torch import nn

from ccpurify import lowrank
from ccpurify.lowrank import Geometry, Method


@pytest.mark.parametrize("stride, padding, dilation, bias", [(1, 1, 1, False), (2, 2, 2, True), (1, 0, 1, True)])
@pytest.mark.parametrize("method", ["svd", "tucker2"])
def test_full_rank_factors_reproduce_the_conv(stride, padding, dilation, bias, method):
    torch.manual_seed(0)
    conv = nn.Conv2d(12, 20, 3, stride, padding, dilation, bias=bias)
    ranks = (20,) if method == "svd" else (20, 12)
    factored = lowrank.factorize(conv, method, ranks)
    x = torch.randn(2, 12, 17, 17)
    assert (factored(x) - conv(x)).abs().max() < 1e-5
    assert factored[0].stride == (1, 1) if method == "tucker2" else factored[0].stride == conv.stride


def test_linear_factors_reproduce_the_layer():
    torch.manual_seed(0)
    lin = nn.Linear(30, 12)
    x = torch.randn(5, 30)
    assert (lowrank.factorize(lin, "svd", 12)(x) - lin(x)).abs().max() < 1e-5


def test_truncated_svd_is_the_best_rank_r_approximation():
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 16, 3, padding=1, bias=False)
    f = lowrank.factorize(conv, "svd", 4)
    w_hat = (f[1].weight.reshape(16, 4) @ f[0].weight.reshape(4, -1)).reshape_as(conv.weight)
    s = lowrank.spectrum(conv)
    err = (w_hat - conv.weight).detach().double().norm().item()
    assert err == pytest.approx(s[4:].norm().item(), rel=1e-5)  # Eckart-Young


def test_bn_folding_scales_the_rows_of_the_spectrum():
    conv = nn.Conv2d(4, 3, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.eye(3, 4).reshape(3, 4, 1, 1))
    bn = nn.BatchNorm2d(3).eval()
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([2.0, -3.0, 0.5]))
        bn.running_var.fill_(4.0 - bn.eps)
    assert lowrank.spectrum(conv).tolist() == pytest.approx([1, 1, 1])
    assert lowrank.spectrum(conv, bn).tolist() == pytest.approx([1.5, 1.0, 0.25])


def test_row_scale_is_folded_in_and_out_again():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 6, 3, padding=1)
    f = lowrank.svd_factorize(conv, 6, row_scale=torch.rand(6) + 0.1)
    x = torch.randn(1, 8, 9, 9)
    assert (f(x) - conv(x)).abs().max() < 1e-5


def test_geometry_macs_formulas():
    g = Geometry(c_in=16, c_out=32, kernel=(3, 3), in_hw=(16, 16), out_hw=(8, 8))
    assert g.dense_macs == 8 * 8 * 32 * 16 * 9
    assert g.svd_macs(4) == 8 * 8 * 4 * (16 * 9 + 32)
    assert g.tucker2_macs(8, 4) == 16 * 16 * 16 * 4 + 8 * 8 * (4 * 8 * 9 + 8 * 32)


def test_geometries_match_a_forward_pass():
    net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.Flatten(), nn.Linear(8 * 16 * 16, 5))
    geo = lowrank.layer_geometries(net, torch.zeros(1, 3, 32, 32))
    assert geo["0"].in_hw == (32, 32) and geo["0"].out_hw == (16, 16) and geo["2"].dense_macs == 8 * 16 * 16 * 5


def test_a_layer_called_twice_costs_its_macs_twice():
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(8, 8, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(torch.relu(self.conv(x)))

    geo = lowrank.layer_geometries(Twice(), torch.zeros(1, 8, 6, 6))["conv"]
    assert geo.calls == 2 and geo.dense_macs == 2 * 6 * 6 * 8 * 8 * 9
    assert geo.svd_macs(2) == 2 * Geometry(8, 8, (3, 3), (6, 6), (6, 6)).svd_macs(2)


def test_rank_rules():
    s = torch.tensor([4.0, 2.0, 1.0, 1.0])  # energies 16, 4, 1, 1 of 22
    assert lowrank.rank_for_energy(s, 16 / 22) == 1
    assert lowrank.rank_for_energy(s, 0.95) == 3 and lowrank.rank_for_energy(s, 1.0) == 4
    g = Geometry(64, 64, (3, 3), (8, 8), (8, 8))
    (r,) = lowrank.ranks_for_macs(g, 0.5, Method.SVD)
    assert g.svd_macs(r) <= 0.5 * g.dense_macs < g.svd_macs(r + 1)
    ro, ri = lowrank.ranks_for_macs(g, 0.3, Method.TUCKER2)
    assert g.tucker2_macs(ro, ri) <= 0.3 * g.dense_macs
    assert not lowrank.saves_macs(g, Method.SVD, (64,))  # full rank costs more than dense


def test_grouped_convs_are_refused():
    with pytest.raises(TypeError, match="groups=1"):
        lowrank.factorize(nn.Conv2d(8, 8, 3, groups=2), "svd", 2)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 10),
    ).eval()


def test_a_second_factorize_leaves_the_factors_of_the_first_alone():
    import ccpurify

    once = ccpurify.purify(_net(), "factorize", macs=0.6, num_classes=10).model
    factor_names = {n for n, m in once.named_modules() if isinstance(m, lowrank.LowRank)}
    assert factor_names
    twice = ccpurify.purify(once, "factorize", macs=0.9, num_classes=10)
    refactored = [e["layer"] for e in twice.report.passes[0].details.factorized]
    assert not any(name.startswith(tuple(f + "." for f in factor_names)) for name in refactored)
    assert not any(
        isinstance(m, lowrank.LowRank) for f in factor_names for m in twice.model.get_submodule(f).children()
    )


def test_an_unreachable_macs_target_is_reported_not_hidden():
    import ccpurify

    # The stem and the classifier stay dense, so 1% of the MACs cannot be reached.
    result = ccpurify.purify(_net(), "factorize", macs=0.01, num_classes=10)
    details = result.report.passes[0].details
    assert details.reached is False and details.target_reached() is False
    assert result.report.macs_after > 0.01 * result.report.macs_before
    assert ccpurify.purify(_net(), "factorize", macs=0.6, num_classes=10).report.passes[0].details.reached is True
