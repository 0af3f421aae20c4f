"""One defense, and another only where the first found no backdoor.

A detector-style defense (``TriggerPrune``) either finds the backdoor's trigger and removes what it
switches on, at almost no cost to clean accuracy, or finds nothing and leaves the model as it was. A
broad defense (OTBR) always acts and always costs accuracy: on CIFAR-10 BadNets OTBR's output
predicts the backdoor's target class on none of the clean images (docs/defaults.md, session 13),
where ``TriggerPrune`` with its patch search keeps validation CA 89.5% against the suspect's 89.8%
with ASR 0.9% (session 15). ``Fallback(first, otherwise)`` runs ``first`` and, only when it reports
that it removed no backdoor (``PassDetails.found_backdoor() is False``), runs ``otherwise`` on the
model as it was given, so the broad defense's cost is paid only for the backdoors the precise one
cannot see (WaNet's warp, Input-aware's per-image trigger). Where ``first`` cannot apply to the
model or context at all (its ``check`` refuses: no BatchNorm, no input normalisation), ``otherwise``
runs alone and the details say why.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass

from torch import nn

from ccpurify.errors import InvalidInputError
from ccpurify.passes.base import Pass, PassDetails, PassResult, PurifyContext, Training


@dataclass
class FallbackDetails(PassDetails):
    """Which passes ran and what each found: ``first``'s details (None when it could not apply, with
    its refusal in ``first_refused``), and ``otherwise``'s when it ran."""

    ran: list[str]
    first: PassDetails | None
    otherwise: PassDetails | None = None
    first_refused: str | None = None

    def found_backdoor(self) -> bool | None:
        return (self.otherwise or self.first).found_backdoor()

    def silenced_per_image_trigger(self) -> bool:
        return (self.otherwise or self.first).silenced_per_image_trigger()

    def found_triggers(self) -> tuple:
        """What the pass whose output this is reversed (``first``'s only where ``otherwise`` did not run)."""
        return (self.otherwise or self.first).found_triggers()

    def training(self) -> Training | None:
        """Both passes' images and sample-steps added up: each made its own."""
        trained = [t for d in (self.first, self.otherwise) if d is not None and (t := d.training()) is not None]
        if not trained:
            return None
        steps = [t.sample_steps for t in trained]
        return Training(
            sum(t.images for t in trained),
            "/".join(dict.fromkeys(t.kind for t in trained)),
            None if None in steps else sum(s for s in steps if s is not None),
        )

    def choices(self) -> str | None:
        said = [f"{d_name}: {c}" for d_name, d in self._ran_details() if (c := d.choices())]
        if self.first_refused is not None:
            said.insert(0, f"first pass skipped ({self.first_refused})")
        return "; then ".join(said) or None

    def target_reached(self) -> bool | None:
        return (self.otherwise or self.first).target_reached()

    def _ran_details(self) -> list[tuple[str, PassDetails]]:
        details = [d for d in (self.first, self.otherwise) if d is not None]
        return list(zip(self.ran, details, strict=True))

    def to_dict(self) -> dict:
        return {
            "ran": self.ran,
            "first": None if self.first is None else self.first.to_dict(),
            "otherwise": None if self.otherwise is None else self.otherwise.to_dict(),
            "first_refused": self.first_refused,
        }


@dataclass
class Fallback(Pass):
    """Run ``first`` (a pass that ``detects``); where it removed no backdoor, or cannot apply, run
    ``otherwise`` instead (see the module docstring).

    >>> Pipeline([Fallback(TriggerPrune(trigger_model="both"), OTBR()), Prune(macs=0.75), Recover()])
    """

    name = "fallback"
    kind = "defense"
    detects = True
    first: Pass
    otherwise: Pass

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.first.detects:
            raise InvalidInputError(
                f"Fallback runs its second pass where the first found no backdoor, and {self.first.name!r} does not "
                "report that (it always acts): give a detecting pass first, e.g. TriggerPrune()"
            )

    def check(self, model: nn.Module, context: PurifyContext) -> None:
        """``otherwise`` must apply; ``first`` may refuse (``run`` then skips it, and a warning says so
        before anything runs: ``purify(model)`` without ``normalize=`` would otherwise lose the
        trigger search without a word)."""
        self.otherwise.check(model, context)
        try:
            self.first.check(model, context)
        except InvalidInputError as refusal:
            warnings.warn(
                f"{self.first.name} is skipped and {self.otherwise.name} runs alone: {refusal}",
                UserWarning,
                stacklevel=2,
            )

    def sample_steps(self, context: PurifyContext) -> int:
        """At most both passes' work (``otherwise`` runs only where ``first`` finds nothing)."""
        return self.first.sample_steps(context) + self.otherwise.sample_steps(context)

    def macs_kept(self, before: float) -> float:
        """The larger of what either pass keeps: an estimate that errs long, as ``sample_steps``."""
        return max(self.first.macs_kept(before), self.otherwise.macs_kept(before))

    def config(self) -> dict:
        return {
            "first": {"name": self.first.name, **self.first.config()},
            "otherwise": {"name": self.otherwise.name, **self.otherwise.config()},
        }

    def run(self, model: nn.Module, context: PurifyContext) -> PassResult:
        try:
            self.first.check(model, context)
        except InvalidInputError as refusal:
            otherwise = self.otherwise.run(model, context)
            details = FallbackDetails([self.otherwise.name], None, otherwise.details, first_refused=str(refusal))
            return PassResult(otherwise.model, details, otherwise.edits)
        first = self.first.run(copy.deepcopy(model), context)
        if first.details.found_backdoor() is not False:
            return PassResult(first.model, FallbackDetails([self.first.name], first.details), first.edits)
        otherwise = self.otherwise.run(model, context)
        details = FallbackDetails([self.first.name, self.otherwise.name], first.details, otherwise.details)
        return PassResult(otherwise.model, details, otherwise.edits)
