"""What a model costs: parameters and multiply-accumulates of one forward pass (torch-pruning's counter).

Every pass reports its cost before and after (``PassReport``), so this lives in the core; the
evaluation harness (``ccpurify.metrics``) re-exports it.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch_pruning as tp
from torch import nn


@dataclass(frozen=True)
class ModelCost:
    """Parameters and multiply-accumulates of one forward pass at the example input's size."""

    params: int
    macs: int

    def to_dict(self) -> dict:
        return asdict(self)


def model_cost(model: nn.Module, example_inputs: torch.Tensor | Sequence[int] = (1, 3, 32, 32)) -> ModelCost:
    """Params and MACs through torch-pruning's counter (conv MACs = k*k*Cin*Cout/groups per pixel).

    MACs are counted for a batch of one, whatever the example's batch size.
    """
    if not isinstance(example_inputs, torch.Tensor):
        example_inputs = torch.zeros(*example_inputs)
    example = example_inputs[:1].to(device_of(model))
    was_training = model.training
    model.eval()
    try:
        macs, params = tp.utils.count_ops_and_params(model, example)
    finally:
        model.train(was_training)
    return ModelCost(params=int(params), macs=int(macs))


def device_of(model: nn.Module) -> torch.device:
    """Where the model's parameters live, else its buffers (CPU for a model with neither)."""
    t = next(itertools.chain(model.parameters(), model.buffers()), None)
    return t.device if t is not None else torch.device("cpu")
