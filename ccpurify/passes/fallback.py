"""One defense, and another only where the first found no backdoor.

A detector-style defense (``TriggerPrune``) either finds the backdoor's trigger and removes what it
switches on, at almost no cost to clean accuracy, or finds nothing and leaves the model as it was. A
broad defense (OTBR) always acts and always costs accuracy: on CIFAR-10 BadNets OTBR's output
predicts the backdoor's target class on none of the clean images (docs/defaults.md, session 13),
where ``TriggerPrune`` with its patch search keeps validation CA 89.5% against the suspect's 89.9%
with ASR 0.9% (session 15). ``Fallback(first, otherwise)`` runs ``first`` and, only when it reports
that it found no backdoor (``PassDetails.found_backdoor() is False``), runs ``otherwise`` on the
model as it was given, so the broad defense's cost is paid only for the backdoors the precise one
cannot see (WaNet's warp, Input-aware's per-image trigger).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from torch import nn

from ccpurify.passes.base import Pass, PassDetails, PassResult, PurifyContext, Training


@dataclass
class FallbackDetails(PassDetails):
    """Which passes ran and what each found: ``first``'s details, and ``otherwise``'s when it ran."""

    ran: list[str]
    first: PassDetails
    otherwise: PassDetails | None = None

    def found_backdoor(self) -> bool | None:
        return self.first.found_backdoor() if self.otherwise is None else self.otherwise.found_backdoor()

    def training(self) -> Training | None:
        trained = [t for d in (self.first, self.otherwise) if d is not None and (t := d.training()) is not None]
        if not trained:
            return None
        steps = [t.sample_steps for t in trained]
        return Training(
            max(t.images for t in trained),
            trained[0].kind,
            None if None in steps else sum(s for s in steps if s is not None),
        )

    def choices(self) -> str | None:
        said = [f"{name}: {c}" for name, d in zip(self.ran, (self.first, self.otherwise)) if d and (c := d.choices())]
        return "; then ".join(said) or None

    def target_reached(self) -> bool | None:
        return (self.otherwise or self.first).target_reached()

    def to_dict(self) -> dict:
        return {
            "ran": self.ran,
            "first": self.first.to_dict(),
            "otherwise": None if self.otherwise is None else self.otherwise.to_dict(),
        }


@dataclass
class Fallback(Pass):
    """Run ``first``; where it found no backdoor, run ``otherwise`` instead (see the module docstring).

    >>> Pipeline([Fallback(TriggerPrune(trigger_model="both"), OTBR()), Prune(macs=0.75), Recover()])
    """

    name = "fallback"
    kind = "defense"
    first: Pass
    otherwise: Pass

    def check(self, model: nn.Module, context: PurifyContext) -> None:
        self.first.check(model, context)
        self.otherwise.check(model, context)

    def sample_steps(self, context: PurifyContext) -> int:
        return self.first.sample_steps(context) + self.otherwise.sample_steps(context)

    def config(self) -> dict:
        return {
            "first": {"name": self.first.name, **self.first.config()},
            "otherwise": {"name": self.otherwise.name, **self.otherwise.config()},
        }

    def run(self, model: nn.Module, context: PurifyContext) -> PassResult:
        first = self.first.run(copy.deepcopy(model), context)
        if first.details.found_backdoor() is not False:
            return PassResult(first.model, FallbackDetails([self.first.name], first.details), first.edits)
        otherwise = self.otherwise.run(model, context)
        details = FallbackDetails([self.first.name, self.otherwise.name], first.details, otherwise.details)
        return PassResult(otherwise.model, details, otherwise.edits)
