"""The pass protocol: ``Pass(model, context) -> (model', PassReport)``, and pipelines of passes.

A pass never modifies the model it is given: it works on a copy and returns it. Every report
carries params and MACs before and after (measured, not assumed), wall time, the pass's own
details (a typed ``PassDetails`` dataclass per pass: per-layer changes, counts, training logs), and
the structural edits it made, so the result can be saved with ``ccpurify.io.save_model`` and rebuilt
without pickle.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any, ClassVar

import torch
from torch import nn

from ccpurify.cost import model_cost
from ccpurify.errors import InvalidInputError, NonFiniteError
from ccpurify.passes.data import LabeledData, UnlabeledData
from ccpurify.passes.options import check_option_values, plain
from ccpurify.probes import check_edited_model, check_finite_outputs, non_finite_tensor, probe_inputs
from ccpurify.progress import ProgressCallback
from ccpurify.recipe import edits_of, set_edits, set_input_shape
from ccpurify.transforms import Normalize, as_normalize


class Mode(str, Enum):
    """How a defense that flags channels applies its verdict (CLP, RNP)."""

    FAITHFUL = "faithful"  # as the paper's reference code: zero the flagged BN scale (and shift) in place
    COMPRESS = "compress"  # zero them, then remove the channels physically through the graph


@dataclass
class PurifyContext:
    """What a pass may use besides the model.

    ``example_inputs`` fixes the input size (MACs, graph tracing, noise shape); ``clean_data`` is a
    small labelled clean set (RNP); ``unlabeled_data`` a pool of unlabelled images (BCU). Data-free
    passes use neither. Nothing here is the test set. ``normalize`` maps [0, 1] pixel images to the
    model's input (its mean/std normalisation) when known; data-free synthesis uses it.
    """

    example_inputs: torch.Tensor = field(default_factory=lambda: torch.zeros(1, 3, 32, 32))
    num_classes: int | None = None
    device: str = "cpu"
    seed: int = 0
    clean_data: LabeledData | None = None
    unlabeled_data: UnlabeledData | None = None
    progress: ProgressCallback | None = None
    normalize: Normalize | None = None
    teacher: nn.Module | None = None  # set by Pipeline: the latest defense's output (for Recover)
    pipeline_input: nn.Module | None = None  # set by Pipeline: the model it was given (Recover(teacher_from="input"))
    # set by Pipeline: the latest defense's details (``found_backdoor()``, ``found_triggers()``: what it found)
    teacher_details: PassDetails | None = None

    def __post_init__(self) -> None:
        self.normalize = as_normalize(self.normalize)  # (mean, std) as the API takes it, checked

    def generator(self, salt: int = 0) -> torch.Generator:
        """A fresh generator seeded from the context (passes stay deterministic and independent)."""
        return torch.Generator().manual_seed(self.seed * 1_000_003 + salt)

    def require_clean_data(self, who: str) -> LabeledData:
        if self.clean_data is None:
            raise InvalidInputError(f"{who} needs labelled clean images: pass clean_data= (CLI: --clean-data)")
        return self.clean_data

    def require_unlabeled_data(self, who: str) -> UnlabeledData:
        if self.unlabeled_data is None:
            raise InvalidInputError(f"{who} needs unlabelled images: pass unlabeled_data= (CLI: --unlabeled-data)")
        return self.unlabeled_data


@dataclass(frozen=True)
class Training:
    """What a pass trained on: how many images of which kind, and how many sample-steps (images seen)."""

    images: int
    kind: str  # "labelled", "unlabelled" or "synthetic"
    sample_steps: int | None = None


@dataclass
class PassDetails:
    """What a pass found and did beyond sizes and time. Every pass declares its own subclass (e.g.
    ``PruneDetails``), so a report's fields are named, typed and documented next to the pass."""

    def training(self) -> Training | None:
        """The images the pass trained on, for ``PipelineReport.budget``; None for passes that do not train."""
        return None

    def choices(self) -> str | None:
        """What the pass chose from the model itself (e.g. OTBR's searched ratio), for the console; None
        when it chose nothing."""
        return None

    def target_reached(self) -> bool | None:
        """False when the pass had a size target it could not reach; None when it has no target."""
        return None

    def found_backdoor(self) -> bool | None:
        """For a pass that searches for a backdoor before it acts (``TriggerPrune``): whether it found
        one (``Fallback`` runs its other defense where it did not); None for passes that always act."""
        return None

    def silenced_per_image_trigger(self) -> bool:
        """For a defense that also checks for a per-image trigger (``TriggerPrune(early_depth=)``):
        whether it silenced channels for one. Such a defense's output has lost early features that
        clean images need too, so a later ``Recover`` may trust it less (``guard_scope_per_image``)."""
        return False

    def found_triggers(self) -> tuple[Any, ...]:
        """The reversed triggers behind a found backdoor (``TriggerPrune``'s ``invariance.PatchTrigger``
        and ``UniversalTrigger`` that passed its gate), for a later ``Recover`` to unlearn; empty
        for passes that reverse none, or found nothing."""
        return ()

    def to_dict(self) -> dict:
        return _jsonable(asdict(self))


@dataclass
class PassReport:
    """What one pass did, in numbers (serialises to JSON)."""

    name: str
    config: dict
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    wall_time_s: float
    details: PassDetails = field(default_factory=PassDetails)
    edits: list[dict] = field(default_factory=list)

    @property
    def macs_ratio(self) -> float:
        return self.macs_after / self.macs_before if self.macs_before else 1.0

    @property
    def params_ratio(self) -> float:
        return self.params_after / self.params_before if self.params_before else 1.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(details=self.details.to_dict(), macs_ratio=self.macs_ratio, params_ratio=self.params_ratio)
        return d


@dataclass
class PassResult:
    """What ``Pass.run`` returns: the edited model, details for the report, structural edits."""

    model: nn.Module
    details: PassDetails = field(default_factory=PassDetails)
    edits: list[dict] = field(default_factory=list)


class Pass(ABC):
    """A model-to-model transformation: a defense, a compression step or a recovery step."""

    name: ClassVar[str]
    kind: ClassVar[str] = "compression"  # "defense", "compression" or "recovery"
    # True for a pass that searches for a backdoor before it acts and reports whether it found one
    # (its details' ``found_backdoor()``): what ``Fallback`` needs of its first pass.
    detects: ClassVar[bool] = False

    def __post_init__(self) -> None:
        """Dataclass passes (each ``__post_init__`` calls this first): an option of the wrong type, out
        of its range or not finite is refused in one line naming it (``ccpurify.passes.options``),
        however the pass was built, before the pass's own checks compare it with anything; numpy
        numbers are stored as Python ones."""
        options = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
        check_option_values(type(self), options, self.name)
        for key, value in options.items():  # numpy numbers as Python ones: the config is saved as JSON
            if (converted := plain(value)) is not value:
                setattr(self, key, converted)

    def __call__(self, model: nn.Module, context: PurifyContext | None = None) -> tuple[nn.Module, PassReport]:
        context = context or PurifyContext()
        self.check(model, context)
        example = context.example_inputs.to(context.device)
        work = copy.deepcopy(model).to(context.device).eval()
        work.requires_grad_(True)  # a frozen model would make tracing and scoring see nothing (private copy)
        check_finite_outputs(work, [example, *probe_inputs(example)], f"the model given to pass {self.name!r}")
        inherited = edits_of(work)
        before = model_cost(work, example)
        started = time.perf_counter()
        result = self.run(work, context)
        wall = time.perf_counter() - started
        if not isinstance(result.details, PassDetails):
            raise TypeError(
                f"pass {self.name!r} returned details of type {type(result.details).__name__}; "
                "return a PassDetails dataclass (subclass it with the pass's own fields)"
            )
        out = result.model.eval()
        _check_finite(out, self.name)
        if result.edits:
            check_edited_model(out, example, f"pass {self.name!r}")
        else:
            check_finite_outputs(out, [example], f"the output of pass {self.name!r}")
        set_edits(out, inherited + result.edits)  # also right when run() called other passes
        set_input_shape(out, (1, *example.shape[1:]))  # the size the edits were traced at: saving replays them on it
        after = model_cost(out, example)
        report = PassReport(
            name=self.name,
            config=self.config(),
            params_before=before.params,
            params_after=after.params,
            macs_before=before.macs,
            macs_after=after.macs,
            wall_time_s=wall,
            details=result.details,
            edits=result.edits,
        )
        return out, report

    def sample_steps(self, context: PurifyContext) -> int:
        """About how many images this pass will push through a forward and a backward pass (its
        training or synthesis work), for a time estimate (``Pipeline.estimate_seconds``). Passes
        that only analyse and edit weights cost next to nothing and say 0."""
        return 0

    def macs_kept(self, before: float) -> float:
        """The fraction of the pipeline input's MACs the model keeps after this pass, given that
        fraction ``before`` it, for a time estimate: the passes after a compression pass train the
        smaller model. Passes with a MACs target say what it is; a defense that removes a few
        channels (TriggerPrune, compact OTBR) cannot say in advance and keeps ``before``."""
        return before

    def check(self, model: nn.Module, context: PurifyContext) -> None:
        """Refuse, before any work (a ``Pipeline`` asks every pass first), a model or context this
        pass cannot work with: raise ``InvalidInputError`` saying what to do. Nothing by default."""

    @abstractmethod
    def run(self, model: nn.Module, context: PurifyContext) -> PassResult:
        """Transform ``model`` (already a private copy, in eval mode, on the context's device)."""

    def config(self) -> dict[str, Any]:
        """The pass's parameters as JSON (dataclass passes get this for free)."""
        return _jsonable(asdict(self)) if hasattr(self, "__dataclass_fields__") else {}


def _check_finite(model: nn.Module, pass_name: str) -> None:
    """A pass whose own training diverged (Recover, BCU, RNP) would otherwise hand back NaN
    weights that score 1/K accuracy; the input model is untouched (the pass ran on a copy)."""
    if (name := non_finite_tensor(model.state_dict())) is not None:
        raise NonFiniteError(
            f"pass {pass_name!r} produced NaN or Inf in {name!r} (its optimisation diverged); the input model is "
            "unchanged: lower the pass's learning rate or check the data it was given"
        )


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "value") and not isinstance(value, (int, float, str, bool)):
        return value.value  # enums
    if isinstance(value, (int, float, str, bool)) or value is None:
        return value
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # numpy and torch scalars
        return value.item()
    return repr(value)


@dataclass
class PipelineReport:
    passes: list[PassReport]

    @property
    def wall_time_s(self) -> float:
        return sum(p.wall_time_s for p in self.passes)

    @property
    def macs_before(self) -> int:
        return self.passes[0].macs_before if self.passes else 0

    @property
    def macs_after(self) -> int:
        return self.passes[-1].macs_after if self.passes else 0

    @property
    def params_before(self) -> int:
        return self.passes[0].params_before if self.passes else 0

    @property
    def params_after(self) -> int:
        return self.passes[-1].params_after if self.passes else 0

    def budget(self) -> str:
        """What the run spent, pass by pass: wall time and, where a pass trained on images, how many
        images of which kind and how many sample-steps (images seen, augmented): each pass's
        ``details.training()``."""
        parts = []
        for p in self.passes:
            text = f"{p.name} {p.wall_time_s:.0f} s"
            trained = p.details.training()
            if trained is not None:
                steps = f", {trained.sample_steps:,} sample-steps" if trained.sample_steps is not None else ""
                text += f" ({trained.images:,} {trained.kind} images{steps})"
            parts.append(text)
        return " · ".join(parts)

    def choices(self) -> str:
        """What the passes chose from the model, e.g. "otbr: ratio 0.05 (...)"; empty when none chose."""
        return " · ".join(f"{p.name}: {c}" for p in self.passes if (c := p.details.choices()) is not None)

    @property
    def pipeline(self) -> str:
        """The passes that ran, in order (what a report names, rather than "default")."""
        return " -> ".join(p.name for p in self.passes)

    def summary(self) -> dict:
        """A few numbers for a shipped file's metadata: what ran, what it cost, what it kept."""
        return {
            "pipeline": self.pipeline,
            "params": [self.params_before, self.params_after],
            "macs": [self.macs_before, self.macs_after],
            "wall_time_s": round(self.wall_time_s, 1),
            "budget": self.budget(),
        }

    def to_dict(self) -> dict:
        return {
            "pipeline": self.pipeline,
            "passes": [p.to_dict() for p in self.passes],
            "wall_time_s": self.wall_time_s,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "macs_before": self.macs_before,
            "macs_after": self.macs_after,
            "macs_ratio": self.macs_after / self.macs_before if self.macs_before else 1.0,
            "params_ratio": self.params_after / self.params_before if self.params_before else 1.0,
        }


class Pipeline:
    """Passes run in order; each gets the previous one's output.

    >>> Pipeline([CLP(), Prune(macs=0.5), Recover()])(model, context)
    """

    def __init__(self, passes: Sequence[Pass]) -> None:
        self.passes = list(passes)

    def __call__(self, model: nn.Module, context: PurifyContext | None = None) -> tuple[nn.Module, PipelineReport]:
        """Run the passes in order. ``context.teacher`` starts as the input model and becomes each
        defense's output, so a later ``Recover`` distills from the purified, not the suspect, model
        (unless it asks for ``context.pipeline_input``, the model given here); with it,
        ``context.teacher_details`` says what that defense found."""
        context = context or PurifyContext()
        for p in self.passes:  # a pass that cannot apply is refused before the earlier ones spend minutes
            p.check(model, context)
        outer = context.teacher, context.pipeline_input, context.teacher_details
        context.teacher, context.teacher_details = model, None
        context.pipeline_input = model if outer[1] is None else outer[1]
        reports = []
        try:
            for p in self.passes:
                model, report = p(model, context)
                reports.append(report)
                if p.kind == "defense":
                    context.teacher, context.teacher_details = model, report.details
        finally:
            context.teacher, context.pipeline_input, context.teacher_details = outer
        return model, PipelineReport(reports)

    def estimate_seconds(self, model: nn.Module, context: PurifyContext | None = None) -> tuple[float, int]:
        """(seconds, sample-steps): the passes' declared work (``Pass.sample_steps``) times one
        sample-step of ``model`` timed here (a forward and backward pass of a batch of 64 on the
        context's device), each pass's work scaled by the MACs the model keeps when it runs
        (``Pass.macs_kept``): the recovery after pruning to 0.75 trains a model that costs about
        0.75 of the timed one (its teacher's forward on the dense model is scaled too, a slight
        under-count). A rough figure: it does not count what only analyses weights."""
        context = context or PurifyContext()
        steps, scaled, kept = 0, 0.0, 1.0
        for p in self.passes:
            work = p.sample_steps(context)
            steps, scaled = steps + work, scaled + kept * work
            kept = p.macs_kept(kept)
        return (seconds_per_sample_step(model, context) * scaled if steps else 0.0), steps

    def __repr__(self) -> str:
        return f"Pipeline({self.passes!r})"


def seconds_per_sample_step(model: nn.Module, context: PurifyContext, batch: int = 64) -> float:
    """Wall time of one image through a forward and a backward pass of a copy of ``model``: the
    fastest of three timed batches after one warm-up (allocators, kernels), so that a busy machine
    inflates the figure less."""
    work = copy.deepcopy(model).to(context.device).train()
    work.requires_grad_(True)
    x = torch.randn(batch, *context.example_inputs.shape[1:], generator=torch.Generator().manual_seed(0))
    x = x.to(context.device)
    timings = []
    for _ in range(4):
        started = time.perf_counter()
        work(x).float().logsumexp(1).mean().backward()
        timings.append(time.perf_counter() - started)
    return min(timings[1:]) / batch
