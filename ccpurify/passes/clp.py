"""CLP: data-free backdoor removal by Channel Lipschitzness-based Pruning (Zheng et al., ECCV 2022).

For every conv whose output a BatchNorm normalises (found through the dependency graph), each output
channel k gets the upper bound of its channel Lipschitz constant (docs/defenses.md, "CLP"):

    UCLC_k = |gamma_k| / sqrt(var_k + eps) * sigma_max(W_k as a (C_in/groups) x (kh*kw) matrix)

computed for all channels at once with batched spectral norms. Within each layer, channels with
``UCLC_k > mean + u * std`` (unbiased std, u = 3) are flagged.

- ``mode="faithful"``: zero gamma_k and beta_k of the flagged channels, as the reference does.
- ``mode="compress"`` (default): remove the flagged channels physically through the graph.
  Internal channels are removed exactly (same logits as zeroing); residual-stream channels follow
  ``residual_policy`` (``soft``: zero the writer; ``group``: remove when every writer of that stream
  channel is flagged, else zero; ``hard``: remove).

Documented deviations from the reference code:
- pairing through the graph instead of module order (``reference_pairing=True`` restores the
  module-order pairing, including its known errors on pre-activation ResNets);
- ``eps`` inside the square root (the reference divides by sqrt(var) and then ignores a whole layer
  when one channel's variance is 0).
Convs that write into a residual sum have no BN of their own (PreAct conv2 / shortcut): ``unpaired``
says whether to skip them (default) or score them with the conv-only spectral norm.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch
from torch import nn

from ccpurify.errors import InvalidInputError
from ccpurify.graph import ChannelGraph, Coupling, RemovalPolicy
from ccpurify.passes.base import Mode, Pass, PassDetails, PassResult, PurifyContext
from ccpurify.passes.registry import register_pass
from ccpurify.passes.rnp import zero_bn_channels


class Unpaired(str, Enum):
    SKIP = "skip"
    CONV_ONLY = "conv_only"


def filter_spectral_norms(conv: nn.Conv2d) -> torch.Tensor:
    """sigma_max of each output filter reshaped to (C_in/groups, kh*kw), batched."""
    w = conv.weight.detach().to(torch.float64)
    return torch.linalg.matrix_norm(w.reshape(w.shape[0], w.shape[1], -1), ord=2)


def uclc(conv: nn.Conv2d, bn: nn.modules.batchnorm._BatchNorm | None) -> torch.Tensor:
    """Upper bound of each output channel's Lipschitz constant (conv-only when ``bn`` is None)."""
    norms = filter_spectral_norms(conv)
    if bn is None:
        return norms
    gain = bn.weight.detach().to(torch.float64).abs() / torch.sqrt(bn.running_var.to(torch.float64) + bn.eps)
    return gain * norms


def outliers(scores: torch.Tensor, u: float) -> list[int]:
    """Indices with ``score > mean + u * std`` (unbiased std); none for a single channel."""
    if scores.numel() < 2:
        return []
    threshold = scores.mean() + u * scores.std(unbiased=True)
    return torch.nonzero(scores > threshold).flatten().tolist()


def module_order_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(conv, bn) pairs the reference code uses: each BN with the last Conv2d registered before it."""
    pairs, last_conv = [], None
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            last_conv = (name, m)
        elif isinstance(m, nn.BatchNorm2d) and last_conv is not None and last_conv[1].out_channels == m.num_features:
            pairs.append((last_conv[0], name))
    return pairs


@dataclass
class CLPDetails(PassDetails):
    """What CLP found: per scored layer its conv, BN, coupling, channel count and flagged channels;
    the totals; how conv and BN were paired; and in compress mode what the graph removed."""

    pairing: str  # "graph" or "module_order" (the reference code's pairing)
    flagged: int
    scored_channels: int
    layers: dict[str, dict]
    unsupported: list[str] | None = None  # layers the graph could not handle (None: no graph was built)
    removed: int | None = None  # compress mode: channels removed physically ...
    zeroed: int | None = None  # ... and channels only zeroed (a residual group the policy kept)
    removal: dict | None = None


@register_pass
@dataclass
class CLP(Pass):
    """Channel Lipschitzness-based pruning (data-free)."""

    name = "clp"
    kind = "defense"
    u: float = 3.0
    mode: Mode = Mode.COMPRESS
    residual_policy: RemovalPolicy = RemovalPolicy.GROUP
    reference_pairing: bool = False
    unpaired: Unpaired = Unpaired.SKIP

    def __post_init__(self) -> None:
        super().__post_init__()
        self.mode, self.residual_policy, self.unpaired = (
            Mode(self.mode),
            RemovalPolicy(self.residual_policy),
            Unpaired(self.unpaired),
        )
        if self.reference_pairing and self.mode is not Mode.FAITHFUL:
            raise InvalidInputError(
                "reference_pairing reproduces the reference's BN zeroing; use it with mode='faithful'"
            )
        if self.u <= 0:
            raise InvalidInputError(f"u must be > 0, got {self.u}")

    def run(self, model: nn.Module, context: PurifyContext) -> PassResult:
        layers: dict[str, dict] = {}
        if self.reference_pairing:
            for conv_name, bn_name in module_order_pairs(model):
                flagged = outliers(uclc(model.get_submodule(conv_name), model.get_submodule(bn_name)), self.u)
                layers[bn_name] = {
                    "conv": conv_name,
                    "bn": bn_name,
                    "channels": model.get_submodule(bn_name).num_features,
                    "flagged": flagged,
                }
                zero_bn_channels(model, {bn_name: flagged}, beta=True)
            return PassResult(model, self._details(layers, None, None))

        graph = ChannelGraph(model, context.example_inputs)
        selection: dict[str, list[int]] = {}
        for name, info in graph.layers.items():
            if not info.type.startswith("Conv") or info.coupling in (Coupling.BLOCKED, Coupling.OUTPUT):
                continue
            conv = graph.module(name)
            if info.bn is None and self.unpaired is Unpaired.SKIP:
                continue
            flagged = outliers(uclc(conv, graph.module(info.bn) if info.bn else None), self.u)
            layers[name] = {
                "conv": name,
                "bn": info.bn,
                "coupling": info.coupling.value,
                "channels": info.out_channels,
                "flagged": flagged,
            }
            if flagged:
                selection[name] = flagged
        if self.mode is Mode.FAITHFUL:
            for name, flagged in selection.items():
                graph.zero_channels(name, flagged)
            return PassResult(model, self._details(layers, graph, None))
        removal = graph.remove_channels(selection, self.residual_policy)
        edits = [removal.edit()] if removal.history else []
        return PassResult(model, self._details(layers, graph, removal), edits)

    def _details(self, layers: dict, graph: ChannelGraph | None, removal) -> CLPDetails:
        return CLPDetails(
            pairing="module_order" if self.reference_pairing else "graph",
            flagged=sum(len(v["flagged"]) for v in layers.values()),
            scored_channels=sum(v["channels"] for v in layers.values()),
            layers=layers,
            unsupported=[u.name for u in graph.unsupported] if graph is not None else None,
            removed=removal.removed if removal is not None else None,
            zeroed=removal.zeroed if removal is not None else None,
            removal=removal.to_dict() if removal is not None else None,
        )
