"""Low-rank factorization of Conv2d (groups = 1, any stride/padding/dilation) and Linear layers.

Two forms (docs/reference/ecosystem.md §2.2):

- **SVD** (two factors): ``W (C_out x C_in*kh*kw) = U diag(s) V^T`` truncated to rank r becomes a
  ``kh x kw`` conv ``C_in -> r`` with weight ``sqrt(s) V^T`` (the original stride, padding and
  dilation) followed by a 1x1 conv ``r -> C_out`` with weight ``U sqrt(s)`` carrying the bias.
  Linear layers become two Linears.
- **Tucker-2** (tensorly ``partial_tucker`` on modes 0 and 1): 1x1 ``C_in -> R_in``, then
  ``kh x kw`` ``R_in -> R_out`` (the core, original geometry), then 1x1 ``R_out -> C_out`` + bias.

A singular-value ``transform`` (used by C&C to clip trigger-sensitive ranks) and a per-row scale
(BN folding: the spectrum of ``diag(gamma / sqrt(var + eps)) W``, unfolded again in the second
factor) hook into the SVD form. Ranks come from an explicit value, an energy fraction or a MACs
budget; a layer whose factorized form would not cost fewer MACs is left alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

import torch
from torch import nn

from ccpurify.errors import InvalidInputError, InvalidTypeError
from ccpurify.recipe import register_edit


class Method(str, Enum):
    SVD = "svd"
    TUCKER2 = "tucker2"


class LowRank(nn.Sequential):
    """A factorized layer: an ``nn.Sequential`` of plain convs/linears (exportable and prunable)."""

    def __init__(self, *layers: nn.Module, method: Method, ranks: tuple[int, ...]) -> None:
        super().__init__(*layers)
        self.method = Method(method)
        self.ranks = tuple(int(r) for r in ranks)

    def extra_repr(self) -> str:
        return f"method={self.method.value}, ranks={self.ranks}"


def is_factorizable(layer: nn.Module) -> bool:
    return isinstance(layer, nn.Linear) or (
        isinstance(layer, nn.Conv2d) and layer.groups == 1 and layer.padding_mode == "zeros"
    )


def matricize(layer: nn.Module) -> torch.Tensor:
    """The weight as a (C_out, C_in * kh * kw) float64 matrix."""
    w = layer.weight.detach().to(torch.float64)
    return w.reshape(w.shape[0], -1)


def bn_scale(bn: nn.modules.batchnorm._BatchNorm) -> torch.Tensor:
    """Per-channel gain ``|gamma| / sqrt(running_var + eps)`` of a BatchNorm in eval mode."""
    gamma = bn.weight.detach() if bn.weight is not None else torch.ones_like(bn.running_var)
    return (gamma.abs() / torch.sqrt(bn.running_var + bn.eps)).to(torch.float64)


def spectrum(layer: nn.Module, bn: nn.Module | None = None) -> torch.Tensor:
    """Singular values (descending) of the matricized weight, BN gain folded into rows if given."""
    w = matricize(layer)
    if bn is not None:
        w = bn_scale(bn)[:, None] * w
    return torch.linalg.svdvals(w)


# --------------------------------------------------------------------------------------- geometry
@dataclass(frozen=True)
class Geometry:
    """Shapes that decide a layer's MACs: channels, kernel, input/output spatial sizes, and how many
    times one forward pass calls the layer (a module reused in a loop costs its MACs each time)."""

    c_in: int
    c_out: int
    kernel: tuple[int, int]
    in_hw: tuple[int, int]
    out_hw: tuple[int, int]
    calls: int = 1

    @property
    def k(self) -> int:
        return self.kernel[0] * self.kernel[1]

    @property
    def dense_macs(self) -> int:
        return self.calls * self.out_hw[0] * self.out_hw[1] * self.c_out * self.c_in * self.k

    def svd_macs(self, rank: int) -> int:
        return self.calls * self.out_hw[0] * self.out_hw[1] * rank * (self.c_in * self.k + self.c_out)

    def tucker2_macs(self, r_out: int, r_in: int) -> int:
        return self.calls * (
            self.in_hw[0] * self.in_hw[1] * self.c_in * r_in
            + self.out_hw[0] * self.out_hw[1] * (r_in * r_out * self.k + r_out * self.c_out)
        )

    def macs(self, method: Method, ranks: tuple[int, ...]) -> int:
        return self.svd_macs(ranks[0]) if Method(method) is Method.SVD else self.tucker2_macs(*ranks)

    @property
    def full_rank(self) -> int:
        return min(self.c_out, self.c_in * self.k)


def layer_geometries(model: nn.Module, example_inputs: torch.Tensor) -> dict[str, Geometry]:
    """Geometry of every conv/linear layer, from one forward pass on ``example_inputs`` (shapes of
    the first call; ``calls`` counts them all)."""
    shapes: dict[nn.Module, tuple] = {}
    calls: dict[nn.Module, int] = {}

    def record(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        shapes.setdefault(module, (tuple(inputs[0].shape), tuple(output.shape)))
        calls[module] = calls.get(module, 0) + 1

    hooks = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example_inputs[:1])
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    out = {}
    for name, m in model.named_modules():
        if m not in shapes:
            continue
        (in_shape, out_shape) = shapes[m]
        if isinstance(m, nn.Conv2d):
            out[name] = Geometry(
                m.in_channels // m.groups, m.out_channels, tuple(m.kernel_size), in_shape[2:4], out_shape[2:4], calls[m]
            )
        else:
            positions = math.prod(in_shape[1:-1]) if len(in_shape) > 2 else 1
            out[name] = Geometry(m.in_features, m.out_features, (1, 1), (positions, 1), (positions, 1), calls[m])
    return out


# ------------------------------------------------------------------------------------------ ranks
def rank_for_energy(singular_values: torch.Tensor, energy: float) -> int:
    """Smallest r whose top singular values keep ``energy`` of the squared spectrum."""
    if not 0.0 < energy <= 1.0:
        raise InvalidInputError(f"energy must be in (0, 1], got {energy}")
    e = singular_values.to(torch.float64) ** 2
    cum = torch.cumsum(e, 0) / e.sum().clamp_min(1e-300)
    return int(min(len(e), int(torch.searchsorted(cum, torch.tensor(energy, dtype=cum.dtype) - 1e-12)) + 1))


def tucker2_ranks(geometry: Geometry, fraction: float) -> tuple[int, int]:
    """(R_out, R_in) as the same fraction of each channel count (HALOC-style equal scaling)."""
    return max(1, round(fraction * geometry.c_out)), max(1, round(fraction * geometry.c_in))


def ranks_for_macs(geometry: Geometry, fraction: float, method: Method) -> tuple[int, ...]:
    """Largest ranks whose factorized MACs are at most ``fraction`` of the layer's dense MACs."""
    budget = fraction * geometry.dense_macs
    if Method(method) is Method.SVD:
        per_rank = geometry.out_hw[0] * geometry.out_hw[1] * (geometry.c_in * geometry.k + geometry.c_out)
        return (max(1, min(geometry.full_rank, int(budget // per_rank))),)
    lo, hi = 1e-4, 1.0
    for _ in range(40):  # Tucker-2 MACs grow monotonically with the shared fraction
        mid = (lo + hi) / 2
        if geometry.tucker2_macs(*tucker2_ranks(geometry, mid)) <= budget:
            lo = mid
        else:
            hi = mid
    return tucker2_ranks(geometry, lo)


def saves_macs(geometry: Geometry, method: Method, ranks: tuple[int, ...]) -> bool:
    return geometry.macs(method, ranks) < geometry.dense_macs


# ------------------------------------------------------------------------------------ factorizing
def svd_factorize(
    layer: nn.Module,
    rank: int,
    row_scale: torch.Tensor | None = None,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> LowRank:
    """Two-factor SVD form of ``layer`` at ``rank``.

    ``row_scale`` (C_out,) folds a per-output gain in before the SVD and out again after it;
    ``transform`` maps the full singular-value vector (descending) before truncation.
    """
    if not is_factorizable(layer):
        raise InvalidTypeError(f"cannot factorize {type(layer).__name__} (need Linear or Conv2d with groups=1)")
    w = matricize(layer)
    if row_scale is not None:
        row_scale = row_scale.to(torch.float64).clamp_min(1e-12)
        w = row_scale[:, None] * w
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    if transform is not None:
        s = transform(s.clone())
    rank = max(1, min(int(rank), len(s)))
    root = s[:rank].clamp_min(0).sqrt()
    first = root[:, None] * vh[:rank]  # (r, C_in*k*k)
    second = u[:, :rank] * root[None, :]  # (C_out, r)
    if row_scale is not None:
        second = second / row_scale[:, None]
    dtype = layer.weight.dtype
    bias = layer.bias is not None
    first, second = first.contiguous(), second.contiguous()  # views would compute differently once saved
    if isinstance(layer, nn.Linear):
        a, b = nn.Linear(layer.in_features, rank, bias=False), nn.Linear(rank, layer.out_features, bias=bias)
        a.weight.data = first.to(dtype)
        b.weight.data = second.to(dtype)
    else:
        a = nn.Conv2d(
            layer.in_channels, rank, layer.kernel_size, layer.stride, layer.padding, layer.dilation, bias=False
        )
        b = nn.Conv2d(rank, layer.out_channels, 1, bias=bias)
        a.weight.data = first.reshape(rank, *layer.weight.shape[1:]).to(dtype)
        b.weight.data = second.reshape(layer.out_channels, rank, 1, 1).to(dtype)
    if bias:
        b.bias.data = layer.bias.detach().clone()
    return LowRank(a, b, method=Method.SVD, ranks=(rank,)).to(layer.weight.device)


def tucker2_factorize(conv: nn.Conv2d, ranks: tuple[int, int]) -> LowRank:
    """Tucker-2 form (1x1, kxk core, 1x1) of a Conv2d at ranks (R_out, R_in), through tensorly."""
    import tensorly as tl
    from tensorly.decomposition import partial_tucker

    if not (isinstance(conv, nn.Conv2d) and conv.groups == 1):
        raise InvalidTypeError("Tucker-2 needs a Conv2d with groups=1")
    r_out, r_in = min(int(ranks[0]), conv.out_channels), min(int(ranks[1]), conv.in_channels)
    previous = tl.get_backend()
    tl.set_backend("pytorch")
    try:
        weight = conv.weight.detach().to(torch.float64)
        (core, (u_out, u_in)), _ = partial_tucker(
            weight, rank=[r_out, r_in], modes=[0, 1], init="svd", n_iter_max=10, tol=1e-6
        )
    finally:
        tl.set_backend(previous)
    dtype = conv.weight.dtype
    first = nn.Conv2d(conv.in_channels, r_in, 1, bias=False)
    middle = nn.Conv2d(r_in, r_out, conv.kernel_size, conv.stride, conv.padding, conv.dilation, bias=False)
    last = nn.Conv2d(r_out, conv.out_channels, 1, bias=conv.bias is not None)
    first.weight.data = u_in.t().reshape(r_in, conv.in_channels, 1, 1).to(dtype).contiguous()
    middle.weight.data = core.to(dtype).contiguous()
    last.weight.data = u_out.reshape(conv.out_channels, r_out, 1, 1).to(dtype).contiguous()
    if conv.bias is not None:
        last.bias.data = conv.bias.detach().clone()
    return LowRank(first, middle, last, method=Method.TUCKER2, ranks=(r_out, r_in)).to(conv.weight.device)


def factorize(layer: nn.Module, method: Method | str, ranks: int | tuple[int, ...]) -> LowRank:
    method = Method(method)
    ranks = (ranks,) if isinstance(ranks, int) else tuple(ranks)
    if method is Method.SVD:
        return svd_factorize(layer, ranks[0])
    return tucker2_factorize(layer, ranks)  # type: ignore[arg-type]


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where submodule ``name`` is."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


@register_edit("factorize")
def _replay_factorize(model: nn.Module, edit: dict, example_inputs: torch.Tensor) -> nn.Module:
    for entry in edit["layers"]:
        layer = model.get_submodule(entry["layer"])
        ranks = tuple(entry["ranks"])
        caps = matricize(layer).shape if Method(entry["method"]) is Method.TUCKER2 else (min(matricize(layer).shape),)
        if not all(isinstance(r, int) and 1 <= r <= c for r, c in zip(ranks, caps, strict=False)) or len(ranks) != len(
            caps
        ):
            raise InvalidInputError(
                f"factorize edit for {entry['layer']!r}: ranks {list(ranks)[:4]} do not fit a layer of full rank {caps}"
            )
        replace_module(model, entry["layer"], _structure_only(layer, Method(entry["method"]), ranks))
    return model


def _structure_only(layer: nn.Module, method: Method, ranks: tuple[int, ...]) -> LowRank:
    """Factorized modules of the right shapes without decomposing (weights are loaded afterwards)."""
    bias = layer.bias is not None
    if isinstance(layer, nn.Linear):
        r = ranks[0]
        return LowRank(
            nn.Linear(layer.in_features, r, bias=False),
            nn.Linear(r, layer.out_features, bias=bias),
            method=method,
            ranks=ranks,
        )
    if method is Method.SVD:
        r = ranks[0]
        return LowRank(
            nn.Conv2d(layer.in_channels, r, layer.kernel_size, layer.stride, layer.padding, layer.dilation, bias=False),
            nn.Conv2d(r, layer.out_channels, 1, bias=bias),
            method=method,
            ranks=ranks,
        )
    r_out, r_in = ranks
    return LowRank(
        nn.Conv2d(layer.in_channels, r_in, 1, bias=False),
        nn.Conv2d(r_in, r_out, layer.kernel_size, layer.stride, layer.padding, layer.dilation, bias=False),
        nn.Conv2d(r_out, layer.out_channels, 1, bias=bias),
        method=method,
        ranks=ranks,
    )
