"""Passes: backdoor defenses and compression steps with one protocol, created by name.

>>> from ccpurify import passes
>>> passes.list_passes()
>>> model2, report = passes.create("prune", macs=0.5)(model, passes.PurifyContext())
>>> model3, report = passes.Pipeline([passes.create("clp"), passes.create("factorize", macs=0.5)])(model)
"""

from __future__ import annotations

from ccpurify.passes.base import (
    Pass,
    PassDetails,
    PassReport,
    PassResult,
    Pipeline,
    PipelineReport,
    PurifyContext,
    Training,
)
from ccpurify.passes.data import LabeledData, UnlabeledData, as_labeled, as_unlabeled
from ccpurify.passes.options import check_option_names
from ccpurify.passes.registry import PASSES, register_pass
from ccpurify.registry import UnknownNameError


def create(name: str, **options) -> Pass:
    """Build pass ``name`` with keyword options: its dataclass fields, checked by name here and by
    type, range and finiteness when the pass is built (``ccpurify.passes.options``)."""
    check_option_names(PASSES.get(name), options, name)
    return PASSES.create(name, **options)


def list_passes(pattern: str = "*") -> list[str]:
    return PASSES.list(pattern)


from ccpurify.passes import bcu, cc, clp, factorize, otbr, prune, recover, rnp, trigger_prune  # noqa: E402,F401  (register)
from ccpurify.passes.bcu import BCU  # noqa: E402
from ccpurify.passes.cc import CleanCompact  # noqa: E402
from ccpurify.passes.clp import CLP  # noqa: E402
from ccpurify.passes.factorize import Factorize  # noqa: E402
from ccpurify.passes.fallback import Fallback  # noqa: E402
from ccpurify.passes.otbr import OTBR  # noqa: E402
from ccpurify.passes.prune import Prune  # noqa: E402
from ccpurify.passes.recover import Recover  # noqa: E402
from ccpurify.passes.rnp import RNP  # noqa: E402
from ccpurify.passes.trigger_prune import EarlyPatch, TriggerModel, TriggerPrune  # noqa: E402

__all__ = [
    "BCU",
    "CLP",
    "PASSES",
    "RNP",
    "CleanCompact",
    "EarlyPatch",
    "Factorize",
    "Fallback",
    "OTBR",
    "Recover",
    "LabeledData",
    "Pass",
    "PassDetails",
    "PassReport",
    "PassResult",
    "Pipeline",
    "PipelineReport",
    "Prune",
    "PurifyContext",
    "Training",
    "TriggerModel",
    "TriggerPrune",
    "UnknownNameError",
    "UnlabeledData",
    "as_labeled",
    "as_unlabeled",
    "create",
    "list_passes",
    "register_pass",
]
