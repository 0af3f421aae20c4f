"""The one-call API, ``ccpurify.purify``: run a defense (or any pass or pipeline) on a model.

>>> import ccpurify
>>> result = ccpurify.purify(model, method="clp")                 # data-free
>>> result = ccpurify.purify(model, method="rnp", clean_data=(x, y))
>>> result.model, result.report.macs_after, result.save("purified.safetensors")
"""

from __future__ import annotations

import inspect
import os
import warnings
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
from ccpurify.recipe import input_shape_of
from ccpurify.transforms import Normalize, as_normalize


@dataclass
class PurifyResult:
    model: nn.Module
    report: PipelineReport
    input_shape: tuple[int, ...] = (1, 3, 32, 32)  # the example input the passes traced (edits replay on it)
    normalize: Normalize | None = None  # the input normalisation given to purify, when known

    def save(self, path: str | os.PathLike, extra: dict | None = None, overwrite: bool = True) -> Path:
        """Save the purified model (base architecture + edit recipe + safetensors weights + the input
        shape its edits are replayed on when loading), loaded back and compared before it appears
        (``ccpurify.io.save_model``). A model of your own class records its import path."""
        norm = (
            {"normalize": {"mean": list(self.normalize.mean), "std": list(self.normalize.std)}}
            if self.normalize
            else {}
        )
        return save_model(
            self.model,
            path,
            input_shape=self.input_shape,
            overwrite=overwrite,
            extra={"purify": self.report.to_dict(), **norm, **(extra or {})},
        )

    def export(
        self, path: str | os.PathLike, class_names: Sequence[str] | None = None, overwrite: bool = True, **options
    ):
        """Export the purified model to one verified ONNX file whose metadata holds the input shape,
        the normalisation (when given to ``purify``), ``class_names``, the recipe and a summary of
        this report (``exporters.onnx.export``; ``options`` go to it, e.g. ``opset``)."""
        from ccpurify.atomic import refuse_existing
        from exporters.metadata import deployment_metadata
        from exporters.onnx import export

        if not overwrite:
            refuse_existing(path, overwrite=False)
        norm = self.normalize
        metadata = deployment_metadata(
            self.input_shape,
            mean=norm.mean if norm else None,
            std=norm.std if norm else None,
            class_names=class_names,
            report=self.report.summary(),
        )
        return export(self.model, path, torch.zeros(self.input_shape), metadata=metadata, **options)


def resolve(
    method: str | Pass | Pipeline | Sequence | None,
    options: dict,
    has_clean: bool,
    has_unlabeled: bool,
    macs: float | None = None,
) -> Pipeline:
    """A pipeline from a pass name, a pass, a pipeline, a list of those, or None (the defaults).
    ``macs`` is the default pipeline's MACs target, or the ``macs`` option of a named pass."""
    if macs is not None and (isinstance(macs, bool) or not isinstance(macs, (int, float)) or not 0 < macs < 1):
        raise InvalidInputError(
            f"macs must be the fraction of the dense model's MACs to keep, a number in (0, 1); got {macs!r}"
        )
    if method is None:
        from ccpurify.passes.defaults import default_pipeline

        if options:
            raise InvalidInputError(
                f"options ({', '.join(sorted(options))}) configure a named method (CLI: --method NAME --set KEY=VALUE); "
                "the default pipeline takes only a MACs target (--macs / macs=)"
            )
        return default_pipeline(has_clean=has_clean, has_unlabeled=has_unlabeled, macs=macs)
    if macs is not None:
        if not isinstance(method, str):
            raise InvalidInputError(
                "macs= applies to the default pipeline or a named pass; set it on your Pass or Pipeline instead"
            )
        if method in PASSES and "macs" not in {f.name for f in fields(PASSES.get(method))}:
            raise InvalidInputError(
                f"the {method!r} pass takes no MACs target; macs= applies to the default pipeline, prune, factorize or cc"
            )
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
        return Pipeline(
            [
                p
                for m in method
                for p in ([m] if isinstance(m, Pass) else resolve(m, {}, has_clean, has_unlabeled).passes)
            ]
        )
    raise InvalidTypeError(
        f"method must be a pass name, a Pass, a Pipeline or a list of them; got {type(method).__name__}"
    )


def check_single_float32_input(model: nn.Module) -> None:
    """Refuse, before any work, models the passes cannot trace: several inputs, or non-float32 weights."""
    try:
        required = [
            p
            for p in inspect.signature(model.forward).parameters.values()
            if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
    except (TypeError, ValueError):  # a forward without a signature (C extension): let tracing decide
        required = []
    if len(required) > 1:
        names = ", ".join(p.name for p in required)
        raise InvalidInputError(
            f"the model's forward takes {len(required)} inputs ({names}); ccpurify's passes trace models of one "
            "image tensor: wrap the model so that forward(images) supplies the others"
        )
    dtypes = sorted(
        {str(t.dtype).removeprefix("torch.") for t in model.parameters() if t.is_floating_point()} - {"float32"}
    )
    if dtypes:
        raise InvalidInputError(
            f"the model's parameters are {', '.join(dtypes)}; ccpurify's passes and exports work in float32: "
            "pass model.float() (the purified model and its ONNX file are float32)"
        )


def example_input_for(model: nn.Module, given: torch.Tensor | None, data=None) -> torch.Tensor:
    """The one-image example the passes trace: ``given`` (its first item), else one of the images
    given as data, else the size the model records (a loaded file's input shape), else 32 x 32 with
    the first convolution's channel count, with a warning (MACs, OTBR's noise and Recover's
    synthetic images are all made at this size)."""
    if given is not None:
        if not isinstance(given, torch.Tensor):
            raise InvalidTypeError(
                f"example_inputs must be one tensor (N, C, H, W), got {type(given).__name__}; models of "
                "several inputs (tuples, dicts) are not supported"
            )
        if given.ndim >= 2 and given.shape[0] == 0:
            raise InvalidInputError(
                f"example_inputs has an empty batch {tuple(given.shape)}; give one example, e.g. torch.zeros(1, C, H, W)"
            )
        if given.is_floating_point() and not torch.isfinite(given).all():
            raise InvalidInputError(
                "example_inputs holds NaN or Inf; give a finite example (its values are traced, its shape sets the size)"
            )
        if given.ndim < 2 or given.shape[0] < 1 or not given.is_floating_point():
            raise InvalidInputError(
                f"example_inputs must be a float tensor with a batch dimension, got {given.dtype} {tuple(given.shape)}"
            )
        return given.detach().float()
    if data is not None:
        return torch.zeros_like(data.x[:1])
    recorded = input_shape_of(model)
    if recorded is not None:
        return torch.zeros(1, *recorded[1:])
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    channels = conv.in_channels if conv is not None else 3
    warnings.warn(
        f"example_inputs not given: assuming 1 x {channels} x 32 x 32 images (MACs, traced shapes and made-up images use it); "
        f"pass example_inputs=torch.zeros(1, C, H, W) for another input size",
        stacklevel=3,
    )
    return torch.zeros(1, channels, 32, 32)


@dataclass
class Plan:
    """What ``purify`` runs: the resolved pipeline and its context (data converted and checked).
    ``plan(...)`` then ``estimate_seconds`` and ``run`` is ``purify`` with a time estimate first."""

    pipeline: Pipeline
    context: PurifyContext

    def estimate_seconds(self, model: nn.Module) -> tuple[float, int]:
        """(seconds, sample-steps) on this machine: ``Pipeline.estimate_seconds``."""
        return self.pipeline.estimate_seconds(model, self.context)

    def run(self, model: nn.Module) -> PurifyResult:
        purified, report = self.pipeline(model, self.context)
        return PurifyResult(purified, report, (1, *self.context.example_inputs.shape[1:]), self.context.normalize)


def plan(
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
) -> Plan:
    """Everything ``purify`` checks and resolves before it runs (same arguments), without running."""
    if not isinstance(model, nn.Module):
        raise InvalidTypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise InvalidInputError(f"device {device!r} was asked for, but torch sees no CUDA device; use device='cpu'")
    check_single_float32_input(model)
    normalize = as_normalize(normalize)
    clean = as_labeled(clean_data) if clean_data is not None else None
    unlabeled = as_unlabeled(unlabeled_data) if unlabeled_data is not None else None
    # A method or option that does not exist is refused before the model runs.
    pipeline = resolve(method, options, clean is not None, unlabeled is not None, macs)
    example = example_input_for(model, example_inputs, clean or unlabeled)
    if normalize is not None and len(normalize.mean) != example.shape[1]:
        raise InvalidInputError(
            f"normalize has {len(normalize.mean)} channels and the model's input {example.shape[1]}: give one mean "
            "and one std per input channel"
        )
    context = PurifyContext(
        example_inputs=example,
        num_classes=num_classes,
        device=device,
        seed=seed,
        clean_data=clean,
        unlabeled_data=unlabeled,
        progress=progress,
        normalize=normalize,
    )
    if context.num_classes is None:
        context.num_classes = output_classes(model, example)
    for data, who in ((context.clean_data, "clean_data"), (context.unlabeled_data, "unlabeled_data")):
        if data is not None:
            data.check(example, who)
    if context.clean_data is not None:
        context.clean_data.check_classes(context.num_classes, "clean_data")
    for p in pipeline.passes:  # a plan that cannot run is refused here, not after its estimate
        p.check(model, context)
    return Plan(pipeline, context)


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
    ``Pipeline``, or None for the default pipeline for the data given). ``example_inputs`` fixes the
    input size (``example_input_for``). ``normalize`` is the model's input normalisation (a
    ``Normalize`` or ``(mean, std)``), when known: data-free passes that make images use it.
    ``macs`` is the fraction of the dense MACs the default pipeline keeps (its chosen target when
    None; ``ccpurify.passes.defaults``), or a named pass's ``macs`` option. The input model is not
    modified."""
    return plan(
        model,
        method,
        example_inputs=example_inputs,
        clean_data=clean_data,
        unlabeled_data=unlabeled_data,
        num_classes=num_classes,
        normalize=normalize,
        macs=macs,
        seed=seed,
        device=device,
        progress=progress,
        **options,
    ).run(model)
