"""The default pipelines ``ccpurify.purify`` runs when no method is named, and the candidates they
were chosen from.

Every candidate is a fixed recipe: no per-model tuning. The benchmark grid
(``benchmarks/grid.py``) runs each candidate on the CIFAR-10 zoo models; the default for each kind
of defender data is the candidate with the best mean *validation* DER (CA and ASR measured on
training-split images no pass sees, never the test split) among those that at least halve the
MACs and are measurably faster (``MACS_GOAL``, ``LATENCY_GOAL``). The choice and its numbers are
recorded in ``benchmarks/results/default_selection.md`` and the README.
"""

from __future__ import annotations

from collections.abc import Callable

from ccpurify.passes.base import Pipeline
from ccpurify.passes.bcu import BCU
from ccpurify.passes.cc import CleanCompact
from ccpurify.passes.clp import CLP
from ccpurify.passes.otbr import OTBR
from ccpurify.passes.prune import Prune
from ccpurify.passes.recover import Recover
from ccpurify.passes.rnp import RNP

# CLP's u inside the pipelines: 2.25, the best mean validation DER of benchmarks/results/sweep-clp-u.md
# (the CLP pass itself keeps the published u = 3 as its default).
CLP_U = 2.25


# RNP on narrow models: prune this fraction of BN channels, ranked by the mean mask over the
# recovery steps (ccpurify.passes.rnp; chosen by mean validation DER in
# benchmarks/results/sweep-rnp-prune_fraction-mask_scoretrajectory.md).
RNP_FRACTION = 0.05


def ranked_rnp() -> RNP:
    return RNP(mask_score="trajectory", prune_fraction=RNP_FRACTION)


def prune(round_to: int | None = 8) -> Prune:
    """Half the MACs. Pruned widths stay multiples of 8: odd widths leave onnxruntime's CPU kernels
    under-used, and an unrounded 50%-MACs model was no faster than the dense one at batch 1
    (``clp+otbr+prune+recover-unrounded`` in benchmarks/results/default_selection.md)."""
    return Prune(macs=0.5, round_to=round_to)


# Recover's feature hints (BN inputs matched to the teacher's on the kept channels) at this weight:
# 10 beat 1 and 0 on validation CA after OTBR -> Prune -> Recover on CIFAR-10 WaNet and BadNets
# (benchmarks/results/recover_stages.md).
HINT_WEIGHT = 10.0


def hinted_recover() -> Recover:
    """Distillation on synthetic images with feature hints at ``HINT_WEIGHT``."""
    return Recover(data="synthetic", feature_weight=HINT_WEIGHT)


# Data-free: a defense, then compression to half the MACs, then distillation from the defense's
# output on images synthesized from the BatchNorm statistics.
CANDIDATES: dict[str, tuple[str, Callable[[], Pipeline]]] = {
    "clp+prune+recover": ("none", lambda: Pipeline([CLP(u=CLP_U), prune(), Recover(data="synthetic")])),
    "otbr+prune+recover": ("none", lambda: Pipeline([OTBR(), prune(), Recover(data="synthetic")])),
    "clp+otbr+prune+recover": ("none", lambda: Pipeline([CLP(u=CLP_U), OTBR(), prune(), Recover(data="synthetic")])),
    "clp+otbr+prune+recover-unrounded": ("none", lambda: Pipeline([CLP(u=CLP_U), OTBR(), prune(None), Recover(data="synthetic")])),
    "otbr+prune+recover-hints": ("none", lambda: Pipeline([OTBR(), prune(), hinted_recover()])),
    "clp+otbr+prune+recover-hints": ("none", lambda: Pipeline([CLP(u=CLP_U), OTBR(), prune(), hinted_recover()])),
    "cc+recover": ("none", lambda: Pipeline([CleanCompact(macs=0.5, recover=True, round_to=8)])),
    "otbr+cc+recover": ("none", lambda: Pipeline([OTBR(), CleanCompact(macs=0.5, recover=True, round_to=8)])),
    # A few hundred labelled images.
    "rnp+prune+recover": ("clean", lambda: Pipeline([RNP(), prune(), Recover(data="clean", hard_label_weight=1.0)])),
    "rnp-ranked+prune+recover": ("clean", lambda: Pipeline([ranked_rnp(), prune(), Recover(data="clean", hard_label_weight=1.0)])),
    "clp+otbr+prune+recover-clean": ("clean", lambda: Pipeline([CLP(u=CLP_U), OTBR(), prune(),
                                                                Recover(data="clean", hard_label_weight=1.0)])),  # fmt: skip
    # Unlabelled images.
    "bcu-compact": ("unlabeled", lambda: Pipeline([BCU(compact=prune())])),
    "clp+otbr+prune+recover-unlabeled": ("unlabeled", lambda: Pipeline([CLP(u=CLP_U), OTBR(), prune(), Recover(data="unlabeled")])),
}

# The selection rule (applied by benchmarks/grid.py, which writes results/default_selection.md):
# among the candidates for a kind of data that at least halve the MACs and cut the batch-1,
# 1-thread onnxruntime latency to at most LATENCY_GOAL of the dense model's, the best mean
# validation DER over the CIFAR-10 zoo models they were all run on.
MACS_GOAL = 0.5
LATENCY_GOAL = 0.8

# Chosen from the grid (see the module docstring); data-free is also what the demo runs.
DEFAULTS = {"none": "otbr+prune+recover-hints", "clean": "rnp-ranked+prune+recover", "unlabeled": "bcu-compact"}


def candidate(name: str) -> Pipeline:
    if name not in CANDIDATES:
        raise KeyError(f"unknown pipeline {name!r}; known: {', '.join(CANDIDATES)}")
    return CANDIDATES[name][1]()


def default_name(has_clean: bool, has_unlabeled: bool) -> str:
    return DEFAULTS["clean" if has_clean else "unlabeled" if has_unlabeled else "none"]


def default_pipeline(has_clean: bool = False, has_unlabeled: bool = False) -> Pipeline:
    """The default pipeline for the data a defender has (labelled data wins over unlabelled)."""
    return candidate(default_name(has_clean, has_unlabeled))
