"""The one-call API, ``ccpurify.purify``: run a defense (or any pass or pipeline) on a model.

>>> import ccpurify
>>> result = ccpurify.purify(model, method="clp")                 # data-free
>>> result = ccpurify.purify(model, method="rnp", clean_data=(x, y))
>>> result.model, result.report.macs_after, result.save("purified.safetensors")
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from torch import nn

from ccpurify.errors import InvalidInputError, InvalidTypeError
from ccpurify.io import save_model
from ccpurify.passes import PASSES, Pass, Pipeline, PipelineReport, PurifyContext, as_labeled, as_unlabeled, create
from ccpurify.probes import output_classes
from ccpurify.progress import ProgressCallback
from ccpurify.transforms import Normalize


@dataclass
class PurifyResult:
    model: nn.Module
    report: PipelineReport
    input_shape: tuple[int, ...] = (1, 3, 32, 32)  # the example input the passes traced (edits replay on it)

    def save(self, path: str | os.PathLike, extra: dict | None = None) -> Path:
        """Save the purified model (base architecture + edit recipe + safetensors weights + the input
        shape its edits are replayed on when loading)."""
        return save_model(self.model, path, input_shape=self.input_shape, extra={"purify": self.report.to_dict(), **(extra or {})})


def resolve(
    method: str | Pass | Pipeline | Sequence | None, options: dict, has_clean: bool, has_unlabeled: bool, macs: float | None = None,
) -> Pipeline:  # fmt: skip
    """A pipeline from a pass name, a pass, a pipeline, a list of those, or None (the defaults).
    ``macs`` is the default pipeline's MACs target, or the ``macs`` option of a named pass."""
    if macs is not None and (isinstance(macs, bool) or not isinstance(macs, (int, float)) or not 0 < macs < 1):
        raise InvalidInputError(f"macs must be the fraction of the dense model's MACs to keep, a number in (0, 1); got {macs!r}")
    if method is None:
        from ccpurify.passes.defaults import default_pipeline

        if options:
            raise InvalidInputError("options need a named method; the default pipeline takes only macs=")
        return default_pipeline(has_clean=has_clean, has_unlabeled=has_unlabeled, macs=macs)
    if macs is not None:
        if not isinstance(method, str):
            raise InvalidInputError("macs= applies to the default pipeline or a named pass; set it on your Pass or Pipeline instead")
        if method in PASSES and "macs" not in {f.name for f in fields(PASSES.get(method))}:
            raise InvalidInputError(f"the {method!r} pass takes no MACs target; macs= applies to the default pipeline, prune, factorize or cc")
        options = {**options, "macs": macs}
    if isinstance(method, Pipeline):
        return method
    if isinstance(method, Pass):
        return Pipeline([method])
    if isinstance(method, str):
        return Pipeline([create(method, **options)])
    if isinstance(method, Sequence):
        if options:
            raise InvalidInputError("options apply to a single named method; configure each pass of a list yourself")
        return Pipeline([p for m in method for p in ([m] if isinstance(m, Pass) else resolve(m, {}, has_clean, has_unlabeled).passes)])
    raise InvalidTypeError(f"method must be a pass name, a Pass, a Pipeline or a list of them; got {type(method).__name__}")


def purify(
    model: nn.Module,
    method: str | Pass | Pipeline | Sequence | None = None,
    *,
    example_inputs: torch.Tensor | None = None,
    clean_data=None,
    unlabeled_data=None,
    num_classes: int | None = None,
    normalize: Normalize | tuple[Sequence[float], Sequence[float]] | None = None,
    macs: float | None = None,
    seed: int = 0,
    device: str = "cpu",
    progress: ProgressCallback | None = None,
    **options,
) -> PurifyResult:
    """Purify ``model`` with ``method`` (a registered pass name and its ``options``, a ``Pass``, a
    ``Pipeline``, or None for the default pipeline for the data given). ``normalize`` is the model's
    input normalisation (a ``Normalize`` or ``(mean, std)``), when known: data-free passes that make
    images use it. ``macs`` is the fraction of the dense MACs the default pipeline keeps (its chosen
    target when None; ``ccpurify.passes.defaults``), or a named pass's ``macs`` option. The input
    model is not modified."""
    if not isinstance(model, nn.Module):
        raise InvalidTypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise InvalidInputError(f"device {device!r} was asked for, but torch sees no CUDA device; use device='cpu'")
    example = example_inputs if example_inputs is not None else torch.zeros(1, 3, 32, 32)
    if normalize is not None and not isinstance(normalize, Normalize):
        mean, std = normalize
        normalize = Normalize(tuple(float(v) for v in mean), tuple(float(v) for v in std))
    context = PurifyContext(
        example_inputs=example, num_classes=num_classes, device=device, seed=seed,
        clean_data=as_labeled(clean_data) if clean_data is not None else None,
        unlabeled_data=as_unlabeled(unlabeled_data) if unlabeled_data is not None else None, progress=progress,
        normalize=normalize,
    )  # fmt: skip
    if context.num_classes is None:
        context.num_classes = output_classes(model, example.to(device))
    for data, who in ((context.clean_data, "clean_data"), (context.unlabeled_data, "unlabeled_data")):
        if data is not None:
            data.check(example, who)
    if context.clean_data is not None:
        context.clean_data.check_classes(context.num_classes, "clean_data")
    pipeline = resolve(method, options, context.clean_data is not None, context.unlabeled_data is not None, macs)
    purified, report = pipeline(model, context)
    return PurifyResult(purified, report, (1, *example.shape[1:]))
