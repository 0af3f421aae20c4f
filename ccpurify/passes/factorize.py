"""Low-rank factorization of a model's conv and hidden linear layers to a rank, energy or MACs target.

Targets (one of):
- ``rank``: the same rank for every eligible layer (capped at full rank);
- ``energy``: per layer, the smallest rank keeping that fraction of the squared spectrum;
- ``macs``: a whole-model MACs fraction. ``allocation="uniform"`` gives every eligible layer the
  same fraction of its own MACs; ``allocation="energy"`` uses one global energy threshold. Either is
  found by bisection on the analytic MACs (docs/reference/cc_otbr.md C.3 step 6).

Layers are skipped when factorizing would not reduce their MACs, and by default the stem (3 input
channels: tiny and accuracy-critical) and the output layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import Enum

from torch import nn

from ccpurify import lowrank
from ccpurify.errors import InvalidInputError
from ccpurify.graph import ChannelGraph, Coupling
from ccpurify.lowrank import Geometry, Method
from ccpurify.passes.base import Pass, PassDetails, PassResult, PurifyContext
from ccpurify.passes.options import Count
from ccpurify.passes.registry import register_pass
from ccpurify.progress import report


class Allocation(str, Enum):
    UNIFORM = "uniform"
    ENERGY = "energy"


@dataclass(frozen=True)
class RankPlan:
    """Chosen ranks per layer name, and the analytic MACs of the plan's layers. ``reached`` is False
    when a whole-model MACs target could not be met (the plan is then the smallest one found)."""

    ranks: dict[str, tuple[int, ...]]
    macs: int
    reached: bool = True


def eligible_layers(
    model: nn.Module, context: PurifyContext, skip_stem: bool = True, skip_output: bool = True
) -> tuple[dict[str, Geometry], ChannelGraph]:
    """Factorizable layers (Conv2d groups=1, Linear) with their geometry."""
    graph = ChannelGraph(model, context.example_inputs)
    geometries = lowrank.layer_geometries(model, context.example_inputs)
    out = {}
    for name, geo in geometries.items():
        layer = model.get_submodule(name)
        info = graph.layers.get(name)
        if not lowrank.is_factorizable(layer) or _inside_low_rank(model, name):
            continue
        if skip_output and info is not None and info.coupling is Coupling.OUTPUT:
            continue
        if skip_stem and isinstance(layer, nn.Conv2d) and layer.in_channels <= 3:
            continue
        if geo.full_rank <= 1:
            continue
        out[name] = geo
    return out, graph


def _inside_low_rank(model: nn.Module, name: str) -> bool:
    """Whether layer ``name`` is a factor of an earlier factorization (never factorized again)."""
    parts = name.split(".")
    return any(isinstance(model.get_submodule(".".join(parts[:i])), lowrank.LowRank) for i in range(1, len(parts)))


def method_for(geometry: Geometry, method: Method) -> Method:
    """Tucker-2 only pays off on spatial kernels; 1x1 convs and linears use the SVD form."""
    return Method.SVD if geometry.k == 1 else method


def round_ranks(ranks: tuple[int, ...], caps: tuple[int, ...], multiple: int | None) -> tuple[int, ...]:
    """Each rank to the nearest multiple of ``multiple`` (at least one multiple, at most its cap):
    onnxruntime's CPU kernels run fastest on channel counts that are multiples of 8."""
    if not multiple:
        return ranks
    return tuple(min(cap, max(multiple, multiple * round(r / multiple))) for r, cap in zip(ranks, caps))


def plan_ranks(
    geometries: dict[str, Geometry],
    method: Method,
    *,
    fraction: float | None = None,
    energy: float | None = None,
    rank: int | None = None,
    spectra: dict | None = None,
    only_if_cheaper: bool = True,
    round_to: int | None = None,
) -> RankPlan:
    """Ranks for every layer that saves MACs under the given per-layer rule (optionally rounded)."""
    ranks: dict[str, tuple[int, ...]] = {}
    total = 0
    for name, geo in geometries.items():
        m = method_for(geo, method)
        if rank is not None:
            r = (min(rank, geo.full_rank),) if m is Method.SVD else (min(rank, geo.c_out), min(rank, geo.c_in))
        elif energy is not None:
            k = lowrank.rank_for_energy(spectra[name], energy)
            r = (k,) if m is Method.SVD else lowrank.tucker2_ranks(geo, k / geo.full_rank)
        else:
            r = lowrank.ranks_for_macs(geo, fraction, m)
        r = round_ranks(r, (geo.full_rank,) if m is Method.SVD else (geo.c_out, geo.c_in), round_to)
        if lowrank.saves_macs(geo, m, r) or not only_if_cheaper:
            ranks[name] = r
            total += geo.macs(m, r)
        else:
            total += geo.dense_macs
    return RankPlan(ranks, total)


@dataclass
class FactorizeDetails(PassDetails):
    """What ``Factorize`` did: each factorized layer (method, ranks, MACs before and after), the
    layers a factorization would not have made cheaper, the layers the graph could not handle, and
    whether the cost target was reached."""

    factorized: list[dict]
    skipped_no_gain: list[str]
    unsupported: list[str]
    reached: bool | None  # None without a cost target

    def target_reached(self) -> bool | None:
        return self.reached


@register_pass
@dataclass
class Factorize(Pass):
    """Replace layers by low-rank factors (SVD two-factor or Tucker-2) to a target."""

    name = "factorize"
    macs: float | None = None  # whole-model MACs fraction to keep (default 0.5 when no target is given)
    energy: float | None = None
    rank: Count | None = None
    method: Method = Method.SVD
    allocation: Allocation = Allocation.UNIFORM
    skip_stem: bool = True
    skip_output: bool = True
    layers: tuple[str, ...] = field(default_factory=tuple)  # restrict to these layer names (default: all eligible)
    only_if_cheaper: bool = True  # leave a layer dense when its factors would not cost fewer MACs
    round_to: Count | None = None  # ranks to multiples of this (8 suits onnxruntime's CPU kernels)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.method, self.allocation = Method(self.method), Allocation(self.allocation)
        given = [t for t in (self.macs, self.energy, self.rank) if t is not None]
        if len(given) > 1:
            raise InvalidInputError("Factorize takes one target: macs=, energy= or rank=")
        if not given:
            self.macs = 0.5
        for name, value in (("macs", self.macs), ("energy", self.energy)):
            if value is not None and not 0.0 < value <= 1.0:
                raise InvalidInputError(f"{name} must be a fraction in (0, 1], got {value}")
        if self.rank is not None and self.rank < 1:
            raise InvalidInputError("rank must be >= 1")

    def macs_kept(self, before: float) -> float:
        """``macs`` of ``before``; an energy or rank target says nothing about MACs in advance."""
        return before if self.macs is None else before * self.macs

    def run(self, model: nn.Module, context: PurifyContext) -> PassResult:
        geometries, graph = eligible_layers(model, context, self.skip_stem, self.skip_output)
        if self.layers:
            unknown = set(self.layers) - set(geometries)
            if unknown:
                raise InvalidInputError(f"not factorizable here: {sorted(unknown)}")
            geometries = {n: g for n, g in geometries.items() if n in self.layers}
        spectra = {n: lowrank.spectrum(model.get_submodule(n)) for n in geometries} if self._needs_spectra() else None
        plan = self._plan(model, context, geometries, spectra)
        layers = []
        for i, (name, ranks) in enumerate(plan.ranks.items()):
            geo, method = geometries[name], method_for(geometries[name], self.method)
            lowrank.replace_module(model, name, lowrank.factorize(model.get_submodule(name), method, ranks))
            layers.append(
                {
                    "layer": name,
                    "method": method.value,
                    "ranks": list(ranks),
                    "macs_before": geo.dense_macs,
                    "macs_after": geo.macs(method, ranks),
                }
            )
            report(context.progress, "factorize", i + 1, len(plan.ranks))
        skipped = sorted(set(geometries) - set(plan.ranks))
        details = FactorizeDetails(
            factorized=layers,
            skipped_no_gain=skipped,
            unsupported=[u.name for u in graph.unsupported],
            reached=plan.reached,
        )
        edits = (
            [{"op": "factorize", "layers": [{k: e[k] for k in ("layer", "method", "ranks")} for e in layers]}]
            if layers
            else []
        )
        return PassResult(model, details, edits)

    def _needs_spectra(self) -> bool:
        return self.energy is not None or (self.macs is not None and self.allocation is Allocation.ENERGY)

    def _plan(self, model, context, geometries, spectra) -> RankPlan:
        if self.rank is not None:
            return plan_ranks(
                geometries, self.method, rank=self.rank, only_if_cheaper=self.only_if_cheaper, round_to=self.round_to
            )
        if self.energy is not None:
            return plan_ranks(
                geometries,
                self.method,
                energy=self.energy,
                spectra=spectra,
                only_if_cheaper=self.only_if_cheaper,
                round_to=self.round_to,
            )
        return plan_for_macs(
            model, context, geometries, self.method, self.macs, self.allocation, spectra, self.round_to
        )


def plan_for_macs(
    model: nn.Module,
    context: PurifyContext,
    geometries: dict[str, Geometry],
    method: Method,
    fraction: float,
    allocation: Allocation,
    spectra: dict | None = None,
    round_to: int | None = None,
) -> RankPlan:
    """Ranks that bring the whole model to ``fraction`` of its measured MACs: bisection on the
    per-layer MACs fraction (``uniform``) or on one global energy threshold (``energy``)."""
    from ccpurify.cost import model_cost

    total = model_cost(model, context.example_inputs).macs
    fixed = total - sum(g.dense_macs for g in geometries.values())

    def plan_at(x: float) -> RankPlan:
        if allocation is Allocation.UNIFORM:
            return plan_ranks(geometries, method, fraction=x, round_to=round_to)
        return plan_ranks(geometries, method, energy=max(x, 1e-9), spectra=spectra, round_to=round_to)

    lo, hi, best = 0.0, 1.0, plan_at(1e-9)
    for _ in range(40):
        mid = (lo + hi) / 2
        plan = plan_at(mid)
        if fixed + plan.macs <= fraction * total:
            lo, best = mid, plan
        else:
            hi = mid
    return replace(best, reached=fixed + best.macs <= fraction * total)
