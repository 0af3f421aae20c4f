"""Merging instead of dropping: fold each removed channel into the kept channel it resembles
(Neuron Merging, Kim et al., NeurIPS 2020).

For an internal channel group (conv -> BN -> activation -> consumers), channel ``r`` and channel
``k`` compute ``a_r = act(f_r . x + b_r)`` and ``a_k = act(f_k . x + b_k)`` with the BatchNorm folded
into the filter ``f`` and bias ``b``. If ``(f_r, b_r) = s (f_k, b_k)`` with ``s > 0`` and the
activation is positively homogeneous (ReLU: ``act(s z) = s act(z)``), then ``a_r = s a_k``, and
the consumers lose nothing when ``r`` is removed and ``s`` times its input weights are added to
``k``'s. For channels that are only similar, the kept channel with the highest cosine similarity of
folded (filter, bias) vectors is chosen and ``s`` is the ratio of their norms, as in the paper. A
silenced channel (all-zero folded filter and bias: what CLP, RNP and soft removal leave) is never a
merge source or target, so merging cannot copy a trigger feature a defense cut into the survivors.

Measured on the clean CIFAR-10 zoo model (PreAct-ResNet18 x0.25), global pruning to 0.75 MACs,
validation CA right after pruning: without compensation 17.2% (merging every removed channel: 18.6%);
with compensation 68.8% (merging every removed channel: 63.0%; only pairs with cosine >= 0.5: 66.5%).
Its narrow layers hold few redundant channels (the best kept match of a removed channel has mean
cosine 0.38), so merging is off by default.
"""

from __future__ import annotations

import torch
from torch import nn

from ccpurify.graph import ChannelGraph, Coupling


def folded_filters(conv: nn.Module, bn: nn.modules.batchnorm._BatchNorm | None) -> torch.Tensor:
    """(out_channels, fan_in + 1): each output channel's filter and bias with ``bn`` folded in."""
    weight = conv.weight.detach().flatten(1)
    bias = conv.bias.detach() if conv.bias is not None else torch.zeros(weight.shape[0], dtype=weight.dtype)
    if bn is not None:
        scale = (
            bn.weight.detach() / bn.running_var.add(bn.eps).sqrt()
            if bn.affine
            else 1 / bn.running_var.add(bn.eps).sqrt()
        )
        shift = bn.bias.detach() if bn.affine else torch.zeros_like(scale)
        weight, bias = weight * scale[:, None], (bias - bn.running_mean) * scale + shift
    return torch.cat([weight, bias[:, None]], dim=1)


def _reads_exactly(consumer: nn.Module, channels: int) -> bool:
    """Whether ``consumer``'s input channels are exactly ``channels`` producer channels, ungrouped."""
    width = consumer.in_channels if isinstance(consumer, nn.Conv2d) else consumer.in_features
    return width == channels and getattr(consumer, "groups", 1) == 1


@torch.no_grad()
def merge_removed_channels(
    model: nn.Module, graph: ChannelGraph, removed: dict[str, list[int]], min_similarity: float = 0.0
) -> dict:
    """Before ``removed`` output channels of internal layers are pruned from ``model``, add each one's
    input weights in every consumer, scaled, to the most similar kept channel's (edits ``model`` in
    place; the channels themselves are left for the pruner). Layers that are not internal, or whose
    consumers do not read exactly their channels (e.g. a linear layer after a flatten), are skipped.
    Returns the number of merged and skipped channels and the mean similarity of the merged pairs."""
    merged, skipped, similarities = 0, 0, []
    for name, channels in removed.items():
        info = graph.layers.get(name)
        consumers = (
            [graph.module(c) for c in graph.consumers(name)]
            if info is not None and info.coupling is Coupling.INTERNAL
            else []
        )
        if not consumers or not all(_reads_exactly(c, info.out_channels) for c in consumers):
            skipped += len(channels)
            continue
        bn = graph.module(info.bn) if info.bn is not None else None
        filters = folded_filters(graph.module(name), bn)
        norms = filters.norm(dim=1)
        removed_set = set(channels)
        kept = torch.tensor(
            [c for c in range(info.out_channels) if c not in removed_set and norms[c] > 0], dtype=torch.long
        )
        if len(kept) == 0:
            skipped += len(channels)
            continue
        unit = filters / norms.clamp_min(1e-12)[:, None]
        for r in channels:
            if norms[r] == 0:  # silenced: never a merge source
                skipped += 1
                continue
            cosine = unit[kept] @ unit[r]
            best = int(cosine.argmax())
            if float(cosine[best]) < min_similarity:
                skipped += 1
                continue
            k, scale = int(kept[best]), float(norms[r] / norms[kept[best]])
            for consumer in consumers:
                consumer.weight[:, k] += scale * consumer.weight[:, r]
            merged += 1
            similarities.append(float(cosine[best]))
    mean = sum(similarities) / len(similarities) if similarities else None
    return {"merged": merged, "skipped": skipped, "mean_similarity": mean}
