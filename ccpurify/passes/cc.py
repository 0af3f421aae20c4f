"""C&C (reconstructed): Clean & Compact, a data-free low-rank defense (Phan et al., ECCV 2024).

No public code exists; this follows docs/defenses.md "C&C" and docs/reference/cc_otbr.md part C.
Call the results "C&C (reconstructed)". For every conv (groups = 1) and hidden linear layer:

1. Matricize ``W (C_out x C_in*kh*kw)``; fold the BN that the graph shows normalising this layer's
   output into the rows (``fold_bn``), so singular values reflect the effective gain.
2. SVD; normalise the spectrum per layer: ``sigma / sigma_1`` (``max``) or a z-score (``zscore``).
3. Purify the trigger-sensitive ranks, those whose normalised value exceeds the one global
   ``tau``: ``clip`` them down to the threshold or ``remove`` them.
4. Compact: truncate the tail to a rank from a whole-model MACs target (``macs``: per-layer
   ``uniform`` fraction, or one global ``energy`` threshold) or a per-layer ``energy`` fraction.
5. Re-parameterise as ``kxk conv (C_in -> r)`` + ``1x1 conv (r -> C_out)`` with the BN unfolded
   into the second factor; a layer that would not get cheaper keeps its dense (purified) weight.
6. Optional data-free recovery: synthesize images matching the BN statistics (ZeroQ-style) and
   distill the compact model from the *purified full-rank* model (never the suspect one).

``purify="none"`` with a MACs target is plain truncation (ablation H-B); ``macs=None`` is purification
without compaction (ablation H-A).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

import torch
from torch import nn

from ccpurify import lowrank
from ccpurify.errors import InvalidInputError
from ccpurify.lowrank import Method
from ccpurify.passes.base import Pass, PassDetails, PassResult, PurifyContext, Training
from ccpurify.passes.factorize import Allocation, eligible_layers, plan_for_macs, plan_ranks
from ccpurify.passes.options import Count, PositiveFloat
from ccpurify.passes.registry import register_pass
from ccpurify.progress import report


class Normalization(str, Enum):
    MAX = "max"
    ZSCORE = "zscore"


class RankPurification(str, Enum):
    CLIP = "clip"
    REMOVE = "remove"
    NONE = "none"


def normalized(s: torch.Tensor, how: Normalization) -> torch.Tensor:
    if how is Normalization.MAX:
        return s / s[0].clamp_min(1e-30)
    return (s - s.mean()) / s.std(unbiased=True).clamp_min(1e-30)


def purify_spectrum(s: torch.Tensor, tau: float, how: Normalization, action: RankPurification) -> torch.Tensor:
    """Singular values after purification: ranks with normalised value > tau clipped or removed."""
    if action is RankPurification.NONE or len(s) < 2:
        return s
    sensitive = normalized(s, how) > tau
    out = s.clone()
    if action is RankPurification.REMOVE:
        out[sensitive] = 0
    else:
        cap = tau * s[0] if how is Normalization.MAX else s.mean() + tau * s.std(unbiased=True)
        out[sensitive] = torch.minimum(out[sensitive], cap)
    return out


@dataclass
class CleanCompactDetails(PassDetails):
    """What C&C did: per layer its sensitive ranks and chosen rank, how many layers it factorized,
    the sensitive ranks in all, and the data-free recovery's report when ``recover=True``."""

    layers: dict[str, dict]
    factorized: int
    sensitive_ranks: int
    reached: bool | None = None  # whether the MACs target was reached (None without one)
    recover: PassDetails | None = None  # ccpurify.passes.recover.RecoverDetails

    def training(self) -> Training | None:
        return self.recover.training() if self.recover is not None else None

    def target_reached(self) -> bool | None:
        return self.reached


@register_pass
@dataclass
class CleanCompact(Pass):
    """C&C (reconstructed): purify trigger-sensitive ranks, truncate, re-parameterise as low rank."""

    name = "cc"
    kind = "defense"
    # Defaults frozen from the ablation (benchmarks/results/cc_ablation.md, sweep-cc-tau*.md), chosen
    # on validation DER (training-split images), never on the test split.
    tau: PositiveFloat = 1.75
    normalization: Normalization = Normalization.ZSCORE
    purify: RankPurification = RankPurification.CLIP
    fold_bn: bool = True
    macs: float | None = 0.5
    energy: float | None = None
    allocation: Allocation = Allocation.ENERGY
    skip_stem: bool = True
    skip_output: bool = True
    recover: bool = False
    recover_options: dict = field(default_factory=dict)
    only_if_cheaper: bool = True  # keep a layer dense (purified) when its factors would cost more MACs
    round_to: Count | None = None  # truncation ranks to multiples of this (8 suits onnxruntime's CPU kernels)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.normalization = Normalization(self.normalization)
        self.purify = RankPurification(self.purify)
        self.allocation = Allocation(self.allocation)
        if self.macs is not None and self.energy is not None:
            raise InvalidInputError("C&C takes one compaction target: macs= or energy= (or neither)")
        if self.macs is not None and not 0.0 < self.macs <= 1.0:
            raise InvalidInputError(f"macs must be a fraction in (0, 1], got {self.macs}")
        if self.recover_options:
            from ccpurify.passes.options import check_option_names
            from ccpurify.passes.recover import Recover

            if fixed := sorted({"teacher", "data"} & set(self.recover_options)):
                raise InvalidInputError(
                    f"C&C's recovery sets {', '.join(fixed)} itself; leave it out of recover_options"
                )
            check_option_names(Recover, self.recover_options, "recover")
            Recover(**self.recover_options)  # its values are checked when it is built, before any work

    def macs_kept(self, before: float) -> float:
        """``macs`` of ``before`` (an energy target says nothing about MACs in advance)."""
        return before if self.macs is None else before * self.macs

    def run(self, model: nn.Module, context: PurifyContext) -> PassResult:
        geometries, graph = eligible_layers(model, context, self.skip_stem, self.skip_output)
        scales: dict[str, torch.Tensor | None] = {}
        purified: dict[str, torch.Tensor] = {}
        per_layer = {}
        for name in geometries:
            bn_name = graph.layers[name].bn if self.fold_bn else None
            scales[name] = lowrank.bn_scale(graph.module(bn_name)) if bn_name else None
            w = lowrank.matricize(model.get_submodule(name))
            s = torch.linalg.svdvals(w if scales[name] is None else scales[name][:, None] * w)
            purified[name] = purify_spectrum(s, self.tau, self.normalization, self.purify)
            per_layer[name] = {
                "bn_folded": bn_name,
                "sensitive_ranks": int((purified[name] != s).sum()),
                "full_rank": len(s),
                "energy_kept": float((purified[name] ** 2).sum() / (s**2).sum()),
            }
        ranks, reached = self._ranks(model, context, geometries, purified)
        teacher = None
        if self.recover:
            import copy

            teacher = copy.deepcopy(model)  # becomes the purified full-rank model below
        edits_layers = []
        for i, name in enumerate(geometries):
            layer = model.get_submodule(name)
            target = purified[name]

            def transform(full: torch.Tensor, target=target) -> torch.Tensor:
                return target.to(full.dtype)

            if teacher is not None:
                _set_dense(
                    teacher.get_submodule(name), lowrank.svd_factorize(layer, len(target), scales[name], transform)
                )
            if name in ranks:
                lowrank.replace_module(
                    model, name, lowrank.svd_factorize(layer, ranks[name][0], scales[name], transform)
                )
                per_layer[name]["rank"] = ranks[name][0]
                edits_layers.append({"layer": name, "method": Method.SVD.value, "ranks": list(ranks[name])})
            elif self.purify is not RankPurification.NONE:
                _set_dense(layer, lowrank.svd_factorize(layer, len(target), scales[name], transform))
                per_layer[name]["rank"] = None
            report(context.progress, "cc: layers", i + 1, len(geometries))
        details = CleanCompactDetails(
            layers=per_layer,
            factorized=len(edits_layers),
            sensitive_ranks=sum(v["sensitive_ranks"] for v in per_layer.values()),
            reached=reached,
        )
        if teacher is not None:
            from ccpurify.passes.recover import recover_data_free

            details.recover = recover_data_free(model, teacher.eval(), context, **self.recover_options)
        edits = [{"op": "factorize", "layers": edits_layers}] if edits_layers else []
        return PassResult(model, details, edits)

    def _ranks(self, model, context, geometries, spectra) -> tuple[dict[str, tuple[int, ...]], bool | None]:
        """The rank of each layer to factorize, and whether the MACs target was reached (None without one)."""
        if self.macs is None and self.energy is None:
            return {}, None
        if self.energy is not None:
            return plan_ranks(
                geometries,
                Method.SVD,
                energy=self.energy,
                spectra=spectra,
                only_if_cheaper=self.only_if_cheaper,
                round_to=self.round_to,
            ).ranks, None
        plan = plan_for_macs(model, context, geometries, Method.SVD, self.macs, self.allocation, spectra, self.round_to)
        return plan.ranks, plan.reached


def _set_dense(layer: nn.Module, factors: lowrank.LowRank) -> None:
    """Write the product of two SVD factors back into ``layer``'s dense weight (same shape)."""
    a, b = factors[0].weight.detach(), factors[1].weight.detach()
    w = b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1)
    with torch.no_grad():
        layer.weight.copy_(w.reshape(layer.weight.shape))
