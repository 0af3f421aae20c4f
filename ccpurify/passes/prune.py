"""Structured pruning to a MACs or params target through the dependency graph (torch-pruning).

The pruning ratio is found by bisection on copies until the measured MACs (or params) reach the
target; output layers and groups the graph marks as blocked are never pruned.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from enum import Enum

import torch
import torch_pruning as tp
from torch import nn
from torch.nn import functional as F

from ccpurify.compensate import gaussian_compensation
from ccpurify.cost import model_cost
from ccpurify.distill import correspondence_after_edits
from ccpurify.errors import InvalidInputError
from ccpurify.graph import ChannelGraph, Coupling, apply_history
from ccpurify.merge import merge_removed_channels
from ccpurify.passes.base import Pass, PassDetails, PassResult, PurifyContext
from ccpurify.passes.options import Count, PositiveFraction
from ccpurify.passes.registry import register_pass
from ccpurify.progress import report


class Importance(str, Enum):
    MAGNITUDE = "magnitude"  # L2 norm of each channel's weights, summed over the coupled group
    TAYLOR = "taylor"  # |weight * gradient| on the context's data (labels, or the model's own predictions)
    BN_SCALE = "bn_scale"  # |gamma| of the BatchNorms in the group (network slimming)


def protected_layers(graph: ChannelGraph, names: tuple[str, ...] = ()) -> list[str]:
    """Names of layers a pruner must not touch: outputs, blocked groups and ``names``."""
    keep = [n for n, info in graph.layers.items() if info.coupling in (Coupling.OUTPUT, Coupling.BLOCKED)]
    return keep + [n for n in names if n not in keep]


@dataclass
class PruneDetails(PassDetails):
    """What ``Prune`` did: the per-layer ratio its search settled on, the cost target and what it
    achieved (fractions of the input's MACs or params), how many channel groups it pruned, and the
    merge / compensation summaries when those options were on."""

    ratio: float
    target: float
    achieved: float
    groups_pruned: int
    reached: bool
    merge: dict | None = None  # ccpurify.merge.merge_removed_channels
    compensation: dict | None = None  # ccpurify.compensate.gaussian_compensation

    def target_reached(self) -> bool:
        return self.reached


@register_pass
@dataclass
class Prune(Pass):
    """Remove channels until the model keeps ``macs`` (or ``params``) of its current cost."""

    name = "prune"
    macs: float | None = None  # default 0.5 when neither target is given
    params: float | None = None
    importance: Importance = Importance.MAGNITUDE
    global_pruning: bool = False
    ignored: tuple[str, ...] = ()
    max_layer_ratio: PositiveFraction = 0.9
    search_steps: Count = 12
    # Keep each pruned layer's channel count a multiple of this: CPU kernels (onnxruntime's MLAS)
    # run fastest on multiples of 8, and odd widths can make a pruned model slower than the dense one.
    round_to: Count | None = None
    # Repair what the removed channels changed from the BatchNorm statistics alone
    # (ccpurify.compensate.gaussian_compensation): the next BatchNorms' means and variances and the
    # classifier's bias. No data needed; one forward of each model on Gaussian replacement inputs.
    compensate: bool = False
    # Fold each removed channel of an internal group into the most similar kept channel's consumer
    # weights instead of dropping it (ccpurify.merge, Neuron Merging); silenced channels never merge.
    merge: bool = False
    merge_similarity: float = 0.0  # merge only pairs whose folded filters have at least this cosine similarity
    # The target is a fraction of the *pipeline's input* (the dense model) instead of this pass's
    # input: channels earlier defenses removed count towards it. After TriggerPrune and compact OTBR
    # removed channels, pruning their output to 0.75 of its own MACs left CIFAR-10 Blended at 0.63.
    of_pipeline_input: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        self.importance = Importance(self.importance)
        if self.macs is not None and self.params is not None:
            raise InvalidInputError("Prune takes one target: macs= or params= (a fraction in (0, 1]), not both")
        if self.macs is None and self.params is None:
            self.macs = 0.5
        target = self.macs if self.macs is not None else self.params
        if not 0.0 < target <= 1.0:
            raise InvalidInputError(f"the target must be a fraction in (0, 1], got {target}")
        if not -1.0 <= self.merge_similarity <= 1.0:
            raise InvalidInputError(f"merge_similarity is a cosine similarity in [-1, 1], got {self.merge_similarity}")
        if self.round_to is not None and self.round_to < 1:
            raise InvalidInputError(f"round_to must be a positive channel count, got {self.round_to}")

    def macs_kept(self, before: float) -> float:
        """``macs`` of ``before``, or of the pipeline's input with ``of_pipeline_input`` (where a model
        already below it is left as it is); a params target says nothing about MACs."""
        if self.macs is None:
            return before
        return min(before, self.macs) if self.of_pipeline_input else before * self.macs

    def _importance(self):
        if self.importance is Importance.MAGNITUDE:
            return tp.importance.GroupMagnitudeImportance(p=2)
        if self.importance is Importance.TAYLOR:
            return tp.importance.GroupTaylorImportance()
        return tp.importance.BNScaleImportance()

    def _accumulate_gradients(self, model: nn.Module, context: PurifyContext) -> None:
        data = context.clean_data or context.unlabeled_data
        if data is None:
            raise InvalidInputError("Taylor importance needs images: pass clean_data= or unlabeled_data=")
        model.zero_grad(set_to_none=True)
        for idx, x in data.batches(128):
            logits = model(x.to(context.device))
            labels = (
                context.clean_data.y[idx].to(context.device) if context.clean_data is not None else logits.argmax(1)
            )
            F.cross_entropy(logits, labels).backward()

    def _trial(
        self, model: nn.Module, ratio: float, context: PurifyContext, protected: list[str]
    ) -> tuple[nn.Module, tp.pruner.BasePruner]:
        trial = copy.deepcopy(model)
        if self.importance is Importance.TAYLOR:
            self._accumulate_gradients(trial, context)
        with torch.enable_grad():
            pruner = tp.pruner.BasePruner(
                trial,
                context.example_inputs,
                importance=self._importance(),
                pruning_ratio=ratio,
                global_pruning=self.global_pruning,
                max_pruning_ratio=self.max_layer_ratio,
                ignored_layers=[trial.get_submodule(n) for n in protected],
                round_to=self.round_to,
            )
            pruner.step()
        trial.zero_grad(set_to_none=True)
        return trial.eval(), pruner

    def run(self, model: nn.Module, context: PurifyContext) -> PassResult:
        example = context.example_inputs
        measure = (
            (lambda m: model_cost(m, example).macs)
            if self.macs is not None
            else (lambda m: model_cost(m, example).params)
        )
        start = measure(model)
        dense = context.pipeline_input if self.of_pipeline_input and context.pipeline_input is not None else model
        goal = (self.macs if self.macs is not None else self.params) * (start if dense is model else measure(dense))
        protected = protected_layers(ChannelGraph(model, example), self.ignored)
        best, best_pruner, best_ratio = model, None, 0.0
        smallest = None  # (cost, trial, pruner, ratio): used when no ratio reaches the goal
        lo, hi = 0.0, self.max_layer_ratio
        for step in range(self.search_steps if start > goal else 0):  # already at the goal: nothing to remove
            mid = (lo + hi) / 2
            trial, pruner = self._trial(model, mid, context, protected)
            cost = measure(trial)
            report(
                context.progress, "prune: search ratio", step + 1, self.search_steps, ratio=mid, cost_ratio=cost / start
            )
            if smallest is None or cost < smallest[0]:
                smallest = (cost, trial, pruner, mid)
            if cost <= goal:
                hi, best, best_pruner, best_ratio = mid, trial, pruner, mid
            else:
                lo = mid
            if cost <= goal and (goal - cost) / start < 0.01:  # within one percent of the target
                report(
                    context.progress,
                    "prune: search ratio",
                    self.search_steps,
                    self.search_steps,
                    ratio=mid,
                    cost_ratio=cost / start,
                )
                break
        if best_pruner is None and smallest is not None:  # the goal is out of reach: prune as far as the search went
            _, best, best_pruner, best_ratio = smallest
        history = best_pruner.pruning_history() if best_pruner is not None else []
        achieved = measure(best) / start
        details = PruneDetails(
            ratio=best_ratio,
            target=goal / start,
            achieved=achieved,
            groups_pruned=len(history),
            reached=achieved <= goal / start + 1e-9,
        )
        edits = (
            [{"op": "remove_channels", "history": [[n, bool(o), [int(i) for i in idx]] for n, o, idx in history]}]
            if history
            else []
        )
        if self.merge and history:
            merged = copy.deepcopy(model)
            graph = ChannelGraph(merged, example)
            removed = {n: list(idx) for n, is_out, idx in history if is_out and n in graph.layers}
            details.merge = merge_removed_channels(merged, graph, removed, self.merge_similarity)
            best = apply_history(merged, edits[0]["history"], example).eval()
        if self.compensate and edits:
            correspondence = correspondence_after_edits(model, edits, example)
            details.compensation = gaussian_compensation(best, model, correspondence, example, seed=context.seed)
        return PassResult(best, details, edits)
