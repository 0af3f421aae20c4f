"""Probe inputs: cheap checks that a model computes finite outputs and one fixed graph.

A structural pass traces the model on one example input (torch-pruning follows autograd), so a
forward whose operations depend on the data (``if x.mean() > 0: ...``) would be edited along one
branch and break on the other. And a model with finite weights can still compute NaN (a negative
BatchNorm variance). Both are refused here with a one-line message, before and after each pass,
instead of producing a model that scores 1/K or crashes later (issue: hostile inputs and faults).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ccpurify.cost import device_of
from ccpurify.errors import InvalidInputError, NonFiniteError

PROBE_SEED = 20201130


def non_finite_tensor(state: Mapping[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point tensor that holds NaN or Inf, or None."""
    return next((name for name, t in state.items() if t.is_floating_point() and not torch.isfinite(t).all()), None)


def probe_inputs(example: torch.Tensor) -> list[torch.Tensor]:
    """Three deterministic inputs shaped like ``example`` that differ in sign and scale, so a
    data-dependent branch (on a mean, a norm or a sign) takes a different path on some of them."""
    g = torch.Generator().manual_seed(PROBE_SEED)
    u = torch.rand(example.shape, generator=g, dtype=example.dtype)
    n = torch.randn(example.shape, generator=g, dtype=example.dtype)
    return [t.to(example.device) for t in (u, -u, 3 * n)]


def _forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    if not isinstance(out, torch.Tensor):
        raise InvalidInputError(
            f"the model returns {type(out).__name__}, not one tensor of logits; wrap it so forward returns the logits"
        )
    return out


def output_classes(model: nn.Module, example: torch.Tensor) -> int:
    """The number of logits ``model`` computes for ``example`` (run in eval mode on the model's own
    device, so the caller's model is never moved; mode restored)."""
    was_training = model.training
    try:
        with torch.no_grad():
            out = _forward(model.eval(), example.to(device_of(model)))
    except RuntimeError as exc:
        raise InvalidInputError(
            f"the model fails on an example input of shape {tuple(example.shape)} ({str(exc).splitlines()[0][:160]}); "
            "pass example_inputs= of the shape it takes (CLI: --input-shape C,H,W, or the model's --dataset)"
        ) from exc
    finally:
        model.train(was_training)
    if out.ndim != 2 or out.shape[1] < 2:
        raise InvalidInputError(f"the model returns logits of shape {tuple(out.shape)}; expected (batch, classes >= 2)")
    return int(out.shape[1])


def non_finite_cause(model: nn.Module) -> str:
    """Why ``model`` computes NaN or Inf, for a one-line error: the tensor that holds them, or else
    what makes finite weights compute them."""
    name = non_finite_tensor(model.state_dict())
    if name is not None:
        return f"its weights hold NaN or Inf (first in {name!r}): a corrupt file or a diverged training"
    return "although its weights are finite (for example a negative BatchNorm variance or an overflow)"


def check_finite_outputs(model: nn.Module, inputs: list[torch.Tensor], who: str) -> None:
    """Refuse a model that computes NaN/Inf (or fails) on a probe input."""
    with torch.no_grad():
        for x in inputs:
            if not torch.isfinite(_forward(model, x)).all():
                raise NonFiniteError(
                    f"{who} computes NaN or Inf on a probe input, {non_finite_cause(model)}; nothing was written"
                )


def graph_signature(model: nn.Module, x: torch.Tensor) -> tuple[str, ...]:
    """The operations autograd recorded for ``model(x)``, in a deterministic traversal order."""
    with torch.enable_grad():
        out = _forward(model, x.detach().requires_grad_(True))
    seen, order, stack = set(), [], [out.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        order.append(type(fn).__name__)
        stack.extend(f for f, _ in reversed(fn.next_functions))
    return tuple(order)


def check_static_graph(model: nn.Module, example: torch.Tensor, who: str = "a structural pass") -> None:
    """Refuse a model whose forward records different operations on different inputs."""
    reference = graph_signature(model, example)
    for x in probe_inputs(example):
        if graph_signature(model, x) != reference:
            raise InvalidInputError(
                f"the model's forward runs different operations for different inputs (data-dependent control flow), "
                f"so {who} cannot trace it on one example; make the forward static (e.g. torch.where instead of "
                "an if on tensor values) before purifying"
            )


def check_edited_model(model: nn.Module, example: torch.Tensor, who: str) -> None:
    """After a structural edit: the model must run and stay finite on the example and every probe."""
    try:
        check_finite_outputs(model, [example, *probe_inputs(example)], who)
    except RuntimeError as exc:
        raise InvalidInputError(
            f"{who} produced a model that fails on a probe input ({str(exc).splitlines()[0][:160]}); the input model "
            "is unchanged: the forward probably depends on the data"
        ) from exc
